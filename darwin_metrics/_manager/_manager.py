"""ResourceManager: usage tracking, broadcast to subscriptions, samplers in a task group.

Tracking records a usage in the statistics, then loops over the open subscriptions calling
``send_nowait``; no object is created per subscriber and nothing awaits per subscriber (see
:mod:`._subscription` for how each policy delivers). State changes never straddle an
``await``: a resource type's statistics are replaced in one assignment, and the fan-out runs
without awaiting.

A manager belongs to the event loop that first uses it; tracking, entering it or waiting on
one of its subscriptions from another event loop raises :class:`RuntimeError`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio import (
    BrokenResourceError,
    CancelScope,
    ClosedResourceError,
    EndOfStream,
    WouldBlock,
)
from anyio.lowlevel import checkpoint

from .._cache import Cache
from .._errors import TrackingTimeoutError
from .._lowlevel import current_loop, running_loop_or_none, wrong_loop_error
from .._pool import ResourcePool
from .._tasks import exit_task_group
from ._samplers import PoolWatcher, Readings, SystemReader, pool_usage
from ._subscription import Channel, OverflowPolicy, Subscription, remove_identical
from ._usage import (
    Record,
    ResourceUsage,
    UsageStatistics,
    as_bytes,
    check_buffer_size,
    check_overflow,
    check_resource_type,
    check_seconds,
    check_usage,
)

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from typing_extensions import Self

__all__ = ["ResourceManager"]


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

    Example::

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
        "_loop",
        "_missed",
        "_stats",
        "_task_group",
        "_trio",
        "_watchers",
    )

    def __init__(
        self,
        *,
        cache_ttl: float = 60.0,
        cleanup_interval: float | None = None,
        cache_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ttl = check_seconds("cache_ttl", cache_ttl, allow_zero=False)
        self._cleanup_interval = (
            ttl
            if cleanup_interval is None
            else check_seconds("cleanup_interval", cleanup_interval, allow_zero=False)
        )
        if not callable(cache_clock):
            raise TypeError(f"cache_clock must be callable, got {type(cache_clock).__name__}")
        self._cache: Cache[str, bytes] = Cache(ttl, clock=cache_clock)
        # A tuple, replaced (never mutated) on subscribe and unsubscribe, so a fan-out in
        # progress keeps iterating over the channels it started with.
        self._channels: tuple[Channel, ...] = ()
        # Per type, UsageStatistics' fields as a tuple: replaced in one assignment (readers in
        # other threads never see half an update), and cheaper to build than the attrs class.
        self._stats: dict[str, Record] = {}
        self._task_group: TaskGroup | None = None
        self._watchers: set[PoolWatcher] = set()
        # The event loop this manager belongs to: bound on first use.
        self._loop: object | None = None
        self._trio = False
        self._missed = 0

    # ------------------------------------------------------------------ the event loop

    def _enter(self) -> None:
        """Check that the running event loop is this manager's (binding it on first use).

        Raises RuntimeError from another event loop, before anything changes.
        """
        loop = self._loop
        if loop is None:
            self._trio, self._loop = current_loop()
            return
        if running_loop_or_none(self._trio) is not loop:
            raise wrong_loop_error(self, "manager")

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
        policy = check_overflow(overflow)
        size = check_buffer_size(buffer_size, policy)
        channel = Channel(self, size, policy == "wait")
        self._channels = (*self._channels, channel)
        return Subscription(channel)

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions receive the usages tracked now."""
        return len(self._channels)

    @property
    def missed_events(self) -> int:
        """Events dropped for ``"drop_oldest"`` subscribers whose buffer was full, in total.

        The sum of every subscription's :attr:`Subscription.missed`, closed ones included:
        it only grows (a counter, for export).
        """
        return self._missed

    def _discard(self, channel: Channel) -> None:
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
        resource_type = check_resource_type(resource_type)
        value = check_usage(usage)
        self._enter()
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
        resource_type = check_resource_type(resource_type)
        value = check_usage(usage)
        seconds = check_seconds("timeout", timeout, allow_zero=True)
        self._enter()
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

    def _fan_out(self, event: ResourceUsage) -> list[Channel] | None:
        """Send ``event`` to every subscriber that can take it now; return the others."""
        blocked: list[Channel] | None = None
        try:
            return self._fan_out_to(event, iter(self._channels), blocked)
        except BaseException:
            # Nothing will deliver the reservations made so far: withdraw them, or each of
            # those subscribers would wait behind this event forever.
            for channel in self._channels:
                if channel.wait:
                    remove_identical(channel.backlog, event)
            raise

    def _fan_out_to(
        self,
        event: ResourceUsage,
        channels: Iterator[Channel],
        blocked: list[Channel] | None,
    ) -> list[Channel] | None:
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
                        self._missed += 1
                        channel.send_nowait(event)
                    except (BrokenResourceError, ClosedResourceError, EndOfStream):
                        # Closed meanwhile (a finalizer ran when raising WouldBlock allocated).
                        self._discard(channel)
                continue
            except (BrokenResourceError, ClosedResourceError):
                self._discard(channel)
                continue
            return blocked

    async def _deliver_blocked(self, event: ResourceUsage, blocked: list[Channel]) -> None:
        if len(blocked) == 1:
            await blocked[0].deliver(event)
            return
        # One task per subscriber, so one slow subscriber does not hold the others' backlogs.
        async with anyio.create_task_group() as task_group:
            for channel in blocked:
                task_group.start_soon(channel.deliver, event)

    # ------------------------------------------------------------------ statistics

    def get_usage_stats(self) -> dict[str, float]:
        """Return the peak usage of each resource type.

        The call of the same name in the Rust crate darwin-metrics, whose resource module this
        library brings to Python; :meth:`usage_statistics` has the count, last, min and mean.
        """
        return {name: record[3] for name, record in list(self._stats.items())}

    def usage_statistics(self) -> dict[str, UsageStatistics]:
        """Return a snapshot of what was recorded for each resource type."""
        return {name: UsageStatistics(*record) for name, record in list(self._stats.items())}

    def forget(self, resource_type: str) -> bool:
        """Drop what was recorded for ``resource_type``; return whether there was anything.

        For resource types that come and go (a disk that was unmounted, a pool that was
        closed), so that the statistics do not grow without limit. Tracking the type again
        starts afresh. :meth:`sample_system` forgets the disks that were unmounted by itself.
        Not a checkpoint; safe from any thread.

        Raises:
            TypeError: ``resource_type`` is not a str.
        """
        if not isinstance(resource_type, str):
            raise TypeError(
                f"resource_type must be a str, got {type(resource_type).__name__} "
                f"{resource_type!r}"
            )
        return self._stats.pop(resource_type, None) is not None

    # ------------------------------------------------------------------ metric cache

    def cache_metric(self, key: str, value: bytes | bytearray | memoryview) -> None:
        """Cache a metric's bytes under ``key`` for ``cache_ttl`` seconds.

        Raises:
            TypeError: ``key`` is not a str, or ``value`` is not bytes-like.
        """
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__} {key!r}")
        self._cache.set(key, as_bytes(value))

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
        resource_type = "pool:" + check_resource_type(name, "name")
        if not isinstance(pool, ResourcePool):
            raise TypeError(f"pool must be a ResourcePool, got {type(pool).__name__}")
        scope = CancelScope()
        if interval is None:
            watcher = PoolWatcher(pool)  # watches from now on: no change is missed
            self._watchers.add(watcher)
            task_group.start_soon(self._follow_pool, resource_type, watcher, scope)
        else:
            seconds = check_seconds("interval", interval, allow_zero=False)

            async def read() -> Readings:
                return [(resource_type, pool_usage(pool))], []

            task_group.start_soon(self._sample_periodically, read, seconds, scope)
        return scope

    def sample_system(self, *, interval: float = 1.0) -> CancelScope:
        """Track ``cpu``, ``memory``, ``swap`` and ``disk:<mountpoint>`` usage with psutil.

        Every ``interval`` seconds, until the manager exits. CPU, memory and swap are read in
        the event loop's thread (they take microseconds); disks in a worker thread, so a stale
        network mount never blocks the event loop. Partitions that cannot be read are
        skipped; a disk that is unmounted is forgotten (:meth:`forget`). CPU usage is
        measured between this sampler's own readings, so several samplers (in one manager or
        several) do not disturb each other. Needs the ``system`` extra:
        ``pip install "darwin-metrics[system]"``.

        Args:
            interval: Seconds between samples (finite and positive).

        Returns:
            A cancel scope: cancel it to stop this sampler early.

        Raises:
            RuntimeError: Called outside ``async with manager:``.
            ModuleNotFoundError: psutil is not installed.
        """
        task_group = self._running_task_group("sample_system")
        seconds = check_seconds("interval", interval, allow_zero=False)
        try:
            import psutil
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(
                'sample_system() needs psutil: pip install "darwin-metrics[system]"',
                name="psutil",
            ) from exc
        del psutil  # imported to fail early, with the hint above
        scope = CancelScope()
        task_group.start_soon(self._sample_periodically, SystemReader(), seconds, scope)
        return scope

    async def _sample_periodically(
        self,
        read: Callable[[], Awaitable[Readings]],
        interval: float,
        scope: CancelScope,
    ) -> None:
        with scope:
            due = anyio.current_time()
            while True:
                due += interval
                readings, gone = await read()
                for resource_type in gone:
                    self.forget(resource_type)
                for resource_type, usage in readings:
                    await self.track_resource_usage(resource_type, usage)
                due = max(due, anyio.current_time())  # a late sample does not cause a burst
                await anyio.sleep_until(due)

    async def _follow_pool(
        self, resource_type: str, watcher: PoolWatcher, scope: CancelScope
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
        """Start the upkeep task group. Not a checkpoint.

        Raises:
            RuntimeError: The manager is already running, or belongs to another event loop.
        """
        if self._task_group is not None:
            raise RuntimeError(f"{self!r} is already running: enter it only once at a time")
        self._enter()
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
