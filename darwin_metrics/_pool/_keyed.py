"""KeyedResourcePool: a pool of pools by key, under a per-key and an overall limit.

One idea per module:

- :mod:`._keyed`: the public class, checkout (acquire, try_acquire, lease) and give-back.
- :mod:`._keyed_core`: places, keys, the queues and who is served next: how both limits and
  the fairness across keys are kept (its docstring tells how capacity and waiting work).
- :mod:`._keyed_upkeep`: prefill to ``min_idle``, idle reaping, retirement.
- :mod:`._keyed_parts`: a place, a key's state, a lease and its ``async with`` context.
- :mod:`._keyed_statistics`: the frozen snapshots.

What must finish, finishes
--------------------------
State changes never straddle an ``await``: every await comes before the changes it depends
on, or is undone by an ``except BaseException`` block (:meth:`KeyedResourcePool._abandon`
gives back whatever an acquisition that did not complete holds). ``reset`` and ``dispose`` run
through :func:`~darwin_metrics._lowlevel.run_protected`: no cancellation reaches them (a
native asyncio ``task.cancel()`` is held back until the bookkeeping is done, then raised), a
hook that raises anything only fails its resource, and a hook that hangs is abandoned after
``hook_timeout`` seconds. A pool belongs to the event loop that first uses it; another event
loop gets :class:`RuntimeError` before anything changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import typing
import warnings
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio import CancelScope

from .._errors import PoolOverloadedError, PoolPausedError, PoolTimeoutError
from .._histogram import _Recorder
from .._lowlevel import Parker, current_loop, wrong_loop_error
from .._tasks import exit_task_group
from ._args import check_hook, check_seconds, check_size
from ._backend import get_running_loop, loop_clock, trio_checkpoint, trio_token
from ._keyed_core import _DISPOSAL_REASONS, logger
from ._keyed_parts import POOL_TIMEOUT, _Key, _KeyedLease, _PoolTimeout, _Slot, _unhashable
from ._keyed_statistics import (
    KeyedDisposalReason,
    KeyedPoolDisposals,
    KeyedPoolStatistics,
    KeyStatistics,
)
from ._keyed_upkeep import _KeyedUpkeep

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["POOL_TIMEOUT", "KeyedResourcePool"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_DEFAULT_HOOK_TIMEOUT = 10.0


class KeyedResourcePool(_KeyedUpkeep, Generic[K, T]):
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

    :meth:`pause` and :meth:`resume` hold and release every new acquisition (for a
    maintenance window); :meth:`drain` replaces every key's resources, or one key's (for a
    credential rotation, or a host that failed over).

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

    __slots__ = ("__weakref__",)

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
        self._factory = factory
        self._check = check
        self._reset = reset
        self._dispose = dispose
        self._plain_checkout = check is None and max_lifetime is None and not min_idle
        self._plain_return = reset is None and max_lifetime is None and max_idle_time is None
        self._paused = self._pause_rejects = False
        self._draining = 0  # resources of drained generations that are still owned
        self._fast_checkout = self._fast_return = False
        self._update_fast_paths()

        self._keys = {}
        # Every idle resource of every key, the longest idle first: the eviction order.
        self._lru = OrderedDict()
        self._stamp = 0  # stamps idle resources: _lru and each key's idle are in stamp order
        self._leased = {}  # by id(resource)
        # Every resource the pool owns, by identity: idle, leased, or being checked or reset.
        self._owned = {}
        self._slots = 0  # tokens held on the overall limiter
        # Per-key limiters of keys that disappeared, none borrowed: making one costs 2-8 µs.
        self._spare_limiters = []
        self._creating = 0
        self._waiting = 0  # tasks in the keys' queues
        # Keys waiting for room, as (key, generation): with no resource at all, and with some.
        self._cold = deque()
        self._warm = deque()
        self._needs_fill = OrderedDict()  # keys below min_idle
        self._closed = False
        # The event loop this pool belongs to, and what comes with it: bound on first use.
        self._loop = None
        self._total = None
        self._trio = False
        self._clock = anyio.current_time
        self._task_group = None
        self._upkeep_scope = None
        self._upkeep_wakeup = None
        self._upkeep_due = math.inf

        self._created = 0
        self._disposed = 0
        self._disposals = dict.fromkeys(_DISPOSAL_REASONS, 0)
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

    def _resolve_timeout(self, timeout: float | _PoolTimeout | None) -> float | None:
        if timeout is POOL_TIMEOUT:
            return self._timeout
        return check_seconds("timeout", timeout)

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
        if idle and self._fast_checkout and not k.waiters:
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
        if self._paused:
            if self._pause_rejects:
                self._maybe_drop_key(k)
                await self._checkpoint()
                raise PoolPausedError(f"{self!r} is paused: acquisitions fail until resume()")
            granted = False
        else:
            granted = self._grant_self(lease, k)
        if granted:
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
        if reason is None and self._is_drained(candidate):
            reason = "drained"  # drain() ran while it was checked
        if reason is None:
            return True
        lease.candidate = None
        lease.slot = candidate
        self._forget(candidate, reason)
        deferred = await self._dispose_only(candidate)
        if deferred is not None:
            raise deferred
        return False

    async def _abandon(self, lease: _KeyedLease[Any, Any], front: bool = False) -> None:
        """Undo an acquisition that did not complete: give back whatever the lease holds.

        Its slot is freed (and served to the next waiter), an evicted victim that was never
        disposed goes back to idle with its overall token, a bound or candidate resource goes
        back to idle. Nothing awaits unless the pool closed (or the resources were drained)
        meanwhile and resources must be disposed. ``front``: the lease was served and never
        acted on, so its key keeps its place in the queues.
        """
        orphans: list[tuple[_Slot, KeyedDisposalReason]] = []
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
                orphans.append((entry, "closed"))
            elif self._is_drained(entry):
                orphans.append((entry, "drained"))
            else:
                self._idle_restore(entry)
        lease.candidate = None
        deferred: BaseException | None = None
        for orphan, reason in orphans:
            self._forget(orphan, reason)
        for orphan, _ in orphans:
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
        elif self._is_drained(entry):
            reason = "drained"
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
            PoolPausedError: The pool was paused with ``pause(reject=True)`` (refused at
                once, after a checkpoint; while paused otherwise, it waits).
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
            PoolPausedError: The pool was paused with ``pause(reject=True)`` (while paused
                otherwise, it answers ``None``).
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
            PoolPausedError: The pool was paused with ``pause(reject=True)`` (on entry).
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
        disposed when the pool is closed, ``reset`` failed, it outlived ``max_lifetime``, or it
        was made before :meth:`drain`.

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

    # ------------------------------------------------------------------ lifecycle

    def pause(self, *, reject: bool = False) -> None:
        """Stop handing out resources, for every key, until :meth:`resume` (HikariCP's suspend).

        While paused, acquisitions wait (``reject=False``) or fail at once with
        :class:`~darwin_metrics.PoolPausedError` (``reject=True``, after a checkpoint);
        :meth:`try_acquire` answers ``None`` (or raises, with ``reject=True``). Tasks already
        waiting go on waiting, and may still time out or be cancelled (leaving nothing
        behind). Leases out keep working; resources given back while paused go back to idle,
        not to a waiting task. Upkeep goes on: idle reaping and retirement, and prefill to
        ``min_idle`` while no task waits. Calling it again only changes ``reject``. Not a
        checkpoint.

        Raises:
            TypeError: ``reject`` is not a bool; nothing changed.
        """
        if not isinstance(reject, bool):
            raise TypeError(f"reject must be a bool, got {type(reject).__name__} {reject!r}")
        self._paused = True
        self._pause_rejects = reject
        self._update_fast_paths()

    def resume(self) -> None:
        """Hand out resources again after :meth:`pause`; the waiting tasks are served at once.

        Each key's waiting tasks are served in their FIFO order, from its idle resources and
        then from new ones as both limits leave room (keys with nothing first, as always).
        Does nothing if the pool is not paused. Not a checkpoint.

        Raises:
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        if not self._paused:
            return
        if self._total is not None:
            self._enter()
        self._paused = self._pause_rejects = False
        self._update_fast_paths()
        if self._waiting:
            for k in list(self._keys.values()):
                if k.idle and k.waiters:
                    self._serve(k)  # what came back while paused goes to its key's tasks
            self._serve(None)  # then the room that is left

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` was called and :meth:`resume` not yet."""
        return self._paused

    async def drain(self, *keys: K) -> int:
        """Replace resources (HikariCP's soft evict): for a credential rotation, a failover.

        With no argument, every key's; with keys, only theirs (one host that failed over).
        Every idle resource of them is disposed now, and every leased one (or one being
        checked or reset) as it comes back; new acquisitions get fresh resources from the
        factory, and upkeep refills ``min_idle`` for the keys that remain (a key left with
        nothing disappears, as always, until its next use). A resource whose factory call
        was running when ``drain`` was called counts as fresh. Both limits hold throughout:
        a drained resource keeps its place until its ``dispose`` returned. Works while
        paused too.
        Returns how many idle resources were disposed now; keys the pool holds nothing for
        are skipped.

        Not a checkpoint, unless a ``dispose`` hook awaits. Disposal completes even when the
        calling task is cancelled, however (an anyio scope, trio, or asyncio's own
        ``task.cancel()``): every resource is disposed, then the cancellation is raised.

        Raises:
            TypeError: A key is not hashable; nothing changed.
            RuntimeError: Called from an event loop other than the pool's; nothing changed.
        """
        if keys:
            drained: list[_Key] = []
            for key in keys:
                try:
                    k = self._keys.get(key)
                except TypeError:
                    raise _unhashable(key) from None
                if k is not None and k not in drained:
                    drained.append(k)
        else:
            drained = list(self._keys.values())
        self._enter()
        idle: list[_Slot] = []
        for k in drained:
            for entry in k.idle:
                del self._lru[entry]
            idle.extend(k.idle)
            k.idle.clear()
        # Everything they own now (the idle ones just taken out, and those leased, being
        # checked or reset, or evicted) becomes old: _forget counts each down as it goes.
        chosen = set(drained)
        for entry in self._owned.values():
            if entry.key in chosen and not self._is_drained(entry):
                self._draining += 1
        for k in drained:
            k.generation += 1
        self._update_fast_paths()
        if idle and self._min_idle:
            self._wake_upkeep()
        await self._dispose_entries(idle, "drained")
        return len(idle)

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
