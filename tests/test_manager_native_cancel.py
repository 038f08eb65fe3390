"""Subscriptions under asyncio's own cancellation: no event is ever lost.

A subscriber waiting for an event used to be *handed* it by the tracking call; a native
``task.cancel()`` (``asyncio.wait_for``) that landed before the subscriber resumed dropped the
event with ``missed == 0``. Waiting now takes nothing, so ``received + missed == tracked``
holds exactly, and the ``"wait"`` policy stays lossless.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from _native import anyio_backend, cancel_after_steps

from darwin_metrics.resource import ResourceManager, ResourceUsage, Subscription

__all__ = ["anyio_backend"]  # the fixture, imported for this module

pytestmark = pytest.mark.anyio

EVENTS = 2000


async def track_at_random(manager: ResourceManager, count: int, seed: int) -> None:
    rng = random.Random(seed)
    for number in range(count):
        if rng.random() < 0.5:
            await asyncio.sleep(rng.choice((0, 0.0005, 0.001, 0.002)))
        await manager.track_resource_usage("cpu", number)


async def poll_with_wait_for(
    subscription: Subscription,
    batch: bool,
    received: list[ResourceUsage],
    until: asyncio.Task[None],
) -> int:
    """The loop from the issue: ``await asyncio.wait_for(anext(subscription), 0.001)``."""
    timeouts = 0

    async def once() -> None:
        nonlocal timeouts
        try:
            if batch:
                received.extend(await asyncio.wait_for(subscription.next_batch(), 0.001))
            else:
                received.append(await asyncio.wait_for(anext(subscription), 0.001))
        except TimeoutError:
            timeouts += 1

    while not until.done() or subscription.buffered:
        await once()
    return timeouts


@pytest.mark.parametrize("batch", [False, True], ids=["anext", "next_batch"])
@pytest.mark.parametrize("overflow", ["drop_oldest", "wait"])
async def test_wait_for_polling_loses_nothing(overflow: str, batch: bool) -> None:
    manager = ResourceManager()
    subscription = manager.subscribe(buffer_size=8, overflow=overflow)  # type: ignore[arg-type]
    received: list[ResourceUsage] = []
    tracker = asyncio.ensure_future(track_at_random(manager, EVENTS, seed=7))
    timeouts = await poll_with_wait_for(subscription, batch, received, tracker)
    await tracker
    numbers = [int(usage.usage_percent) for usage in received]
    assert timeouts > 50  # the cancellations really landed, many times
    assert len(received) + subscription.missed == EVENTS
    assert numbers == sorted(numbers)  # in order, and none twice
    assert len(set(numbers)) == len(numbers)
    if overflow == "wait":
        assert subscription.missed == 0
        assert numbers == list(range(EVENTS))


@pytest.mark.parametrize("batch", [False, True], ids=["anext", "next_batch"])
@pytest.mark.parametrize(
    ("overflow", "buffer_size"), [("drop_oldest", 4), ("wait", 4), ("wait", 0)]
)
async def test_cancelled_in_the_step_that_tracks_the_event_it_waits_for(
    overflow: str, buffer_size: int, batch: bool
) -> None:
    """The race itself: the event is tracked, then the waiting task is cancelled natively in
    the same step, before it could resume. It must stay for the next read."""
    manager = ResourceManager()
    subscription = manager.subscribe(buffer_size=buffer_size, overflow=overflow)  # type: ignore[arg-type]

    async def wait_for_one() -> object:
        return await (subscription.next_batch() if batch else anext(subscription))

    for number in range(3):
        waiter = asyncio.ensure_future(wait_for_one())
        await asyncio.sleep(0)  # it waits now
        await manager.track_resource_usage("cpu", number)
        waiter.cancel()  # in the same step: it has not resumed yet
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert waiter.cancelled()
        [usage] = subscription.drain()  # not lost: still there to be read
        assert usage.usage_percent == number
    assert subscription.missed == 0


async def test_cancelled_at_every_step_of_a_wait_for_an_event() -> None:
    """task.cancel() after k loop iterations of a subscriber that is woken by a tracker."""
    for steps in range(12):
        manager = ResourceManager()
        subscription = manager.subscribe(buffer_size=4)

        async def take_one(subscription: Subscription = subscription) -> None:
            await anext(subscription)

        async def track(manager: ResourceManager = manager) -> None:
            await asyncio.sleep(0)
            await manager.track_resource_usage("cpu", 1)

        tracker = asyncio.ensure_future(track())
        finished = await cancel_after_steps(take_one, steps)
        await tracker
        # Taken, or still buffered for the next read: never gone.
        assert subscription.buffered == (0 if finished else 1), steps
        assert subscription.missed == 0


@pytest.mark.parametrize("buffer_size", [0, 1])
async def test_tracking_cancelled_natively_never_delivers_twice_or_out_of_order(
    buffer_size: int,
) -> None:
    manager = ResourceManager()
    subscription = manager.subscribe(buffer_size=buffer_size, overflow="wait")
    returned: list[int] = []
    received: list[ResourceUsage] = []

    async def track(number: int) -> None:
        await manager.track_resource_usage("cpu", number)
        returned.append(number)

    async def consume() -> None:
        rng = random.Random(3)
        while True:
            await asyncio.sleep(rng.choice((0, 0.001, 0.003)))
            received.extend(await subscription.next_batch())

    consumer = asyncio.ensure_future(consume())
    rng = random.Random(5)
    for number in range(400):
        if rng.random() < 0.4:
            await track(number)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(track(number), rng.choice((0.0005, 0.001, 0.002)))
    await asyncio.sleep(1)
    consumer.cancel()
    received.extend(subscription.drain())
    numbers = [int(usage.usage_percent) for usage in received]
    assert numbers == sorted(set(numbers))  # in order, none twice
    assert set(returned) <= set(numbers)  # every call that returned was delivered
    assert manager.usage_statistics()["cpu"].count == 400


async def test_manager_exit_delivers_what_wait_subscribers_accepted() -> None:
    """Item 4: a tracking call that returned normally has its event received."""
    returned: list[int] = []
    outer = asyncio.get_running_loop()
    assert outer is not None
    async with ResourceManager() as manager:
        subscription = manager.subscribe(buffer_size=2, overflow="wait")

        async def track(number: int) -> None:
            await manager.track_resource_usage("cpu", number)
            returned.append(number)

        trackers = [asyncio.ensure_future(track(number)) for number in range(6)]
        await asyncio.sleep(0.01)
        assert returned == [0, 1]  # the others wait for room
    await asyncio.gather(*trackers)
    assert returned == [0, 1, 2, 3, 4, 5]  # the exit released them normally...
    got = [int(usage.usage_percent) async for usage in subscription]
    assert got == [0, 1, 2, 3, 4, 5]  # ...and every one of their events can be read
