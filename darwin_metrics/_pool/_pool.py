"""ResourcePool: a cancellation-safe pool of reusable resources for asyncio and trio.

How capacity works
------------------
An :class:`anyio.CapacityLimiter` holds the *right to hold a resource*. Every lease takes a
token on behalf of its own borrower object (leases cross tasks, and one task may hold several),
and gives it back when the resource comes back.

- With a ``factory``, the limiter has ``max_size`` tokens. Every resource that is not idle
  (leased, being created, checked or reset) is held under a token, so a token holder always
  finds an idle resource or room to create one. Prefill takes a token for each creation too.
  (After ``resize`` shrinks the pool, leased surplus holds more tokens than there are; such a
  holder queues again until the surplus has drained.)
- Without a factory, the limiter has one token per resource the pool owns, so a token holder
  always finds an idle resource, and a pool that owns nothing answers ``None`` at once.

How waiting works
-----------------
The pool keeps its own FIFO queue of waiting leases, and takes tokens only with
``acquire_on_behalf_of_nowait``: the limiter is the gate that counts, the queue decides who is
next. Whenever a token may have become free (a resource came back, left, or was added; the
pool grew), :meth:`ResourcePool._serve` hands tokens to the longest waiters at once, each
together with an idle resource bound to its lease when there is one, and wakes them. So a
released resource goes to the longest waiter, no newcomer can jump the queue (the fast path is
taken only while nobody waits), and ``statistics()`` never shows a resource idle while a task
waits for one. A waiter woken with a token keeps its place if the resource fails its
``check``: it tries the next one, or waits again at the head of the queue.

A waiter that is cancelled just as it is served (possible on asyncio, where a wake-up and a
``task.cancel()`` can cross) passes its token and resource on to the next waiter: nothing is
lost, whatever cancelled it: an anyio scope, trio, or asyncio's own ``task.cancel()``.

What must finish, finishes
--------------------------
State changes that belong together never straddle an ``await``: a resource being checked or
reset is owned (it counts in ``size`` and in the owned map) but is neither idle nor leased
until its hook returns; every other ``await`` either comes before the state changes or is
undone by an ``except BaseException`` block. The ``reset`` and ``dispose`` hooks run through
:func:`~darwin_metrics._lowlevel.run_protected`: no cancellation reaches them (on asyncio a
native ``task.cancel()`` is held back until the bookkeeping is done, then re-raised), a hook
that raises anything (``KeyboardInterrupt`` included) fails only its resource, and a hook that
hangs is abandoned after ``hook_timeout`` seconds.

A pool belongs to the event loop that first uses it; using it from another one raises
:class:`RuntimeError` before anything changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import typing
import warnings
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio
from anyio import CancelScope, WouldBlock

from .._errors import (
    PoolClosedError,
    PoolEmptyError,
    PoolFullError,
    PoolOverloadedError,
    PoolPausedError,
    PoolTimeoutError,
    ResourceCheckError,
)
from .._histogram import FOLD_EVERY, _Recorder
from .._lowlevel import (
    HookTimeoutError,
    Parker,
    current_loop,
    run_protected,
    wrong_loop_error,
)
from .._lowlevel import duration_clock as _duration_clock
from .._lowlevel import get_running_loop as _get_running_loop
from .._lowlevel import trio_checkpoint as _trio_checkpoint
from .._lowlevel import trio_token as _trio_token
from .._tasks import exit_task_group
from . import _shared, _upkeep
from ._args import DEFAULT, Default, check_hook, check_seconds, check_size
from ._entries import Entry, Lease, where_acquired
from ._holders import find_holders
from ._lease import Acquisition, LeaseContext
from ._statistics import DisposalReason, PoolDisposals, PoolStatistics, TimingKind

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ResourcePool"]

T = TypeVar("T")

logger = logging.getLogger("darwin_metrics")

_LIFETIME_JITTER = 0.1  # resources retire within the last 10% of max_lifetime
_DEFAULT_HOOK_TIMEOUT = 10.0
_DEFAULT_READY_TIMEOUT = 30.0
_DISPOSAL_REASONS: tuple[DisposalReason, ...] = typing.get_args(DisposalReason)


def _call_watcher(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("pool watcher %r raised", callback)


class ResourcePool(Generic[T]):
    """A pool of reusable resources, leased in strict FIFO order.

    The pool never owns more than ``max_size`` resources, idle and leased together. Resources
    come from ``factory`` on demand, or are added by hand with :meth:`release`. It works on
    asyncio and trio, and belongs to the event loop that first uses it.

    Example::

        async with ResourcePool(10, factory=open_connection, dispose=close) as pool:
            async with pool.lease(timeout=5) as conn:
                await conn.send(b"ping")

    Args:
        max_size: The most resources the pool may own (an int of at least 1).
        factory: Makes a resource: a callable returning one, or an awaitable of one.
        check: Validates an idle resource on checkout; returning false or raising disposes
            it, and the pool tries the next idle resource or creates one.
        reset: Runs on a resource that comes back, protected from cancellation; raising (or
            running past ``hook_timeout``) disposes the resource.
        dispose: Closes a resource that leaves the pool (sync or async), protected from
            cancellation. Its errors are logged (logger ``darwin_metrics``), never raised.
        min_idle: Idle resources that upkeep keeps ready (needs ``factory``).
        max_idle_time: Upkeep disposes resources idle for longer (never going below
            ``min_idle``); ``None`` keeps them.
        max_lifetime: Resources older than this are retired, idle ones by upkeep and leased
            ones when they come back; each gets up to 10% less, so they don't all retire at
            once. ``None`` keeps them.
        leak_threshold: A lease held longer logs a warning that says where it was acquired.
        timeout: The default ``timeout`` of :meth:`acquire` and :meth:`lease` (seconds, or
            ``None`` to wait for ever); each call may give its own.
        max_waiting: The most tasks that may wait for a resource at once; an acquisition that
            would make one more wait raises :class:`~darwin_metrics.PoolOverloadedError` at
            once, so that a service sheds load instead of queueing for ever. ``None`` (the
            default) sets no bound; ``0`` never waits.
        check_after_idle: Run ``check`` on checkout only for resources idle for longer than
            this many seconds (checking every checkout costs a round trip). Needs ``check``.
        check_on_create: Run ``check`` on new resources too. One that fails is disposed and
            the acquisition raises :class:`~darwin_metrics.ResourceCheckError` (a factory
            error: it is counted in ``factory_errors``, and never retried in a loop).
        keepalive: Upkeep exercises resources idle for this many seconds with ``ping`` (or
            ``check`` if there is no ``ping``), one at a time, and disposes those that fail,
            so that a server never drops an idle connection unnoticed. Needs
            ``async with pool:``.
        ping: The hook ``keepalive`` runs (sync or async), protected from cancellation and
            bounded by ``hook_timeout``; raising or returning ``False`` fails the resource.
        ready_timeout: How long ``async with pool:`` waits for the first ``min_idle``
            resources before it raises :class:`~darwin_metrics.PoolTimeoutError` (default
            30 s; ``None`` waits for ever).
        on_timing: Called as ``on_timing(kind, seconds)`` with every duration the pool
            measures: ``"wait"`` (an acquisition that waited), ``"use"`` (a lease, from
            acquisition to return) and ``"create"`` (a factory call), for example to record
            them in OpenTelemetry histograms. It runs synchronously in the task that measured
            it, so it must be cheap; its errors are logged. The pool keeps its own histograms
            in :meth:`statistics` either way.
        hook_timeout: Seconds an async ``reset`` or ``dispose`` may take (default 10). One
            that takes longer is abandoned (cancelled) with an error logged; its resource
            leaves the pool and the caller goes on. ``None`` waits for ever.
        shared_limit: A limit that this pool shares with other pools and processes, such as a
            :class:`~darwin_metrics.redis.SharedCapacityLimiter` (needs ``factory``). The pool
            takes one of its tokens before it creates a resource, and gives it back once the
            resource is disposed: idle resources keep theirs (a database counts idle connections
            too), so tokens move between processes only as resources are disposed: set
            ``max_idle_time`` (a quiet pool gives its tokens back) and, under sustained load,
            ``max_lifetime`` (replacements queue for tokens in FIFO order with everyone else's).
            Waiting for a token is part of the acquisition (bounded by its ``timeout``, ended by
            its cancellation), and gives way to a resource of this pool that comes back meanwhile;
            a creation that fails or is cancelled gives its token back at once. Prefill
            (``min_idle``) takes only tokens that are free at once. A resource whose token was lost
            (the limiter could not renew it in time, or stopped first) is disposed at its next
            checkout or return, or by upkeep if idle (reason ``limit_lost``). Use the pool inside
            the limiter's ``async with limiter.running():`` block.

    Hooks may be sync or async callables. Prefill, idle reaping, retirement of idle resources
    and leak warnings while a lease is held run in the upkeep task of ``async with pool:``.

    ``reset`` and ``dispose`` complete even when the task running them is cancelled, however
    it is cancelled (an anyio scope, trio, or asyncio's own ``task.cancel()`` as used by
    ``asyncio.timeout``, ``asyncio.wait_for`` and ``asyncio.TaskGroup``): the cancellation is
    raised once the resource is back in the pool or disposed. A hook that raises a
    ``KeyboardInterrupt`` or ``SystemExit`` fails its resource (disposed, its slot freed), and
    the exception is raised after the pool's books are straight.
    """

    __slots__ = (
        "__weakref__",
        "_acquired",
        "_acquired_after_wait",
        "_check",
        "_check_after_idle",
        "_check_on_create",
        "_clock",
        "_closed",
        "_create_time",
        "_created",
        "_creating",
        "_disposals",
        "_dispose",
        "_disposed",
        "_draining",
        "_factory",
        "_factory_errors",
        "_generation",
        "_hook_timeout",
        "_idle",
        "_keepalive",
        "_leak_threshold",
        "_leased",
        "_limiter",
        "_longest_wait",
        "_loop",
        "_max_idle_time",
        "_max_lifetime",
        "_max_size",
        "_max_waiting",
        "_min_idle",
        "_on_timing",
        "_owned",
        "_pause_rejects",
        "_paused",
        "_ping",
        "_plain_checkout",
        "_plain_return",
        "_ready_timeout",
        "_record_use",
        "_reset",
        "_shared_limit",
        "_shared_lost",
        "_shared_tokens",
        "_shared_waits",
        "_size",
        "_task_group",
        "_timeout",
        "_timeouts",
        "_total_wait",
        "_trio",
        "_upkeep_due",
        "_upkeep_scope",
        "_upkeep_wakeup",
        "_use_time",
        "_wait_time",
        "_waiters",
        "_waits_abandoned",
        "_warned_upkeep",
        "_watchers",
    )

    def __init__(
        self,
        max_size: int,
        *,
        factory: Callable[[], T | Awaitable[T]] | None = None,
        check: Callable[[T], bool | Awaitable[bool]] | None = None,
        reset: Callable[[T], object] | None = None,
        dispose: Callable[[T], object] | None = None,
        min_idle: int = 0,
        max_idle_time: float | None = None,
        max_lifetime: float | None = None,
        leak_threshold: float | None = None,
        timeout: float | None = None,
        max_waiting: int | None = None,
        check_after_idle: float | None = None,
        check_on_create: bool = False,
        keepalive: float | None = None,
        ping: Callable[[T], object] | None = None,
        ready_timeout: float | None = _DEFAULT_READY_TIMEOUT,
        on_timing: Callable[[TimingKind, float], object] | None = None,
        hook_timeout: float | None = _DEFAULT_HOOK_TIMEOUT,
        shared_limit: _shared.SharedLimit | None = None,
    ) -> None:
        self._max_size = check_size("max_size", max_size, 1)
        self._min_idle = check_size("min_idle", min_idle, 0)
        if min_idle > max_size:
            raise ValueError(f"min_idle must be at most max_size ({max_size}), got {min_idle!r}")
        for name, hook in (
            ("factory", factory),
            ("check", check),
            ("reset", reset),
            ("dispose", dispose),
            ("ping", ping),
            ("on_timing", on_timing),
        ):
            check_hook(name, hook)
        if min_idle and factory is None:
            raise ValueError("min_idle needs a factory to create the idle resources")
        self._max_idle_time = check_seconds("max_idle_time", max_idle_time)
        max_lifetime = check_seconds("max_lifetime", max_lifetime)
        if max_lifetime == 0:
            raise ValueError("max_lifetime must be positive, got 0")
        self._max_lifetime = max_lifetime
        self._leak_threshold = check_seconds("leak_threshold", leak_threshold)
        self._hook_timeout = check_seconds("hook_timeout", hook_timeout)
        self._timeout = check_seconds("timeout", timeout)
        self._ready_timeout = check_seconds("ready_timeout", ready_timeout)
        self._max_waiting = (
            None if max_waiting is None else check_size("max_waiting", max_waiting, 0)
        )
        self._check_after_idle = check_seconds("check_after_idle", check_after_idle)
        if self._check_after_idle is not None and check is None:
            raise ValueError("check_after_idle needs a check hook to run")
        if not isinstance(check_on_create, bool):
            raise TypeError(
                f"check_on_create must be a bool, got {type(check_on_create).__name__} "
                f"{check_on_create!r}"
            )
        if check_on_create and check is None:
            raise ValueError("check_on_create needs a check hook to run")
        self._check_on_create = check_on_create
        self._keepalive = check_seconds("keepalive", keepalive)
        if self._keepalive == 0:
            raise ValueError("keepalive must be positive, got 0")
        if self._keepalive is not None and ping is None and check is None:
            raise ValueError("keepalive needs a ping (or check) hook to exercise idle resources")
        if ping is not None and self._keepalive is None:
            raise ValueError("ping is the keepalive hook: give keepalive=SECONDS too")
        self._ping = ping
        self._factory = factory
        self._check = check
        self._reset = reset
        self._dispose = dispose
        self._on_timing = on_timing
        # The shared limit (see _shared.py): a token per resource created, until disposed.
        self._shared_limit = _shared.check(shared_limit, factory)
        self._shared_tokens: dict[int, _shared.Token] = {}
        self._shared_waits: list[CancelScope] = []  # creations waiting for a token
        self._shared_lost: set[int] = set()  # resources whose token was lost

        self._idle: list[Entry] = []
        self._leased: dict[int, Lease] = {}
        # Every resource the pool owns, by identity: idle, leased, or being checked or reset.
        self._owned: dict[int, Entry] = {}
        self._size = 0
        self._creating = 0
        self._closed = False
        self._paused = self._pause_rejects = False
        # drain() starts a new generation; resources of older ones are disposed on return.
        self._generation = 0
        self._draining = 0  # leased resources of older generations
        self._warned_upkeep = False
        # The event loop this pool belongs to, and what comes with it: bound on first use.
        self._loop: object | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        self._trio = False
        self._clock: Callable[[], float] = anyio.current_time
        # Leases waiting for a token, longest waiting first.
        self._waiters: deque[Lease] = deque()
        self._watchers: list[Callable[[], None]] = []
        self._task_group: anyio.abc.TaskGroup | None = None
        self._upkeep_scope: CancelScope | None = None
        self._upkeep_wakeup: anyio.Event | None = None
        self._upkeep_due = math.inf  # when the upkeep task wakes next by itself
        self._plain_checkout = self._plain_return = False
        self._update_fast_paths()

        self._created = 0
        self._disposed = 0
        self._disposals: dict[DisposalReason, int] = dict.fromkeys(_DISPOSAL_REASONS, 0)
        self._factory_errors = 0
        self._acquired = 0
        self._acquired_after_wait = 0
        self._waits_abandoned = 0
        self._timeouts = 0
        self._total_wait = 0.0
        self._longest_wait = 0.0
        self._wait_time = _Recorder()
        self._use_time = _Recorder()
        self._record_use = self._use_time.append
        self._create_time = _Recorder()

    # ------------------------------------------------------------------ introspection

    @property
    def max_size(self) -> int:
        """The most resources the pool may own; change it with :meth:`resize`."""
        return self._max_size

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of the pool's state and counters (from any thread)."""
        return PoolStatistics(
            max_size=self._max_size,
            min_idle=self._min_idle,
            size=self._size,
            idle=len(self._idle),
            leased=len(self._leased),
            waiting=len(self._waiters),
            created=self._created,
            disposed=self._disposed,
            disposals=PoolDisposals(**self._disposals),
            factory_errors=self._factory_errors,
            acquired=self._acquired,
            acquired_after_wait=self._acquired_after_wait,
            waits_abandoned=self._waits_abandoned,
            timeouts=self._timeouts,
            total_wait=self._total_wait,
            longest_wait=self._longest_wait,
            wait_time=self._wait_time.snapshot(),
            use_time=self._use_time.snapshot(),
            create_time=self._create_time.snapshot(),
        )

    def _timed(self, kind: TimingKind, seconds: float) -> None:
        """Tell ``on_timing`` (set) about a duration."""
        on_timing = self._on_timing
        assert on_timing is not None
        try:
            on_timing(kind, seconds)
        except Exception:
            logger.exception("on_timing(%r, %r) raised", kind, seconds)

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        return (
            f"<darwin_metrics.ResourcePool at {id(self):#x}, "
            f"{len(self._leased)}/{self._max_size} leased, {len(self._idle)} idle, "
            f"{len(self._waiters)} waiting{state}>"
        )

    def __del__(self) -> None:
        # Only when something would really be lost: resources that a dispose hook never closed.
        if not getattr(self, "_closed", True) and self._dispose is not None and self._idle:
            warnings.warn(
                f"{self!r} was never closed: {len(self._idle)} idle resources were not "
                "disposed. Use 'async with pool:' or 'await pool.aclose()'.",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    def _update_fast_paths(self) -> None:
        # Checkout is a plain pop, and a return a plain append, unless a hook, upkeep or a
        # watcher must see it.
        observed = (
            self._leak_threshold is not None
            or bool(self._watchers)
            or bool(self._shared_lost)  # a lost token's resource leaves at checkout or return
        )
        self._plain_checkout = (
            self._check is None and self._max_lifetime is None and not self._min_idle
        ) and not observed
        # A return must note when the resource went idle if anything times idleness, and must
        # look at its generation while drain() waits for older resources to come back.
        self._plain_return = (
            self._reset is None
            and not self._needs_clock()
            and not self._draining
            and not self._shared_waits  # a return lets a creation waiting for a token off
        ) and not observed

    def _watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change of the leased count or of ``max_size``.

        The callback runs synchronously in the task that made the change; it must be cheap
        and must not raise (errors are logged). Returns a function that removes it.
        """
        self._watchers.append(callback)
        self._update_fast_paths()

        def unwatch() -> None:
            if callback in self._watchers:
                self._watchers.remove(callback)
                self._update_fast_paths()

        return unwatch

    def _notify(self) -> None:
        for callback in tuple(self._watchers):
            _call_watcher(callback)

    # ------------------------------------------------------------------ the event loop

    def _enter(self) -> anyio.CapacityLimiter:
        """Check that the running event loop is this pool's (binding it on first use).

        Every async entry point calls this before changing anything. Raises RuntimeError
        from another event loop; returns the limiter.
        """
        limiter = self._limiter
        if limiter is None:
            return self._bind_loop()
        try:
            running = _trio_token() if self._trio else _get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise wrong_loop_error(self, "pool")
        return limiter

    def _bind_loop(self) -> anyio.CapacityLimiter:
        on_trio, loop = current_loop()
        tokens = self._max_size if self._factory is not None else self._size
        limiter = anyio.CapacityLimiter(tokens)
        self._trio = on_trio
        self._loop = loop
        self._clock = _duration_clock(on_trio)
        self._limiter = limiter
        return limiter

    async def _checkpoint(self) -> None:
        # The running backend's own checkpoint, resolved once: anyio's looks it up every call.
        if self._trio:
            await _trio_checkpoint()
        else:
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ internals

    def _is_closed(self) -> bool:
        # A call, so that type checkers don't assume an await left it unchanged.
        return self._closed

    def _closed_error(self) -> PoolClosedError:
        return PoolClosedError(f"{self!r} is closed")

    def _empty_error(self) -> PoolEmptyError:
        return PoolEmptyError(
            f"{self!r} owns no resource and has no factory: release a resource into it "
            "or give it a factory"
        )

    def _new_entry(self, resource: T) -> Entry:
        """Take ownership of a resource (sync: no await between this and its placement)."""
        if id(resource) in self._owned:
            raise RuntimeError(f"the pool already owns {resource!r}: a resource joins it once")
        now = anyio.current_time() if self._needs_clock() else 0.0
        retire_at = math.inf
        if self._max_lifetime is not None:
            retire_at = now + self._max_lifetime * (1.0 - _LIFETIME_JITTER * random.random())
        entry = Entry(resource, now, retire_at, self._generation)
        self._owned[id(resource)] = entry
        self._size += 1
        self._created += 1
        return entry

    def _needs_clock(self) -> bool:
        """Whether resources must know when they were made and went idle."""
        return (
            self._max_lifetime is not None
            or self._max_idle_time is not None
            or self._check_after_idle is not None
            or self._keepalive is not None
        )

    def _bind(self, lease: Lease, entry: Entry) -> None:
        """Record that ``lease`` holds ``entry`` (sync)."""
        lease.entry = entry
        self._leased[id(entry.resource)] = lease
        self._acquired += 1
        lease.acquired_at = self._clock()
        if self._leak_threshold is not None:
            lease.leak_at = anyio.current_time() + self._leak_threshold
            self._schedule_upkeep(lease.leak_at)
        if self._watchers:
            self._notify()

    def _unbind(self, lease: Lease) -> Entry:
        entry = lease.entry
        assert entry is not None
        del self._leased[id(entry.resource)]
        lease.entry = None
        held = self._clock() - lease.acquired_at
        self._use_time.observe(held)
        if self._on_timing is not None:
            self._timed("use", held)
        if (
            self._leak_threshold is not None
            and not lease.warned
            and anyio.current_time() >= lease.leak_at
        ):
            _upkeep.warn_leak(self, entry.resource, lease, held)
        if self._watchers:
            self._notify()
        return entry

    def _undo_handoff(self, lease: Lease) -> Entry:
        """Take back a resource bound to a waiter that never used it (sync)."""
        entry = lease.entry
        assert entry is not None
        del self._leased[id(entry.resource)]
        lease.entry = None
        self._acquired -= 1
        if self._watchers:
            self._notify()
        return entry

    def _forget(self, entry: Entry, reason: DisposalReason) -> None:
        """The pool no longer owns ``entry`` (sync); its dispose hook is the caller's job."""
        del self._owned[id(entry.resource)]
        self._size -= 1
        self._disposed += 1
        self._disposals[reason] += 1
        if entry.generation != self._generation:
            self._draining -= 1
            if not self._draining:
                self._update_fast_paths()  # the last of the drained ones is gone
        if self._factory is None and self._limiter is not None:
            # One token per owned resource. Lowering total_tokens never takes a token back.
            self._limiter.total_tokens = self._size
            if self._size == 0:
                # Waiting could never end now: wake every waiter; each answers None.
                self._wake_all_waiters()
        if self._min_idle:
            self._wake_upkeep()

    def _release_token(self, lease: Lease) -> None:
        """Give back the token ``lease`` holds, and hand what it frees to the next waiters."""
        limiter = self._limiter
        assert limiter is not None
        limiter.release_on_behalf_of(lease)
        if self._waiters:
            self._serve()
        if self._shared_waits and self._idle:
            _shared.give_way(self)  # a creation waits for a shared token: take this instead

    def _serve(self) -> None:
        """Hand free tokens to the longest waiters, each with an idle resource if any (sync).

        Called after every change that can free a token or add an idle resource. A waiter
        that was cancelled (and has not resumed yet) is skipped: it can no longer be woken.
        """
        if self._paused:
            return  # resume() serves them
        waiters = self._waiters
        limiter = self._limiter
        assert limiter is not None
        while waiters:
            head = waiters[0]
            parker = head.parker
            assert parker is not None
            if not parker.parked:
                waiters.popleft()  # cancelled: it leaves by itself, taking nothing
                continue
            try:
                limiter.acquire_on_behalf_of_nowait(head)
            except WouldBlock:
                return
            waiters.popleft()
            head.granted = True
            idle = self._idle
            if idle:
                self._bind(head, idle.pop())
            parker.wake()

    def _wake_all_waiters(self) -> None:
        """Wake every waiter without a token (sync): for close, and for an empty pool.

        Each woken task finds the pool closed (and raises) or empty without factory (and
        answers ``None``), or queues again at the head.
        """
        waiters = self._waiters
        while waiters:
            parker = waiters.popleft().parker
            assert parker is not None
            parker.wake()

    async def _park(self, lease: Lease, front: bool) -> None:
        """Wait in the queue until served (``lease.granted``) or woken for a close.

        On cancellation the lease leaves the queue; if it was served just as the
        cancellation landed, it passes its token and resource on.
        """
        parker = lease.parker
        if parker is None:
            parker = lease.parker = Parker(self._trio)
        if front:
            self._waiters.appendleft(lease)
        else:
            self._waiters.append(lease)
        start = self._clock()
        try:
            await parker.park()
        except BaseException:
            self._waits_abandoned += 1
            if lease.granted:  # served just as it was cancelled (asyncio): pass it all on
                lease.granted = False
                await self._give_up(lease)
            else:
                with contextlib.suppress(ValueError):  # skipped by _serve, or woken by a close
                    self._waiters.remove(lease)
            raise
        finally:
            waited = self._clock() - start
            self._total_wait += waited
            if waited > self._longest_wait:
                self._longest_wait = waited
            self._wait_time.observe(waited)
            if self._on_timing is not None:
                self._timed("wait", waited)

    def _put_back(self, entry: Entry) -> Entry | None:
        """Return an entry that was taken out but not used (sync); the orphan if closed."""
        if self._closed:  # aclose() has already disposed the idle ones: this is ours to do
            self._forget(entry, "closed")
            return entry
        if entry.generation != self._generation:  # drain() was called meanwhile
            self._forget(entry, "drained")
            return entry
        self._idle.append(entry)
        return None

    async def _give_up(self, lease: Lease, candidate: Entry | None = None) -> None:
        """Undo a checkout that did not complete: the resource back, the token to the next.

        ``lease`` holds a token, maybe a resource bound to it (handed over, or taken on the
        fast path) and maybe an unbound ``candidate`` taken out of idle. Nothing awaits
        unless the pool closed meanwhile and a resource must be disposed.
        """
        orphans = []
        if lease.entry is not None:
            orphans.append(self._put_back(self._undo_handoff(lease)))
        if candidate is not None:
            orphans.append(self._put_back(candidate))
        self._release_token(lease)  # to the next waiter, with the resource
        deferred: BaseException | None = None
        for orphan in orphans:
            if orphan is not None:  # every one of them, whatever the first one deferred
                deferred = await self._dispose_resource(orphan.resource) or deferred
        if deferred is not None:
            raise deferred

    async def _run_hook(
        self, name: str, hook: Callable[[T], object], resource: T
    ) -> tuple[bool, BaseException | None]:
        """Run ``reset``, ``dispose`` or ``ping`` to completion; return ``(ok, deferred)``."""
        failure, deferred = await run_protected(
            lambda: hook(resource), on_trio=self._trio, timeout=self._hook_timeout
        )
        if failure is not None:
            consequence = "the resource left the pool" if name == "dispose" else "disposing it"
            # A failed keepalive is an idle resource that went stale: worth a warning only.
            level = logging.WARNING if name == "ping" else logging.ERROR
            if isinstance(failure, HookTimeoutError):
                logger.log(
                    level,
                    "%s(%r) did not finish within hook_timeout=%s s; abandoned it, %s",
                    name,
                    resource,
                    self._hook_timeout,
                    consequence,
                )
            else:
                logger.log(
                    level, "%s(%r) raised; %s", name, resource, consequence, exc_info=failure
                )
        return failure is None, deferred

    async def _dispose_resource(self, resource: T) -> BaseException | None:
        """Run the dispose hook to completion; return the exception to raise afterwards.

        Then the resource's shared token (if any) goes back: only once it is closed.
        """
        deferred = None
        if self._dispose is not None:
            deferred = (await self._run_hook("dispose", self._dispose, resource))[1]
        if self._shared_tokens:
            _shared.give_back(self, resource)
        return deferred

    async def _drop(self, entry: Entry, reason: DisposalReason) -> None:
        """Forget and dispose an entry; then raise what the dispose deferred, if anything."""
        self._forget(entry, reason)
        deferred = await self._dispose_resource(entry.resource)
        if deferred is not None:
            raise deferred

    async def _dispose_entries(
        self, entries: Iterable[Entry], reason: DisposalReason | None = None
    ) -> None:
        """Forget the entries, then dispose every one of them whatever happens; then raise.

        ``reason`` says why they go; ``None`` for expired entries (idle, or too old).
        Disposal is protected from cancellation and bounded by ``hook_timeout``, so every
        entry counted as disposed here has had its ``dispose`` run (or abandoned, logged).
        """
        doomed = list(entries)
        for entry in doomed:
            self._forget(entry, reason or _upkeep.expiry_reason(self, entry))
        deferred: BaseException | None = None
        for entry in doomed:
            deferred = await self._dispose_resource(entry.resource) or deferred
        if deferred is not None:
            raise deferred

    async def _create(self, wait: bool = True) -> Entry:
        """Make a new resource with the factory. Cancellation or an error creates nothing.

        With a shared limit, a token of it is taken first (waiting for one if ``wait``; see
        :mod:`._shared`, whose ``GaveWay`` this raises when there is none), and given back at
        once if the creation fails.
        """
        factory = self._factory
        assert factory is not None
        self._creating += 1
        token: _shared.Token | None = None
        try:
            if self._shared_limit is not None:
                token = await _shared.take(self, wait=wait)
            start = self._clock()
            try:
                resource = factory()
                if inspect.isawaitable(resource):
                    resource = await resource
            except BaseException:
                self._factory_errors += 1
                raise
            took = self._clock() - start
            self._create_time.observe(took)
            if self._on_timing is not None:
                self._timed("create", took)
            entry = self._new_entry(resource)
        except BaseException:
            if token is not None:
                _shared.release(self, token)
            raise
        finally:
            self._creating -= 1
            if self._min_idle:
                self._wake_upkeep()  # prefill may have been waiting on this creation
        if token is not None:
            _shared.attach(self, token, entry)
        return entry

    def _due_for_check(self, entry: Entry) -> bool:
        """Whether an idle resource is checked on this checkout (``check_after_idle``)."""
        after = self._check_after_idle
        return after is None or anyio.current_time() - entry.idle_since > after

    async def _create_checked(self, wait: bool = True) -> Entry:
        """Make a resource; with ``check_on_create``, check it (a failure: a factory error)."""
        entry = await self._create(wait)
        if self._check_on_create and not await self._passes_check(entry):
            self._factory_errors += 1
            raise ResourceCheckError(
                f"a resource the factory just made failed its check ({self!r}); it was disposed"
            )
        return entry

    async def _passes_check(self, entry: Entry) -> bool:
        """Run ``check`` on an entry being checked out; dispose it if it fails."""
        check = self._check
        assert check is not None
        try:
            result = check(entry.resource)
            if inspect.isawaitable(result):
                result = await result
            ok = bool(result)
        except Exception:
            logger.warning("check(%r) raised; disposing it", entry.resource, exc_info=True)
            ok = False
        except BaseException:
            # Cancelled mid-check: the resource's state is unknown, so it leaves the pool.
            await self._drop(entry, "check_failed")
            raise
        if not ok:
            await self._drop(entry, "check_failed")
        return ok

    async def _fill(self, lease: Lease, entry: Entry | None = None) -> Lease | None:
        """Bind a token holder to ``entry`` (handed over), an idle resource or a new one.

        The caller holds a token for ``lease``. Returns the bound lease, or ``None`` (still
        holding the token) when there is neither an idle resource nor room to create one.
        On any exception the token is released.
        """
        try:
            while True:
                if self._closed:
                    if entry is not None:
                        await self._drop(entry, "closed")  # handed over just before the close
                    raise self._closed_error()
                idle = self._idle
                if entry is None and idle:
                    entry = idle.pop()
                if entry is not None:
                    candidate, entry = entry, None
                    if candidate.generation != self._generation:
                        await self._drop(candidate, "drained")
                        continue
                    if (
                        self._max_lifetime is not None
                        and candidate.retire_at <= anyio.current_time()
                    ):
                        await self._drop(candidate, "lifetime")
                        continue
                    if _shared.is_lost(self, candidate):
                        await self._drop(candidate, "limit_lost")
                        continue
                    if self._check is not None and self._due_for_check(candidate):
                        if not await self._passes_check(candidate):
                            continue
                        if self._is_closed():  # closed while the check ran
                            await self._drop(candidate, "closed")
                            raise self._closed_error()
                elif self._factory is not None and self._size + self._creating < self._max_size:
                    try:
                        candidate = await self._create_checked()
                    except _shared.GaveWay:
                        continue  # a resource came back while this waited for a shared token
                    if self._is_closed():  # closed while the factory ran
                        await self._drop(candidate, "closed")
                        raise self._closed_error()
                else:
                    return None
                self._bind(lease, candidate)
                if self._min_idle and len(idle) < self._min_idle:
                    self._needs_upkeep()
                return lease
        except BaseException:
            self._release_token(lease)
            raise

    async def _slow_take(
        self, lease: Lease, holding: bool, candidate: Entry | None = None
    ) -> Lease | None:
        """Wait for a token if needed, then bind a resource; ``None`` if the pool is empty.

        ``holding`` says whether the caller already holds a token for ``lease``, and
        ``candidate`` is an idle resource it took out to check first.
        """
        limiter = self._limiter
        assert limiter is not None
        front = False  # woken without a token, or the resource failed: keep our place
        waited = False
        while True:
            if not holding:
                if self._closed:
                    raise self._closed_error()
                if self._factory is None and self._size == 0:
                    return None  # the caller checkpointed, or this task waited
                if self._paused and self._pause_rejects:
                    raise PoolPausedError(f"{self!r} is paused: acquisitions fail until resume()")
                if not self._waiters and not self._paused:
                    try:
                        limiter.acquire_on_behalf_of_nowait(lease)
                        holding = True
                    except WouldBlock:
                        pass
                if not holding:
                    if (
                        not front
                        and self._max_waiting is not None
                        and len(self._waiters) >= self._max_waiting
                    ):
                        raise PoolOverloadedError(
                            f"{self!r}: {len(self._waiters)} tasks wait already "
                            f"(max_waiting={self._max_waiting}); try again later"
                        )
                    waited = True
                    await self._park(lease, front)
                    if not lease.granted:
                        front = True
                        continue
                    lease.granted = False
                    holding = True
            entry = lease.entry  # bound when it was handed over to us
            if entry is not None:
                if self._plain_checkout and not self._closed:
                    self._acquired_after_wait += waited
                    return lease
                entry = self._undo_handoff(lease)  # checked again below, as any checkout
            elif candidate is not None:
                entry, candidate = candidate, None
            # A closed pool makes _fill raise; an empty one without factory, return None.
            if await self._fill(lease, entry) is not None:
                self._acquired_after_wait += waited
                return lease
            # Neither idle nor room (the pool shrank, or checks failed): wait at the head.
            self._release_token(lease)
            holding = False
            front = True

    async def _take(self, lease: Lease, timeout: float | None) -> Lease | None:
        """Acquire a lease: the one template behind acquire, lease and their timeouts."""
        if self._closed:
            raise self._closed_error()
        # The event loop check of _enter, inline: this is every acquisition's path.
        try:
            running = _trio_token() if self._trio else _get_running_loop()
        except RuntimeError:
            running = None
        limiter = self._limiter
        if running is not self._loop or limiter is None:
            limiter = self._enter()  # binds on first use; raises from another loop
        if not self._waiters and not self._paused:  # newcomers queue behind waiting tasks
            try:
                limiter.acquire_on_behalf_of_nowait(lease)
            except WouldBlock:
                pass
            else:
                idle = self._idle
                if idle and self._plain_checkout:
                    # Fast path: take the resource, then one checkpoint; if that is cancelled,
                    # put everything back. Taking it first means it is never seen idle while a
                    # task waits.
                    entry = lease.entry = idle.pop()
                    self._leased[id(entry.resource)] = lease  # no duplicates come from idle
                    self._acquired += 1
                    if not self._acquired % FOLD_EVERY:  # lease returns append use times
                        self._use_time.fold()
                    lease.acquired_at = self._clock()
                    try:
                        if self._trio:
                            await _trio_checkpoint()
                        else:
                            await asyncio.sleep(0)
                    except BaseException:
                        await self._give_up(lease)
                        raise
                    if self._idle is idle:  # not closed meanwhile: aclose() swaps the list
                        return lease
                    await self._give_up(lease)
                    raise self._closed_error()
                return await self._take_holding(lease, timeout)
        elif self._factory is None and self._size == 0:
            # Waiting could never end: answer at once, before any timeout starts.
            await self._checkpoint()
            return None
        return await self._finish_take(lease, False, None, timeout)

    async def _take_holding(self, lease: Lease, timeout: float | None) -> Lease | None:
        """Acquire for a lease that holds a token, when the fast path does not apply."""
        idle = self._idle
        candidate = idle.pop() if idle else None  # checked after the checkpoint
        try:
            await self._checkpoint()
        except BaseException:
            await self._give_up(lease, candidate)
            raise
        return await self._finish_take(lease, True, candidate, timeout)

    async def _finish_take(
        self, lease: Lease, holding: bool, candidate: Entry | None, timeout: float | None
    ) -> Lease | None:
        if timeout is None:
            taken = await self._slow_take(lease, holding, candidate)
        else:
            taken = await self._slow_take_within(lease, holding, candidate, timeout)
        if taken is not None and self._leak_threshold is not None:
            lease.where = where_acquired()
        return taken

    async def _slow_take_within(
        self, lease: Lease, holding: bool, candidate: Entry | None, timeout: float
    ) -> Lease | None:
        """:meth:`_slow_take` under ``fail_after``: it costs more than the fast path."""
        try:
            with anyio.fail_after(timeout) as scope:
                return await self._slow_take(lease, holding, candidate)
        except TimeoutError:
            if not scope.cancelled_caught:
                raise  # the factory's own TimeoutError, not ours
            self._timeouts += 1
            raise PoolTimeoutError(
                f"no resource became available within {timeout} s ({self!r})"
            ) from None

    def _resolve_timeout(self, timeout: float | Default | None) -> float | None:
        """A call's ``timeout``: checked, or the pool's own when the call gave none."""
        if timeout is DEFAULT:
            return self._timeout
        return check_seconds("timeout", timeout)

    # ------------------------------------------------------------------ public API

    def acquire(self, *, timeout: float | Default | None = DEFAULT) -> Acquisition[T]:
        """Acquire a resource, waiting in strict FIFO order if none is available.

        Use it either way::

            resource = await pool.acquire()      # yours until release() or discard()
            async with pool.acquire() as resource:  # given back on exit, as lease() does
                ...

        Takes an idle resource, or makes a new one with the factory while the pool owns
        fewer than ``max_size``, or waits for one to be released.

        This is a checkpoint. If it raised (cancelled, timed out, closed), you got nothing;
        if it returned a resource, you own it and must give it back with :meth:`release` or
        :meth:`discard`. A resource handed to a waiter that is cancelled at that moment goes
        to the next waiter, or back to idle, however the waiter was cancelled (asyncio's
        own ``task.cancel()`` included).

        Args:
            timeout: Seconds to wait, including the factory's and an async ``check``'s time;
                ``None`` waits forever; left out, the pool's ``timeout``. A timeout or
                cancellation that lands inside an async ``check`` disposes the resource being
                checked: its state is unknown.

        Returns:
            Awaited: the resource, or ``None`` when waiting could never end (the pool has no
            factory and owns no resource at all). As ``async with``: the resource (an empty
            pool raises :class:`~darwin_metrics.PoolEmptyError`, as :meth:`lease` does).

        Raises:
            PoolTimeoutError: No resource within ``timeout``.
            PoolOverloadedError: ``max_waiting`` tasks wait already.
            PoolPausedError: The pool was paused with ``pause(reject=True)``.
            PoolClosedError: The pool is closed, or was closed while waiting.
            RuntimeError: Called from an event loop other than the pool's.
        """
        if timeout is DEFAULT:
            return Acquisition(self, self._timeout)
        return Acquisition(self, check_seconds("timeout", timeout))

    async def _acquire(self, timeout: float | None) -> T | None:
        taken = await self._take(Lease(), timeout)
        if taken is None:
            return None
        entry = taken.entry
        assert entry is not None
        resource: T = entry.resource
        return resource

    async def try_acquire(self) -> T | None:
        """Acquire a resource if one is available without waiting for another task.

        Takes an idle resource, or makes one with the factory while the pool owns fewer than
        ``max_size``; otherwise returns ``None``. It never queues, and tasks already waiting
        keep their turn: it answers ``None`` while any task waits.

        This is a checkpoint. If it raised, you got nothing; if it returned a resource, you
        own it.

        Raises:
            PoolClosedError: The pool is closed.
            PoolPausedError: The pool was paused with ``pause(reject=True)`` (while paused
                otherwise, it answers ``None``).
            RuntimeError: Called from an event loop other than the pool's.
        """
        if self._closed:
            raise self._closed_error()
        limiter = self._enter()
        lease = Lease()
        if self._paused and self._pause_rejects:
            raise PoolPausedError(f"{self!r} is paused: acquisitions fail until resume()")
        if self._waiters or self._paused:
            await self._checkpoint()
            return None
        try:
            limiter.acquire_on_behalf_of_nowait(lease)
        except WouldBlock:
            await self._checkpoint()
            return None
        idle = self._idle
        candidate = idle.pop() if idle else None  # never seen idle while a task waits
        try:
            await self._checkpoint()
        except BaseException:
            await self._give_up(lease, candidate)
            raise
        if await self._fill(lease, candidate) is None:
            self._release_token(lease)
            return None
        if self._leak_threshold is not None:
            lease.where = where_acquired()
        entry = lease.entry
        assert entry is not None
        resource: T = entry.resource
        return resource

    def lease(self, *, timeout: float | Default | None = DEFAULT) -> LeaseContext[T]:
        """Lease a resource for the duration of an ``async with`` block.

        ``async with pool.lease() as resource:`` acquires (as :meth:`acquire`), yields the
        resource itself, and gives it back however the block exits: normally, by an
        exception or by cancellation (giving back completes, and is never lost). If the block
        called :meth:`discard` or :meth:`release` on the resource, the exit does nothing more.

        A block that was cancelled or raised may leave its resource mid-operation (half a
        request sent). The pool gives it back all the same; make it safe with a ``reset``
        hook (run on every return) or a ``check`` hook (run on checkout), or call
        :meth:`discard` in an ``except`` clause when you know it is broken.

        Entering is a checkpoint: if it raised, you got nothing; if the block runs, you hold
        the resource. Exiting is not a checkpoint, unless a ``reset`` or ``dispose`` hook
        awaits (protected from cancellation; a cancellation that arrives meanwhile is raised
        once the resource is back).

        Args:
            timeout: As for :meth:`acquire`; left out, the pool's ``timeout``.

        Raises:
            PoolEmptyError: The pool has no factory and owns no resource (on entry).
            PoolTimeoutError: No resource within ``timeout`` (on entry).
            PoolOverloadedError: ``max_waiting`` tasks wait already (on entry).
            PoolPausedError: The pool was paused with ``pause(reject=True)`` (on entry).
            PoolClosedError: The pool is closed, or was closed while waiting (on entry).
            RuntimeError: Used from an event loop other than the pool's (on entry).
        """
        if timeout is DEFAULT:  # _resolve_timeout, inline: this is every lease's path
            return LeaseContext(self, self._timeout)
        return LeaseContext(self, check_seconds("timeout", timeout))

    async def release(self, resource: T) -> None:
        """Give back a leased resource, or add a new resource to the pool.

        A leased resource always goes back: to the longest waiter, or to idle (after the
        ``reset`` hook, if any); or it is disposed when the pool is closed, has shrunk below
        its size, or the resource outlived ``max_lifetime``. A resource the pool does not
        know is added as a new idle resource (or handed to the longest waiter).

        Not a checkpoint, unless a ``reset`` or ``dispose`` hook awaits. When the calling
        task is cancelled (however: an anyio scope, trio, or asyncio's ``task.cancel()``), the
        resource is still given back (or added) completely before the cancellation is raised.

        Raises:
            PoolFullError: Adding a new resource to a pool that owns ``max_size`` resources;
                nothing changed, and the resource is still yours.
            ValueError: The resource is already in this pool: idle, or being given back
                (released twice).
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        # The event loop check of _enter, inline: this is every return's path.
        try:
            running = _trio_token() if self._trio else _get_running_loop()
        except RuntimeError:
            running = None
        limiter = self._limiter
        if running is not self._loop or limiter is None:
            limiter = self._enter()
        lease = self._leased.get(id(resource))
        if lease is not None:
            if self._plain_return and not self._closed and self._size <= self._max_size:
                self._give_back_plainly(lease)
            else:
                await self._give_back(lease)
            return
        if id(resource) in self._owned:
            raise ValueError(
                f"{resource!r} is already in this pool, idle or being given back (released twice?)"
            )
        if self._closed:
            deferred = await self._dispose_resource(resource)
            if deferred is not None:
                raise deferred
            return
        if self._size + self._creating >= self._max_size:
            raise PoolFullError(
                f"cannot add {resource!r}: the pool already owns max_size={self._max_size} "
                "resources"
            )
        if self._shared_limit is not None:
            raise ValueError(
                f"cannot add {resource!r}: a pool with a shared_limit holds only the resources "
                "its factory made (each under a token of the limit)"
            )
        self._idle.append(self._new_entry(resource))
        if self._factory is None:
            limiter.total_tokens = self._size
        if self._waiters:
            self._serve()
        self._schedule_upkeep(_upkeep.next_due(self))

    async def discard(self, resource: T) -> None:
        """Dispose a leased resource and free its slot (for a resource found broken).

        A lease whose resource was discarded does not give it back on exit. Not a
        checkpoint, unless the ``dispose`` hook awaits; it completes even when the calling
        task is cancelled, and the cancellation is raised afterwards.

        Raises:
            ValueError: The resource is not leased from this pool.
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        self._enter()
        lease = self._leased.get(id(resource))
        if lease is None:
            raise ValueError(f"{resource!r} is not leased from this pool")
        entry = self._unbind(lease)
        self._forget(entry, "discarded")
        self._release_token(lease)
        deferred = await self._dispose_resource(entry.resource)
        if deferred is not None:
            raise deferred

    def _give_back_plainly(self, lease: Lease) -> None:
        """The common return (no hook, nothing timed, not closed or shrunk), sync."""
        entry = lease.entry
        assert entry is not None
        del self._leased[id(entry.resource)]
        lease.entry = None
        held = self._clock() - lease.acquired_at
        self._record_use(held)
        if self._on_timing is not None:
            self._timed("use", held)
        self._idle.append(entry)
        self._release_token(lease)

    async def _give_back(self, lease: Lease) -> None:
        """Return a leased resource to idle (or a waiter) or dispose it; never lost."""
        entry = self._unbind(lease)
        ok = True
        deferred: BaseException | None = None
        if self._reset is not None:
            ok, deferred = await self._run_hook("reset", self._reset, entry.resource)
        reason: DisposalReason | None = None
        if not ok:
            reason = "reset_failed"
        elif self._closed:
            reason = "closed"
        elif self._size > self._max_size:
            reason = "shrunk"
        elif entry.generation != self._generation:
            reason = "drained"
        elif self._max_lifetime is not None and entry.retire_at <= anyio.current_time():
            reason = "lifetime"
        elif _shared.is_lost(self, entry):
            reason = "limit_lost"
        if reason is None:
            self._idle.append(entry)
            if self._needs_clock():
                entry.idle_since = anyio.current_time()
                self._schedule_upkeep(_upkeep.entry_due(self, entry))
            self._release_token(lease)
        else:
            self._forget(entry, reason)
            self._release_token(lease)
            deferred = await self._dispose_resource(entry.resource) or deferred
        if deferred is not None:
            raise deferred

    async def resize(self, max_size: int) -> None:
        """Change ``max_size`` at run time.

        Growing lets waiters in at once (with a factory, they create resources). Shrinking
        disposes idle surplus now and leased surplus as it comes back.

        Not a checkpoint, unless a ``dispose`` hook awaits; disposal completes even when the
        calling task is cancelled.

        Raises:
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        max_size = check_size("max_size", max_size, 1)
        if max_size < self._min_idle:
            raise ValueError(
                f"max_size must be at least min_idle ({self._min_idle}), got {max_size}"
            )
        limiter = self._enter()
        self._max_size = max_size
        if self._factory is not None:
            limiter.total_tokens = max_size
        surplus: list[Entry] = []
        while self._size - len(surplus) > self._max_size and self._idle:
            surplus.append(self._idle.pop(0))  # the longest idle first
        if self._waiters:
            self._serve()
        if self._watchers:
            self._notify()
        self._wake_upkeep()
        await self._dispose_entries(surplus, "shrunk")

    async def retain(self, predicate: Callable[[T], bool]) -> int:
        """Dispose the idle resources for which ``predicate`` is false; return how many.

        Not a checkpoint, unless a ``dispose`` hook awaits; disposal completes even when the
        calling task is cancelled.

        Raises:
            TypeError: ``predicate`` is not callable.
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        if not callable(predicate):
            raise TypeError(f"predicate must be callable, got {type(predicate).__name__}")
        self._enter()
        keep: list[Entry] = []
        doomed: list[Entry] = []
        for entry in self._idle:
            (keep if predicate(entry.resource) else doomed).append(entry)
        self._idle[:] = keep
        await self._dispose_entries(doomed, "discarded")
        return len(doomed)

    def _warn_still_leased(self) -> None:
        """Log, for each resource still leased at the close, who holds it and where."""
        leases = list(self._leased.values())
        resources = [lease.entry.resource for lease in leases if lease.entry is not None]
        holders = find_holders(resources, self._trio)
        for lease, resource in zip(leases, resources, strict=True):
            where = (
                lease.where or holders.get(id(resource)) or "by no running task: never given back"
            )
            logger.warning(
                "%r was still leased when %r closed (held %s); it is disposed when it comes "
                "back. Give resources back with 'async with pool.lease()' or release().",
                resource,
                self,
                where if where.startswith("by ") else f"at {where}",
            )

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Make ``min_idle`` resources and wait until they are idle.

        ``async with pool:`` does this by itself; call it for a pool that is not entered that
        way, or after :meth:`drain`. Resources are made one after another, each under a
        capacity token, so waiters are never overtaken; it returns early when the pool has
        no room left for them (its resources are leased), or when its ``shared_limit`` has
        no permit free at once (it never waits for one). A checkpoint.

        Cancellation: resources made before it was cancelled stay in the pool, idle.

        Args:
            timeout: Seconds to wait at most; ``None`` waits for ever.

        Raises:
            PoolTimeoutError: Not ready within ``timeout`` (what was made stays).
            Exception: The factory's error (what was made before stays).
            PoolClosedError: The pool is closed.
            RuntimeError: Called from an event loop other than the pool's.
        """
        seconds = check_seconds("timeout", timeout)
        if self._closed:
            raise self._closed_error()
        self._enter()
        if seconds is None:
            await self._fill_to_min_idle()
            return
        try:
            with anyio.fail_after(seconds) as scope:
                await self._fill_to_min_idle()
        except TimeoutError:
            if not scope.cancelled_caught:
                raise  # the factory's own TimeoutError
            raise PoolTimeoutError(
                f"{self!r} did not have min_idle={self._min_idle} resources ready within "
                f"{seconds} s"
            ) from None

    async def _fill_to_min_idle(self) -> None:
        await self._checkpoint()
        await _upkeep.prefill(self)  # creations under tokens, as upkeep makes them

    def pause(self, *, reject: bool = False) -> None:
        """Stop handing out resources until :meth:`resume` (HikariCP's suspend).

        While paused, acquisitions wait (``reject=False``) or fail at once with
        :class:`~darwin_metrics.PoolPausedError` (``reject=True``); tasks already waiting go
        on waiting. Leases out keep working and can be given back. Not a checkpoint.
        """
        if not isinstance(reject, bool):
            raise TypeError(f"reject must be a bool, got {type(reject).__name__} {reject!r}")
        self._paused = True
        self._pause_rejects = reject

    def resume(self) -> None:
        """Hand out resources again after :meth:`pause`; the waiting tasks are served at once.

        Not a checkpoint. Raises :class:`RuntimeError` from another event loop.
        """
        if self._paused:
            if self._limiter is not None:
                self._enter()
            self._paused = self._pause_rejects = False
            if self._waiters:
                self._serve()

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` was called and :meth:`resume` not yet."""
        return self._paused

    async def drain(self) -> int:
        """Replace every resource (HikariCP's soft evict): for a credential rotation, a failover.

        Every idle resource is disposed now, and every leased one as it comes back; new
        acquisitions get fresh resources (with a factory; upkeep refills ``min_idle``).
        Returns how many idle resources were disposed now.

        Not a checkpoint, unless a ``dispose`` hook awaits; disposal completes even when the
        calling task is cancelled (the cancellation is raised afterwards).

        Raises:
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        self._enter()
        self._generation += 1
        idle = self._idle[:]
        self._idle.clear()  # the same list: a checkout in its fast path must not see a close
        # Every resource owned now belongs to an older generation.
        self._draining = self._size
        self._update_fast_paths()
        self._wake_upkeep()
        await self._dispose_entries(idle, "drained")
        return len(idle)

    async def aclose(self) -> None:
        """Close the pool. Idempotent.

        Every waiter gets :class:`~darwin_metrics.PoolClosedError`; idle resources are
        disposed now, every one of them even when the calling task is cancelled (the
        cancellation is raised afterwards); resources leased at this moment are disposed
        when they come back; upkeep stops. Not a checkpoint, unless a ``dispose`` hook awaits.

        Raises:
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        if self._closed:
            return
        self._enter()
        self._closed = True
        if self._leased:
            self._warn_still_leased()
        self._wake_all_waiters()  # each raises PoolClosedError
        if self._shared_waits:
            _shared.give_way(self, everyone=True)  # creations waiting for a shared token
        if self._upkeep_scope is not None:
            self._upkeep_scope.cancel()
        idle, self._idle = self._idle, []
        await self._dispose_entries(idle, "closed")

    async def __aenter__(self) -> Self:
        """Fill the pool to ``min_idle``, then start upkeep in a task group.

        Entering waits until ``min_idle`` resources are idle (as asyncpg's ``create_pool``
        and psycopg_pool's ``open(wait=True)`` do), for at most ``ready_timeout``; then
        upkeep (refilling, idle reaping, retirement, keepalive, leak warnings) runs in a
        task group that lives exactly as long as the ``async with`` block. On exit the pool
        is closed. A checkpoint; if entering raises, the pool is closed and nothing runs.

        Raises:
            PoolTimeoutError: ``min_idle`` resources were not ready within ``ready_timeout``.
            Exception: The factory's error, when it failed during that first fill.
            PoolClosedError: The pool is closed.
            RuntimeError: The block is already running, or the pool belongs to another
                event loop.
        """
        if self._closed:
            raise self._closed_error()
        if self._task_group is not None:
            raise RuntimeError("this pool's 'async with' block is already running")
        self._enter()
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        try:
            await self.wait_ready(self._ready_timeout)
        except BaseException as exc:
            self._task_group = None
            try:
                await self.aclose()  # its disposals complete whatever cancels us
            finally:
                await exit_task_group(task_group, type(exc), exc, exc.__traceback__)
            raise
        self._upkeep_scope = CancelScope()
        task_group.start_soon(_upkeep.run, self, self._upkeep_scope, name=f"upkeep of {self!r}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        """Close the pool (as :meth:`aclose`) and end the upkeep task group.

        The block's own exception comes out as itself, not in an exception group.
        """
        task_group = self._task_group
        assert task_group is not None
        try:
            await self.aclose()
        finally:
            self._task_group = None
            result = await exit_task_group(task_group, exc_type, exc_value, traceback)
        return result

    # ------------------------------------------------------------------ upkeep

    def _wake_upkeep(self) -> None:
        wakeup = self._upkeep_wakeup
        if wakeup is not None:
            wakeup.set()

    def _needs_upkeep(self) -> None:
        """Upkeep has work (a checkout below min_idle, an idle resource to time): wake it."""
        if self._upkeep_wakeup is not None:
            self._upkeep_wakeup.set()
        elif self._task_group is None and not self._warned_upkeep and not self._closed:
            self._warn_no_upkeep()

    def _warn_no_upkeep(self) -> None:
        """Upkeep was needed and nothing runs it: say so, once."""
        options = [
            f"{name}={value!r}"
            for name, value in (
                ("min_idle", self._min_idle or None),
                ("max_idle_time", self._max_idle_time),
                ("keepalive", self._keepalive),
            )
            if value is not None
        ]
        if not options:
            return
        self._warned_upkeep = True
        warnings.warn(
            f"{self!r} was given {', '.join(options)}, which the upkeep task of "
            "'async with pool:' carries out; this pool is used without it, so they have no "
            "effect. Use 'async with pool:' (or call 'await pool.wait_ready()' for min_idle "
            "alone).",
            RuntimeWarning,
            stacklevel=3,
        )

    def _schedule_upkeep(self, due: float) -> None:
        """Wake the upkeep task if it sleeps past ``due``."""
        if due < self._upkeep_due:
            self._needs_upkeep()
