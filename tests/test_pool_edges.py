"""ResourcePool at the edges: hostile hooks, FIFO after a failed check, the handoff as the
statistics show it, a second event loop, and the block's own exception on trio."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from darwin_metrics.resource import ResourcePool

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


class Conn:
    def __init__(self, number: int) -> None:
        self.number = number
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn({self.number})"


def counter_factory() -> Callable[[], Conn]:
    made: list[Conn] = []

    def factory() -> Conn:
        conn = Conn(len(made))
        made.append(conn)
        return conn

    return factory


def assert_books(pool: ResourcePool[Any]) -> None:
    stats = pool.statistics()
    assert stats.size == stats.idle + stats.leased <= stats.max_size, stats
    assert stats.created - stats.disposed == stats.size, stats
    assert not (stats.waiting and stats.idle), stats
    if pool._limiter is not None:
        assert pool._limiter.borrowed_tokens == stats.leased, stats


def hostile(kind: str, is_async: bool) -> Callable[[Conn], Any]:
    """A hook that raises ``kind`` (or hangs), sync or async, for ``Conn(0)`` only."""

    def fail(conn: Conn) -> None:
        if conn.number != 0:
            return
        if kind == "KeyboardInterrupt":
            raise KeyboardInterrupt
        if kind == "SystemExit":
            raise SystemExit(3)
        if kind == "CancelledError":
            raise asyncio.CancelledError  # the hook's own, as psycopg_pool's rollback test
        raise ValueError("broken")

    if not is_async:

        def sync_hook(conn: Conn) -> None:
            fail(conn)

        return sync_hook

    async def async_hook(conn: Conn) -> None:
        await anyio.lowlevel.checkpoint()
        if kind == "hang" and conn.number == 0:
            await anyio.sleep_forever()
        fail(conn)

    return async_hook


INTERRUPTS = ("KeyboardInterrupt", "SystemExit")


class TestHostileHooks:
    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    @pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit", "CancelledError"])
    async def test_reset_raising_a_base_exception_frees_the_slot(
        self, kind: str, is_async: bool, caplog: pytest.LogCaptureFixture
    ) -> None:
        disposed: list[Conn] = []
        pool = ResourcePool(
            1, factory=counter_factory(), reset=hostile(kind, is_async), dispose=disposed.append
        )
        if kind in INTERRUPTS:
            with pytest.raises(BaseException) as info:  # noqa: PT011 - checked just below
                async with pool.lease():
                    pass
            assert type(info.value).__name__ == kind
        else:
            with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
                async with pool.lease():
                    pass  # the hook's own CancelledError is its failure, not ours
            assert "reset(Conn(0)) raised; disposing it" in caplog.text
        assert [conn.number for conn in disposed] == [0]
        assert_books(pool)
        assert pool.statistics().size == 0
        async with pool.lease(timeout=1) as conn:  # the max_size=1 pool is alive
            assert conn.number == 1
        await pool.aclose()

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    @pytest.mark.parametrize("kind", ["KeyboardInterrupt", "SystemExit", "CancelledError"])
    async def test_dispose_raising_a_base_exception_disposes_the_rest(
        self, kind: str, is_async: bool
    ) -> None:
        calls: list[int] = []
        hook = hostile(kind, is_async)

        async def dispose(conn: Conn) -> None:
            calls.append(conn.number)
            result = hook(conn)
            if result is not None:
                await result

        pool = ResourcePool(3, factory=counter_factory(), dispose=dispose)
        conns = [await pool.acquire() for _ in range(3)]
        for conn in conns:
            await pool.release(conn)
        if kind in INTERRUPTS:
            with pytest.raises(BaseException) as info:  # noqa: PT011 - checked just below
                await pool.aclose()
            assert type(info.value).__name__ == kind
        else:
            await pool.aclose()
        assert sorted(calls) == [0, 1, 2]  # every one was disposed
        assert_books(pool)
        assert pool.statistics().size == 0

    async def test_hung_reset_is_abandoned_after_hook_timeout(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        disposed: list[Conn] = []
        pool = ResourcePool(
            1,
            factory=counter_factory(),
            reset=hostile("hang", True),
            dispose=disposed.append,
            hook_timeout=2,
        )
        start = anyio.current_time()
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool.lease():
                pass
        assert anyio.current_time() - start == pytest.approx(2)
        assert "reset(Conn(0)) did not finish within hook_timeout=2.0 s" in caplog.text
        assert [conn.number for conn in disposed] == [0]
        assert_books(pool)
        async with pool.lease() as conn:
            assert conn.number == 1
        await pool.aclose()

    async def test_hung_dispose_does_not_hang_the_exit(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The caller's own move_on_after around 'async with pool:' is no longer needed."""
        pool = ResourcePool(2, factory=counter_factory(), dispose=hostile("hang", True))
        start = anyio.current_time()
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool, pool.lease(), pool.lease():
                pass
        # The hung dispose is abandoned after the default hook_timeout of 10 s.
        assert anyio.current_time() - start == pytest.approx(10)
        assert caplog.text.count("did not finish within hook_timeout=10.0 s") == 1
        stats = pool.statistics()
        assert (stats.size, stats.disposed) == (0, 2)

    async def test_hook_timeout_is_validated(self) -> None:
        with pytest.raises(TypeError, match="hook_timeout must be a number of seconds"):
            ResourcePool(1, hook_timeout="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="hook_timeout must be finite"):
            ResourcePool(1, hook_timeout=-1)
        ResourcePool(1, hook_timeout=None)  # waits for ever, on purpose


class TestFairnessAfterAFailedCheckout:
    """Item 6: the longest waiter keeps its place when what it was handed fails."""

    @pytest.mark.parametrize("why", ["check", "max_lifetime"])
    async def test_waiter_keeps_its_place(self, why: str) -> None:
        bad: set[str] = set()
        pool: ResourcePool[str] = ResourcePool(
            3,
            check=(lambda r: r not in bad) if why == "check" else None,
            max_lifetime=5 if why == "max_lifetime" else None,
        )
        await pool.release("holder")
        await pool.release("anchor")  # stays leased, so the pool never becomes empty
        holder, anchor = await pool.acquire(), await pool.acquire()
        assert holder is not None
        if why == "check":
            bad.add(holder)
        order: list[tuple[str, str]] = []

        async def wait(name: str) -> None:
            async with pool.lease() as resource:
                order.append((name, resource))
                await anyio.sleep(100)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, "first")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(wait, "second")
            await anyio.wait_all_tasks_blocked()
            if why == "max_lifetime":
                await anyio.sleep(10)  # the holder is now past its lifetime
            await pool.release(holder)  # handed to the first waiter, and it fails the check
            await anyio.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.size, stats.waiting, stats.disposed) == (1, 2, 1), stats
            assert order == []
            await pool.release("good")
            await anyio.wait_all_tasks_blocked()
            assert order == [("first", "good")]  # the first waiter kept its place
            tg.cancel_scope.cancel()
        assert anchor is not None
        await pool.release(anchor)
        assert_books(pool)


class TestHandoffIsVisibleAtOnce:
    """Item 9: the released resource is bound to the longest waiter's lease at the release."""

    @pytest.mark.parametrize("with_factory", [False, True])
    async def test_statistics_right_after_a_release(self, with_factory: bool) -> None:
        pool: ResourcePool[Any] = ResourcePool(1, factory=object if with_factory else None)
        if not with_factory:
            await pool.release(object())
        holder = await pool.acquire()
        got: list[object] = []

        async def wait() -> None:
            async with pool.lease() as resource:
                got.append(resource)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().waiting == 1
            await pool.release(holder)
            stats = pool.statistics()  # before the waiter has run
            assert (stats.idle, stats.leased, stats.waiting) == (0, 1, 0), stats
            assert "1/1 leased, 0 idle, 0 waiting" in repr(pool)
        assert got == [holder]
        assert_books(pool)

    async def test_no_task_waits_while_a_resource_is_idle_in_a_storm(self) -> None:
        pool: ResourcePool[int] = ResourcePool(3)
        for number in range(3):
            await pool.release(number)
        seen: list[tuple[int, int]] = []

        async def worker(seed: int) -> None:
            for round_ in range(20):
                async with pool.lease():
                    stats = pool.statistics()
                    seen.append((stats.idle, stats.waiting))
                    await anyio.sleep((seed * 7 + round_) % 3 * 0.001)

        async with anyio.create_task_group() as tg:
            for seed in range(12):
                tg.start_soon(worker, seed)
        assert [s for s in seen if s[0] and s[1]] == []
        assert any(waiting for _, waiting in seen)
        assert_books(pool)


class TestExceptionIdentity:
    """Item 5: the block's own exception comes out as itself, on both backends."""

    async def test_block_error_while_an_outer_scope_cancels(self) -> None:
        error = KeyError("mine")
        caught: list[BaseException] = []
        with anyio.CancelScope() as outer:
            try:
                async with ResourcePool(2, factory=object):
                    outer.cancel()
                    raise error
            except KeyError as exc:
                caught.append(exc)
        assert caught == [error]
        assert caught[0] is error

    async def test_block_raising_an_exception_group(self) -> None:
        group = ExceptionGroup("mine", [ValueError(1), KeyError(2)])
        with pytest.raises(ExceptionGroup) as info:
            async with ResourcePool(2, factory=object):
                raise group
        assert info.value is group

    async def test_block_cancelled_by_an_outer_scope(self) -> None:
        with anyio.CancelScope() as outer:
            async with ResourcePool(2, factory=object):
                outer.cancel()
                await anyio.sleep_forever()
        assert outer.cancelled_caught


def run_in(backend: str, func: Callable[[], Any]) -> Any:
    return anyio.run(func, backend=backend)


class TestSecondEventLoop:
    """Item 7: a pool belongs to one event loop; another one gets a clear RuntimeError."""

    pytestmark = pytest.mark.real_time

    @pytest.mark.parametrize("second", ["asyncio", "trio"])
    @pytest.mark.parametrize("first", ["asyncio", "trio"])
    def test_a_second_run(self, first: str, second: str) -> None:
        pool: ResourcePool[Conn] = ResourcePool(2, factory=counter_factory())

        async def use() -> None:
            async with pool.lease():
                pass

        run_in(first, use)
        before = pool.statistics()

        async def misuse() -> list[str]:
            errors: list[str] = []
            for operation in (
                use,
                pool.acquire,
                pool.try_acquire,
                lambda: pool.release(Conn(99)),
                lambda: pool.resize(3),
                lambda: pool.retain(bool),
                pool.aclose,
            ):
                with pytest.raises(RuntimeError, match="belongs to the event loop") as info:
                    await operation()
                errors.append(str(info.value))
            return errors

        errors = run_in(second, misuse)
        assert "create one per event loop" in errors[0]
        assert pool.statistics() == before  # nothing changed
        assert not pool.closed

    def test_two_threads_at_once(self) -> None:
        pool: ResourcePool[Conn] = ResourcePool(1, factory=counter_factory())
        holding = threading.Event()
        done = threading.Event()
        outcome: list[BaseException] = []

        async def hold() -> None:
            async with pool.lease():
                holding.set()
                await anyio.to_thread.run_sync(done.wait)

        async def intrude() -> None:
            try:
                await pool.acquire(timeout=1)
            except RuntimeError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run_in, args=("asyncio", hold))
        thread.start()
        try:
            assert holding.wait(10)
            run_in("trio", intrude)
            run_in("asyncio", intrude)
        finally:
            done.set()
            thread.join(10)
        assert len(outcome) == 2
        assert all("belongs to the event loop" in str(exc) for exc in outcome)
        stats = pool.statistics()
        assert (stats.idle, stats.leased, stats.waiting) == (1, 0, 0)
