"""``@cached`` rows: the hit path, a 1,000-caller stampede, and weighted SIEVE's hit ratio.

The anchors of the decorated hit (asyncio, each with its in-memory backend and default key):

- ``get + coroutine``: a bare ``cache.get`` plus awaiting an undecorated coroutine function:
  the least a cached async call can cost (both backends).
- ``cashews @cache``: ``cashews.cache`` set up with ``mem://``, ``@cache(ttl="1m")``.
- ``aiocache @cached``: ``aiocache.cached(ttl=60, cache=Cache.MEMORY)``.
- ``theine @Memoize``: ``theine.Memoize(size, timedelta(seconds=60))`` (auto key).

The stampede: 1,000 tasks call the decorated function for one cold key at once; the loader
sleeps 50 ms. Each side reports the loads it performed and its callers' p99 wait. The anchors
are the decorators users pick against stampedes where the library has one (cashews'
``lock=True``, aiocache's ``cached_stampede``, theine's ``Memoize``, which shares the pending
awaitable) and, for cashews and aiocache, their plain decorators. On trio, which none of the
anchors supports, the anchor is the loader alone, awaited by each caller.

The weighted hit ratio: a Zipf(1.0) trace over keys whose sizes vary (log-normal, 1 to 200
units), ours with ``weigher=`` and ``max_weight=`` against ``cachetools.LRUCache(maxsize,
getsizeof=...)`` with the same bound (1% of the total size of all keys).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

import anyio

from darwin_metrics.resource import Cache, cached

from ._harness import Config, Goal, Row, ainterleave, compare
from .cache import _MISSING, _zipf_trace

KEYS = 1_000
LOAD_SECONDS = 0.05


# ---------------------------------------------------------------------- the hit path


def _anchor_decorators() -> list[tuple[str, Callable[[Callable[..., Any]], Any]]]:
    """The anchors' decorators that are installed, by name (asyncio only)."""
    found: list[tuple[str, Callable[[Callable[..., Any]], Any]]] = []
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        pass
    else:
        cashews = CashewsCache()
        cashews.setup("mem://")
        found.append(("cashews @cache", cashews(ttl="1m")))
    try:
        from aiocache import Cache as AiocacheCache
        from aiocache import cached as aiocache_cached
    except ImportError:
        pass
    else:
        found.append(("aiocache @cached", aiocache_cached(ttl=60, cache=AiocacheCache.MEMORY)))
    try:
        from theine import Memoize
    except ImportError:
        pass
    else:
        found.append(("theine @Memoize", Memoize(KEYS * 4, timedelta(seconds=60))))
    return found


async def _time_calls(call: Callable[[int], Awaitable[Any]], ops: int) -> float:
    start = time.perf_counter()
    for n in range(ops):
        await call(n % KEYS)
    return (time.perf_counter() - start) / ops


async def _time_bare(
    get: Callable[[int], Any], plain: Callable[[int], Awaitable[Any]], ops: int
) -> float:
    start = time.perf_counter()
    for n in range(ops):
        get(n % KEYS)
        await plain(n % KEYS)
    return (time.perf_counter() - start) / ops


async def hit_rows(config: Config, backend: str) -> list[Row]:
    cache: Cache[int, int] = Cache(60, maxsize=KEYS * 4)

    @cached(cache)
    async def ours(x: int) -> int:
        return x

    async def plain(x: int) -> int:
        return x

    for key in range(KEYS):
        await ours(key)
    samplers: list[Callable[[], Awaitable[float]]] = [
        partial(_time_calls, ours, config.async_ops),
        partial(_time_bare, cache.get, plain, config.async_ops),
    ]
    names = ["get + coroutine"]
    if backend == "asyncio":
        for name, decorator in _anchor_decorators():

            async def theirs(x: int) -> int:
                return x

            decorated = decorator(theirs)
            for key in range(KEYS):
                await decorated(key)
            # cashews and aiocache take 30-80 us a hit: a tenth of the calls keeps a round short.
            ops = config.async_ops if name.startswith("theine") else config.async_ops // 10
            samplers.append(partial(_time_calls, decorated, ops))
            names.append(name)
    results = await ainterleave(samplers, config.repeats)
    rows = []
    for name, theirs_samples in zip(names, results[1:], strict=True):
        goal = (
            Goal("≤ 1.5x", "ratio", "<=", 1.5)
            if name == "get + coroutine"
            else Goal("≥ 5x faster (≤ 0.20)", "ratio", "<=", 0.2)
        )
        rows.append(
            compare(
                "cache",
                "@cached hit, 1k int keys",
                backend,
                "s/op",
                name,
                results[0],
                theirs_samples,
                goal=goal,
            )
        )
    return rows


# ---------------------------------------------------------------------- the stampede


class _Counted:
    """A 50 ms loader that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, key: int) -> int:
        self.calls += 1
        await anyio.sleep(LOAD_SECONDS)
        return key


async def _stampede(call: Callable[[int], Awaitable[Any]], key: int, callers: int) -> list[float]:
    """Waits of ``callers`` tasks calling ``call(key)`` at once, in seconds."""
    waits: list[float] = []

    async def caller() -> None:
        started = time.perf_counter()
        await call(key)
        waits.append(time.perf_counter() - started)

    async with anyio.create_task_group() as group:
        for _ in range(callers):
            group.start_soon(caller)
    return waits


def _p99(waits: Sequence[float]) -> float:
    return statistics.quantiles(waits, n=100, method="inclusive")[98]


def _stampede_anchors(
    backend: str,
) -> list[tuple[str, Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]]]:
    if backend != "asyncio":
        return [("(the loader alone)", lambda function: function)]
    anchors: list[tuple[str, Callable[[Callable[..., Awaitable[Any]]], Callable[..., Any]]]] = []
    try:
        from cashews import Cache as CashewsCache
    except ImportError:
        pass
    else:
        cashews = CashewsCache()
        cashews.setup("mem://")
        anchors.append(("cashews @cache(lock=True)", cashews(ttl="1m", lock=True)))
        anchors.append(("cashews @cache", cashews(ttl="1m")))
    try:
        from aiocache import Cache as AiocacheCache
        from aiocache import cached as aiocache_cached
        from aiocache import cached_stampede
    except ImportError:
        pass
    else:
        anchors.append(
            (
                "aiocache @cached_stampede",
                cached_stampede(lease=2, ttl=60, cache=AiocacheCache.MEMORY),
            )
        )
        anchors.append(("aiocache @cached", aiocache_cached(ttl=60, cache=AiocacheCache.MEMORY)))
    try:
        from theine import Memoize
    except ImportError:
        pass
    else:
        anchors.append(("theine @Memoize", Memoize(10_000, timedelta(seconds=60))))
    return anchors


async def stampede_rows(config: Config, backend: str) -> list[Row]:
    callers = config.stampede_callers
    ours_loader = _Counted()
    ours = cached(Cache[int, int](60))(ours_loader.__call__)
    sides: list[tuple[str, _Counted, Callable[[int], Awaitable[Any]]]] = [
        ("ours", ours_loader, ours)
    ]
    for name, decorate in _stampede_anchors(backend):
        loader = _Counted()

        async def theirs(key: int, loader: _Counted = loader) -> int:
            return await loader(key)

        sides.append((name, loader, decorate(theirs)))
    keys = iter(range(10**9))
    loads: list[list[float]] = [[] for _ in sides]
    p99s: list[list[float]] = [[] for _ in sides]

    def sampler(index: int) -> Callable[[], Awaitable[None]]:
        _, loader, call = sides[index]

        async def sample() -> None:
            before = loader.calls
            waits = await _stampede(call, next(keys), callers)  # a cold key: as if expired
            loads[index].append(float(loader.calls - before))
            p99s[index].append(_p99(waits))

        return sample

    await ainterleave(
        [sampler(index) for index in range(len(sides))],
        config.stampede_repeats,
        warmup=False,
    )
    rows = []
    name = f"stampede, {callers} callers, 50 ms load"
    for index, (anchor, _, _) in enumerate(sides[1:], start=1):
        if anchor != "(the loader alone)":
            rows.append(
                compare(
                    "cache",
                    f"{name}: loads",
                    backend,
                    "x",
                    anchor,
                    loads[0],
                    loads[index],
                    goal=Goal("1 load", "ours", "<=", 1.0),
                )
            )
        rows.append(
            compare(
                "cache",
                f"{name}: p99 wait",
                backend,
                "s/op",
                anchor,
                p99s[0],
                p99s[index],
            )
        )
    if backend != "asyncio":
        rows.insert(
            0,
            compare(
                "cache",
                f"{name}: loads",
                backend,
                "x",
                "(one load)",
                loads[0],
                [1.0] * len(loads[0]),
                goal=Goal("1 load", "ours", "<=", 1.0),
            ),
        )
    return rows


async def rows(config: Config, backend: str) -> list[Row]:
    return await hit_rows(config, backend) + await stampede_rows(config, backend)


# ---------------------------------------------------------------------- weighted hit ratio


def _sizes(keys: int, seed: int) -> list[int]:
    rng = random.Random(1_000 + seed)
    return [min(200, max(1, round(rng.lognormvariate(2.0, 1.0)))) for _ in range(keys)]


def _weighted_ratio_ours(trace: Sequence[int], sizes: Sequence[int], max_weight: int) -> float:
    cache: Cache[int, int] = Cache(3600, weigher=lambda key, size: size, max_weight=max_weight)
    get, set_ = cache.get, cache.set
    hits = 0
    for key in trace:
        if get(key, _MISSING) is _MISSING:
            set_(key, sizes[key])
        else:
            hits += 1
    return hits / len(trace)


def _weighted_ratio_lru(trace: Sequence[int], sizes: Sequence[int], max_weight: int) -> float:
    import cachetools

    cache: cachetools.LRUCache[int, int] = cachetools.LRUCache(
        max_weight, getsizeof=lambda size: size
    )
    hits = 0
    for key in trace:
        try:
            cache[key]
        except KeyError:  # noqa: PERF203 (how an LRUCache is used)
            cache[key] = sizes[key]
        else:
            hits += 1
    return hits / len(trace)


def weighted_rows(config: Config) -> list[Row]:
    ours: list[float] = []
    theirs: list[float] = []
    for seed in range(config.zipf_seeds):
        sizes = _sizes(config.zipf_keys, seed)
        max_weight = sum(sizes) // 100
        trace = _zipf_trace(config.zipf_keys, config.zipf_length, seed)
        ours.append(_weighted_ratio_ours(trace, sizes, max_weight))
        theirs.append(_weighted_ratio_lru(trace, sizes, max_weight))
    return [
        compare(
            "cache",
            f"hit ratio, Zipf(1.0), {config.zipf_keys // 1000}k keys of 1-200 units, "
            "max_weight 1%",
            "-",
            "fraction",
            "cachetools.LRUCache(getsizeof)",
            ours,
            theirs,
            goal=Goal("≥ 1.0x", "ratio", ">=", 1.0),
            note=f"{config.zipf_length} lookups per trace, {config.zipf_seeds} seed(s)",
        )
    ]
