"""What the cache stores: entries, the causes of their departure, and the sentinels."""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable
from typing import Any, Generic, Literal, TypeVar

__all__ = ["EvictionCause"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: The expiry of a buried entry: no clock reading is ever below it.
_DEAD = -math.inf


class _Sentinel(enum.Enum):
    MISSING = enum.auto()
    GONE = enum.auto()


_MISSING: Literal[_Sentinel.MISSING] = _Sentinel.MISSING
#: The value of a buried entry, so that the queue does not keep the value alive. Typed ``Any``
#: because it stands in for a value of any type (``typing.cast`` would cost a call per burial).
_GONE: Any = _Sentinel.GONE


class EvictionCause(enum.Enum):
    """Why an entry left a :class:`Cache`; the third argument given to ``on_evict``."""

    EXPIRED = "expired"
    """Its ttl (or ``ttl_after_access``) ran out: dropped when touched, by
    :meth:`Cache.clear_expired`, to make room for a new entry, or by an operation that found it
    expired."""

    SIZE = "size"
    """Evicted to make room for a new entry in a cache that held ``maxsize`` entries, or to keep
    the total weight within ``max_weight``."""

    REMOVED = "removed"
    """Removed on purpose: by :meth:`Cache.remove`, :meth:`Cache.pop`, ``del cache[key]``,
    :meth:`Cache.clear` or a decorated function's ``invalidate``."""

    REPLACED = "replaced"
    """Replaced by a new value for the same key (``set``, a load, a refresh) before it
    expired."""


# Enum members are slow to look up as class attributes on Python 3.11; the hot paths use these.
_EXPIRED = EvictionCause.EXPIRED
_SIZE = EvictionCause.SIZE
_REMOVED = EvictionCause.REMOVED
_REPLACED = EvictionCause.REPLACED


class _Entry(Generic[K, V]):
    """One cached value. Changed only under the cache's lock, except for ``visited``.

    Readers take no lock; they validate what they read as the cache's docstring says. Built by
    ``_Entry()`` and four attribute stores: without an ``__init__`` that costs about half of a
    call to a Python ``__init__`` on CPython 3.11. With ``__slots__`` an entry takes 64 bytes.
    """

    __slots__ = ("expires", "key", "value", "visited")

    key: K
    value: V
    #: Until when a lock-free reader may return the value without looking at anything else,
    #: by the cache's clock: the entry's expiry. ``_DEAD`` once buried, and always ``_DEAD``
    #: for an entry of a cache with ``ttl_after_access``, whose readers must also check its
    #: idle time (its expiry is then ``_RichEntry.cap``).
    expires: float
    #: SIEVE's bit: looked up since the eviction hand last passed. Set without the lock.
    visited: bool

    def bury(self) -> None:
        """Mark an entry that left the cache dead, and drop its value."""
        self.expires = _DEAD  # first: a reader that then sees _GONE sees a changed expiry
        self.value = _GONE


class _RichEntry(_Entry[K, V]):
    """An entry with what only some entries need (96 bytes).

    Every entry of a cache with a ``weigher`` or ``ttl_after_access`` is one; in other caches,
    the entries stored by a load with ``stale_if_error`` or ``refresh_after``.
    """

    __slots__ = ("accessed", "cap", "stale", "ttl", "weight")

    #: The ttl it was stored with, so that its age is ``expiry - ttl`` ago (for refreshes).
    ttl: float
    #: The weigher's verdict; only read in a cache with a weigher.
    weight: int
    #: Seconds it is kept, invisible, after it expired (``stale_if_error``); 0.0 for none.
    stale: float
    #: In a cache with ``ttl_after_access``: its expiry (``expires`` stays ``_DEAD`` there),
    #: validated by readers as ``expires`` is elsewhere, and ``_DEAD`` once buried.
    cap: float
    #: In a cache with ``ttl_after_access``: when it was last stored or read. Stored by
    #: lock-free readers too.
    accessed: float

    def bury(self) -> None:
        self.expires = _DEAD
        self.cap = _DEAD
        self.value = _GONE
