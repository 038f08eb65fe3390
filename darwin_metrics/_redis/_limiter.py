"""``SharedCapacityLimiter``: a capacity limiter shared by processes and hosts, on Valkey/Redis.

How it works (the server's side is in :mod:`._limiter_scripts`):

- Every acquisition is a *member* ``<owner>:<n>`` (this limiter's random id and a number of
  its own), named by the client before its request is sent, so that whatever arrives first
  (the reply, or a grant message) finds it.
- ``ACQUIRE`` grants at once if fewer than ``total_tokens`` permits are held fleet-wide and
  nobody waits; otherwise the member joins the FIFO queue under a ticket. Whenever permits
  come free (a release, a holder whose lease ran out, a larger ``total_tokens``), the script
  that freed them hands them to the head of the queue and publishes each grant on its owner's
  channel; the owner's connection receives it and wakes the waiting task. No one polls.
- Holders and waiters carry deadlines taken from the server's clock; every script first
  reaps those past their deadline, so the permits of a process that died return within one
  lease. Each limiter renews all of its members in one ``RENEW`` every ``lease / 3`` from the
  task group of ``async with limiter.running():``; the reply also tells it which of its waiters
  were granted meanwhile (a grant message lost with a connection) and which holders are gone
  (their lease ran out while the process could not reach the server, or the server refused
  the renewals): those are *lost*, their ``async with limiter:`` blocks cancelled. When the
  earliest holder's lease is about to run out while tasks here wait, the limiter renews right
  then, so a dead holder's permit moves on at once.
- Giving back never awaits: ``release`` queues ``RELEASE`` on the limiter's connection at once
  (ahead of anything the process sends later) and a background task of the limiter checks the
  reply, sending it again after a reconnect. An acquisition that is cancelled or fails at any
  point gives its member back the same way; ``RELEASE`` of a member that has not arrived yet
  marks it gone, so its ``ACQUIRE`` does nothing when it does arrive. Nothing leaks.

Everything that changes the limiter's state between two awaits is synchronous, so a native
asyncio cancellation (``task.cancel()``) at any await leaves it consistent.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import math
import numbers
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, final

import anyio
import anyio.abc
import attrs

from .._errors import CapacityLostError, RedisUnavailableError
from .._lowlevel import Parker, current_loop, run_protected
from .._tasks import exit_task_group
from . import _limiter_scripts as scripts
from ._limiter_link import Link, connection_factory
from ._support import describe, duration, import_coredis

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import coredis

__all__ = ["MIN_LEASE", "SharedCapacityLimiter", "SharedCapacityLimiterStatistics", "SharedPermit"]

_logger = logging.getLogger("darwin_metrics")

#: The shortest lease: holders renew every ``lease / 3``, and a renewal needs a round trip.
MIN_LEASE = 0.3
#: The longest lease: deadlines are kept in milliseconds of the server's clock, in the
#: scripts' numbers (doubles), which must stay exact (about 31 years).
MAX_LEASE = 1e9
#: The largest total: the scripts count permits in doubles, exact up to 2**53.
MAX_TOTAL = 2**53 - 1
#: The prefix of every key and channel of a limiter named ``name``: ``PREFIX + "{name}:"``.
PREFIX = "darwin-metrics:limiter:"
#: The most members one ``RENEW`` or ``RELEASE`` carries.
_BATCH = 500
#: How long ``running()``'s exit waits for the server to confirm what it gave back.
_FLUSH_TIMEOUT = 5.0


class _State(enum.IntEnum):
    REQUESTED = 0  # ACQUIRE sent, no answer yet
    WAITING = 1  # queued on the server
    HELD = 2
    LOST = 3  # its lease ran out before it was renewed
    RELEASED = 4  # given back (or never got, and given up)


class _Run(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPED = "stopped"


@attrs.frozen
class SharedCapacityLimiterStatistics:
    """A snapshot of a :class:`SharedCapacityLimiter`, from its ``statistics()``.

    The fleet-wide figures are as of the server's latest reply to this limiter.

    Attributes:
        name: The limiter's name (every process that uses the same name shares the limit).
        total_tokens: The fleet's limit in force, as the server last reported it.
        borrowed_tokens: Permits this limiter holds now (lost ones not included).
        borrowers: Who holds them: the tasks (for :meth:`~SharedCapacityLimiter.acquire`
            and ``async with``) or the borrower objects given.
        tasks_waiting: Tasks of this process waiting for a permit.
        fleet_borrowed: Permits held by every process together.
        fleet_waiting: Acquisitions queued by every process together.
        acquired: Permits this limiter was granted, in all.
        acquired_after_wait: Of those, the ones that waited in the queue first.
        released: Permits this limiter gave back.
        cancelled: Acquisitions that were cancelled or failed, giving back whatever the
            server had granted them.
        lost: Permits whose lease ran out before this limiter could renew them (it could not
            reach the server, or the server refused the renewals, for a whole lease):
            their holders were cancelled.
        renewals: Renewals the server confirmed (one round trip renews every permit and
            place in the queue this limiter has).
        reaped: Expired holders of any process (a process that died) that this limiter's
            requests removed, returning their permits.
        connects: Times the limiter's connection was made and subscribed.
        disconnects: Times it was lost.
        connected: Whether it is connected now.
    """

    name: str
    total_tokens: int
    borrowed_tokens: int
    borrowers: tuple[object, ...]
    tasks_waiting: int
    fleet_borrowed: int
    fleet_waiting: int
    acquired: int
    acquired_after_wait: int
    released: int
    cancelled: int
    lost: int
    renewals: int
    reaped: int
    connects: int
    disconnects: int
    connected: bool


@final
class SharedPermit:
    """One permit of a :class:`SharedCapacityLimiter`: what an acquisition returns.

    ``async with limiter as permit:``, ``await limiter.acquire()`` and
    ``await limiter.acquire_on_behalf_of(borrower)`` return it. Give it back with
    :meth:`release` (or the limiter's ``release`` methods, or by leaving the ``async with``
    block).
    """

    __slots__ = (
        "_callbacks",
        "_error",
        "_limiter",
        "_lost",
        "_member",
        "_parker",
        "_renewed_at",
        "_requeue",
        "_scope",
        "_state",
        "_waited",
        "borrower",
        "fencing_token",
        "ticket",
    )

    def __init__(self, limiter: SharedCapacityLimiter, borrower: object) -> None:
        self._limiter = limiter
        #: Who holds the permit: a task, or the borrower object given.
        self.borrower = borrower
        #: This acquisition's place in the fleet's queue: permits are granted in ticket order.
        self.ticket = 0
        #: A number the server gives each grant, larger than every grant's before it (of
        #: this limiter name), even after the server forgot its state (a restart without
        #: persistence, a promoted replica): it is never below the server's clock in
        #: microseconds. Hand it to a resource that can refuse requests carrying a token
        #: older than one it has seen, so that a holder that lost its permit cannot act on
        #: it any more.
        self.fencing_token = 0
        self._member = b""
        self._renewed_at = 0.0
        self._waited = False
        self._state = _State.REQUESTED
        self._parker: Parker | None = None
        self._requeue = False
        self._lost = False
        self._error: BaseException | None = None
        self._scope: anyio.CancelScope | None = None
        self._callbacks: list[Callable[[], object]] = []

    @property
    def held(self) -> bool:
        """Whether this permit is held now (not given back, not lost)."""
        return self._state is _State.HELD

    @property
    def lost(self) -> bool:
        """Whether the permit's lease ran out before it could be renewed (it stays true).

        The server may have granted it to another process since: stop using what it guards.
        It still needs to be given back here (``release()``), which then frees nothing.
        """
        return self._lost

    def release(self) -> None:
        """Give the permit back. Idempotent, synchronous, never a checkpoint.

        The release is on its way to the server before this returns; the limiter confirms
        it in the background (and sends it again after a reconnect). Releasing a lost
        permit, or one already given back, does nothing.
        """
        self._limiter._release_permit(self)

    def on_lost(self, callback: Callable[[], object]) -> None:
        """Call ``callback()`` if the permit is lost (at once if it is lost already).

        It is also called if the limiter stops while the permit is held: stopping gives every
        permit back, so the server may grant it to others just the same.

        It runs synchronously in the limiter's renewal task, which must not be held up: it
        should only note the loss or cancel a scope. Its errors are logged.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        if self._lost:
            _call(callback)
        elif self._state is not _State.RELEASED:
            self._callbacks.append(callback)

    def __repr__(self) -> str:
        return (
            f"<darwin_metrics.redis.SharedPermit of {self._limiter.name!r}, ticket "
            f"{self.ticket}, fencing token {self.fencing_token}, {self._state.name.lower()}>"
        )


def _call(callback: Callable[[], object]) -> None:
    try:
        callback()
    except Exception:
        _logger.exception("a SharedPermit's on_lost callback %r raised", callback)


class _Running:
    """What :meth:`SharedCapacityLimiter.running` returns."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: SharedCapacityLimiter) -> None:
        self._limiter = limiter

    async def __aenter__(self) -> SharedCapacityLimiter:
        await self._limiter._start()
        return self._limiter

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        return await self._limiter._stop(exc_type, exc_val, exc_tb)


@final
class SharedCapacityLimiter:
    """A capacity limiter shared by every process that uses its name, on Valkey/Redis.

    At most ``total_tokens`` permits are held at a time across the whole fleet (every process
    and host whose limiter has the same ``name`` on the same server), granted in strict FIFO
    order across processes. It has the shape of :class:`anyio.CapacityLimiter`, and runs on
    asyncio and trio::

        limiter = SharedCapacityLimiter("redis://db-coordinator:6379", "orders-db", 100)
        async with limiter.running():            # the connection and the renewals
            async with limiter as permit:        # one of the fleet's 100 permits
                await write(order, fence=permit.fencing_token)

    **Running.** A limiter works inside ``async with limiter.running():``, which opens its
    connection and runs its background work in a task group that lives exactly as long as the
    block: renewing the permits and places in the queue it holds, receiving grants, confirming
    releases, reconnecting. Enter it once, in a long-lived task that encloses every use of the
    limiter (a pool given ``shared_limit=limiter`` included). The limiter belongs to the event
    loop and thread that run it.

    **Leases.** A permit is held for ``lease`` seconds at a time and renewed every
    ``lease / 3``. If the process dies, its permits return to the fleet within one lease. If
    it cannot reach the server for a whole lease (a network partition), or the server refuses
    its renewals that long (a replica's ``READONLY``, ``OOM``, an ACL), its permits are
    *lost* when their lease runs out: the server may grant them to others, so their
    ``async with limiter:`` blocks are cancelled and raise
    :class:`~darwin_metrics.CapacityLostError`, and ``statistics().lost`` counts them; tasks
    waiting here then fail with :class:`~darwin_metrics.RedisUnavailableError`.

    **Guarantees and their limit.** Each step (acquire, release, renew, a change of the total)
    is one script on the server, so no crash or cancellation between two steps leaks a permit
    or grants one twice. The guarantee rests on one server: with asynchronous replication, a
    failover to a replica that had not yet received the latest grants can grant permits
    again (the fleet may then briefly hold more than ``total_tokens``), and loses the queue's
    order. Fencing tokens let the guarded resource itself refuse a holder that lost its
    permit.

    Args:
        redis: A ``redis://``, ``rediss://`` or ``unix://`` URL, or a ``coredis.Redis`` client
            whose settings (address, credentials, TLS, database) the limiter uses for a
            connection of its own: it needs one that keeps its order and hears its grants.
            The client need not be entered and is not used otherwise.
        name: The limit's name: every limiter with this name on this server shares it. Its
            keys on the server are ``darwin-metrics:limiter:{name}:*`` (one hash tag).
        total_tokens: The fleet's limit (an int of at least 1); see :attr:`total_tokens`.
        lease: How long a permit lasts without renewal, in seconds or as a timedelta (at
            least 0.3 s; default 30 s): how long a dead process's permits stay taken, and how
            long a partition may last before permits are lost.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: A bad URL, an empty name, ``total_tokens`` below 1 (or above
            ``2**53 - 1``), or a lease too short for its renewals (below 0.3 s: renewing every
            ``lease / 3`` would leave no time for a round trip) or above 10**9 s.
        ImportError: coredis is not installed (``pip install 'darwin-metrics[redis]'``).
    """

    __slots__ = (
        "__weakref__",
        "_acquired",
        "_acquired_after_wait",
        "_blocks",
        "_by_borrower",
        "_by_member",
        "_cancelled",
        "_channel",
        "_channel_prefix",
        "_clock",
        "_confirm_wakeup",
        "_fleet_borrowed",
        "_fleet_total",
        "_fleet_waiting",
        "_keeper_due",
        "_keeper_wakeup",
        "_keys",
        "_last_tick",
        "_lease",
        "_lease_ms",
        "_link",
        "_lost",
        "_make_connection",
        "_name",
        "_on_trio",
        "_owner",
        "_reap_at",
        "_reaped",
        "_refused",
        "_released",
        "_renewals",
        "_run",
        "_sequence",
        "_shields",
        "_task_group",
        "_thread",
        "_to_release",
        "_total",
        "_total_pending",
        "_unconfirmed",
        "_waiting",
        "_where",
    )

    def __init__(
        self,
        redis: str | coredis.Redis[Any],
        name: str,
        total_tokens: int,
        *,
        lease: float | timedelta = 30.0,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("name must not be empty: it names the limit on the server")
        self._name = name
        self._total = _check_total(total_tokens)
        seconds = duration(lease, "lease")
        assert seconds is not None
        if seconds < MIN_LEASE:
            raise ValueError(
                f"lease must be at least {MIN_LEASE} s, got {seconds!r}: holders renew every "
                f"lease / 3 ({seconds / 3:.3g} s), which leaves no time for a round trip to "
                "the server"
            )
        if seconds > MAX_LEASE:
            raise ValueError(
                f"lease must be at most {MAX_LEASE:g} s, got {seconds!r}: a dead process's "
                "permits stay taken for a whole lease"
            )
        self._lease = seconds
        self._lease_ms = max(1, round(seconds * 1000))
        if isinstance(redis, str):
            from ._support import check_url

            check_url(redis)
        self._make_connection, self._where = connection_factory(redis)
        base = f"{PREFIX}{{{name}}}:".encode()
        self._keys = tuple(base + suffix for suffix in scripts.KEY_NAMES)
        self._owner = secrets.token_hex(8)
        self._channel_prefix = base + b"grants:"
        self._channel = self._channel_prefix + self._owner.encode()
        self._sequence = itertools.count(1)
        self._clock: Callable[[], float] = time.monotonic

        self._run = _Run.NEW
        self._thread: int | None = None
        self._on_trio = False
        self._task_group: anyio.abc.TaskGroup | None = None
        # The shields of the background tasks: only _stop_background lifts them.
        self._shields: list[anyio.CancelScope] = []
        self._link: Link | None = None
        # Every acquisition not yet given back, by borrower and (while the server knows it)
        # by member.
        self._by_borrower: dict[object, SharedPermit] = {}
        self._by_member: dict[bytes, SharedPermit] = {}
        # The permits of each task inside ``async with limiter:`` blocks, innermost last (a
        # block that gave its permit back early may hold another one inside).
        self._blocks: dict[object, list[SharedPermit]] = {}
        self._waiting = 0
        # Release requests sent, whose replies the confirmer checks, in order: (members, request).
        self._unconfirmed: deque[tuple[tuple[bytes, ...], Any]] = deque()
        self._confirm_wakeup: Parker | None = None
        # Members to give back once connected again.
        self._to_release: set[bytes] = set()
        self._total_pending = False
        self._keeper_wakeup: anyio.Event | None = None
        self._keeper_due = math.inf
        self._last_tick = -math.inf
        self._reap_at = math.inf
        self._refused = False  # the server refused the last renewal

        self._fleet_total = self._total
        self._fleet_borrowed = 0
        self._fleet_waiting = 0
        self._acquired = 0
        self._acquired_after_wait = 0
        self._released = 0
        self._cancelled = 0
        self._lost = 0
        self._renewals = 0
        self._reaped = 0

    # -- introspection --------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The limit's name on the server."""
        return self._name

    @property
    def lease(self) -> float:
        """How long a permit lasts without renewal, in seconds."""
        return self._lease

    @property
    def total_tokens(self) -> int:
        """The fleet's limit: at most this many permits are held at once, fleet-wide.

        Reading it gives the limit in force as the server last reported it (another process
        may have changed it). Setting it changes it for the whole fleet: the new value is sent
        to the server at once (while running; otherwise when ``running()`` starts). Each
        limiter also writes its own value when it starts running, so the last limiter to
        start or to set it wins: give every process the same value. A larger limit lets
        waiters in at once; a smaller one takes no permit back: holders keep theirs, and new
        permits are granted only once fewer than the new limit are held.

        Raises:
            TypeError: Not an int.
            ValueError: Below 1, or above ``2**53 - 1``.
            RuntimeError: Set from another thread than the one running the limiter.
        """
        return self._fleet_total

    @total_tokens.setter
    def total_tokens(self, value: int) -> None:
        total = _check_total(value)
        if self._run is _Run.RUNNING:
            self._check_thread()
        self._total = total
        self._fleet_total = total
        self._total_pending = True
        if self._run is _Run.RUNNING:
            self._send_total()

    @property
    def borrowed_tokens(self) -> int:
        """Permits this limiter holds now."""
        return sum(1 for permit in tuple(self._by_member.values()) if permit._state is _State.HELD)

    @property
    def available_tokens(self) -> int:
        """Permits free fleet-wide, as of the server's last reply (never below 0)."""
        return max(0, self._fleet_total - self._fleet_borrowed)

    def statistics(self) -> SharedCapacityLimiterStatistics:
        """Return a snapshot of the limiter; see :class:`SharedCapacityLimiterStatistics`.

        Not a checkpoint; it may be called from any thread.
        """
        held = [p for p in tuple(self._by_member.values()) if p._state is _State.HELD]
        link = self._link
        return SharedCapacityLimiterStatistics(
            name=self._name,
            total_tokens=self._fleet_total,
            borrowed_tokens=len(held),
            borrowers=tuple(p.borrower for p in held),
            tasks_waiting=self._waiting,
            fleet_borrowed=self._fleet_borrowed,
            fleet_waiting=self._fleet_waiting,
            acquired=self._acquired,
            acquired_after_wait=self._acquired_after_wait,
            released=self._released,
            cancelled=self._cancelled,
            lost=self._lost,
            renewals=self._renewals,
            reaped=self._reaped,
            connects=0 if link is None else link.connects,
            disconnects=0 if link is None else link.disconnects,
            connected=link is not None and link.up,
        )

    def __repr__(self) -> str:
        state = self._run.value
        if self._run is _Run.RUNNING and self._link is not None and not self._link.up:
            state = "running, reconnecting"
        return (
            f"<darwin_metrics.redis.SharedCapacityLimiter {self._name!r} at {id(self):#x}, "
            f"{self.borrowed_tokens} held here, {self._fleet_borrowed}/{self._fleet_total} "
            f"in the fleet, {self._waiting} waiting here, {state}>"
        )

    # -- running --------------------------------------------------------------------------------

    def running(self) -> contextlib.AbstractAsyncContextManager[SharedCapacityLimiter]:
        """``async with limiter.running():`` connects and runs the limiter for the block.

        Entering connects (its own connection, see the class), loads the scripts,
        subscribes to this limiter's grants, writes its ``total_tokens`` to the server and
        starts the background work in a task group of its own: renewals every ``lease / 3``,
        grants, release confirmations, reconnection. It is a checkpoint; if it raises or is
        cancelled, nothing is left running.

        Leaving gives back every permit still held (logging a warning: a task that still held
        one was not inside the block) and fails the tasks still waiting, waits (at most 5 s,
        out of any cancellation's reach) until the server has confirmed what was given
        back, then stops the background work. Once it started, the limiter is stopped: its
        methods raise :exc:`RuntimeError`, and releases do nothing. A limiter runs once.

        Raises:
            RedisUnavailableError: On entry: the server could not be reached or refused the
                connection.
            RuntimeError: On entry: the limiter ran before, or runs now.
        """
        return _Running(self)

    async def _start(self) -> None:
        if self._run is not _Run.NEW:
            raise RuntimeError("a SharedCapacityLimiter runs once: make a new one")
        self._run = _Run.STARTING
        self._on_trio, _ = current_loop()
        self._thread = threading.get_ident()
        self._clock = time.monotonic
        link = self._link = Link(
            self._make_connection,
            self._where,
            channel=self._channel,
            scripts=(scripts.ACQUIRE, scripts.RELEASE, scripts.RENEW, scripts.SET_TOTAL),
            timeout=self._lease / 3,
            on_message=self._on_message,
            on_up=self._on_up,
            on_down=self._on_down,
        )
        self._confirm_wakeup = Parker(self._on_trio)
        self._total_pending = True  # each limiter writes its value when it starts
        group = anyio.create_task_group()
        await group.__aenter__()
        try:
            await group.start(self._background, link.run)
            # Each limiter writes its total when it starts, before anything is asked.
            reply = await link.call(scripts.SET_TOTAL, self._keys, self._common(self._total))
            self._absorb(reply)
            self._total_pending = False
            group.start_soon(self._background, self._confirm, name=f"confirmer of {self!r}")
            group.start_soon(self._background, self._keep, name=f"renewals of {self!r}")
        except BaseException as exc:
            self._run = _Run.STOPPED
            with contextlib.suppress(Exception):
                self._stop_background(group)
                await group.__aexit__(None, None, None)
            error = _single(exc)
            if isinstance(error, RedisUnavailableError):
                raise error from error.__cause__
            library = import_coredis()
            if isinstance(error, OSError | TimeoutError | library.exceptions.RedisError):
                raise link.unavailable("could not start", error) from error
            raise
        self._task_group = group
        self._run = _Run.RUNNING
        for scope in self._shields:
            scope.shield = True

    async def _stop(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        if self._run is not _Run.RUNNING:
            raise RuntimeError("the SharedCapacityLimiter is not running")
        self._check_thread()
        self._run = _Run.STOPPED
        group = self._task_group
        assert group is not None
        self._task_group = None
        left = [p for p in self._by_borrower.values() if p._state is _State.HELD]
        if left:
            _logger.warning(
                "%r stopped while %d permits were still held (by %s); they were given back. "
                "Use the limiter inside its 'async with limiter.running():' block only.",
                self,
                len(left),
                ", ".join(repr(p.borrower) for p in left[:5]),
            )
        members: list[bytes] = []
        for permit in list(self._by_borrower.values()):
            members.extend(self._end(permit))
        if members:
            self._send_release(members)
        failure, deferred = await run_protected(
            self._flush, on_trio=self._on_trio, timeout=_FLUSH_TIMEOUT
        )
        if failure is not None:
            _logger.warning(
                "%r could not confirm its last releases (%s); the server frees them when their "
                "lease runs out",
                self,
                describe(failure),
            )
        self._stop_background(group)
        result = await exit_task_group(group, exc_type, exc_val, exc_tb)
        if deferred is not None:
            raise deferred
        return result

    async def _background(
        self,
        body: Callable[..., Awaitable[None]],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run ``body`` shielded: a cancellation of the code around ``running()`` must not cut
        the connection before the releases of its exit are on the server. The exit lifts the
        shields (:meth:`_stop_background`) once they are.

        Not while ``running()`` is being entered (the shields go up once it has been): a
        cancellation of the entry must end the connection being made (nothing is held yet),
        or ``start()`` would wait for it for ever."""
        with anyio.CancelScope(shield=self._run is _Run.RUNNING) as scope:
            self._shields.append(scope)
            if self._run is _Run.STOPPED:
                scope.cancel()
            if task_status is anyio.TASK_STATUS_IGNORED:
                await body()
            else:
                await body(task_status=task_status)

    def _stop_background(self, group: anyio.abc.TaskGroup) -> None:
        for scope in self._shields:
            scope.cancel()
        group.cancel_scope.cancel()

    def _end(self, permit: SharedPermit) -> list[bytes]:
        """The limiter stops: take ``permit`` out; return the members to give back."""
        state = permit._state
        permit._state = _State.RELEASED
        callbacks, permit._callbacks = permit._callbacks, []
        self._by_member.pop(permit._member, None)
        permit._error = RuntimeError(f"{self!r} stopped while this task waited for a permit")
        if state is _State.HELD:
            self._released += 1
            if permit._scope is not None:
                permit._scope.cancel()  # its block raises CapacityLostError
            # Given back under its holder: whatever it guards (a pool's resource) must go.
            for callback in callbacks:
                _call(callback)
        elif state in (_State.REQUESTED, _State.WAITING) and permit._parker is not None:
            permit._parker.wake()
        if state in (_State.REQUESTED, _State.WAITING, _State.HELD):
            return [permit._member]
        return []

    async def _flush(self) -> None:
        """Wait until the server confirmed every release; the caller bounds the wait.

        While the connection is down (it is being made again), the releases wait for it.
        """
        link = self._link
        assert link is not None
        while True:
            if link.up and self._to_release:
                members = list(self._to_release)
                self._to_release.clear()  # (sending may put some back)
                self._send_release(members)
            if self._unconfirmed and link.up:
                _, request = self._unconfirmed[-1]
                try:
                    await request
                except Exception:  # the confirmer notes it; this only waits
                    await anyio.sleep(0.01)
                else:
                    await anyio.lowlevel.checkpoint()  # the confirmer takes it off
            elif self._unconfirmed or self._to_release:
                await anyio.sleep(0.01)  # reconnecting: they go out once connected
            else:
                return

    # -- acquiring ------------------------------------------------------------------------------

    async def __aenter__(self) -> SharedPermit:
        """``async with limiter as permit:`` acquires a permit for the current task.

        The block runs inside a cancel scope of its own: if the permit is lost (its lease
        ran out while the process could not reach the server), the block is cancelled and
        leaving it raises :class:`~darwin_metrics.CapacityLostError`. Entering is a
        checkpoint, as :meth:`acquire`.
        """
        task = anyio.get_current_task()
        permit = await self.acquire_on_behalf_of(task)
        scope = permit._scope = anyio.CancelScope()
        scope.__enter__()
        self._blocks.setdefault(task, []).append(permit)
        return permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        """Give the permit back (as :meth:`release`); not a checkpoint.

        Raises:
            CapacityLostError: The permit was lost while the block ran (the block was
                cancelled, or ended just as the loss was found).
        """
        task = anyio.get_current_task()
        blocks = self._blocks.get(task)
        if not blocks:
            raise RuntimeError("this task did not enter this SharedCapacityLimiter")
        permit = blocks.pop()
        if not blocks:
            del self._blocks[task]
        assert permit._scope is not None
        scope, permit._scope = permit._scope, None
        swallowed = scope.__exit__(exc_type, exc_val, exc_tb)
        state = permit._state
        self._release_permit(permit)
        if not (exc_type is None or swallowed):
            return swallowed  # the block's own exception goes on
        if state is _State.LOST:
            raise CapacityLostError(
                f"the permit of {self!r} held by this block was lost: its lease "
                f"({self._lease} s) ran out before it could be renewed, so the server may "
                "have granted it to another process; the block was cancelled"
            )
        if state is _State.RELEASED and permit._error is not None:
            raise CapacityLostError(
                f"{self!r} stopped while this block held one of its permits (it was given "
                "back); the block was cancelled. Use the limiter inside "
                "'async with limiter.running():'."
            )
        return swallowed

    async def acquire(self) -> SharedPermit:
        """Acquire a permit for the current task, waiting in the fleet's FIFO queue.

        A checkpoint. If it raised (cancelled, however: an anyio scope, trio, or asyncio's own
        ``task.cancel()``), you got nothing: a permit the server had granted meanwhile is
        given back. If it returned, you hold the permit until :meth:`release`.

        Raises:
            RedisUnavailableError: The limiter has no connection to the server now, or lost
                it while waiting for a reply (nothing is held), or could not reach the server
                for a whole lease while waiting.
            coredis.exceptions.ResponseError: The server refused the limiter's script (an ACL
                that forbids ``EVALSHA``, a replica's ``READONLY``, ``OOM``); nothing is held.
            RuntimeError: Not running, used from another thread, or this task already holds
                or waits for one of this limiter's permits.
        """
        return await self.acquire_on_behalf_of(anyio.get_current_task())

    async def acquire_on_behalf_of(self, borrower: object) -> SharedPermit:
        """Acquire a permit for ``borrower``, waiting in the fleet's FIFO queue.

        As :meth:`acquire`, for a borrower other than the current task (an object that
        stands for the work the permit is for; each borrower holds at most one permit).
        A checkpoint; if it raised, you got nothing.

        Raises:
            RedisUnavailableError: As for :meth:`acquire`.
            RuntimeError: Not running, used from another thread, or ``borrower`` already
                holds or waits for one of this limiter's permits.
        """
        permit = await self._acquire(borrower, wait=True)
        assert permit is not None
        return permit

    async def try_acquire(self) -> SharedPermit | None:
        """Acquire a permit for the current task if one is free fleet-wide and nobody waits.

        Never queues: returns ``None`` when it would have to wait. A checkpoint (one round
        trip); if it raised, you got nothing.

        Raises:
            RedisUnavailableError, RuntimeError: As for :meth:`acquire`.
        """
        return await self._acquire(anyio.get_current_task(), wait=False)

    async def try_acquire_on_behalf_of(self, borrower: object) -> SharedPermit | None:
        """As :meth:`try_acquire`, for ``borrower``. A checkpoint."""
        return await self._acquire(borrower, wait=False)

    async def _acquire(self, borrower: object, *, wait: bool) -> SharedPermit | None:
        self._check_running()
        if borrower in self._by_borrower:
            raise RuntimeError(
                f"{borrower!r} already holds or waits for a permit of {self!r}: a borrower "
                "holds one at a time"
            )
        link = self._link
        assert link is not None
        if not link.up:
            raise link.unavailable("has no connection to the server")
        permit = SharedPermit(self, borrower)
        self._by_borrower[borrower] = permit
        mode = b"wait" if wait else b"try"
        try:
            while True:
                member = permit._member = f"{self._owner}:{next(self._sequence)}".encode()
                permit._state = _State.REQUESTED
                permit._requeue = False
                self._by_member[member] = permit
                sent = self._clock()
                reply = await link.call(
                    scripts.ACQUIRE, self._keys, self._common(member, self._lease_ms, mode)
                )
                if permit._error is not None:  # the limiter stopped meanwhile
                    raise permit._error
                self._absorb(reply)
                code, ticket, fence = reply[0], reply[1], reply[2]
                if code == 1:
                    permit.ticket = ticket
                    permit._renewed_at = sent
                    self._grant(permit, fence)
                    return permit
                if code == -1:  # try: not free
                    self._forget(permit)
                    return None
                if code == -2:  # cannot happen to a fresh member; ask again under another
                    self._by_member.pop(member, None)
                    continue
                permit.ticket = ticket
                permit._waited = True
                # The server set the member's deadline after ``sent``: a lower bound for it,
                # whether it waits or was granted (by a message that came before this reply).
                permit._renewed_at = sent
                if permit._state is _State.REQUESTED:
                    permit._state = _State.WAITING
                    self._hint(reply)
                if await self._wait(permit):
                    return permit
                # The server forgot our place (we could not renew it in time): ask again.
                self._by_member.pop(member, None)
        except BaseException:
            self._abandon(permit)
            raise

    async def _wait(self, permit: SharedPermit) -> bool:
        """Wait until ``permit`` is granted (True) or must ask again (False)."""
        parker = permit._parker
        if parker is None:
            parker = permit._parker = Parker(self._on_trio)
        self._waiting += 1
        try:
            # Every change of the permit's state is synchronous, and it is looked at right
            # before parking: no wake-up is missed.
            while (
                permit._state is _State.WAITING and not permit._requeue and permit._error is None
            ):
                await parker.park()
        finally:
            self._waiting -= 1
        if permit._error is not None:
            raise permit._error
        return permit._state is _State.HELD

    def _grant(self, permit: SharedPermit, fence: int) -> None:
        """``permit`` holds a permit now (sync): from a reply, a message or a renewal."""
        permit.fencing_token = fence
        permit._state = _State.HELD
        self._acquired += 1
        if permit._waited:
            self._acquired_after_wait += 1
        parker = permit._parker
        if parker is not None:
            parker.wake()

    def _abandon(self, permit: SharedPermit) -> None:
        """An acquisition ends without returning ``permit``: give back what it may hold.

        Whatever state it is in, the server may know its member (the request was sent), so
        the member is given back; a release that arrives before its ``ACQUIRE`` marks it gone.
        """
        if self._by_borrower.get(permit.borrower) is permit:
            del self._by_borrower[permit.borrower]
        state = permit._state
        permit._state = _State.RELEASED
        self._by_member.pop(permit._member, None)
        if state in (_State.REQUESTED, _State.WAITING, _State.HELD):
            self._cancelled += 1
            if self._run is _Run.RUNNING and permit._member and not permit._requeue:
                self._send_release([permit._member])

    def _forget(self, permit: SharedPermit) -> None:
        """A ``try`` acquisition got nothing: nothing to give back."""
        permit._state = _State.RELEASED
        self._by_member.pop(permit._member, None)
        if self._by_borrower.get(permit.borrower) is permit:
            del self._by_borrower[permit.borrower]

    # -- releasing ------------------------------------------------------------------------------

    def release(self) -> None:
        """Give back the permit the current task holds. Synchronous, never a checkpoint.

        Raises:
            RuntimeError: The current task holds no permit of this limiter, or it is used from
                another thread.
        """
        if self._run is _Run.STOPPED:
            return
        self._check_thread()
        self.release_on_behalf_of(anyio.get_current_task())

    def release_on_behalf_of(self, borrower: object) -> None:
        """Give back the permit ``borrower`` holds. Synchronous, never a checkpoint.

        The release is on its way to the server before this returns (see
        :meth:`SharedPermit.release`). A permit that was lost is taken back here too (and
        frees nothing on the server). Once the limiter has stopped, this does nothing: it gave
        every permit back as it stopped.

        Raises:
            RuntimeError: ``borrower`` holds no permit of this limiter (while it runs), or it
                is used from another thread.
        """
        if self._run is _Run.STOPPED:
            return
        self._check_thread()
        permit = self._by_borrower.get(borrower)
        if permit is None or permit._state not in (_State.HELD, _State.LOST):
            raise RuntimeError(f"{borrower!r} holds no permit of {self!r}")
        self._release_permit(permit)

    def _release_permit(self, permit: SharedPermit) -> None:
        state = permit._state
        if state not in (_State.HELD, _State.LOST):
            return  # given back already, or still being acquired (not the caller's yet)
        if self._run is _Run.RUNNING:
            self._check_thread()
        permit._state = _State.RELEASED
        permit._callbacks.clear()
        if self._by_borrower.get(permit.borrower) is permit:
            del self._by_borrower[permit.borrower]
        if state is _State.HELD:
            self._by_member.pop(permit._member, None)
            self._released += 1
            if self._run is _Run.RUNNING:
                self._send_release([permit._member])

    def _send_release(self, members: list[bytes]) -> None:
        """Queue ``RELEASE`` for ``members`` now (sync); the confirmer checks the reply."""
        link = self._link
        assert link is not None
        for start in range(0, len(members), _BATCH):
            batch = tuple(members[start : start + _BATCH])
            try:
                request = link.send(
                    scripts.RELEASE, self._keys, self._common(self._lease_ms, *batch)
                )
            except RedisUnavailableError:
                self._to_release.update(batch)  # sent again once connected
                continue
            self._unconfirmed.append((batch, request))
        parker = self._confirm_wakeup
        if parker is not None:
            parker.wake()

    def _send_total(self) -> None:
        link = self._link
        if link is None or not link.up:
            return  # sent by _on_up
        try:
            request = link.send(scripts.SET_TOTAL, self._keys, self._common(self._total))
        except RedisUnavailableError:
            return
        self._total_pending = False
        self._unconfirmed.append(((), request))
        parker = self._confirm_wakeup
        if parker is not None:
            parker.wake()

    async def _confirm(self) -> None:
        """Check the replies to releases (and total changes), in the order they were sent."""
        library = import_coredis()
        parker = self._confirm_wakeup
        assert parker is not None
        link = self._link
        assert link is not None
        unconfirmed = self._unconfirmed
        while True:
            while not unconfirmed:
                await parker.park()
            members, request = unconfirmed[0]
            try:
                reply = await request
            except library.exceptions.NoScriptError:
                unconfirmed.popleft()
                self._resend(members, source=True)
                continue
            except Exception as exc:
                unconfirmed.popleft()
                if members:
                    self._to_release.update(members)  # sent again once connected
                    _logger.info(
                        "%r: a release was not confirmed (%s); it is sent again",
                        self,
                        describe(exc),
                    )
                else:
                    self._total_pending = True
                continue
            unconfirmed.popleft()
            if isinstance(reply, list):
                self._absorb(reply)

    def _resend(self, members: tuple[bytes, ...], *, source: bool) -> None:
        link = self._link
        assert link is not None
        script = scripts.RELEASE if members else scripts.SET_TOTAL
        args = self._common(self._lease_ms, *members) if members else self._common(self._total)
        try:
            send = link.send_source if source else link.send
            self._unconfirmed.append((members, send(script, self._keys, args)))
        except RedisUnavailableError:
            if members:
                self._to_release.update(members)
            else:
                self._total_pending = True

    # -- keeping permits ------------------------------------------------------------------------

    async def _keep(self) -> None:
        """Renew every member every ``lease / 3``; declare them lost when that fails too long."""
        link = self._link
        assert link is not None
        interval = self._lease / 3
        while True:
            self._keeper_wakeup = wakeup = anyio.Event()
            now = self._clock()
            due = self._due(interval)
            self._keeper_due = due
            if due > now:
                with anyio.move_on_after(due - now):
                    await wakeup.wait()
                continue
            self._keeper_due = -math.inf  # awake: changes need no wake-up
            if not link.up:
                self._expire_unreachable(now)
                self._last_tick = now  # look again in an interval, or when reconnected
                continue
            try:
                with anyio.move_on_after(interval) as scope:
                    await self._renew(link, now)
            except RedisUnavailableError:
                self._last_tick = now
                continue
            except Exception as exc:  # the server refused the script (READONLY, OOM, ACL...)
                _logger.warning("%r could not renew its permits: %s", self, describe(exc))
                # The server lets what it did not renew expire (and grants it to others):
                # so must this process, from the same deadlines, as if it were unreachable.
                self._refused = True
                self._expire_unreachable(self._clock(), "had its renewals refused")
                self._last_tick = now
                continue
            self._refused = False
            if scope.cancelled_caught:
                link.drop(f"no answer from the server within {interval:.3g} s")
            self._last_tick = now

    def _due(self, interval: float) -> float:
        due = self._last_tick + interval
        if self._waiting and self._reap_at < due:
            due = self._reap_at
        link = self._link
        unreachable = link is not None and not link.up
        if unreachable or self._refused:
            # Wake when the first lease here runs out: unreachable, only then (and when
            # reconnected); refused, then too, if that comes before the next attempt.
            expiry = min(
                (p._renewed_at + self._lease for p in self._by_member.values()
                 if p._state in (_State.WAITING, _State.HELD)),
                default=math.inf,
            )  # fmt: skip
            due = expiry if unreachable else min(due, expiry)
        return due

    async def _renew(self, link: Link, sent: float) -> None:
        self._reap_at = math.inf
        members = [
            member
            for member, permit in self._by_member.items()
            if permit._state in (_State.WAITING, _State.HELD)
        ]
        if not members:
            await link.ping()
            return
        for start in range(0, len(members), _BATCH):
            batch = members[start : start + _BATCH]
            reply = await link.call(
                scripts.RENEW, self._keys, self._common(self._lease_ms, *batch)
            )
            self._absorb(reply)
            self._renewals += 1
            for member, state in zip(batch, reply[: -scripts.TAIL], strict=True):
                permit = self._by_member.get(member)
                if permit is None:
                    continue  # given back meanwhile
                if state > 0:
                    permit._renewed_at = sent
                    if permit._state is _State.WAITING:
                        self._grant(permit, state)
                elif state == 0:
                    permit._renewed_at = sent
                elif permit._state is _State.HELD:
                    self._lose(permit)
                elif permit._state is _State.WAITING:
                    del self._by_member[member]
                    permit._requeue = True
                    if permit._parker is not None:
                        permit._parker.wake()
            if self._waiting:
                self._hint(reply)

    def _expire_unreachable(self, now: float, why: str = "could not reach the server") -> None:
        """No connection (or no renewal): permits whose lease ran out are lost, waiters fail."""
        link = self._link
        assert link is not None
        for member, permit in list(self._by_member.items()):
            if permit._state in (_State.WAITING, _State.HELD) and (
                now >= permit._renewed_at + self._lease
            ):
                if permit._state is _State.HELD:
                    self._lose(permit)
                else:
                    del self._by_member[member]
                    permit._error = link.unavailable(f"{why} for a whole lease ({self._lease} s)")
                    if permit._parker is not None:
                        permit._parker.wake()

    def _lose(self, permit: SharedPermit) -> None:
        permit._state = _State.LOST
        permit._lost = True
        self._by_member.pop(permit._member, None)
        self._lost += 1
        _logger.warning(
            "%r: a permit (ticket %d, fencing token %d, held by %r) was lost: its lease ran "
            "out before it could be renewed",
            self,
            permit.ticket,
            permit.fencing_token,
            permit.borrower,
        )
        scope = permit._scope
        if scope is not None:
            scope.cancel()
        callbacks, permit._callbacks = permit._callbacks, []
        for callback in callbacks:
            _call(callback)

    def _hint(self, reply: list[Any]) -> None:
        """Tasks wait here: renew right when the earliest holder's lease runs out."""
        hint = reply[-2]
        if hint < 0 or reply[-3] == 0:
            return
        at = self._clock() + (max(hint, 1) + 2) / 1000
        if at < self._reap_at:
            self._reap_at = at
            if at < self._keeper_due and self._keeper_wakeup is not None:
                self._keeper_wakeup.set()

    def _absorb(self, reply: list[Any]) -> None:
        """Note the fleet-wide figures at the end of every reply."""
        total, held, queued, _, reaped = reply[-scripts.TAIL :]
        self._fleet_total = total
        self._fleet_borrowed = held
        self._fleet_waiting = queued
        self._reaped += reaped

    # -- the connection's news ------------------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        """A grant for one of our members, published by whichever script made it."""
        member, fence, total, held = payload.split(b" ")
        self._fleet_total = int(total)
        self._fleet_borrowed = int(held)
        permit = self._by_member.get(member)
        if permit is not None and permit._state in (_State.REQUESTED, _State.WAITING):
            permit._waited = True  # only the queue is served by a message
            self._grant(permit, int(fence))

    def _on_up(self) -> None:
        """Connected (again): send what waited for it, renew everything at once."""
        if self._run is not _Run.RUNNING:
            return  # _start sends the total itself
        if self._to_release:
            members = list(self._to_release)
            self._to_release.clear()
            self._send_release(members)
        if self._total_pending:
            self._send_total()
        self._last_tick = -math.inf
        if self._keeper_wakeup is not None:
            self._keeper_wakeup.set()

    def _on_down(self) -> None:
        if self._keeper_wakeup is not None:
            self._keeper_wakeup.set()  # it watches the leases while unreachable

    # -- helpers --------------------------------------------------------------------------------

    def _common(self, *args: bytes | int) -> tuple[bytes | int, ...]:
        return (self._channel_prefix, self._total, *args)

    def _check_running(self) -> None:
        if self._run is not _Run.RUNNING:
            if self._run is _Run.STOPPED:
                raise RuntimeError(f"{self!r} has stopped")
            raise RuntimeError(
                f"{self!r} is not running: use it inside 'async with limiter.running():'"
            )
        self._check_thread()

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                "a SharedCapacityLimiter belongs to the event loop (and thread) that runs it"
            )


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _check_total(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"total_tokens must be an int, not {type(value).__name__}")
    total = int(value)
    if total < 1:
        raise ValueError(f"total_tokens must be at least 1, got {value!r}")
    if total > MAX_TOTAL:
        raise ValueError(
            f"total_tokens must be at most 2**53 - 1 (the server counts permits exactly up to "
            f"there), got {value!r}"
        )
    return total
