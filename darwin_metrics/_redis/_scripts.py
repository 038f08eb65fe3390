"""The Lua scripts the tier runs on the server: each one is a single atomic step.

Scripts are sent by SHA1 (``EVALSHA``) and, after a server restart forgot them, in full
(``EVAL``), which loads them again.
"""

from __future__ import annotations

import hashlib

import attrs

__all__ = ["ACQUIRE", "ACQUIRED", "EXISTS", "RELEASE", "STORE", "Script"]


@attrs.frozen
class Script:
    """A Lua script and its SHA1, the name ``EVALSHA`` knows it by."""

    name: str
    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()


#: ``ACQUIRE(data, lock; token, px)``: :data:`EXISTS` if the value is there (read it),
#: :data:`ACQUIRED` if this caller now holds the load lock for ``px`` ms, else the lock's
#: remaining ms (-1: a lock without expiry).
ACQUIRE = Script(
    "acquire",
    "if redis.call('EXISTS', KEYS[1]) == 1 then return -4 end "
    "if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return -3 end "
    "return redis.call('PTTL', KEYS[2])",
)
EXISTS = -4
ACQUIRED = -3

#: ``STORE(data[, lock]; value, px[, token])``: store a loaded value unless another writer
#: stored one meanwhile, and release the load lock if this caller still holds it. Returns
#: ``{}`` if stored, ``{other}`` with the value that stands otherwise.
STORE = Script(
    "store",
    "local old = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'GET', 'PX', ARGV[2]) "
    "if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end "
    "if old then return {old} end "
    "return {}",
)

#: ``RELEASE(lock; token)``: delete the load lock if this caller still holds it.
RELEASE = Script(
    "release",
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
)
