"""Instructions per lease cycle, counted by valgrind's callgrind: a check that load cannot blur.

    python -m benchmarks.callgrind_lease [--leases 20000]

For each backend it runs, under ``valgrind --tool=callgrind``, a process that does that many
uncontended lease cycles on: the pool with its histograms; the same pool with recording made a
no-op (``benchmarks.export``'s no-op recorders and constant clock); and the no-op pool with a
hand-kept prometheus_client ``Histogram.observe`` per lease. Each count has the count of the
same process doing no lease taken off, and is divided by the number of leases. Needs valgrind
(``apt-get install valgrind``); twelve runs under valgrind take a few minutes. Not part of
``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("histograms", "noop", "hand-kept")


async def _leases(variant: str, leases: int) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from benchmarks.export import _noop_pool
    from darwin_metrics._histogram import DEFAULT_BUCKETS
    from darwin_metrics.resource import ResourcePool

    if variant == "histograms":
        pool: ResourcePool[object] = ResourcePool(10, factory=object)
        async with pool.lease():
            pass
    else:
        pool = await _noop_pool()
    registry = CollectorRegistry()
    child = Histogram("use", "Use.", ["pool"], buckets=DEFAULT_BUCKETS, registry=registry)
    observe = child.labels(pool="db").observe
    perf_counter = time.perf_counter
    if variant == "hand-kept":
        for _ in range(leases):
            began = perf_counter()
            async with pool.lease():
                pass
            observe(perf_counter() - began)
    else:
        for _ in range(leases):
            async with pool.lease():
                pass


def _count(variant: str, backend: str, leases: int) -> int:
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "benchmarks.callgrind_lease",
        "--run",
        variant,
        "--backend",
        backend,
        "--leases",
        str(leases),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    match = re.search(r"Collected : (\d+)", done.stderr)
    assert match is not None, done.stderr
    return int(match[1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.callgrind_lease")
    parser.add_argument("--leases", type=int, default=20_000)
    parser.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    args = parser.parse_args()
    if args.run:  # inside valgrind
        anyio.run(_leases, args.run, args.leases, backend=args.backend)
        return
    for backend in ("asyncio", "trio"):
        per_lease = {}
        for variant in VARIANTS:
            total = _count(variant, backend, args.leases)
            empty = _count(variant, backend, 0)
            per_lease[variant] = (total - empty) / args.leases
        ours = per_lease["histograms"] - per_lease["noop"]
        theirs = per_lease["hand-kept"] - per_lease["noop"]
        print(
            f"{backend}: instructions per lease cycle: {per_lease['histograms']:.0f} with "
            f"histograms, {per_lease['noop']:.0f} with recording a no-op "
            f"({per_lease['histograms'] / per_lease['noop']:.3f}x), "
            f"{per_lease['hand-kept']:.0f} no-op + hand-kept observe; recording costs "
            f"{ours:.0f} (ours) vs {theirs:.0f} (hand-kept): {theirs / ours:.1f}x cheaper"
        )


if __name__ == "__main__":
    main()
