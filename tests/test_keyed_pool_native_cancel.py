"""KeyedResourcePool under asyncio's own cancellation, at every await point.

``task.cancel()``, ``asyncio.timeout`` and ``asyncio.wait_for`` pass through anyio's shields.
Each test cancels an operation natively at every await point in turn (zero-time steps, and
virtual times between a hook's awaits) and checks the pool's books after each: nothing lost,
nothing disposed without its ``dispose`` having completed, both limits kept, the pool still
works. The handoff tests cancel a waiter just after it was served and before it resumes,
which only asyncio's ``task.cancel()`` can do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _native import STYLES, anyio_backend, cancel_after_steps, cancel_at, delays, no_cancel_leak

from darwin_metrics import PoolTimeoutError
from darwin_metrics.resource import KeyedResourcePool

__all__ = ["anyio_backend"]  # the fixture, imported for this module

pytestmark = pytest.mark.anyio

STEP = 0.001  # each async hook awaits this long, three times


class Conn:
    def __init__(self, key: str, number: int) -> None:
        self.key = key
        self.number = number
        self.resets = 0
        self.disposing = False
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn({self.key!r}, {self.number})"


class Hooks:
    """Async hooks with three await points each, that record what completed, and count the
    resources that exist (from the factory call to the end of dispose) against the limits.

    With ``step=0`` the awaits are zero-time, for cancellations counted in event loop
    iterations (virtual time does not move while callbacks are ready).
    """

    def __init__(self, step: float = STEP, *, max_per_key: int, max_total: int) -> None:
        self.made: list[Conn] = []
        self.step = step
        self.alive: dict[str, int] = {}
        self.max_per_key = max_per_key
        self.max_total = max_total

    def _exists(self, key: str, change: int) -> None:
        self.alive[key] = self.alive.get(key, 0) + change
        assert self.alive[key] <= self.max_per_key, self.alive
        assert sum(self.alive.values()) <= self.max_total, self.alive

    async def factory(self, key: str) -> Conn:
        self._exists(key, +1)
        try:
            await asyncio.sleep(self.step)
        except BaseException:
            self._exists(key, -1)
            raise
        conn = Conn(key, len(self.made))
        self.made.append(conn)
        return conn

    async def reset(self, key: str, conn: Conn) -> None:
        for _ in range(3):
            await asyncio.sleep(self.step)
        conn.resets += 1

    async def check(self, key: str, conn: Conn) -> bool:
        for _ in range(3):
            await asyncio.sleep(self.step)
        return True

    async def dispose(self, key: str, conn: Conn) -> None:
        assert not conn.disposing, f"{conn} disposed twice"
        conn.disposing = True
        for _ in range(3):
            await asyncio.sleep(self.step)
        conn.closed = True
        self._exists(key, -1)

    def pool(self, **hooks: Any) -> KeyedResourcePool[str, Conn]:
        return KeyedResourcePool(
            self.max_per_key, self.max_total, factory=self.factory, dispose=self.dispose, **hooks
        )


def assert_books(pool: KeyedResourcePool[str, Any], hooks: Hooks) -> None:
    stats = pool.statistics()
    assert stats.size == stats.idle + stats.leased <= stats.max_total, stats
    assert stats.created - stats.disposed == stats.size, stats
    for key, ks in stats.per_key.items():
        assert ks.size == ks.idle + ks.leased <= stats.max_per_key, (key, ks)
        assert not (ks.waiting and ks.idle), (key, ks)
    disposing = [conn for conn in hooks.made if conn.disposing]
    assert all(conn.closed for conn in disposing), f"a dispose was cut short: {disposing}"
    assert len(disposing) == stats.disposed, (disposing, stats)
    alive = [conn for conn in hooks.made if not conn.closed]
    assert len(alive) == stats.size == sum(hooks.alive.values()), (alive, stats, hooks.alive)
    if pool._total is not None:  # None: the cancellation landed before first use
        assert pool._total.borrowed_tokens == stats.size, stats


async def still_works(pool: KeyedResourcePool[str, Conn], key: str = "a") -> None:
    async with pool.lease(key, timeout=1) as conn:
        assert conn.key == key


@pytest.mark.parametrize("style", STYLES)
async def test_interrupted_reset_loses_neither_resource_nor_place(style: str) -> None:
    for delay in delays(STEP, 10):
        hooks = Hooks(max_per_key=1, max_total=1)
        pool = hooks.pool(reset=hooks.reset)

        async def lease_and_return(pool: KeyedResourcePool[str, Conn] = pool) -> None:
            async with pool.lease("a"):
                pass  # the exit runs the three-step reset

        with no_cancel_leak():
            await cancel_at(lease_and_return, style, delay)
        assert_books(pool, hooks)
        assert pool.statistics().leased == 0
        await still_works(pool)
        await still_works(pool, "b")  # max_total=1: the place is not lost either
        await pool.aclose()
        assert_books(pool, hooks)


async def test_interrupted_reset_at_every_zero_time_step() -> None:
    for steps in range(200):
        hooks = Hooks(step=0, max_per_key=1, max_total=1)
        pool = hooks.pool(reset=hooks.reset)

        async def lease_and_return(pool: KeyedResourcePool[str, Conn] = pool) -> None:
            async with pool.lease("a"):
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
    for delay in delays(STEP, 24):
        hooks = Hooks(max_per_key=2, max_total=4)
        pool = hooks.pool()
        conns = [await pool.acquire(key) for key in ("a", "a", "b", "c")]
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
    for delay in delays(STEP, 10):
        hooks = Hooks(max_per_key=2, max_total=2)
        pool = hooks.pool(max_lifetime=0.0001 if operation == "retire" else None)
        conn = await pool.acquire("a")
        await asyncio.sleep(0.01)  # past max_lifetime, for "retire"
        if operation == "release_closed":
            await pool.aclose()

        async def give_back(pool: KeyedResourcePool[str, Conn] = pool, conn: Conn = conn) -> None:
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
async def test_interrupted_eviction(style: str) -> None:
    """An acquisition that evicts another key's idle resource (a three-step dispose), then
    makes its own: cancelled at every point, the victim is disposed completely or stays
    idle, the limits hold throughout (the hooks count), and the place is never lost."""
    for delay in delays(STEP, 14):
        hooks = Hooks(max_per_key=1, max_total=1)
        pool = hooks.pool()
        async with pool.lease("victim"):
            pass

        async def evict(pool: KeyedResourcePool[str, Conn] = pool) -> None:
            async with pool.lease("cold"):
                pass

        with no_cancel_leak():
            await cancel_at(evict, style, delay)
        assert_books(pool, hooks)
        stats = pool.statistics()
        # The victim still idle (cancelled before it was disposed), "cold"'s resource idle
        # (finished), or nothing (cancelled after the victim's dispose completed).
        assert stats.size == stats.idle <= 1, (delay, stats)
        assert stats.disposed == sum(conn.closed for conn in hooks.made)
        await still_works(pool, "third")
        await pool.aclose()
        assert_books(pool, hooks)


@pytest.mark.parametrize("style", STYLES)
async def test_interrupted_checkout_with_async_check(style: str) -> None:
    for delay in delays(STEP, 12):
        hooks = Hooks(max_per_key=1, max_total=1)
        pool = hooks.pool(check=hooks.check, reset=hooks.reset)
        await still_works(pool)  # one idle resource, checked on the next checkout

        async def checkout(pool: KeyedResourcePool[str, Conn] = pool) -> None:
            async with pool.lease("a"):
                pass

        with no_cancel_leak():
            await cancel_at(checkout, style, delay)
        assert_books(pool, hooks)
        await still_works(pool)
        await pool.aclose()
        assert_books(pool, hooks)


async def test_waiter_cancelled_natively_as_it_is_served_passes_the_resource_on() -> None:
    """The handoff: woken with a resource, then cancelled before it resumes."""
    hooks = Hooks(max_per_key=1, max_total=1)
    pool = hooks.pool()
    holder = await pool.acquire("a")
    got: list[Conn] = []

    async def waiter() -> None:
        async with pool.lease("a") as conn:
            got.append(conn)

    first = asyncio.ensure_future(waiter())
    second = asyncio.ensure_future(waiter())
    await asyncio.sleep(0)
    assert pool.statistics().waiting == 2
    await pool.release(holder)  # handed to the first waiter at once...
    stats = pool.statistics()
    assert (stats.idle, stats.leased, stats.waiting) == (0, 1, 1)
    first.cancel()  # ...which is cancelled natively before it runs
    await asyncio.gather(first, second, return_exceptions=True)
    assert first.cancelled()
    assert got == [holder]  # the second waiter got it
    stats = pool.statistics()
    assert (stats.idle, stats.leased, stats.waiting, stats.acquired) == (1, 0, 0, 2)
    assert_books(pool, hooks)
    await pool.aclose()


async def test_an_evicting_acquisition_cancelled_natively_puts_the_victim_back() -> None:
    """Cancelled at its checkpoint, after it took another key's idle resource to evict:
    the resource is back where it was, undisposed, with its place."""
    hooks = Hooks(max_per_key=2, max_total=2)
    pool = hooks.pool()
    old = await pool.acquire("idle")
    await pool.release(old)
    holder = await pool.acquire("hot")
    task = asyncio.ensure_future(pool.acquire("cold"))
    await asyncio.sleep(0)  # it ran to its checkpoint, holding a new place and the victim
    assert pool.statistics().idle == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert not old.closed
    stats = pool.statistics()
    assert (stats.idle, stats.size, stats.disposed, stats.keys) == (1, 2, 0, 2)
    assert await pool.try_acquire("idle") is old
    await pool.release(old)
    await pool.release(holder)
    assert_books(pool, hooks)
    await pool.aclose()


async def test_an_evicting_waiter_cancelled_as_it_is_served_keeps_its_keys_turn() -> None:
    """A cold key's waiter is served (a new place, evicting the resource just returned),
    then cancelled natively before it resumes: the victim gets its place back, and the cold
    key keeps its turn: its next waiter is served by the same release, not a later key."""
    hooks = Hooks(max_per_key=2, max_total=2)
    pool = hooks.pool()
    holder = await pool.acquire("hot")
    other = await pool.acquire("busy")
    served: list[str] = []

    async def waiter(name: str, key: str) -> None:
        async with pool.lease(key):
            served.append(name)
            await asyncio.sleep(3600)

    a = asyncio.ensure_future(waiter("a", "cold"))
    await asyncio.sleep(0)
    b = asyncio.ensure_future(waiter("b", "cold"))
    c = asyncio.ensure_future(waiter("c", "later"))
    await asyncio.sleep(0)
    stats = pool.statistics()
    assert (stats.waiting, stats.idle, stats.size) == (3, 0, 2)
    await pool.release(holder)  # "cold" is served at once, evicting it...
    stats = pool.statistics()
    assert (stats.idle, stats.waiting, stats.per_key["cold"].size) == (0, 2, 1)
    a.cancel()  # ...and "a" is cancelled natively before it resumes
    await asyncio.sleep(0)  # "a" runs: it gives it all back; "b" is served in its place
    stats = pool.statistics()
    assert stats.per_key["cold"].size == 1
    assert stats.per_key["cold"].waiting == 0
    assert stats.per_key["later"].size == 0  # "later" did not jump ahead of "cold"
    assert not holder.closed  # "b" has not run yet
    await asyncio.sleep(0.1)
    assert served == ["b"]
    assert holder.closed  # "b" evicted it, and disposed it before making its own
    assert a.cancelled()
    for task in (b, c):
        task.cancel()
    await asyncio.gather(b, c, return_exceptions=True)
    await pool.release(other)
    assert_books(pool, hooks)
    await pool.aclose()


async def test_wait_for_around_acquire_never_loses_a_resource() -> None:
    """A polling loop of short wait_for timeouts around acquire, racing with releases."""
    hooks = Hooks(step=0, max_per_key=2, max_total=3)
    pool = hooks.pool()
    keys = ["a", "b", "c", "d"]
    held: list[Conn] = []
    timeouts = 0

    async def churn() -> None:
        for _ in range(300):
            await asyncio.sleep(0.0003)
            if held:
                await pool.release(held.pop(0))

    async def poll(key: str) -> None:
        nonlocal timeouts
        try:
            conn = await asyncio.wait_for(pool.acquire(key), 0.0002)
        except TimeoutError:
            timeouts += 1
        else:
            assert conn.key == key
            held.append(conn)

    churner = asyncio.ensure_future(churn())
    for number in range(600):
        await poll(keys[number % len(keys)])
    await churner
    for conn in held:
        await pool.release(conn)
    stats = pool.statistics()
    assert (stats.leased, stats.waiting) == (0, 0), stats
    assert stats.size == stats.idle <= 3
    assert timeouts > 0
    assert stats.disposals.evicted > 0
    assert_books(pool, hooks)
    await pool.aclose()


async def test_native_timeout_on_a_waiting_acquire_keeps_fifo() -> None:
    hooks = Hooks(max_per_key=1, max_total=1)
    pool = hooks.pool()
    holder = await pool.acquire("a")
    order: list[str] = []

    async def wait(name: str) -> None:
        async with pool.lease("a", timeout=10):
            order.append(name)

    impatient = asyncio.ensure_future(asyncio.wait_for(wait("impatient"), 0.5))
    patient = asyncio.ensure_future(wait("patient"))
    await asyncio.sleep(1)
    await pool.release(holder)
    await patient
    with pytest.raises(TimeoutError):
        await impatient
    assert order == ["patient"]
    async with pool.lease("a", timeout=0):  # nothing waits: the fast path
        with pytest.raises(PoolTimeoutError):
            await pool.acquire("a", timeout=0.1)
    await pool.aclose()


@pytest.mark.parametrize("style", STYLES)
async def test_interrupted_drain_still_disposes_every_idle_resource(style: str) -> None:
    for delay in delays(STEP, 24):
        hooks = Hooks(max_per_key=2, max_total=4)
        pool = hooks.pool()
        conns = [await pool.acquire(key) for key in ("a", "a", "b", "c")]
        held = conns.pop()
        for conn in conns:
            await pool.release(conn)
        with no_cancel_leak():
            await cancel_at(pool.drain, style, delay)
        assert all(conn.closed for conn in conns), (delay, hooks.made)
        assert not held.closed
        assert_books(pool, hooks)
        stats = pool.statistics()
        assert (stats.size, stats.disposals.drained) == (1, 3)
        await pool.release(held)  # drained: disposed on its way back
        assert held.closed
        await still_works(pool, "c")
        assert pool.statistics().disposals.drained == 4
        await pool.aclose()
        assert_books(pool, hooks)


async def test_interrupted_drain_at_every_zero_time_step() -> None:
    for steps in range(1, 200):  # at 0 the task is cancelled before drain() starts
        hooks = Hooks(step=0, max_per_key=2, max_total=3)
        pool = hooks.pool(reset=hooks.reset)
        conns = [await pool.acquire(key) for key in ("a", "a", "b")]
        for conn in conns:
            await pool.release(conn)
        finished = await cancel_after_steps(pool.drain, steps)
        assert all(conn.closed for conn in conns), steps
        assert_books(pool, hooks)
        assert pool.statistics().size == 0
        await still_works(pool)
        await pool.aclose()
        assert_books(pool, hooks)
        if finished:
            break
    else:
        pytest.fail("drain never finished before the cancellation")


@pytest.mark.parametrize("style", STYLES)
async def test_a_waiter_cancelled_natively_while_paused_leaves_no_trace(style: str) -> None:
    hooks = Hooks(max_per_key=1, max_total=1)
    pool = hooks.pool()
    idle = await pool.acquire("a")
    await pool.release(idle)
    pool.pause()

    async def acquire() -> None:
        await pool.acquire("a")

    with no_cancel_leak():
        assert not await cancel_at(acquire, style, 0.5)
    stats = pool.statistics()
    assert (stats.waiting, stats.idle, stats.keys, stats.waits_abandoned) == (0, 1, 1, 1)
    pool.resume()
    await still_works(pool)
    await still_works(pool, "b")  # the only place, not lost
    assert_books(pool, hooks)
    await pool.aclose()


async def test_a_waiter_cancelled_as_resume_serves_it_passes_the_resource_on() -> None:
    hooks = Hooks(max_per_key=1, max_total=1)
    pool = hooks.pool()
    idle = await pool.acquire("a")
    await pool.release(idle)
    pool.pause()
    got: list[tuple[str, Conn]] = []

    async def waiter(name: str) -> None:
        async with pool.lease("a") as conn:
            got.append((name, conn))

    first = asyncio.ensure_future(waiter("first"))
    second = asyncio.ensure_future(waiter("second"))
    await asyncio.sleep(0)
    assert pool.statistics().waiting == 2
    pool.resume()  # the idle resource is handed to the first waiter at once...
    assert pool.statistics().leased == 1
    first.cancel()  # ...which is cancelled natively before it runs
    await asyncio.gather(first, second, return_exceptions=True)
    assert first.cancelled()
    assert got == [("second", idle)]
    assert_books(pool, hooks)
    await pool.aclose()
