"""What ``lease()`` and ``acquire()`` return.

``lease()`` returns :class:`LeaseContext`, an async context manager that is its own lease record
and limiter borrower. ``acquire()`` returns :class:`Acquisition`, which is awaitable (the
resource is then the caller's to give back) and also an async context manager (the asyncpg
habit, ``async with pool.acquire() as conn:``), which gives it back on exit as a lease does.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._entries import Lease

if TYPE_CHECKING:
    from ._pool import ResourcePool

__all__ = ["Acquisition", "LeaseContext"]

T = TypeVar("T")


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
            raise pool._empty_error()
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
            pool._record_use(held)  # the histogram's append: folded on the acquire side
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


class Acquisition(Coroutine[Any, Any, "T | None"], Generic[T]):
    """What :meth:`ResourcePool.acquire` returns: await it, or use it with ``async with``.

    It is a coroutine (anything that takes one, such as ``asyncio.create_task``, anyio's and
    trio's ``start_soon`` through a function, takes it), and an async context manager that
    is a lease (see :meth:`ResourcePool.lease`): entering it acquires, leaving it gives back.
    """

    __slots__ = ("_coro", "_lease", "_pool", "_timeout")

    def __init__(self, pool: ResourcePool[T], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._lease: LeaseContext[T] | None = None
        # Made now, so that a forgotten await warns as any coroutine does.
        self._coro = pool._acquire(timeout)

    def __await__(self) -> Generator[Any, None, T | None]:
        return self._coro.__await__()

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    async def __aenter__(self) -> T:
        if self._lease is not None:
            raise RuntimeError("an acquire() context can be entered only once")
        self._coro.close()  # not awaited: the lease below acquires instead
        lease = self._lease = LeaseContext(self._pool, self._timeout)
        return await lease.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        lease = self._lease
        assert lease is not None
        await lease.__aexit__(exc_type, exc_value, traceback)
