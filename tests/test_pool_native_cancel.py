"""ResourcePool under asyncio's own cancellation, at every await point.

``task.cancel()``, ``asyncio.timeout`` and ``asyncio.wait_for`` pass through anyio's shields.
Each test cancels an operation natively at every await point in turn (zero-time steps and
virtual times between a hook's awaits) and checks the pool's books after each: nothing lost,
nothing disposed without its ``dispose`` having completed, the pool still works.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _native import STYLES, anyio_backend, cancel_after_steps, cancel_at, delays, no_cancel_leak

from darwin_metrics import PoolTimeoutError
from darwin_metrics.resource import ResourcePool

__all__ = ["anyio_backend"]  # the fixture, imported for this module

pytestmark = pytest.mark.anyio

STEP = 0.001  # each async hook awaits this long, three times


class Conn:
    def __init__(self, number: int) -> None:
        self.number = number
        self.resets = 0
        self.disposing = False
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn({self.number})"


class Hooks:
    """Async hooks with three await points each, that record what completed.

    Each await sleeps ``step`` virtual seconds; with ``step=0`` they are zero-time await
    points, for cancellations counted in event loop iterations (virtual time does not move
    while callbacks are ready, so a timed hook would never finish under those).
    """

    def __init__(self, step: float = STEP) -> None:
        self.made: list[Conn] = []
        self.step = step

    async def factory(self) -> Conn:
        await asyncio.sleep(self.step)
        conn = Conn(len(self.made))
        self.made.append(conn)
        return conn

    async def reset(self, conn: Conn) -> None:
        for _ in range(3):
            await asyncio.sleep(self.step)
        conn.resets += 1

    async def check(self, conn: Conn) -> bool:
        for _ in range(3):
            await asyncio.sleep(self.step)
        return True

    async def dispose(self, conn: Conn) -> None:
        assert not conn.disposing, f"{conn} disposed twice"
        conn.disposing = True
        for _ in range(3):
            await asyncio.sleep(self.step)
        conn.closed = True


def assert_books(pool: ResourcePool[Any], hooks: Hooks) -> None:
    stats = pool.statistics()
    assert stats.size == stats.idle + stats.leased <= stats.max_size, stats
    assert stats.created - stats.disposed == stats.size, stats
    assert not (stats.waiting and stats.idle), stats
    disposing = [conn for conn in hooks.made if conn.disposing]
    assert all(conn.closed for conn in disposing), f"a dispose was cut short: {disposing}"
    assert len(disposing) == stats.disposed, (disposing, stats)
    if pool._limiter is not None:  # None: the cancellation landed before first use
        assert pool._limiter.borrowed_tokens == stats.leased, stats


async def still_works(pool: ResourcePool[Conn]) -> None:
    async with pool.lease(timeout=1) as conn:
        assert isinstance(conn, Conn)


@pytest.mark.parametrize("style", STYLES)
async def test_interrupted_reset_loses_neither_resource_nor_slot(style: str) -> None:
    """Item 1: the lease's give-back completes; a max_size=1 pool stays alive."""
    for delay in delays(STEP, 10):
        hooks = Hooks()
        pool = ResourcePool(1, factory=hooks.factory, reset=hooks.reset, dispose=hooks.dispose)

        async def lease_and_return(pool: ResourcePool[Conn] = pool) -> None:
            async with pool.lease():
                pass  # the exit runs the three-step reset

        with no_cancel_leak():
            await cancel_at(lease_and_return, style, delay)
        assert_books(pool, hooks)
        stats = pool.statistics()
        assert (stats.size, stats.leased) == (stats.idle, 0)
        await still_works(pool)
        assert all(conn.resets >= 1 for conn in hooks.made if not conn.disposing)
        await pool.aclose()
        assert_books(pool, hooks)


async def test_interrupted_reset_at_every_zero_time_step() -> None:
    for steps in range(200):
        hooks = Hooks(step=0)
        pool = ResourcePool(1, factory=hooks.factory, reset=hooks.reset, dispose=hooks.dispose)

        async def lease_and_return(pool: ResourcePool[Conn] = pool) -> None:
            async with pool.lease():
                pass

        finished = await cancel_after_steps(lease_and_return, steps)
        assert_books(pool, hooks)
        await still_works(pool)
        await pool.aclose()
        assert_books(pool, hooks)
        if finished:
            break
    else:
        pytest.fail("the operation never finished before the cancellation")


@pytest.mark.parametrize("style", STYLES)
async def test_interrupted_aclose_still_disposes_every_idle_resource(style: str) -> None:
    """Item 2: one interrupted dispose must not leave the others unclosed."""
    for delay in delays(STEP, 24):
        hooks = Hooks()
        pool = ResourcePool(4, factory=hooks.factory, dispose=hooks.dispose)
        conns = [await pool.acquire() for _ in range(4)]
        for conn in conns:
            await pool.release(conn)
        with no_cancel_leak():
            await cancel_at(pool.aclose, style, delay)
        assert pool.closed
        assert all(conn.closed for conn in hooks.made), (delay, hooks.made)
        assert_books(pool, hooks)
        assert pool.statistics().size == 0


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("operation", ["discard", "retire", "release_closed"])
async def test_interrupted_disposal_completes(style: str, operation: str) -> None:
    """Item 2: discard, a retirement on give-back, and a return into a closed pool."""
    for delay in delays(STEP, 10):
        hooks = Hooks()
        pool = ResourcePool(
            2,
            factory=hooks.factory,
            dispose=hooks.dispose,
            max_lifetime=0.0001 if operation == "retire" else None,
        )
        conn = await pool.acquire()
        assert conn is not None
        await asyncio.sleep(0.01)  # past max_lifetime, for "retire"
        if operation == "release_closed":
            await pool.aclose()

        async def give_back(pool: ResourcePool[Conn] = pool, conn: Conn = conn) -> None:
            if operation == "discard":
                await pool.discard(conn)
            else:
                await pool.release(conn)

        with no_cancel_leak():
            await cancel_at(give_back, style, delay)
        assert conn.closed, (operation, delay)
        assert_books(pool, hooks)
        if operation != "release_closed":
            await still_works(pool)
        await pool.aclose()


@pytest.mark.parametrize("style", STYLES)
async def test_interrupted_checkout_with_async_check(style: str) -> None:
    for delay in delays(STEP, 12):
        hooks = Hooks()
        pool = ResourcePool(
            1, factory=hooks.factory, check=hooks.check, reset=hooks.reset, dispose=hooks.dispose
        )
        await still_works(pool)  # one idle resource, checked on the next checkout

        async def checkout(pool: ResourcePool[Conn] = pool) -> None:
            async with pool.lease():
                pass

        with no_cancel_leak():
            await cancel_at(checkout, style, delay)
        assert_books(pool, hooks)
        await still_works(pool)
        await pool.aclose()
        assert_books(pool, hooks)


async def test_waiter_cancelled_natively_as_it_is_served_passes_the_resource_on() -> None:
    """The handoff: woken with a resource, then cancelled before it resumes."""
    pool: ResourcePool[str] = ResourcePool(1)
    await pool.release("r")
    holder = await pool.acquire()
    got: list[str] = []

    async def waiter() -> None:
        async with pool.lease() as resource:
            got.append(resource)

    first = asyncio.ensure_future(waiter())
    second = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    assert pool.statistics().waiting == 2
    assert holder is not None
    await pool.release(holder)  # handed to the first waiter at once...
    stats = pool.statistics()
    assert (stats.idle, stats.leased, stats.waiting) == (0, 1, 1)
    first.cancel()  # ...which is cancelled natively before it runs
    await asyncio.gather(first, second, return_exceptions=True)
    assert first.cancelled()
    assert got == ["r"]  # the second waiter got it
    stats = pool.statistics()
    assert (stats.idle, stats.leased, stats.waiting, stats.acquired) == (1, 0, 0, 2)


async def test_wait_for_around_acquire_never_loses_a_resource() -> None:
    """A polling loop of short wait_for timeouts around acquire, racing with releases."""
    pool: ResourcePool[int] = ResourcePool(3)
    for number in range(3):
        await pool.release(number)
    held: list[int] = []
    timeouts = 0

    async def churn() -> None:
        for _ in range(300):
            await asyncio.sleep(0.0003)
            if held:
                await pool.release(held.pop(0))

    async def poll() -> None:
        nonlocal timeouts
        try:
            resource = await asyncio.wait_for(pool.acquire(), 0.0002)
        except TimeoutError:
            timeouts += 1
        else:
            assert resource is not None
            held.append(resource)

    churner = asyncio.ensure_future(churn())
    for _ in range(600):
        await poll()
    await churner
    for resource in held:
        await pool.release(resource)
    stats = pool.statistics()
    assert (stats.size, stats.idle, stats.leased, stats.waiting) == (3, 3, 0, 0), stats
    assert timeouts > 0
    assert pool._limiter is not None
    assert pool._limiter.borrowed_tokens == 0


async def test_native_timeout_on_a_waiting_acquire_keeps_fifo() -> None:
    pool: ResourcePool[str] = ResourcePool(1)
    await pool.release("r")
    holder = await pool.acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        async with pool.lease(timeout=10):
            order.append(name)

    impatient = asyncio.ensure_future(asyncio.wait_for(wait("impatient"), 0.5))
    patient = asyncio.ensure_future(wait("patient"))
    await asyncio.sleep(1)
    assert holder is not None
    await pool.release(holder)
    await patient
    with pytest.raises(TimeoutError):
        await impatient
    assert order == ["patient"]
    async with pool.lease(timeout=0):  # nothing waits: the fast path, no timeout
        with pytest.raises(PoolTimeoutError):
            await pool.acquire(timeout=0.1)
