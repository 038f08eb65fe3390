"""Subscriptions: one anyio memory object stream per subscriber, and how events reach it.

How delivery works
------------------
Every :class:`Subscription` owns one anyio memory object stream, both ends of it: memory object
streams are queues, not tees, so one stream per subscriber is the broadcast. The manager only
ever calls ``send_nowait`` and the subscriber only ever ``receive_nowait``: nobody parks inside
the stream, because a receiver parked in ``receive()`` is *handed* the item by the sender, and
an asyncio task cancelled natively (``task.cancel()``, ``asyncio.wait_for``) before it resumes
loses that item. Instead a subscriber with nothing to read waits for *readiness* on a
:class:`~darwin_metrics._lowlevel.Parker`, and takes the event synchronously once woken: a
cancellation then leaves the event in the buffer for the next read.

- ``"drop_oldest"``: when the buffer is full, the tracking call takes the oldest buffered event
  out, counts it in ``missed``, and sends again. Tracking never waits for such a subscriber.
- ``"wait"``: when the buffer is full, the event joins the subscription's backlog, a FIFO of
  events reserved for it in tracking order, and the tracking call waits (after every other
  subscriber got the event) until the subscriber, taking events, has moved it into its
  buffer. Reserving synchronously keeps each subscriber's events in tracking order even when
  several tasks track at once; a call that gives up (timeout, cancellation) withdraws its
  event from the backlogs it had not reached. With ``buffer_size=0`` there is room only while
  the subscriber waits for an event, so each event is handed over directly.

When the manager exits, every subscription *ends*: the events still in a ``"wait"``
subscriber's backlog (their tracking calls were accepted) join what it can still read, so
every event whose tracking call returned is either received or counted in ``missed``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import anyio
from anyio import ClosedResourceError, EndOfStream, WouldBlock
from anyio.lowlevel import checkpoint

from .._lowlevel import Parker
from ._deadlock import current_task
from ._usage import ResourceUsage

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from typing_extensions import Self

    from ._manager import ResourceManager

__all__ = ["OverflowPolicy", "Subscription"]

OverflowPolicy = Literal["drop_oldest", "wait"]
"""What tracking does when a subscriber's buffer is full."""


def remove_identical(backlog: deque[ResourceUsage], event: ResourceUsage) -> bool:
    """Remove ``event`` itself (not an equal event) from ``backlog``; whether it was there."""
    if backlog and backlog[0] is event:
        backlog.popleft()
        return True
    for index, queued in enumerate(backlog):
        if queued is event:
            del backlog[index]
            return True
    return False


class _StreamProbe:
    """Tells whether a receive stream has an event to take now, through ``statistics()``."""

    __slots__ = ("_statistics",)

    def __init__(self, stream: MemoryObjectReceiveStream[ResourceUsage]) -> None:
        self._statistics = stream.statistics

    def __bool__(self) -> bool:
        return bool(self._statistics().current_buffer_used)


def _ready_probe(
    stream: MemoryObjectReceiveStream[ResourceUsage],
) -> deque[ResourceUsage] | _StreamProbe:
    """Return an object that is true while ``stream`` has an event to take at once.

    Every subscriber asks this before each event it takes, so it must be cheap: anyio's
    buffer itself (a private attribute, unchanged since anyio 3; the tests check it). Nobody
    ever parks in the stream, so the buffer is all there is. Any other layout falls back to
    ``statistics()``, about ten times slower.
    """
    buffer = getattr(getattr(stream, "_state", None), "buffer", None)
    if isinstance(buffer, deque):
        return buffer
    return _StreamProbe(stream)


class Channel:
    """The manager's side of a subscription: its stream, its policy and its counters.

    The manager holds channels strongly and subscriptions not at all, so a subscription that
    nobody references is collected; its finalizer closes the channel.
    """

    __slots__ = (
        "backlog",
        "buffer_size",
        "deadlock",
        "manager",
        "missed",
        "parker",
        "pending",
        "plain_send",
        "ready",
        "receive_nowait",
        "receive_stream",
        "send_nowait",
        "send_stream",
        "state",
        "turn",
        "wait",
        "waiter_task",
        "waiting",
    )

    def __init__(self, manager: ResourceManager, buffer_size: int, wait: bool) -> None:
        # A rendezvous ("wait" with buffer_size=0) keeps one slot, used only while the
        # subscriber waits for an event.
        send_stream, receive_stream = anyio.create_memory_object_stream[ResourceUsage](
            max(buffer_size, 1)
        )
        self.manager = manager
        self.buffer_size = buffer_size
        self.send_stream: MemoryObjectSendStream[ResourceUsage] = send_stream
        self.receive_stream: MemoryObjectReceiveStream[ResourceUsage] = receive_stream
        self.receive_nowait = receive_stream.receive_nowait
        self.ready = _ready_probe(receive_stream)
        self.wait = wait
        self.missed = 0
        self.state = "open"  # "ended" by the manager's exit, "closed" by the subscriber
        # Events taken from the stream but not handed out yet, and (after the manager's exit)
        # a "wait" subscriber's accepted backlog.
        self.pending: deque[ResourceUsage] = deque()
        # Events reserved for a "wait" subscriber, in tracking order, not yet in its buffer.
        self.backlog: deque[ResourceUsage] = deque()
        self.turn: anyio.Event | None = None  # set when a delivery may proceed
        self.parker: Parker | None = None  # the subscriber, waiting for an event
        self.waiting = False
        self.waiter_task: object = None  # the task that waits (for the deadlock watchdog)
        self.deadlock: str | None = None  # set by the watchdog: the wait can never end
        self.plain_send: Callable[[ResourceUsage], None] = (
            self._send_in_order if wait else send_stream.send_nowait
        )
        # What the fan-out calls; while the subscriber waits, a variant that also wakes it.
        self.send_nowait: Callable[[ResourceUsage], None] = self.plain_send

    # -- the sending side (the manager) ------------------------------------------------------

    def _send_in_order(self, event: ResourceUsage) -> None:
        if self.backlog:  # earlier events wait for room: don't overtake them
            raise WouldBlock
        if self.buffer_size == 0 and not (self.waiting and not self.ready):
            raise WouldBlock  # a rendezvous: only while the subscriber waits
        self.send_stream.send_nowait(event)

    def _send_and_wake(self, event: ResourceUsage) -> None:
        # Installed only while the subscriber waits (wait_ready), and removed with the wake-up
        # below: wake_receiver, inline, as this runs for every event sent to a waiting one.
        self.plain_send(event)
        self.waiting = False
        self.send_nowait = self.plain_send
        parker = self.parker
        assert parker is not None
        parker.wake()

    def wake_receiver(self) -> None:
        if self.waiting:
            self.waiting = False
            self.send_nowait = self.plain_send
            parker = self.parker
            assert parker is not None
            parker.wake()

    def _signal_turn(self) -> None:
        turn = self.turn
        if turn is not None:
            self.turn = None
            turn.set()

    def _has_room(self) -> bool:
        if self.buffer_size == 0:
            return self.waiting and not self.ready
        return self.receive_stream.statistics().current_buffer_used < self.buffer_size

    def _refill(self) -> None:
        """Move backlog events into the buffer while it has room, oldest first (sync).

        The subscriber does this whenever it takes events (or, with ``buffer_size=0``, when
        it starts waiting); the tracking calls waiting for those events then return.
        """
        backlog = self.backlog
        if not backlog or self.state != "open":
            return
        moved = False
        while backlog and self._has_room():
            self.send_stream.send_nowait(backlog.popleft())
            moved = True
        if moved:
            self._signal_turn()

    async def deliver(self, event: ResourceUsage, withdraw: bool = True) -> None:
        """Wait until ``event`` has left the backlog for the subscriber's buffer.

        The subscriber moves backlog events into its buffer as it makes room. Checkpoint:
        yes. On cancellation, ``event`` is withdrawn from the backlog if it is still there
        (nothing is handed over while waiting, so a native cancellation cannot lose it
        half-way); if the subscriber took it just as the cancellation landed, it keeps it.
        With ``withdraw=False`` a cancellation leaves it in the backlog, where the subscriber
        gets it in its turn (a relay whose reading was interrupted: the event was accepted).
        Ends quietly when the subscription ended (the event joined what it can still read)
        or was closed (the subscriber left).
        """
        backlog = self.backlog
        try:
            while self.state == "open" and any(queued is event for queued in backlog):
                turn = self.turn
                if turn is None:
                    turn = self.turn = anyio.Event()
                await turn.wait()
        except BaseException:
            if withdraw:
                remove_identical(backlog, event)
            raise

    def end(self) -> None:
        """The manager exits: the subscriber gets what is buffered, then its loop ends.

        A ``"wait"`` subscriber's backlog (events whose tracking calls were accepted and
        wait for room) joins what it can read, after what is buffered.
        """
        if self.state == "open":
            self.state = "ended"
            if self.backlog:
                self.take_buffered()
                self.pending.extend(self.backlog)
                self.backlog.clear()
        self.send_stream.close()
        self.wake_receiver()
        self._signal_turn()
        self.manager._discard(self)

    def close(self) -> None:
        """Close both ends (idempotent; also the subscription's finalizer)."""
        self.state = "closed"
        self.pending.clear()
        self.backlog.clear()
        self.send_stream.close()
        self.receive_stream.close()
        self.wake_receiver()
        self._signal_turn()
        self.manager._discard(self)

    # -- the receiving side (the subscriber) -------------------------------------------------

    def take_buffered(self) -> None:
        """Move every event that the stream can give at once to pending."""
        ready = self.ready
        receive_nowait = self.receive_nowait
        append = self.pending.append
        try:
            while True:
                while ready:
                    append(receive_nowait())
                if not self.backlog:
                    break
                self._refill()  # the events whose tracking calls wait for room
                if not ready:
                    break
        except (WouldBlock, EndOfStream, ClosedResourceError):
            pass

    def take_one(self) -> bool:
        """Move one event to pending if the stream has one; whether it did."""
        if not self.ready:
            return False
        try:
            self.pending.append(self.receive_nowait())
        except (WouldBlock, EndOfStream, ClosedResourceError):
            return False
        if self.backlog:
            self._refill()
        return True

    async def wait_ready(self) -> None:
        """Wait until an event can be taken or the subscription ended. Takes nothing.

        Checkpoint: yes. Cancellation leaves every event where it is.
        """
        parker = self.parker
        if parker is None:
            parker = self.parker = Parker(self.manager._trio)
        self.waiter_task = current_task(self.manager._trio)
        while not self.ready and not self.pending and self.state == "open":
            self.waiting = True
            if self.backlog:  # a rendezvous: the next event is handed over now
                self._refill()
                if self.ready:
                    self.waiting = False
                    break
            self.send_nowait = self._send_and_wake
            try:
                await parker.park()
            finally:
                if self.waiting:  # not woken: cancelled
                    self.waiting = False
                    self.send_nowait = self.plain_send
            if self.deadlock is not None:
                message, self.deadlock = self.deadlock, None
                raise RuntimeError(message)

    def fail_deadlocked(self, message: str) -> None:
        """The watchdog found that this subscriber's wait can never end: wake it with an error."""
        if self.waiting:
            self.deadlock = message
            self.wake_receiver()


def _loop_scheduler() -> Callable[[Callable[[], object]], object] | None:
    """A thread-safe way to run a callback in the running event loop, if there is one."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            run_sync_soon: Callable[[Callable[[], object]], object] = (
                trio.lowlevel.current_trio_token().run_sync_soon
            )
        except RuntimeError:
            return None
        return run_sync_soon
    return None


def _close_channel(
    channel: Channel,
    thread: int,
    schedule: Callable[[Callable[[], object]], object] | None,
) -> None:
    """Close a channel in its event loop's thread (a Subscription's finalizer)."""
    if schedule is None or threading.get_ident() == thread:
        channel.close()
        return
    try:
        schedule(channel.close)
    except RuntimeError:  # that event loop has finished: nothing else uses the channel
        channel.close()


class Subscription:
    """A subscriber's feed of :class:`ResourceUsage` events, made by ``manager.subscribe()``.

    Iterate over it with ``async for``; the loop ends when the subscription is closed or when
    the manager's ``async with`` block exits. It is a context manager, sync and async, that
    closes it on exit; a subscription that is garbage-collected is closed and removed too.

    A subscriber that fell behind can take everything buffered at once, without a checkpoint
    per event, with :meth:`drain` or :meth:`next_batch`.

    Every event tracked while the subscription is open is either received or counted in
    :attr:`missed`, whatever cancels the subscriber (an anyio scope, trio, or asyncio's own
    ``task.cancel()`` / ``asyncio.wait_for``): waiting for an event never takes one.

    Example::

        with manager.subscribe(buffer_size=10) as subscription:
            async for usage in subscription:
                print(usage.resource_type, usage.usage_percent)
    """

    __slots__ = ("__weakref__", "_channel", "_finalizer")

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        # The finalizer may run in any thread that triggers garbage collection; it closes the
        # channel in the thread of the event loop that subscribed.
        self._finalizer = weakref.finalize(
            self, _close_channel, channel, threading.get_ident(), _loop_scheduler()
        )

    @property
    def missed(self) -> int:
        """Events dropped for this subscriber because its buffer was full (``"drop_oldest"``),
        plus the usages of other processes that the manager's relay could not read.

        ``received + missed`` equals the number of events tracked while it was open, plus
        those other processes published meanwhile (see ``ResourceManager.relay``). A
        ``"wait"`` subscriber loses no event to its buffer; an event that a timed-out or
        cancelled tracking call could not deliver to it is not counted (that call raised).
        """
        return self._channel.missed

    @property
    def overflow(self) -> OverflowPolicy:
        """The overflow policy: ``"drop_oldest"`` or ``"wait"``."""
        return "wait" if self._channel.wait else "drop_oldest"

    @property
    def buffer_size(self) -> int:
        """How many events the buffer holds (0: each event is handed over directly)."""
        return self._channel.buffer_size

    @property
    def buffered(self) -> int:
        """Events received for this subscriber and not yet taken out (0 once closed)."""
        channel = self._channel
        if channel.state == "closed":
            return 0
        stats = channel.receive_stream.statistics()
        return len(channel.pending) + stats.current_buffer_used

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the context manager exited)."""
        return self._channel.state == "closed"

    def close(self) -> None:
        """Unsubscribe: no more events arrive, and the buffered ones are discarded.

        A task iterating over the subscription ends its loop. Idempotent.
        """
        self._finalizer()

    def drain(self) -> list[ResourceUsage]:
        """Take every buffered event, oldest first, without waiting.

        Not a checkpoint. Returns an empty list when nothing is buffered (or when closed).
        """
        channel = self._channel
        channel.take_buffered()
        batch = list(channel.pending)
        channel.pending.clear()
        return batch

    async def next_batch(self) -> list[ResourceUsage]:
        """Wait for at least one event, then take every buffered event, oldest first.

        The cheap way for a subscriber that lags to catch up: one checkpoint per batch
        instead of one per event. Returns an empty list once the subscription has ended
        (closed, or the manager exited) and everything buffered was taken.

        Checkpoint: yes. Cancellation: if it raises, no event was taken (they stay buffered
        for the next call).
        """
        channel = self._channel
        channel.manager._enter()
        pending = channel.pending
        if not pending and not channel.ready:
            # Yield before waiting: a busy tracker often sends meanwhile, and an event taken
            # from the buffer costs far less than a wake-up (trio: 1.5x the deliveries/s).
            await checkpoint()
            if not channel.ready:
                await channel.wait_ready()
            channel.take_buffered()
        else:
            channel.take_buffered()
            await checkpoint()  # after taking: a subscriber that lags is never starved
        batch = list(pending)
        pending.clear()
        return batch

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ResourceUsage:
        """Return the next event, waiting for one if none is buffered.

        Checkpoint: yes. When an event is buffered it is taken *before* the checkpoint, so a
        subscriber that lags is never starved by the tracking task; if that checkpoint is
        cancelled the event is kept and returned by the next call. When none is, it waits
        for one without taking it, then takes it: a cancellation meanwhile takes nothing.
        If it raises a cancellation, you got nothing, and nothing was lost.
        """
        channel = self._channel
        channel.manager._enter()
        pending = channel.pending
        if pending or channel.take_one():
            await checkpoint()
            return pending.popleft()
        await channel.wait_ready()
        if pending or channel.take_one():
            return pending.popleft()
        raise StopAsyncIteration

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        """Return the subscription. Not a checkpoint."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """Close the subscription. Not a checkpoint."""
        self.close()

    def __repr__(self) -> str:
        channel = self._channel
        return (
            f"<darwin_metrics.Subscription at {id(self):#x}, {self.overflow}, "
            f"{self.buffered}/{channel.buffer_size} buffered, {channel.missed} missed, "
            f"{channel.state}>"
        )
