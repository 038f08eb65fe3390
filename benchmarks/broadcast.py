"""Broadcast rows: ``track_resource_usage`` to 1, 10 and 100 subscribers, and one slow one.

The anchor is the raw fan-out a user would write: one memory object stream per subscriber
(buffer 100), one ``send_nowait`` per stream per event (dropping the oldest buffered event when
a buffer is full, as ours does), and one checkpoint per event. Its receivers drain with
``receive_nowait()``, awaiting ``receive()`` only when nothing is buffered.

Ours: a ``ResourceManager`` with N ``subscribe(buffer_size=100, overflow="drop_oldest")``
subscriptions, consumed the same way with ``next_batch()`` (which takes what is buffered and
awaits only when nothing is). One extra row consumes ours with ``async for``.

Both report events delivered per second (events x subscribers that received them). In the slow
variant one subscriber sleeps 100 µs per event; the figure is the other subscribers'.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
from anyio import WouldBlock
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from darwin_metrics.resource import ResourceManager, Subscription

from ._harness import Config, Goal, Row, ainterleave, compare

BUFFER = 100
SLOW_SLEEP = 0.0001

Event = tuple[str, float, float]


class _RawSubscriber:
    __slots__ = ("missed", "receive", "receive_stream", "send", "send_stream")

    def __init__(self) -> None:
        send_stream, receive_stream = anyio.create_memory_object_stream[Event](BUFFER)
        self.send_stream: MemoryObjectSendStream[Event] = send_stream
        self.receive_stream: MemoryObjectReceiveStream[Event] = receive_stream
        self.send = send_stream.send_nowait
        self.receive = receive_stream.receive_nowait
        self.missed = 0

    def close(self) -> None:
        self.send_stream.close()
        self.receive_stream.close()


async def _consume_raw(subscriber: _RawSubscriber, events: int, got: list[int]) -> None:
    receive = subscriber.receive
    receive_stream = subscriber.receive_stream
    count = 0
    while count + subscriber.missed < events:
        try:
            receive()
        except WouldBlock:
            await receive_stream.receive()
        count += 1
    got.append(count)


async def _consume_raw_slowly(subscriber: _RawSubscriber) -> None:
    async for _ in subscriber.receive_stream:
        await anyio.sleep(SLOW_SLEEP)


async def _consume_ours(subscription: Subscription, events: int, got: list[int]) -> None:
    count = 0
    while count + subscription.missed < events:
        batch = await subscription.next_batch()
        if not batch:
            break  # ended (never here: nothing ends it early)
        count += len(batch)
    got.append(count)


async def _consume_ours_iterating(subscription: Subscription, events: int, got: list[int]) -> None:
    count = 0
    if events:
        async for _ in subscription:
            count += 1
            if count + subscription.missed >= events:
                break
    got.append(count)


async def _consume_ours_slowly(subscription: Subscription) -> None:
    async for _ in subscription:
        await anyio.sleep(SLOW_SLEEP)


async def _run(
    start_consumers: Callable[[TaskGroup, list[int]], None],
    start_slow: Callable[[TaskGroup], None] | None,
    publish: Callable[[], Awaitable[None]],
    events: int,
) -> float:
    """Time ``events`` publications until every fast consumer has them; deliveries per second."""
    got: list[int] = []
    async with anyio.create_task_group() as outer:
        if start_slow is not None:
            start_slow(outer)
        async with anyio.create_task_group() as fast:
            start_consumers(fast, got)
            # Let every consumer start and park in its first receive. (Not
            # anyio.wait_all_tasks_blocked(): on asyncio it polls every 0.1 s.)
            for _ in range(3):
                await checkpoint()
            start = time.perf_counter()
            for _ in range(events):
                await publish()
        elapsed = time.perf_counter() - start
        outer.cancel_scope.cancel()
    return sum(got) / elapsed


async def _raw(subscribers: int, events: int, slow: bool) -> float:
    subs = [_RawSubscriber() for _ in range(subscribers)]
    fast_subs = subs[1:] if slow else subs

    def start_consumers(task_group: TaskGroup, got: list[int]) -> None:
        for sub in fast_subs:
            task_group.start_soon(_consume_raw, sub, events, got)

    def start_slow(task_group: TaskGroup) -> None:
        task_group.start_soon(_consume_raw_slowly, subs[0])

    async def publish() -> None:
        event = ("cpu", 50.0, anyio.current_time())
        for sub in subs:
            try:
                sub.send(event)
            except WouldBlock:  # noqa: PERF203 (the fan-out a user would write)
                sub.receive()  # drop the oldest
                sub.missed += 1
                sub.send(event)
        await checkpoint()

    try:
        return await _run(start_consumers, start_slow if slow else None, publish, events)
    finally:
        for sub in subs:
            sub.close()


async def _ours(subscribers: int, events: int, slow: bool, iterate: bool = False) -> float:
    manager = ResourceManager()
    subs = [manager.subscribe(buffer_size=BUFFER) for _ in range(subscribers)]
    fast_subs = subs[1:] if slow else subs
    consume = _consume_ours_iterating if iterate else _consume_ours

    def start_consumers(task_group: TaskGroup, got: list[int]) -> None:
        for sub in fast_subs:
            task_group.start_soon(consume, sub, events, got)

    def start_slow(task_group: TaskGroup) -> None:
        task_group.start_soon(_consume_ours_slowly, subs[0])

    track = manager.track_resource_usage

    async def publish() -> None:
        await track("cpu", 50.0)

    try:
        return await _run(start_consumers, start_slow if slow else None, publish, events)
    finally:
        for sub in subs:
            sub.close()


async def rows(config: Config, backend: str) -> list[Row]:
    out: list[Row] = []
    cases: list[tuple[int, bool, bool]] = [
        (1, False, False),
        (10, False, False),
        (100, False, False),
        (100, False, True),
        (10, True, False),
        (100, True, False),
    ]
    for subscribers, slow, iterate in cases:
        events = max(config.deliveries // subscribers, 40)

        async def ours(
            n: int = subscribers, e: int = events, s: bool = slow, i: bool = iterate
        ) -> float:
            return await _ours(n, e, s, i)

        async def raw(n: int = subscribers, e: int = events, s: bool = slow) -> float:
            return await _raw(n, e, s)

        mine, theirs = await ainterleave([ours, raw], config.broadcast_repeats, warmup=False)
        name = f"track_resource_usage, {subscribers} subscriber{'s' if subscribers > 1 else ''}"
        if slow:
            name += ", one slow"
        if iterate:
            name += ", async for"
        goal = (
            Goal("≥ 0.9x", "ratio", ">=", 0.9)
            if subscribers == 100 and not slow and not iterate
            else None
        )
        out.append(
            compare(
                "broadcast",
                name,
                backend,
                "1/s",
                "raw send_nowait fan-out",
                mine,
                theirs,
                goal=goal,
                note=f"{events} events per sample; deliveries/s"
                + ("; the fast subscribers' deliveries" if slow else ""),
            )
        )
    return out
