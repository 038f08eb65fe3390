"""Fleet capacity rows (``darwin_metrics.redis.SharedCapacityLimiter``), against a real server
started as the tests start it (``tests/_redis_server.py``), on a unix socket.

- Uncontended: ``async with limiter: pass`` (an ``ACQUIRE`` round trip; the ``RELEASE`` is
  queued on the same connection and confirmed in the background) against one raw coredis
  ``EVALSHA`` round trip of a script that returns at once (goal ≤ 2.5x).
- Contended: 8 processes with 4 tasks each on 4 permits; each task acquires, holds the permit
  for 1 ms (a short query), gives it back and works 2 ms before it asks again, for a few
  seconds. Our grants per second fleet-wide against the polling lock recipe doing the same
  work: 4 ``SET key token NX PX`` lock keys tried in turn, a sleep of 100 ms when all are taken
  (as lock recipes do), a compare-and-delete script to give one back (goal ≥ 5x). Beside it,
  the fairness of each: the fewest grants a task got divided by the most (FIFO: goal ≥ 0.9),
  and in the note the recipe's ``SET`` attempts per grant (ours sends one ``ACQUIRE`` and one
  ``RELEASE`` per grant).

The worker processes are forked from a forkserver that has imported everything once
(``tests/_limiter_worker.py``).
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import anyio
import anyio.to_thread

from darwin_metrics.redis import SharedCapacityLimiter

from ._harness import Config, Goal, Row, ainterleave, compare

PROCESSES = 8
TASKS = 4
TOKENS = 4
HOLD = 0.001
THINK = 0.002
POLL = 0.1


async def _uncontended(config: Config, backend: str, url: str) -> Row:
    import coredis

    ops = 200 if config.quick else 1000
    async with (
        SharedCapacityLimiter(url, f"bench-{uuid.uuid4().hex}", 4, lease=10).running() as limiter,
        coredis.Redis.from_url(url, decode_responses=False) as client,
    ):
        sha = await client.script_load("return 1")

        async def ours() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                async with limiter:
                    pass
            return (time.perf_counter() - start) / ops

        async def raw() -> float:
            start = time.perf_counter()
            for _ in range(ops):
                await client.evalsha(sha)
            return (time.perf_counter() - start) / ops

        samples_ours, samples_raw = await ainterleave([ours, raw], config.repeats)
    return compare(
        "limiter",
        "uncontended acquire+release vs one raw EVALSHA",
        backend,
        "s/op",
        "coredis EVALSHA",
        samples_ours,
        samples_raw,
        goal=Goal("≤ 2.5x", "ratio", "<=", 2.5),
        note="async with limiter: one ACQUIRE round trip, RELEASE pipelined behind it",
    )


def _fleet_run(url: str, backend: str, mode: str, duration: float) -> tuple[float, float, float]:
    """One contended run of PROCESSES workers: (grants per second, fairness, ``SET`` attempts
    per grant: the lock recipe's only)."""
    from tests._limiter_worker import fleet

    options: dict[str, Any] = {
        "url": url,
        "name": f"bench-{uuid.uuid4().hex}",
        "total": TOKENS,
        "lease": 10.0,
        "backend": backend,
        "tasks": TASKS,
        "duration": duration,
        "hold": HOLD,
        "think": THINK,
        "poll": POLL,
    }
    with fleet() as workers:
        started = [workers.start(mode, **options) for _ in range(PROCESSES)]
        workers.ready()
        for worker in started:
            worker.go()
        reports = [worker.report() for worker in started]
    counts = [count for report in reports for count in report["counts"]]
    attempts = sum(report.get("attempts", 0) for report in reports)
    grants = sum(counts)
    fairness = min(counts) / max(counts) if max(counts) else 0.0
    return grants / duration, fairness, (attempts / grants if grants else 0.0)


def _contended(config: Config, backend: str, url: str) -> list[Row]:
    duration = 0.5 if config.quick else 3.0
    repeats = 1 if config.quick else 3
    ours: list[tuple[float, float, float]] = []
    theirs: list[tuple[float, float, float]] = []
    for round_ in range(repeats):  # interleaved, the order flipping each round
        order = ("bench", "lock") if round_ % 2 == 0 else ("lock", "bench")
        for mode in order:
            (ours if mode == "bench" else theirs).append(_fleet_run(url, backend, mode, duration))
    name = f"contended: {PROCESSES} processes x {TASKS} tasks on {TOKENS} permits"
    setting = f"hold {HOLD * 1000:g} ms, then {THINK * 1000:g} ms of other work"
    fairness_ours = statistics.median(fair for _, fair, _ in ours)
    fairness_theirs = statistics.median(fair for _, fair, _ in theirs)
    attempts = statistics.median(tries for _, _, tries in theirs)
    return [
        compare(
            "limiter",
            f"{name}, grants/s",
            backend,
            "1/s",
            f"SET NX PX lock, {POLL * 1000:g} ms poll",
            [rate for rate, _, _ in ours],
            [rate for rate, _, _ in theirs],
            goal=Goal("≥ 5x", "ratio", ">=", 5.0),
            note=(
                f"{setting}; fairness {fairness_ours:.2f} vs {fairness_theirs:.2f}; the lock "
                f"sent {attempts:.1f} SET attempts per grant"
            ),
        ),
        Row(
            "limiter",
            f"{name}, fairness (fewest / most grants per task)",
            backend,
            "fraction",
            f"SET NX PX lock, {POLL * 1000:g} ms poll",
            fairness_ours,
            fairness_theirs,
            None,
            goal=Goal("≥ 0.9", "ours", ">=", 0.9),
            note="FIFO: every task gets its turn",
        ),
    ]


async def rows(config: Config, backend: str, url: str) -> list[Row]:
    out = [await _uncontended(config, backend, url)]
    out += await anyio.to_thread.run_sync(_contended, config, backend, url)
    return out
