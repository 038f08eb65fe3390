"""The pool's numbers for export: histograms, disposal reasons, wait outcomes, on_timing."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import attrs
import pytest

from darwin_metrics import PoolTimeoutError
from darwin_metrics._histogram import DEFAULT_BUCKETS
from darwin_metrics.resource import Histogram, PoolDisposals, ResourcePool

pytestmark = pytest.mark.anyio


def bucket_of(seconds: float) -> int:
    """The index of the bucket a duration falls in, computed by hand from the bounds."""
    for index, bound in enumerate(DEFAULT_BUCKETS):
        if seconds <= bound:
            return index
    return len(DEFAULT_BUCKETS)


def expected(*durations: float) -> Histogram:
    counts = [0] * (len(DEFAULT_BUCKETS) + 1)
    for seconds in durations:
        counts[bucket_of(seconds)] += 1
    return Histogram(
        bounds=DEFAULT_BUCKETS, counts=tuple(counts), count=len(durations), sum=sum(durations)
    )


def assert_histogram(actual: Histogram, *durations: float) -> None:
    want = expected(*durations)
    assert actual.counts == want.counts
    assert actual.count == want.count
    assert actual.sum == pytest.approx(want.sum)


class TestHistograms:
    async def test_use_create_and_wait_times_in_virtual_time(self) -> None:
        async def factory() -> object:
            await anyio.sleep(0.02)
            return object()

        pool: ResourcePool[object] = ResourcePool(1, factory=factory)
        async with pool.lease():  # created in 20 ms
            await anyio.sleep(0.003)  # held 3 ms

        async def waiter() -> None:
            async with pool.lease():
                await anyio.sleep(0.6)

        async with anyio.create_task_group() as tg, pool.lease():
            tg.start_soon(waiter)
            await anyio.sleep(1.5)  # the waiter waits 1.5 s; held 1.5 s
        stats = pool.statistics()
        assert_histogram(stats.create_time, 0.02)
        assert_histogram(stats.use_time, 0.003, 1.5, 0.6)
        assert_histogram(stats.wait_time, 1.5)
        assert stats.wait_time.cumulative()[-1] == (float("inf"), 1)
        assert (stats.acquired, stats.acquired_after_wait, stats.acquired_at_once) == (3, 1, 2)

    async def test_waits_that_gave_up(self) -> None:
        pool: ResourcePool[object] = ResourcePool(1, factory=object)
        async with pool.lease():
            with pytest.raises(PoolTimeoutError):
                await pool.acquire(timeout=0.25)
            with anyio.move_on_after(0.05):
                await pool.acquire()
        stats = pool.statistics()
        assert (stats.waits_abandoned, stats.timeouts, stats.acquired_after_wait) == (2, 1, 0)
        assert_histogram(stats.wait_time, 0.25, 0.05)

    async def test_factory_errors(self) -> None:
        calls = 0

        def factory() -> object:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise ConnectionError("refused")
            return object()

        pool: ResourcePool[object] = ResourcePool(1, factory=factory)
        with pytest.raises(ConnectionError):
            await pool.acquire()
        assert await pool.acquire() is not None
        stats = pool.statistics()
        assert (stats.factory_errors, stats.create_time.count) == (1, 1)


class TestDisposalReasons:
    async def test_every_reason(self) -> None:
        state = {"reset_fails": False, "check_fails": False}

        def reset(resource: object) -> None:
            if state["reset_fails"]:
                raise RuntimeError("rollback failed")

        def check(resource: object) -> bool:
            return not state["check_fails"]

        pool: ResourcePool[object] = ResourcePool(
            4,
            factory=object,
            reset=reset,
            check=check,
            max_idle_time=10,
            max_lifetime=1000,
        )
        async with pool:
            # discarded
            conn = await pool.acquire()
            await pool.discard(conn)
            # reset_failed
            state["reset_fails"] = True
            async with pool.lease():
                pass
            state["reset_fails"] = False
            # check_failed: an idle one fails on checkout
            async with pool.lease():
                pass
            state["check_fails"] = True
            async with pool.lease():  # the idle one fails; a new one (not checked) is made
                pass
            state["check_fails"] = False
            before_idle = pool.statistics().disposals
            # idle: reaped by upkeep after max_idle_time
            async with pool.lease():
                pass
            await anyio.sleep(11)
            after_idle = pool.statistics().disposals
            # shrunk
            leases = [await pool.acquire() for _ in range(3)]
            for conn in leases:
                await pool.release(conn)
            await pool.resize(1)
            # lifetime: held past max_lifetime, retired as it comes back
            async with pool.lease():
                await anyio.sleep(1000)
            # closed: one idle at the close
            async with pool.lease():
                pass
        stats = pool.statistics()
        disposals = stats.disposals
        assert isinstance(disposals, PoolDisposals)
        assert disposals.discarded == 1
        assert disposals.reset_failed == 1
        assert disposals.check_failed == 1
        assert after_idle.idle == before_idle.idle + 1
        assert disposals.shrunk == 2
        assert disposals.lifetime == 1
        assert disposals.closed == 1
        assert sum(attrs.astuple(disposals)) == stats.disposed
        assert stats.size == 0

    async def test_retain_counts_as_discarded(self) -> None:
        pool: ResourcePool[int] = ResourcePool(3)
        for number in range(3):
            await pool.release(number)
        assert await pool.retain(lambda number: number == 1) == 2
        assert pool.statistics().disposals.discarded == 2


class TestOnTiming:
    async def test_every_duration_reaches_the_listener(self) -> None:
        seen: list[tuple[str, float]] = []

        async def factory() -> object:
            await anyio.sleep(0.01)
            return object()

        pool: ResourcePool[object] = ResourcePool(
            1, factory=factory, on_timing=lambda kind, seconds: seen.append((kind, seconds))
        )

        async def waiter() -> None:
            async with pool.lease():
                pass

        async with anyio.create_task_group() as tg, pool.lease():
            tg.start_soon(waiter)
            await anyio.sleep(0.5)
        assert seen == [
            ("create", pytest.approx(0.01)),
            ("use", pytest.approx(0.5)),
            ("wait", pytest.approx(0.5)),
            ("use", 0.0),
        ]

    async def test_a_listener_that_raises_is_logged(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        def broken(kind: str, seconds: float) -> None:
            raise ValueError("exporter down")

        pool: ResourcePool[object] = ResourcePool(1, factory=object, on_timing=broken)
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool.lease():
                pass
        assert "on_timing('create'" in caplog.text
        assert pool.statistics().use_time.count == 1

    def test_bad_listener(self) -> None:
        bad: Any = 5
        with pytest.raises(TypeError, match="on_timing must be callable"):
            ResourcePool(1, on_timing=bad)
