"""Keyed pool rows (area ``pool``): the lease cycle, 50 keys under contention and under churn,
and the cost of a refusal.

Ours is ``KeyedResourcePool(max_per_key, max_total, factory=...)`` inside ``async with pool:``.
The anchors:

- (a) ``ResourcePool``: one pool, no keys. What a key costs on top of a pool.
- (d) a dict of ``ResourcePool`` objects, one per key, under one shared
  ``anyio.CapacityLimiter(max_total)`` (``async with limiter:`` around ``pools[key].lease()``):
  what a user would write by hand. It bounds the *leases* under ``max_total``, not the
  resources (every key keeps its own idle ones), and knows nothing of eviction or of keys
  that starve: it is cheaper to be, and still the figure to beat.
- (b) a bare ``anyio.lowlevel.checkpoint()``, the floor of an operation that yields once, and
  ``acquire(timeout=0)`` timing out on a full pool: the two ways to fail fast without
  ``max_waiting``.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import anyio
from anyio.lowlevel import checkpoint

from darwin_metrics import PoolOverloadedError, PoolTimeoutError
from darwin_metrics.resource import KeyedResourcePool, ResourcePool

from ._harness import Config, Goal, Row, ainterleave, compare

KEYS = [f"10.0.0.{number}:5432" for number in range(50)]
RESOURCE_POOL = "(a) ResourcePool"
BY_HAND = "(d) dict of ResourcePools + limiter"
CHECKPOINT = "(b) checkpoint"
TIMEOUT_ZERO = "(b) acquire(timeout=0) timing out"

# The contended rows: 200 tasks over 50 keys (4 per key), each lease held across one
# checkpoint; a key may hold 4 resources, but all keys together only 100 (half the demand).
# The churn rows: 100 tasks, each lease for a random key of the 50, with room for only 20
# resources in all: most keys hold nothing at any moment, so most leases evict.
TASKS = 200
PER_KEY = 4
TOTAL = 100
CHURN_TASKS = 100
CHURN_TOTAL = 20


def _resource(key: str) -> object:
    return object()


async def rows(config: Config, backend: str) -> list[Row]:
    out: list[Row] = []
    ops = config.async_ops
    n = len(KEYS)

    async with (
        KeyedResourcePool[str, object](2, 2 * n, factory=_resource) as keyed,
        ResourcePool[object](10, factory=object) as single,
    ):
        limiter = anyio.CapacityLimiter(2 * n)
        pools = {key: ResourcePool[object](2, factory=object) for key in KEYS}

        # --- the uncontended lease cycle, over 50 keys in turn (no eviction: room for all)

        async def ours_lease() -> float:
            start = time.perf_counter()
            for number in range(ops):
                async with keyed.lease(KEYS[number % n]):
                    pass
            return (time.perf_counter() - start) / ops

        async def resource_pool_lease() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                async with single.lease():
                    pass
            return (time.perf_counter() - start) / ops

        async def by_hand_lease() -> float:
            start = time.perf_counter()
            for number in range(ops):
                async with limiter, pools[KEYS[number % n]].lease():
                    pass
            return (time.perf_counter() - start) / ops

        results = await ainterleave(
            [ours_lease, resource_pool_lease, by_hand_lease], config.repeats
        )
        goals = {
            RESOURCE_POOL: Goal("≤ 1.3x", "ratio", "<=", 1.3),
            BY_HAND: Goal("≤ 1.0x", "ratio", "<=", 1.0),
        }
        for name, theirs in zip([RESOURCE_POOL, BY_HAND], results[1:], strict=True):
            out.append(
                compare(
                    "pool",
                    "keyed lease(key) cycle, 50 keys, uncontended",
                    backend,
                    "s/op",
                    name,
                    results[0],
                    theirs,
                    goal=goals[name],
                )
            )

    # --- contended: 200 tasks over 50 keys, max_total below demand

    per_task = max(config.contended_per_task // 4, 20)  # 25 quick, 125 full: 5k-25k leases
    contended: list[Callable[[], Awaitable[tuple[float, float, float]]]] = [
        lambda: _contended_ours(per_task),
        lambda: _contended_by_hand(per_task),
    ]
    samples = await ainterleave(contended, config.contended_repeats, warmup=False)
    ours_rate = [rate for rate, _, _ in samples[0]]
    out.append(
        compare(
            "pool",
            f"keyed contended, {TASKS} tasks on 50 keys, max_total {TOTAL}: throughput",
            backend,
            "1/s",
            BY_HAND,
            ours_rate,
            [rate for rate, _, _ in samples[1]],
            note="ours keeps at most 100 resources; the anchor keeps up to 200",
        )
    )
    spread = compare(
        "pool",
        f"keyed contended, {TASKS} tasks on 50 keys: per-key spread",
        backend,
        "fraction",
        BY_HAND,
        [value for _, value, _ in samples[0]],
        [value for _, value, _ in samples[1]],
        note="(max - min) / mean of per-key lease counts; ours is the worst round",
    )
    out.append(replace(spread, ours=max(v for _, v, _ in samples[0]), ratio=None))
    evictions = [value for _, _, value in samples[0]]
    out.append(
        Row(
            area="pool",
            name=f"keyed contended, {TASKS} tasks on 50 keys: evictions per lease",
            backend=backend,
            unit="fraction",
            anchor="-",
            ours=max(evictions),
            anchor_value=None,
            ratio=None,
            note="resources disposed to make room for another key, per lease; worst round",
        )
    )

    # --- churn: random keys, max_total below the number of keys

    churn: list[Callable[[], Awaitable[tuple[float, float, float]]]] = [
        lambda: _churn_ours(per_task),
        lambda: _churn_by_hand(per_task),
    ]
    samples = await ainterleave(churn, config.contended_repeats, warmup=False)
    out.append(
        compare(
            "pool",
            f"keyed churn, {CHURN_TASKS} tasks, random keys of 50, max_total "
            f"{CHURN_TOTAL}: throughput",
            backend,
            "1/s",
            BY_HAND,
            [rate for rate, _, _ in samples[0]],
            [rate for rate, _, _ in samples[1]],
            note="ours evicts to stay within 20 resources; the anchor keeps up to 200",
        )
    )
    out.append(
        Row(
            area="pool",
            name=f"keyed churn, {CHURN_TASKS} tasks, random keys of 50: evictions per lease",
            backend=backend,
            unit="fraction",
            anchor="-",
            ours=max(value for _, _, value in samples[0]),
            anchor_value=None,
            ratio=None,
            note="worst round",
        )
    )

    # --- max_waiting: the cost of a refusal on a full pool (per operation: fewer suffice;
    # the timeout anchor costs about 100 µs each)
    ops = max(ops // 4, 500)

    async with (
        KeyedResourcePool[str, object](1, 1, factory=_resource, max_waiting=0) as refusing,
        KeyedResourcePool[str, object](1, 1, factory=_resource) as timing_out,
    ):
        held = [await refusing.acquire("busy"), await timing_out.acquire("busy")]

        async def ours_refused() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                with contextlib.suppress(PoolOverloadedError):
                    await refusing.acquire("other")
            return (time.perf_counter() - start) / ops

        async def timeout_zero() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                with contextlib.suppress(PoolTimeoutError):
                    await timing_out.acquire("other", timeout=0)
            return (time.perf_counter() - start) / ops

        async def bare_checkpoint() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                await checkpoint()
            return (time.perf_counter() - start) / ops

        results = await ainterleave([ours_refused, timeout_zero, bare_checkpoint], config.repeats)
        for name, theirs in zip([TIMEOUT_ZERO, CHECKPOINT], results[1:], strict=True):
            out.append(
                compare(
                    "pool",
                    "max_waiting=0: acquire refused (PoolOverloadedError)",
                    backend,
                    "s/op",
                    name,
                    results[0],
                    theirs,
                )
            )
        await refusing.release(held[0])
        await timing_out.release(held[1])
    return out


async def _contended_ours(per_task: int) -> tuple[float, float, float]:
    async with KeyedResourcePool[str, object](PER_KEY, TOTAL, factory=_resource) as pool:

        async def hold(key: str) -> None:
            async with pool.lease(key):
                await checkpoint()

        rate, spread = await _contended(hold, per_task)
        stats = pool.statistics()
        return rate, spread, stats.disposals.evicted / stats.acquired


async def _contended_by_hand(per_task: int) -> tuple[float, float, float]:
    limiter = anyio.CapacityLimiter(TOTAL)
    pools = {key: ResourcePool[object](PER_KEY, factory=object) for key in KEYS}

    async def hold(key: str) -> None:
        async with limiter, pools[key].lease():
            await checkpoint()

    rate, spread = await _contended(hold, per_task)
    return rate, spread, 0.0


async def _churn_ours(per_task: int) -> tuple[float, float, float]:
    async with KeyedResourcePool[str, object](PER_KEY, CHURN_TOTAL, factory=_resource) as pool:

        async def hold(key: str) -> None:
            async with pool.lease(key):
                await checkpoint()

        rate = await _random_keys(hold, per_task)
        stats = pool.statistics()
        return rate, 0.0, stats.disposals.evicted / stats.acquired


async def _churn_by_hand(per_task: int) -> tuple[float, float, float]:
    limiter = anyio.CapacityLimiter(CHURN_TOTAL)
    pools = {key: ResourcePool[object](PER_KEY, factory=object) for key in KEYS}

    async def hold(key: str) -> None:
        async with limiter, pools[key].lease():
            await checkpoint()

    return await _random_keys(hold, per_task), 0.0, 0.0


async def _random_keys(hold: Callable[[str], Awaitable[None]], per_task: int) -> float:
    """``CHURN_TASKS`` tasks, each lease for a random key (the same sequence every round)."""
    rng = random.Random(1)
    target = CHURN_TASKS * per_task
    sequence = [rng.choice(KEYS) for _ in range(target + CHURN_TASKS)]
    done = 0

    async def worker() -> None:
        nonlocal done
        while done < target:
            key = sequence[done]
            done += 1
            await hold(key)

    start = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for _ in range(CHURN_TASKS):
            task_group.start_soon(worker)
    return target / (time.perf_counter() - start)


async def _contended(hold: Callable[[str], Awaitable[None]], per_task: int) -> tuple[float, float]:
    """``TASKS`` tasks, task ``i`` on key ``i % 50``, until ``TASKS * per_task`` holds.

    Returns the throughput (holds per second) and the spread of per-key counts.
    """
    counts = dict.fromkeys(KEYS, 0)
    target = TASKS * per_task
    done = 0

    async def worker(index: int) -> None:
        nonlocal done
        key = KEYS[index % len(KEYS)]
        while done < target:
            await hold(key)
            counts[key] += 1
            done += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for index in range(TASKS):
            task_group.start_soon(worker, index)
    elapsed = time.perf_counter() - start
    mean = done / len(KEYS)
    return done / elapsed, (max(counts.values()) - min(counts.values())) / mean
