"""ResourceManager: tracking, broadcast, statistics, the metric cache and the samplers."""

from __future__ import annotations

import gc
import math
import sys
import time
from collections import deque
from contextlib import AsyncExitStack
from decimal import Decimal
from fractions import Fraction
from typing import Any

import anyio
import attrs
import pytest

import darwin_metrics.resource
from darwin_metrics import DarwinMetricsError, TrackingTimeoutError
from darwin_metrics.resource import (
    ResourceManager,
    ResourcePool,
    ResourceUsage,
    Subscription,
    UsageStatistics,
)

pytestmark = pytest.mark.anyio


class FakeClock:
    """A clock for the metric cache that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def collect(subscription: Subscription, into: list[ResourceUsage]) -> None:
    """Append each event as it arrives (so a test can look while the loop runs)."""
    async for usage in subscription:
        assert isinstance(usage, ResourceUsage)
        into.append(usage)


def values(usages: list[ResourceUsage]) -> list[float]:
    return [usage.usage_percent for usage in usages]


def mutate(value: Any, field: str) -> None:
    setattr(value, field, 1.0)


class TestSeed:
    async def test_seed_example(self) -> None:
        manager = ResourceManager()
        with manager.subscribe() as rx:
            await manager.track_resource_usage("cpu", 75.5)
            manager.cache_metric("cpu_temp", bytes([42]))
            assert manager.get_usage_stats() == {"cpu": 75.5}
            [usage] = rx.drain()
        assert (usage.resource_type, usage.usage_percent) == ("cpu", 75.5)
        assert manager.get_cached_metric("cpu_temp") == b"\x2a"
        manager.cleanup_cache()

    async def test_timeout_variant_without_waiting_subscribers(self) -> None:
        manager = ResourceManager()
        with manager.subscribe(buffer_size=1) as rx:
            await manager.track_resource_usage_with_timeout("cpu", 10, timeout=0)
            await manager.track_resource_usage_with_timeout("cpu", 20, timeout=0)
            assert values(rx.drain()) == [20.0]
            assert rx.missed == 1

    def test_public_names(self) -> None:
        exported = set(darwin_metrics.resource.__all__)
        assert {"ResourceManager", "ResourceUsage", "Subscription", "UsageStatistics"} <= exported
        assert darwin_metrics.resource.__all__ == sorted(darwin_metrics.resource.__all__)


class TestResourceUsage:
    async def test_fields_and_clocks(self) -> None:
        manager = ResourceManager()
        rx = manager.subscribe()
        await anyio.sleep(5)
        before = time.time()
        await manager.track_resource_usage("pool:db", 42)
        after = time.time()
        [usage] = rx.drain()
        assert usage.resource_type == "pool:db"
        assert usage.usage_percent == 42.0
        assert type(usage.usage_percent) is float
        assert usage.timestamp == anyio.current_time()
        assert before <= usage.wall_time <= after
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            mutate(usage, "usage_percent")
        rx.close()

    @pytest.mark.parametrize(
        ("given", "stored"),
        [(0, 0.0), (-0.0, 0.0), (100, 100.0), (250.5, 250.5), (Fraction(1, 4), 0.25)],
    )
    async def test_accepted_numbers(self, given: Any, stored: float) -> None:
        manager = ResourceManager()
        with manager.subscribe() as rx:
            await manager.track_resource_usage("cpu", given)
            [usage] = rx.drain()
        assert usage.usage_percent == stored
        assert math.copysign(1.0, usage.usage_percent) == 1.0
        assert manager.usage_statistics()["cpu"].last == stored


class TestDelivery:
    async def test_every_subscriber_gets_every_event_in_order(self) -> None:
        received: list[list[ResourceUsage]] = [[] for _ in range(20)]
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            for into in received:
                task_group.start_soon(collect, manager.subscribe(buffer_size=300), into)
            await anyio.wait_all_tasks_blocked()
            for number in range(300):
                await manager.track_resource_usage(f"r{number % 3}", number)
        expected = [(f"r{n % 3}", float(n)) for n in range(300)]
        for into in received:
            assert [(u.resource_type, u.usage_percent) for u in into] == expected
            assert len({id(u) for u in into}) == 300

    async def test_subscribers_that_keep_up_miss_nothing(self) -> None:
        received: list[list[ResourceUsage]] = [[] for _ in range(10)]
        subscriptions: list[Subscription] = []
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            for into in received:
                # A subscriber that keeps up lags by at most two events (trio may run the
                # tracker twice before the subscriber); the buffer absorbs that.
                subscriptions.append(manager.subscribe(buffer_size=4))
                task_group.start_soon(collect, subscriptions[-1], into)
            for number in range(500):
                await manager.track_resource_usage("cpu", number)
        assert all(values(into) == list(range(500)) for into in received)
        assert [s.missed for s in subscriptions] == [0] * 10

    async def test_only_events_tracked_while_subscribed_arrive(self) -> None:
        manager = ResourceManager()
        await manager.track_resource_usage("cpu", 1)
        rx = manager.subscribe()
        await manager.track_resource_usage("cpu", 2)
        rx.close()
        await manager.track_resource_usage("cpu", 3)
        assert rx.drain() == []
        assert manager.usage_statistics()["cpu"].count == 3

    async def test_tracking_is_a_checkpoint_and_cancellation_records_nothing(self) -> None:
        manager = ResourceManager()
        with manager.subscribe() as rx, anyio.CancelScope() as scope:
            scope.cancel()
            await manager.track_resource_usage("cpu", 1)
            pytest.fail("a cancelled scope must cancel tracking")
        assert scope.cancelled_caught
        assert manager.usage_statistics() == {}
        assert rx.drain() == []

    async def test_anext_is_a_checkpoint_that_keeps_the_event_when_cancelled(self) -> None:
        manager = ResourceManager()
        with manager.subscribe() as rx:
            await manager.track_resource_usage("cpu", 1)
            await manager.track_resource_usage("cpu", 2)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await rx.__anext__()
                pytest.fail("__anext__ must be a checkpoint")
            assert rx.buffered == 2
            assert values([await rx.__anext__(), await rx.__anext__()]) == [1.0, 2.0]

    async def test_next_batch_takes_everything_buffered_with_one_checkpoint(self) -> None:
        manager = ResourceManager()
        with manager.subscribe(buffer_size=10) as rx:
            for number in range(4):
                await manager.track_resource_usage("cpu", number)
            assert values(await rx.next_batch()) == [0, 1, 2, 3]
            assert rx.drain() == []
            async with anyio.create_task_group() as task_group:
                batches: list[list[ResourceUsage]] = []

                async def wait_for_batch() -> None:
                    batches.append(await rx.next_batch())

                task_group.start_soon(wait_for_batch)
                await anyio.wait_all_tasks_blocked()
                assert batches == []
                await manager.track_resource_usage("cpu", 7)
            assert [values(batch) for batch in batches] == [[7.0]]
        assert await rx.next_batch() == []

    async def test_lagging_subscriber_is_not_starved(self) -> None:
        received: list[ResourceUsage] = []

        async def slow_collect(subscription: Subscription) -> None:
            async for usage in subscription:
                received.append(usage)
                await anyio.lowlevel.checkpoint()  # twice as slow as the publisher

        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            rx = manager.subscribe(buffer_size=100)
            task_group.start_soon(slow_collect, rx)
            for number in range(4000):
                await manager.track_resource_usage("cpu", number)
        assert len(received) + rx.missed == 4000
        assert len(received) >= 1000, f"starved: received {len(received)} of 4000"
        assert values(received) == sorted(values(received))


class TestDropOldest:
    async def test_full_buffer_drops_the_oldest_and_counts_it(self) -> None:
        manager = ResourceManager()
        with manager.subscribe(buffer_size=5) as rx:
            for number in range(20):
                await manager.track_resource_usage("cpu", number)
            assert rx.missed == 15
            assert rx.buffered == 5
            assert values(rx.drain()) == [15, 16, 17, 18, 19]

    async def test_received_plus_missed_equals_published(self) -> None:
        delays = [0, 0.001, 0.01, 0.1, 1.0]
        received: list[list[ResourceUsage]] = [[] for _ in delays]

        async def consume(
            subscription: Subscription, into: list[ResourceUsage], delay: float
        ) -> None:
            async for usage in subscription:
                into.append(usage)
                if delay:
                    await anyio.sleep(delay)

        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            subscriptions = [manager.subscribe(buffer_size=10) for _ in delays]
            for subscription, into, delay in zip(subscriptions, received, delays, strict=True):
                task_group.start_soon(consume, subscription, into, delay)
            for number in range(500):
                await manager.track_resource_usage("cpu", number)
                await anyio.sleep(0.002)
        for subscription, into in zip(subscriptions, received, strict=True):
            assert len(into) + subscription.missed == 500
            got = values(into)
            assert got == sorted(set(got)), "out of order or duplicated"
            assert got[-1] == 499
        assert subscriptions[0].missed == 0
        assert subscriptions[-1].missed > 400

    async def test_one_slow_subscriber_does_not_slow_the_others(self) -> None:
        fast: list[list[ResourceUsage]] = [[], []]
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            stuck = manager.subscribe(buffer_size=1)  # never read
            for into in fast:
                task_group.start_soon(collect, manager.subscribe(buffer_size=4), into)
            start = anyio.current_time()
            for number in range(100):
                await manager.track_resource_usage("cpu", number)
            assert anyio.current_time() == start  # tracking never waited
        assert [values(into) for into in fast] == [list(range(100))] * 2
        assert stuck.missed == 99
        assert values(stuck.drain()) == [99.0]


class TestWait:
    async def test_backpressure_in_virtual_time(self) -> None:
        received: list[ResourceUsage] = []

        async def slow_collect(subscription: Subscription) -> None:
            async for usage in subscription:
                received.append(usage)
                await anyio.sleep(1)

        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            rx = manager.subscribe(buffer_size=2, overflow="wait")
            task_group.start_soon(slow_collect, rx)
            await anyio.wait_all_tasks_blocked()
            start = anyio.current_time()
            for number in range(10):
                await manager.track_resource_usage("cpu", number)
            # 1 handed over + 2 buffered without waiting; each later one waits 1 s.
            assert anyio.current_time() - start == pytest.approx(7)
        assert values(received) == list(range(10))
        assert rx.missed == 0

    async def test_timeout_keeps_statistics_and_never_delivers_twice(self) -> None:
        manager = ResourceManager()
        lossy = manager.subscribe(buffer_size=10)
        waiting = manager.subscribe(buffer_size=1, overflow="wait")
        await manager.track_resource_usage("gpu", 10)  # fills the waiting subscriber
        start = anyio.current_time()
        with pytest.raises(TrackingTimeoutError) as caught:
            await manager.track_resource_usage_with_timeout("gpu", 20, timeout=2.5)
        assert anyio.current_time() - start == pytest.approx(2.5)
        assert isinstance(caught.value, TimeoutError)
        assert isinstance(caught.value, DarwinMetricsError)
        assert caught.value.resource_type == "gpu"
        assert caught.value.timeout == 2.5
        assert "'gpu'" in str(caught.value)
        stats = manager.usage_statistics()["gpu"]
        assert (stats.count, stats.last) == (2, 20.0)
        assert values(lossy.drain()) == [10.0, 20.0]
        assert values(waiting.drain()) == [10.0]
        await manager.track_resource_usage("gpu", 30)
        assert values(waiting.drain()) == [30.0]
        assert waiting.missed == 0
        lossy.close()
        waiting.close()

    async def test_timeout_zero_fails_at_once_when_a_buffer_is_full(self) -> None:
        manager = ResourceManager()
        with manager.subscribe(buffer_size=1, overflow="wait") as waiting:
            await manager.track_resource_usage_with_timeout("cpu", 1, timeout=0)
            with pytest.raises(TrackingTimeoutError):
                await manager.track_resource_usage_with_timeout("cpu", 2, timeout=0)
            assert values(waiting.drain()) == [1.0]

    async def test_cancelled_while_waiting_delivers_nothing_later(self) -> None:
        manager = ResourceManager()
        with manager.subscribe(buffer_size=1, overflow="wait") as waiting:
            await manager.track_resource_usage("cpu", 1)
            with anyio.move_on_after(3) as scope:
                await manager.track_resource_usage("cpu", 2)
            assert scope.cancelled_caught
            assert manager.usage_statistics()["cpu"].count == 2
            assert values(waiting.drain()) == [1.0]
            assert waiting.drain() == []

    async def test_full_wait_subscriber_does_not_delay_the_others(self) -> None:
        manager = ResourceManager()
        fast: list[ResourceUsage] = []
        with (
            manager.subscribe(buffer_size=0, overflow="wait") as stuck,
            manager.subscribe(buffer_size=1, overflow="wait") as roomy,
        ):
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(collect, manager.subscribe(), fast)
                task_group.start_soon(manager.track_resource_usage, "cpu", 5)
                await anyio.wait_all_tasks_blocked()
                assert values(fast) == [5.0]  # while the tracker still waits
                assert values(roomy.drain()) == [5.0]
                assert values(await stuck.next_batch()) == [5.0]
                task_group.cancel_scope.cancel()

    async def test_concurrent_trackers_keep_each_subscribers_order(self) -> None:
        manager = ResourceManager()
        with (
            manager.subscribe(buffer_size=1, overflow="wait") as rx,
            manager.subscribe(buffer_size=1, overflow="wait") as lagging,
        ):
            await manager.track_resource_usage("cpu", 0)  # both full now
            async with anyio.create_task_group() as task_group:
                for number in (1, 2, 3):
                    task_group.start_soon(manager.track_resource_usage, "cpu", number)
                    await anyio.wait_all_tasks_blocked()
                got = values(rx.drain())
                # Draining makes room, and the events waiting for it move in, in order.
                assert got == [0.0, 1.0, 2.0, 3.0]
                # lagging is still full: 4 queues behind 1, 2 and 3 there.
                task_group.start_soon(manager.track_resource_usage, "cpu", 4)
                while len(got) < 5:
                    await anyio.wait_all_tasks_blocked()
                    got += values(rx.drain())
                    lagging.drain()
            assert got == [0, 1, 2, 3, 4]

    async def test_buffer_size_zero_hands_over_directly(self) -> None:
        received: list[ResourceUsage] = []
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            rx = manager.subscribe(buffer_size=0, overflow="wait")
            task_group.start_soon(collect, rx, received)
            await anyio.wait_all_tasks_blocked()
            for number in range(5):
                await manager.track_resource_usage("cpu", number)
                # Each call returned only once the subscriber was waiting for it.
                assert rx.buffered == 1
                await anyio.wait_all_tasks_blocked()
                assert rx.buffered == 0
        assert values(received) == list(range(5))

    async def test_closing_a_subscriber_releases_its_tracker(self) -> None:
        manager = ResourceManager()
        waiting = manager.subscribe(buffer_size=1, overflow="wait")
        await manager.track_resource_usage("cpu", 1)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(manager.track_resource_usage, "cpu", 2)
            await anyio.wait_all_tasks_blocked()
            waiting.close()
        assert manager.subscriber_count == 0
        assert manager.usage_statistics()["cpu"].count == 2

    async def test_manager_exit_releases_a_blocked_tracker(self) -> None:
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            waiting = manager.subscribe(buffer_size=1, overflow="wait")
            await manager.track_resource_usage("cpu", 1)
            task_group.start_soon(manager.track_resource_usage, "cpu", 2)
            await anyio.wait_all_tasks_blocked()
        # The blocked call returned when the manager exited, so its event was delivered.
        assert values(waiting.drain()) == [1.0, 2.0]
        waiting.close()


class TestUnsubscribe:
    async def test_close_removes_the_subscriber_and_ends_its_loop(self) -> None:
        manager = ResourceManager()
        rx = manager.subscribe()
        await manager.track_resource_usage("cpu", 1)
        assert manager.subscriber_count == 1
        rx.close()
        rx.close()
        assert rx.closed
        assert manager.subscriber_count == 0
        await manager.track_resource_usage("cpu", 2)
        assert [usage async for usage in rx] == []
        assert "closed" in repr(rx)

    async def test_close_from_another_task_ends_a_waiting_loop(self) -> None:
        manager = ResourceManager()
        received: list[ResourceUsage] = []
        rx = manager.subscribe()
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(collect, rx, received)
            await manager.track_resource_usage("cpu", 1)
            await anyio.wait_all_tasks_blocked()
            rx.close()
        assert values(received) == [1.0]

    async def test_sync_context_exit_unsubscribes(self) -> None:
        manager = ResourceManager()
        with manager.subscribe() as rx:
            assert manager.subscriber_count == 1
        assert rx.closed
        assert manager.subscriber_count == 0

    async def test_async_context_exit_unsubscribes(self) -> None:
        manager = ResourceManager()
        async with manager.subscribe() as rx:
            assert manager.subscriber_count == 1
        assert rx.closed
        assert manager.subscriber_count == 0

    async def test_garbage_collection_unsubscribes_without_resource_warnings(self) -> None:
        manager = ResourceManager()
        kept = manager.subscribe()
        manager.subscribe()  # dropped at once
        cyclic = manager.subscribe(overflow="wait")
        holder: dict[str, Any] = {"subscription": cyclic}
        holder["self"] = holder
        await manager.track_resource_usage("cpu", 1)  # leaves events in the streams
        del cyclic, holder
        gc.collect()
        assert manager.subscriber_count == 1
        await manager.track_resource_usage("cpu", 2)
        assert values(kept.drain()) == [1.0, 2.0]
        kept.close()

    async def test_a_collected_wait_subscriber_releases_its_tracker(self) -> None:
        manager = ResourceManager()
        waiting: Subscription | None = manager.subscribe(buffer_size=1, overflow="wait")
        await manager.track_resource_usage("cpu", 1)
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(manager.track_resource_usage, "cpu", 2)
            await anyio.wait_all_tasks_blocked()
            waiting = None
            gc.collect()
        assert waiting is None
        assert manager.subscriber_count == 0


class TestManagerContext:
    async def test_exit_ends_the_subscribers_loops(self) -> None:
        received: list[list[ResourceUsage]] = [[], []]
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            subscriptions = [manager.subscribe(), manager.subscribe(overflow="wait")]
            for subscription, into in zip(subscriptions, received, strict=True):
                task_group.start_soon(collect, subscription, into)
            for number in range(3):
                await manager.track_resource_usage("cpu", number)
        assert [values(into) for into in received] == [[0, 1, 2]] * 2
        assert manager.subscriber_count == 0
        assert all("ended" in repr(s) for s in subscriptions)
        for subscription in subscriptions:
            subscription.close()

    async def test_buffered_events_are_still_delivered_after_exit(self) -> None:
        async with ResourceManager() as manager:
            rx = manager.subscribe()
            await manager.track_resource_usage("cpu", 1)
        assert values([usage async for usage in rx]) == [1.0]
        rx.close()

    async def test_everything_works_without_entering(self) -> None:
        manager = ResourceManager()
        with manager.subscribe() as rx:
            await manager.track_resource_usage("cpu", 1)
            assert values(rx.drain()) == [1.0]
        assert "idle" in repr(manager)

    async def test_samplers_need_the_context(self) -> None:
        manager = ResourceManager()
        pool: ResourcePool[int] = ResourcePool(1)
        with pytest.raises(RuntimeError, match="async with manager"):
            manager.watch_pool("db", pool)
        with pytest.raises(RuntimeError, match="async with manager"):
            manager.sample_system()
        async with manager:
            pass
        with pytest.raises(RuntimeError, match="async with manager"):
            manager.watch_pool("db", pool)

    async def test_enter_once_at_a_time_and_again_after_exit(self) -> None:
        manager = ResourceManager()
        async with manager:
            assert "running" in repr(manager)
            with pytest.raises(RuntimeError, match="already running"):
                await manager.__aenter__()
        async with manager:
            with manager.subscribe() as rx:
                await manager.track_resource_usage("cpu", 1)
                assert values(rx.drain()) == [1.0]

    async def test_periodic_cache_cleanup(self) -> None:
        clock = FakeClock()
        manager = ResourceManager(cache_ttl=10, cleanup_interval=5, cache_clock=clock)
        async with manager:
            manager.cache_metric("a", b"1")
            manager.cache_metric("b", b"2")
            clock.advance(11)
            assert "2 cached metrics" in repr(manager)
            await anyio.sleep(5.5)
            assert "0 cached metrics" in repr(manager)
            assert manager.cleanup_cache() == 0


class TestStatistics:
    async def test_per_type_statistics(self) -> None:
        manager = ResourceManager()
        for usage in (10, 30, 20):
            await manager.track_resource_usage("cpu", usage)
            await anyio.sleep(1)
        await manager.track_resource_usage("memory", 55.5)
        stats = manager.usage_statistics()
        assert set(stats) == {"cpu", "memory"}
        cpu = stats["cpu"]
        assert (cpu.count, cpu.last, cpu.min, cpu.max) == (3, 20.0, 10.0, 30.0)
        assert cpu.mean == pytest.approx(20.0)
        assert cpu.last_timestamp == anyio.current_time() - 1
        memory = stats["memory"]
        assert memory == UsageStatistics(1, 55.5, 55.5, 55.5, 55.5, anyio.current_time())
        assert manager.get_usage_stats() == {"cpu": 30.0, "memory": 55.5}

    async def test_snapshots_are_frozen_copies(self) -> None:
        manager = ResourceManager()
        await manager.track_resource_usage("cpu", 1)
        snapshot = manager.usage_statistics()
        snapshot.clear()
        assert manager.usage_statistics()["cpu"].count == 1
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            mutate(manager.usage_statistics()["cpu"], "max")
        peaks = manager.get_usage_stats()
        peaks["cpu"] = 99.0
        assert manager.get_usage_stats() == {"cpu": 1.0}

    async def test_mean_of_many(self) -> None:
        manager = ResourceManager()
        numbers = [float(n % 97) for n in range(1000)]
        for number in numbers:
            await manager.track_resource_usage("cpu", number)
        assert manager.usage_statistics()["cpu"].mean == pytest.approx(sum(numbers) / 1000)


class TestMetricCache:
    async def test_bytes_like_values_are_stored_as_bytes(self) -> None:
        manager = ResourceManager()
        data = bytearray(b"abc")
        manager.cache_metric("bytes", b"xyz")
        manager.cache_metric("bytearray", data)
        manager.cache_metric("memoryview", memoryview(b"0123")[1:3])
        data[0] = ord("z")
        assert manager.get_cached_metric("bytes") == b"xyz"
        assert manager.get_cached_metric("bytearray") == b"abc"
        assert manager.get_cached_metric("memoryview") == b"12"
        assert all(
            type(manager.get_cached_metric(key)) is bytes
            for key in ("bytes", "bytearray", "memoryview")
        )
        assert manager.get_cached_metric("absent") is None

    @pytest.mark.parametrize("value", ["text", 42, [1, 2], None, 4.2])
    async def test_other_values_are_rejected(self, value: Any) -> None:
        manager = ResourceManager()
        with pytest.raises(TypeError, match="value must be bytes-like"):
            manager.cache_metric("key", value)
        assert manager.get_cached_metric("key") is None

    async def test_key_must_be_a_str(self) -> None:
        manager = ResourceManager()
        key: Any = b"key"
        with pytest.raises(TypeError, match="key must be a str"):
            manager.cache_metric(key, b"1")

    async def test_expiry_and_cleanup_with_a_fake_clock(self) -> None:
        clock = FakeClock()
        manager = ResourceManager(cache_ttl=60, cache_clock=clock)
        manager.cache_metric("old", b"1")
        clock.advance(30)
        manager.cache_metric("new", b"2")
        clock.advance(29.9)
        assert manager.get_cached_metric("old") == b"1"
        clock.advance(0.1)
        assert manager.get_cached_metric("old") is None
        assert manager.get_cached_metric("new") == b"2"
        clock.advance(30)
        assert "1 cached metrics" in repr(manager)
        assert manager.cleanup_cache() == 1
        assert manager.cleanup_cache() == 0
        assert manager.get_cached_metric("new") is None


class TestWatchPool:
    async def test_tracks_every_change_of_a_real_pool(self) -> None:
        counter = iter(range(100))
        pool: ResourcePool[int] = ResourcePool(4, factory=lambda: next(counter))
        received: list[ResourceUsage] = []
        async with anyio.create_task_group() as task_group, ResourceManager() as manager:
            task_group.start_soon(collect, manager.subscribe(), received)
            manager.watch_pool("db", pool)
            async with AsyncExitStack() as stack:
                await stack.enter_async_context(pool.lease())
                await stack.enter_async_context(pool.lease())
                await anyio.wait_all_tasks_blocked()
                await pool.resize(2)
                await anyio.wait_all_tasks_blocked()
            await anyio.wait_all_tasks_blocked()
        assert {u.resource_type for u in received} == {"pool:db"}
        assert values(received) == [0, 25, 50, 100, 50, 0]
        assert manager.usage_statistics()["pool:db"].max == 100.0
        async with pool.lease():
            pass
        assert manager.usage_statistics()["pool:db"].count == 6  # unwatched on exit

    async def test_changes_made_before_the_task_starts_are_seen(self) -> None:
        pool: ResourcePool[int] = ResourcePool(2, factory=lambda: 1)
        async with ResourceManager() as manager:
            rx = manager.subscribe()
            manager.watch_pool("db", pool)
            async with pool.lease():
                await anyio.wait_all_tasks_blocked()
            await anyio.wait_all_tasks_blocked()
        assert values(rx.drain()) == [0, 50, 0]
        rx.close()

    async def test_interval_samples_and_the_scope_stops_it(self) -> None:
        pool: ResourcePool[int] = ResourcePool(4, factory=lambda: 1)
        async with ResourceManager() as manager:
            rx = manager.subscribe()
            scope = manager.watch_pool("db", pool, interval=1)
            await anyio.wait_all_tasks_blocked()
            async with pool.lease():
                await anyio.sleep(2.5)  # samples at 0, 1 and 2
            await anyio.sleep(1)  # sample at 3
            scope.cancel()
            await anyio.sleep(10)
        usages = rx.drain()
        assert values(usages) == [0, 25, 25, 0]
        start = usages[0].timestamp
        assert [u.timestamp - start for u in usages] == pytest.approx([0, 1, 2, 3])
        rx.close()

    async def test_stopping_a_change_watcher_unregisters_it(self) -> None:
        pool: ResourcePool[int] = ResourcePool(2, factory=lambda: 1)
        async with ResourceManager() as manager:
            scope = manager.watch_pool("db", pool)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            await anyio.wait_all_tasks_blocked()
            async with pool.lease():
                pass
        assert manager.usage_statistics()["pool:db"].count == 1


class TestSampleSystem:
    @pytest.mark.real_time
    async def test_samples_this_machine(self) -> None:
        seen: dict[str, list[float]] = {}
        async with ResourceManager() as manager:
            with manager.subscribe(buffer_size=1000) as rx:
                manager.sample_system(interval=0.05)
                with anyio.fail_after(10):
                    async for usage in rx:
                        seen.setdefault(usage.resource_type, []).append(usage.usage_percent)
                        if len(seen.get("cpu", ())) >= 3:
                            break
        assert {"cpu", "memory", "swap"} <= set(seen)
        assert any(name.startswith("disk:") for name in seen)
        # The first round has no cpu: microseconds after priming, psutil would say about 0.
        assert len(seen["memory"]) == len(seen["cpu"])
        for name, percentages in seen.items():
            assert all(0 <= p <= 100 for p in percentages), (name, percentages)

    async def test_missing_psutil_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "psutil", None)
        async with ResourceManager() as manager:
            with pytest.raises(ModuleNotFoundError, match=r"darwin-metrics\[system\]"):
                manager.sample_system()


class TestThreads:
    @pytest.mark.real_time
    async def test_tracking_from_a_worker_thread(self) -> None:
        async with ResourceManager() as manager:
            with manager.subscribe() as rx:

                def worker() -> None:
                    for number in range(3):
                        anyio.from_thread.run(manager.track_resource_usage, "gpu", number)

                await anyio.to_thread.run_sync(worker)
                assert values(rx.drain()) == [0, 1, 2]
                assert manager.get_usage_stats() == {"gpu": 2.0}


class TestRepr:
    async def test_subscription_repr(self) -> None:
        manager = ResourceManager()
        rx = manager.subscribe(buffer_size=3)
        for number in range(5):
            await manager.track_resource_usage("cpu", number)
        assert repr(rx).startswith("<darwin_metrics.Subscription at 0x")
        assert repr(rx).endswith(", drop_oldest, 3/3 buffered, 2 missed, open>")
        assert (rx.overflow, rx.buffer_size, rx.buffered) == ("drop_oldest", 3, 3)
        rx.close()
        assert repr(rx).endswith(", closed>")

    async def test_manager_repr(self) -> None:
        manager = ResourceManager()
        with manager.subscribe():
            await manager.track_resource_usage("cpu", 1)
            manager.cache_metric("k", b"v")
            assert repr(manager).startswith("<darwin_metrics.ResourceManager at 0x")
            assert repr(manager).endswith(
                ", 1 subscribers, 1 resource types, 1 cached metrics, idle>"
            )

    async def test_drop_oldest_probe_is_anyios_buffer(self) -> None:
        # The cheap emptiness test relies on a private anyio attribute: notice if it changes.
        manager = ResourceManager()
        with manager.subscribe() as rx:
            assert isinstance(rx._channel.ready, deque)


BAD_TRACKING: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"resource_type": 1}, TypeError, "resource_type"),
    ({"resource_type": None}, TypeError, "resource_type"),
    ({"resource_type": b"cpu"}, TypeError, "resource_type"),
    ({"resource_type": ""}, ValueError, "resource_type"),
    ({"usage": True}, TypeError, "usage"),
    ({"usage": "50"}, TypeError, "usage"),
    ({"usage": None}, TypeError, "usage"),
    ({"usage": Decimal("50")}, TypeError, "usage"),
    ({"usage": 1j}, TypeError, "usage"),
    ({"usage": math.nan}, ValueError, "usage"),
    ({"usage": math.inf}, ValueError, "usage"),
    ({"usage": -1}, ValueError, "usage"),
    ({"usage": -0.001}, ValueError, "usage"),
    ({"usage": 10**400}, ValueError, "usage"),
    ({"timeout": -1}, ValueError, "timeout"),
    ({"timeout": math.nan}, ValueError, "timeout"),
    ({"timeout": math.inf}, ValueError, "timeout"),
    ({"timeout": "1"}, TypeError, "timeout"),
    ({"timeout": True}, TypeError, "timeout"),
    ({"timeout": None}, TypeError, "timeout"),
]


class TestBadInput:
    @pytest.mark.parametrize(("change", "error", "name"), BAD_TRACKING)
    async def test_tracking(
        self, change: dict[str, Any], error: type[Exception], name: str
    ) -> None:
        manager = ResourceManager()
        arguments: dict[str, Any] = {"resource_type": "cpu", "usage": 50.0} | change
        with manager.subscribe() as rx:
            track = (
                manager.track_resource_usage_with_timeout
                if "timeout" in change
                else manager.track_resource_usage
            )
            with pytest.raises(error, match=name):
                await track(**arguments)
            with pytest.raises(error, match=name):
                await manager.track_resource_usage_with_timeout(**({"timeout": 1} | arguments))
            assert manager.usage_statistics() == {}
            assert rx.drain() == []

    @pytest.mark.parametrize(
        ("kwargs", "error", "name"),
        [
            ({"buffer_size": 0}, ValueError, "buffer_size"),
            ({"buffer_size": -1, "overflow": "wait"}, ValueError, "buffer_size"),
            ({"buffer_size": 1.5}, TypeError, "buffer_size"),
            ({"buffer_size": True}, TypeError, "buffer_size"),
            ({"buffer_size": "10"}, TypeError, "buffer_size"),
            ({"overflow": "drop_newest"}, ValueError, "overflow"),
            ({"overflow": None}, TypeError, "overflow"),
        ],
    )
    async def test_subscribe(
        self, kwargs: dict[str, Any], error: type[Exception], name: str
    ) -> None:
        manager = ResourceManager()
        with pytest.raises(error, match=name):
            manager.subscribe(**kwargs)
        assert manager.subscriber_count == 0

    @pytest.mark.parametrize(
        ("kwargs", "error", "name"),
        [
            ({"cache_ttl": 0}, ValueError, "cache_ttl"),
            ({"cache_ttl": -1}, ValueError, "cache_ttl"),
            ({"cache_ttl": math.nan}, ValueError, "cache_ttl"),
            ({"cache_ttl": math.inf}, ValueError, "cache_ttl"),
            ({"cache_ttl": "60"}, TypeError, "cache_ttl"),
            ({"cache_ttl": True}, TypeError, "cache_ttl"),
            ({"cleanup_interval": 0}, ValueError, "cleanup_interval"),
            ({"cleanup_interval": "5"}, TypeError, "cleanup_interval"),
            ({"cache_clock": 5}, TypeError, "cache_clock"),
        ],
    )
    def test_constructor(self, kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
        with pytest.raises(error, match=name):
            ResourceManager(**kwargs)

    async def test_samplers(self) -> None:
        pool: ResourcePool[int] = ResourcePool(1, factory=lambda: 1)
        async with ResourceManager() as manager:
            bad_name: Any = 5
            with pytest.raises(TypeError, match="name"):
                manager.watch_pool(bad_name, pool)
            with pytest.raises(ValueError, match="name"):
                manager.watch_pool("", pool)
            not_a_pool: Any = object()
            with pytest.raises(TypeError, match="pool must be a ResourcePool"):
                manager.watch_pool("db", not_a_pool)
            with pytest.raises(ValueError, match="interval"):
                manager.watch_pool("db", pool, interval=0)
            with pytest.raises(ValueError, match="interval"):
                manager.sample_system(interval=-1)
            async with pool.lease():
                pass
        assert manager.usage_statistics() == {}


class TestRegressions:
    """Bugs found in review, kept as tests."""

    async def test_a_subscription_closed_during_the_fan_out_is_dropped(self) -> None:
        manager = ResourceManager()
        waiting = manager.subscribe(buffer_size=1, overflow="wait")
        lossy = manager.subscribe(buffer_size=1)
        await manager.track_resource_usage("cpu", 0)  # both buffers are full now
        channel = lossy._channel
        real = channel.send_nowait

        def send_nowait(event: ResourceUsage) -> None:
            # As if garbage collection ran the subscription's finalizer right here.
            channel.send_nowait = real
            channel.close()
            raise anyio.WouldBlock

        channel.send_nowait = send_nowait

        async def drain_later() -> None:
            await anyio.wait_all_tasks_blocked()
            waiting.drain()

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_later)
            await manager.track_resource_usage("cpu", 1)  # no ClosedResourceError
        assert manager.subscriber_count == 1
        waiting.drain()
        with anyio.fail_after(5):  # no reservation was left behind to block this one
            await manager.track_resource_usage("cpu", 2)
        assert values(waiting.drain()) == [2.0]

    async def test_an_error_in_the_fan_out_withdraws_its_reservations(self) -> None:
        manager = ResourceManager()
        waiting = manager.subscribe(buffer_size=1, overflow="wait")
        broken = manager.subscribe(buffer_size=1)
        await manager.track_resource_usage("cpu", 0)

        def explode(event: ResourceUsage) -> None:
            raise RuntimeError("boom")

        broken._channel.send_nowait = explode
        with pytest.raises(RuntimeError, match="boom"):
            await manager.track_resource_usage("cpu", 1)
        assert len(waiting._channel.backlog) == 0
        broken.close()
        waiting.drain()
        with anyio.fail_after(5):
            await manager.track_resource_usage("cpu", 2)

    @pytest.mark.real_time
    async def test_a_subscription_collected_in_another_thread_closes_in_its_loop(
        self,
    ) -> None:
        manager = ResourceManager()
        subscription = manager.subscribe(buffer_size=1, overflow="wait")
        cycle: dict[str, Any] = {"subscription": subscription}
        cycle["self"] = cycle  # only the cycle collector frees it
        await manager.track_resource_usage("cpu", 1)
        done = anyio.Event()

        async def track() -> None:
            await manager.track_resource_usage("cpu", 2)  # waits: the buffer is full
            done.set()

        gc.disable()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(track)
                await anyio.wait_all_tasks_blocked()
                del subscription, cycle
                await anyio.to_thread.run_sync(gc.collect)
                with anyio.fail_after(5):
                    await done.wait()
        finally:
            gc.enable()
        assert manager.subscriber_count == 0

    @pytest.mark.parametrize(
        "make",
        [
            lambda: ResourceManager(cache_ttl=10**400),
            lambda: ResourceManager(cleanup_interval=10**400),
        ],
    )
    async def test_huge_ints_are_value_errors(self, make: Any) -> None:
        with pytest.raises(ValueError, match="finite"):
            make()
        manager = ResourceManager()
        with pytest.raises(ValueError, match="timeout"):
            await manager.track_resource_usage_with_timeout("cpu", 1, 10**400)

    async def test_a_nonsense_disk_reading_is_skipped(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        psutil = pytest.importorskip("psutil")

        class Partition:
            mountpoint = "/mnt/fuse"

        class Usage:
            percent = -5.0

        monkeypatch.setattr(psutil, "disk_partitions", lambda all=False: [Partition()])
        monkeypatch.setattr(psutil, "disk_usage", lambda path: Usage())
        from darwin_metrics._manager._samplers import read_disks

        assert read_disks() == ([], {"disk:/mnt/fuse"})

    async def test_a_block_raising_comes_out_unwrapped(self) -> None:
        with pytest.raises(KeyError, match="mine"):
            async with ResourceManager():
                raise KeyError("mine")

    @pytest.mark.real_time
    async def test_exit_does_not_wait_for_a_hung_disk_read(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        pytest.importorskip("psutil")
        import threading

        import darwin_metrics._manager._samplers as samplers_module

        release = threading.Event()
        entered = threading.Event()

        def hung() -> tuple[list[tuple[str, float]], set[str]]:
            entered.set()
            release.wait()  # a stale network mount
            return [], set()

        monkeypatch.setattr(samplers_module, "read_disks", hung)
        try:
            with anyio.fail_after(5):
                async with ResourceManager() as manager:
                    manager.sample_system(interval=1)
                    await anyio.to_thread.run_sync(entered.wait)
            assert not release.is_set()  # exit came while the read still hung
        finally:
            release.set()

    async def test_a_closed_subscription_reports_nothing_buffered(self) -> None:
        manager = ResourceManager()
        subscription = manager.subscribe()
        await manager.track_resource_usage("cpu", 1)
        assert subscription.buffered == 1
        subscription.close()
        assert subscription.buffered == 0
        assert "0/100 buffered" in repr(subscription)
        assert subscription.drain() == []
