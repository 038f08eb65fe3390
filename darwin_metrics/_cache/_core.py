"""The cache's storage: lock-free hits, writers under one lock, SIEVE eviction by count or weight.

How it stays fast and correct under threads:

- The dict maps each key to an :class:`_Entry` (key, value, expiry, the ttl it was stored with
  and SIEVE's *visited* bit, 72 bytes with ``__slots__``). A hit is a dict lookup, three
  attribute reads, one clock call, two comparisons and one attribute store (the visited bit);
  it takes no lock.
- Every change (set, remove, expiry, eviction) holds one ``threading.Lock``, for a few dict
  and attribute operations; user code (``on_evict``, a loader, ``cache_if``, a ttl function)
  runs after it is released. The weigher runs before the lock is taken.
- Writers change an entry under the lock in an order that lock-free readers can validate: a
  reader reads the expiry, then the value, then the expiry again, and trusts the value only if
  the expiry is still the same float object and in the future. ``set`` of a held key stores
  ``-inf`` as the expiry, then the new value, then the new expiry (a new float object, never
  the old one). An entry that leaves the cache is *buried*: its expiry becomes ``-inf``, then
  its value is dropped. So a reader racing with a writer returns a value that was live while
  it read, or misses; it never returns a dropped value or an expired one.
- A lookup that finds an expired entry drops it under the lock, and only if the dict still
  holds that very entry object and it is still expired: a fresher value that another thread
  has just set survives. An entry stored by a load with ``stale_if_error`` is kept, invisible,
  for that long after it expired, so that a failed load can still return it.
- With ``maxsize`` or ``max_weight``, the eviction policy is SIEVE (Zhang et al., NSDI 2024): a
  FIFO queue of entries and a hand that walks from the oldest to the newest, clearing visited
  bits and evicting the first unvisited entry, as many times as it takes for a new entry to
  fit. A hit only sets a bit, so hits stay lock-free, and SIEVE beats LRU on skewed (Zipf)
  workloads. A set of a held key keeps its place and counts as a visit. Buried entries stay in
  the queue, without their value, until the queue is compacted (when they outnumber the live
  ones: O(1) amortized).
- Expired entries that nobody touches are swept when a new key is inserted and some entry is
  known to have expired (``_next_expiry`` is a lower bound of every expiry), at most once per
  ``len/2`` sets so that the O(n) sweep costs O(1) per set.
- With ``ttl_after_access``, entries also remember when they were last read (a lock-free
  store, like the visited bit); an entry is live while both its ttl and its idle time allow.

This relies on CPython's GIL making one dict operation or one attribute store atomic, as the
free-threaded build also guarantees for dicts; the cache has not been verified on that build.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, cast, final, overload

from anyio.abc import TaskGroup

from .._histogram import _Recorder
from . import _loading, _options, _refresh
from ._entry import (
    _DEAD,
    _EXPIRED,
    _GONE,
    _MISSING,
    _REMOVED,
    _REPLACED,
    _SIZE,
    EvictionCause,
    _Entry,
    _RichEntry,
    _Sentinel,
)
from ._flight import _AsyncFlight, _ThreadFlight
from ._options import _LoadOptions
from ._statistics import CacheStatistics

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

__all__ = ["Cache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")

_logger = logging.getLogger("darwin_metrics")

#: What departs under the lock and is reported to ``on_evict`` after it.
_Departed = list[tuple[Any, Any, EvictionCause]]


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
    ``on_evict``, a loader or another callback of yours runs (the weigher runs before the lock
    is taken, so it must be cheap and pure).

    With ``maxsize`` or ``max_weight``, a new entry that would exceed a bound first makes the
    cache drop expired entries, then evicts by SIEVE until it fits: the oldest entry not looked
    up since the eviction hand last passed it. Hits survive eviction; an entry that is never
    looked up again goes first. (The full scan for expired entries runs at most once per
    ``len/2`` sets; in between, the eviction hand takes any expired entry it passes before a
    live one.)

    The cache is also a mapping of its live entries: ``cache[key]`` (raises :class:`KeyError`
    on a miss or an expired entry), ``cache[key] = value``, ``del cache[key]``, :meth:`pop`,
    ``key in cache``, and :meth:`keys`, :meth:`values`, :meth:`items` and iteration, which
    return snapshots.

    Statistics are exact when the cache is used from one thread; see :class:`CacheStatistics`
    for what concurrent threads can do to them and how single-flight loads are counted.

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
        weigher: Called as ``weigher(key, value)`` when an entry is stored, it returns the
            entry's weight, an ``int`` of at least 0 (for example its size in bytes). Needs
            ``max_weight``. It runs in the storing thread before the cache's lock is taken and
            must be cheap and pure.
        max_weight: The most total weight the cache holds, at least 1; needs ``weigher``. A
            value heavier than ``max_weight`` on its own is refused by :meth:`set` (a
            :class:`ValueError`) and returned but not cached by the loading methods.
        ttl_after_access: If given, an entry also expires this long after it was last read or
            stored (seconds or a timedelta, shorter than ``ttl``), for session-like entries:
            ``ttl`` stays the bound on how long any value lives.
        clock: Returns the current time in seconds; only differences matter. Defaults to
            :func:`time.monotonic`. Inject one to control expiry in tests or in virtual-time
            programs. Load times in the statistics are measured with it too.
        on_evict: Called as ``on_evict(key, value, cause)`` after an entry left the cache, in
            the thread that made it leave, outside the cache's lock. An exception it raises is
            logged (logger ``darwin_metrics``) and never propagates into the cache operation.

    Raises:
        TypeError: ``ttl`` or ``ttl_after_access`` is not a number of seconds or a timedelta (a
            bool is not a number), ``maxsize`` or ``max_weight`` is not an int, ``clock``,
            ``weigher`` or ``on_evict`` is not callable, or only one of ``weigher`` and
            ``max_weight`` is given.
        ValueError: ``ttl`` is zero, negative, NaN or infinite, ``maxsize`` or ``max_weight``
            is below 1, or ``ttl_after_access`` is not shorter than ``ttl``.
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
        "_idle",
        "_inserts",
        "_joined",
        "_limit",
        "_load_failures",
        "_load_time",
        "_loads",
        "_lock",
        "_max_weight",
        "_maxsize",
        "_misses",
        "_next_expiry",
        "_on_evict",
        "_queue",
        "_refresh_failures",
        "_refreshers",
        "_refreshes",
        "_removals",
        "_replaced_expired",
        "_rich",
        "_sets",
        "_stale_served",
        "_swept_at",
        "_thread_flights",
        "_ttl",
        "_warned_refresh",
        "_weigher",
        "_weight",
    )

    def __init__(
        self,
        ttl: float | timedelta,
        *,
        maxsize: int | None = None,
        weigher: Callable[[K, V], int] | None = None,
        max_weight: int | None = None,
        ttl_after_access: float | timedelta | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[K, V, EvictionCause], object] | None = None,
    ) -> None:
        self._ttl = _options.seconds(ttl, "ttl")
        if maxsize is not None:
            _options.positive_int(maxsize, "maxsize")
        if max_weight is not None:
            _options.positive_int(max_weight, "max_weight")
        _options.callable_or_none(weigher, "weigher")
        if (weigher is None) != (max_weight is None):
            raise TypeError(
                "weigher and max_weight go together: a weigher needs a max_weight to bound, "
                "and max_weight needs a weigher to weigh entries (use maxsize to bound their "
                "number)"
            )
        self._idle = _options.optional_seconds(ttl_after_access, "ttl_after_access")
        if self._idle is not None and self._idle >= self._ttl:
            raise ValueError(
                f"ttl_after_access must be shorter than ttl ({self._ttl} s), got "
                f"{ttl_after_access!r}: every entry would expire by its ttl first"
            )
        if not callable(clock):
            raise TypeError(f"clock must be callable, not {type(clock).__name__}")
        _options.callable_or_none(on_evict, "on_evict")
        self._maxsize = maxsize
        self._limit = sys.maxsize if maxsize is None else maxsize
        self._weigher = weigher
        self._max_weight = max_weight
        self._weight = 0
        #: Every entry is a _RichEntry: with a weigher or ttl_after_access.
        self._rich = weigher is not None or self._idle is not None
        self._clock = clock
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._data: dict[K, _Entry[K, V]] = {}
        # SIEVE's queue, oldest first, and its hand (the index of the next entry to examine).
        # Only a bounded cache keeps one. It may hold buried entries; ``_dead`` counts them.
        bounded = maxsize is not None or max_weight is not None
        self._queue: list[_Entry[K, V]] | None = [] if bounded else None
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
        self._removals = 0
        self._inserts = 0
        self._replaced_expired = 0
        self._loads = 0
        self._load_failures = 0
        self._joined = 0
        self._refreshes = 0
        self._refresh_failures = 0
        self._stale_served = 0
        self._load_time = _Recorder()
        #: Async loads in progress, by event loop (see _flight.current) and key.
        self._async_flights: dict[tuple[Hashable, K], _AsyncFlight[V]] = {}
        self._thread_flights: dict[K, _ThreadFlight[V]] = {}
        #: The task group of each event loop's ``refreshing()`` block.
        self._refreshers: dict[Hashable, TaskGroup] = {}
        self._warned_refresh = False

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
            return self._get_slow(key, entry, now, default)
        self._misses += 1
        return default

    def _get_slow(self, key: K, entry: _Entry[K, V], now: float, default: T) -> V | T:
        """:meth:`get` of an entry that is expired, being written, or idle-checked."""
        if self._idle is not None:
            value = self._read(entry, now, touch=True)
            if value is not _MISSING:
                entry.visited = True
                self._hits += 1
                return value
        self._drop_expired(key, entry, now)
        self._misses += 1
        return default

    def __getitem__(self, key: K) -> V:
        """Return the value cached for ``key``; counted like :meth:`get`.

        Raises:
            KeyError: There is no entry for ``key``, or it expired.
            TypeError: ``key`` is not hashable.
        """
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """Return the live values cached for ``keys``, as a dict; missing keys are left out.

        Each key counts as one lookup (a hit or a miss). Takes no lock, unless it finds
        expired entries, which it drops.

        Raises:
            TypeError: A key is not hashable.
        """
        get = self.get
        found: dict[K, V] = {}
        for key in keys:
            value = get(key, _MISSING)
            if value is not _MISSING:
                found[key] = value
        return found

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` has a live entry. Counts neither a hit nor a miss."""
        entry = self._data.get(cast("K", key))  # an unhashable key raises TypeError
        if entry is None:
            return False
        now = self._clock()
        if self._live(entry, now):
            return True
        self._drop_expired(entry.key, entry, now)
        return False

    def __len__(self) -> int:
        """The number of entries held, including expired ones that were not dropped yet.

        Call :meth:`clear_expired` first to count live entries only.
        """
        return len(self._data)

    def _snapshot(self) -> list[tuple[K, V]]:
        """The live entries now, as ``(key, value)`` pairs; counts nothing, changes nothing."""
        now = self._clock()
        read = self._read
        live = []
        for entry in list(self._data.values()):  # one C call: safe against other threads
            value = read(entry, now, touch=False)
            if value is not _MISSING:
                live.append((entry.key, value))
        return live

    def keys(self) -> list[K]:
        """A snapshot of the keys with a live entry. Counts no lookups; takes no lock."""
        return [key for key, _ in self._snapshot()]

    def values(self) -> list[V]:
        """A snapshot of the live values. Counts no lookups; takes no lock."""
        return [value for _, value in self._snapshot()]

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the live entries as ``(key, value)`` pairs. Counts no lookups."""
        return self._snapshot()

    def __iter__(self) -> Iterator[K]:
        """Iterate over a snapshot of the keys with a live entry (see :meth:`keys`)."""
        return iter(self.keys())

    def _peek(self, key: K) -> V | Literal[_Sentinel.MISSING]:
        """The live value for ``key``, or ``_MISSING``; counts nothing, drops nothing."""
        entry = self._data.get(key)
        if entry is None:
            return _MISSING
        return self._read(entry, self._clock(), touch=True)

    def _read(
        self, entry: _Entry[K, V], now: float, *, touch: bool
    ) -> V | Literal[_Sentinel.MISSING]:
        """A validated lock-free read of any kind of entry: its value if live at ``now``.

        With ``touch``, a read in a cache with ``ttl_after_access`` restarts the idle time.
        """
        idle = self._idle
        if idle is None:
            expires = entry.expires
            value = entry.value
            if now < expires and entry.expires is expires:
                return value
            return _MISSING
        rich = cast("_RichEntry[K, V]", entry)
        cap = rich.cap
        value = rich.value
        if now < cap and rich.cap is cap and now < rich.accessed + idle:
            if touch:
                rich.accessed = now
            return value
        return _MISSING

    def _expiry(self, entry: _Entry[K, V]) -> float:
        """When ``entry``'s ttl runs out (``-inf`` once buried): the float object that every
        write of the entry replaces, which readers validate (see :meth:`_read`)."""
        return entry.expires if self._idle is None else cast("_RichEntry[K, V]", entry).cap

    def _age(self, entry: _Entry[K, V], now: float, assumed_ttl: float) -> float:
        """How long ago ``entry`` was stored; for a plain entry, as if with ``assumed_ttl``."""
        ttl = entry.ttl if isinstance(entry, _RichEntry) else assumed_ttl
        return now - (self._expiry(entry) - ttl)

    def _live(self, entry: _Entry[K, V], now: float) -> bool:
        """Whether ``entry`` is visible at ``now``: its ttl and its idle time allow it."""
        # Spelled so that the comparison is float's own even if the clock returns a float
        # subclass: what runs under the lock must not call back into the cache.
        return not self._deadline(entry) <= now

    def _deadline(self, entry: _Entry[K, V]) -> float:
        """When ``entry`` stops being visible, unless it is read (or stored) before then."""
        if self._idle is None:
            return entry.expires
        rich = cast("_RichEntry[K, V]", entry)
        idle_end = rich.accessed + self._idle
        return idle_end if idle_end < rich.cap else rich.cap

    def _droppable(self, entry: _Entry[K, V], now: float) -> bool:
        """Whether ``entry`` is expired and past the time it is kept for ``stale_if_error``."""
        deadline = self._deadline(entry)
        if isinstance(entry, _RichEntry):
            deadline += entry.stale
        return now >= deadline

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
            TypeError: ``key`` is not hashable, ``ttl`` is not a number or timedelta, or the
                weigher returned something other than an int.
            ValueError: ``ttl`` is zero, negative, NaN or infinite, or the weigher returned a
                negative weight or one above ``max_weight``.
        """
        if self._rich:
            self._set_rich(key, value, ttl)
            return
        # The hot path: everything inline (a Python call costs as much as a dict operation),
        # the rare work in _make_room.
        now = self._clock()
        ttl_s = self._ttl if ttl is None else _options.seconds(ttl, "ttl")
        expires = now + ttl_s
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
                    self._replaced_expired += 1
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
                    departed = []
                    self._make_room(now, 0, departed)
                entry: _Entry[K, V] = _Entry()
                entry.key = key
                entry.value = value
                entry.expires = expires
                entry.visited = False
                data[key] = entry
                self._inserts += 1
                if self._queue is not None:
                    self._queue.append(entry)
            if expires < self._next_expiry:
                self._next_expiry = expires
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)

    def __setitem__(self, key: K, value: V) -> None:
        """``cache[key] = value``: :meth:`set` with the cache's ttl."""
        self.set(key, value)

    def _weigh(self, key: K, value: V) -> int:
        """The weight of a new entry, checked; 0 in a cache without a weigher."""
        weigher = self._weigher
        if weigher is None:
            return 0
        return _options.weight(weigher(key, value), key)

    def _too_heavy(self, weight: int) -> bool:
        return self._max_weight is not None and weight > self._max_weight

    def _heavy_error(self, key: K, weight: int) -> ValueError:
        return ValueError(
            f"the weigher gave key {key!r} a weight of {weight}, above max_weight "
            f"({self._max_weight}): it can never fit in this cache"
        )

    def _set_rich(self, key: K, value: V, ttl: float | timedelta | None) -> None:
        """:meth:`set` in a cache with a weigher or ``ttl_after_access``."""
        ttl_s = self._ttl if ttl is None else _options.seconds(ttl, "ttl")
        hash(key)  # an unhashable key raises TypeError before the weigher sees it
        weight = self._weigh(key, value)
        if self._too_heavy(weight):
            raise self._heavy_error(key, weight)
        departed: _Departed = []
        now = self._clock()
        self._lock.acquire()
        try:
            self._store_locked(key, value, now, ttl_s, 0.0, weight, departed)
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)

    def set_many(
        self,
        entries: Mapping[K, V],
        *,
        ttl: float | timedelta | Callable[[V], float | timedelta] | None = None,
    ) -> None:
        """Cache every ``key: value`` of ``entries``, replacing the entries they had.

        All of them are stored under one acquisition of the lock, after every key, ttl and
        weight was checked: if one is bad, nothing is stored.

        Args:
            entries: The keys and values to store.
            ttl: The entries' ttl: seconds, a timedelta, or a function of the value that
                returns one of those (for example a shorter one for empty results); the
                cache's ttl by default.

        Raises:
            TypeError: ``entries`` is not a mapping, a key is not hashable, ``ttl`` (or what
                its function returned) is not a number or timedelta, or the weigher returned
                something other than an int.
            ValueError: A ttl is zero, negative, NaN or infinite, or the weigher returned a
                negative weight or one above ``max_weight``.
        """
        if not isinstance(entries, Mapping):
            raise TypeError(
                f"set_many needs a mapping of key to value, not {type(entries).__name__}"
            )
        rule = _options.ttl_rule(ttl)
        prepared: list[tuple[K, V, float, int]] = []
        for key, value in entries.items():
            hash(key)
            ttl_s = self._ttl if rule is None else _options.resolve_ttl(rule, value)
            weight = self._weigh(key, value)
            if self._too_heavy(weight):
                raise self._heavy_error(key, weight)
            prepared.append((key, value, ttl_s, weight))
        departed: _Departed = []
        now = self._clock()
        self._lock.acquire()
        try:
            for key, value, ttl_s, weight in prepared:
                self._store_locked(key, value, now, ttl_s, 0.0, weight, departed)
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)

    def _store_locked(
        self,
        key: K,
        value: V,
        now: float,
        ttl: float,
        stale: float,
        weight: int,
        departed: _Departed,
        rich: bool = False,
    ) -> None:
        """Store ``value`` for ``key``: the general path, for every kind of cache and entry.

        ``stale`` keeps the entry that long after it expired (``stale_if_error``); ``weight``
        is the weigher's checked verdict; ``rich`` asks for a :class:`_RichEntry` (which knows
        its ttl, for refresh ahead).
        """
        data = self._data
        expires = now + ttl
        idle = self._idle
        old = data.get(key)
        self._sets += 1
        rich = rich or self._rich or stale > 0.0
        if old is not None and (not rich or isinstance(old, _RichEntry)):
            # In place, keeping its place in SIEVE's queue; readers validate (see _Entry): the
            # expiry they check is invalidated first and published last.
            old_value = old.value
            live = self._live(old, now)
            if isinstance(old, _RichEntry):
                if idle is None:
                    old.expires = _DEAD
                else:
                    old.cap = _DEAD
                old.value = value
                old.ttl = ttl
                old.stale = stale
                old.accessed = now
                if self._weigher is not None:
                    self._weight += weight - old.weight
                    old.weight = weight
                if idle is None:
                    old.expires = expires
                else:
                    old.cap = expires
            else:
                old.expires = _DEAD
                old.value = value
                old.expires = expires
            old.visited = True
            if live:
                departed.append((key, old_value, _REPLACED))
            else:
                self._expirations += 1
                self._replaced_expired += 1
                departed.append((key, old_value, _EXPIRED))
            if self._max_weight is not None and self._weight > self._max_weight:
                while self._weight > self._max_weight:
                    self._evict_one(now, departed, protect=old)
                if self._dead > len(data):
                    self._compact()
        else:
            if old is not None:
                # A plain entry that now needs to be a rich one: a new entry takes its place.
                del data[key]
                self._bury(old, not self._live(old, now), departed, _REPLACED)
            else:
                self._inserts += 1
            if (
                len(data) >= self._limit
                or (self._max_weight is not None and self._weight + weight > self._max_weight)
                or (now >= self._next_expiry and 2 * (self._sets - self._swept_at) >= len(data))
            ):
                self._make_room(now, weight, departed)
            entry: _Entry[K, V]
            if rich:
                rich_entry: _RichEntry[K, V] = _RichEntry()
                rich_entry.ttl = ttl
                rich_entry.stale = stale
                rich_entry.accessed = now
                rich_entry.weight = weight
                rich_entry.cap = expires
                entry = rich_entry
            else:
                entry = _Entry()
            entry.key = key
            entry.value = value
            entry.expires = expires if idle is None else _DEAD
            entry.visited = False
            data[key] = entry
            self._weight += weight
            if self._queue is not None:
                self._queue.append(entry)
        deadline = expires
        if idle is not None and now + idle < expires:
            deadline = now + idle
        if deadline < self._next_expiry:
            self._next_expiry = deadline

    def _make_room(self, now: float, weight: int, departed: _Departed) -> None:
        """Before a new key of ``weight`` is inserted: drop expired entries, then evict until
        it fits within ``maxsize`` and ``max_weight``."""
        data = self._data
        # Between two sweeps, the eviction hand drops the expired entries it passes.
        if now >= self._next_expiry and 2 * (self._sets - self._swept_at) >= len(data):
            self._sweep(now, departed)
        max_weight = self._max_weight
        while len(data) >= self._limit or (
            max_weight is not None and self._weight + weight > max_weight
        ):
            self._evict_one(now, departed)
        if self._dead > len(data):
            self._compact()

    def remove(self, key: K) -> bool:
        """Remove ``key``'s entry, if any.

        A load of ``key`` in progress meanwhile (``get_or_load``, a decorated function, a
        refresh) still gives its value to its callers, but does not store it.

        Returns:
            Whether a live entry was removed. An expired entry is dropped too (reported to
            ``on_evict`` as expired), but ``False`` is returned for it.

        Raises:
            TypeError: ``key`` is not hashable.
        """
        return self._take(key) is not _MISSING

    def pop(self, key: K, default: T | Literal[_Sentinel.MISSING] = _MISSING) -> V | T:
        """Remove ``key``'s entry and return its value, as ``dict.pop`` does.

        Like :meth:`remove`, it drops an expired entry but does not return its value.

        Raises:
            KeyError: There was no live entry for ``key`` and no ``default`` was given.
            TypeError: ``key`` is not hashable.
        """
        value = self._take(key)
        if value is not _MISSING:
            return value
        if default is _MISSING:
            raise KeyError(key)
        return default

    def __delitem__(self, key: K) -> None:
        """``del cache[key]``: :meth:`remove`, raising :class:`KeyError` if nothing live was
        removed."""
        if self._take(key) is _MISSING:
            raise KeyError(key)

    def _take(self, key: K) -> V | Literal[_Sentinel.MISSING]:
        """Remove ``key``'s entry; its value if it was live."""
        now = self._clock()
        departed: _Departed = []
        self._lock.acquire()
        try:
            entry = self._data.get(key)  # not pop(): it accepts any key when the dict is empty
            self._invalidate_loads(key)
            if entry is None:
                return _MISSING
            del self._data[key]
            live = self._live(entry, now)
            value = entry.value
            self._bury(entry, not live, departed, _REMOVED)
            if self._dead > len(self._data):
                self._compact()
        finally:
            self._lock.release()
        if departed and self._on_evict is not None:
            self._notify(departed)
        return value if live else _MISSING

    def _invalidate_loads(self, key: K | Literal[_Sentinel.MISSING]) -> None:
        """Under the lock: loads of ``key`` (of every key for ``_MISSING``) in progress must not
        store their result."""
        if key is _MISSING:
            for thread_flight in self._thread_flights.values():
                thread_flight.invalidated = True
            for flight in list(self._async_flights.values()):
                flight.invalidated = True
            return
        loading_thread = self._thread_flights.get(key)
        if loading_thread is not None:
            loading_thread.invalidated = True
        if self._async_flights:
            # Tasks of event loops in other threads change this dict without the lock; copying
            # it is one C call, which they cannot interrupt.
            for (_, loading), flight in list(self._async_flights.items()):
                if loading == key:
                    flight.invalidated = True

    def clear(self) -> None:
        """Remove every entry.

        ``on_evict`` hears of each one, as expired if it had expired and as removed otherwise.
        Loads in progress give their values to their callers but do not store them.
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
            self._weight = 0
            self._next_expiry = math.inf
            self._swept_at = self._sets
            departed: _Departed = []
            for entry in entries:
                if self._live(entry, now):
                    self._removals += 1
                    departed.append((entry.key, entry.value, _REMOVED))
                else:
                    self._expirations += 1
                    departed.append((entry.key, entry.value, _EXPIRED))
            self._invalidate_loads(_MISSING)
        finally:
            self._lock.release()
        # The entries are not buried: they are out of every structure, and a lookup that raced
        # with clear() may return the value it found, as if it had run just before.
        if self._on_evict is not None:
            self._notify(departed)

    def clear_expired(self) -> int:
        """Drop every expired entry.

        Entries kept for ``stale_if_error`` stay until that window has passed too. Takes time
        proportional to the number of entries, under the lock (lookups go on).

        Returns:
            How many entries were dropped.
        """
        now = self._clock()
        departed: _Departed = []
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
        the very entry object, still expired, is dropped. An entry kept for
        ``stale_if_error`` stays until that window has passed.
        """
        self._lock.acquire()
        try:
            if self._data.get(key) is not entry or not self._droppable(entry, now):
                return
            del self._data[key]
            value = entry.value  # alive until the lock is released: see _bury
            self._expirations += 1
            if self._weigher is not None:
                self._weight -= cast("_RichEntry[K, V]", entry).weight
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
        departed: _Departed,
        cause: EvictionCause,
    ) -> None:
        """Count and bury an entry already taken out of the dict; ``cause`` if not expired.

        ``departed`` keeps the value alive until the lock is released, so that dropping the
        last reference to it does not run its finalizer (user code) under the lock.
        """
        if expired:
            self._expirations += 1
            if cause is _REPLACED:
                self._replaced_expired += 1
            cause = _EXPIRED
        elif cause is _SIZE:
            self._evictions += 1
        elif cause is _REMOVED:
            self._removals += 1
        # A live replacement is counted by what it is not: see statistics().
        departed.append((entry.key, entry.value, cause))
        if self._weigher is not None:
            self._weight -= cast("_RichEntry[K, V]", entry).weight
        entry.bury()
        if self._queue is not None:
            self._dead += 1

    def _sweep(self, now: float, departed: _Departed) -> None:
        """Drop every droppable entry and make ``_next_expiry`` exact."""
        data = self._data
        expired: list[_Entry[K, V]] = []
        next_expiry = math.inf
        plain = self._idle is None
        for entry in data.values():
            deadline = entry.expires if plain else self._deadline(entry)
            if deadline <= now:
                if isinstance(entry, _RichEntry) and now < deadline + entry.stale:
                    deadline += entry.stale  # kept for stale_if_error until then
                else:
                    expired.append(entry)
                    continue
            if deadline < next_expiry:
                next_expiry = deadline
        self._next_expiry = next_expiry
        self._swept_at = self._sets
        for entry in expired:
            del data[entry.key]
            self._bury(entry, True, departed, _EXPIRED)

    def _evict_one(
        self, now: float, departed: _Departed, protect: _Entry[K, V] | None = None
    ) -> None:
        """SIEVE: evict the first entry from the hand on that is unvisited (or expired).

        ``protect`` (an entry being replaced) is passed over. The caller guarantees that
        another entry is there to evict.
        """
        queue = self._queue
        assert queue is not None  # only bounded caches evict
        length = len(queue)
        index = self._hand
        plain = self._idle is None
        # Lock-free hits may set visited bits again behind the hand; after two laps' worth of
        # cleared bits, evict whatever live entry comes next.
        clears_left = 2 * length + 1
        while True:
            if index >= length:
                index = 0
            entry = queue[index]
            index += 1
            if entry.value is _GONE or entry is protect:
                continue
            if (
                entry.visited
                and clears_left
                and (entry.expires > now if plain else self._live(entry, now))
            ):
                entry.visited = False
                clears_left -= 1
                continue
            break
        self._hand = index
        del self._data[entry.key]
        # _bury inlined: this runs on every insertion into a full cache.
        if (entry.expires <= now) if plain else not self._live(entry, now):
            self._expirations += 1
            departed.append((entry.key, entry.value, _EXPIRED))
        else:
            self._evictions += 1
            departed.append((entry.key, entry.value, _SIZE))
        if self._weigher is not None:
            self._weight -= cast("_RichEntry[K, V]", entry).weight
        if plain:
            entry.expires = _DEAD
            entry.value = _GONE
        else:
            entry.bury()
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

    def _notify(self, departed: _Departed) -> None:
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

    # -- counters of loads (under the lock) ---------------------------------------------------

    def _record_load(self, seconds: float, failed: bool) -> None:
        self._lock.acquire()
        try:
            if failed:
                self._load_failures += 1
            else:
                self._loads += 1
            self._load_time.observe(seconds)
        finally:
            self._lock.release()

    def _count_joined(self, callers: int = 1) -> None:
        self._lock.acquire()
        try:
            self._joined += callers
        finally:
            self._lock.release()

    def _count_stale(self, served: int = 1) -> None:
        self._lock.acquire()
        try:
            self._stale_served += served
        finally:
            self._lock.release()

    def _count_refresh(self, started: int = 0, failed: int = 0) -> None:
        self._lock.acquire()
        try:
            self._refreshes += started
            self._refresh_failures += failed
        finally:
            self._lock.release()

    # -- single-flight loading ----------------------------------------------------------------

    def get_or_set(
        self,
        key: K,
        make: Callable[[], V],
        *,
        ttl: float | timedelta | Callable[[V], float | timedelta] | None = None,
        stale_if_error: float | timedelta | None = None,
        cache_if: Callable[[V], object] | None = None,
    ) -> V:
        """Return the value cached for ``key``, or make, cache and return it: for threads.

        On a miss, one thread calls ``make()``; other threads asking for the same key at the
        same time wait for it and return its result. If ``make()`` raises an
        :class:`Exception`, every waiting thread raises that same exception object and nothing
        is cached. If it raises anything else (``KeyboardInterrupt``, ``SystemExit``), the
        waiting threads are not stranded: one of them calls ``make()`` instead.

        For an async function, use :meth:`get_or_load`: ``make`` must return the value
        itself, and one that returns a coroutine is an error (the coroutine is closed, never
        cached).

        Args:
            key: A hashable key.
            make: Makes the value; called with no arguments, without any lock held.
            ttl: The new entry's ttl: seconds, a timedelta, or a function of the value that
                returns one of those; the cache's ttl by default.
            stale_if_error: If ``make()`` raises and the cache still holds an expired value
                for ``key`` that expired less than this long ago (seconds or a timedelta),
                return that value instead of raising (counted in ``stale_served``). The value
                it stores is kept that long after it expires, for the next failure.
            cache_if: If given, a value for which ``cache_if(value)`` is false is returned but
                not stored (negative caching: leave out ``None`` or an error reply, or store it
                with a short ``ttl`` function instead).

        Raises:
            TypeError: ``make`` is not callable or returned a coroutine, ``key`` is not
                hashable, or an option has the wrong type.
            ValueError: ``ttl`` or ``stale_if_error`` is zero, negative, NaN or infinite.
            RuntimeError: ``make()`` called ``get_or_set`` for the same key, which would wait
                for itself forever.
        """
        if not callable(make):
            raise TypeError(f"make must be callable, not {type(make).__name__}")
        options: _LoadOptions[V] = (
            _loading.PLAIN_GET_OR_SET
            if ttl is None and stale_if_error is None and cache_if is None
            else _loading.options("get_or_set", ttl, stale_if_error, cache_if)
        )
        value = self.get(key, _MISSING)
        if value is not _MISSING:
            return value
        return _loading.make_one(self, key, make, options)

    async def get_or_load(
        self,
        key: K,
        load: Callable[[], Awaitable[V]],
        *,
        ttl: float | timedelta | Callable[[V], float | timedelta] | None = None,
        refresh_after: float | timedelta | None = None,
        stale_if_error: float | timedelta | None = None,
        cache_if: Callable[[V], object] | None = None,
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
            load: A callable with no arguments that returns an awaitable of the value (an
                ``async def`` function, or ``lambda: fetch(key)``). For a synchronous
                function, use :meth:`get_or_set`.
            ttl: The new entry's ttl: seconds, a timedelta, or a function of the value that
                returns one of those; the cache's ttl by default.
            refresh_after: Refresh ahead: a hit on an entry stored longer ago than this
                (seconds or a timedelta, shorter than the ttl) returns the cached value at
                once and starts one background reload of it, in the task group of the
                :meth:`refreshing` block of this event loop. The reader never waits; while the
                reload runs no other one starts for that key, and a caller that misses meanwhile
                waits for it. A failed reload keeps the old value, is logged (logger
                ``darwin_metrics``) and counted in ``refresh_failures``. A reload does not
                overwrite a value stored, or a removal made, while it ran; a result that
                ``cache_if`` refuses leaves the old value in place. Without a
                ``refreshing()`` block, no reload starts and a :class:`RuntimeWarning` says so,
                once per cache. (An entry stored by :meth:`set` rather than by a load with
                ``refresh_after`` does not record its ttl: its age is taken as if it had this
                call's ttl.)
            stale_if_error: If ``load`` raises and the cache still holds an expired value for
                ``key`` that expired less than this long ago (seconds or a timedelta), return
                that value instead of raising (counted in ``stale_served``). The value it
                stores is kept that long after it expires, for the next failure.
            cache_if: If given, a value for which ``cache_if(value)`` is false is returned but
                not stored (negative caching: leave out ``None`` or an error reply, or store it
                with a short ``ttl`` function instead).

        Raises:
            TypeError: ``load`` is not callable or returned something that is not awaitable,
                ``key`` is not hashable, or an option has the wrong type.
            ValueError: A duration is zero, negative, NaN or infinite, or ``refresh_after`` is
                not shorter than the ttl.
            RuntimeError: ``load`` called ``get_or_load`` for the same key in the same task,
                which would wait for itself forever.
        """
        if not callable(load):
            raise TypeError(f"load must be callable, not {type(load).__name__}")
        options: _LoadOptions[V]
        value: V | Literal[_Sentinel.MISSING]
        if ttl is None and refresh_after is None and stale_if_error is None and cache_if is None:
            options = _loading.PLAIN_GET_OR_LOAD
            value = self.get(key, _MISSING)
        else:
            options = _loading.options(
                "get_or_load", ttl, stale_if_error, cache_if, refresh=refresh_after is not None
            )
            if refresh_after is None:
                value = self.get(key, _MISSING)
            else:
                seconds = _options.refresh_after(refresh_after, options.ttl, self._ttl)
                refreshed = _refresh.get_refreshing(self, key, seconds, load, options)
                value = refreshed
        if value is not _MISSING:
            return value
        return await _loading.load_one(self, key, load, options)

    async def get_or_load_many(
        self,
        keys: Iterable[K],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
        *,
        ttl: float | timedelta | Callable[[V], float | timedelta] | None = None,
        refresh_after: float | timedelta | None = None,
        stale_if_error: float | timedelta | None = None,
        cache_if: Callable[[V], object] | None = None,
    ) -> dict[K, V]:
        """Return the values for ``keys``, loading the missing ones with one ``load_many`` call.

        ``await load_many(missing)`` gets the list of keys that are neither cached nor being
        loaded by another task of this event loop, and returns a mapping of key to value. Keys
        that another task is loading meanwhile (by ``get_or_load``, a decorated function or
        another ``get_or_load_many`` with an overlapping set of keys) are not loaded again:
        this call waits for those loads. A key that ``load_many`` leaves out of its answer is
        not cached and left out of the result (keys it adds are ignored).

        Checkpoints and cancellation: when every key is a hit, this returns at once and is not
        a checkpoint; otherwise it is one. If it is cancelled, the loads it was running are
        abandoned (nothing is cached for them) and tasks that waited for them load the keys
        themselves; the loads it waited for go on.

        Args:
            keys: Hashable keys; a key given twice is looked up once.
            load_many: An async callable that takes a list of keys and returns a mapping of
                (some of) them to their values.
            ttl: The new entries' ttl: seconds, a timedelta, or a function of the value that
                returns one of those; the cache's ttl by default.
            refresh_after: Refresh ahead, as for :meth:`get_or_load`: the hits older than this
                are reloaded together by one background ``load_many`` call.
            stale_if_error: If ``load_many`` raises and every key it was loading still has an
                expired value that expired less than this long ago, return those values
                instead of raising.
            cache_if: If given, values for which ``cache_if(value)`` is false are returned but
                not stored.

        Returns:
            A dict of the keys that have a value, in the order of ``keys``.

        Raises:
            TypeError: ``load_many`` is not callable, did not return an awaitable or its
                awaitable did not give a mapping, a key is not hashable, or an option has the
                wrong type.
            ValueError: A duration is zero, negative, NaN or infinite, or ``refresh_after`` is
                not shorter than the ttl.
            RuntimeError: ``load_many`` asked for one of the keys it is loading, which would
                wait for itself forever.
        """
        if not callable(load_many):
            raise TypeError(f"load_many must be callable, not {type(load_many).__name__}")
        options: _LoadOptions[V] = _loading.options(
            "get_or_load_many", ttl, stale_if_error, cache_if, refresh=refresh_after is not None
        )
        seconds = (
            None
            if refresh_after is None
            else _options.refresh_after(refresh_after, options.ttl, self._ttl)
        )
        wanted = list(dict.fromkeys(keys))  # unhashable keys raise TypeError here
        found: dict[K, V] = {}
        missing: list[K] = []
        if seconds is None:
            for key in wanted:
                value = self.get(key, _MISSING)
                if value is _MISSING:
                    missing.append(key)
                else:
                    found[key] = value
        else:
            _refresh.get_many_refreshing(self, wanted, seconds, load_many, options, found, missing)
        if missing:
            await _loading.load_many(self, missing, load_many, options, found)
        return {key: found[key] for key in wanted if key in found}

    def refreshing(
        self, task_group: TaskGroup | None = None
    ) -> AbstractAsyncContextManager[Cache[K, V]]:
        """Run this event loop's refreshes (``refresh_after``) for as long as the block.

        ``async with cache.refreshing():`` opens a task group for the block: refreshes run in
        it, and those still running when the block ends are cancelled (the cache keeps the
        values it had). ``async with cache.refreshing(task_group):`` runs them in a task group
        of yours instead, which owns them: they go on after the block, until they finish or
        your group is cancelled; no refresh starts after the block.

        One block at a time per event loop; event loops in other threads have their own.
        Returns the cache. Entering is not a checkpoint. Leaving a block that opened its own
        task group waits for the refreshes it cancelled to end; if the block is cancelled,
        they are cancelled with it. An exception raised in the block comes out as itself.

        Raises:
            TypeError: ``task_group`` is not an anyio task group.
            RuntimeError: Another ``refreshing()`` block of this cache is active in this event
                loop.
        """
        if task_group is not None and not isinstance(task_group, TaskGroup):
            raise TypeError(
                f"task_group must be an anyio task group, not {type(task_group).__name__}"
            )
        return _refresh.Refreshing(self, task_group)

    # -- introspection ------------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        """Return a snapshot of the cache's counters; see :class:`CacheStatistics`."""
        self._lock.acquire()
        try:
            hits = self._hits
            misses = self._misses
            lookups = hits + misses
            size = len(self._data)
            return CacheStatistics(
                hits=hits,
                misses=misses,
                sets=self._sets,
                evictions=self._evictions,
                expirations=self._expirations,
                removals=self._removals,
                # Every store inserted an entry, replaced an expired one, or replaced a live one.
                replacements=self._sets - self._inserts - self._replaced_expired,
                loads=self._loads,
                load_failures=self._load_failures,
                joined=self._joined,
                refreshes=self._refreshes,
                refresh_failures=self._refresh_failures,
                stale_served=self._stale_served,
                load_duration=self._load_time.snapshot(),
                size=size,
                maxsize=self._maxsize,
                weight=size if self._weigher is None else self._weight,
                max_weight=self._max_weight,
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

    @property
    def max_weight(self) -> int | None:
        """The most total weight the cache holds, or ``None`` when it has no weigher."""
        return self._max_weight

    @property
    def ttl_after_access(self) -> float | None:
        """How long an entry lives after it was last read, in seconds, or ``None``."""
        return self._idle

    def __repr__(self) -> str:
        hits = self._hits
        lookups = hits + self._misses
        ratio = f"{hits / lookups:.2f}" if lookups else "n/a"
        size = len(self._data)
        held = f"{size} entries" if self._maxsize is None else f"{size}/{self._maxsize} entries"
        if self._max_weight is not None:
            held += f", weight {self._weight}/{self._max_weight}"
        return (
            f"<darwin_metrics.Cache at {id(self):#x}, {held}, ttl={self._ttl}s, hit ratio {ratio}>"
        )
