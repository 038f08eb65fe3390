"""A ResourceManager broadcasting usages to a fast and a slow subscriber.

A tracker reports cpu and memory usage every 10 ms for half a second. The fast subscriber
keeps up and receives every usage; the slow one takes 50 ms per usage, so its small buffer
overflows and it misses the oldest ones (``"drop_oldest"``: tracking never waits for it). A
third, lossless subscriber (``"wait"``) makes tracking wait instead. At the end: what each
subscriber got and missed, and the manager's usage statistics.

Run it with ``python examples/usage_broadcast.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
import math
from typing import cast

import anyio

from darwin_metrics.resource import ResourceManager, Subscription

ROUNDS = 50


async def consume(name: str, subscription: Subscription, seconds_per_usage: float) -> None:
    """Receive until the manager exits, then report what arrived and what was missed."""
    received = 0
    last = None
    async for usage in subscription:
        received += 1
        last = usage
        if seconds_per_usage:
            await anyio.sleep(seconds_per_usage)
    assert last is not None
    print(
        f"  {name:<5} ({subscription.overflow}, buffer {subscription.buffer_size:>3}): "
        f"received {received:>3}, missed {subscription.missed:>3}, "
        f"last {last.resource_type} {last.usage_percent:.1f}%"
    )


async def main() -> None:
    # The manager exits first, ending the subscriptions; then the subscribers' group waits
    # for each subscriber to finish what was buffered.
    async with anyio.create_task_group() as subscribers, ResourceManager() as manager:
        fast = manager.subscribe(buffer_size=100)
        slow = manager.subscribe(buffer_size=5)
        lossless = manager.subscribe(buffer_size=5, overflow="wait")
        subscribers.start_soon(consume, "fast", fast, 0.0)
        subscribers.start_soon(consume, "slow", slow, 0.05)
        subscribers.start_soon(consume, "wait", lossless, 0.001)
        print(f"{manager!r}")

        started = anyio.current_time()
        for step in range(ROUNDS):
            await manager.track_resource_usage("cpu", 50 + 40 * math.sin(step / 5))
            await manager.track_resource_usage("memory", 30 + step / 2)
            await anyio.sleep(0.01)
        took = anyio.current_time() - started
        print(f"tracked {2 * ROUNDS} usages in {took:.2f} s")
        print("the subscribers, once the manager exits and they took what was buffered:")

    assert fast.missed == 0
    assert slow.missed > 0
    assert lossless.missed == 0

    print("usage statistics:")
    for resource_type, stats in manager.usage_statistics().items():
        print(
            f"  {resource_type:<6} count={stats.count} last={stats.last:.1f}% "
            f"min={stats.min:.1f}% max={stats.max:.1f}% mean={stats.mean:.1f}%"
        )
    # get_usage_stats() is the peak per resource type, named as in the Rust crate darwin-metrics
    # whose resource module this library brings to Python.
    peaks = ", ".join(f"{name} {peak:.1f}%" for name, peak in manager.get_usage_stats().items())
    print(f"peaks, from get_usage_stats(): {peaks}")


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
