"""Cache rows: get hit, get miss, set, memory, two threads, hit ratio on a Zipf trace.

The anchors, all holding the same 10,000 keys with a 60 s ttl:

- ``dict``: a plain dict (no ttl, no thread safety): the floor.
- ``locked TTL dict``: ``key -> (value, expires_at)`` with a ``threading.Lock`` held in every
  get and set (``with lock:``), the baseline of NOTES.md.
- ``cachetools+lock``: ``cachetools.TTLCache(maxsize=2**20, ttl=60)`` behind a lock, as its
  documentation recommends for threads.
- ``theine``: ``theine.Cache`` (its own lock; every set passes a 60 s ttl), when installed.

Ours is ``Cache(60, maxsize=2**20)``: bounded like cachetools, so sets pay SIEVE's queue.
"""

from __future__ import annotations

import bisect
import itertools
import random
import threading
import time
import tracemalloc
from collections.abc import Callable, Hashable, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

from darwin_metrics.resource import Cache

from ._harness import Config, Goal, Row, compare, interleave

TTL = 60.0
MAXSIZE = 1 << 20
N_KEYS = 10_000

_MISSING = object()


class LockedTTLDict:
    """The NOTES.md baseline: a dict of ``key -> (value, expires_at)``, ``with lock:`` per op."""

    __slots__ = ("_data", "_lock", "_ttl")

    def __init__(self, ttl: float) -> None:
        self._data: dict[Hashable, tuple[Any, float]] = {}
        self._lock = threading.Lock()
        self._ttl = ttl

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return default
            value, expires = item
            if time.monotonic() >= expires:
                del self._data[key]
                return default
            return value

    def set(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = (value, time.monotonic() + self._ttl)


class LockedCachetools:
    """``cachetools.TTLCache`` behind a ``threading.Lock``."""

    __slots__ = ("_cache", "_lock")

    def __init__(self, maxsize: int, ttl: float) -> None:
        import cachetools

        self._cache: cachetools.TTLCache[Hashable, Any] = cachetools.TTLCache(maxsize, ttl)
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            return self._cache.get(key, default)

    def set(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._cache[key] = value


class Bound:
    """A live cache instance with its get and set as plain callables."""

    def __init__(self, name: str, cache: Any) -> None:
        self.name = name
        self.cache = cache
        self.get: Callable[[Any], Any]
        self.set: Callable[[Any, Any], Any]
        if name == "dict":
            self.get = cache.get
            self.set = cache.__setitem__
        elif name == "theine":
            ttl = timedelta(seconds=TTL)
            theine_set = cache.set

            def set_with_ttl(key: Any, value: Any) -> None:
                theine_set(key, value, ttl)

            self.get = cache.get
            self.set = set_with_ttl
        else:
            self.get = cache.get
            self.set = cache.set


def _makers() -> list[tuple[str, Callable[[], Any]]]:
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("ours", lambda: Cache(TTL, maxsize=MAXSIZE)),
        ("dict", dict),
        ("locked TTL dict", lambda: LockedTTLDict(TTL)),
        ("cachetools+lock", lambda: LockedCachetools(MAXSIZE, TTL)),
    ]
    try:
        import theine
    except ImportError:
        pass
    else:
        makers.append(("theine", lambda: theine.Cache(MAXSIZE)))
    return makers


def _bound_caches() -> list[Bound]:
    return [Bound(name, make()) for name, make in _makers()]


# ---------------------------------------------------------------------- micro-benchmarks


def _time_gets(get: Callable[[Any], Any], keys: Sequence[Any], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for key in keys:
            get(key)
    return time.perf_counter() - start


def _time_sets(set_: Callable[[Any, Any], Any], keys: Sequence[Any], loops: int) -> float:
    value = b"v"
    start = time.perf_counter()
    for _ in range(loops):
        for key in keys:
            set_(key, value)
    return time.perf_counter() - start


def _time_loop(keys: Sequence[Any], loops: int) -> float:
    """The bare loop, subtracted from every sample of the same round."""
    start = time.perf_counter()
    for _ in range(loops):
        for _key in keys:
            pass
    return time.perf_counter() - start


def _keys(kind: str) -> tuple[list[Any], list[Any]]:
    """``N_KEYS`` keys to store and as many keys never stored, as ints or str."""
    if kind == "int":
        return list(range(1_000_000, 1_000_000 + N_KEYS)), list(
            range(2_000_000, 2_000_000 + N_KEYS)
        )
    return [f"metric:{i}" for i in range(N_KEYS)], [f"absent:{i}" for i in range(N_KEYS)]


_GOALS: dict[tuple[str, str], Goal] = {
    ("get hit", "locked TTL dict"): Goal("≤ 0.75x", "ratio", "<=", 0.75),
    ("get hit", "cachetools+lock"): Goal("≥ 5x faster (≤ 0.20)", "ratio", "<=", 0.2),
    ("set", "cachetools+lock"): Goal("≥ 3x faster (≤ 0.33)", "ratio", "<=", 1 / 3),
}


def micro_rows(config: Config) -> list[Row]:
    rows: list[Row] = []
    loops = config.cache_loops
    for kind in ("int", "str"):
        stored, absent = _keys(kind)
        caches = _bound_caches()
        value = b"v"
        for cache in caches:
            for key in stored:
                cache.set(key, value)
        for op in ("get hit", "get miss", "set"):
            keys = absent if op == "get miss" else stored
            samplers: list[Callable[[], float]] = [partial(_time_loop, keys, loops)]
            for cache in caches:
                if op == "set":
                    samplers.append(partial(_time_sets, cache.set, keys, loops))
                else:
                    samplers.append(partial(_time_gets, cache.get, keys, loops))
            results = interleave(samplers, config.repeats)
            ops = loops * len(stored)
            base = results[0]
            per_op = [
                [max(t - b, 0.0) / ops for t, b in zip(samples, base, strict=True)]
                for samples in results[1:]
            ]
            ours = per_op[0]
            for cache, theirs in zip(caches[1:], per_op[1:], strict=True):
                rows.append(
                    compare(
                        "cache",
                        f"{op}, {kind} keys",
                        "-",
                        "s/op",
                        cache.name,
                        ours,
                        theirs,
                        goal=_GOALS.get((op, cache.name)),
                    )
                )
    return rows


# ---------------------------------------------------------------------- memory


def _bytes_per_entry(name: str, make: Callable[[], Any], entries: int) -> float:
    keys = list(range(10_000_000, 10_000_000 + entries))  # made before tracing starts
    value = b"v"
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bound = Bound(name, make())
        set_ = bound.set
        for key in keys:
            set_(key, value)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del bound
    return (after - before) / entries


def memory_rows(config: Config) -> list[Row]:
    makers = [(name, make) for name, make in _makers() if name != "theine"]
    entries = config.memory_entries
    # Deterministic up to allocator noise: three rounds are plenty.
    results = interleave(
        [partial(_bytes_per_entry, name, make, entries) for name, make in makers],
        1 if config.quick else 3,
    )
    rows = []
    for (name, _), theirs in zip(makers[1:], results[1:], strict=True):
        goal = Goal("≤ 160 B", "ours", "<=", 160) if name == "locked TTL dict" else None
        rows.append(
            compare(
                "cache",
                f"memory per entry, {entries // 1000}k entries",
                "-",
                "B/entry",
                name,
                results[0],
                theirs,
                goal=goal,
                note="tracemalloc; theine keeps its entries outside Python's allocator",
            )
        )
    return rows


# ---------------------------------------------------------------------- threads


def _threaded_gets(
    get: Callable[[Any], Any], keys: Sequence[Any], gets: int, threads: int
) -> float:
    """Aggregate gets per second of ``threads`` threads doing ``gets`` gets each."""
    loops, rest = divmod(gets, len(keys))
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(loops):
            for key in keys:
                get(key)
        for key in keys[:rest]:
            get(key)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return threads * gets / (time.perf_counter() - start)


def thread_rows(config: Config) -> list[Row]:
    stored, _ = _keys("int")
    rows = []
    for cache, goal in (
        (Bound("ours", Cache(TTL, maxsize=MAXSIZE)), Goal("≥ 0.8x", "ratio", ">=", 0.8)),
        (Bound("locked TTL dict", LockedTTLDict(TTL)), None),
    ):
        for key in stored:
            cache.set(key, b"v")
        two, one = interleave(
            [
                partial(_threaded_gets, cache.get, stored, config.thread_gets, 2),
                partial(_threaded_gets, cache.get, stored, config.thread_gets, 1),
            ],
            config.repeats,
        )
        rows.append(
            compare(
                "cache",
                f"two threads reading vs one ({cache.name})",
                "-",
                "1/s",
                "one thread",
                two,
                one,
                goal=goal,
                note="aggregate gets/s of 2 threads over 1 thread; 1.0 is ideal under the GIL",
            )
        )
    return rows


# ---------------------------------------------------------------------- hit ratio


def _zipf_trace(keys: int, length: int, seed: int) -> list[int]:
    cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, keys + 1)))
    total = cumulative[-1]
    rng = random.Random(seed)
    # Shuffle which key has which rank, so that key order says nothing about popularity.
    ids = list(range(keys))
    rng.shuffle(ids)
    return [ids[bisect.bisect_left(cumulative, rng.random() * total)] for _ in range(length)]


def _hit_ratio_ours(trace: Sequence[int], maxsize: int) -> float:
    cache: Cache[int, int] = Cache(3600, maxsize=maxsize)
    get, set_ = cache.get, cache.set
    hits = 0
    for key in trace:
        if get(key, _MISSING) is _MISSING:
            set_(key, key)
        else:
            hits += 1
    return hits / len(trace)


def _hit_ratio_lru(trace: Sequence[int], maxsize: int) -> float:
    import cachetools

    cache: cachetools.LRUCache[int, int] = cachetools.LRUCache(maxsize)
    hits = 0
    for key in trace:
        try:
            cache[key]
        except KeyError:  # noqa: PERF203 (how an LRUCache is used)
            cache[key] = key
        else:
            hits += 1
    return hits / len(trace)


def hit_ratio_rows(config: Config) -> list[Row]:
    maxsize = config.zipf_keys // 100
    ours: list[float] = []
    theirs: list[float] = []
    for seed in range(config.zipf_seeds):
        trace = _zipf_trace(config.zipf_keys, config.zipf_length, seed)
        ours.append(_hit_ratio_ours(trace, maxsize))
        theirs.append(_hit_ratio_lru(trace, maxsize))
    return [
        compare(
            "cache",
            f"hit ratio, Zipf(1.0), {config.zipf_keys // 1000}k keys, maxsize 1%",
            "-",
            "fraction",
            "cachetools.LRUCache",
            ours,
            theirs,
            goal=Goal("≥ 1.0x", "ratio", ">=", 1.0),
            note=f"{config.zipf_length} lookups per trace, {config.zipf_seeds} seed(s)",
        )
    ]


def rows(config: Config) -> list[Row]:
    from .cached import weighted_rows

    return (
        micro_rows(config)
        + memory_rows(config)
        + thread_rows(config)
        + hit_ratio_rows(config)
        + weighted_rows(config)
    )
