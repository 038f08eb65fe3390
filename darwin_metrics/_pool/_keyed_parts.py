"""The keyed pool's small parts: a place, a key's state, a lease, the default timeout.

- :class:`_Slot`: the place of one resource. It holds a per-key and an overall capacity token
  on its own behalf from before the factory is called until its ``dispose`` returned.
- :class:`_Key`: one key's state: its limiter, idle resources, waiting tasks and counters.
- :class:`_KeyedLease`: one acquisition: what it holds, and the ``async with pool.lease(key)``
  context manager, whose exit is every give-back's hot path.
- :data:`POOL_TIMEOUT`: the default of every ``timeout=`` argument.
"""

from __future__ import annotations

import enum
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio

from .._histogram import DEFAULT_BUCKETS
from .._lowlevel import Parker
from ._keyed_statistics import KeyStatistics

if TYPE_CHECKING:
    from ._keyed import KeyedResourcePool

__all__ = ["POOL_TIMEOUT"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

_FIRST_BOUND = DEFAULT_BUCKETS[0]


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
        "generation",
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
        self.generation = 0  # its key's generation when it was made (see drain())
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
        "generation",
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
        self.generation = 0  # drain() starts a new one; older resources are disposed
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
        if pool._fast_return and not pool._closed:
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
