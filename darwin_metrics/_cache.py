"""A thread-safe TTL cache with lock-free hits, a size bound, statistics and single-flight loads.

How it stays fast and correct under threads:

- The dict maps each key to an :class:`_Entry` (key, value, expiry and SIEVE's *visited* bit,
  64 bytes with ``__slots__``). A hit is a dict lookup, three attribute reads, one clock call,
  two comparisons and one attribute store (the visited bit); it takes no lock.
- Every change (set, remove, expiry, eviction) holds one ``threading.Lock``, for a few dict
  and attribute operations; user code (``on_evict``, a loader) runs after it is released.
- Writers change an entry under the lock in an order that lock-free readers can validate: a
  reader reads the expiry, then the value, then the expiry again, and trusts the value only if
  the expiry is still the same float object and in the future. ``set`` of a held key stores
  ``-inf`` as the expiry, then the new value, then the new expiry (a new float object, never
  the old one). An entry that leaves the cache is *buried*: its expiry becomes ``-inf``, then
  its value is dropped. So a reader racing with a writer returns a value that was live while
  it read, or misses; it never returns a dropped value or an expired one.
- A lookup that finds an expired entry drops it under the lock, and only if the dict still
  holds that very entry object and it is still expired: a fresher value that another thread
  has just set survives.
- With ``maxsize``, the eviction policy is SIEVE (Zhang et al., NSDI 2024): a FIFO queue of
  entries and a hand that walks from the oldest to the newest, clearing visited bits and
  evicting the first unvisited entry. A hit only sets a bit, so hits stay lock-free, and SIEVE
  beats LRU on skewed (Zipf) workloads. A set of a held key keeps its place and counts as a
  visit. Buried entries stay in the queue, without their value, until the queue is compacted
  (when they outnumber the live ones: O(1) amortized).
- Expired entries that nobody touches are swept when a new key is inserted and some entry is
  known to have expired (``_next_expiry`` is a lower bound of every expiry), at most once per
  ``len/2`` sets so that the O(n) sweep costs O(1) per set.

This relies on CPython's GIL making one dict operation or one attribute store atomic, as the
free-threaded build also guarantees for dicts; the cache has not been verified on that build.
"""

from __future__ import annotations

import enum
import logging
import math
import numbers
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, cast, final, overload

import anyio
import anyio.lowlevel
import attrs

__all__ = ["Cache", "CacheStatistics", "EvictionCause"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

_logger = logging.getLogger("darwin_metrics")

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
    """Its ttl ran out: dropped when touched, by :meth:`Cache.clear_expired`, to make room for a
    new entry, or by an operation that found it expired."""

    SIZE = "size"
    """Evicted to make room for a new entry in a cache that held ``maxsize`` entries."""

    REMOVED = "removed"
    """Removed on purpose, by :meth:`Cache.remove` or :meth:`Cache.clear`."""

    REPLACED = "replaced"
    """Replaced by a :meth:`Cache.set` of the same key before it expired."""


# Enum members are slow to look up as class attributes on Python 3.11; the hot paths use these.
_EXPIRED = EvictionCause.EXPIRED
_SIZE = EvictionCause.SIZE
_REMOVED = EvictionCause.REMOVED
_REPLACED = EvictionCause.REPLACED


@attrs.frozen
class CacheStatistics:
    """A snapshot of a :class:`Cache`'s counters, from :meth:`Cache.statistics`.

    Exact when the cache is used from one thread. ``sets``, ``evictions``, ``expirations`` and
    ``size`` are always exact: they change under the cache's lock. ``hits`` and ``misses`` are
    counted without a lock (an unlocked ``+= 1`` on the hit path), so when several threads look
    keys up at the same moment a few increments can be lost: they may under-count, never
    over-count.

    Attributes:
        hits: Lookups that found a live entry (``get``, ``get_or_set``, ``get_or_load``).
        misses: Lookups that found no entry, or only an expired one.
        sets: Entries stored, by ``set`` or by a load (replacements included).
        evictions: Live entries evicted to respect ``maxsize``.
        expirations: Expired entries dropped, whichever operation found them.
        size: Entries held now, including expired ones that have not been dropped yet.
        maxsize: The size bound, or ``None`` when the cache is unbounded.
        hit_ratio: ``hits / (hits + misses)``, or ``0.0`` before the first lookup.
    """

    hits: int
    misses: int
    sets: int
    evictions: int
    expirations: int
    size: int
    maxsize: int | None
    hit_ratio: float


class _Entry(Generic[K, V]):
    """One cached value. Changed only under the cache's lock, except for ``visited``.

    Readers take no lock; they validate what they read as the module docstring says. Built by
    ``_Entry()`` and four attribute stores: without an ``__init__`` that costs about half of a
    call to a Python ``__init__`` on CPython 3.11. With ``__slots__`` an entry takes 64 bytes.
    """

    __slots__ = ("expires", "key", "value", "visited")

    key: K
    value: V
    #: When the entry stops being visible, by the cache's clock; ``_DEAD`` once buried.
    expires: float
    #: SIEVE's bit: looked up since the eviction hand last passed. Set without the lock.
    visited: bool

    def bury(self) -> None:
        """Mark an entry that left the cache dead, and drop its value."""
        self.expires = _DEAD  # first: a reader that then sees _GONE sees a changed expiry
        self.value = _GONE


class _Flight(Generic[V]):
    """One load in progress and, once it ends, its outcome."""

    __slots__ = ("error", "loaded", "owner", "traceback", "value", "waiters")

    value: V

    def __init__(self, owner: object) -> None:
        #: The thread or task that loads; a waiter that is the owner would wait forever.
        self.owner = owner
        self.loaded = False
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        #: How many callers have waited for this load (for tests and debugging).
        self.waiters = 0

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.traceback = error.__traceback__

    def outcome(self) -> V | Literal[_Sentinel.MISSING]:
        """The loaded value; raises the load's error; ``_MISSING`` if the load was abandoned."""
        if self.loaded:
            return self.value
        if self.error is not None:
            # Every waiter re-raises the same exception object with the traceback that the
            # load gave it (as asyncio.Future.result() does), so it does not grow per waiter.
            raise self.error.with_traceback(self.traceback)
        return _MISSING


class _AsyncFlight(_Flight[V]):
    __slots__ = ("event",)

    def __init__(self, owner: object) -> None:
        super().__init__(owner)
        self.event = anyio.Event()


class _ThreadFlight(_Flight[V]):
    __slots__ = ("event",)

    def __init__(self, owner: object) -> None:
        super().__init__(owner)
        self.event = threading.Event()


def _check_loader(loader: object, name: str, ttl: object) -> None:
    """Validate the arguments of get_or_set and get_or_load before anything is loaded."""
    if not callable(loader):
        raise TypeError(f"{name} must be callable, not {type(loader).__name__}")
    if ttl is not None:
        _seconds(ttl, "ttl")


def _seconds(ttl: object, name: str) -> float:
    """Validate a ttl argument and return it in seconds."""
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise TypeError(
            f"{name} must be a number of seconds or a datetime.timedelta, not {type(ttl).__name__}"
        )
    else:
        try:
            seconds = float(ttl)
        except OverflowError:
            seconds = math.inf
    if not 0.0 < seconds < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {ttl!r}")
    return seconds


@final
class Cache(Generic[K, V]):
    """A thread-safe TTL cache with lock-free hits, an optional size bound and statistics.

    Every entry is visible for exactly its ttl after it was set, by the cache's ``clock``: a
    lookup at ``set_time + ttl`` or later misses. Expired entries are never returned; they are
    dropped when an operation touches them, by :meth:`clear_expired`, and (amortized) when new
    keys are inserted and some entry is known to have expired.

    Values are returned as stored, not copied: a caller that mutates a cached value mutates it
    for every other caller. Immutable values are recommended.

    Any number of threads, and event loops running in them, may share one cache. Lookups take
    no lock; changes hold one ``threading.Lock`` for a few dict operations, and never while
    ``on_evict`` or a loader runs.

    With ``maxsize``, a new key that would exceed it first makes the cache drop expired
    entries, then evicts by SIEVE: the oldest entry not looked up since the eviction hand last
    passed it. Hits survive eviction; an entry that is never looked up again goes first. (The
    full scan for expired entries runs at most once per ``maxsize/2`` sets; in between, the
    eviction hand takes any expired entry it passes before a live one.)

    Statistics are exact when the cache is used from one thread; see :class:`CacheStatistics`
    for what concurrent threads can do to them.

    Example::

        cache: Cache[str, bytes] = Cache(60, maxsize=10_000)
        cache.set("logo", data)
        cache.get("logo")                    # data, for the next 60 seconds
        await cache.get_or_load("page", fetch_page)   # one fetch_page() for all callers

    Args:
        ttl: How long an entry stays visible after it was set: seconds (``int`` or ``float``)
            or a :class:`~datetime.timedelta`; positive and finite.
        maxsize: The most entries the cache holds, at least 1; ``None`` (the default) for no
            bound.
        clock: Returns the current time in seconds; only differences matter. Defaults to
            :func:`time.monotonic`. Inject one to control expiry in tests or in virtual-time
            programs.
        on_evict: Called as ``on_evict(key, value, cause)`` after an entry left the cache, in
            the thread that made it leave, outside the cache's lock. An exception it raises is
            logged (logger ``darwin_metrics``) and never propagates into the cache operation.

    Raises:
        TypeError: ``ttl`` is not a number of seconds or a timedelta (a bool is not a number),
            ``maxsize`` is not an int, or ``clock`` or ``on_evict`` is not callable.
        ValueError: ``ttl`` is zero, negative, NaN or infinite, or ``maxsize`` is below 1.
    """

    __slots__ = (
        "__weakref__",
        "_async_flights",
        "_clock",
        "_data",
        "_dead",
        "_evictions",
        "_expirations",
        "_hand",
        "_hits",
        "_limit",
        "_lock",
        "_maxsize",
        "_misses",
        "_next_expiry",
        "_on_evict",
        "_queue",
        "_sets",
        "_swept_at",
        "_thread_flights",
        "_ttl",
    )

    def __init__(
        self,
        ttl: float | timedelta,
        *,
        maxsize: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[K, V, EvictionCause], object] | None = None,
    ) -> None:
        self._ttl = _seconds(ttl, "ttl")
        if maxsize is not None:
            if isinstance(maxsize, bool) or not isinstance(maxsize, int):
                raise TypeError(f"maxsize must be an int or None, not {type(maxsize).__name__}")
            if maxsize < 1:
                raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        if not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable or None, not {type(on_evict).__name__}")
        self._maxsize = maxsize
        self._limit = sys.maxsize if maxsize is None else maxsize
        self._clock = clock
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._data: dict[K, _Entry[K, V]] = {}
        # SIEVE's queue, oldest first, and its hand (the index of the next entry to examine).
        # Only a bounded cache keeps one. It may hold buried entries; ``_dead`` counts them.
        self._queue: list[_Entry[K, V]] | None = None if maxsize is None else []
        self._hand = 0
        self._dead = 0
        # A lower bound of the expiry of every stored entry: no entry has expired before it.
        self._next_expiry = math.inf
        self._swept_at = 0
        self._hits = 0
        self._misses = 0
        self._sets = 0
        self._evictions = 0
        self._expirations = 0
        self._async_flights: dict[tuple[anyio.lowlevel.EventLoopToken, K], _AsyncFlight[V]] = {}
        self._thread_flights: dict[K, _ThreadFlight[V]] = {}

    # -- lookups (lock-free) ------------------------------------------------------------------

    @overload
    def get(self, key: K) -> V | None: ...

    @overload
    def get(self, key: K, default: T) -> V | T: ...

    def get(self, key: K, default: T | None = None) -> V | T | None:
        """Return the value cached for ``key``, or ``default`` if there is none or it expired.

        Takes no lock, unless it finds an expired entry, which it drops.

        Raises:
            TypeError: ``key`` is not hashable.
        """
        entry = self._data.get(key)
        if entry is not None:
            # A validated read (see _Entry): the expiry, the value, then the same expiry again.
            expires = entry.expires
            value = entry.value
            now = self._clock()
            if now < expires and entry.expires is expires:
                entry.visited = True
                self._hits += 1
                return value
            self._drop_expired(key, entry, now)
        self._misses += 1
        return default

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has a live entry. Counts neither a hit nor a miss."""
        entry = self._data.get(cast("K", key))  # an unhashable key raises TypeError
        if entry is None:
            return False
        now = self._clock()
        if now < entry.expires:
            return True
        self._drop_expired(entry.key, entry, now)
        return False

    def __len__(self) -> int:
        """The number of entries held, including expired ones that were not dropped yet.

        Call :meth:`clear_expired` first to count live entries only.
        """
        return len(self._data)

    def _peek(self, key: K) -> V | Literal[_Sentinel.MISSING]:
        """The live value for ``key``, or ``_MISSING``; counts nothing, changes nothing."""
        entry = self._data.get(key)
        if entry is not None:
            expires = entry.expires
            value = entry.value
            if self._clock() < expires and entry.expires is expires:
                return value
        return _MISSING

    # -- changes (under the lock) -------------------------------------------------------------

    def set(self, key: K, value: V, *, ttl: float | timedelta | None = None) -> None:
        """Cache ``value`` for ``key``, replacing any entry it had.

        The entry is visible for ``ttl`` from now. Replacing the value of a key the cache holds
        does not move it in the eviction order, and counts as a use of it (like a hit).

        Args:
            key: A hashable key.
            value: The value, stored as is (not copied).
            ttl: This entry's ttl, in seconds or as a timedelta; the cache's ttl by default.

        Raises:
            TypeError: ``key`` is not hashable, or ``ttl`` is not a number or timedelta.
            ValueError: ``ttl`` is zero, negative, NaN or infinite.
        """
        # The hot path: everything inline (a Python call costs as much as a dict operation),
        # the rare work in _make_room.
        now = self._clock()
        expires = now + (self._ttl if ttl is None else _seconds(ttl, "ttl"))
        data = self._data
        departed = None
        self._lock.acquire()
        try:
            old = data.get(key)  # raises TypeError for an unhashable key, before any change
            self._sets += 1
            if old is not None:
                # Replaced in place, keeping its place in SIEVE's queue, so that readers
                # validate: the expiry is invalidated first and published last (see _Entry).
                old_value = old.value  # alive until the lock is released: see _bury
                old_expires = old.expires
                old.expires = _DEAD
                old.value = value
                old.expires = expires
                old.visited = True  # SIEVE counts an update as a hit
                if old_expires <= now:
                    self._expirations += 1
                    if self._on_evict is not None:
                        departed = [(key, old_value, _EXPIRED)]
                elif self._on_evict is not None:
                    departed = [(key, old_value, _REPLACED)]
            else:
                # A full sweep of expired entries costs O(n): it runs only when some entry has
                # expired, and at most once per n/2 sets, so that it costs O(1) per set.
                if len(data) >= self._limit or (
                    now >= self._next_expiry and 2 * (self._sets - self._swept_at) >= len(data)
                ):
                    departed = self._make_room(now)
                entry: _Entry[K, V] = _Entry()
                entry.key = key
                entry.value = value
                entry.expires = expires
                entry.visited = False
                data[key] = entry
                if self._queue is not None:
                    self._queue.append(entry)
            if expires < self._next_expiry:
                self._next_expiry = expires
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)

    def _make_room(self, now: float) -> list[tuple[K, V, EvictionCause]]:
        """Before a new key is inserted: drop expired entries, then evict down to maxsize."""
        departed: list[tuple[K, V, EvictionCause]] = []
        data = self._data
        # Between two sweeps, the eviction hand drops the expired entries it passes.
        if now >= self._next_expiry and 2 * (self._sets - self._swept_at) >= len(data):
            self._sweep(now, departed)
        if len(data) >= self._limit:
            self._evict_one(now, departed)
            if self._dead > len(data):
                self._compact()
        return departed

    def remove(self, key: K) -> bool:
        """Remove ``key``'s entry, if any.

        Returns:
            Whether a live entry was removed. An expired entry is dropped too (reported to
            ``on_evict`` as expired), but ``False`` is returned for it.

        Raises:
            TypeError: ``key`` is not hashable.
        """
        now = self._clock()
        departed: list[tuple[K, V, EvictionCause]] = []
        self._lock.acquire()
        try:
            entry = self._data.get(key)  # not pop(): it accepts any key when the dict is empty
            if entry is None:
                return False
            del self._data[key]
            expired = entry.expires <= now
            self._bury(entry, expired, departed, _REMOVED)
            if self._dead > len(self._data):
                self._compact()
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)
        return not expired

    def clear(self) -> None:
        """Remove every entry.

        ``on_evict`` hears of each one, as expired if it had expired and as removed otherwise.
        """
        now = self._clock()
        self._lock.acquire()
        try:
            entries = list(self._data.values())
            self._data.clear()
            if self._queue is not None:
                self._queue.clear()
            self._hand = 0
            self._dead = 0
            self._next_expiry = math.inf
            self._swept_at = self._sets
            self._expirations += sum(1 for entry in entries if entry.expires <= now)
        finally:
            self._lock.release()
        # The entries are not buried: they are out of every structure, and a lookup that raced
        # with clear() may return the value it found, as if it had run just before.
        if self._on_evict is not None:
            self._notify(
                [
                    (
                        entry.key,
                        entry.value,
                        _EXPIRED if entry.expires <= now else _REMOVED,
                    )
                    for entry in entries
                ]
            )

    def clear_expired(self) -> int:
        """Drop every expired entry.

        Takes time proportional to the number of entries, under the lock (lookups go on).

        Returns:
            How many entries were dropped.
        """
        now = self._clock()
        departed: list[tuple[K, V, EvictionCause]] = []
        self._lock.acquire()
        try:
            before = len(self._data)
            self._sweep(now, departed)
            dropped = before - len(self._data)
            if self._dead > len(self._data):
                self._compact()
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)
        return dropped

    def _drop_expired(self, key: K, entry: _Entry[K, V], now: float) -> None:
        """Drop ``entry``, found expired at ``now`` by a lock-free lookup, if it still is.

        It may have been replaced in place, or removed and ``key`` set again, meanwhile: only
        the very entry object, still expired, is dropped.
        """
        self._lock.acquire()
        try:
            if self._data.get(key) is not entry or entry.expires > now:
                return
            del self._data[key]
            value = entry.value  # alive until the lock is released: see _bury
            self._expirations += 1
            entry.bury()
            if self._queue is not None:
                self._dead += 1
                if self._dead > len(self._data):
                    self._compact()
        finally:
            self._lock.release()
        if self._on_evict is not None:
            self._notify([(key, value, _EXPIRED)])

    # -- helpers that run under the lock ------------------------------------------------------

    def _bury(
        self,
        entry: _Entry[K, V],
        expired: bool,
        departed: list[tuple[K, V, EvictionCause]],
        cause: EvictionCause,
    ) -> None:
        """Count and bury an entry already taken out of the dict; ``cause`` if not expired.

        ``departed`` keeps the value alive until the lock is released, so that dropping the
        last reference to it does not run its finalizer (user code) under the lock.
        """
        if expired:
            self._expirations += 1
            cause = _EXPIRED
        elif cause is _SIZE:
            self._evictions += 1
        departed.append((entry.key, entry.value, cause))
        entry.bury()
        if self._queue is not None:
            self._dead += 1

    def _sweep(self, now: float, departed: list[tuple[K, V, EvictionCause]]) -> None:
        """Drop every expired entry and make ``_next_expiry`` exact."""
        data = self._data
        expired: list[_Entry[K, V]] = []
        next_expiry = math.inf
        for entry in data.values():
            expires = entry.expires
            if expires <= now:
                expired.append(entry)
            elif expires < next_expiry:
                next_expiry = expires
        self._next_expiry = next_expiry
        self._swept_at = self._sets
        for entry in expired:
            del data[entry.key]
            self._bury(entry, True, departed, _EXPIRED)

    def _evict_one(self, now: float, departed: list[tuple[K, V, EvictionCause]]) -> None:
        """SIEVE: evict the first entry from the hand on that is unvisited (or expired)."""
        queue = self._queue
        assert queue is not None  # only bounded caches evict
        length = len(queue)
        index = self._hand
        # Lock-free hits may set visited bits again behind the hand; after two laps' worth of
        # cleared bits, evict whatever live entry comes next.
        clears_left = 2 * length + 1
        while True:
            if index >= length:
                index = 0
            entry = queue[index]
            index += 1
            if entry.value is _GONE:
                continue
            if entry.visited and clears_left and entry.expires > now:
                entry.visited = False
                clears_left -= 1
                continue
            break
        self._hand = index
        del self._data[entry.key]
        # _bury inlined: this runs on every insertion into a full cache.
        if entry.expires <= now:
            self._expirations += 1
            departed.append((entry.key, entry.value, _EXPIRED))
        else:
            self._evictions += 1
            departed.append((entry.key, entry.value, _SIZE))
        entry.expires = _DEAD
        entry.value = _GONE
        self._dead += 1

    def _compact(self) -> None:
        """Rebuild the queue without its buried entries (once they outnumber the live ones).

        O(n), but it runs only after n deaths since the last compaction: O(1) amortized.
        """
        queue = self._queue
        assert queue is not None  # only a bounded cache has buried entries to compact
        hand = self._hand
        kept = [entry for entry in queue[:hand] if entry.value is not _GONE]
        self._hand = len(kept)
        kept += [entry for entry in queue[hand:] if entry.value is not _GONE]
        self._queue = kept
        self._dead = 0

    def _notify(self, departed: list[tuple[K, V, EvictionCause]]) -> None:
        """Call ``on_evict`` for each departed entry; outside the lock."""
        for key, value, cause in departed:
            self._call_on_evict(key, value, cause)

    def _call_on_evict(self, key: K, value: V, cause: EvictionCause) -> None:
        on_evict = self._on_evict
        assert on_evict is not None
        try:
            on_evict(key, value, cause)
        except Exception:
            _logger.exception(
                "on_evict(%r, ..., %s) raised; the cache ignored the error", key, cause
            )

    # -- single-flight loading ----------------------------------------------------------------

    def get_or_set(
        self, key: K, make: Callable[[], V], *, ttl: float | timedelta | None = None
    ) -> V:
        """Return the value cached for ``key``, or make, cache and return it: for threads.

        On a miss, one thread calls ``make()``; other threads asking for the same key at the
        same time wait for it and return its result. If ``make()`` raises an
        :class:`Exception`, every waiting thread raises that same exception object and nothing
        is cached. If it raises anything else (``KeyboardInterrupt``, ``SystemExit``), the
        waiting threads are not stranded: one of them calls ``make()`` instead.

        Args:
            key: A hashable key.
            make: Makes the value; called with no arguments, without any lock held.
            ttl: The new entry's ttl, in seconds or as a timedelta; the cache's ttl by default.

        Raises:
            TypeError: ``make`` is not callable, ``key`` is not hashable, or ``ttl`` is not a
                number or timedelta.
            ValueError: ``ttl`` is zero, negative, NaN or infinite.
            RuntimeError: ``make()`` called ``get_or_set`` for the same key, which would wait
                for itself forever.
        """
        _check_loader(make, "make", ttl)
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        me = threading.get_ident()
        while True:
            self._lock.acquire()
            try:
                flight = self._thread_flights.get(key)
                leading = flight is None
                if flight is None:
                    flight = self._thread_flights[key] = _ThreadFlight(me)
                elif flight.owner != me:
                    flight.waiters += 1
            finally:
                self._lock.release()
            if leading:
                break
            if flight.owner == me:
                raise RuntimeError(
                    f"get_or_set({key!r}) was called by the make() that is computing the same "
                    "key; it would wait for itself forever"
                )
            flight.event.wait()
            value = flight.outcome()
            if value is not _MISSING:
                return value
            # The thread that was making it gave up (KeyboardInterrupt...): try again.
        try:
            # Another thread may have stored it between our miss and our flight.
            value = self._peek(key)
            if value is _MISSING:
                value = make()
                self.set(key, value, ttl=ttl)
        except Exception as exc:
            flight.fail(exc)
            raise
        else:
            flight.value = value
            flight.loaded = True
            return value
        finally:
            self._lock.acquire()
            try:
                del self._thread_flights[key]
            finally:
                self._lock.release()
            flight.event.set()

    async def get_or_load(
        self,
        key: K,
        load: Callable[[], Awaitable[V]],
        *,
        ttl: float | timedelta | None = None,
    ) -> V:
        """Return the value cached for ``key``, or load, cache and return it; single-flight.

        On a miss, one task runs ``await load()``; other tasks of the same event loop asking
        for the same key meanwhile wait for it and return its result. If ``load`` raises an
        :class:`Exception`, every waiting task raises that same exception object and nothing
        is cached. Works on asyncio and trio.

        Single flight is per event loop: tasks of event loops in other threads that share the
        cache each run their own load (an :class:`anyio.Event` belongs to one loop), and the
        last value loaded is the one cached. :meth:`get_or_set` and this method do not wait
        for each other.

        Checkpoints and cancellation: a hit returns at once and is *not* a checkpoint (it
        neither yields nor checks for cancellation, so that a hit stays a lock-free dict
        lookup); a miss is a checkpoint. A task cancelled while it waits for another task's
        load gets nothing and changes nothing; the load goes on for the others. If the task
        running ``load`` is cancelled, nothing is cached and the tasks waiting for it are not
        stranded: one of them runs ``load`` instead. The same holds when ``load`` raises a
        :class:`BaseException` that is not an :class:`Exception` (``KeyboardInterrupt``):
        it propagates from the loading task only, and a waiter loads instead.

        Args:
            key: A hashable key.
            load: An async callable with no arguments that returns the value.
            ttl: The new entry's ttl, in seconds or as a timedelta; the cache's ttl by default.

        Raises:
            TypeError: ``load`` is not callable, ``key`` is not hashable, or ``ttl`` is not a
                number or timedelta.
            ValueError: ``ttl`` is zero, negative, NaN or infinite.
            RuntimeError: ``load`` called ``get_or_load`` for the same key in the same task,
                which would wait for itself forever.
        """
        _check_loader(load, "load", ttl)
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        await anyio.lowlevel.checkpoint()
        flight_key = (anyio.lowlevel.current_token(), key)
        flights = self._async_flights
        me = anyio.get_current_task().id
        # Only this event loop's tasks use ``flight_key``, and nothing below awaits between
        # looking a flight up and registering one: no other task can slip in between.
        while True:
            flight = flights.get(flight_key)
            if flight is None:
                value = self._peek(key)  # a load may have finished while we checkpointed
                if value is not _MISSING:
                    return value
                break
            if flight.owner == me:
                raise RuntimeError(
                    f"get_or_load({key!r}) was called by the load() that is loading the same "
                    "key; it would wait for itself forever"
                )
            flight.waiters += 1
            await flight.event.wait()
            value = flight.outcome()
            if value is not _MISSING:
                return value
            # The loading task was cancelled: loop, and maybe become the loader.
        flight = flights[flight_key] = _AsyncFlight(me)
        try:
            value = await load()
        except Exception as exc:
            flight.fail(exc)
            raise
        else:
            flight.value = value
            flight.loaded = True
            self.set(key, value, ttl=ttl)
            return value
        finally:
            del flights[flight_key]
            flight.event.set()

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        """Return a snapshot of the cache's counters; see :class:`CacheStatistics`."""
        self._lock.acquire()
        try:
            hits = self._hits
            misses = self._misses
            lookups = hits + misses
            return CacheStatistics(
                hits=hits,
                misses=misses,
                sets=self._sets,
                evictions=self._evictions,
                expirations=self._expirations,
                size=len(self._data),
                maxsize=self._maxsize,
                hit_ratio=hits / lookups if lookups else 0.0,
            )
        finally:
            self._lock.release()

    @property
    def ttl(self) -> float:
        """The default ttl of an entry, in seconds."""
        return self._ttl

    @property
    def maxsize(self) -> int | None:
        """The most entries the cache holds, or ``None`` when it is unbounded."""
        return self._maxsize

    def __repr__(self) -> str:
        hits = self._hits
        lookups = hits + self._misses
        ratio = f"{hits / lookups:.2f}" if lookups else "n/a"
        size = len(self._data)
        held = f"{size} entries" if self._maxsize is None else f"{size}/{self._maxsize} entries"
        return (
            f"<darwin_metrics.Cache at {id(self):#x}, {held}, ttl={self._ttl}s, hit ratio {ratio}>"
        )
