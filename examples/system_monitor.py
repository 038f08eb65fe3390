"""A ResourceManager sampling this machine and watching a pool while tasks lease from it.

For two seconds, the manager samples cpu, memory, swap and disk usage every half second
(``sample_system``, which needs psutil: ``pip install "darwin-metrics[system]"``) and tracks
a pool's usage, leased / max_size, every tenth of a second (``watch_pool``), while eight
workers lease the pool's four resources. One subscriber prints every usage as it arrives;
the usage statistics come at the end.

Run it with ``python examples/system_monitor.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from typing import cast

import anyio

from darwin_metrics.resource import ResourceManager, ResourcePool, Subscription

DURATION = 2.0
WORKERS = 8


async def worker(pool: ResourcePool[int], number: int) -> None:
    """Lease a resource, hold it for a while, give it back; until cancelled."""
    for job in itertools.count():
        async with pool.lease():
            await anyio.sleep(0.05 + 0.03 * ((number + job) % 5))
        await anyio.sleep(0.02 * (number % 3))


def seconds(value: float) -> str:
    """A duration as a person reads it: ``172.2 ms``, ``6.82 s``."""
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


async def show(subscription: Subscription, started: float) -> None:
    async for usage in subscription:
        elapsed = usage.timestamp - started
        bar = "#" * round(min(usage.usage_percent, 100) / 5)
        print(f"  {elapsed:5.2f} s  {usage.resource_type:<14} {usage.usage_percent:5.1f}%  {bar}")


async def main() -> None:
    ids = itertools.count()
    async with (
        ResourcePool(4, factory=lambda: next(ids)) as pool,
        anyio.create_task_group() as group,
        ResourceManager() as manager,
    ):
        subscription = manager.subscribe(buffer_size=1000)
        group.start_soon(show, subscription, anyio.current_time())
        manager.sample_system(interval=0.5)
        manager.watch_pool("workers", pool, interval=0.1)
        async with anyio.create_task_group() as workers:
            for number in range(WORKERS):
                workers.start_soon(worker, pool, number)
            await anyio.sleep(DURATION)
            workers.cancel_scope.cancel()
        # Leaving the block exits the manager first: its samplers stop, the subscription
        # ends and so does the subscriber's loop; then the group, then the pool close.

    print("\nusage statistics:")
    for resource_type, stats in sorted(manager.usage_statistics().items()):
        print(
            f"  {resource_type:<14} samples={stats.count:<3} last={stats.last:5.1f}% "
            f"peak={stats.max:5.1f}% mean={stats.mean:5.1f}%"
        )
    assert manager.usage_statistics()["pool:workers"].max > 0
    stats = pool.statistics()
    print(
        f"\nthe pool: {stats.acquired} leases of {stats.max_size} resources by {WORKERS} workers"
    )
    print(
        f"  waiting for a resource: {seconds(stats.total_wait)} in all, "
        f"{seconds(stats.longest_wait)} at the longest; {stats.timeouts} timeouts"
    )


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


def require_psutil() -> None:
    """Exit with one line that says what to install if psutil is missing."""
    try:
        importlib.import_module("psutil")
    except ImportError:
        sys.exit(
            "system_monitor.py samples this machine with psutil, which is not installed: "
            'pip install "darwin-metrics[system]"'
        )


if __name__ == "__main__":
    backend = parse_backend()
    require_psutil()
    anyio.run(main, backend=backend)
