"""ResourceManager: usage tracking, broadcast over memory object streams, samplers in a task group.

How delivery works
------------------
Every :class:`Subscription` owns one anyio memory object stream, both ends of it: memory object
streams are queues, not tees, so one stream per subscriber is the broadcast. Tracking a usage
records it in the statistics, then loops over the open subscriptions calling ``send_nowait``; no
object is created per subscriber and nothing awaits per subscriber.

- ``"drop_oldest"``: when the buffer is full, the tracking call takes the oldest buffered event
  out through the subscription's own receive end, counts it in ``missed``, and sends again.
  Tracking never waits for such a subscriber.
- ``"wait"``: when the buffer is full, the event joins the subscription's backlog, a FIFO of
  events reserved for it in tracking order, and the tracking call waits (after every other
  subscriber got the event) until its event is first in the backlog and the buffer has room.
  Reserving synchronously keeps each subscriber's events in tracking order even when several
  tasks track at once; a call that gives up (timeout, cancellation) withdraws its event from
  the backlogs it had not reached, so no subscriber receives one event twice.

State changes never straddle an ``await``: a resource type's statistics are replaced in one
assignment, and the fan-out runs without awaiting.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio
import attrs
from anyio import (
    BrokenResourceError,
    CancelScope,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)
from anyio.lowlevel import checkpoint

from ._cache import Cache
from ._errors import TrackingTimeoutError
from ._pool import ResourcePool
from ._tasks import exit_task_group

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from typing_extensions import Self

__all__ = ["OverflowPolicy", "ResourceManager", "ResourceUsage", "Subscription", "UsageStatistics"]

OverflowPolicy = Literal["drop_oldest", "wait"]
"""What tracking does when a subscriber's buffer is full."""

_OVERFLOW_POLICIES: Final = ("drop_oldest", "wait")
_Record = tuple[int, float, float, float, float, float]  # UsageStatistics' fields, in order
_POOL_SNAPSHOTS_MAX: Final = 1024  # pool changes kept for a pool watcher that lags behind


@attrs.frozen
class ResourceUsage:
    """One usage measurement, as subscribers receive it."""

    resource_type: str
    """What was measured, such as ``"cpu"``, ``"pool:db"`` or ``"disk:/"``."""
    usage_percent: float
    """The usage in percent: finite and not negative; it may exceed 100."""
    timestamp: float
    """When it was tracked, on the event loop's clock (:func:`anyio.current_time`)."""
    wall_time: float
    """When it was tracked, in seconds since the epoch (:func:`time.time`), for export."""


@attrs.frozen
class UsageStatistics:
    """What a :class:`ResourceManager` has recorded for one resource type."""

    count: int
    """How many usages were tracked."""
    last: float
    """The latest usage, in percent."""
    min: float
    """The lowest usage, in percent."""
    max: float
    """The highest usage (the peak), in percent."""
    mean: float
    """The mean of all tracked usages, in percent."""
    last_timestamp: float
    """When the latest usage was tracked, on the event loop's clock."""


# ---------------------------------------------------------------------- argument checks


def _check_resource_type(value: object, name: str = "resource_type") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def _check_usage(value: object) -> float:
    if type(value) is float:
        number = value
    elif not isinstance(value, bool) and isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"usage must be finite, got {value!r}") from None
    else:
        raise TypeError(f"usage must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"usage must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"usage must not be negative, got {value!r}")
    return number + 0.0  # turns -0.0 into 0.0


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number of seconds, got {type(value).__name__} {value!r}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        wanted = "finite and not negative" if allow_zero else "finite and positive"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return seconds


def _check_buffer_size(value: object, overflow: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"buffer_size must be an int, got {type(value).__name__} {value!r}")
    minimum = 0 if overflow == "wait" else 1
    if value < minimum:
        hint = "" if minimum == 0 else ' (0 is allowed only with overflow="wait")'
        raise ValueError(f"buffer_size must be at least {minimum}{hint}, got {value!r}")
    return value


def _check_overflow(value: object) -> OverflowPolicy:
    if not isinstance(value, str):
        raise TypeError(f"overflow must be a str, got {type(value).__name__} {value!r}")
    if value == "drop_oldest":
        return "drop_oldest"
    if value == "wait":
        return "wait"
    raise ValueError(f"overflow must be one of {_OVERFLOW_POLICIES}, got {value!r}")


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value if type(value) is bytes else bytes(value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    hint = " (encode it first)" if isinstance(value, str) else ""
    raise TypeError(
        f"value must be bytes-like (bytes, bytearray or memoryview){hint}, "
        f"got {type(value).__name__}"
    )


def _remove_identical(backlog: deque[ResourceUsage], event: ResourceUsage) -> None:
    """Remove ``event`` itself (not an equal event) from ``backlog``, if it is there."""
    if backlog and backlog[0] is event:
        backlog.popleft()
        return
    for index, queued in enumerate(backlog):
        if queued is event:
            del backlog[index]
            return


# ---------------------------------------------------------------------- subscriptions


class _StreamProbe:
    """Tells whether a receive stream has an event to take now, through ``statistics()``."""

    __slots__ = ("_statistics",)

    def __init__(self, stream: MemoryObjectReceiveStream[ResourceUsage]) -> None:
        self._statistics = stream.statistics

    def __bool__(self) -> bool:
        stats = self._statistics()
        return bool(stats.current_buffer_used or stats.tasks_waiting_send)


def _ready_probe(
    stream: MemoryObjectReceiveStream[ResourceUsage], wait: bool
) -> deque[ResourceUsage] | _StreamProbe:
    """Return an object that is true while ``stream`` has an event to take at once.

    Every subscriber asks this before each event it takes, so it must be cheap. For a
    ``"drop_oldest"`` stream it is anyio's buffer itself (a private attribute, unchanged since
    anyio 3; the tests check it). A ``"wait"`` stream also has events in waiting senders, and
    any other layout falls back to ``statistics()``, about ten times slower.
    """
    if not wait:
        buffer = getattr(getattr(stream, "_state", None), "buffer", None)
        if isinstance(buffer, deque):
            return buffer
    return _StreamProbe(stream)


class _Channel:
    """The manager's side of a subscription: its stream, its policy and its counters.

    The manager holds channels strongly and subscriptions not at all, so a subscription that
    nobody references is collected; its finalizer closes the channel.
    """

    __slots__ = (
        "backlog",
        "manager",
        "missed",
        "ready",
        "receive_nowait",
        "receive_stream",
        "send_nowait",
        "send_stream",
        "state",
        "turn",
        "wait",
    )

    def __init__(self, manager: ResourceManager, buffer_size: int, wait: bool) -> None:
        send_stream, receive_stream = anyio.create_memory_object_stream[ResourceUsage](buffer_size)
        self.manager = manager
        self.send_stream: MemoryObjectSendStream[ResourceUsage] = send_stream
        self.receive_stream: MemoryObjectReceiveStream[ResourceUsage] = receive_stream
        self.receive_nowait = receive_stream.receive_nowait
        self.ready = _ready_probe(receive_stream, wait)
        self.wait = wait
        self.missed = 0
        self.state = "open"
        # Events reserved for a "wait" subscriber, in tracking order, not yet in its buffer.
        self.backlog: deque[ResourceUsage] = deque()
        self.turn: anyio.Event | None = None  # set whenever the backlog's head leaves
        self.send_nowait: Callable[[ResourceUsage], None] = (
            self._send_in_order if wait else send_stream.send_nowait
        )

    def _send_in_order(self, event: ResourceUsage) -> None:
        if self.backlog:  # earlier events wait for room: don't overtake them
            raise WouldBlock
        self.send_stream.send_nowait(event)

    def end(self) -> None:
        """Close the sending end: the subscriber gets what is buffered, then its loop ends."""
        if self.state == "open":
            self.state = "ended"
        self.send_stream.close()
        self.manager._discard(self)

    def close(self) -> None:
        """Close both ends (idempotent; also the subscription's finalizer)."""
        self.state = "closed"
        self.send_stream.close()
        self.receive_stream.close()
        self.manager._discard(self)

    async def deliver(self, event: ResourceUsage) -> None:
        """Wait until ``event`` is first in the backlog, then until the buffer takes it.

        Checkpoint: yes. On cancellation, ``event`` leaves the backlog undelivered. A closed
        subscription ends the wait quietly.
        """
        backlog = self.backlog
        try:
            while backlog[0] is not event:
                turn = self.turn
                if turn is None:
                    turn = self.turn = anyio.Event()
                await turn.wait()
            await self.send_stream.send(event)
        except (BrokenResourceError, ClosedResourceError):
            pass  # the subscriber left
        finally:
            _remove_identical(backlog, event)
            turn = self.turn
            if turn is not None:
                self.turn = None
                turn.set()


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
    channel: _Channel,
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

    Example::

        with manager.subscribe(buffer_size=10) as subscription:
            async for usage in subscription:
                print(usage.resource_type, usage.usage_percent)
    """

    __slots__ = ("__weakref__", "_channel", "_finalizer", "_pending")

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        # Events taken from the stream but not yet handed out (a cancelled checkpoint).
        self._pending: deque[ResourceUsage] = deque()
        # The finalizer may run in any thread that triggers garbage collection; it closes the
        # channel in the thread of the event loop that subscribed.
        self._finalizer = weakref.finalize(
            self, _close_channel, channel, threading.get_ident(), _loop_scheduler()
        )

    @property
    def missed(self) -> int:
        """Events dropped for this subscriber because its buffer was full (``"drop_oldest"``).

        ``received + missed`` equals the number of events tracked while it was open. A
        ``"wait"`` subscriber loses no event this way; an event that a timed-out or cancelled
        tracking call could not deliver to it is not counted (that call raised).
        """
        return self._channel.missed

    @property
    def overflow(self) -> OverflowPolicy:
        """The overflow policy: ``"drop_oldest"`` or ``"wait"``."""
        return "wait" if self._channel.wait else "drop_oldest"

    @property
    def buffer_size(self) -> int:
        """How many events the buffer holds."""
        return int(self._channel.receive_stream.statistics().max_buffer_size)

    @property
    def buffered(self) -> int:
        """Events received for this subscriber and not yet taken out (0 once closed)."""
        if self._channel.state == "closed":
            return 0
        stats = self._channel.receive_stream.statistics()
        return len(self._pending) + stats.current_buffer_used

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the context manager exited)."""
        return self._channel.state == "closed"

    def close(self) -> None:
        """Unsubscribe: no more events arrive, and the buffered ones are discarded.

        A task iterating over the subscription ends its loop. Idempotent.
        """
        self._pending.clear()
        self._finalizer()

    def drain(self) -> list[ResourceUsage]:
        """Take every buffered event, oldest first, without waiting.

        Not a checkpoint. Returns an empty list when nothing is buffered (or when closed).
        """
        self._take_buffered()
        batch = list(self._pending)
        self._pending.clear()
        return batch

    async def next_batch(self) -> list[ResourceUsage]:
        """Wait for at least one event, then take every buffered event, oldest first.

        The cheap way for a subscriber that lags to catch up: one checkpoint per batch
        instead of one per event. Returns an empty list once the subscription has ended
        (closed, or the manager exited) and everything buffered was taken.

        Checkpoint: yes. Cancellation: if it raises, no event was taken.
        """
        channel = self._channel
        pending = self._pending
        ready = channel.ready
        if pending or ready:
            self._take_buffered()
            await checkpoint()  # after taking: a subscriber that lags is never starved
        else:
            # Yield before parking: a busy tracker often sends meanwhile, and an event taken
            # from the buffer costs far less than a wake-up (trio: 1.5x the deliveries/s).
            await checkpoint()
            if not ready:
                try:
                    first = await channel.receive_stream.receive()
                except (EndOfStream, ClosedResourceError):
                    return []
                if not ready:
                    return [first]
                pending.append(first)
            self._take_buffered()
        batch = list(pending)
        pending.clear()
        return batch

    def _take_buffered(self) -> None:
        """Move every event that the stream can give at once to pending."""
        channel = self._channel
        ready = channel.ready
        receive_nowait = channel.receive_nowait
        append = self._pending.append
        try:
            while ready:
                append(receive_nowait())
        except (WouldBlock, EndOfStream, ClosedResourceError):
            pass

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> ResourceUsage:
        """Return the next event, waiting for one if none is buffered.

        Checkpoint: yes. The event is taken *before* the checkpoint, so a subscriber that
        lags is never starved by the tracking task; if that checkpoint is cancelled the event
        is kept and returned by the next call. If it raises a cancellation, you got nothing.
        """
        pending = self._pending
        if not pending:
            channel = self._channel
            try:
                if channel.ready:  # take first, checkpoint after: a laggard is never starved
                    pending.append(channel.receive_nowait())
                else:
                    return await channel.receive_stream.receive()
            except (EndOfStream, ClosedResourceError):
                raise StopAsyncIteration from None
        await checkpoint()
        return pending.popleft()

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
        stats = channel.receive_stream.statistics()
        size = "∞" if math.isinf(stats.max_buffer_size) else int(stats.max_buffer_size)
        return (
            f"<darwin_metrics.Subscription at {id(self):#x}, {self.overflow}, "
            f"{self.buffered}/{size} buffered, {channel.missed} missed, {channel.state}>"
        )


# ---------------------------------------------------------------------- samplers


class _PoolWatcher:
    """Snapshots a pool's usage on every change; a manager task tracks the snapshots."""

    __slots__ = ("changed", "pool", "snapshots", "unwatch")

    def __init__(self, pool: ResourcePool[Any]) -> None:
        self.pool = pool
        self.snapshots: deque[float] = deque(maxlen=_POOL_SNAPSHOTS_MAX)
        self.changed = anyio.Event()
        self.snapshots.append(self.usage())
        self.unwatch = pool._watch(self.notify)

    def usage(self) -> float:
        stats = self.pool.statistics()
        return stats.leased / stats.max_size * 100.0 if stats.max_size else 0.0

    def notify(self) -> None:
        # Called by the pool, synchronously, in the task that changed it: cheap, never raises.
        self.snapshots.append(self.usage())
        self.changed.set()


class _SystemReader:
    """Reads the system's usage with psutil, one round per call.

    CPU, memory and swap come from procfs-like sources in microseconds and are read in the
    event loop's thread (``cpu_percent`` measures since the previous call *in the same
    thread*). Disks are read in a worker thread: ``statvfs`` on a stale network mount blocks.
    The first round has no ``cpu``: a reading microseconds after the priming call covers
    almost no time and says about 0.
    """

    def __init__(self) -> None:
        import psutil

        psutil.cpu_percent(interval=None)  # the first call only starts the measurement
        self._primed = False

    async def __call__(self) -> list[tuple[str, float]]:
        import psutil

        readings = []
        if self._primed:
            readings.append(("cpu", float(psutil.cpu_percent(interval=None))))
        self._primed = True
        readings.append(("memory", float(psutil.virtual_memory().percent)))
        readings.append(("swap", float(psutil.swap_memory().percent)))
        # Abandoned on cancellation: a hung statvfs must not hold up the manager's exit.
        readings += await anyio.to_thread.run_sync(_read_disks, abandon_on_cancel=True)
        return readings


def _read_disks() -> list[tuple[str, float]]:
    import psutil

    readings = []
    for partition in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(partition.mountpoint)
        except OSError:  # vanished, or not readable by us
            continue
        percent = float(usage.percent)
        if math.isfinite(percent) and percent >= 0:  # some FUSE mounts report nonsense
            readings.append((f"disk:{partition.mountpoint}", percent))
    return readings


# ---------------------------------------------------------------------- the manager


class ResourceManager:
    """Tracks resource usage, broadcasts it to subscribers, and caches metrics.

    Everything works without entering the manager; ``async with`` adds upkeep in a task group
    that lives exactly as long as the block: periodic :meth:`cleanup_cache`, and the samplers
    :meth:`watch_pool` and :meth:`sample_system`. On exit the samplers stop and every
    subscription ends, so the subscribers' ``async for`` loops finish cleanly.

    A sampler that fails ends the block with its error, as a task in any task group does.

    The manager belongs to one event loop. :meth:`get_usage_stats`, :meth:`usage_statistics`
    and the metric cache's methods may be called from any thread; the rest belongs to the
    event loop's thread. To track from a worker thread, go through :mod:`anyio.from_thread`::

        async with ResourceManager() as manager:

            def worker() -> None:
                anyio.from_thread.run(manager.track_resource_usage, "gpu", 42.0)

            await anyio.to_thread.run_sync(worker)

    Example (the seed's)::

        manager = ResourceManager()
        subscription = manager.subscribe()
        await manager.track_resource_usage("cpu", 75.5)
        manager.cache_metric("cpu_temp", b"\\x2a")
        print(manager.get_usage_stats())  # {'cpu': 75.5}

    Args:
        cache_ttl: Seconds a cached metric lives (finite and positive).
        cleanup_interval: Seconds between two runs of :meth:`cleanup_cache` inside
            ``async with``; defaults to ``cache_ttl``.
        cache_clock: The metric cache's clock, in seconds (a fake one in tests).

    Raises:
        TypeError: An argument has the wrong type (a bool is not a number of seconds).
        ValueError: ``cache_ttl`` or ``cleanup_interval`` is zero, negative or not finite.
    """

    __slots__ = (
        "__weakref__",
        "_cache",
        "_channels",
        "_cleanup_interval",
        "_stats",
        "_task_group",
        "_watchers",
    )

    def __init__(
        self,
        *,
        cache_ttl: float = 60.0,
        cleanup_interval: float | None = None,
        cache_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ttl = _check_seconds("cache_ttl", cache_ttl, allow_zero=False)
        self._cleanup_interval = (
            ttl
            if cleanup_interval is None
            else _check_seconds("cleanup_interval", cleanup_interval, allow_zero=False)
        )
        if not callable(cache_clock):
            raise TypeError(f"cache_clock must be callable, got {type(cache_clock).__name__}")
        self._cache: Cache[str, bytes] = Cache(ttl, clock=cache_clock)
        # A tuple, replaced (never mutated) on subscribe and unsubscribe, so a fan-out in
        # progress keeps iterating over the channels it started with.
        self._channels: tuple[_Channel, ...] = ()
        # Per type, UsageStatistics' fields as a tuple: replaced in one assignment (readers in
        # other threads never see half an update), and cheaper to build than the attrs class.
        self._stats: dict[str, _Record] = {}
        self._task_group: TaskGroup | None = None
        self._watchers: set[_PoolWatcher] = set()

    # ------------------------------------------------------------------ subscriptions

    def subscribe(
        self, *, buffer_size: int = 100, overflow: OverflowPolicy = "drop_oldest"
    ) -> Subscription:
        """Subscribe to the usages tracked from now on.

        Args:
            buffer_size: Events buffered for this subscriber (an int of at least 1, or 0 with
                ``overflow="wait"``: every event is handed over directly).
            overflow: ``"drop_oldest"``: tracking never waits; when the buffer is full the
                oldest buffered event is dropped and counted in
                :attr:`Subscription.missed`. ``"wait"``: lossless; tracking waits for room in
                this subscriber's buffer.

        Returns:
            A :class:`Subscription`; close it (or let it go) to unsubscribe.
        """
        policy = _check_overflow(overflow)
        size = _check_buffer_size(buffer_size, policy)
        channel = _Channel(self, size, policy == "wait")
        self._channels = (*self._channels, channel)
        return Subscription(channel)

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions receive the usages tracked now."""
        return len(self._channels)

    def _discard(self, channel: _Channel) -> None:
        if channel in self._channels:
            self._channels = tuple(c for c in self._channels if c is not channel)

    # ------------------------------------------------------------------ tracking

    async def track_resource_usage(self, resource_type: str, usage: float) -> None:
        """Record a usage and deliver it to every subscriber.

        The statistics are updated first, in one step; then every open subscription gets the
        event with ``send_nowait``. Only ``"wait"`` subscribers whose buffer is full make it
        wait, after all the others got the event.

        Args:
            resource_type: What was measured: a non-empty str.
            usage: The usage in percent: a real number (not a bool), finite and not negative.
                Values above 100 are accepted (a CPU figure summed over cores may exceed it).

        Raises:
            TypeError: An argument has the wrong type; nothing was recorded or delivered.
            ValueError: An argument is out of range; nothing was recorded or delivered.

        Checkpoint: yes. Cancellation: if the first checkpoint is cancelled, nothing was
        recorded. If it is cancelled while waiting for a ``"wait"`` subscriber, the usage
        stays recorded and delivered to the others; a ``"wait"`` subscriber it had not reached
        either never receives it or took it just as the cancellation landed (never twice).
        """
        resource_type = _check_resource_type(resource_type)
        value = _check_usage(usage)
        await checkpoint()
        event = self._record(resource_type, value)
        blocked = self._fan_out(event)
        if blocked is not None:
            await self._deliver_blocked(event, blocked)

    async def track_resource_usage_with_timeout(
        self, resource_type: str, usage: float, timeout: float
    ) -> None:
        """Like :meth:`track_resource_usage`, giving up after ``timeout`` seconds.

        Only waiting for room in ``"wait"`` subscribers' buffers takes time, so that is what
        the timeout bounds: with ``timeout=0`` the usage goes to every subscriber that can take
        it at once.

        Args:
            resource_type: What was measured: a non-empty str.
            usage: The usage in percent: a real number, finite and not negative.
            timeout: Seconds, finite and not negative.

        Raises:
            TrackingTimeoutError: The time ran out. The statistics keep the usage and the
                subscribers that received it keep it; a ``"wait"`` subscriber still waiting
                for room never receives it (one may take it just as the time runs out).
            TypeError: An argument has the wrong type; nothing was recorded or delivered.
            ValueError: An argument is out of range; nothing was recorded or delivered.

        Checkpoint: yes. Cancellation: as for :meth:`track_resource_usage`.
        """
        resource_type = _check_resource_type(resource_type)
        value = _check_usage(usage)
        seconds = _check_seconds("timeout", timeout, allow_zero=True)
        await checkpoint()
        event = self._record(resource_type, value)
        blocked = self._fan_out(event)
        if blocked is not None:
            with anyio.move_on_after(seconds) as scope:
                await self._deliver_blocked(event, blocked)
            if scope.cancelled_caught:
                raise TrackingTimeoutError(resource_type, seconds)

    def _record(self, resource_type: str, value: float) -> ResourceUsage:
        now = anyio.current_time()
        old = self._stats.get(resource_type)
        if old is None:
            new = (1, value, value, value, value, now)
        else:
            count, _, low, high, mean, _ = old
            count += 1
            new = (
                count,
                value,
                value if value < low else low,
                value if value > high else high,
                mean + (value - mean) / count,
                now,
            )
        self._stats[resource_type] = new
        return ResourceUsage(resource_type, value, now, time.time())

    def _fan_out(self, event: ResourceUsage) -> list[_Channel] | None:
        """Send ``event`` to every subscriber that can take it now; return the others."""
        blocked: list[_Channel] | None = None
        try:
            return self._fan_out_to(event, iter(self._channels), blocked)
        except BaseException:
            # Nothing will deliver the reservations made so far: withdraw them, or each of
            # those subscribers would wait behind this event forever.
            for channel in self._channels:
                if channel.wait:
                    _remove_identical(channel.backlog, event)
            raise

    def _fan_out_to(
        self,
        event: ResourceUsage,
        channels: Iterator[_Channel],
        blocked: list[_Channel] | None,
    ) -> list[_Channel] | None:
        while True:
            try:  # around the loop, which resumes after each handled exception
                for channel in channels:
                    channel.send_nowait(event)
            except WouldBlock:
                if channel.wait:
                    channel.backlog.append(event)  # reserve its place in this order
                    if blocked is None:
                        blocked = []
                    blocked.append(channel)
                else:
                    try:
                        channel.receive_nowait()  # the oldest event makes room
                        channel.missed += 1
                        channel.send_nowait(event)
                    except (BrokenResourceError, ClosedResourceError, EndOfStream):
                        # Closed meanwhile (a finalizer ran when raising WouldBlock allocated).
                        self._discard(channel)
                continue
            except (BrokenResourceError, ClosedResourceError):
                self._discard(channel)
                continue
            return blocked

    async def _deliver_blocked(self, event: ResourceUsage, blocked: list[_Channel]) -> None:
        if len(blocked) == 1:
            await blocked[0].deliver(event)
            return
        # One task per subscriber, so one slow subscriber does not hold the others' backlogs.
        async with anyio.create_task_group() as task_group:
            for channel in blocked:
                task_group.start_soon(channel.deliver, event)

    # ------------------------------------------------------------------ statistics

    def get_usage_stats(self) -> dict[str, float]:
        """Return the peak usage of each resource type, as the seed does."""
        return {name: record[3] for name, record in list(self._stats.items())}

    def usage_statistics(self) -> dict[str, UsageStatistics]:
        """Return a snapshot of what was recorded for each resource type."""
        return {name: UsageStatistics(*record) for name, record in list(self._stats.items())}

    # ------------------------------------------------------------------ metric cache

    def cache_metric(self, key: str, value: bytes | bytearray | memoryview) -> None:
        """Cache a metric's bytes under ``key`` for ``cache_ttl`` seconds.

        Raises:
            TypeError: ``key`` is not a str, or ``value`` is not bytes-like.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__} {key!r}")
        self._cache.set(key, _as_bytes(value))

    def get_cached_metric(self, key: str) -> bytes | None:
        """Return the metric cached under ``key``, or ``None`` if absent or expired."""
        return self._cache.get(key)

    def cleanup_cache(self) -> int:
        """Drop the expired metrics; return how many were dropped."""
        return self._cache.clear_expired()

    # ------------------------------------------------------------------ upkeep and samplers

    def _running_task_group(self, method: str) -> TaskGroup:
        if self._task_group is None:
            raise RuntimeError(
                f"{method}() runs a sampler in the manager's task group: "
                "call it inside 'async with manager:'"
            )
        return self._task_group

    def watch_pool(
        self, name: str, pool: ResourcePool[Any], *, interval: float | None = None
    ) -> CancelScope:
        """Track ``pool:<name>`` as the pool's leased / max_size * 100.

        Without ``interval``, on every change of the pool's leased count or ``max_size``
        (and once at the start); with it, every ``interval`` seconds. A watcher that lags
        keeps the latest 1024 changes. It runs until the manager exits.

        Args:
            name: The pool's name in the resource type: a non-empty str.
            pool: The :class:`~darwin_metrics.resource.ResourcePool` to watch.
            interval: Seconds between samples (finite and positive), or ``None``.

        Returns:
            A cancel scope: cancel it to stop this sampler early.

        Raises:
            RuntimeError: Called outside ``async with manager:``.
            TypeError: ``name`` is not a str or ``pool`` is not a ResourcePool.
            ValueError: ``name`` is empty or ``interval`` is not finite and positive.
        """
        task_group = self._running_task_group("watch_pool")
        resource_type = "pool:" + _check_resource_type(name, "name")
        if not isinstance(pool, ResourcePool):
            raise TypeError(f"pool must be a ResourcePool, got {type(pool).__name__}")
        scope = CancelScope()
        if interval is None:
            watcher = _PoolWatcher(pool)  # watches from now on: no change is missed
            self._watchers.add(watcher)
            task_group.start_soon(self._follow_pool, resource_type, watcher, scope)
        else:
            seconds = _check_seconds("interval", interval, allow_zero=False)

            async def read() -> list[tuple[str, float]]:
                stats = pool.statistics()
                usage = stats.leased / stats.max_size * 100.0 if stats.max_size else 0.0
                return [(resource_type, usage)]

            task_group.start_soon(self._sample_periodically, read, seconds, scope)
        return scope

    def sample_system(self, *, interval: float = 1.0) -> CancelScope:
        """Track ``cpu``, ``memory``, ``swap`` and ``disk:<mountpoint>`` usage with psutil.

        Every ``interval`` seconds, until the manager exits. CPU, memory and swap are read in
        the event loop's thread (they take microseconds); disks in a worker thread, so a stale
        network mount never blocks the event loop. Partitions that cannot be read are
        skipped. Needs the ``system`` extra: ``pip install "darwin-metrics[system]"``.

        Args:
            interval: Seconds between samples (finite and positive).

        Returns:
            A cancel scope: cancel it to stop this sampler early.

        Raises:
            RuntimeError: Called outside ``async with manager:``.
            ModuleNotFoundError: psutil is not installed.
        """
        task_group = self._running_task_group("sample_system")
        seconds = _check_seconds("interval", interval, allow_zero=False)
        try:
            import psutil
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                'sample_system() needs psutil: pip install "darwin-metrics[system]"',
                name="psutil",
            ) from exc
        del psutil  # imported to fail early, with the hint above
        scope = CancelScope()
        task_group.start_soon(self._sample_periodically, _SystemReader(), seconds, scope)
        return scope

    async def _sample_periodically(
        self,
        read: Callable[[], Awaitable[list[tuple[str, float]]]],
        interval: float,
        scope: CancelScope,
    ) -> None:
        with scope:
            due = anyio.current_time()
            while True:
                due += interval
                for resource_type, usage in await read():
                    await self.track_resource_usage(resource_type, usage)
                due = max(due, anyio.current_time())  # a late sample does not cause a burst
                await anyio.sleep_until(due)

    async def _follow_pool(
        self, resource_type: str, watcher: _PoolWatcher, scope: CancelScope
    ) -> None:
        try:
            with scope:
                snapshots = watcher.snapshots
                while True:
                    watcher.changed = anyio.Event()  # before draining: no lost wake-up
                    while snapshots:
                        await self.track_resource_usage(resource_type, snapshots.popleft())
                    await watcher.changed.wait()
        finally:
            watcher.unwatch()
            self._watchers.discard(watcher)

    async def _cleanup_periodically(self) -> None:
        while True:
            await anyio.sleep(self._cleanup_interval)
            self.cleanup_cache()

    async def __aenter__(self) -> Self:
        """Start the upkeep task group. Not a checkpoint."""
        if self._task_group is not None:
            raise RuntimeError(f"{self!r} is already running: enter it only once at a time")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        task_group.start_soon(self._cleanup_periodically)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        """Stop the samplers and end every subscription.

        Checkpoint: yes. The subscriptions end even if exiting is cancelled.
        """
        task_group = self._task_group
        if task_group is None:
            raise RuntimeError(f"{self!r} was not entered")
        try:
            task_group.cancel_scope.cancel()
            return await exit_task_group(task_group, exc_type, exc_val, exc_tb)
        finally:
            self._task_group = None
            for watcher in list(self._watchers):  # a sampler cancelled before it started
                watcher.unwatch()
            self._watchers.clear()
            for channel in self._channels:
                channel.end()

    def __repr__(self) -> str:
        state = "running" if self._task_group is not None else "idle"
        return (
            f"<darwin_metrics.ResourceManager at {id(self):#x}, "
            f"{len(self._channels)} subscribers, {len(self._stats)} resource types, "
            f"{len(self._cache)} cached metrics, {state}>"
        )
