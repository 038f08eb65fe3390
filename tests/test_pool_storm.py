"""A cancellation storm on the pool, in virtual time, on both backends.

Thousands of tasks lease from a small pool whose factory fails now and then and takes a
random number of checkpoints; they are cancelled at random, time out at random, discard at
random and raise in lease bodies; in the second phase the pool is closed while all of this
runs. An ownership map checks that no resource is ever held by two holders, and afterwards
the pool's books must balance. ``DARWIN_METRICS_STRESS=1`` makes the storm ten times bigger.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from typing import Any

import anyio
import looptime
import pytest

from darwin_metrics import PoolClosedError, PoolFullError, PoolTimeoutError
from darwin_metrics.resource import ResourcePool

pytestmark = pytest.mark.anyio

SCALE = 10 if os.environ.get("DARWIN_METRICS_STRESS") == "1" else 1


class Conn:
    __slots__ = ("closed", "number")

    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False


class BodyError(Exception):
    """Raised inside lease bodies on purpose."""


class Storm:
    """Runs the storm and keeps the books that the pool's must match."""

    def __init__(self, seed: int, *, max_size: int = 8) -> None:
        self.rng = random.Random(seed)
        self.made: list[Conn] = []
        self.disposed = 0
        self.owner: dict[int, int] = {}  # resource number -> task number
        self.acquisitions = 0
        self.pool: ResourcePool[Conn] = ResourcePool(
            max_size,
            factory=self.factory,
            dispose=self.dispose,
            reset=self.reset,
            check=self.check,
        )

    async def factory(self) -> Conn:
        for _ in range(self.rng.randrange(4)):
            await anyio.lowlevel.checkpoint()
        if self.rng.random() < 0.05:
            raise ConnectionError("factory failed")
        conn = Conn(len(self.made))
        self.made.append(conn)
        return conn

    def dispose(self, conn: Conn) -> None:
        assert not conn.closed, "disposed twice"
        assert conn.number not in self.owner, "disposed while held"
        conn.closed = True
        self.disposed += 1

    async def reset(self, conn: Conn) -> None:
        if self.rng.random() < 0.1:
            await anyio.lowlevel.checkpoint()

    async def check(self, conn: Conn) -> bool:
        if self.rng.random() < 0.1:
            await anyio.lowlevel.checkpoint()
        return self.rng.random() > 0.02

    def take(self, conn: Conn, task: int) -> None:
        assert not conn.closed, "handed out a disposed resource"
        assert conn.number not in self.owner, (
            f"{conn.number} held by {self.owner[conn.number]} and {task}"
        )
        self.owner[conn.number] = task
        self.acquisitions += 1

    def give(self, conn: Conn) -> None:
        del self.owner[conn.number]

    async def hold(self) -> None:
        """Hold a lease across a few checkpoints, now and then across virtual time.

        Few distinct sleep lengths keep the number of distinct timer deadlines (and so
        of event loop iterations in virtual time) small.
        """
        for _ in range(self.rng.randrange(4)):
            await anyio.lowlevel.checkpoint()
        if self.rng.random() < 0.1:
            await anyio.sleep(0.01)

    async def one_operation(self, task: int) -> None:
        rng = self.rng
        pool = self.pool
        kind = rng.random()
        if kind < 0.6:
            async with pool.lease(timeout=rng.choice([None, 0.5, 20.0])) as conn:
                self.take(conn, task)
                try:
                    await self.hold()
                    if rng.random() < 0.05:
                        raise BodyError
                    if rng.random() < 0.05:
                        self.give(conn)
                        await pool.discard(conn)
                        return
                finally:
                    if self.owner.get(conn.number) == task:
                        self.give(conn)
                    self.giving_back()  # the lease's exit comes next
        else:
            conn_or_none = await pool.acquire(timeout=rng.choice([None, 0.2, 20.0]))
            assert conn_or_none is not None
            conn = conn_or_none
            self.take(conn, task)
            try:
                await self.hold()
            finally:
                self.give(conn)
                self.giving_back()
                if rng.random() < 0.1:
                    await pool.discard(conn)
                else:
                    await pool.release(conn)

    def giving_back(self) -> None:
        """Called just before a resource goes back (a hook for the native storm)."""

    async def worker(self, task: int, operations: int) -> None:
        for _ in range(operations):
            with anyio.move_on_after(self.rng.choice([0.001, 0.1, 1.0, 1000.0, 1000.0, 1000.0])):
                try:
                    await self.one_operation(task)
                except (PoolTimeoutError, ConnectionError, BodyError):
                    pass
                except PoolClosedError:
                    return

    def check_books(self) -> None:
        stats = self.pool.statistics()
        assert self.owner == {}, f"still held: {self.owner}"
        assert stats.leased == 0, stats
        assert stats.waiting == 0, stats
        assert stats.size == stats.idle, stats
        assert stats.created - stats.disposed == stats.size, stats
        assert stats.created == len(self.made), stats
        assert stats.disposed == self.disposed, stats
        live = [conn for conn in self.made if not conn.closed]
        assert len(live) == stats.idle, (len(live), stats)
        assert stats.size <= stats.max_size, stats
        limiter = self.pool._limiter
        assert limiter is not None
        assert limiter.borrowed_tokens == 0, "a capacity token leaked"


async def test_storm_without_close() -> None:
    storm = Storm(1)
    tasks, operations = 1000 * SCALE, 20
    try:
        async with anyio.create_task_group() as tg:
            for task in range(tasks):
                tg.start_soon(storm.worker, task, operations)
        storm.check_books()
        assert storm.acquisitions > tasks * operations // 2  # the storm really leased
    finally:
        await storm.pool.aclose()
    assert all(conn.closed for conn in storm.made)


async def test_storm_closed_midway() -> None:
    storm = Storm(3)
    tasks, operations = 500 * SCALE, 20
    async with anyio.create_task_group() as tg:
        for task in range(tasks):
            tg.start_soon(storm.worker, task, operations)
        await anyio.sleep(1)
        acquisitions_before_close = storm.acquisitions
        await storm.pool.aclose()
    assert acquisitions_before_close > 0
    stats = storm.pool.statistics()
    assert storm.owner == {}
    assert (stats.leased, stats.waiting, stats.idle, stats.size) == (0, 0, 0, 0), stats
    assert stats.created == stats.disposed == len(storm.made)
    assert all(conn.closed for conn in storm.made)


async def test_storm_on_a_pool_without_factory() -> None:
    """Tokens track owned resources: adds, discards and waiters that must get None."""
    rng = random.Random(4)
    pool: ResourcePool[Any] = ResourcePool(3)
    owner: dict[int, int] = {}
    nones = 0

    async def worker(task: int) -> None:
        nonlocal nones
        for _ in range(20):
            with anyio.move_on_after(rng.choice([0.1, 1.0, 10.0])):
                if rng.random() < 0.1 and pool.statistics().size < pool.max_size:
                    with contextlib.suppress(PoolFullError):  # another task filled it first
                        await pool.release(object())
                    continue
                try:
                    resource = await pool.acquire(timeout=rng.choice([None, 0.5]))
                except PoolTimeoutError:
                    continue
                if resource is None:
                    nones += 1
                    continue
                assert id(resource) not in owner
                owner[id(resource)] = task
                try:
                    await anyio.sleep(rng.random() * 0.2)
                finally:
                    del owner[id(resource)]
                    if rng.random() < 0.15:
                        await pool.discard(resource)
                    else:
                        await pool.release(resource)

    async with anyio.create_task_group() as tg:
        for task in range(200 * SCALE):
            tg.start_soon(worker, task)
    stats = pool.statistics()
    assert (stats.leased, stats.waiting) == (0, 0), stats
    assert stats.size == stats.idle
    assert stats.created - stats.disposed == stats.size
    assert pool._limiter is not None
    assert pool._limiter.total_tokens == stats.size
    assert pool._limiter.borrowed_tokens == 0
    assert nones > 0  # the pool ran dry at some point, and said so


class NativeStorm(Storm):
    """The storm again, cancelled the way asyncio itself cancels: ``asyncio.timeout``,
    ``asyncio.wait_for`` around operations, and a chaos task that ``task.cancel()``s workers
    at random moments."""

    async def reset(self, conn: Conn) -> None:
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)  # where a native cancellation lands now and then

    async def dispose(self, conn: Conn) -> None:  # type: ignore[override]
        assert not conn.closed, "disposed twice"
        assert conn.number not in self.owner, "disposed while held"
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)
        conn.closed = True  # only once the whole dispose ran
        self.disposed += 1

    def giving_back(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.returning.append(task)

    async def native_worker(self, task: int, operations: int) -> None:
        rng = self.rng
        me = asyncio.current_task()
        assert me is not None
        for _ in range(operations):
            how = rng.random()
            try:
                if how < 0.3:
                    async with asyncio.timeout(rng.choice([0.001, 0.1, 1.0])):
                        await self.one_operation(task)
                elif how < 0.5:
                    await asyncio.wait_for(self.one_operation(task), rng.choice([0.001, 0.1]))
                else:
                    await self.one_operation(task)
            except (PoolTimeoutError, ConnectionError, BodyError, TimeoutError):
                pass
            except asyncio.CancelledError:
                me.uncancel()  # the chaos task's: carry on with the next operation
            except PoolClosedError:
                return

    async def chaos(self, workers: list[asyncio.Task[None]]) -> int:
        """Cancel natively, at random: a worker, or a task that is giving a resource back."""
        cancels = 0
        self.returning: list[asyncio.Task[Any]] = []
        while any(not worker.done() for worker in workers):
            await asyncio.sleep(self.rng.choice([0, 0, 0, 0.001]))
            returning, self.returning = self.returning, []
            if returning and self.rng.random() < 0.7:
                victim = self.rng.choice(returning)
            else:
                victim = self.rng.choice(workers)
            if not victim.done():
                victim.cancel()
                cancels += 1
        return cancels


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout and uncancel: 3.11")
@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("asyncio", {"loop_factory": lambda: looptime.new_event_loop(start=0)}))],
)
async def test_storm_with_native_asyncio_cancellation() -> None:
    storm = NativeStorm(5)
    storm.returning = []
    tasks, operations = 300 * SCALE, 20
    workers = [
        asyncio.ensure_future(storm.native_worker(task, operations)) for task in range(tasks)
    ]
    cancels = await storm.chaos(workers)
    await asyncio.gather(*workers)
    storm.check_books()
    assert cancels > tasks  # the chaos really landed
    assert storm.acquisitions > tasks * operations // 3
    await storm.pool.aclose()
    assert all(conn.closed for conn in storm.made)
