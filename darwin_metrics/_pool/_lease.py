"""The objects ``lease()`` returns: an async context manager that is its own lease record."""

from __future__ import annotations

from bisect import bisect_left as _bisect_left
from types import TracebackType
from typing import TYPE_CHECKING, Generic, TypeVar

from .._errors import PoolEmptyError
from .._histogram import DEFAULT_BUCKETS
from ._entries import Lease

if TYPE_CHECKING:
    from ._pool import ResourcePool

__all__ = ["LeaseContext"]

T = TypeVar("T")

_FIRST_BOUND = DEFAULT_BUCKETS[0]


class LeaseContext(Lease, Generic[T]):
    """The async context manager returned by :meth:`ResourcePool.lease`.

    It is its own lease record and limiter borrower: one object per lease.
    """

    __slots__ = ("_entered", "_pool", "_timeout")

    def __init__(self, pool: ResourcePool[T], timeout: float | None) -> None:
        # The Lease fields, set here rather than through super().__init__(): this is the
        # hot path of every lease.
        self.entry = None
        self.acquired_at = 0.0
        self.where = ""
        self.warned = False
        self.granted = False
        self.parker = None
        self._pool = pool
        self._timeout = timeout
        self._entered = False

    async def __aenter__(self) -> T:
        if self._entered:
            raise RuntimeError("a lease context can be entered only once")
        self._entered = True
        pool = self._pool
        if await pool._take(self, self._timeout) is None:
            raise PoolEmptyError(
                f"{pool!r} owns no resource and has no factory: release a resource into it "
                "or give it a factory"
            )
        entry = self.entry
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
        if pool._plain_return and not pool._closed and pool._size <= pool._max_size:
            # The common case, without a coroutine: back to idle, token to the next waiter.
            del pool._leased[id(entry.resource)]
            self.entry = None
            held = pool._clock() - self.acquired_at
            use = pool._use_time  # its observe(), inline: this is every return's path
            if held <= _FIRST_BOUND:  # a lease in a hot loop: no bisect needed
                use.counts[0] += 1
            else:
                use.counts[_bisect_left(use.bounds, held)] += 1
            use.sum += held
            if pool._on_timing is not None:
                pool._timed("use", held)
            pool._idle.append(entry)
            limiter = pool._limiter
            assert limiter is not None
            limiter.release_on_behalf_of(self)
            if pool._waiters:
                pool._serve()
        else:
            await pool._give_back(self)
