"""ResourcePool: behaviour, fairness, timeouts, hooks, upkeep and cancellation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from darwin_metrics import (
    DarwinMetricsError,
    PoolClosedError,
    PoolEmptyError,
    PoolFullError,
    PoolTimeoutError,
)
from darwin_metrics.resource import PoolStatistics, ResourcePool

pytestmark = pytest.mark.anyio


class Resource:
    """A resource with an identity, that knows whether it was closed."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False
        self.broken = False

    def __repr__(self) -> str:
        return f"Resource({self.number})"


class Factory:
    """Makes numbered resources; records what it made and what was disposed."""

    def __init__(self, *, checkpoints: int = 0, fail: Callable[[int], bool] | None = None):
        self.made: list[Resource] = []
        self.disposed: list[Resource] = []
        self.checkpoints = checkpoints
        self.fail = fail
        self.calls = 0

    async def __call__(self) -> Resource:
        self.calls += 1
        call = self.calls
        for _ in range(self.checkpoints):
            await anyio.lowlevel.checkpoint()
        if self.fail is not None and self.fail(call):
            raise ConnectionError(f"factory call {call} failed")
        resource = Resource(len(self.made))
        self.made.append(resource)
        return resource

    def dispose(self, resource: Resource) -> None:
        assert not resource.closed, f"{resource} disposed twice"
        resource.closed = True
        self.disposed.append(resource)


def assert_invariants(pool: ResourcePool[Any]) -> PoolStatistics:
    stats = pool.statistics()
    assert stats.size == stats.idle + stats.leased, stats
    assert stats.size <= stats.max_size or stats.idle == 0, stats
    assert stats.created - stats.disposed == stats.size, stats
    assert not (stats.waiting and stats.idle), f"a task waits while a resource is idle: {stats}"
    return stats


class TestSeed:
    async def test_seed_example(self) -> None:
        pool: ResourcePool[int] = ResourcePool(10)
        await pool.release(42)
        resource = await pool.acquire()
        assert resource == 42
        await pool.release(resource)
        assert pool.statistics().idle == 1
        assert_invariants(pool)

    async def test_empty_pool_without_factory_answers_none(self) -> None:
        pool: ResourcePool[int] = ResourcePool(2)
        assert await pool.acquire() is None
        assert await pool.acquire(timeout=1) is None
        # Regression (found by the state machine): a zero timeout must not fire first.
        assert await pool.acquire(timeout=0) is None
        assert await pool.try_acquire() is None
        with pytest.raises(PoolEmptyError, match="no factory"):
            async with pool.lease():
                pass  # pragma: no cover

    async def test_try_acquire_does_not_wait(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("a")
        assert await pool.try_acquire() == "a"
        before = anyio.current_time()
        assert await pool.try_acquire() is None
        assert anyio.current_time() == before
        await pool.release("a")
        assert await pool.try_acquire() == "a"

    async def test_adding_beyond_max_size_raises_and_changes_nothing(self) -> None:
        pool: ResourcePool[str] = ResourcePool(2)
        await pool.release("a")
        await pool.release("b")
        with pytest.raises(PoolFullError, match="max_size=2"):
            await pool.release("c")
        assert pool.statistics().size == 2
        assert isinstance(PoolFullError("x"), DarwinMetricsError)

    async def test_releasing_an_idle_resource_twice_is_an_error(self) -> None:
        pool: ResourcePool[list[int]] = ResourcePool(3)
        item: list[int] = []
        await pool.release(item)
        with pytest.raises(ValueError, match="already in this pool"):
            await pool.release(item)
        assert pool.statistics().size == 1
        full: ResourcePool[str] = ResourcePool(1)
        await full.release("x")
        with pytest.raises(ValueError, match="released twice"):  # not PoolFullError
            await full.release("x")

    async def test_giving_back_a_leased_resource_always_succeeds(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("a")
        resource = await pool.acquire()
        assert resource == "a"
        await pool.release(resource)  # the pool is "full", but this one is its own
        assert_invariants(pool)


class TestFactory:
    async def test_creates_on_demand_up_to_max_size_and_reuses(self) -> None:
        factory = Factory()
        pool = ResourcePool(2, factory=factory)
        a = await pool.acquire()
        b = await pool.acquire()
        assert a is not b
        assert pool.statistics().size == 2
        assert await pool.try_acquire() is None
        await pool.release(a)
        assert await pool.acquire() is a
        assert len(factory.made) == 2

    async def test_sync_factory(self) -> None:
        made = iter(range(10))
        pool = ResourcePool(3, factory=lambda: next(made))
        async with pool.lease() as first, pool.lease() as second:
            assert (first, second) == (0, 1)

    async def test_lease_yields_the_resource_and_gives_it_back(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        async with pool.lease() as resource:
            assert isinstance(resource, Resource)
            assert pool.statistics().leased == 1
        assert pool.statistics().leased == 0
        assert pool.statistics().idle == 1

    async def test_lease_gives_back_on_exception(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        with pytest.raises(KeyError):
            async with pool.lease():
                raise KeyError("boom")
        assert_invariants(pool)
        assert pool.statistics().idle == 1

    async def test_lease_context_is_single_use(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        lease = pool.lease()
        async with lease:
            pass
        with pytest.raises(RuntimeError, match="only once"):
            async with lease:
                pass  # pragma: no cover


class TestFairness:
    async def test_waiters_are_served_in_fifo_order(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("r")
        holder = await pool.acquire()
        order: list[int] = []

        async def waiter(number: int) -> None:
            async with pool.lease() as resource:
                order.append(number)
                assert resource == "r"
                await anyio.sleep(1)

        async with anyio.create_task_group() as tg:
            for number in range(8):
                tg.start_soon(waiter, number)
                await anyio.wait_all_tasks_blocked()  # arrival order is the queue order
            assert pool.statistics().waiting == 8
            await pool.release(holder)
        assert order == list(range(8))

    async def test_released_resource_goes_to_the_waiter_not_a_newcomer(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("r")
        holder = await pool.acquire()
        got: list[str] = []

        async def waiter() -> None:
            resource = await pool.acquire()
            assert resource is not None
            got.append(resource)
            await pool.release(resource)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.release(holder)
            # The waiter has not run yet; a newcomer must not barge in.
            assert await pool.try_acquire() is None
        assert got == ["r"]

    async def test_contended_pool_spreads_work_evenly(self) -> None:
        pool = ResourcePool(3, factory=Factory())
        counts = [0] * 12

        async def worker(number: int) -> None:
            for _ in range(50):
                async with pool.lease():
                    counts[number] += 1
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for number in range(12):
                tg.start_soon(worker, number)
        assert counts == [50] * 12
        stats = assert_invariants(pool)
        assert stats.acquired == 600
        assert stats.created == 3


class TestTimeout:
    async def test_acquire_times_out_in_virtual_time(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        held = await pool.acquire()
        start = anyio.current_time()
        with pytest.raises(PoolTimeoutError, match="within 5"):
            await pool.acquire(timeout=5)
        assert anyio.current_time() - start == pytest.approx(5)
        stats = assert_invariants(pool)
        assert stats.timeouts == 1
        assert stats.longest_wait == pytest.approx(5)
        assert stats.waiting == 0
        assert isinstance(PoolTimeoutError("x"), TimeoutError)
        await pool.release(held)
        assert await pool.acquire(timeout=0) is held  # the fast path never times out

    async def test_lease_times_out(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        async with pool.lease():
            with pytest.raises(PoolTimeoutError):
                async with pool.lease(timeout=0.5):
                    pass  # pragma: no cover
        assert_invariants(pool)

    async def test_timeout_covers_a_slow_factory(self) -> None:
        async def slow() -> Resource:
            await anyio.sleep(10)
            return Resource(0)  # pragma: no cover

        pool = ResourcePool(1, factory=slow)
        with pytest.raises(PoolTimeoutError):
            await pool.acquire(timeout=1)
        stats = assert_invariants(pool)
        assert stats.size == 0
        assert pool._creating == 0

    async def test_factory_timeout_error_is_not_mistaken_for_ours(self) -> None:
        async def refuses() -> Resource:
            raise TimeoutError("connect timed out")

        pool = ResourcePool(1, factory=refuses)
        with pytest.raises(TimeoutError, match="connect timed out") as info:
            await pool.acquire(timeout=5)
        assert not isinstance(info.value, PoolTimeoutError)
        assert pool.statistics().timeouts == 0

    async def test_waiter_timing_out_at_handoff_passes_the_resource_on(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("r")
        holder = await pool.acquire()
        results: list[object] = []

        async def first() -> None:
            try:
                results.append(await pool.acquire(timeout=1))
            except PoolTimeoutError:
                results.append("timeout")

        async def second() -> None:
            resource = await pool.acquire(timeout=100)
            results.append(resource)

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(1)  # first's deadline arrives...
            await pool.release(holder)  # ...as the resource is handed over
        if results[0] == "timeout":
            assert results == ["timeout", "r"]
        else:  # first got it before its deadline was seen; second then times out or waits
            assert results[0] == "r"
        stats = pool.statistics()
        assert stats.size == 1
        assert stats.leased == 1  # exactly one owner, never both, never neither


class TestClose:
    async def test_close_wakes_every_waiter_with_closed_error(self) -> None:
        factory = Factory()
        pool = ResourcePool(1, factory=factory, dispose=factory.dispose)
        held = await pool.acquire()
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await pool.acquire()
            except PoolClosedError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.aclose()
        assert len(errors) == 3
        assert all(isinstance(error, anyio.ClosedResourceError) for error in errors)
        assert pool.statistics().waiting == 0
        assert held is not None
        assert not held.closed
        await pool.release(held)  # leased at close: disposed when it comes back
        assert held.closed
        stats = assert_invariants(pool)
        assert stats.size == 0

    async def test_close_disposes_idle_and_is_idempotent(self) -> None:
        factory = Factory()
        pool = ResourcePool(3, factory=factory, dispose=factory.dispose)
        resources = [await pool.acquire() for _ in range(3)]
        for resource in resources:
            await pool.release(resource)
        await pool.aclose()
        await pool.aclose()
        assert sorted(r.number for r in factory.disposed) == [0, 1, 2]
        assert "closed" in repr(pool)
        assert pool.closed
        with pytest.raises(PoolClosedError):
            await pool.acquire()
        with pytest.raises(PoolClosedError):
            await pool.try_acquire()
        with pytest.raises(PoolClosedError):
            async with pool.lease():
                pass  # pragma: no cover
        extra = Resource(99)
        await pool.release(extra)  # added to a closed pool: disposed
        assert extra.closed

    async def test_async_with_closes_on_exit(self) -> None:
        factory = Factory()
        pool = ResourcePool(2, factory=factory, dispose=factory.dispose)
        async with pool, pool.lease():
            pass
        assert pool.closed
        assert all(resource.closed for resource in factory.made)
        with pytest.raises(PoolClosedError):
            async with pool:
                pass  # pragma: no cover

    async def test_close_while_factory_runs_disposes_the_new_resource(self) -> None:
        factory = Factory(checkpoints=5)
        pool = ResourcePool(1, factory=factory, dispose=factory.dispose)

        async def acquire() -> None:
            with pytest.raises(PoolClosedError):
                await pool.acquire()

        async with anyio.create_task_group() as tg:
            tg.start_soon(acquire)
            await anyio.lowlevel.checkpoint()
            await pool.aclose()
        assert [r.closed for r in factory.made] == [True] * len(factory.made)
        assert assert_invariants(pool).size == 0


class TestFactoryFailure:
    async def test_failure_reaches_the_caller_and_frees_the_slot(self) -> None:
        factory = Factory(fail=lambda call: call == 1)
        pool = ResourcePool(1, factory=factory)
        with pytest.raises(ConnectionError, match="call 1"):
            await pool.acquire()
        stats = assert_invariants(pool)
        assert stats.size == 0
        assert await pool.acquire() is factory.made[0]

    async def test_failure_does_not_strand_other_waiters(self) -> None:
        factory = Factory(checkpoints=2, fail=lambda call: call % 2 == 1)
        pool = ResourcePool(2, factory=factory)
        outcomes: list[str] = []

        async def user() -> None:
            try:
                async with pool.lease():
                    await anyio.sleep(1)
                outcomes.append("ok")
            except ConnectionError:
                outcomes.append("failed")

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(user)
        assert len(outcomes) == 10
        assert "ok" in outcomes
        assert "failed" in outcomes
        stats = assert_invariants(pool)
        assert stats.waiting == 0
        assert stats.leased == 0

    async def test_cancelled_factory_frees_its_slot(self) -> None:
        async def hangs() -> Resource:
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

        pool = ResourcePool(1, factory=hangs)
        with anyio.move_on_after(1) as scope:
            await pool.acquire()
        assert scope.cancelled_caught
        assert pool._creating == 0
        assert pool._limiter is not None
        assert pool._limiter.borrowed_tokens == 0
        assert_invariants(pool)


class TestHooks:
    async def test_check_failure_disposes_and_takes_the_next(self) -> None:
        factory = Factory()
        pool = ResourcePool(
            3, factory=factory, check=lambda r: not r.broken, dispose=factory.dispose
        )
        a, b = await pool.acquire(), await pool.acquire()
        assert a is not None
        assert b is not None
        await pool.release(a)
        await pool.release(b)
        b.broken = True  # b is on top of the idle stack
        assert await pool.acquire() is a
        assert b.closed
        assert_invariants(pool)

    async def test_check_raising_or_async_false_creates_a_new_one(self) -> None:
        factory = Factory()

        async def check(resource: Resource) -> bool:
            await anyio.lowlevel.checkpoint()
            if resource.number == 0:
                raise OSError("ping failed")
            return True

        pool = ResourcePool(1, factory=factory, check=check, dispose=factory.dispose)
        first = await pool.acquire()
        assert first is not None
        await pool.release(first)
        second = await pool.acquire()
        assert second is not None
        assert second.number == 1
        assert first.closed
        assert_invariants(pool)

    async def test_check_without_factory_falls_back_to_none_when_all_fail(self) -> None:
        pool: ResourcePool[str] = ResourcePool(2, check=lambda r: False)
        await pool.release("x")
        await pool.release("y")
        assert await pool.acquire() is None
        stats = assert_invariants(pool)
        assert stats.size == 0
        assert stats.disposed == 2

    async def test_reset_runs_on_return_and_raising_disposes(self) -> None:
        factory = Factory()
        resets: list[int] = []

        async def reset(resource: Resource) -> None:
            await anyio.lowlevel.checkpoint()
            resets.append(resource.number)
            if resource.broken:
                raise RuntimeError("cannot reset")

        pool = ResourcePool(2, factory=factory, reset=reset, dispose=factory.dispose)
        async with pool.lease() as resource:
            pass
        assert resets == [0]
        assert pool.statistics().idle == 1
        async with pool.lease() as resource:
            resource.broken = True
        assert resource.closed
        assert assert_invariants(pool).size == 0

    async def test_dispose_errors_are_logged_not_raised(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        def dispose(resource: object) -> None:
            raise RuntimeError("close failed")

        pool = ResourcePool(1, factory=Factory(), dispose=dispose)
        resource = await pool.acquire()
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            await pool.discard(resource)
        assert "close failed" in caplog.text
        assert assert_invariants(pool).disposed == 1
        assert await pool.acquire() is not None  # still usable

    async def test_discard_frees_the_slot_and_lease_does_not_give_back(self) -> None:
        factory = Factory()
        pool = ResourcePool(1, factory=factory, dispose=factory.dispose)
        async with pool.lease() as resource:
            await pool.discard(resource)
            assert resource.closed
        stats = assert_invariants(pool)
        assert (stats.size, stats.disposed) == (0, 1)
        async with pool.lease() as fresh:
            assert fresh is not resource
        with pytest.raises(ValueError, match="not leased"):
            await pool.discard(fresh)
        await pool.aclose()

    async def test_discard_the_last_resource_of_a_pool_without_factory(self) -> None:
        pool: ResourcePool[str] = ResourcePool(2)
        await pool.release("only")
        held = await pool.acquire()
        assert held == "only"
        answers: list[object] = []

        async def waiter() -> None:
            answers.append(await pool.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.discard(held)  # now waiting could never end
        assert answers == [None, None]
        assert assert_invariants(pool).size == 0


class TestUpkeep:
    async def test_prefill_to_min_idle(self) -> None:
        factory = Factory(checkpoints=1)
        async with ResourcePool(5, factory=factory, min_idle=3) as pool:
            await anyio.sleep(0.1)
            assert pool.statistics().idle == 3
            async with pool.lease():
                await anyio.sleep(0.1)
                stats = pool.statistics()
                assert (stats.idle, stats.leased) == (3, 1)

    async def test_prefill_retries_a_failing_factory_with_backoff(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        factory = Factory(fail=lambda call: 2 <= call <= 4)
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with ResourcePool(2, factory=factory, min_idle=1) as pool:
                assert pool.statistics().idle == 1  # entering waited for the first fill
                held = await pool.acquire()  # upkeep refills, and the factory fails 3 times
                await anyio.sleep(0.05)
                assert pool.statistics().idle == 0
                await anyio.sleep(2)
                assert pool.statistics().idle == 1
                await pool.release(held)
        assert factory.calls == 5
        assert caplog.text.count("prefill failed") == 3

    async def test_idle_resources_are_reaped_but_not_below_min_idle(self) -> None:
        factory = Factory()
        async with ResourcePool(
            4, factory=factory, dispose=factory.dispose, min_idle=1, max_idle_time=10
        ) as pool:
            resources = [await pool.acquire() for _ in range(4)]
            for resource in resources:
                await pool.release(resource)
            await anyio.sleep(9)
            assert pool.statistics().idle == 4
            await anyio.sleep(2)
            stats = assert_invariants(pool)
            assert stats.idle == 1
            assert stats.disposed == 3

    async def test_max_lifetime_retires_idle_and_returning_resources(self) -> None:
        factory = Factory()
        async with ResourcePool(
            2, factory=factory, dispose=factory.dispose, max_lifetime=100
        ) as pool:
            idle = await pool.acquire()
            held = await pool.acquire()
            assert idle is not None
            assert held is not None
            await pool.release(idle)
            await anyio.sleep(89)
            assert not idle.closed  # jitter takes at most 10%
            await anyio.sleep(11.5)
            assert idle.closed
            assert not held.closed
            await pool.release(held)  # too old: retired on return
            assert held.closed
            assert_invariants(pool)

    async def test_leak_threshold_warns_where_the_lease_was_taken(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger="darwin_metrics"):
            pool = ResourcePool(1, factory=Factory(), leak_threshold=5)
            async with pool, pool.lease():
                await anyio.sleep(4.9)
                assert "held for" not in caplog.text
                await anyio.sleep(0.2)
                assert "held for" in caplog.text
        assert "test_pool.py" in caplog.text
        assert caplog.text.count("held for") == 1

    async def test_leak_warning_on_return_without_upkeep(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        pool = ResourcePool(1, factory=Factory(), leak_threshold=1)
        with caplog.at_level(logging.WARNING, logger="darwin_metrics"):
            async with pool.lease():
                await anyio.sleep(2)
        assert "held for" in caplog.text


class TestCancellation:
    async def test_cancelled_before_the_fast_path_checkpoint_takes_nothing(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("r")
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire()
            raise AssertionError("acquire must be a checkpoint")  # pragma: no cover
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased) == (1, 0)
        assert pool._limiter is not None
        assert pool._limiter.borrowed_tokens == 0

    @pytest.mark.parametrize("entry", ["acquire", "lease", "try_acquire"])
    async def test_cancellation_at_every_await_point(self, entry: str) -> None:
        """Cancel after k checkpoints, for every k, and check nothing is lost."""
        for delay in range(12):
            factory = Factory(checkpoints=3)
            pool = ResourcePool(
                2,
                factory=factory,
                dispose=factory.dispose,
                check=_async_true,
                reset=_async_none,
            )
            owned: list[Resource] = []

            async def body(pool: ResourcePool[Resource] = pool, owned: list[Any] = owned) -> None:
                if entry == "acquire":
                    resource = await pool.acquire()
                    owned.append(resource)
                elif entry == "try_acquire":
                    resource = await pool.try_acquire()
                    owned.append(resource)
                else:
                    async with pool.lease() as resource:
                        owned.append(resource)
                        await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(body)
                for _ in range(delay):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            stats = assert_invariants(pool)
            if entry == "lease":
                assert stats.leased == 0
            else:
                assert stats.leased == len(owned), (delay, stats, owned)
            if entry != "lease":  # a lease gave its resource back by itself
                for resource in owned:
                    await pool.release(resource)
            assert assert_invariants(pool).leased == 0
            await pool.aclose()

    async def test_waiter_cancelled_at_handoff_passes_it_on(self) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("r")
        holder = await pool.acquire()
        got: list[str] = []

        async def second() -> None:
            async with pool.lease() as resource:
                got.append(resource)

        first_scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_lease_in, pool, first_scope, got)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            await pool.release(holder)  # handed to the first waiter...
            first_scope.cancel()  # ...which is cancelled before it runs
        # Either the first waiter had it (and gave it back) or the second got it; both end.
        assert "r" in got
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased, stats.waiting) == (1, 0, 0)

    async def test_give_back_completes_when_the_task_is_cancelled(self) -> None:
        resets: list[Resource] = []

        async def slow_reset(resource: Resource) -> None:
            await anyio.sleep(5)
            resets.append(resource)

        pool = ResourcePool(1, factory=Factory(), reset=slow_reset)
        with anyio.move_on_after(1):
            async with pool.lease():
                await anyio.sleep_forever()
        assert len(resets) == 1
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased) == (1, 0)

    async def test_release_and_discard_complete_in_a_cancelled_task(self) -> None:
        factory = Factory()

        async def dispose(resource: Resource) -> None:
            await anyio.sleep(1)
            factory.dispose(resource)

        pool = ResourcePool(2, factory=factory, dispose=dispose)
        a, b = await pool.acquire(), await pool.acquire()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.release(a)
            await pool.discard(b)
        assert b is not None
        assert b.closed
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased, stats.size) == (1, 0, 1)
        await pool.aclose()


async def _lease_in(pool: ResourcePool[str], scope: anyio.CancelScope, got: list[str]) -> None:
    with scope:
        async with pool.lease() as resource:
            got.append(resource)


async def _async_true(resource: object) -> bool:
    await anyio.lowlevel.checkpoint()
    return True


async def _async_none(resource: object) -> None:
    await anyio.lowlevel.checkpoint()


class TestResize:
    async def test_growing_wakes_waiters(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        held = await pool.acquire()
        got: list[object] = []

        async def waiter() -> None:
            got.append(await pool.acquire())

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.resize(3)
        assert len(got) == 2
        assert held not in got
        stats = assert_invariants(pool)
        assert (stats.max_size, stats.leased) == (3, 3)

    async def test_shrinking_disposes_idle_now_and_leased_on_return(self) -> None:
        factory = Factory()
        pool = ResourcePool(4, factory=factory, dispose=factory.dispose)
        leased = [await pool.acquire() for _ in range(4)]
        await pool.release(leased[0])
        await pool.release(leased[1])
        await pool.resize(1)
        assert pool.statistics().idle == 0
        assert len(factory.disposed) == 2
        await pool.release(leased[2])
        assert len(factory.disposed) == 3
        await pool.release(leased[3])
        stats = assert_invariants(pool)
        assert (stats.size, stats.idle, stats.max_size) == (1, 1, 1)
        await pool.aclose()

    async def test_resize_under_contention_never_over_grants(self) -> None:
        sizes = (1, 5, 2, 4, 1, 3)
        pool = ResourcePool(3, factory=Factory(checkpoints=1))
        peak = 0

        async def worker() -> None:
            nonlocal peak
            for _ in range(20):
                async with pool.lease():
                    stats = pool.statistics()
                    # Surplus from a larger max_size drains as it comes back, so the bound
                    # at any moment is the largest max_size so far.
                    assert stats.size <= max(sizes)
                    peak = max(peak, stats.leased)
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(worker)
            for size in sizes:
                await anyio.lowlevel.checkpoint()
                await pool.resize(size)
        stats = assert_invariants(pool)
        assert stats.size <= 3
        assert stats.acquired == 200
        assert peak <= max(sizes)

    async def test_retain_disposes_idle_resources_failing_the_predicate(self) -> None:
        factory = Factory()
        pool = ResourcePool(4, factory=factory, dispose=factory.dispose)
        resources = [await pool.acquire() for _ in range(4)]
        for resource in resources[:3]:
            await pool.release(resource)
        removed = await pool.retain(lambda r: r.number % 2 == 0)
        assert removed == 1
        assert [r.number for r in factory.disposed] == [1]
        assert assert_invariants(pool).size == 3
        await pool.aclose()


class TestStatisticsAndRepr:
    async def test_statistics_and_repr(self) -> None:
        pool = ResourcePool(3, factory=Factory())
        assert "0/3 leased, 0 idle, 0 waiting" in repr(pool)
        a = await pool.acquire()
        await pool.acquire()
        await pool.release(a)
        stats = pool.statistics()
        assert isinstance(stats, PoolStatistics)
        assert (stats.max_size, stats.min_idle, stats.size, stats.idle, stats.leased) == (
            3,
            0,
            2,
            1,
            1,
        )
        assert (stats.waiting, stats.created, stats.disposed, stats.acquired) == (0, 2, 0, 2)
        assert (stats.timeouts, stats.total_wait, stats.longest_wait) == (0, 0.0, 0.0)
        assert (stats.acquired_at_once, stats.acquired_after_wait, stats.waits_abandoned) == (
            2,
            0,
            0,
        )
        assert stats.factory_errors == 0
        assert (stats.use_time.count, stats.create_time.count, stats.wait_time.count) == (1, 2, 0)
        assert repr(pool).startswith("<darwin_metrics.ResourcePool at 0x")
        assert "1/3 leased, 1 idle, 0 waiting>" in repr(pool)
        with pytest.raises(AttributeError):
            stats.size = 5  # type: ignore[misc]

    async def test_wait_time_statistics(self) -> None:
        pool = ResourcePool(1, factory=Factory())
        held = await pool.acquire()

        async def waiter() -> None:
            async with pool.lease():
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert "1 waiting" in repr(pool)
            await anyio.sleep(3)
            await pool.release(held)
        stats = pool.statistics()
        assert stats.total_wait == pytest.approx(3)
        assert stats.longest_wait == pytest.approx(3)

    async def test_watchers_see_every_lease_change(self) -> None:
        pool = ResourcePool(2, factory=Factory())
        seen: list[int] = []
        unwatch = pool._watch(lambda: seen.append(pool.statistics().leased))
        async with pool.lease(), pool.lease():
            pass
        await pool.resize(3)
        unwatch()
        async with pool.lease():
            pass
        assert seen == [1, 2, 1, 0, 0]


def _bad_constructor_cases() -> list[tuple[dict[str, Any], type[Exception], str]]:
    return [
        ({"max_size": 0}, ValueError, "max_size"),
        ({"max_size": -1}, ValueError, "max_size"),
        ({"max_size": 2.0}, TypeError, "max_size"),
        ({"max_size": True}, TypeError, "max_size"),
        ({"max_size": "3"}, TypeError, "max_size"),
        ({"max_size": 2, "min_idle": 3, "factory": int}, ValueError, "min_idle"),
        ({"max_size": 2, "min_idle": -1}, ValueError, "min_idle"),
        ({"max_size": 2, "min_idle": 1}, ValueError, "factory"),
        ({"max_size": 2, "factory": 3}, TypeError, "factory"),
        ({"max_size": 2, "check": "yes"}, TypeError, "check"),
        ({"max_size": 2, "reset": 1}, TypeError, "reset"),
        ({"max_size": 2, "dispose": object()}, TypeError, "dispose"),
        ({"max_size": 2, "max_idle_time": -1}, ValueError, "max_idle_time"),
        ({"max_size": 2, "max_idle_time": math.inf}, ValueError, "max_idle_time"),
        ({"max_size": 2, "max_idle_time": math.nan}, ValueError, "max_idle_time"),
        ({"max_size": 2, "max_idle_time": "1"}, TypeError, "max_idle_time"),
        ({"max_size": 2, "max_lifetime": 0}, ValueError, "max_lifetime"),
        ({"max_size": 2, "max_lifetime": True}, TypeError, "max_lifetime"),
        ({"max_size": 2, "leak_threshold": -0.5}, ValueError, "leak_threshold"),
    ]


class TestBadInput:
    @pytest.mark.parametrize(("kwargs", "error", "name"), _bad_constructor_cases())
    def test_constructor(self, kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
        with pytest.raises(error, match=name):
            ResourcePool(**kwargs)

    @pytest.mark.parametrize(
        ("timeout", "error"),
        [(-1, ValueError), (math.inf, ValueError), (math.nan, ValueError), ("1", TypeError)],
    )
    async def test_timeouts(self, timeout: Any, error: type[Exception]) -> None:
        pool: ResourcePool[str] = ResourcePool(1)
        await pool.release("r")
        with pytest.raises(error, match="timeout"):
            await pool.acquire(timeout=timeout)
        with pytest.raises(error, match="timeout"):
            pool.lease(timeout=timeout)
        assert await pool.acquire() == "r"  # nothing was lost

    async def test_resize_and_retain(self) -> None:
        pool = ResourcePool(3, factory=int, min_idle=2)
        with pytest.raises(ValueError, match="max_size"):
            await pool.resize(0)
        with pytest.raises(TypeError, match="max_size"):
            await pool.resize(1.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="min_idle"):
            await pool.resize(1)
        assert pool.max_size == 3
        with pytest.raises(TypeError, match="predicate"):
            await pool.retain(None)  # type: ignore[arg-type]


class TestRegressions:
    """Bugs found by review and by the storms, kept as tests."""

    async def test_a_single_idle_resource_is_reaped(self) -> None:
        factory = Factory()
        async with ResourcePool(
            2, factory=factory, dispose=factory.dispose, max_idle_time=10
        ) as pool:
            await anyio.sleep(1)  # upkeep sleeps with nothing due
            resource = await pool.acquire()
            assert resource is not None
            await pool.release(resource)
            await anyio.sleep(100)
            assert resource.closed

    async def test_upkeep_does_not_spin_while_prefill_cannot_progress(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from darwin_metrics._pool import _upkeep

        iterations = 0
        collect = _upkeep.collect_expired

        def counting(pool: ResourcePool[Any]) -> list[Any]:
            nonlocal iterations
            iterations += 1
            return collect(pool)

        monkeypatch.setattr(_upkeep, "collect_expired", counting)
        async with ResourcePool(1, factory=Factory(), min_idle=1) as pool:
            async with pool.lease():
                for _ in range(200):
                    await anyio.lowlevel.checkpoint()
                await anyio.sleep(1)
            assert iterations < 10

    async def test_acquire_does_not_spin_while_prefill_creates(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        gate = anyio.Event()
        calls = 0

        async def factory() -> Resource:
            nonlocal calls
            calls += 1
            if calls == 2:  # the refill after the first fill
                await gate.wait()
            return Resource(calls)

        waits = 0
        original = ResourcePool._park

        async def counting(pool: ResourcePool[Any], lease: Any, front: bool) -> None:
            nonlocal waits
            waits += 1
            await original(pool, lease, front)

        monkeypatch.setattr(ResourcePool, "_park", counting)
        async with ResourcePool(2, factory=factory, min_idle=1) as pool:
            first = await pool.acquire()  # the first fill's; upkeep refills...
            await anyio.lowlevel.checkpoint()  # ...and is now blocked in the factory
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.acquire)
                for _ in range(200):
                    await anyio.lowlevel.checkpoint()
                gate.set()
            assert waits <= 1
            assert calls == 2  # the waiter got the prefilled resource
            await pool.release(first)

    async def test_close_during_an_async_check_raises_closed(self) -> None:
        started, go = anyio.Event(), anyio.Event()

        async def check(resource: object) -> bool:
            started.set()
            await go.wait()
            return True

        pool: ResourcePool[str] = ResourcePool(1, check=check)
        await pool.release("r")
        got: list[object] = []

        async def taker() -> None:
            try:
                got.append(await pool.acquire())
            except PoolClosedError as exc:
                got.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(taker)
            await started.wait()
            await pool.aclose()
            go.set()
        assert isinstance(got[0], PoolClosedError)
        assert assert_invariants(pool).size == 0

    async def test_double_release_during_an_async_reset_is_an_error(self) -> None:
        pool = ResourcePool(3, factory=Factory(), reset=_async_none)
        resource = await pool.acquire()
        errors: list[BaseException] = []

        async def release() -> None:
            try:
                await pool.release(resource)
            except ValueError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(release)
            tg.start_soon(release)
        assert len(errors) == 1
        stats = assert_invariants(pool)
        assert (stats.size, stats.idle) == (1, 1)
        a, b = await pool.acquire(), await pool.acquire()
        assert a is not b

    async def test_leak_due_time_survives_float_rounding(self) -> None:
        with anyio.fail_after(30):  # a spinning upkeep never lets virtual time move
            async with ResourcePool(1, factory=Factory(), leak_threshold=0.7) as pool:
                await anyio.sleep(0.2)
                async with pool.lease():
                    await anyio.sleep(1)

    async def test_idle_due_time_survives_float_rounding(self) -> None:
        with anyio.fail_after(30):
            async with ResourcePool[str](1, max_idle_time=0.1) as pool:
                await anyio.sleep(0.7)
                await pool.release("r")
                await anyio.sleep(1)
                assert pool.statistics().size == 0

    async def test_factory_returning_an_owned_object_leaks_no_slot(self) -> None:
        one = Resource(0)
        pool = ResourcePool(2, factory=lambda: one)
        assert await pool.acquire() is one
        with pytest.raises(RuntimeError, match="already owns"):
            await pool.acquire()
        stats = assert_invariants(pool)
        assert (stats.size, stats.leased) == (1, 1)
        assert pool._limiter is not None
        assert pool._limiter.borrowed_tokens == 1

    async def test_a_block_raising_comes_out_unwrapped(self) -> None:
        with pytest.raises(KeyError, match="mine"):
            async with ResourcePool(1, factory=Factory()):
                raise KeyError("mine")
