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
from datetime import timedelta
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
from ._deadlock import current_task, stuck_waiters
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
    import coredis
    from anyio.abc import TaskGroup
    from typing_extensions import Self

    from .._redis._relay import UsageRelay

__all__ = ["ResourceManager"]

_DEADLOCK_CHECK_INTERVAL = 1.0  # seconds between two looks of the deadlock watchdog


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
        "_exited",
        "_host",
        "_loop",
        "_missed",
        "_publishers",
        "_sources",
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
        self._host: object = None  # the task running the 'async with' block
        self._exited = False  # the block ended (until it is entered again)
        # Called with every tracked usage (the relays' publish hooks); replaced, never mutated.
        self._publishers: tuple[Callable[[ResourceUsage], None], ...] = ()
        # The statistics of the usages relayed from other processes: source -> type -> Record.
        self._sources: dict[str, dict[str, Record]] = {}

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
        if self._exited and self._task_group is None:
            raise RuntimeError(
                f"{self!r}: its 'async with' block has ended, and with it every "
                "subscription; a new one would never receive anything nor end. Subscribe "
                "before the block ends (or enter the manager again)."
            )
        channel = Channel(self, size, policy == "wait")
        self._channels = (*self._channels, channel)
        return Subscription(channel)

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions receive the usages tracked now."""
        return len(self._channels)

    @property
    def missed_events(self) -> int:
        """Events dropped for ``"drop_oldest"`` subscribers whose buffer was full, and relayed
        usages that could not be read (once per open subscription), in total.

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

        The statistics are updated first, in one step; then each running :meth:`relay`
        queues the usage for other processes (never waiting); then every open subscription
        gets the event with ``send_nowait``. Only ``"wait"`` subscribers whose buffer is full
        make it wait, after all the others got the event.

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
        for publish in self._publishers:
            publish(event)
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
        for publish in self._publishers:
            publish(event)
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

    async def _deliver_blocked(
        self, event: ResourceUsage, blocked: list[Channel], *, withdraw: bool = True
    ) -> None:
        """Wait until every ``"wait"`` subscriber in ``blocked`` has room for ``event``.

        Cancelled, it withdraws the event from those it did not reach, unless ``withdraw``
        is false (see :meth:`Channel.deliver`).
        """
        if len(blocked) == 1:
            await blocked[0].deliver(event, withdraw)
            return
        # One task per subscriber, so one slow subscriber does not hold the others' backlogs.
        async with anyio.create_task_group() as task_group:
            for channel in blocked:
                task_group.start_soon(channel.deliver, event, withdraw)

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

    def usage_statistics_by_source(self) -> dict[str, dict[str, UsageStatistics]]:
        """Return a snapshot of the usages relayed from other processes, by source and type.

        The keys are the sources' names (:attr:`ResourceUsage.source`), then the resource
        types. Usages received through :meth:`relay` are counted here and never in
        :meth:`usage_statistics`, which stays what *this* process tracked: a mean of cpu
        over eight hosts is nobody's cpu. ``last_timestamp`` is when the latest usage
        arrived, on this event loop's clock. A source whose relay stopped cleanly is
        forgotten when its goodbye arrives; :meth:`forget_source` drops one by hand (a
        process that died without one). Safe from any thread.
        """
        return {
            source: {name: UsageStatistics(*record) for name, record in list(records.items())}
            for source, records in list(self._sources.items())
        }

    def forget_source(self, source: str) -> bool:
        """Drop the statistics of usages relayed from ``source``; return whether there were any.

        Not a checkpoint; safe from any thread. A later usage from ``source`` starts afresh.

        Raises:
            TypeError: ``source`` is not a str.
        """
        if not isinstance(source, str):
            raise TypeError(f"source must be a str, got {type(source).__name__} {source!r}")
        return self._sources.pop(source, None) is not None

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

    # ------------------------------------------------------------------ relayed usages
    #
    # The hooks a relay (darwin_metrics._redis._relay) uses: it publishes tracked usages and
    # feeds the usages of other processes to the subscribers. The core knows nothing else of it.

    def _add_publisher(self, publish: Callable[[ResourceUsage], None]) -> None:
        """Call ``publish(event)`` (sync, never raising) with every usage tracked from now on."""
        self._publishers = (*self._publishers, publish)

    def _remove_publisher(self, publish: Callable[[ResourceUsage], None]) -> None:
        self._publishers = tuple(hook for hook in self._publishers if hook is not publish)

    def _receive_nowait(self, event: ResourceUsage) -> list[Channel] | None:
        """Record a usage relayed from ``event.source`` and send it to every subscriber.

        As tracking does, but into the source's statistics, and without publishing it again.
        Returns the ``"wait"`` subscribers whose buffer is full: await
        :meth:`_deliver_blocked` for them.
        """
        source = event.source
        assert source is not None
        records = self._sources.get(source)
        if records is None:
            records = self._sources[source] = {}
        name = event.resource_type
        value = event.usage_percent
        old = records.get(name)
        if old is None:
            records[name] = (1, value, value, value, value, event.timestamp)
        else:
            count, _, low, high, mean, _ = old
            count += 1
            records[name] = (
                count,
                value,
                value if value < low else low,
                value if value > high else high,
                mean + (value - mean) / count,
                event.timestamp,
            )
        return self._fan_out(event)

    def _count_missed(self, count: int) -> None:
        """``count`` usages of another process were lost on the way: missed by every subscriber."""
        channels = self._channels
        for channel in channels:
            channel.missed += count
        self._missed += count * len(channels)

    async def relay(
        self,
        redis: str | coredis.Redis[bytes],
        *,
        prefix: str | bytes = "darwin-metrics:",
        source: str | None = None,
        maxlen: int = 10_000,
        publish: bool = True,
        receive: bool = True,
        keepalive: float | timedelta = 1.0,
        max_pending: int = 10_000,
    ) -> UsageRelay:
        """Share usages with other processes through a Valkey/Redis stream, until the exit.

        Every usage tracked from now on is also appended to the stream ``prefix + "usage"``
        (``XADD ... MAXLEN ~ maxlen``) with this relay's id, host name, source, a sequence
        number, the type, the usage and the time; and every usage that other processes' relays
        append is delivered to this manager's subscribers, with :attr:`ResourceUsage.source`
        saying where it came from, under each subscription's own overflow policy. This
        process's own usages are not delivered twice. A usage that could not be read (the
        stream was trimmed past it while this relay lagged, or a server restart lost it) is
        counted in every subscription's ``missed``, from the gaps in its publisher's
        sequence numbers, so ``received + missed`` stays exact. Relayed usages go into
        :meth:`usage_statistics_by_source`, never into :meth:`usage_statistics`.

        The relay runs in the manager's task group, reconnecting with backoff whenever its
        connections drop (reading resumes where it stopped; what was tracked meanwhile is
        sent once the server is back, up to ``max_pending`` usages). It stops when the
        manager exits or when :meth:`~darwin_metrics.redis.UsageRelay.aclose` or
        :meth:`~darwin_metrics.redis.UsageRelay.cancel` is called; stopping sends what is
        still queued and a goodbye (within ``keepalive``).
        See :class:`darwin_metrics.redis.UsageRelay` for the delivery model. Needs the
        ``redis`` extra: ``pip install "darwin-metrics[redis]"``.

        Args:
            redis: A ``redis://``, ``rediss://`` or ``unix://`` URL, or a ``coredis.Redis``
                client (``decode_responses=False``) whose address and credentials the relay
                uses for its own two connections; the client itself is left alone.
            prefix: The stream is ``prefix + "usage"``: str (UTF-8) or bytes, not empty.
                Relays with the same prefix on the same server see each other.
            source: This process's name on the usages it publishes: a non-empty str;
                ``"<host name>/<process id>"`` by default.
            maxlen: About how many usages the stream keeps (``MAXLEN ~``): an int >= 1.
            publish: Whether to publish this manager's usages.
            receive: Whether to deliver other processes' usages to the subscribers.
            keepalive: Seconds (or a timedelta): a server silent for this long is given up
                and reconnected to; also the time stopping may take to send what is queued.
            max_pending: The most usages queued for the server while it is unreachable; the
                oldest beyond it are dropped (and missed by the other processes).

        Returns:
            The running :class:`~darwin_metrics.redis.UsageRelay`, connected and reading
            from the end of the stream as it was when the call was made.

        Raises:
            RuntimeError: Called outside ``async with manager:``, or while another relay of
                this manager runs (one at a time).
            TypeError: An argument has the wrong type.
            ValueError: A bad URL, an empty prefix or source, a ``maxlen``, ``max_pending``
                or ``keepalive`` out of range, or ``publish`` and ``receive`` both false.
            ImportError: coredis is not installed.
            RedisUnavailableError: The server could not be reached or refused the connection
                (nothing is left running).
            UsageRelayError: The server refused the relay's commands (the key holds
                something other than a stream, or the user may not run them).

        Checkpoint: yes. Cancellation: if it raises (cancelled, or an error), no relay runs:
        nothing was published and nothing will be delivered (a relay cancelled after it
        connected closes its connections in the background, within the task group). If it
        returns, the relay runs.
        """
        task_group = self._running_task_group("relay")
        from .._redis._relay import start_relay

        return await start_relay(
            self,
            task_group,
            redis,
            prefix=prefix,
            source=source,
            maxlen=maxlen,
            publish=publish,
            receive=receive,
            keepalive=keepalive,
            max_pending=max_pending,
        )

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

    async def _watch_for_deadlocks(self) -> None:
        """Wake, with an error, subscribers that wait inside the block in a way that never ends.

        Two looks a second apart must agree, so a nesting that is about to be undone (a
        subscription closed from outside just then) is left alone.
        """
        suspects: set[int] = set()
        while True:
            await anyio.sleep(_DEADLOCK_CHECK_INTERVAL)
            waiting = {
                channel.waiter_task: channel for channel in self._channels if channel.waiting
            }
            stuck = stuck_waiters(self._host, waiting) if waiting else []
            for channel in stuck:
                if id(channel) in suspects:
                    channel.fail_deadlocked(
                        f"this task waits for the next event of a subscription of {self!r}, "
                        "inside a task group that the manager's 'async with' block waits "
                        "for: the block cannot end, so the subscription never ends either. "
                        "Run the consumer in a task group outside 'async with manager:' (or "
                        "close its subscription, or cancel it, before the block ends)."
                    )
            suspects = {id(channel) for channel in stuck}

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
        self._exited = False
        self._host = current_task(self._trio)
        task_group.start_soon(self._cleanup_periodically)
        task_group.start_soon(self._watch_for_deadlocks)
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
            self._exited = True
            self._host = None
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
