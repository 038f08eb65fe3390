"""The Lua scripts the cache tier and the usage relay run on the server: each one is a single
atomic step.

Scripts are sent by SHA1 (``EVALSHA``) and, after a server restart forgot them, in full
(``EVAL``), which loads them again.
"""

from __future__ import annotations

import hashlib

import attrs

__all__ = ["ACQUIRE", "ACQUIRED", "EXISTS", "PUBLISH", "RELEASE", "STORE", "Script"]


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

#: ``PUBLISH(stream; maxlen, publisher, source, host, since, [seq, type, usage, time]...)``: one
#: ``XADD stream MAXLEN ~ maxlen * ...`` per usage, in order, with the relay's fields; returns
#: how many. One command for many usages costs the client a fraction of one ``XADD`` each.
PUBLISH = Script(
    "publish",
    "local key, maxlen = KEYS[1], ARGV[1] "
    "local publisher, source, host, since = ARGV[2], ARGV[3], ARGV[4], ARGV[5] "
    "for i = 6, #ARGV, 4 do "
    "redis.call('XADD', key, 'MAXLEN', '~', maxlen, '*', 'publisher', publisher, "
    "'seq', ARGV[i], 'type', ARGV[i + 1], 'usage', ARGV[i + 2], 'time', ARGV[i + 3], "
    "'source', source, 'host', host, 'since', since) "
    "end "
    "return (#ARGV - 5) / 4",
)
