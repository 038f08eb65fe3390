"""The keyed pool's core: places, keys, the queues, and who is served next.

Everything here is synchronous (bookkeeping that never straddles an ``await``), except the
protected hooks (``reset``, ``dispose``) and the factory call.

How capacity works
------------------
Capacity is counted in *places*: a place (:class:`~._keyed_parts._Slot`) is where one
resource lives, from the moment the pool decides to make it (before the factory is called)
until its ``dispose`` hook has returned. Each place holds a token of two
:class:`anyio.CapacityLimiter` objects, taken with ``acquire_on_behalf_of_nowait`` on the
place's behalf: its key's limiter (``max_per_key`` tokens) and the pool's (``max_total``). So
both limits hold at all times, counting every resource that exists: idle, leased, being made,
checked, reset or disposed. Leasing an idle resource and giving it back move no token; only
making and disposing do.

When ``max_total`` is reached and a task needs a new resource for a key that has no idle one,
the pool's longest idle resource (of another key) is *evicted*: its place hands its overall
token to a new place for the waiting key at once, and the waiting task disposes it before it
calls the factory, so the overall count never goes over, not even for a moment.

How waiting works
-----------------
The pool owns its wait queues: one FIFO queue of waiting tasks per key, and two FIFO queues
of *keys* that wait for room (``max_total`` reached, nothing idle to evict): the **cold**
queue, keys that hold no resource at all, and the **warm** queue, keys that hold some but
could use more. Whenever something frees up (a resource given back, a place freed),
:meth:`_KeyedCore._serve` serves, synchronously, in this order:

1. the first cold key: it gets a place (evicting the longest idle resource if it must);
2. the waiting tasks of the key whose resource just came back: they reuse it;
3. the first warm key, round robin: it gets a place, as a cold key does.

Within a key, tasks are served in strict FIFO order, and a newcomer never jumps the queue (it
takes the fast path only when nobody waits for its key, and room only when no key waits for
room). No resource is left idle while a task that could use it waits.

**The fairness bound.** A key that waits with nothing at all (cold) cannot be starved by busy
keys: every release (a resource given back or discarded, anywhere in the pool) serves the
first cold key. A cold key is therefore served by the ``(c + 1)``-th release after it started
waiting at the latest, ``c`` being the number of cold keys already waiting then; with no
other cold key, by the very next release. A cold key whose task then fails (the factory
raises, the task is cancelled or times out after it was served) waits again at the back of
the cold queue, so a key whose server is down cannot monopolize the releases either; a key
whose waiting tasks all leave loses its place too. Keys that hold resources always progress
by their own releases.

A waiter that is cancelled just as it is served (possible on asyncio, where a wake-up and a
``task.cancel()`` can cross) passes what it was given on, and its key keeps its place in the
queues: nothing is lost, whatever cancelled it.
"""

from __future__ import annotations

import inspect
import logging
import random
import typing
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import anyio
from anyio import CancelScope

from .._errors import PoolClosedError
from .._histogram import _Recorder
from .._lowlevel import HookTimeoutError, run_protected
from ._keyed_parts import _Key, _KeyedLease, _Slot, _unhashable
from ._keyed_statistics import KeyedDisposalReason

__all__ = ["_KeyedCore"]

logger = logging.getLogger("darwin_metrics")

_LIFETIME_JITTER = 0.1  # resources retire within the last 10% of max_lifetime
_DISPOSAL_REASONS: tuple[KeyedDisposalReason, ...] = typing.get_args(KeyedDisposalReason)


class _KeyedCore:
    """The state of a keyed pool and the synchronous rules that change it.

    :class:`~darwin_metrics.resource.KeyedResourcePool` sets every attribute in its
    constructor; they are declared here, where the code that keeps them lives.
    """

    __slots__ = (
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
        "_draining",
        "_factory",
        "_factory_errors",
        "_fast_checkout",
        "_fast_return",
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
        "_pause_rejects",
        "_paused",
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

    _acquired: int
    _acquired_after_wait: int
    _check: Callable[[Any, Any], Any] | None
    _clock: Callable[[], float]
    _closed: bool
    _cold: deque[tuple[_Key, int]]
    _create_time: _Recorder
    _created: int
    _creating: int
    _disposals: dict[KeyedDisposalReason, int]
    _dispose: Callable[[Any, Any], object] | None
    _disposed: int
    _draining: int
    _factory: Callable[[Any], Any]
    _factory_errors: int
    _fast_checkout: bool
    _fast_return: bool
    _hook_timeout: float | None
    _keys: dict[Hashable, _Key]
    _leased: dict[int, _KeyedLease[Any, Any]]
    _longest_wait: float
    _loop: object | None
    _lru: OrderedDict[_Slot, None]
    _max_idle_time: float | None
    _max_lifetime: float | None
    _max_per_key: int
    _max_total: int
    _max_waiting: int | None
    _min_idle: int
    _needs_fill: OrderedDict[_Key, None]
    _owned: dict[int, _Slot]
    _pause_rejects: bool
    _paused: bool
    _plain_checkout: bool
    _plain_return: bool
    _rejected: int
    _reset: Callable[[Any, Any], object] | None
    _slots: int
    _spare_limiters: list[anyio.CapacityLimiter]
    _stamp: int
    _task_group: anyio.abc.TaskGroup | None
    _timeout: float | None
    _timeouts: int
    _total: anyio.CapacityLimiter | None
    _total_wait: float
    _trio: bool
    _upkeep_due: float
    _upkeep_scope: CancelScope | None
    _upkeep_wakeup: anyio.Event | None
    _use_time: _Recorder
    _wait_time: _Recorder
    _waiting: int
    _waits_abandoned: int
    _warm: deque[tuple[_Key, int]]

    # ------------------------------------------------------------------ state

    def _is_closed(self) -> bool:
        # A call, so that type checkers don't assume an await left it unchanged.
        return self._closed

    def _closed_error(self) -> PoolClosedError:
        return PoolClosedError(f"{self!r} is closed")

    def _update_fast_paths(self) -> None:
        """Checkout and give-back skip their general paths only while nothing needs them.

        Not while paused (a checkout must queue), nor while resources of a drained
        generation are out (each must be disposed when it comes back).
        """
        self._fast_checkout = self._plain_checkout and not self._paused
        self._fast_return = self._plain_return and not self._draining

    @staticmethod
    def _is_drained(entry: _Slot) -> bool:
        """Whether ``entry`` was made before its key was last drained."""
        return entry.generation != entry.key.generation

    # ------------------------------------------------------------------ keys and places

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
        if self._closed or self._paused:
            return  # resume() serves them
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

    def _grant_self(self, lease: _KeyedLease[Any, Any], k: _Key) -> bool:
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
        if entry.generation != entry.key.generation:
            self._draining -= 1
            if not self._draining:
                self._update_fast_paths()  # the last of the drained ones is gone
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

    # ------------------------------------------------------------ hooks that must finish, factory

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
        slot.generation = k.generation  # made after a drain() that started meanwhile: new
        slot.created_at = slot.idle_since = now
        if self._max_lifetime is not None:
            slot.retire_at = now + self._max_lifetime * (1.0 - _LIFETIME_JITTER * random.random())
        self._owned[id(resource)] = slot
        self._created += 1
        k.created += 1

    # ------------------------------------------------------------------ telling upkeep

    def _wake_upkeep(self) -> None:
        wakeup = self._upkeep_wakeup
        if wakeup is not None:
            wakeup.set()

    def _schedule_upkeep(self, due: float) -> None:
        """Wake the upkeep task if it sleeps past ``due``."""
        if due < self._upkeep_due:
            self._wake_upkeep()

    def _want_fill(self, k: _Key) -> None:
        """Note that ``k`` may be below ``min_idle``, for the upkeep's prefill (sync).

        Upkeep is woken only if prefill can do something now: not while tasks wait (the
        last one to leave wakes it) nor for a key at its limit (a freed place notes it
        again).
        """
        if k.dropped or len(k.idle) + k.creating >= self._min_idle:
            return
        if k not in self._needs_fill:
            self._needs_fill[k] = None
        if not self._waiting and k.slots < self._max_per_key:
            self._wake_upkeep()
