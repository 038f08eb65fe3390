"""The pool driven through its public API by hypothesis, against a model of what it owns.

The pool runs in an event loop behind an anyio blocking portal (asyncio and trio); every
step is a call through the portal, and after every step the pool's statistics and the
identities it hands out must match the model exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import anyio
import anyio.from_thread
import pytest
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

from darwin_metrics import PoolEmptyError, PoolFullError, PoolTimeoutError
from darwin_metrics.resource import ResourcePool


class Item:
    """A resource with a number; compared by identity, as the pool does."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.disposed = False

    def __repr__(self) -> str:
        return f"Item({self.number})"


class PoolMachine(RuleBasedStateMachine):
    backend = "asyncio"
    with_factory = True

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self._exit = contextlib.ExitStack()
        self.portal = self._exit.enter_context(
            anyio.from_thread.start_blocking_portal(self.backend)
        )
        self.counter = 0
        self.max_size = 3
        self.pool: ResourcePool[Item] = ResourcePool(
            self.max_size,
            factory=self._make if self.with_factory else None,
            dispose=self._dispose,
        )
        # The model: idle is a stack (the pool hands out the most recently returned).
        self.idle: list[Item] = []
        self.leased: list[Item] = []
        self.leases: dict[int, Any] = {}  # id(item) -> entered lease context manager
        self.created = 0
        self.disposed = 0

    def _make(self) -> Item:
        self.counter += 1
        return Item(self.counter)

    def _dispose(self, item: Item) -> None:
        assert not item.disposed
        item.disposed = True

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.leased)

    def _expected_take(self) -> Item | str | None:
        """What the model says the next acquisition yields ("new" for a factory call)."""
        if self.idle:
            return self.idle[-1]
        if self.with_factory and self.size < self.max_size:
            return "new"
        return None

    def _took(self, expected: Item | str | None, got: Item | None) -> Item | None:
        if expected is None:
            assert got is None
            return None
        assert got is not None
        if expected == "new":
            assert got.number == self.counter
            self.created += 1
        else:
            assert got is expected
            self.idle.pop()
        self.leased.append(got)
        return got

    @rule(target=held)
    def try_acquire(self) -> Item | None:
        expected = self._expected_take()
        got = self.portal.call(self.pool.try_acquire)
        return self._took(expected, got)

    @rule(target=held)
    def acquire_with_zero_timeout(self) -> Item | None:
        expected = self._expected_take()
        try:
            got = self.portal.call(lambda: self.pool.acquire(timeout=0))
        except PoolTimeoutError:
            assert expected is None
            assert self.size > 0 or self.with_factory
            return None
        return self._took(expected, got)

    @rule(target=held)
    def enter_lease(self) -> Item | None:
        expected = self._expected_take()
        manager = self.portal.wrap_async_context_manager(self.pool.lease(timeout=0))
        try:
            got = manager.__enter__()
        except PoolTimeoutError:
            assert expected is None
            return None
        except PoolEmptyError:
            assert expected is None
            assert not self.with_factory
            assert self.size == 0
            return None
        item = self._took(expected, got)
        assert item is not None
        self.leases[id(item)] = manager
        return item

    @precondition(lambda self: self.backend == "asyncio")
    @rule(target=held, steps=st.integers(min_value=0, max_value=3))
    def acquire_cancelled_natively(self, steps: int) -> Item | None:
        """task.cancel() after ``steps`` loop iterations: it got one, or nothing changed."""
        expected = self._expected_take()

        async def run() -> tuple[Item | None, bool]:
            task = asyncio.ensure_future(self.pool.acquire())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                return await task, True
            except asyncio.CancelledError:
                return None, False

        got, finished = self.portal.call(run)
        if not finished:
            return None
        return self._took(expected, got)

    @precondition(lambda self: self.backend == "asyncio")
    @rule(steps=st.integers(min_value=0, max_value=3))
    def lease_in_a_task_cancelled_natively(self, steps: int) -> None:
        """The lease's body is cancelled natively; the resource is back, on top of idle."""
        expected = self._expected_take()
        got: list[Item] = []

        async def run() -> None:
            async def body() -> None:
                async with self.pool.lease(timeout=0) as item:
                    got.append(item)
                    await asyncio.sleep(3600)

            task = asyncio.ensure_future(body())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, PoolTimeoutError, PoolEmptyError):
                await task

        self.portal.call(run)
        if not got:
            return
        [item] = got
        if expected == "new":
            assert item.number == self.counter
            self.created += 1
            self.idle.append(item)
        else:
            assert item is expected  # taken from the top of idle, and put back there

    @rule(item=consumes(held))
    def give_back(self, item: Item | None) -> None:
        if item is None:
            return
        manager = self.leases.pop(id(item), None)
        if manager is not None:
            manager.__exit__(None, None, None)
        else:
            self.portal.call(self.pool.release, item)
        self.leased.remove(item)
        if self.size + 1 > self.max_size:  # shrunk while leased: disposed on return
            self.disposed += 1
            assert item.disposed
        else:
            self.idle.append(item)

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

    @rule()
    def add_new(self) -> None:
        self.counter += 1
        item = Item(self.counter)
        if self.size >= self.max_size:
            with pytest.raises(PoolFullError):
                self.portal.call(self.pool.release, item)
            return
        self.portal.call(self.pool.release, item)
        self.idle.append(item)
        self.created += 1

    @rule(new_size=st.integers(min_value=1, max_value=5))
    def resize(self, new_size: int) -> None:
        self.portal.call(self.pool.resize, new_size)
        self.max_size = new_size
        while self.size > new_size and self.idle:
            item = self.idle.pop(0)  # the longest idle first
            assert item.disposed
            self.disposed += 1

    @precondition(lambda self: bool(self.idle))
    @rule(parity=st.integers(min_value=0, max_value=1))
    def retain(self, parity: int) -> None:
        removed = self.portal.call(self.pool.retain, lambda item: item.number % 2 == parity)
        doomed = [item for item in self.idle if item.number % 2 != parity]
        assert removed == len(doomed)
        self.idle = [item for item in self.idle if item.number % 2 == parity]
        self.disposed += len(doomed)
        assert all(item.disposed for item in doomed)

    @invariant()
    def statistics_match_the_model(self) -> None:
        stats = self.pool.statistics()
        assert stats.idle == len(self.idle)
        assert stats.leased == len(self.leased)
        assert stats.size == self.size
        assert stats.created == self.created
        assert stats.disposed == self.disposed
        assert stats.max_size == self.max_size
        assert stats.waiting == 0

    def teardown(self) -> None:
        try:
            for manager in self.leases.values():
                manager.__exit__(None, None, None)
            self.portal.call(self.pool.aclose)
            assert self.pool.statistics().idle == 0
        finally:
            self._exit.close()


_settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


class AsyncioFactoryPool(PoolMachine):
    backend = "asyncio"
    with_factory = True


class TrioFactoryPool(PoolMachine):
    backend = "trio"
    with_factory = True


class AsyncioManualPool(PoolMachine):
    backend = "asyncio"
    with_factory = False


class TrioManualPool(PoolMachine):
    backend = "trio"
    with_factory = False


TestAsyncioFactoryPool = AsyncioFactoryPool.TestCase
TestAsyncioFactoryPool.settings = _settings
TestTrioFactoryPool = TrioFactoryPool.TestCase
TestTrioFactoryPool.settings = _settings
TestAsyncioManualPool = AsyncioManualPool.TestCase
TestAsyncioManualPool.settings = _settings
TestTrioManualPool = TrioManualPool.TestCase
TestTrioManualPool.settings = _settings
