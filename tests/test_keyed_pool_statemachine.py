"""The keyed pool driven through its public API by hypothesis, against a model of what it owns.

The pool runs in an event loop behind an anyio blocking portal (asyncio and trio); every
step is a call through the portal, and after every step the pool's statistics, overall and
per key, and the identities it hands out must match the model exactly: which idle resource a
key reuses (its most recently returned), which one is evicted when ``max_total`` is reached
(the longest idle of the pool), what is made, what is disposed. ``pause``/``resume`` and
``drain`` (pool-wide or for one key) are steps too: while paused nothing is handed out (a
would-be wait times out, is refused, or raises ``PoolPausedError`` with ``reject=True``), and
a drained resource is disposed at once if idle, or when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
import anyio.from_thread
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from darwin_metrics import PoolOverloadedError, PoolPausedError, PoolTimeoutError
from darwin_metrics.resource import KeyedResourcePool

KEYS = ("a", "b", "c", "d")
keys = st.sampled_from(KEYS)


class Item:
    """A resource of a key, with a number; compared by identity, as the pool does."""

    def __init__(self, key: str, number: int) -> None:
        self.key = key
        self.number = number
        self.disposed = False
        self.drained = False  # leased when drain() was called: disposed when it comes back

    def __repr__(self) -> str:
        return f"Item({self.key}, {self.number})"


class KeyedPoolMachine(RuleBasedStateMachine):
    backend = "asyncio"
    max_waiting: int | None = None  # None: a would-be wait times out; 0: it is refused

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self._exit = contextlib.ExitStack()
        self.portal = self._exit.enter_context(
            anyio.from_thread.start_blocking_portal(self.backend)
        )
        self.counter = 0
        self.max_per_key = 2
        self.max_total = 3
        self.pool: KeyedResourcePool[str, Item] = KeyedResourcePool(
            self.max_per_key,
            self.max_total,
            factory=self._make,
            dispose=self._dispose,
            max_waiting=self.max_waiting,
        )
        # The model: every idle item, the longest idle first (the eviction order).
        self.idle: list[Item] = []
        self.leased: list[Item] = []
        self.leases: dict[int, Any] = {}  # id(item) -> entered lease context manager
        self.created = 0
        self.disposed = 0
        self.evicted = 0
        self.drained = 0
        self.paused = False
        self.rejecting = False

    def _make(self, key: str) -> Item:
        self.counter += 1
        return Item(key, self.counter)

    def _dispose(self, key: str, item: Item) -> None:
        assert item.key == key
        assert not item.disposed
        item.disposed = True

    def count(self, key: str) -> int:
        return sum(item.key == key for item in (*self.idle, *self.leased))

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.leased)

    def _expected_take(self, key: str) -> tuple[Item | str | None, Item | None]:
        """What the next acquisition of ``key`` yields (an item, "new", or None: it would
        wait), and the idle item it evicts first, if any."""
        if self.paused:
            return None, None  # nothing is handed out
        mine = [item for item in self.idle if item.key == key]
        if mine:
            return mine[-1], None  # the key's most recently returned
        if self.count(key) >= self.max_per_key:
            return None, None
        if self.size < self.max_total:
            return "new", None
        if self.idle:
            return "new", self.idle[0]  # the pool's longest idle resource
        return None, None

    def _took(
        self, expected: Item | str | None, victim: Item | None, got: Item | None
    ) -> Item | None:
        if expected is None:
            assert got is None
            return None
        assert got is not None
        if victim is not None:
            assert victim.disposed, f"{victim} should have been evicted"
            self.idle.remove(victim)
            self.disposed += 1
            self.evicted += 1
        if expected == "new":
            assert got.number == self.counter, (got, self.counter)
            self.created += 1
        else:
            assert got is expected, (got, expected)
            self.idle.remove(got)
        self.leased.append(got)
        return got

    def _would_wait(self) -> type[Exception]:
        if self.paused and self.rejecting:
            return PoolPausedError
        return PoolTimeoutError if self.max_waiting is None else PoolOverloadedError

    def _came_back(self, item: Item) -> None:
        """A leased item was given back: idle (the most recent), or disposed if drained."""
        self.leased.remove(item)
        if item.drained:
            assert item.disposed, f"{item} was drained and should have been disposed"
            self.disposed += 1
            self.drained += 1
        else:
            assert not item.disposed
            self.idle.append(item)

    @rule(target=held, key=keys)
    def try_acquire(self, key: str) -> Item | None:
        expected, victim = self._expected_take(key)
        try:
            got = self.portal.call(self.pool.try_acquire, key)
        except PoolPausedError:
            assert self.paused
            assert self.rejecting
            return None
        return self._took(expected, victim, got)

    @rule(target=held, key=keys)
    def acquire(self, key: str) -> Item | None:
        expected, victim = self._expected_take(key)
        timeout = 0 if self.max_waiting is None else None
        try:
            got = self.portal.call(lambda: self.pool.acquire(key, timeout=timeout))
        except self._would_wait():  # the one error a would-be wait may end in
            assert expected is None, (key, expected)
            return None
        return self._took(expected, victim, got)

    @rule(target=held, key=keys)
    def enter_lease(self, key: str) -> Item | None:
        expected, victim = self._expected_take(key)
        manager = self.portal.wrap_async_context_manager(self.pool.lease(key, timeout=0))
        try:
            got = manager.__enter__()
        except self._would_wait():  # the one error a would-be wait may end in
            assert expected is None, (key, expected)
            return None
        item = self._took(expected, victim, got)
        assert item is not None
        self.leases[id(item)] = manager
        return item

    @precondition(lambda self: self.backend == "asyncio")
    @rule(target=held, key=keys, steps=st.integers(min_value=0, max_value=3))
    def acquire_cancelled_natively(self, key: str, steps: int) -> Item | None:
        """task.cancel() after ``steps`` loop iterations: it got one, or nothing changed
        (an evicted resource it had taken went back exactly where it was)."""
        expected, victim = self._expected_take(key)

        timeout = 0 if self.max_waiting is None else None

        async def run() -> tuple[Item | None, bool]:
            task = asyncio.ensure_future(self.pool.acquire(key, timeout=timeout))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                return await task, True
            except asyncio.CancelledError:
                return None, False
            except (PoolTimeoutError, PoolOverloadedError, PoolPausedError):
                return None, True  # it would have waited, or was refused

        got, finished = self.portal.call(run)
        if not finished:
            assert victim is None or not victim.disposed
            return None
        return self._took(expected, victim, got)

    @precondition(lambda self: self.backend == "asyncio")
    @rule(key=keys, steps=st.integers(min_value=0, max_value=3))
    def lease_in_a_task_cancelled_natively(self, key: str, steps: int) -> None:
        """The lease's body is cancelled natively; the resource comes back, most recent."""
        expected, victim = self._expected_take(key)
        got: list[Item] = []

        async def run() -> None:
            async def body() -> None:
                async with self.pool.lease(key, timeout=0) as item:
                    got.append(item)
                    await asyncio.sleep(3600)

            task = asyncio.ensure_future(body())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(
                asyncio.CancelledError, PoolTimeoutError, PoolOverloadedError, PoolPausedError
            ):
                await task

        self.portal.call(run)
        if not got:
            assert victim is None or not victim.disposed
            return
        [item] = got
        self._took(expected, victim, item)
        self._came_back(item)

    @rule(item=consumes(held))
    def give_back(self, item: Item | None) -> None:
        if item is None:
            return
        manager = self.leases.pop(id(item), None)
        if manager is not None:
            manager.__exit__(None, None, None)
        else:
            self.portal.call(self.pool.release, item)
        self._came_back(item)

    @rule(item=consumes(held))
    def discard(self, item: Item | None) -> None:
        if item is None:
            return
        self.portal.call(self.pool.discard, item)
        self.leased.remove(item)
        self.disposed += 1
        assert item.disposed
        manager = self.leases.pop(id(item), None)
        if manager is not None:
            manager.__exit__(None, None, None)  # a discarded lease gives nothing back

    @rule(reject=st.booleans())
    def pause(self, reject: bool) -> None:
        self.portal.call(lambda: self.pool.pause(reject=reject))
        self.paused = True
        self.rejecting = reject

    @rule()
    def resume(self) -> None:
        self.portal.call(self.pool.resume)
        self.paused = self.rejecting = False

    @rule(key=st.none() | keys)
    def drain(self, key: str | None) -> None:
        """Idle items of the key (or of all) are disposed now; leased ones are marked."""
        mine = [item for item in self.idle if key is None or item.key == key]
        if key is None:
            count = self.portal.call(self.pool.drain)
        else:
            count = self.portal.call(self.pool.drain, key)
        assert count == len(mine)
        for item in mine:
            assert item.disposed
            self.idle.remove(item)
        self.disposed += len(mine)
        self.drained += len(mine)
        for item in self.leased:
            if key is None or item.key == key:
                item.drained = True

    @invariant()
    def statistics_match_the_model(self) -> None:
        stats = self.pool.statistics()
        assert stats.idle == len(self.idle)
        assert stats.leased == len(self.leased)
        assert stats.size == self.size
        assert stats.created == self.created
        assert stats.disposed == self.disposed
        assert stats.disposals.evicted == self.evicted
        assert stats.disposals.drained == self.drained
        assert self.pool.paused == self.paused
        assert stats.waiting == 0
        in_use = {item.key for item in (*self.idle, *self.leased)}
        assert set(stats.per_key) == in_use  # a key with nothing is gone
        for key, key_stats in stats.per_key.items():
            assert key_stats.idle == sum(item.key == key for item in self.idle)
            assert key_stats.leased == sum(item.key == key for item in self.leased)
            assert key_stats.size == self.count(key) <= self.max_per_key

    def teardown(self) -> None:
        try:
            for manager in self.leases.values():
                manager.__exit__(None, None, None)
            self.portal.call(self.pool.aclose)
            assert self.pool.statistics().idle == 0
        finally:
            self._exit.close()


_settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


class AsyncioKeyedPool(KeyedPoolMachine):
    backend = "asyncio"


class TrioKeyedPool(KeyedPoolMachine):
    backend = "trio"


class AsyncioKeyedPoolRefusing(KeyedPoolMachine):
    backend = "asyncio"
    max_waiting = 0


class TrioKeyedPoolRefusing(KeyedPoolMachine):
    backend = "trio"
    max_waiting = 0


TestAsyncioKeyedPool = AsyncioKeyedPool.TestCase
TestAsyncioKeyedPool.settings = _settings
TestTrioKeyedPool = TrioKeyedPool.TestCase
TestTrioKeyedPool.settings = _settings
TestAsyncioKeyedPoolRefusing = AsyncioKeyedPoolRefusing.TestCase
TestAsyncioKeyedPoolRefusing.settings = _settings
TestTrioKeyedPoolRefusing = TrioKeyedPoolRefusing.TestCase
TestTrioKeyedPoolRefusing.settings = _settings
