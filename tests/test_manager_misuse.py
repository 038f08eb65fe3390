"""ResourceManager misuse fails loudly: no subscription that never ends, no silent deadlock."""

from __future__ import annotations

import sys

import anyio
import pytest

from darwin_metrics.resource import ResourceManager, Subscription

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

pytestmark = pytest.mark.anyio


async def consume(subscription: Subscription, seen: list[float]) -> None:
    async for usage in subscription:
        assert usage.resource_type == "cpu"
        seen.append(usage.usage_percent)


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in leaves(inner)]
    return [group]


class TestSubscribeAfterExit:
    async def test_raises_until_the_manager_is_entered_again(self) -> None:
        manager = ResourceManager()
        manager.subscribe().close()  # before entering: fine, as ever
        async with manager:
            pass
        with pytest.raises(RuntimeError, match="'async with' block has ended"):
            manager.subscribe()
        async with manager:
            subscription = manager.subscribe()
            await manager.track_resource_usage("cpu", 1)
        assert [usage.usage_percent async for usage in subscription] == [1.0]


class TestConsumerInsideTheBlock:
    async def test_the_wrong_nesting_fails_loudly_instead_of_hanging(self) -> None:
        seen: list[float] = []
        start = anyio.current_time()

        async def wrong() -> None:
            async with ResourceManager() as manager, anyio.create_task_group() as tg:
                tg.start_soon(consume, manager.subscribe(), seen)
                await anyio.wait_all_tasks_blocked()
                await manager.track_resource_usage("cpu", 5)
                # leaving the task group waits for the consumer: it would wait for ever

        with pytest.raises(ExceptionGroup) as info:
            await wrong()
        [error] = leaves(info.value)
        assert isinstance(error, RuntimeError)
        assert "outside 'async with manager:'" in str(error)
        assert seen == [5.0]  # it consumed what there was
        assert anyio.current_time() - start < 5  # found within a couple of seconds

    async def test_deeper_nesting_is_found_too(self) -> None:
        async def worker(manager: ResourceManager) -> None:
            async with anyio.create_task_group() as inner:
                inner.start_soon(consume, manager.subscribe(), [])

        async def wrong() -> None:
            async with ResourceManager() as manager, anyio.create_task_group() as tg:
                tg.start_soon(worker, manager)
                tg.start_soon(consume, manager.subscribe(), [])

        with pytest.raises(ExceptionGroup) as info:
            await wrong()
        errors = leaves(info.value)
        assert len(errors) == 2
        assert all(isinstance(error, RuntimeError) for error in errors)

    async def test_the_right_nesting_and_the_ways_out_are_left_alone(self) -> None:
        seen: list[float] = []
        # A consumer outside the block: its loop ends when the manager exits.
        async with anyio.create_task_group() as tg, ResourceManager() as manager:
            tg.start_soon(consume, manager.subscribe(), seen)
            await anyio.wait_all_tasks_blocked()
            await manager.track_resource_usage("cpu", 1)
            await anyio.sleep(5)  # the watchdog looks, and finds nothing wrong
        # A consumer inside, cancelled before the block ends.
        async with ResourceManager() as manager, anyio.create_task_group() as inner:
            inner.start_soon(consume, manager.subscribe(), seen)
            await anyio.sleep(0.5)
            inner.cancel_scope.cancel()
        # A consumer inside whose subscription is closed from outside its group, in time.
        async with ResourceManager() as manager:
            subscription = manager.subscribe()

            async def close_later() -> None:
                await anyio.sleep(0.5)
                subscription.close()

            async with anyio.create_task_group() as inner:
                inner.start_soon(consume, subscription, seen)
                inner.start_soon(close_later)
        assert seen == [1.0]

    async def test_a_consumer_busy_between_events_is_not_a_deadlock(self) -> None:
        seen: list[float] = []
        async with ResourceManager() as manager:
            subscription = manager.subscribe()

            async def track_for_a_while() -> None:
                for number in range(30):
                    await manager.track_resource_usage("cpu", number)
                    await anyio.sleep(0.1)
                subscription.close()

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume, subscription, seen)
                tg.start_soon(track_for_a_while)
        assert seen == [float(number) for number in range(30)]
