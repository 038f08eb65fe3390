"""KeyedResourcePool: a pool of pools by key, under a per-key and an overall limit.

How capacity works
------------------
Capacity is counted in *slots*: a slot is the place of one resource, from the moment the pool
decides to make it (before the factory is called) until its ``dispose`` hook has returned.
Each slot holds a token of two :class:`anyio.CapacityLimiter` objects, taken with
``acquire_on_behalf_of_nowait`` on the slot's behalf: its key's limiter (``max_per_key``
tokens) and the pool's (``max_total`` tokens). So both limits hold at all times, counting
every resource that exists: idle, leased, being made, checked, reset or disposed. Leasing an
idle resource and giving it back move no token; only making and disposing do.

When ``max_total`` is reached and a task needs a new resource for a key that has no idle one,
the pool's longest idle resource (of another key) is *evicted*: its slot hands its overall
token to a new slot for the waiting key at once, and the waiting task disposes it before it
calls the factory, so the overall count never goes over, not even for a moment.

How waiting works
-----------------
The pool owns its wait queues: one FIFO queue of waiting tasks per key, and two FIFO queues
of *keys* that wait for room (``max_total`` reached, nothing idle to evict): the **cold**
queue, keys that hold no resource at all, and the **warm** queue, keys that hold some but
could use more. Whenever something frees up (a resource given back, a slot freed), the pool
serves, synchronously, in this order:

1. the first cold key: it gets a slot (evicting the longest idle resource if it must);
2. the waiting tasks of the key whose resource just came back: they reuse it;
3. the first warm key, round robin: it gets a slot, as a cold key does.

Within a key, tasks are served in strict FIFO order, and a newcomer never jumps the queue (it
takes the fast path only when nobody waits for its key, and room only when no key waits for
room). No resource is left idle while a task that could use it waits.

**The fairness bound.** A key that waits with nothing at all (cold) cannot be starved by busy
keys: every release (a resource given back or discarded, anywhere in the pool) serves the
first cold key. A cold key is therefore served by the ``(c + 1)``-th release after it started
waiting at the latest, ``c`` being the number of cold keys already waiting then; with no
other cold key, by the very next release. A cold key whose task then fails (the factory
raises, the task is cancelled or times out after it was served) waits again at the back of
the cold queue, so a key whose server is down cannot monopolize the releases either. Keys
that hold resources always progress by their own releases.

A waiter that is cancelled just as it is served (possible on asyncio, where a wake-up and a
``task.cancel()`` can cross) passes what it was given on, and its key keeps its place in the
queues: nothing is lost, whatever cancelled it.

What must finish, finishes
--------------------------
State changes never straddle an ``await``: every await comes before the changes it depends
on, or is undone by an ``except BaseException`` block. ``reset`` and ``dispose`` run through
:func:`~darwin_metrics._lowlevel.run_protected`: no cancellation reaches them (a native
asyncio ``task.cancel()`` is held back until the bookkeeping is done, then raised), a hook
that raises anything only fails its resource, and a hook that hangs is abandoned after
``hook_timeout`` seconds. A pool belongs to the event loop that first uses it; another event
loop gets :class:`RuntimeError` before anything changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import math
import random
import typing
import warnings
from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio import CancelScope

from .._errors import PoolClosedError, PoolOverloadedError, PoolTimeoutError
from .._histogram import DEFAULT_BUCKETS, _Recorder
from .._lowlevel import HookTimeoutError, Parker, current_loop, run_protected, wrong_loop_error
from .._tasks import exit_task_group
from ._args import check_hook, check_seconds, check_size
from ._backend import get_running_loop, loop_clock, trio_checkpoint, trio_token
from ._keyed_statistics import (
    KeyedDisposalReason,
    KeyedPoolDisposals,
    KeyedPoolStatistics,
    KeyStatistics,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["POOL_TIMEOUT", "KeyedResourcePool"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

logger = logging.getLogger("darwin_metrics")

_LIFETIME_JITTER = 0.1  # resources retire within the last 10% of max_lifetime
_PREFILL_BACKOFF_MAX = 10.0  # seconds between prefill attempts after factory failures
_DEFAULT_HOOK_TIMEOUT = 10.0
_FIRST_BOUND = DEFAULT_BUCKETS[0]
_DISPOSAL_REASONS: tuple[KeyedDisposalReason, ...] = typing.get_args(KeyedDisposalReason)


class _PoolTimeout(enum.Enum):
    """The type of :data:`POOL_TIMEOUT`."""

    POOL_TIMEOUT = "the pool's timeout"

    def __repr__(self) -> str:
        return "POOL_TIMEOUT"


POOL_TIMEOUT = _PoolTimeout.POOL_TIMEOUT
"""The default of every ``timeout=`` argument: use the ``timeout`` given to the pool."""


class _Slot:
    """The place of one resource: it holds the limiters' tokens on its own behalf.

    ``resource`` is unset while the factory runs. ``holds_total`` turns false when an
    eviction hands the slot's overall token to the slot being made in its place.
    """

    __slots__ = (
        "created_at",
        "holds_total",
        "idle_since",
        "key",
        "resource",
        "retire_at",
        "stamp",
    )

    def __init__(self, key: _Key) -> None:
        self.key = key
        self.resource: Any = None
        self.created_at = 0.0
        self.idle_since = 0.0
        self.retire_at = math.inf
        self.holds_total = True
        self.stamp = 0  # when it last became idle, in the pool's count of such events

    def __repr__(self) -> str:
        return f"<slot of {self.key.key!r}: {self.resource!r}>"


class _Key:
    """One key's state: its limiter, idle resources, waiting tasks and counters."""

    __slots__ = (
        "acquired",
        "acquired_after_wait",
        "cold_gen",
        "cold_queued",
        "created",
        "creating",
        "disposed",
        "dropped",
        "evicted",
        "factory_errors",
        "idle",
        "key",
        "last_used",
        "leased",
        "limiter",
        "rejected",
        "slots",
        "timeouts",
        "total_wait",
        "waiters",
        "waits_abandoned",
        "warm_gen",
        "warm_queued",
    )

    def __init__(self, key: Hashable, now: float) -> None:
        self.key = key
        # Made when the key takes its first place (a key that only waits needs none).
        self.limiter: anyio.CapacityLimiter | None = None
        self.slots = 0  # tokens held on ``limiter``: every resource of this key that exists
        self.idle: list[_Slot] = []  # most recently returned last
        self.leased = 0
        self.creating = 0
        self.waiters: deque[_KeyedLease[Any, Any]] = deque()
        self.last_used = now
        self.dropped = False
        # Entries of the pool's cold and warm queues are (key, generation): a generation
        # change makes the key's old entry stale, so that it queues again at the back.
        self.cold_gen = 0
        self.cold_queued = False
        self.warm_gen = 0
        self.warm_queued = False
        self.created = 0
        self.disposed = 0
        self.evicted = 0
        self.factory_errors = 0
        self.acquired = 0
        self.acquired_after_wait = 0
        self.waits_abandoned = 0
        self.timeouts = 0
        self.rejected = 0
        self.total_wait = 0.0

    def snapshot(self) -> KeyStatistics:
        return KeyStatistics(
            size=self.slots,
            idle=len(self.idle),
            leased=self.leased,
            waiting=len(self.waiters),
            created=self.created,
            disposed=self.disposed,
            evicted=self.evicted,
            factory_errors=self.factory_errors,
            acquired=self.acquired,
            acquired_after_wait=self.acquired_after_wait,
            waits_abandoned=self.waits_abandoned,
            timeouts=self.timeouts,
            rejected=self.rejected,
            total_wait=self.total_wait,
        )


def _unhashable(key: object) -> TypeError:
    return TypeError(f"a key must be hashable, got {type(key).__name__} {key!r}")


class KeyedResourcePool(Generic[K, T]):
    """A pool of reusable resources by key (per host, per tenant, per shard).

    Each key has its own resources, made by ``factory(key)``, and its own FIFO queue of
    waiting tasks. At most ``max_per_key`` resources exist for one key and at most
    ``max_total`` over all keys, idle and leased together (and being made or disposed). When
    ``max_total`` is reached and a task needs a resource for a key that has none idle, the
    longest idle resource of the pool is disposed to make room. A key that has nothing leased,
    idle or waiting disappears. It works on asyncio and trio, and belongs to the event loop
    that first uses it.

    Example::

        async def connect(address: tuple[str, int]) -> SocketStream:
            return await anyio.connect_tcp(*address)

        async with KeyedResourcePool(4, 16, factory=connect, dispose=close) as pool:
            async with pool.lease(("10.0.0.7", 6379), timeout=5) as conn:
                await conn.send(b"PING\\r\\n")

    Args:
        max_per_key: The most resources one key may hold (an int of at least 1, at most
            ``max_total``).
        max_total: The most resources the pool may hold over all keys.
        factory: Makes a resource for a key: ``factory(key)`` returns one, or an awaitable of
            one.
        check: Validates an idle resource on checkout, as ``check(key, resource)``; returning
            false or raising disposes it, and the pool tries the key's next idle resource or
            makes a new one.
        reset: Runs as ``reset(key, resource)`` on a resource that comes back, protected from
            cancellation; raising (or running past ``hook_timeout``) disposes the resource.
        dispose: Closes a resource that leaves the pool, as ``dispose(key, resource)`` (sync
            or async), protected from cancellation. Its errors are logged (logger
            ``darwin_metrics``), never raised. The resource's place is free again once it
            returned.
        min_idle: Idle resources that upkeep keeps ready for each key in use (at most
            ``max_per_key``). Upkeep makes them only while nobody waits and ``max_total``
            leaves room; with ``max_idle_time``, a key that nobody used for that long loses
            them and disappears.
        max_idle_time: Upkeep disposes resources idle for longer (never going below
            ``min_idle`` for a key in use); ``None`` keeps them.
        max_lifetime: Resources older than this are retired, idle ones by upkeep and leased
            ones when they come back or at checkout; each gets up to 10% less, so that they
            don't all retire at once. ``None`` keeps them.
        hook_timeout: Seconds an async ``reset`` or ``dispose`` may take (default 10). One that
            takes longer is abandoned (cancelled) with an error logged; its resource leaves
            the pool and the caller goes on. ``None`` waits for ever.
        timeout: The default ``timeout`` of :meth:`acquire` and :meth:`lease`, in seconds;
            ``None`` (the default) waits for ever. Each call may give its own.
        max_waiting: The most tasks that may wait for a resource at once, over all keys. An
            acquisition that would have to wait while that many already do fails at once
            with :class:`~darwin_metrics.PoolOverloadedError`. ``0`` never waits; ``None`` (the
            default) has no bound.

    All hooks may be sync or async callables and receive the key first. Prefill to
    ``min_idle``, idle reaping and retirement of idle resources run in the upkeep task of
    ``async with pool:``.

    ``reset`` and ``dispose`` complete even when the task running them is cancelled, however
    it is cancelled (an anyio scope, trio, or asyncio's own ``task.cancel()`` as used by
    ``asyncio.timeout``, ``asyncio.wait_for`` and ``asyncio.TaskGroup``): the cancellation is
    raised once the resource is back in the pool or disposed. A hook that raises a
    ``KeyboardInterrupt`` or ``SystemExit`` fails its resource, and the exception is raised
    after the pool's books are straight.

    **Fairness across keys.** A key that waits with no resource at all is served by the
    ``(c + 1)``-th release in the pool after it started waiting at the latest (a release is a
    resource given back or discarded), ``c`` being the number of such keys that were already
    waiting: with one, by the very next release. Busy keys cannot starve a cold one.
    """

    __slots__ = (
        "__weakref__",
        "_acquired",
        "_acquired_after_wait",
        "_check",
        "_clock",
        "_closed",
        "_cold",
        "_create_time",
        "_created",
        "_creating",
        "_disposals",
        "_dispose",
        "_disposed",
        "_factory",
        "_factory_errors",
        "_hook_timeout",
        "_keys",
        "_leased",
        "_longest_wait",
        "_loop",
        "_lru",
        "_max_idle_time",
        "_max_lifetime",
        "_max_per_key",
        "_max_total",
        "_max_waiting",
        "_min_idle",
        "_needs_fill",
        "_owned",
        "_plain_checkout",
        "_plain_return",
        "_rejected",
        "_reset",
        "_slots",
        "_spare_limiters",
        "_stamp",
        "_task_group",
        "_timeout",
        "_timeouts",
        "_total",
        "_total_wait",
        "_trio",
        "_upkeep_due",
        "_upkeep_scope",
        "_upkeep_wakeup",
        "_use_time",
        "_wait_time",
        "_waiting",
        "_waits_abandoned",
        "_warm",
    )

    def __init__(
        self,
        max_per_key: int,
        max_total: int,
        *,
        factory: Callable[[K], T | Awaitable[T]],
        check: Callable[[K, T], bool | Awaitable[bool]] | None = None,
        reset: Callable[[K, T], object] | None = None,
        dispose: Callable[[K, T], object] | None = None,
        min_idle: int = 0,
        max_idle_time: float | None = None,
        max_lifetime: float | None = None,
        hook_timeout: float | None = _DEFAULT_HOOK_TIMEOUT,
        timeout: float | None = None,
        max_waiting: int | None = None,
    ) -> None:
        self._max_per_key = check_size("max_per_key", max_per_key, 1)
        self._max_total = check_size("max_total", max_total, 1)
        if max_per_key > max_total:
            raise ValueError(
                f"max_per_key must be at most max_total ({max_total}), got {max_per_key!r}"
            )
        if factory is None:
            raise TypeError("factory must be a callable that makes a resource for a key")
        for name, hook in (
            ("factory", factory),
            ("check", check),
            ("reset", reset),
            ("dispose", dispose),
        ):
            check_hook(name, hook)
        self._min_idle = check_size("min_idle", min_idle, 0)
        if min_idle > max_per_key:
            raise ValueError(
                f"min_idle must be at most max_per_key ({max_per_key}), got {min_idle!r}"
            )
        self._max_idle_time = check_seconds("max_idle_time", max_idle_time)
        max_lifetime = check_seconds("max_lifetime", max_lifetime)
        if max_lifetime == 0:
            raise ValueError("max_lifetime must be positive, got 0")
        self._max_lifetime = max_lifetime
        self._hook_timeout = check_seconds("hook_timeout", hook_timeout)
        self._timeout = check_seconds("timeout", timeout)
        if max_waiting is not None:
            check_size("max_waiting", max_waiting, 0)
        self._max_waiting = max_waiting
        # Stored loosely typed: the pool calls them with its keys, which are K.
        self._factory: Callable[[Any], Any] = factory
        self._check: Callable[[Any, Any], Any] | None = check
        self._reset: Callable[[Any, Any], object] | None = reset
        self._dispose: Callable[[Any, Any], object] | None = dispose
        self._plain_checkout = check is None and max_lifetime is None and not min_idle
        self._plain_return = reset is None and max_lifetime is None and max_idle_time is None

        self._keys: dict[Hashable, _Key] = {}
        # Every idle resource of every key, the longest idle first: the eviction order.
        self._lru: OrderedDict[_Slot, None] = OrderedDict()
        self._stamp = 0  # stamps idle resources: _lru and each key's idle are in stamp order
        self._leased: dict[int, _KeyedLease[K, T]] = {}  # by id(resource)
        # Every resource the pool owns, by identity: idle, leased, or being checked or reset.
        self._owned: dict[int, _Slot] = {}
        self._slots = 0  # tokens held on the overall limiter
        # Per-key limiters of keys that disappeared, none borrowed: making one costs 2-8 µs.
        self._spare_limiters: list[anyio.CapacityLimiter] = []
        self._creating = 0
        self._waiting = 0  # tasks in the keys' queues
        # Keys waiting for room, as (key, generation): with no resource at all, and with some.
        self._cold: deque[tuple[_Key, int]] = deque()
        self._warm: deque[tuple[_Key, int]] = deque()
        self._needs_fill: OrderedDict[_Key, None] = OrderedDict()  # keys below min_idle
        self._closed = False
        # The event loop this pool belongs to, and what comes with it: bound on first use.
        self._loop: object | None = None
        self._total: anyio.CapacityLimiter | None = None
        self._trio = False
        self._clock: Callable[[], float] = anyio.current_time
        self._task_group: anyio.abc.TaskGroup | None = None
        self._upkeep_scope: CancelScope | None = None
        self._upkeep_wakeup: anyio.Event | None = None
        self._upkeep_due = math.inf

        self._created = 0
        self._disposed = 0
        self._disposals: dict[KeyedDisposalReason, int] = dict.fromkeys(_DISPOSAL_REASONS, 0)
        self._factory_errors = 0
        self._acquired = 0
        self._acquired_after_wait = 0
        self._waits_abandoned = 0
        self._timeouts = 0
        self._rejected = 0
        self._total_wait = 0.0
        self._longest_wait = 0.0
        self._wait_time = _Recorder()
        self._use_time = _Recorder()
        self._create_time = _Recorder()

    # ------------------------------------------------------------------ introspection

    @property
    def max_per_key(self) -> int:
        """The most resources one key may hold."""
        return self._max_per_key

    @property
    def max_total(self) -> int:
        """The most resources the pool may hold over all keys."""
        return self._max_total

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called."""
        return self._closed

    def statistics(self) -> KeyedPoolStatistics[K]:
        """Return a snapshot of the pool's state and counters, overall and for every key."""
        keys = list(self._keys.values())
        per_key: dict[K, KeyStatistics] = {typing.cast(K, k.key): k.snapshot() for k in keys}
        return KeyedPoolStatistics(
            max_per_key=self._max_per_key,
            max_total=self._max_total,
            min_idle=self._min_idle,
            keys=len(keys),
            size=self._slots,
            idle=len(self._lru),
            leased=len(self._leased),
            waiting=self._waiting,
            created=self._created,
            disposed=self._disposed,
            disposals=KeyedPoolDisposals(**self._disposals),
            factory_errors=self._factory_errors,
            acquired=self._acquired,
            acquired_after_wait=self._acquired_after_wait,
            waits_abandoned=self._waits_abandoned,
            timeouts=self._timeouts,
            rejected=self._rejected,
            total_wait=self._total_wait,
            longest_wait=self._longest_wait,
            wait_time=self._wait_time.snapshot(),
            use_time=self._use_time.snapshot(),
            create_time=self._create_time.snapshot(),
            per_key=per_key,
        )

    def key_statistics(self, key: K) -> KeyStatistics | None:
        """Return a snapshot of one key, or ``None`` if the pool holds nothing for it.

        Raises:
            TypeError: ``key`` is not hashable.
        """
        try:
            k = self._keys.get(key)
        except TypeError:
            raise _unhashable(key) from None
        return None if k is None else k.snapshot()

    def __repr__(self) -> str:
        state = ", closed" if self._closed else ""
        keys = len(self._keys)
        return (
            f"<darwin_metrics.KeyedResourcePool at {id(self):#x}, {keys} "
            f"key{'' if keys == 1 else 's'}, {len(self._leased)}/{self._max_total} leased, "
            f"{len(self._lru)} idle, {self._waiting} waiting, "
            f"max {self._max_per_key} per key{state}>"
        )

    def __del__(self) -> None:
        # Only when something would really be lost: resources that a dispose hook never closed.
        if not getattr(self, "_closed", True) and self._dispose is not None and self._lru:
            warnings.warn(
                f"{self!r} was never closed: {len(self._lru)} idle resources were not "
                "disposed. Use 'async with pool:' or 'await pool.aclose()'.",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    # ------------------------------------------------------------------ the event loop

    def _enter(self) -> anyio.CapacityLimiter:
        """Check that the running event loop is this pool's (binding it on first use).

        Every async entry point calls this before changing anything. Raises RuntimeError
        from another event loop; returns the overall limiter.
        """
        total = self._total
        if total is None:
            return self._bind_loop()
        try:
            running = trio_token() if self._trio else get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            raise wrong_loop_error(self, "pool")
        return total

    def _bind_loop(self) -> anyio.CapacityLimiter:
        on_trio, loop = current_loop()
        total = anyio.CapacityLimiter(self._max_total)
        self._trio = on_trio
        self._loop = loop
        self._clock = loop_clock(on_trio)
        self._total = total
        return total

    async def _checkpoint(self) -> None:
        if self._trio:
            await trio_checkpoint()
        else:
            await asyncio.sleep(0)

    def _is_closed(self) -> bool:
        # A call, so that type checkers don't assume an await left it unchanged.
        return self._closed

    def _closed_error(self) -> PoolClosedError:
        return PoolClosedError(f"{self!r} is closed")

    def _resolve_timeout(self, timeout: float | _PoolTimeout | None) -> float | None:
        if timeout is POOL_TIMEOUT:
            return self._timeout
        return check_seconds("timeout", timeout)

    # ------------------------------------------------------------------ keys and slots

    def _key_of(self, key: object) -> _Key:
        """The state of ``key``, created if the pool holds nothing for it yet (sync)."""
        try:
            k = self._keys.get(key)
        except TypeError:
            raise _unhashable(key) from None
        if k is None:
            k = _Key(key, self._clock())
            self._keys[key] = k
            if self._min_idle:
                self._want_fill(k)
        return k

    def _maybe_drop_key(self, k: _Key) -> None:
        """A key with nothing left (no resource, no waiting task) disappears (sync)."""
        if k.slots == 0 and not k.waiters and not k.dropped:
            k.dropped = True
            if self._keys.get(k.key) is k:
                del self._keys[k.key]
            self._needs_fill.pop(k, None)
            limiter, k.limiter = k.limiter, None
            if limiter is not None and len(self._spare_limiters) < 64:
                self._spare_limiters.append(limiter)

    def _limiter_of(self, k: _Key) -> anyio.CapacityLimiter:
        """``k``'s limiter, made (or taken from the spares) when it takes its first place."""
        limiter = k.limiter
        if limiter is None:
            spares = self._spare_limiters
            limiter = spares.pop() if spares else anyio.CapacityLimiter(self._max_per_key)
            k.limiter = limiter
        return limiter

    def _new_slot(self, k: _Key) -> _Slot:
        """Take a per-key and an overall token for a new slot (the caller checked room)."""
        total = self._total
        assert total is not None
        slot = _Slot(k)
        self._limiter_of(k).acquire_on_behalf_of_nowait(slot)
        total.acquire_on_behalf_of_nowait(slot)
        if k.slots == 0:
            self._left_cold(k)
        k.slots += 1
        self._slots += 1
        return slot

    def _evict_for(self, k: _Key, victim: _Slot) -> _Slot:
        """Take ``victim`` out of idle and hand its overall token to a new slot for ``k``.

        The victim keeps its per-key token until it is disposed; its resource stays owned
        (the caller forgets it when the disposal starts, or puts it back if that never
        happens). Returns the new slot. Sync.
        """
        total = self._total
        assert total is not None
        vk = victim.key
        vk.idle.remove(victim)
        del self._lru[victim]
        slot = _Slot(k)
        self._limiter_of(k).acquire_on_behalf_of_nowait(slot)
        if k.slots == 0:
            self._left_cold(k)
        k.slots += 1
        total.release_on_behalf_of(victim)
        victim.holds_total = False
        total.acquire_on_behalf_of_nowait(slot)
        return slot

    def _free_slot(self, slot: _Slot, front: bool = False) -> None:
        """Give back the tokens of a slot whose resource is gone; serve what that frees."""
        k = slot.key
        limiter = k.limiter
        assert limiter is not None  # a key holding a place has its limiter
        limiter.release_on_behalf_of(slot)
        k.slots -= 1
        if slot.holds_total:
            slot.holds_total = False
            total = self._total
            assert total is not None
            total.release_on_behalf_of(slot)
            self._slots -= 1
        if k.waiters:
            self._note_wanting(k, front)
        if self._waiting:
            self._serve(None)
        self._maybe_drop_key(k)
        if self._min_idle:
            self._want_fill(k)
            if self._needs_fill:
                self._wake_upkeep()  # room for another key's prefill, maybe

    # ------------------------------------------------------------------ the queues

    def _left_cold(self, k: _Key) -> None:
        k.cold_gen += 1
        k.cold_queued = False

    def _waiters_gone(self, k: _Key) -> None:
        """``k`` has no waiting task: its places in the cold and warm queues are void."""
        k.cold_gen += 1
        k.cold_queued = False
        k.warm_gen += 1
        k.warm_queued = False

    def _note_wanting(self, k: _Key, front: bool = False) -> None:
        """Queue ``k`` for room if it has waiting tasks and room of its own (sync).

        ``front`` puts it first: for a key whose served task never took what it was given.
        """
        if k.dropped or not k.waiters:
            return
        if k.slots == 0:
            if k.cold_queued:
                return
            k.cold_queued = True
            queue, item = self._cold, (k, k.cold_gen)
        elif k.slots < self._max_per_key:
            if k.warm_queued:
                return
            k.warm_queued = True
            queue, item = self._warm, (k, k.warm_gen)
        else:
            return  # it waits for its own resources to come back
        if front:
            queue.appendleft(item)
        else:
            queue.append(item)
            if len(queue) > 2 * len(self._keys) + 16:
                self._compact(queue)

    def _compact(self, queue: deque[tuple[_Key, int]]) -> None:
        """Drop the stale entries of a queue (keys that left it meanwhile), keeping order."""
        cold = queue is self._cold
        kept = [
            (k, gen)
            for k, gen in queue
            if not k.dropped and gen == (k.cold_gen if cold else k.warm_gen)
        ]
        queue.clear()
        queue.extend(kept)

    def _live_head(self, k: _Key) -> _KeyedLease[Any, Any] | None:
        """The first waiting task of ``k`` that can still be served; drops cancelled ones."""
        waiters = k.waiters
        while waiters:
            head = waiters[0]
            parker = head.parker
            if parker is not None and parker.parked:
                return head
            waiters.popleft()  # cancelled: it leaves by itself, taking nothing
            self._waiting -= 1
        self._waiters_gone(k)
        return None

    def _pop_head(self, k: _Key) -> _KeyedLease[Any, Any]:
        head = k.waiters.popleft()
        self._waiting -= 1
        if not k.waiters:
            self._waiters_gone(k)
        return head

    def _cold_head(self) -> _Key | None:
        queue = self._cold
        while queue:
            k, gen = queue[0]
            if (
                gen == k.cold_gen
                and k.slots == 0
                and not k.dropped
                and self._live_head(k) is not None
            ):
                return k
            queue.popleft()
            if gen == k.cold_gen:
                k.cold_queued = False
        return None

    def _warm_head(self) -> _Key | None:
        queue = self._warm
        while queue:
            k, gen = queue[0]
            if (
                gen == k.warm_gen
                and 0 < k.slots < self._max_per_key
                and not k.dropped
                and self._live_head(k) is not None
            ):
                return k
            queue.popleft()
            if gen == k.warm_gen:
                k.warm_queued = False
        return None

    def _serve(self, touched: _Key | None) -> None:
        """Hand what is free to the waiting tasks, in the order the module docstring gives.

        ``touched`` is the key whose resource just became idle, if any. Sync; called after
        every change that can free a slot or add an idle resource.
        """
        if self._closed:
            return
        while self._waiting:
            k = self._cold_head()
            if k is not None and self._grant_room(k, self._cold):
                continue
            if touched is not None and touched.idle:
                head = self._live_head(touched)
                if head is not None:
                    self._grant_idle(touched)
                    continue
            k = self._warm_head()
            if k is None or not self._grant_room(k, self._warm):
                return

    def _grant_idle(self, k: _Key) -> None:
        """Hand ``k``'s most recently returned idle resource to its first waiting task."""
        entry = k.idle.pop()
        del self._lru[entry]
        head = self._pop_head(k)
        self._bind(head, entry)
        head.granted = True
        parker = head.parker
        assert parker is not None
        parker.wake()

    def _grant_room(self, k: _Key, queue: deque[tuple[_Key, int]]) -> bool:
        """Give the first waiting task of ``k`` (first in ``queue``) a new slot, if any.

        A new slot needs room under ``max_total``, or an idle resource to evict. Returns
        whether the task was served.
        """
        if k.idle:  # (never, while the pool's invariants hold) reuse beats a new resource
            self._grant_idle(k)
            return True
        victim: _Slot | None = None
        if self._slots < self._max_total:
            queue.popleft()
            slot = self._new_slot(k)
        else:
            victim = next(iter(self._lru), None)
            if victim is None:
                return False
            queue.popleft()
            slot = self._evict_for(k, victim)
        if queue is self._cold:
            k.cold_queued = False
        else:
            k.warm_queued = False
        head = self._pop_head(k)
        head.slot = slot
        head.victim = victim
        head.granted = True
        parker = head.parker
        assert parker is not None
        parker.wake()
        self._note_wanting(k)  # at the back of the warm queue, if it wants more
        return True

    def _grant_self(self, lease: _KeyedLease[K, T], k: _Key) -> bool:
        """What a newcomer may take without waiting for another task (sync).

        An idle resource of its key, or a new slot (with room, or by evicting the longest
        idle resource of another key), but only when no task waits for its key. Returns
        whether the lease now holds one.
        """
        if k.waiters and self._live_head(k) is not None:
            return False  # strict FIFO per key
        idle = k.idle
        if idle:
            entry = idle.pop()
            del self._lru[entry]
            lease.candidate = entry
            return True
        if k.slots >= self._max_per_key:
            return False
        # No key waits for room when there is room or an idle resource (the pool serves
        # them first), so taking it jumps nobody.
        if self._slots < self._max_total:
            lease.slot = self._new_slot(k)
            return True
        victim = next(iter(self._lru), None)
        if victim is None:
            return False
        lease.slot = self._evict_for(k, victim)
        lease.victim = victim
        return True

    # ------------------------------------------------------------------ bookkeeping

    def _bind(self, lease: _KeyedLease[Any, Any], entry: _Slot) -> None:
        """Record that ``lease`` holds ``entry`` (sync)."""
        lease.entry = entry
        self._leased[id(entry.resource)] = lease
        k = entry.key
        k.leased += 1
        k.acquired += 1
        self._acquired += 1
        lease.acquired_at = k.last_used = self._clock()
        if self._min_idle and len(k.idle) + k.creating < self._min_idle:
            self._want_fill(k)

    def _unbind_quiet(self, lease: _KeyedLease[Any, Any]) -> _Slot:
        """Undo a binding that was never used (sync): no use time, no acquisition."""
        entry = lease.entry
        assert entry is not None
        del self._leased[id(entry.resource)]
        lease.entry = None
        k = entry.key
        k.leased -= 1
        k.acquired -= 1
        self._acquired -= 1
        return entry

    def _unbind(self, lease: _KeyedLease[Any, Any]) -> _Slot:
        """A lease ends: its resource comes back or is discarded (sync)."""
        entry = lease.entry
        assert entry is not None
        del self._leased[id(entry.resource)]
        lease.entry = None
        k = entry.key
        k.leased -= 1
        now = k.last_used = self._clock()
        self._use_time.observe(now - lease.acquired_at)
        return entry

    def _forget(self, entry: _Slot, reason: KeyedDisposalReason) -> None:
        """The pool no longer owns ``entry``'s resource (sync); its slot stays until disposed."""
        del self._owned[id(entry.resource)]
        self._disposed += 1
        self._disposals[reason] += 1
        k = entry.key
        k.disposed += 1
        if reason == "evicted":
            k.evicted += 1

    def _idle_put(self, entry: _Slot) -> None:
        """Make ``entry`` idle, the most recently idle, and serve the tasks it may help."""
        k = entry.key
        entry.stamp = self._stamp = self._stamp + 1
        k.idle.append(entry)
        self._lru[entry] = None
        if self._waiting:
            self._serve(k)

    def _idle_restore(self, entry: _Slot) -> None:
        """Put back an entry taken out of idle and never used, exactly where it was (sync).

        Its key's idle list and the eviction order stay in stamp order, as if it had never
        left; then the waiting tasks it may help are served.
        """
        k = entry.key
        stamp = entry.stamp
        idle = k.idle
        index = len(idle)
        while index and idle[index - 1].stamp > stamp:
            index -= 1
        idle.insert(index, entry)
        lru = self._lru
        lru[entry] = None
        later: list[_Slot] = []
        for other in reversed(lru):
            if other is entry:
                continue
            if other.stamp < stamp:
                break
            later.append(other)
        for other in reversed(later):
            lru.move_to_end(other)
        if self._waiting:
            self._serve(k)

    async def _run_hook(
        self, name: str, hook: Callable[[Any, Any], object], entry: _Slot
    ) -> tuple[bool, BaseException | None]:
        """Run ``reset`` or ``dispose`` to completion; return ``(ok, deferred)``."""
        key, resource = entry.key.key, entry.resource
        failure, deferred = await run_protected(
            lambda: hook(key, resource), on_trio=self._trio, timeout=self._hook_timeout
        )
        if failure is not None:
            consequence = "disposing it" if name == "reset" else "the resource left the pool"
            if isinstance(failure, HookTimeoutError):
                logger.error(
                    "%s(%r, %r) did not finish within hook_timeout=%s s; abandoned it, %s",
                    name,
                    key,
                    resource,
                    self._hook_timeout,
                    consequence,
                )
            else:
                logger.error(
                    "%s(%r, %r) raised; %s", name, key, resource, consequence, exc_info=failure
                )
        return failure is None, deferred

    async def _dispose_only(self, entry: _Slot) -> BaseException | None:
        """Run the dispose hook on ``entry``'s resource; return what to raise afterwards."""
        if self._dispose is None:
            return None
        return (await self._run_hook("dispose", self._dispose, entry))[1]

    async def _dispose_and_free(self, entry: _Slot) -> BaseException | None:
        """Dispose a forgotten entry's resource, then free its slot; return what to raise."""
        try:
            deferred = await self._dispose_only(entry)
        finally:
            self._free_slot(entry)
        return deferred

    async def _dispose_entries(
        self, doomed: Iterable[_Slot], reason: KeyedDisposalReason | None
    ) -> None:
        """Forget the entries, then dispose every one whatever happens; then raise.

        ``reason`` says why they go; ``None`` for expired ones (idle, or too old).
        """
        entries = list(doomed)
        now = self._clock()
        for entry in entries:
            self._forget(entry, reason or ("lifetime" if entry.retire_at <= now else "idle"))
        deferred: BaseException | None = None
        for entry in entries:
            deferred = await self._dispose_and_free(entry) or deferred
        if deferred is not None:
            raise deferred

    # ------------------------------------------------------------------ checkout

    async def _take(
        self, lease: _KeyedLease[K, T], key: object, timeout: float | None, wait: bool = True
    ) -> _Slot | None:
        """Acquire for ``lease``: the one template behind acquire, try_acquire and lease.

        Returns the bound entry, or ``None`` when ``wait`` is false and it would have to wait.
        """
        if self._closed:
            raise self._closed_error()
        # The event loop check of _enter, inline: this is every acquisition's path.
        try:
            running = trio_token() if self._trio else get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop or self._total is None:
            self._enter()  # binds on first use; raises from another loop
        k = self._key_of(key)
        idle = k.idle
        if idle and self._plain_checkout and not k.waiters:
            # Fast path: take the resource, then one checkpoint; if that is cancelled, put
            # it back. Taking it first means it is never seen idle while a task waits.
            entry = idle.pop()
            del self._lru[entry]
            lease.entry = entry
            self._leased[id(entry.resource)] = lease
            k.leased += 1
            k.acquired += 1
            self._acquired += 1
            lease.acquired_at = k.last_used = self._clock()
            try:
                if self._trio:
                    await trio_checkpoint()
                else:
                    await asyncio.sleep(0)
            except BaseException:
                await self._abandon(lease)
                raise
            if not self._is_closed():  # aclose() may have run meanwhile
                return entry
            await self._abandon(lease)
            raise self._closed_error()
        return await self._take_slow(lease, k, timeout, wait)

    async def _take_slow(
        self, lease: _KeyedLease[K, T], k: _Key, timeout: float | None, wait: bool
    ) -> _Slot | None:
        if self._grant_self(lease, k):
            try:
                await self._checkpoint()
            except BaseException:
                await self._abandon(lease)
                raise
            waited = False
        elif not wait:
            self._maybe_drop_key(k)
            await self._checkpoint()
            return None
        elif self._max_waiting is not None and self._waiting >= self._max_waiting:
            self._rejected += 1
            k.rejected += 1
            self._maybe_drop_key(k)
            await self._checkpoint()
            raise PoolOverloadedError(
                f"{self._waiting} tasks are already waiting for a resource "
                f"(max_waiting={self._max_waiting}): refused at once"
            )
        else:
            waited = True
        if timeout is None:
            return await self._finish(lease, k, waited)
        try:
            with anyio.fail_after(timeout) as scope:
                return await self._finish(lease, k, waited)
        except TimeoutError:
            if not scope.cancelled_caught:
                raise  # the factory's own TimeoutError, not ours
            self._timeouts += 1
            k.timeouts += 1
            raise PoolTimeoutError(
                f"no resource for key {k.key!r} became available within {timeout} s ({self!r})"
            ) from None

    async def _finish(self, lease: _KeyedLease[K, T], k: _Key, waited: bool) -> _Slot:
        if waited:
            await self._park(lease, k)
        return await self._complete(lease, k, waited)

    async def _park(self, lease: _KeyedLease[K, T], k: _Key) -> None:
        """Wait in ``k``'s queue until served (``lease.granted``) or woken by a close.

        On cancellation the lease leaves the queue; if it was served just as the
        cancellation landed, it passes what it was given on, and its key keeps its place.
        """
        parker = lease.parker
        if parker is None:
            parker = lease.parker = Parker(self._trio)
        k.waiters.append(lease)
        self._waiting += 1
        self._note_wanting(k)
        start = self._clock()
        try:
            await parker.park()
        except BaseException:
            self._waits_abandoned += 1
            k.waits_abandoned += 1
            if lease.granted:  # served just as it was cancelled (asyncio): pass it all on
                lease.granted = False
                await self._abandon(lease, front=True)
            else:
                self._remove_waiter(k, lease)
            raise
        finally:
            waited = self._clock() - start
            self._total_wait += waited
            k.total_wait += waited
            if waited > self._longest_wait:
                self._longest_wait = waited
            self._wait_time.observe(waited)
        if not lease.granted:  # woken by aclose()
            self._waits_abandoned += 1
            k.waits_abandoned += 1
            raise self._closed_error()
        lease.granted = False

    def _remove_waiter(self, k: _Key, lease: _KeyedLease[K, T]) -> None:
        with contextlib.suppress(ValueError):  # dropped by _live_head, or woken by a close
            k.waiters.remove(lease)
            self._waiting -= 1
        if not k.waiters:
            self._waiters_gone(k)
            self._maybe_drop_key(k)
        if self._needs_fill and not self._waiting:
            self._wake_upkeep()  # prefill stood back while tasks waited

    async def _complete(self, lease: _KeyedLease[K, T], k: _Key, waited: bool) -> _Slot:
        """Turn what the lease was given into a bound, checked resource.

        The lease holds one of: a bound entry (handed over, or the fast path), an idle
        ``candidate`` to check, or a ``slot`` to make a resource in (after disposing the
        ``victim`` it evicted, if any). On any exception, what it holds is given up.
        """
        try:
            while True:
                entry = lease.entry
                if entry is not None:
                    if self._plain_checkout and not self._closed:
                        break
                    lease.candidate = self._unbind_quiet(lease)  # checked below
                if self._closed:
                    raise self._closed_error()
                candidate = lease.candidate
                if candidate is not None:
                    if await self._checks_out(lease, candidate):
                        if self._is_closed():  # closed while the check ran
                            raise self._closed_error()
                        lease.candidate = None
                        self._bind(lease, candidate)
                        break
                    # It failed and was disposed: the lease holds its empty slot. The key's
                    # next idle resource, if any, beats making a new one.
                    if k.idle:
                        slot = lease.slot
                        assert slot is not None
                        lease.slot = None
                        nxt = k.idle.pop()
                        del self._lru[nxt]
                        lease.candidate = nxt
                        self._free_slot(slot)
                    continue
                victim = lease.victim
                if victim is not None:
                    lease.victim = None
                    self._forget(victim, "evicted")
                    deferred = await self._dispose_and_free(victim)
                    if deferred is not None:
                        raise deferred
                    continue
                slot = lease.slot
                assert slot is not None
                await self._create_into(slot)
                lease.slot = None
                lease.candidate = slot  # given up (disposed) if the pool closed meanwhile
                if self._is_closed():
                    raise self._closed_error()
                lease.candidate = None
                self._bind(lease, slot)
                break
        except BaseException:
            await self._abandon(lease)
            raise
        if waited:
            self._acquired_after_wait += 1
            k.acquired_after_wait += 1
        entry = lease.entry
        assert entry is not None
        return entry

    async def _checks_out(self, lease: _KeyedLease[K, T], candidate: _Slot) -> bool:
        """Whether an idle resource may be leased: not too old, and it passes ``check``.

        A resource that fails is forgotten and disposed, and the lease keeps its slot
        (``lease.slot``) to make another.
        """
        reason: KeyedDisposalReason | None = None
        if self._max_lifetime is not None and candidate.retire_at <= self._clock():
            reason = "lifetime"
        elif self._check is not None:
            try:
                result = self._check(candidate.key.key, candidate.resource)
                if inspect.isawaitable(result):
                    result = await result
                ok = bool(result)
            except Exception:
                logger.warning(
                    "check(%r, %r) raised; disposing it",
                    candidate.key.key,
                    candidate.resource,
                    exc_info=True,
                )
                ok = False
            except BaseException:
                # Cancelled mid-check: the resource's state is unknown, so it leaves the pool.
                lease.candidate = None
                lease.slot = candidate
                self._forget(candidate, "check_failed")
                deferred = await self._dispose_only(candidate)
                if deferred is not None:
                    raise deferred from None
                raise
            if not ok:
                reason = "check_failed"
        if reason is None:
            return True
        lease.candidate = None
        lease.slot = candidate
        self._forget(candidate, reason)
        deferred = await self._dispose_only(candidate)
        if deferred is not None:
            raise deferred
        return False

    async def _create_into(self, slot: _Slot) -> None:
        """Make a resource in ``slot`` with the factory. An error or cancellation makes none."""
        k = slot.key
        k.creating += 1
        self._creating += 1
        start = self._clock()
        try:
            resource = self._factory(k.key)
            if inspect.isawaitable(resource):
                resource = await resource
        except BaseException:
            self._factory_errors += 1
            k.factory_errors += 1
            raise
        finally:
            k.creating -= 1
            self._creating -= 1
        now = self._clock()
        self._create_time.observe(now - start)
        if id(resource) in self._owned:
            raise RuntimeError(
                f"the factory returned {resource!r}, which the pool already owns: a resource "
                "joins it once"
            )
        slot.resource = resource
        slot.created_at = slot.idle_since = now
        if self._max_lifetime is not None:
            slot.retire_at = now + self._max_lifetime * (1.0 - _LIFETIME_JITTER * random.random())
        self._owned[id(resource)] = slot
        self._created += 1
        k.created += 1

    async def _abandon(self, lease: _KeyedLease[Any, Any], front: bool = False) -> None:
        """Undo an acquisition that did not complete: give back whatever the lease holds.

        Its slot is freed (and served to the next waiter), an evicted victim that was never
        disposed goes back to idle with its overall token, a bound or candidate resource goes
        back to idle. Nothing awaits unless the pool closed meanwhile and resources must be
        disposed. ``front``: the lease was served and never acted on, so its key keeps its
        place in the queues.
        """
        orphans: list[_Slot] = []
        slot, victim = lease.slot, lease.victim
        lease.slot = lease.victim = None
        if victim is not None:
            assert slot is not None
            assert slot.holds_total
            total = self._total
            assert total is not None
            total.release_on_behalf_of(slot)
            slot.holds_total = False
            total.acquire_on_behalf_of_nowait(victim)
            victim.holds_total = True
        if slot is not None:
            self._free_slot(slot, front)
        for entry in (
            victim,
            self._unbind_quiet(lease) if lease.entry is not None else None,
            lease.candidate,
        ):
            if entry is None:
                continue
            if self._closed:
                orphans.append(entry)
            else:
                self._idle_restore(entry)
        lease.candidate = None
        deferred: BaseException | None = None
        for orphan in orphans:
            self._forget(orphan, "closed")
        for orphan in orphans:
            deferred = await self._dispose_and_free(orphan) or deferred
        if deferred is not None:
            raise deferred

    # ------------------------------------------------------------------ give-back

    async def _give_back(self, lease: _KeyedLease[Any, Any]) -> None:
        """Return a leased resource to idle (or a waiter) or dispose it; never lost."""
        entry = self._unbind(lease)
        ok = True
        deferred: BaseException | None = None
        if self._reset is not None:
            ok, deferred = await self._run_hook("reset", self._reset, entry)
        reason: KeyedDisposalReason | None = None
        if not ok:
            reason = "reset_failed"
        elif self._closed:
            reason = "closed"
        elif self._max_lifetime is not None and entry.retire_at <= self._clock():
            reason = "lifetime"
        if reason is None:
            if self._max_idle_time is not None or self._max_lifetime is not None:
                entry.idle_since = self._clock()
                self._schedule_upkeep(self._entry_due(entry))
            self._idle_put(entry)
        else:
            self._forget(entry, reason)
            deferred = await self._dispose_and_free(entry) or deferred
        if deferred is not None:
            raise deferred

    # ------------------------------------------------------------------ public API

    async def acquire(self, key: K, *, timeout: float | _PoolTimeout | None = POOL_TIMEOUT) -> T:
        """Acquire a resource for ``key``, waiting in the key's FIFO queue if needed.

        Takes an idle resource of the key, or makes one with ``factory(key)`` while both
        limits leave room (evicting the pool's longest idle resource of another key if only
        ``max_total`` is in the way), or waits for one.

        This is a checkpoint. If it raised (cancelled, timed out, refused, closed), you got
        nothing; if it returned a resource, you own it and must give it back with
        :meth:`release` or :meth:`discard`. A resource handed to a waiter that is cancelled at
        that moment goes to the next waiter, or back to idle, however the waiter was
        cancelled (asyncio's own ``task.cancel()`` included).

        Args:
            key: Which resources: any hashable value (a host, a tenant, a shard).
            timeout: Seconds to wait, including the factory's and an async ``check``'s time;
                ``None`` waits for ever; by default, the pool's ``timeout``. A timeout or
                cancellation that lands inside an async ``check`` disposes the resource being
                checked: its state is unknown.

        Raises:
            PoolTimeoutError: No resource within ``timeout``.
            PoolOverloadedError: It would have to wait, and ``max_waiting`` tasks already
                wait (refused at once, after a checkpoint).
            PoolClosedError: The pool is closed, or was closed while waiting.
            TypeError: ``key`` is not hashable.
            RuntimeError: Called from an event loop other than the pool's.
        """
        lease: _KeyedLease[K, T] = _KeyedLease(self, key, self._resolve_timeout(timeout))
        entry = await self._take(lease, key, lease._timeout)
        assert entry is not None
        resource: T = entry.resource
        return resource

    async def try_acquire(self, key: K) -> T | None:
        """Acquire a resource for ``key`` if that needs no waiting for another task.

        Takes an idle resource of the key, or makes one with ``factory(key)`` (evicting the
        longest idle resource of another key if ``max_total`` is reached); otherwise returns
        ``None``. It never queues, and tasks waiting for the key keep their turn: it answers
        ``None`` while any task waits for it.

        This is a checkpoint. If it raised, you got nothing; if it returned a resource, you
        own it.

        Raises:
            PoolClosedError: The pool is closed.
            TypeError: ``key`` is not hashable.
            RuntimeError: Called from an event loop other than the pool's.
        """
        lease: _KeyedLease[K, T] = _KeyedLease(self, key, None)
        entry = await self._take(lease, key, None, wait=False)
        if entry is None:
            return None
        resource: T = entry.resource
        return resource

    def lease(
        self, key: K, *, timeout: float | _PoolTimeout | None = POOL_TIMEOUT
    ) -> _KeyedLease[K, T]:
        """Lease a resource for ``key`` for the duration of an ``async with`` block.

        ``async with pool.lease(key) as resource:`` acquires (as :meth:`acquire`), yields the
        resource itself, and gives it back however the block exits: normally, by an exception
        or by cancellation (giving back completes, and is never lost). If the block called
        :meth:`discard` or :meth:`release` on the resource, the exit does nothing more.

        A block that was cancelled or raised may leave its resource mid-operation; make it
        safe with a ``reset`` hook (run on every return) or a ``check`` hook (run on
        checkout), or call :meth:`discard` when you know it is broken.

        Entering is a checkpoint: if it raised, you got nothing; if the block runs, you hold
        the resource. Exiting is not a checkpoint, unless a ``reset`` or ``dispose`` hook
        awaits (protected from cancellation; a cancellation that arrives meanwhile is raised
        once the resource is back).

        Raises:
            TypeError: ``key`` is not hashable (at once).
            ValueError: ``timeout`` is negative or not finite (at once).
            PoolTimeoutError: No resource within ``timeout`` (on entry).
            PoolOverloadedError: ``max_waiting`` tasks already wait (on entry).
            PoolClosedError: The pool is closed, or was closed while waiting (on entry).
            RuntimeError: Used from an event loop other than the pool's (on entry).
        """
        try:
            hash(key)
        except TypeError:
            raise _unhashable(key) from None
        return _KeyedLease(self, key, self._resolve_timeout(timeout))

    async def release(self, resource: T) -> None:
        """Give back a leased resource.

        It always goes back: to a waiting task (of its key, or of a key with nothing, which
        disposes it to make room), or to idle (after the ``reset`` hook, if any); or it is
        disposed when the pool is closed, ``reset`` failed, or it outlived ``max_lifetime``.

        Not a checkpoint, unless a ``reset`` or ``dispose`` hook awaits. When the calling
        task is cancelled (however: an anyio scope, trio, or asyncio's ``task.cancel()``), the
        resource is still given back completely before the cancellation is raised.

        Raises:
            ValueError: The resource is not leased from this pool (released twice, or never
                acquired here); nothing changed.
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        self._enter()
        lease = self._leased.get(id(resource))
        if lease is None:
            if id(resource) in self._owned:
                raise ValueError(
                    f"{resource!r} is already in this pool, idle or being given back "
                    "(released twice?)"
                )
            raise ValueError(f"{resource!r} is not leased from this pool")
        await self._give_back(lease)

    async def discard(self, resource: T) -> None:
        """Dispose a leased resource and free its place (for a resource found broken).

        A lease whose resource was discarded does not give it back on exit. Not a
        checkpoint, unless the ``dispose`` hook awaits; it completes even when the calling
        task is cancelled, and the cancellation is raised afterwards. The place is free once
        ``dispose`` returned.

        Raises:
            ValueError: The resource is not leased from this pool; nothing changed.
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        self._enter()
        lease = self._leased.get(id(resource))
        if lease is None:
            raise ValueError(f"{resource!r} is not leased from this pool")
        entry = self._unbind(lease)
        self._forget(entry, "discarded")
        deferred = await self._dispose_and_free(entry)
        if deferred is not None:
            raise deferred

    async def aclose(self) -> None:
        """Close the pool. Idempotent.

        Every waiting task gets :class:`~darwin_metrics.PoolClosedError`; idle resources are
        disposed now, every one of them even when the calling task is cancelled (the
        cancellation is raised afterwards); resources leased at this moment are disposed when
        they come back; upkeep stops. Not a checkpoint, unless a ``dispose`` hook awaits.

        Raises:
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        if self._closed:
            return
        self._enter()
        self._closed = True
        for k in list(self._keys.values()):
            waiters = k.waiters
            while waiters:
                parker = waiters.popleft().parker
                if parker is not None:
                    parker.wake()  # each raises PoolClosedError
            self._waiters_gone(k)
        self._waiting = 0
        self._cold.clear()
        self._warm.clear()
        if self._upkeep_scope is not None:
            self._upkeep_scope.cancel()
        idle: list[_Slot] = []
        for k in list(self._keys.values()):
            idle.extend(k.idle)
            k.idle.clear()
        self._lru.clear()
        try:
            await self._dispose_entries(idle, "closed")
        finally:
            for k in list(self._keys.values()):
                self._maybe_drop_key(k)

    async def __aenter__(self) -> Self:
        """Start upkeep (prefill to ``min_idle``, idle reaping, retirement) in a task group.

        The task group lives exactly as long as the ``async with`` block; on exit the pool
        is closed.

        Raises:
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
        self._upkeep_scope = CancelScope()
        task_group.start_soon(self._upkeep, self._upkeep_scope, name=f"upkeep of {self!r}")
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

    def _schedule_upkeep(self, due: float) -> None:
        """Wake the upkeep task if it sleeps past ``due``."""
        if due < self._upkeep_due:
            self._wake_upkeep()

    def _want_fill(self, k: _Key) -> None:
        """Note that ``k`` may be below ``min_idle``, for the upkeep's prefill (sync)."""
        if not k.dropped and len(k.idle) + k.creating < self._min_idle:
            if k not in self._needs_fill:
                self._needs_fill[k] = None
            self._wake_upkeep()

    def _key_unused(self, k: _Key, now: float) -> bool:
        """Whether ``k`` holds only idle resources, nobody waits, and nobody used it for
        ``max_idle_time``: then it loses them all, ``min_idle`` or not."""
        mit = self._max_idle_time
        return (
            mit is not None
            and k.slots == len(k.idle)
            and not k.waiters
            and now >= k.last_used + mit
        )

    async def _upkeep(self, scope: CancelScope) -> None:
        backoff = 0.0
        retry_prefill_at = -math.inf
        with scope:
            while True:
                self._upkeep_wakeup = wakeup = anyio.Event()
                self._upkeep_due = -math.inf  # awake: changes need no wake-up
                await self._dispose_entries(self._collect_expired(), None)
                if self._clock() >= retry_prefill_at:
                    try:
                        await self._prefill()
                    except Exception:
                        backoff = min(max(backoff * 2, 0.1), _PREFILL_BACKOFF_MAX)
                        retry_prefill_at = self._clock() + backoff
                        logger.exception("prefill failed; retrying in %.3g s", backoff)
                    else:
                        backoff = 0.0
                now = self._clock()
                due = self._next_due()
                if retry_prefill_at > now and self._needs_fill:
                    due = min(due, retry_prefill_at)
                # Anything that needs upkeep sooner (a checkout below min_idle, a slot freed
                # while a key waits for prefill, an entry due sooner) sets the wake-up event.
                self._upkeep_due = due
                if due > now:
                    with anyio.move_on_after(due - now):
                        await wakeup.wait()
                else:
                    await anyio.lowlevel.checkpoint()

    def _collect_expired(self) -> list[_Slot]:
        """Take out idle resources past ``max_idle_time`` or ``max_lifetime`` (sync).

        A key keeps its ``min_idle`` most recently used resources, unless the whole key went
        unused for ``max_idle_time``. The caller forgets and disposes what is returned.
        """
        mit = self._max_idle_time
        if mit is None and self._max_lifetime is None:
            return []
        now = self._clock()
        doomed: list[_Slot] = []
        for k in list(self._keys.values()):
            idle = k.idle
            if not idle:
                continue
            if self._key_unused(k, now):
                doomed.extend(idle)
                for entry in idle:
                    del self._lru[entry]
                idle.clear()
                continue
            removable = len(idle) - self._min_idle
            keep: list[_Slot] = []
            for entry in idle:  # the longest idle first
                if entry.retire_at <= now or (
                    removable > 0 and mit is not None and now >= entry.idle_since + mit
                ):
                    doomed.append(entry)
                    del self._lru[entry]
                    removable -= 1
                else:
                    keep.append(entry)
            if len(keep) != len(idle):
                idle[:] = keep
        return doomed

    def _entry_due(self, entry: _Slot) -> float:
        """When upkeep must look at an idle entry next (the expressions it tests)."""
        mit = self._max_idle_time
        if mit is None:
            return entry.retire_at
        return min(entry.retire_at, entry.idle_since + mit)

    def _next_due(self) -> float:
        due = math.inf
        mit = self._max_idle_time
        for k in self._keys.values():
            idle = k.idle
            if not idle:
                continue
            removable = mit is not None and len(idle) > self._min_idle
            for entry in idle:
                due = min(due, entry.retire_at)
                if removable:
                    assert mit is not None
                    due = min(due, entry.idle_since + mit)
            if mit is not None and k.slots == len(idle) and not k.waiters:
                due = min(due, k.last_used + mit)  # the whole key, as _key_unused tests it
        return due

    async def _prefill(self) -> None:
        """Make idle resources up to ``min_idle`` for the keys below it, one at a time.

        Each is made in a slot of its own, only while nobody waits (waiting tasks make their
        own) and ``max_total`` leaves room: prefill never evicts.
        """
        needs = self._needs_fill
        while needs and not self._closed and not self._waiting:
            k = next(iter(needs))
            if (
                k.dropped
                or len(k.idle) + k.creating >= self._min_idle
                or self._key_unused(k, self._clock())
                or k.slots >= self._max_per_key
            ):
                del needs[k]  # noted again when it needs it (a checkout, a freed slot)
                continue
            if self._slots >= self._max_total:
                return  # woken again when a slot is freed
            slot = self._new_slot(k)
            try:
                await self._create_into(slot)
            except BaseException:
                self._free_slot(slot)
                raise
            if self._is_closed():
                self._forget(slot, "closed")
                deferred = await self._dispose_and_free(slot)
                if deferred is not None:
                    raise deferred
                return
            slot.idle_since = self._clock()
            self._idle_put(slot)


class _KeyedLease(Generic[K, T]):
    """A lease: what it holds, its place in its key's queue, and the ``lease()`` context.

    ``entry`` is the bound resource (leased); ``candidate`` an idle resource to check;
    ``slot`` a place to make a resource in, after disposing ``victim`` (evicted) if set.
    ``granted`` is true while a waiter was served and has not resumed yet.
    """

    __slots__ = (
        "_entered",
        "_key",
        "_pool",
        "_timeout",
        "acquired_at",
        "candidate",
        "entry",
        "granted",
        "parker",
        "slot",
        "victim",
    )

    def __init__(self, pool: KeyedResourcePool[K, T], key: object, timeout: float | None) -> None:
        self._pool = pool
        self._key = key
        self._timeout = timeout
        self._entered = False
        self.entry: _Slot | None = None
        self.candidate: _Slot | None = None
        self.slot: _Slot | None = None
        self.victim: _Slot | None = None
        self.granted = False
        self.parker: Parker | None = None
        self.acquired_at = 0.0

    async def __aenter__(self) -> T:
        if self._entered:
            raise RuntimeError("a lease context can be entered only once")
        self._entered = True
        entry = await self._pool._take(self, self._key, self._timeout)
        assert entry is not None
        resource: T = entry.resource
        return resource

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # The same task entered the lease, so the event loop is the pool's: no check here.
        entry = self.entry
        if entry is None:
            return  # discarded or released inside the block
        pool = self._pool
        if pool._plain_return and not pool._closed:
            # The common case, without a coroutine: back to idle, served to a waiter if any.
            del pool._leased[id(entry.resource)]
            self.entry = None
            k = entry.key
            k.leased -= 1
            now = k.last_used = pool._clock()
            held = now - self.acquired_at
            use = pool._use_time  # its observe(), inline: this is every return's path
            if held <= _FIRST_BOUND:
                use.counts[0] += 1
            else:
                use.counts[bisect_left(use.bounds, held)] += 1
            use.sum += held
            entry.stamp = pool._stamp = pool._stamp + 1
            k.idle.append(entry)
            pool._lru[entry] = None
            if pool._waiting:
                pool._serve(k)
        else:
            await pool._give_back(self)
