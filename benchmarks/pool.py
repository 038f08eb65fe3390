"""Pool rows: the uncontended lease cycle, ``acquire(timeout=...)``, and 100 tasks on 10.

The anchors:

- (a) ``async with anyio.CapacityLimiter(10)`` around a list ``pop()`` / ``append()``: what a
  user would write instead of a pool.
- (b) a bare ``anyio.lowlevel.checkpoint()``: the floor of any operation that yields once.
- (c) an ``asyncio.Queue`` holding the resources (asyncio only): fast, because it never
  yields when a resource is there, and unfair for the same reason.

Ours is ``ResourcePool(10, factory=object)`` inside ``async with pool:``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import anyio
from anyio.lowlevel import checkpoint

from darwin_metrics.resource import ResourcePool

from ._harness import Config, Goal, Row, ainterleave, compare

SIZE = 10
TASKS = 100

LIMITER = "(a) limiter+list"
CHECKPOINT = "(b) checkpoint"
QUEUE = "(c) asyncio.Queue"


def _lease_goals(backend: str) -> dict[str, Goal]:
    limit = 0.6 if backend == "asyncio" else 1.0
    return {
        LIMITER: Goal(f"≤ {limit}x", "ratio", "<=", limit),
        CHECKPOINT: Goal("≤ 1.5x", "ratio", "<=", 1.5),
    }


async def rows(config: Config, backend: str) -> list[Row]:
    out: list[Row] = []
    ops = config.async_ops
    items = [object() for _ in range(SIZE)]
    limiter = anyio.CapacityLimiter(SIZE)
    queue: asyncio.Queue[object] | None = None
    if backend == "asyncio":
        queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

    async with ResourcePool[object](SIZE, factory=object) as pool:
        # --- the uncontended lease cycle, each side in one coroutine of ``ops`` cycles

        async def ours_lease() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                async with pool.lease():
                    pass
            return (time.perf_counter() - start) / ops

        async def limiter_cycle() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                async with limiter:
                    items.append(items.pop())
            return (time.perf_counter() - start) / ops

        async def bare_checkpoint() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                await checkpoint()
            return (time.perf_counter() - start) / ops

        samplers: list[Callable[[], Awaitable[float]]] = [
            ours_lease,
            limiter_cycle,
            bare_checkpoint,
        ]
        names = [LIMITER, CHECKPOINT]
        if queue is not None:
            q = queue

            async def queue_cycle() -> float:
                start = time.perf_counter()
                for _ in range(ops):
                    q.put_nowait(await q.get())
                return (time.perf_counter() - start) / ops

            samplers.append(queue_cycle)
            names.append(QUEUE)
        results = await ainterleave(samplers, config.repeats)
        goals = _lease_goals(backend)
        for name, theirs in zip(names, results[1:], strict=True):
            out.append(
                compare(
                    "pool",
                    "lease() cycle, uncontended",
                    backend,
                    "s/op",
                    name,
                    results[0],
                    theirs,
                    goal=goals.get(name),
                )
            )

        # --- acquire(timeout=...) on the fast path

        async def ours_acquire() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                resource = await pool.acquire(timeout=10.0)
                assert resource is not None
                await pool.release(resource)
            return (time.perf_counter() - start) / ops

        async def limiter_fail_after() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                with anyio.fail_after(10.0):
                    await limiter.acquire()
                items.append(items.pop())
                limiter.release()
            return (time.perf_counter() - start) / ops

        results = await ainterleave(
            [ours_acquire, limiter_fail_after, bare_checkpoint], config.repeats
        )
        for name, theirs in zip(
            ["(a) fail_after + limiter.acquire()", CHECKPOINT], results[1:], strict=True
        ):
            out.append(
                compare(
                    "pool",
                    "acquire(timeout=10) + release(), fast path",
                    backend,
                    "s/op",
                    name,
                    results[0],
                    theirs,
                )
            )

        # --- 100 tasks on 10 resources, each holding its lease across one checkpoint

        async def ours_hold() -> None:
            async with pool.lease():
                await checkpoint()

        async def limiter_hold() -> None:
            async with limiter:
                item = items.pop()
                await checkpoint()
                items.append(item)

        per_task = config.contended_per_task
        contended: list[Callable[[], Awaitable[tuple[float, float]]]] = [
            lambda: _contended(ours_hold, per_task),
            lambda: _contended(limiter_hold, per_task),
        ]
        names = [LIMITER]
        if queue is not None:
            q = queue

            async def queue_hold() -> None:
                item = await q.get()
                await checkpoint()
                q.put_nowait(item)

            contended.append(lambda: _contended(queue_hold, per_task))
            names.append(QUEUE)
        results2 = await ainterleave(contended, config.contended_repeats, warmup=False)
        ours_rate = [rate for rate, _ in results2[0]]
        ours_spread = [spread for _, spread in results2[0]]
        for name, samples in zip(names, results2[1:], strict=True):
            out.append(
                compare(
                    "pool",
                    f"contended, {TASKS} tasks on {SIZE}: throughput",
                    backend,
                    "1/s",
                    name,
                    ours_rate,
                    [rate for rate, _ in samples],
                    goal=Goal("≥ 1.0x", "ratio", ">=", 1.0) if name == LIMITER else None,
                )
            )
        for name, samples in zip(names, results2[1:], strict=True):
            theirs_spread = [spread for _, spread in samples]
            row = compare(
                "pool",
                f"contended, {TASKS} tasks on {SIZE}: per-task spread",
                backend,
                "fraction",
                name,
                ours_spread,
                theirs_spread,
                goal=Goal("≤ 1%", "ours", "<=", 0.01) if name == LIMITER else None,
                note="(max - min) / mean of per-task counts; ours is the worst round",
            )
            # Fairness is judged by the worst round, not the median one.
            out.append(replace(row, ours=max(ours_spread), ratio=None, ratio_summary=None))
    return out


async def _contended(hold: Callable[[], Awaitable[None]], per_task: int) -> tuple[float, float]:
    """Run ``TASKS`` tasks doing ``hold()`` until ``TASKS * per_task`` holds are done.

    Returns the throughput (holds per second) and the spread of per-task counts,
    ``(max - min) / mean``.
    """
    counts = [0] * TASKS
    target = TASKS * per_task
    done = 0

    async def worker(index: int) -> None:
        nonlocal done
        while done < target:
            await hold()
            counts[index] += 1
            done += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as task_group:
        for index in range(TASKS):
            task_group.start_soon(worker, index)
    elapsed = time.perf_counter() - start
    mean = done / TASKS
    return done / elapsed, (max(counts) - min(counts)) / mean
