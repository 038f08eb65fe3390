"""ResourcePool's production features and first-use behaviour.

Admission control (``max_waiting``), ``pause``/``resume``/``drain``, a default ``timeout``,
idle health (``check_after_idle``, ``keepalive``, ``check_on_create``), ``acquire()`` as an
async context manager, entering that waits for ``min_idle``, ``wait_ready``, and the
warnings for upkeep options used without ``async with pool:`` and for leases still out at
close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import anyio
import pytest

from darwin_metrics import (
    PoolEmptyError,
    PoolOverloadedError,
    PoolPausedError,
    PoolTimeoutError,
    ResourceCheckError,
)
from darwin_metrics.resource import ResourcePool

pytestmark = pytest.mark.anyio


class Conn:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.pings = 0

    def __repr__(self) -> str:
        return f"Conn({self.number})"


class Factory:
    def __init__(self, *, delay: float = 0.0) -> None:
        self.made: list[Conn] = []
        self.delay = delay

    async def __call__(self) -> Conn:
        if self.delay:
            await anyio.sleep(self.delay)
        conn = Conn(len(self.made))
        self.made.append(conn)
        return conn

    def dispose(self, conn: Conn) -> None:
        assert not conn.closed
        conn.closed = True


def books(pool: ResourcePool[Any]) -> None:
    stats = pool.statistics()
    assert stats.size == stats.idle + stats.leased <= stats.max_size, stats
    assert stats.created - stats.disposed == stats.size, stats
    assert not (stats.waiting and stats.idle), stats


class TestMaxWaiting:
    async def test_an_acquisition_beyond_max_waiting_fails_at_once(self) -> None:
        pool = ResourcePool(1, factory=Factory(), max_waiting=1)
        async with anyio.create_task_group() as tg, pool.lease():
            tg.start_soon(pool.acquire)
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().waiting == 1
            before = anyio.current_time()
            with pytest.raises(PoolOverloadedError, match="max_waiting=1"):
                await pool.acquire(timeout=10)
            with pytest.raises(PoolOverloadedError):
                async with pool.lease():
                    pass  # pragma: no cover
            assert anyio.current_time() == before  # shed at once, no waiting
            tg.cancel_scope.cancel()
        books(pool)

    async def test_zero_never_waits(self) -> None:
        pool = ResourcePool(1, factory=Factory(), max_waiting=0)
        async with pool.lease():
            with pytest.raises(PoolOverloadedError):
                await pool.acquire()
        async with pool.lease() as conn:  # free again: no waiting needed
            assert conn.number == 0

    def test_bad_values(self) -> None:
        with pytest.raises(ValueError, match="max_waiting must be at least 0"):
            ResourcePool(1, max_waiting=-1)
        with pytest.raises(TypeError, match="max_waiting must be an int"):
            ResourcePool(1, max_waiting=1.5)  # type: ignore[arg-type]


class TestPause:
    async def test_acquisitions_wait_while_paused_and_leases_keep_working(self) -> None:
        pool = ResourcePool(2, factory=Factory())
        got: list[Conn] = []

        async def take() -> None:
            async with pool.lease() as conn:
                got.append(conn)

        async with pool.lease() as held:
            pool.pause()
            assert pool.paused
            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                await anyio.sleep(5)
                assert got == []  # paused: it waits, though a slot is free
                assert pool.statistics().waiting == 1
                assert await pool.try_acquire() is None
                assert held.number == 0  # the lease out works, and goes back below
                pool.resume()
            assert [conn.number for conn in got] == [1]
        assert not pool.paused
        books(pool)

    async def test_paused_with_reject_fails_at_once(self) -> None:
        pool = ResourcePool(2, factory=Factory())
        pool.pause(reject=True)
        with pytest.raises(PoolPausedError, match="resume"):
            await pool.acquire()
        with pytest.raises(PoolPausedError):
            await pool.try_acquire()
        pool.resume()
        async with pool.lease() as conn:
            assert conn.number == 0
        with pytest.raises(TypeError, match="reject must be a bool"):
            pool.pause(reject=1)  # type: ignore[arg-type]


class TestDrain:
    async def test_idle_now_leased_on_return_fresh_ones_after(self) -> None:
        factory = Factory()
        pool = ResourcePool(3, factory=factory.__call__, dispose=factory.dispose)
        first = await pool.acquire()
        second = await pool.acquire()
        assert first is not None
        assert second is not None
        await pool.release(second)
        assert await pool.drain() == 1  # the idle one
        assert second.closed
        assert not first.closed
        async with pool.lease() as fresh:
            assert fresh.number == 2  # a new one, not the drained idle one
        await pool.release(first)
        assert first.closed  # drained as it came back
        stats = pool.statistics()
        assert stats.disposals.drained == 2
        assert (stats.size, stats.idle) == (1, 1)
        async with pool.lease() as again:  # the fast paths are back
            assert again is fresh
        books(pool)
        await pool.aclose()

    async def test_upkeep_refills_min_idle_after_a_drain(self) -> None:
        async with ResourcePool(3, factory=Factory(), min_idle=2) as pool:
            assert pool.statistics().idle == 2
            await pool.drain()
            await anyio.sleep(0.1)
            stats = pool.statistics()
            assert (stats.idle, stats.created, stats.disposals.drained) == (2, 4, 2)


class TestDefaultTimeout:
    async def test_the_pool_default_and_a_per_call_override(self) -> None:
        pool = ResourcePool(1, factory=Factory(), timeout=2)
        async with pool.lease():
            start = anyio.current_time()
            with pytest.raises(PoolTimeoutError):
                await pool.acquire()
            assert anyio.current_time() - start == pytest.approx(2)
            with pytest.raises(PoolTimeoutError):
                async with pool.lease(timeout=0.5):
                    pass  # pragma: no cover
            assert anyio.current_time() - start == pytest.approx(2.5)
            with anyio.move_on_after(30) as scope:
                await pool.acquire(timeout=None)  # waits for ever, on purpose
            assert scope.cancelled_caught
        with pytest.raises(ValueError, match="timeout must be finite"):
            ResourcePool(1, timeout=-1)


class TestIdleHealth:
    async def test_check_after_idle_checks_only_long_idle_resources(self) -> None:
        checked: list[int] = []

        def check(conn: Conn) -> bool:
            checked.append(conn.number)
            return True

        pool = ResourcePool(1, factory=Factory(), check=check, check_after_idle=10)
        async with pool.lease():
            pass
        async with pool.lease():  # idle for no time: not checked
            pass
        await anyio.sleep(11)
        async with pool.lease():  # idle for 11 s: checked
            pass
        assert checked == [0]
        with pytest.raises(ValueError, match="check_after_idle needs a check"):
            ResourcePool(1, check_after_idle=1)

    async def test_check_on_create_fails_like_the_factory_never_loops(self) -> None:
        factory = Factory()
        pool = ResourcePool(2, factory=factory, check=lambda conn: False, check_on_create=True)
        with pytest.raises(ResourceCheckError, match="failed its check"):
            await pool.acquire()
        stats = pool.statistics()
        assert (stats.factory_errors, stats.disposals.check_failed, stats.size) == (1, 1, 0)
        assert len(factory.made) == 1  # one attempt, no endless loop
        with pytest.raises(ValueError, match="check_on_create needs a check"):
            ResourcePool(1, check_on_create=True)
        with pytest.raises(TypeError, match="check_on_create must be a bool"):
            ResourcePool(1, check=bool, check_on_create=1)  # type: ignore[arg-type]

    async def test_check_on_create_in_prefill_backs_off(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        verdicts = iter([True, False, False, True])
        pool = ResourcePool(
            2,
            factory=Factory(),
            check=lambda conn: next(verdicts, True),
            check_on_create=True,
            check_after_idle=3600,  # new ones only: checkouts of idle ones are not checked
            min_idle=1,
        )
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool:
                conn = await pool.acquire()  # the first fill's (passed); refill next
                await anyio.sleep(5)
                assert pool.statistics().idle == 1
                await pool.release(conn)
        assert caplog.text.count("prefill failed") == 2

    async def test_keepalive_exercises_idle_resources_and_disposes_the_dead(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        factory = Factory()

        async def ping(conn: Conn) -> bool:
            await anyio.sleep(0.5)
            conn.pings += 1
            return conn.number != 1  # the second connection went stale

        with caplog.at_level(logging.WARNING, logger="darwin_metrics"):
            async with ResourcePool(
                3, factory=factory, dispose=factory.dispose, keepalive=30, ping=ping
            ) as pool:
                async with pool.lease(), pool.lease():
                    pass
                await anyio.sleep(29)
                assert [conn.pings for conn in factory.made] == [0, 0]
                await anyio.sleep(3)  # both due now, exercised one at a time
                assert [conn.pings for conn in factory.made] == [1, 1]
                assert factory.made[1].closed
                # A checkout during a ping does not wait for it: it takes the other one.
                await anyio.sleep(29.1)
                start = anyio.current_time()
                async with pool.lease() as conn:
                    assert anyio.current_time() == start
                    assert conn.number in (0, 2)
        assert "ping(Conn(1)) raised; disposing it" in caplog.text
        assert pool.statistics().disposals.check_failed == 1

    def test_keepalive_needs_a_hook(self) -> None:
        with pytest.raises(ValueError, match="keepalive needs a ping"):
            ResourcePool(1, keepalive=10)
        with pytest.raises(ValueError, match="give keepalive=SECONDS too"):
            ResourcePool(1, ping=bool)
        with pytest.raises(ValueError, match="keepalive must be positive"):
            ResourcePool(1, keepalive=0, ping=bool)
        ResourcePool(1, keepalive=10, check=bool)  # check serves as the ping


class TestAcquireAsAContextManager:
    async def test_async_with_acquire_gives_back(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        async with pool.acquire() as conn:
            assert conn.number == 0
            assert pool.statistics().leased == 1
        assert pool.statistics().idle == 1
        acquisition = pool.acquire()
        async with acquisition:
            pass
        with pytest.raises(RuntimeError, match="entered only once"):
            async with acquisition:
                pass  # pragma: no cover

    async def test_an_empty_pool_without_factory(self) -> None:
        pool: ResourcePool[int] = ResourcePool(1)
        assert await pool.acquire() is None
        with pytest.raises(PoolEmptyError):
            async with pool.acquire():
                pass  # pragma: no cover

    async def test_it_is_a_coroutine_for_task_spawners(self) -> None:
        pool = ResourcePool(2, factory=Factory())
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.acquire)  # anyio's start_soon checks for a coroutine
        assert pool.statistics().leased == 1

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_create_task_takes_it(self) -> None:
        pool = ResourcePool(2, factory=Factory())
        conn = await asyncio.create_task(pool.acquire())
        assert conn is not None
        await pool.release(conn)
        assert pool.statistics().idle == 1

    async def test_a_forgotten_await_warns(self) -> None:
        pool = ResourcePool(2, factory=Factory())

        def forget() -> None:
            pool.acquire()
            gc.collect()

        with pytest.warns(RuntimeWarning, match="never awaited"):
            forget()


class TestEnteringWaitsForMinIdle:
    async def test_min_idle_resources_are_idle_when_the_block_starts(self) -> None:
        async with ResourcePool(4, factory=Factory(delay=0.1), min_idle=2) as pool:
            stats = pool.statistics()
            assert (stats.idle, stats.size) == (2, 2)  # on asyncio and trio alike

    async def test_a_factory_failure_in_the_first_fill_raises_from_async_with(self) -> None:
        async def broken() -> Conn:
            raise ConnectionRefusedError("database down")

        pool = ResourcePool(2, factory=broken, min_idle=1)
        with pytest.raises(ConnectionRefusedError, match="database down"):
            async with pool:
                pass  # pragma: no cover
        assert pool.closed

    async def test_ready_timeout(self) -> None:
        pool = ResourcePool(2, factory=Factory(delay=10), min_idle=2, ready_timeout=15)
        start = anyio.current_time()
        with pytest.raises(PoolTimeoutError, match="min_idle=2"):
            async with pool:
                pass  # pragma: no cover
        assert anyio.current_time() - start == pytest.approx(15)
        assert pool.closed
        assert pool.statistics().size == 0  # the one made in time was disposed at the close

    async def test_wait_ready_for_a_pool_not_entered(self) -> None:
        pool = ResourcePool(3, factory=Factory(), min_idle=2)
        await pool.wait_ready()
        assert pool.statistics().idle == 2
        with pytest.warns(RuntimeWarning, match="min_idle=2"):  # nothing refills it now
            held = [await pool.acquire() for _ in range(3)]
        await pool.wait_ready(timeout=1)  # no room: returns at once
        for conn in held:
            await pool.release(conn)
        slow = ResourcePool(2, factory=Factory(delay=5), min_idle=2)
        with pytest.raises(PoolTimeoutError):
            await slow.wait_ready(timeout=7)
        assert slow.statistics().idle == 1  # what was made in time stays
        await pool.aclose()
        await slow.aclose()


class TestMisuseWarnings:
    async def test_upkeep_options_without_async_with_warn_once(self) -> None:
        pool = ResourcePool(3, factory=Factory(), min_idle=1, max_idle_time=5)
        await pool.wait_ready()  # the documented way to fill such a pool: no warning

        async def lease_twice() -> None:
            for _ in range(2):
                async with pool.lease():
                    pass

        with pytest.warns(RuntimeWarning, match="'async with pool:'") as record:
            await lease_twice()
        assert len(record) == 1
        assert "min_idle=1, max_idle_time=5.0" in str(record[0].message)

    async def test_aclose_names_who_still_holds_a_lease(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        pool = ResourcePool(2, factory=Factory())
        holding = anyio.Event()

        async def forgetful_worker() -> None:
            async with pool.lease() as conn:
                holding.set()
                await anyio.sleep(3600)
                del conn  # pragma: no cover

        lost = await pool.acquire()  # acquired here and never given back
        async with anyio.create_task_group() as tg:
            tg.start_soon(forgetful_worker)
            await holding.wait()
            with caplog.at_level(logging.WARNING, logger="darwin_metrics"):
                await pool.aclose()
            tg.cancel_scope.cancel()
        warnings = [r.getMessage() for r in caplog.records if "still leased" in r.getMessage()]
        assert len(warnings) == 2
        assert any("in forgetful_worker" in message for message in warnings)
        assert any(
            "in test_aclose_names_who_still_holds_a_lease" in message for message in warnings
        )
        assert lost is not None
