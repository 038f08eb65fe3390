"""Storms on the keyed pool, in virtual time, on both backends.

Thousands of tasks lease over dozens of keys (a few hot ones that could fill ``max_total`` by
themselves, many cold ones) from a pool whose factory fails now and then and takes a random
number of checkpoints, whose checks and resets fail now and then; the tasks are cancelled at
random, time out at random, discard at random and raise in lease bodies. Throughout:

- **both limits hold**: the factory and dispose hooks count every resource that exists (from
  the factory call until its dispose returned), per key and overall, and the count never goes
  over ``max_per_key`` or ``max_total``;
- **no resource is held twice**, or handed out after it was disposed;
- **cold keys are not starved**: some tasks are *patient* (no timeout, never cancelled) and
  ask for cold keys. After every release (a lease's exit, ``release``, ``discard``) the
  storm looks at the keys that wait with no resource at all (``size == 0`` and
  ``waiting > 0`` in their statistics, a count that may include a waiter cancelled a moment
  ago: an upper bound): a key that a patient task waits for, cold at release ``b`` when
  ``n`` keys were cold, must have been served by release ``b + n`` (the
  bound the pool documents: ``c`` cold keys ahead of it, served by the ``c + 1``-th
  release). A patient task keeps its key in the queue; impatient ones may all leave, and
  then their key queues again at the back, as it should;
- afterwards the **books balance** and no capacity token is left over.

A second storm cancels the asyncio way (``task.cancel()``, ``asyncio.timeout``,
``asyncio.wait_for``). ``DARWIN_METRICS_STRESS=1`` makes the storms ten times bigger.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import random
import sys
from collections import Counter
from typing import Any

import anyio
import looptime
import pytest

from darwin_metrics import PoolClosedError, PoolOverloadedError, PoolTimeoutError
from darwin_metrics.resource import KeyedResourcePool

pytestmark = pytest.mark.anyio

SCALE = 10 if os.environ.get("DARWIN_METRICS_STRESS") == "1" else 1

# The key a task is acquiring, for the hooks that run on its behalf (on asyncio, a protected
# dispose runs in a task of its own, which copies the context).
ACQUIRING: contextvars.ContextVar[int | None] = contextvars.ContextVar("acquiring", default=None)


class Conn:
    __slots__ = ("closed", "key", "number")

    def __init__(self, key: int, number: int) -> None:
        self.key = key
        self.number = number
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn({self.key}, {self.number})"


class BodyError(Exception):
    """Raised inside lease bodies on purpose."""


class Storm:
    """Runs a storm and keeps the books that the pool's must match."""

    def __init__(
        self,
        seed: int,
        *,
        keys: int = 40,
        hot: int = 4,
        max_per_key: int = 6,
        max_total: int = 16,
        failures: bool = True,
        max_waiting: int | None = None,
        **upkeep: Any,
    ) -> None:
        self.rng = random.Random(seed)
        self.keys = keys
        self.hot = hot
        self.failures = failures
        self.made: list[Conn] = []
        self.disposed = 0
        self.owner: dict[int, int] = {}  # resource number -> task number
        self.acquisitions = 0
        self.rejections = 0
        self.alive: Counter[int] = Counter()  # per key: factory called, dispose not returned
        self.alive_total = 0
        self.peak_total = 0
        self.peak_per_key = 0
        # Fairness bookkeeping (see the module docstring).
        self.releases = 0
        self.cold_since: dict[int, tuple[int, int]] = {}  # key -> (release, cold keys then)
        self.served: set[int] = set()  # keys served since the last release
        self.patient: Counter[int] = Counter()  # per key: patient tasks inside acquire
        self.patient_tasks: set[object] = set()  # (native storm) tasks not to cancel
        self.longest_cold = 0
        self.cold_streaks = 0
        self.check_fairness = True
        self.pool: KeyedResourcePool[int, Conn] = KeyedResourcePool(
            max_per_key,
            max_total,
            factory=self.factory,
            dispose=self.dispose,
            reset=self.reset,
            check=self.check,
            max_waiting=max_waiting,
            **upkeep,
        )

    # -- the hooks

    def _exists(self, key: int) -> None:
        self.alive[key] += 1
        self.alive_total += 1
        pool = self.pool
        assert self.alive[key] <= pool.max_per_key, f"key {key}: {self.alive[key]} resources"
        assert self.alive_total <= pool.max_total, f"{self.alive_total} resources in all"
        self.peak_total = max(self.peak_total, self.alive_total)
        self.peak_per_key = max(self.peak_per_key, self.alive[key])

    def _gone(self, key: int) -> None:
        self.alive[key] -= 1
        self.alive_total -= 1

    async def factory(self, key: int) -> Conn:
        if ACQUIRING.get() == key:
            self.served.add(key)
        self._exists(key)
        try:
            for _ in range(self.rng.randrange(4)):
                await anyio.lowlevel.checkpoint()
            if self.failures and self.rng.random() < 0.05:
                raise ConnectionError("factory failed")
        except BaseException:
            self._gone(key)
            raise
        conn = Conn(key, len(self.made))
        self.made.append(conn)
        return conn

    async def dispose(self, key: int, conn: Conn) -> None:
        if ACQUIRING.get() is not None:
            self.served.add(ACQUIRING.get())  # type: ignore[arg-type]  # an eviction
        assert conn.key == key
        assert not conn.closed, "disposed twice"
        assert conn.number not in self.owner, "disposed while held"
        for _ in range(self.rng.randrange(3)):
            await anyio.lowlevel.checkpoint()
        conn.closed = True  # only once the whole dispose ran
        self.disposed += 1
        self._gone(key)

    async def reset(self, key: int, conn: Conn) -> None:
        assert conn.key == key
        if self.rng.random() < 0.1:
            await anyio.lowlevel.checkpoint()
        if self.failures and self.rng.random() < 0.02:
            raise ValueError("reset failed")

    async def check(self, key: int, conn: Conn) -> bool:
        assert conn.key == key
        if self.rng.random() < 0.1:
            await anyio.lowlevel.checkpoint()
        return not self.failures or self.rng.random() > 0.03

    # -- the books

    def take(self, conn: Conn, task: int, key: int) -> None:
        assert conn.key == key, f"asked for key {key}, got {conn}"
        assert not conn.closed, "handed out a disposed resource"
        assert conn.number not in self.owner, (
            f"{conn} held by {self.owner[conn.number]} and {task}"
        )
        self.owner[conn.number] = task
        self.acquisitions += 1

    def give(self, conn: Conn) -> None:
        del self.owner[conn.number]

    def released(self) -> None:
        """A release completed: check that no cold key waited through too many of them."""
        self.releases += 1
        if not self.check_fairness or self.pool.closed:
            return
        cold = {
            key
            for key, stats in self.pool.statistics().per_key.items()
            if stats.size == 0 and stats.waiting > 0
        }
        watched = {key for key in cold if self.patient[key]}
        for key in list(self.cold_since):
            if key not in watched or key in self.served:
                start, _ = self.cold_since.pop(key)
                self.longest_cold = max(self.longest_cold, self.releases - 1 - start)
        self.served.clear()
        for key in watched:
            if key not in self.cold_since:
                self.cold_since[key] = (self.releases, len(cold))
                self.cold_streaks += 1
                continue
            start, bound = self.cold_since[key]
            assert self.releases - start < bound, (
                f"key {key} went cold at release {start} with {bound} cold keys, and still "
                f"waits with nothing at release {self.releases}"
            )

    # -- the workload

    def pick_key(self) -> int:
        if self.rng.random() < 0.75:
            return self.rng.randrange(self.hot)
        return self.rng.randrange(self.hot, self.keys)

    async def hold(self) -> None:
        for _ in range(self.rng.randrange(4)):
            await anyio.lowlevel.checkpoint()
        if self.rng.random() < 0.1:
            await anyio.sleep(0.01)

    async def patient_operation(self, task: int) -> None:
        """Wait for a cold key without a timeout, uncancelled: the fairness bound's subject."""
        key = self.rng.randrange(self.hot, self.keys)
        self.patient[key] += 1
        token = ACQUIRING.set(key)
        try:
            conn = await self.pool.acquire(key, timeout=None)
        finally:
            ACQUIRING.reset(token)
            self.patient[key] -= 1
        self.take(conn, task, key)
        try:
            await self.hold()
        finally:
            self.give(conn)
            try:
                await self.pool.release(conn)
            finally:
                self.released()

    async def one_operation(self, task: int) -> None:
        rng = self.rng
        pool = self.pool
        key = self.pick_key()
        kind = rng.random()
        token = ACQUIRING.set(key)
        if kind < 0.55:
            entered = discarded = False
            try:
                async with pool.lease(key, timeout=rng.choice([None, 0.5, 20.0])) as conn:
                    entered = True
                    ACQUIRING.reset(token)
                    self.take(conn, task, key)
                    try:
                        await self.hold()
                        if rng.random() < 0.05:
                            raise BodyError
                        if rng.random() < 0.05:
                            self.give(conn)
                            discarded = True
                            await pool.discard(conn)
                    finally:
                        if self.owner.get(conn.number) == task:
                            self.give(conn)
                        self.giving_back()
            finally:
                if not entered:
                    ACQUIRING.reset(token)
                else:
                    self.released()  # the exit's give-back, or the discard
            del discarded
            return
        try:
            if kind < 0.9:
                conn = await pool.acquire(key, timeout=rng.choice([None, 0.2, 20.0]))
            else:
                maybe = await pool.try_acquire(key)
                if maybe is None:
                    return
                conn = maybe
        finally:
            ACQUIRING.reset(token)
        self.take(conn, task, key)
        try:
            await self.hold()
        finally:
            self.give(conn)
            self.giving_back()
            try:
                if rng.random() < 0.1:
                    await pool.discard(conn)
                else:
                    await pool.release(conn)
            finally:
                self.released()

    def giving_back(self) -> None:
        """Called just before a resource goes back (a hook for the native storm)."""

    async def worker(self, task: int, operations: int) -> None:
        for _ in range(operations):
            if self.rng.random() < 0.05:
                try:
                    await self.patient_operation(task)
                except ConnectionError:
                    pass
                except PoolOverloadedError:
                    self.rejections += 1
                except PoolClosedError:
                    return
                continue
            with anyio.move_on_after(self.rng.choice([0.001, 0.1, 1.0, 1000.0, 1000.0, 1000.0])):
                try:
                    await self.one_operation(task)
                except (PoolTimeoutError, ConnectionError, BodyError):
                    pass
                except PoolOverloadedError:
                    self.rejections += 1
                except PoolClosedError:
                    return

    def check_books(self) -> None:
        pool = self.pool
        stats = pool.statistics()
        assert self.owner == {}, f"still held: {self.owner}"
        assert stats.leased == 0, stats
        assert stats.waiting == 0, stats
        assert stats.size == stats.idle, stats
        assert stats.created - stats.disposed == stats.idle, stats
        assert stats.created == len(self.made), stats
        assert stats.disposed == self.disposed, stats
        disposals = stats.disposals
        assert stats.disposed == sum(
            getattr(disposals, name) for name in attrs_fields(disposals)
        ), stats
        live = [conn for conn in self.made if not conn.closed]
        assert len(live) == stats.idle == self.alive_total, (len(live), stats, self.alive_total)
        assert stats.size <= stats.max_total, stats
        for key, key_stats in stats.per_key.items():
            assert key_stats.size == key_stats.idle == self.alive[key], (key, key_stats)
            assert key_stats.leased == key_stats.waiting == 0, (key, key_stats)
        assert sum(key_stats.size for key_stats in stats.per_key.values()) == stats.size
        assert stats.keys == len([key for key, n in self.alive.items() if n]), stats
        # The limiters agree with the books: no token leaked, none over-granted.
        total = pool._total
        assert total is not None
        assert total.borrowed_tokens == stats.size
        for k in pool._keys.values():
            assert k.limiter is not None
            assert k.limiter.borrowed_tokens == k.slots == len(k.idle)
        assert all(limiter.borrowed_tokens == 0 for limiter in pool._spare_limiters)
        assert not pool._cold or all(not k.waiters for k, _ in pool._cold)


def attrs_fields(instance: object) -> list[str]:
    import attrs

    return [field.name for field in attrs.fields(type(instance))]


async def test_storm_without_close() -> None:
    storm = Storm(1)
    tasks, operations = 1000 * SCALE, 10
    try:
        async with anyio.create_task_group() as tg:
            for task in range(tasks):
                tg.start_soon(storm.worker, task, operations)
        storm.check_books()
        assert storm.acquisitions > tasks * operations // 2  # the storm really leased
        stats = storm.pool.statistics()
        # Under max_total pressure the pool evicted, and cold keys really went cold.
        assert stats.disposals.evicted > 100, stats
        assert storm.peak_total == storm.pool.max_total
        assert storm.cold_streaks > 100
        assert storm.longest_cold >= 2  # the fairness check saw keys wait through releases
    finally:
        await storm.pool.aclose()
    assert all(conn.closed for conn in storm.made)
    assert storm.alive_total == 0


async def test_storm_closed_midway() -> None:
    storm = Storm(3)
    tasks, operations = 500 * SCALE, 10
    async with anyio.create_task_group() as tg:
        for task in range(tasks):
            tg.start_soon(storm.worker, task, operations)
        await anyio.sleep(1)
        acquisitions_before_close = storm.acquisitions
        await storm.pool.aclose()
    assert acquisitions_before_close > 0
    stats = storm.pool.statistics()
    assert storm.owner == {}
    assert (stats.leased, stats.waiting, stats.idle, stats.size, stats.keys) == (0, 0, 0, 0, 0)
    assert stats.created == stats.disposed == len(storm.made)
    assert all(conn.closed for conn in storm.made)
    assert storm.alive_total == 0


async def test_storm_with_upkeep() -> None:
    """Prefill to min_idle, idle reaping and retirement take and free places meanwhile."""
    storm = Storm(11, min_idle=1, max_idle_time=0.01, max_lifetime=0.02)
    async with storm.pool:
        async with anyio.create_task_group() as tg:
            for task in range(500 * SCALE):
                tg.start_soon(storm.worker, task, 10)
        assert storm.pool.statistics().disposals.lifetime > 0  # retired on the way back
        await anyio.sleep(10)  # nobody uses any key: upkeep reaps them all
        storm.check_books()
        stats = storm.pool.statistics()
        assert (stats.keys, stats.size) == (0, 0), stats
        assert stats.disposals.idle > 0
    assert storm.alive_total == 0


async def test_storm_with_admission_control() -> None:
    """max_waiting sheds load: never more waiting tasks than allowed, the books still balance."""
    storm = Storm(7, max_waiting=20)
    peak_waiting = 0

    async def watch() -> None:
        nonlocal peak_waiting
        while True:
            peak_waiting = max(peak_waiting, storm.pool.statistics().waiting)
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as outer:
        outer.start_soon(watch)
        async with anyio.create_task_group() as tg:
            for task in range(400 * SCALE):
                tg.start_soon(storm.worker, task, 10)
        outer.cancel_scope.cancel()
    storm.check_books()
    assert storm.rejections > 0
    assert storm.pool.statistics().rejected == storm.rejections
    assert 0 < peak_waiting <= 20
    await storm.pool.aclose()


class NativeStorm(Storm):
    """The storm again, cancelled the way asyncio itself cancels: ``asyncio.timeout``,
    ``asyncio.wait_for`` around operations, and a chaos task that ``task.cancel()``s workers
    at random moments, often while they give a resource back."""

    async def reset(self, key: int, conn: Conn) -> None:
        for _ in range(self.rng.randrange(3)):
            await asyncio.sleep(0)  # where a native cancellation lands now and then
        if self.rng.random() < 0.02:
            raise ValueError("reset failed")

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
            if how < 0.05:
                self.patient_tasks.add(me)
                try:
                    await self.patient_operation(task)
                except ConnectionError:
                    pass
                except PoolClosedError:
                    return
                finally:
                    self.patient_tasks.discard(me)
                continue
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
            if not victim.done() and victim not in self.patient_tasks:
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
    tasks, operations = 300 * SCALE, 15
    workers = [
        asyncio.ensure_future(storm.native_worker(task, operations)) for task in range(tasks)
    ]
    cancels = await storm.chaos(workers)
    await asyncio.gather(*workers)
    storm.check_books()
    assert cancels > tasks  # the chaos really landed
    assert storm.acquisitions > tasks * operations // 3
    assert storm.pool.statistics().disposals.evicted > 10
    await storm.pool.aclose()
    assert all(conn.closed for conn in storm.made)
    assert storm.alive_total == 0
