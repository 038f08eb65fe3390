"""KeyedResourcePool: behaviour, both limits, eviction, fairness across keys, admission control,
timeouts, hooks, upkeep, cancellation, closing, statistics and bad input."""

from __future__ import annotations

import ast
import gc
import inspect
import itertools
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import attrs
import pytest

from darwin_metrics import (
    DarwinMetricsError,
    PoolClosedError,
    PoolError,
    PoolOverloadedError,
    PoolPausedError,
    PoolTimeoutError,
)
from darwin_metrics.resource import (
    KeyedPoolDisposals,
    KeyedPoolStatistics,
    KeyedResourcePool,
    KeyStatistics,
)

pytestmark = pytest.mark.anyio

P = TypeVar("P", bound="KeyedResourcePool[Any, Any]")
_POOLS: list[KeyedResourcePool[Any, Any]] = []


def track(pool: P) -> P:
    """Close ``pool`` when the test ends (a pool left with idle resources warns)."""
    _POOLS.append(pool)
    return pool


@pytest.fixture(autouse=True)
async def _close_pools() -> AsyncIterator[None]:
    yield
    while _POOLS:
        await _POOLS.pop().aclose()


class Conn:
    """A resource for a key, with an identity, that knows whether it was closed."""

    def __init__(self, key: str, number: int) -> None:
        self.key = key
        self.number = number
        self.closed = False

    def __repr__(self) -> str:
        return f"Conn({self.key!r}, {self.number})"


class Hooks:
    """A factory and a dispose hook that record what happened, in order."""

    def __init__(
        self, *, checkpoints: int = 0, fail: Callable[[str, int], bool] | None = None
    ) -> None:
        self.made: list[Conn] = []
        self.disposed: list[Conn] = []
        self.events: list[tuple[str, str]] = []
        self.checkpoints = checkpoints
        self.fail = fail
        self.calls = 0

    async def factory(self, key: str) -> Conn:
        self.calls += 1
        call = self.calls
        self.events.append(("create", key))
        for _ in range(self.checkpoints):
            await anyio.lowlevel.checkpoint()
        if self.fail is not None and self.fail(key, call):
            raise ConnectionError(f"cannot connect to {key}")
        conn = Conn(key, len(self.made))
        self.made.append(conn)
        return conn

    def dispose(self, key: str, conn: Conn) -> None:
        assert conn.key == key
        assert not conn.closed, f"{conn} disposed twice"
        conn.closed = True
        self.disposed.append(conn)
        self.events.append(("dispose", key))

    def alive(self) -> list[Conn]:
        return [conn for conn in self.made if not conn.closed]


def make_pool(
    max_per_key: int = 2, max_total: int = 4, hooks: Hooks | None = None, **options: Any
) -> KeyedResourcePool[str, Conn]:
    hooks = hooks or Hooks()
    return track(
        KeyedResourcePool(
            max_per_key, max_total, factory=hooks.factory, dispose=hooks.dispose, **options
        )
    )


def assert_invariants(pool: KeyedResourcePool[Any, Any]) -> KeyedPoolStatistics[Any]:
    """What must hold whenever nothing is in flight (no hook or factory running)."""
    stats = pool.statistics()
    assert stats.size <= stats.max_total, stats
    assert stats.size == stats.idle + stats.leased, stats
    assert stats.created - stats.disposed == stats.size, stats
    assert stats.keys == len(stats.per_key)
    for key, ks in stats.per_key.items():
        assert ks.size <= stats.max_per_key, (key, ks)
        assert ks.size == ks.idle + ks.leased, (key, ks)
        if pool.paused:  # nothing is handed out: waiting tasks and idle resources coexist
            pass
        elif ks.waiting and ks.idle:
            raise AssertionError(f"{key!r} waits with an idle resource: {ks}")
        elif stats.idle:  # an idle resource anywhere could make room for a key with room
            assert not (ks.waiting and ks.size < stats.max_per_key), (key, stats)
        assert ks.size or ks.waiting, f"{key!r} holds nothing and should be gone"
    assert sum(ks.size for ks in stats.per_key.values()) == stats.size
    assert sum(ks.waiting for ks in stats.per_key.values()) == stats.waiting
    if pool._total is not None:
        assert pool._total.borrowed_tokens == stats.size
    return stats


async def hold_until(event: anyio.Event, pool: KeyedResourcePool[str, Conn], key: str) -> None:
    async with pool.lease(key):
        await event.wait()


class TestBasics:
    async def test_a_key_reuses_its_resources_and_keys_do_not_mix(self) -> None:
        hooks = Hooks()
        pool = make_pool(hooks=hooks)
        async with pool.lease("a") as first:
            assert first.key == "a"
        async with pool.lease("a") as again:
            assert again is first
        async with pool.lease("b") as other:
            assert other.key == "b"
            assert other is not first
        assert [conn.key for conn in hooks.made] == ["a", "b"]
        stats = assert_invariants(pool)
        assert (stats.keys, stats.idle, stats.created, stats.acquired) == (2, 2, 2, 3)
        await pool.aclose()
        assert hooks.alive() == []

    async def test_acquire_release_and_try_acquire(self) -> None:
        pool = make_pool(max_per_key=1, max_total=2)
        a = await pool.acquire("a")
        assert await pool.try_acquire("a") is None  # the key's one resource is leased
        b = await pool.try_acquire("b")
        assert b is not None
        assert b.key == "b"
        await pool.release(a)
        assert await pool.try_acquire("a") is a
        await pool.release(a)
        await pool.release(b)
        assert assert_invariants(pool).leased == 0

    async def test_hooks_receive_the_key(self) -> None:
        seen: list[tuple[str, str, Any]] = []

        def check(key: str, conn: Conn) -> bool:
            seen.append(("check", key, conn.key))
            return True

        async def reset(key: str, conn: Conn) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(("reset", key, conn.key))

        def dispose(key: str, conn: Conn) -> None:
            seen.append(("dispose", key, conn.key))

        def factory(key: str) -> Conn:  # a sync factory
            seen.append(("factory", key, None))
            return Conn(key, 0)

        pool = KeyedResourcePool(2, 2, factory=factory, check=check, reset=reset, dispose=dispose)
        async with pool.lease("x"):
            pass
        async with pool.lease("x"):
            pass
        await pool.aclose()
        assert seen == [
            ("factory", "x", None),
            ("reset", "x", "x"),
            ("check", "x", "x"),
            ("reset", "x", "x"),
            ("dispose", "x", "x"),
        ]

    async def test_keys_are_any_hashable_value(self) -> None:
        made: list[object] = []
        pool: KeyedResourcePool[object, list[object]] = KeyedResourcePool(
            1, 8, factory=lambda key: made.append(key) or [key]
        )
        for key in (("10.0.0.1", 5432), 7, None, frozenset({1}), "7"):
            async with pool.lease(key) as resource:
                assert resource == [key]
        assert made == [("10.0.0.1", 5432), 7, None, frozenset({1}), "7"]
        assert pool.statistics().keys == 5

    async def test_giving_back_twice_or_a_stranger_is_an_error(self) -> None:
        pool = make_pool()
        conn = await pool.acquire("a")
        await pool.release(conn)
        with pytest.raises(ValueError, match="released twice"):
            await pool.release(conn)
        with pytest.raises(ValueError, match="not leased from this pool"):
            await pool.release(Conn("a", 99))
        with pytest.raises(ValueError, match="not leased from this pool"):
            await pool.discard(conn)
        assert assert_invariants(pool).idle == 1

    async def test_lease_context_is_single_use(self) -> None:
        pool = make_pool()
        lease = pool.lease("a")
        async with lease:
            pass
        with pytest.raises(RuntimeError, match="only once"):
            async with lease:
                pass  # pragma: no cover

    async def test_release_or_discard_inside_a_lease_block(self) -> None:
        hooks = Hooks()
        pool = make_pool(hooks=hooks)
        async with pool.lease("a") as conn:
            await pool.release(conn)
        async with pool.lease("a") as again:
            assert again is conn
            await pool.discard(again)
        assert conn.closed
        stats = assert_invariants(pool)
        assert (stats.keys, stats.size, stats.disposals.discarded) == (0, 0, 1)

    async def test_a_block_raising_comes_out_unwrapped(self) -> None:
        with pytest.raises(KeyError, match="mine"):
            async with make_pool() as pool, pool.lease("a"):
                raise KeyError("mine")


class TestLimits:
    async def test_max_per_key_bounds_one_key_only(self) -> None:
        pool = make_pool(max_per_key=2, max_total=4)
        a1, a2 = await pool.acquire("a"), await pool.acquire("a")
        with pytest.raises(PoolTimeoutError, match="'a'"):
            await pool.acquire("a", timeout=1)
        b1, b2 = await pool.acquire("b"), await pool.acquire("b")
        stats = assert_invariants(pool)
        assert (stats.size, stats.per_key["a"].size, stats.per_key["b"].size) == (4, 2, 2)
        for conn in (a1, a2, b1, b2):
            await pool.release(conn)

    async def test_max_total_bounds_all_keys(self) -> None:
        pool = make_pool(max_per_key=3, max_total=3)
        held = [await pool.acquire(key) for key in ("a", "b", "c")]
        with pytest.raises(PoolTimeoutError):
            await pool.acquire("d", timeout=1)
        stats = assert_invariants(pool)
        assert stats.keys == 3  # "d" left nothing behind
        assert stats.timeouts == 1
        for conn in held:
            await pool.release(conn)

    async def test_the_longest_idle_resource_of_another_key_makes_room(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=2, max_total=3, hooks=hooks)
        for key in ("a", "b", "c"):  # idle in this order: "a" the longest
            async with pool.lease(key):
                pass
            await anyio.sleep(1)
        hooks.events.clear()
        async with pool.lease("d") as conn:
            assert conn.key == "d"
        # "a" went first, and was disposed before the factory ran: never four at once.
        assert hooks.events == [("dispose", "a"), ("create", "d")]
        stats = assert_invariants(pool)
        assert sorted(stats.per_key) == ["b", "c", "d"]  # "a" had nothing left: gone
        assert stats.disposals.evicted == 1
        assert (stats.size, stats.idle) == (3, 3)

    async def test_a_recently_used_resource_is_evicted_last(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=2, max_total=3, hooks=hooks)
        for key in ("a", "b", "c"):
            async with pool.lease(key):
                pass
        async with pool.lease("a"):  # "a" is now the most recently used
            pass
        async with pool.lease("d"):
            pass
        assert [conn.key for conn in hooks.disposed] == ["b"]

    async def test_a_waiting_key_served_later_also_evicts_the_longest_idle(self) -> None:
        """The eviction order on the serving side, not only for a newcomer: "v" is at its
        limit while one of its resources is being disposed (evicted for "cold"); when that
        dispose returns, "v"'s waiter gets the place of the longest idle resource."""
        hooks = Hooks()

        async def slow_dispose(key: str, conn: Conn) -> None:
            await anyio.sleep(5)
            hooks.dispose(key, conn)

        pool = track(KeyedResourcePool(2, 4, factory=hooks.factory, dispose=slow_dispose))
        v1 = await pool.acquire("v")
        for key in ("v", "x", "y"):  # idle in this order: the second "v" the longest
            async with pool.lease(key):
                pass
            await anyio.sleep(1)
        got: list[Conn] = []

        async def lease(key: str) -> None:
            async with pool.lease(key) as conn:
                got.append(conn)
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(lease, "cold")  # evicts the idle "v" (5 s to dispose)
            await anyio.sleep(1)
            tg.start_soon(lease, "v")  # "v" is at its limit until that dispose returns
            await anyio.sleep(1)
            assert [conn.key for conn in got] == []
            await anyio.sleep(10)  # then "v" evicts in turn (5 s more), and makes its own
            assert [conn.key for conn in got] == ["cold", "v"]
            assert [conn.key for conn in hooks.disposed] == ["v", "x"]  # x, not y
            tg.cancel_scope.cancel()
        await pool.release(v1)

    async def test_a_place_is_free_only_once_dispose_returned(self) -> None:
        events: list[str] = []

        async def dispose(key: str, conn: Conn) -> None:
            events.append(f"dispose {key} starts")
            await anyio.sleep(5)
            events.append(f"dispose {key} ends")

        def factory(key: str) -> Conn:
            events.append(f"create {key}")
            return Conn(key, 0)

        pool = track(KeyedResourcePool(1, 1, factory=factory, dispose=dispose))
        conn = await pool.acquire("a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.acquire, "b")
            await anyio.wait_all_tasks_blocked()
            await pool.discard(conn)
        assert events == ["create a", "dispose a starts", "dispose a ends", "create b"]

    async def test_a_key_never_evicts_its_own_idle_resources(self) -> None:
        pool = make_pool(max_per_key=2, max_total=2)
        a1 = await pool.acquire("a")
        async with pool.lease("a"):
            pass  # one idle "a"
        async with pool.lease("a") as conn:
            assert conn is not a1  # the idle one, reused
        assert pool.statistics().disposed == 0
        await pool.release(a1)

    async def test_a_waiter_for_a_key_at_its_limit_takes_no_room(self) -> None:
        """A key at max_per_key waits for its own resources, even with room elsewhere."""
        pool = make_pool(max_per_key=1, max_total=4)
        a = await pool.acquire("a")
        got: list[Conn] = []

        async def waiter() -> None:
            got.append(await pool.acquire("a"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            async with pool.lease("b"):  # room for other keys all the same
                pass
            assert got == []
            await pool.release(a)
        assert got == [a]
        await pool.release(a)


class TestFairness:
    async def test_strict_fifo_within_a_key(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1)
        holder = await pool.acquire("a")
        order: list[int] = []

        async def waiter(number: int) -> None:
            async with pool.lease("a") as conn:
                assert conn is holder
                order.append(number)
                await anyio.sleep(1)

        async with anyio.create_task_group() as tg:
            for number in range(6):
                tg.start_soon(waiter, number)
                await anyio.wait_all_tasks_blocked()  # arrival order is the queue order
            assert pool.statistics().waiting == 6
            await pool.release(holder)
        assert order == list(range(6))

    async def test_a_newcomer_does_not_jump_the_queue_of_its_key(self) -> None:
        pool = make_pool(max_per_key=1, max_total=2)
        holder = await pool.acquire("a")
        got: list[Conn] = []

        async def waiter() -> None:
            conn = await pool.acquire("a")
            got.append(conn)
            await pool.release(conn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.release(holder)  # handed to the waiter at once
            stats = pool.statistics()
            assert (stats.idle, stats.leased, stats.waiting) == (0, 1, 0)
            assert await pool.try_acquire("a") is None  # a newcomer must not barge in
        assert got == [holder]

    async def test_a_cold_key_is_served_by_the_very_next_release(self) -> None:
        """The documented bound with one cold key: c = 0, so the first release serves it.

        A hot key holds every resource (max_total) and has a long queue of its own; without
        the cold-first rule, its releases would go to its own waiters for ever.
        """
        hooks = Hooks()
        pool = make_pool(max_per_key=4, max_total=4, hooks=hooks)
        held = [await pool.acquire("hot") for _ in range(4)]
        served: list[str] = []

        async def lease(key: str) -> None:
            async with pool.lease(key):
                served.append(key)
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(lease, "hot")
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(lease, "cold")
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().per_key["cold"].waiting == 1
            await pool.release(held.pop())  # one release...
            await anyio.wait_all_tasks_blocked()
            assert served == ["cold"]  # ...serves the cold key, ahead of ten hot waiters
            assert hooks.disposed[-1].key == "hot"  # the released resource made room
            stats = assert_invariants(pool)
            assert stats.per_key["cold"].size == 1
            assert stats.per_key["hot"].evicted == 1
            await pool.release(held.pop())  # the next ones go to the hot key's queue
            await anyio.wait_all_tasks_blocked()
            assert served == ["cold", "hot"]
            tg.cancel_scope.cancel()
        for conn in held:
            await pool.release(conn)

    async def test_cold_keys_are_served_in_the_order_they_started_waiting(self) -> None:
        """The bound with c cold keys ahead: the (c + 1)-th release serves a key."""
        pool = make_pool(max_per_key=3, max_total=3)
        held = [await pool.acquire("hot") for _ in range(3)]
        served: list[str] = []

        async def lease(key: str) -> None:
            async with pool.lease(key):
                served.append(key)
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(lease, "hot")
            for key in ("x", "y", "z"):
                tg.start_soon(lease, key)
                await anyio.wait_all_tasks_blocked()
            for releases in range(1, 4):
                await pool.release(held.pop())
                await anyio.wait_all_tasks_blocked()
                assert served == ["x", "y", "z"][:releases]
            tg.cancel_scope.cancel()

    async def test_a_key_whose_factory_fails_waits_again_at_the_back(self) -> None:
        """A key whose server is down cannot take every release from the other cold keys."""
        hooks = Hooks(fail=lambda key, call: key == "down")
        pool = make_pool(max_per_key=2, max_total=2, hooks=hooks)
        held = [await pool.acquire("hot") for _ in range(2)]
        served: list[str] = []
        failures = 0
        retry = anyio.Event()

        async def down() -> None:
            nonlocal failures
            for attempt in range(2):
                with pytest.raises(ConnectionError):
                    async with pool.lease("down"):
                        pass  # pragma: no cover
                failures += 1
                if attempt == 0:
                    await retry.wait()

        async def up() -> None:
            async with pool.lease("up"):
                served.append("up")
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(down)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(up)
            await anyio.wait_all_tasks_blocked()
            await pool.release(held.pop())  # "down" is first: it is served, and fails...
            await anyio.wait_all_tasks_blocked()
            assert failures == 1
            assert served == ["up"]  # ...and the place it gave back went to "up" at once
            retry.set()  # "down" tries again: at the back of the cold queue
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().per_key["down"].waiting == 1
            await pool.release(held.pop())
            await anyio.wait_all_tasks_blocked()
            assert failures == 2
            tg.cancel_scope.cancel()
        stats = assert_invariants(pool)
        assert stats.factory_errors == 2
        assert "down" not in stats.per_key  # nothing left for it: gone

    async def test_keys_waiting_for_room_get_it_in_turn(self) -> None:
        """Keys that hold resources but could use more share freed room round robin."""
        pool = make_pool(max_per_key=4, max_total=4)
        a = [await pool.acquire("a") for _ in range(2)]
        b = [await pool.acquire("b") for _ in range(2)]
        served: list[str] = []

        async def lease(key: str) -> None:
            async with pool.lease(key):
                served.append(key)
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for key in ("a", "a", "b", "b"):  # arrival order: a, a, b, b
                tg.start_soon(lease, key)
                await anyio.wait_all_tasks_blocked()
            for conn in (*a, *b):  # four places freed, one at a time
                await pool.discard(conn)
                await anyio.wait_all_tasks_blocked()
            assert served == ["a", "b", "a", "b"]
            tg.cancel_scope.cancel()

    async def test_a_returned_resource_goes_to_its_own_key_before_warm_keys(self) -> None:
        pool = make_pool(max_per_key=4, max_total=4)
        a = [await pool.acquire("a") for _ in range(2)]
        b = [await pool.acquire("b") for _ in range(2)]
        served: list[str] = []

        async def lease(key: str) -> None:
            async with pool.lease(key):
                served.append(key)
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for key in ("b", "a"):  # "b" waits for room first
                tg.start_soon(lease, key)
                await anyio.wait_all_tasks_blocked()
            await pool.release(a[0])  # reused by "a": no resource made, none disposed
            await anyio.wait_all_tasks_blocked()
            assert served == ["a"]
            assert pool.statistics().disposed == 0
            tg.cancel_scope.cancel()
        for conn in (a[1], *b):
            await pool.release(conn)


class TestAdmissionControl:
    async def test_max_waiting_refuses_at_once_and_changes_nothing(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1, max_waiting=2)
        holder = await pool.acquire("a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_until, anyio.Event(), pool, "a")
            tg.start_soon(hold_until, anyio.Event(), pool, "b")
            await anyio.wait_all_tasks_blocked()
            before = anyio.current_time()
            with pytest.raises(PoolOverloadedError, match="max_waiting=2") as info:
                await pool.acquire("c", timeout=10)
            assert anyio.current_time() == before  # at once, not after the timeout
            assert "2 tasks are already waiting" in str(info.value)
            with pytest.raises(PoolOverloadedError):
                async with pool.lease("a"):
                    pass  # pragma: no cover
            stats = pool.statistics()
            assert (stats.waiting, stats.rejected, stats.keys) == (2, 2, 2)  # no "c" left
            assert stats.per_key["a"].rejected == 1
            assert await pool.try_acquire("c") is None  # never refused: it does not wait
            tg.cancel_scope.cancel()
        async with anyio.create_task_group() as tg:  # room in the queue again
            tg.start_soon(hold_until, anyio.Event(), pool, "a")
            await anyio.wait_all_tasks_blocked()
            assert pool.statistics().waiting == 1
            tg.cancel_scope.cancel()
        await pool.release(holder)

    async def test_max_waiting_zero_never_waits(self) -> None:
        pool = make_pool(max_per_key=1, max_total=2, max_waiting=0)
        a = await pool.acquire("a")  # served at once: no waiting involved
        async with pool.lease("b"):  # room: fine
            with pytest.raises(PoolOverloadedError):
                await pool.acquire("a")
            with pytest.raises(PoolOverloadedError):
                await pool.acquire("c")  # full, nothing idle to evict
        async with pool.lease("c"):  # "b" idle: evicted to make room, no waiting
            pass
        await pool.release(a)

    async def test_the_refusal_is_a_checkpoint(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1, max_waiting=0)
        holder = await pool.acquire("a")
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire("a")
            raise AssertionError("unreachable")  # pragma: no cover
        assert scope.cancelled_caught
        assert pool.statistics().rejected == 1
        await pool.release(holder)

    async def test_the_error_is_a_pool_error(self) -> None:
        assert issubclass(PoolOverloadedError, PoolError)
        assert issubclass(PoolOverloadedError, DarwinMetricsError)
        assert not issubclass(PoolOverloadedError, TimeoutError)


class TestPause:
    async def test_acquisitions_wait_and_resume_serves_each_key_in_fifo_order(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=1, max_total=3, hooks=hooks)
        async with pool.lease("a"):
            pass  # one idle resource for "a"
        pool.pause()
        assert pool.paused
        served: list[tuple[str, int]] = []

        async def take(key: str, number: int) -> None:
            async with pool.lease(key):
                served.append((key, number))
                await anyio.sleep(1)

        async with anyio.create_task_group() as tg:
            for number in range(3):
                tg.start_soon(take, "a", number)
                await anyio.wait_all_tasks_blocked()
            tg.start_soon(take, "b", 0)
            await anyio.sleep(5)  # paused: nobody is served, however long
            stats = assert_invariants(pool)
            assert (served, stats.waiting, stats.idle, stats.leased) == ([], 4, 1, 0)
            assert await pool.try_acquire("c") is None  # never waits, answers None
            assert hooks.calls == 1
            pool.resume()
            assert not pool.paused
        assert [number for key, number in served if key == "a"] == [0, 1, 2]  # FIFO
        assert ("b", 0) in served
        assert [conn.key for conn in hooks.made] == ["a", "b"]  # "a" reused its resource
        stats = assert_invariants(pool)
        assert (stats.acquired_after_wait, stats.waits_abandoned) == (4, 0)

    async def test_reject_fails_new_acquisitions_at_once_and_waiters_keep_waiting(self) -> None:
        pool = make_pool(max_per_key=1, max_total=2)
        holder = await pool.acquire("a")
        pool.pause()
        result: list[Conn] = []

        async def wait_for_one() -> None:
            result.append(await pool.acquire("a"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_one)
            await anyio.wait_all_tasks_blocked()
            pool.pause(reject=True)  # again: only changes what newcomers get
            before = anyio.current_time()
            with pytest.raises(PoolPausedError, match="paused"):
                await pool.acquire("b", timeout=10)
            with pytest.raises(PoolPausedError):
                async with pool.lease("a"):
                    pass  # pragma: no cover
            with pytest.raises(PoolPausedError):
                await pool.try_acquire("c")
            assert anyio.current_time() == before  # at once
            stats = pool.statistics()
            assert (stats.keys, stats.waiting, stats.size) == (1, 1, 1)  # no "b" or "c" left
            await pool.release(holder)  # goes idle: the waiter is not served while paused
            assert (pool.statistics().idle, result) == (1, [])
            pool.resume()
        assert result == [holder]
        await pool.release(holder)
        assert_invariants(pool)
        async with pool.lease("b"):  # resumed: everything as before
            pass

    async def test_the_refusal_is_a_checkpoint(self) -> None:
        pool = make_pool()
        pool.pause(reject=True)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire("a")
            raise AssertionError("unreachable")  # pragma: no cover
        assert scope.cancelled_caught
        assert pool.statistics().keys == 0

    async def test_leases_out_keep_working_and_come_back_idle(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=2, max_total=2, hooks=hooks)
        a = await pool.acquire("a")
        async with pool.lease("b") as b:
            pool.pause()
            await pool.release(a)  # release()
        stats = assert_invariants(pool)  # and the lease's exit
        assert (stats.idle, stats.leased) == (2, 0)
        pool.resume()
        assert await pool.acquire("a") is a  # the same resources, nothing made anew
        assert await pool.acquire("b") is b
        assert hooks.calls == 2
        await pool.release(a)
        await pool.release(b)

    async def test_a_waiter_cancelled_or_timed_out_while_paused_leaves_no_trace(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1)
        async with pool.lease("a"):
            pass
        pool.pause()
        with anyio.move_on_after(2) as scope:
            await pool.acquire("a")
        assert scope.cancelled_caught
        with pytest.raises(PoolTimeoutError):
            await pool.acquire("b", timeout=1)
        stats = assert_invariants(pool)
        assert (stats.waiting, stats.keys, stats.idle, stats.waits_abandoned) == (0, 1, 1, 2)
        assert (stats.timeouts, stats.acquired) == (1, 1)
        pool.resume()
        async with pool.lease("b"):  # evicts "a": the place was never lost
            pass
        assert assert_invariants(pool).keys == 1

    async def test_close_while_paused_fails_the_waiters(self) -> None:
        pool = make_pool()
        pool.pause()
        errors: list[BaseException] = []

        async def wait() -> None:
            with pytest.raises(PoolClosedError) as info:
                await pool.acquire("a")
            errors.append(info.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await pool.aclose()
        assert len(errors) == 1
        pool.resume()  # nothing to serve, nothing raised
        assert pool.statistics().waiting == 0

    async def test_upkeep_prefills_while_paused(self) -> None:
        hooks = Hooks()
        async with make_pool(max_per_key=2, max_total=4, hooks=hooks, min_idle=2) as pool:
            async with pool.lease("a"):
                pass
            pool.pause()
            await anyio.sleep(1)
            assert pool.statistics().per_key["a"].idle == 2
            pool.resume()


class TestDrain:
    async def test_idle_now_leased_on_return_and_fresh_ones_after(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=2, max_total=3, hooks=hooks)
        a0 = await pool.acquire("a")
        a1 = await pool.acquire("a")
        b0 = await pool.acquire("b")
        await pool.release(a1)
        await pool.release(b0)
        assert await pool.drain() == 2
        assert hooks.disposed == [a1, b0]
        stats = assert_invariants(pool)
        assert (stats.size, stats.leased, stats.disposals.drained, stats.keys) == (1, 1, 2, 1)
        async with pool.lease("a") as fresh:  # a0 keeps its place: 2 for "a", at most
            assert fresh not in (a0, a1)
            assert assert_invariants(pool).size == 2
            with pytest.raises(PoolTimeoutError):  # max_per_key still holds
                await pool.acquire("a", timeout=1)
        await pool.release(a0)  # made before drain(): disposed on the way back
        assert a0.closed
        stats = assert_invariants(pool)
        assert (stats.disposals.drained, stats.disposed, stats.idle) == (3, 3, 1)
        assert await pool.acquire("a") is fresh  # the new generation is pooled as usual
        await pool.release(fresh)
        assert await pool.drain() == 1  # again
        assert assert_invariants(pool).size == 0

    async def test_a_lease_exit_disposes_a_drained_resource(self) -> None:
        hooks = Hooks()
        pool = make_pool(hooks=hooks)  # no hooks but dispose: the lease exit's fast path
        async with pool.lease("a") as old:
            assert await pool.drain() == 0
        assert old.closed
        async with pool.lease("a") as new:
            assert new is not old
        assert (await pool.acquire("a")) is new  # given back to idle: fast paths again
        await pool.release(new)
        stats = assert_invariants(pool)
        assert (stats.disposals.drained, stats.idle) == (1, 1)

    async def test_one_key(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=2, max_total=4, hooks=hooks)
        for key in ("a", "b", "c"):
            async with pool.lease(key):
                pass
        b = await pool.acquire("b")
        await pool.release(b)
        held = await pool.acquire("a")
        async with pool.lease("a") as a_idle:
            pass
        assert await pool.drain("a", "zzz", "a") == 1  # unknown keys are skipped
        assert hooks.disposed == [a_idle]
        stats = assert_invariants(pool)
        assert (sorted(stats.per_key), stats.disposals.drained) == (["a", "b", "c"], 1)
        assert await pool.acquire("b") is b  # the others keep theirs
        await pool.release(b)
        await pool.release(held)
        assert held.closed
        assert "zzz" not in pool.statistics().per_key
        assert await pool.drain("c") == 1
        assert sorted(assert_invariants(pool).per_key) == ["b"]

    async def test_both_limits_hold_while_drained_resources_are_disposed(self) -> None:
        alive: dict[str, int] = {}

        async def factory(key: str) -> Conn:
            alive[key] = alive.get(key, 0) + 1
            assert alive[key] <= 2, alive
            assert sum(alive.values()) <= 3, alive
            await anyio.sleep(0.1)
            return Conn(key, 0)

        async def dispose(key: str, conn: Conn) -> None:
            await anyio.sleep(0.5)
            alive[key] -= 1

        pool = track(KeyedResourcePool(2, 3, factory=factory, dispose=dispose))
        served: list[str] = []

        async def use(key: str) -> None:
            async with pool.lease(key, timeout=30):
                served.append(key)
                await anyio.sleep(0.3)

        async with anyio.create_task_group() as tg:
            for key in "aab":
                tg.start_soon(use, key)
            await anyio.sleep(0.2)  # all three leased: max_total reached
            for key in "abcab":
                tg.start_soon(use, key)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(pool.drain)
            await anyio.sleep(0.05)
            tg.start_soon(pool.drain, "a")
        assert sorted(served) == sorted("aababcab")
        stats = assert_invariants(pool)
        assert stats.disposals.drained >= 3
        assert all(count <= 2 for count in alive.values())
        assert sum(alive.values()) == stats.size

    async def test_a_resource_being_checked_is_replaced(self) -> None:
        gate = anyio.Event()
        hooks = Hooks()

        async def check(key: str, conn: Conn) -> bool:
            await gate.wait()
            return True

        pool = track(
            KeyedResourcePool(1, 2, factory=hooks.factory, dispose=hooks.dispose, check=check)
        )
        old = await pool.acquire("a")
        await pool.release(old)
        got: list[Conn] = []

        async def take() -> None:
            got.append(await pool.acquire("a"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.wait_all_tasks_blocked()  # in check
            assert await pool.drain() == 0  # not idle: it is being checked
            gate.set()
        assert old.closed
        assert got[0] is not old
        stats = assert_invariants(pool)
        assert (stats.disposals.drained, stats.leased) == (1, 1)
        await pool.release(got[0])

    async def test_a_resource_being_reset_is_disposed_after_its_reset(self) -> None:
        hooks = Hooks()
        resets: list[Conn] = []

        async def reset(key: str, conn: Conn) -> None:
            await anyio.sleep(1)
            resets.append(conn)

        pool = track(
            KeyedResourcePool(1, 1, factory=hooks.factory, dispose=hooks.dispose, reset=reset)
        )
        conn = await pool.acquire("a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.release, conn)
            await anyio.sleep(0.5)
            await pool.drain()
        assert resets == [conn]
        assert conn.closed
        assert assert_invariants(pool).disposals.drained == 1

    @pytest.mark.parametrize("key", ["a", "b"])  # the fast path; an eviction
    async def test_an_interrupted_acquisition_puts_nothing_drained_back(self, key: str) -> None:
        """Drain at each step of an acquisition, then cancel it: whatever it had taken out
        of idle (a resource, an evicted victim) is disposed if drained, never put back."""
        for steps in range(8):
            hooks = Hooks(checkpoints=1)
            pool = make_pool(max_per_key=1, max_total=1, hooks=hooks)
            async with pool.lease("a") as first:
                pass
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.acquire, key)
                for _ in range(steps):
                    await anyio.lowlevel.checkpoint()
                await pool.drain()
                tg.cancel_scope.cancel()
            assert_invariants(pool)
            assert not any(pool._is_drained(entry) for entry in pool._lru), steps
            for lease in list(pool._leased.values()):  # the acquisition won the race
                assert lease.entry is not None
                await pool.release(lease.entry.resource)
            stats = assert_invariants(pool)
            assert first.closed, steps
            # Everything made before drain() is gone: drained, or evicted before it.
            assert stats.size == 0, steps
            assert all(conn.closed for conn in hooks.made), steps
            assert stats.disposals.drained + stats.disposals.evicted == stats.created
            assert stats.disposals.drained >= 1 or key == "b"
            async with pool.lease("a"):
                pass

    async def test_upkeep_refills_min_idle(self) -> None:
        hooks = Hooks()
        async with make_pool(max_per_key=3, max_total=4, hooks=hooks, min_idle=2) as pool:
            async with pool.lease("a") as held:
                await anyio.sleep(1)
                first = list(hooks.made)
                assert len(first) == 3  # the leased one and two idle
                assert await pool.drain() == 2
                await anyio.sleep(1)
                stats = pool.statistics()
                assert (stats.per_key["a"].idle, stats.disposals.drained) == (2, 2)
            assert held.closed
            assert all(conn.closed for conn in first)
            await anyio.sleep(1)
            stats = pool.statistics()
            assert (stats.per_key["a"].idle, stats.disposals.drained) == (2, 3)
            # A key left with nothing at all disappears, as always; its next use brings it back.
            assert await pool.drain() == 2
            assert "a" not in pool.statistics().per_key

    async def test_disposal_completes_when_the_caller_is_cancelled(self) -> None:
        hooks = Hooks()

        async def dispose(key: str, conn: Conn) -> None:
            await anyio.sleep(1)
            hooks.dispose(key, conn)

        pool = track(KeyedResourcePool(2, 4, factory=hooks.factory, dispose=dispose))
        conns = [await pool.acquire(key) for key in "aab"]
        for conn in conns:
            await pool.release(conn)
        start = anyio.current_time()
        with anyio.move_on_after(0.5) as scope:
            assert await pool.drain() == 3  # past the deadline: every disposal completed
            assert all(conn.closed for conn in conns)
            await anyio.lowlevel.checkpoint()  # the cancellation comes at the next one
            raise AssertionError("unreachable")  # pragma: no cover
        assert scope.cancelled_caught
        assert anyio.current_time() - start == pytest.approx(3)
        stats = assert_invariants(pool)
        assert (stats.size, stats.disposals.drained) == (0, 3)

    async def test_drain_while_paused(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=1, max_total=1, hooks=hooks)
        async with pool.lease("a") as old:
            pass
        pool.pause()
        got: list[Conn] = []

        async def take() -> None:
            got.append(await pool.acquire("a"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.wait_all_tasks_blocked()
            assert await pool.drain() == 1
            await anyio.wait_all_tasks_blocked()
            assert got == []  # the freed place waits for resume() too
            pool.resume()
        assert old.closed
        assert got[0] is not old
        await pool.release(got[0])


class TestPauseAndDrainMisuse:
    @pytest.mark.parametrize("reject", [1, 0, None, "yes"])
    async def test_reject_must_be_a_bool(self, reject: Any) -> None:
        pool = make_pool()
        with pytest.raises(TypeError, match="reject must be a bool, got"):
            pool.pause(reject=reject)
        assert not pool.paused

    async def test_an_unhashable_key_changes_nothing(self) -> None:
        pool = make_pool()
        async with pool.lease("a"):
            pass
        with pytest.raises(TypeError, match="a key must be hashable, got list"):
            await pool.drain("a", ["b"])
        stats = assert_invariants(pool)
        assert (stats.idle, stats.disposed) == (1, 0)

    async def test_another_event_loop_gets_runtime_error_and_changes_nothing(self) -> None:
        pool = make_pool()
        async with pool.lease("a"):
            pass
        pool.pause()
        errors: list[BaseException] = []

        def elsewhere() -> None:
            async def use() -> None:
                with pytest.raises(RuntimeError) as info:
                    await pool.drain()
                errors.append(info.value)
                with pytest.raises(RuntimeError) as info:
                    pool.resume()
                errors.append(info.value)

            anyio.run(use)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 2
        assert all("belongs to the event loop that first used it" in str(e) for e in errors)
        assert pool.paused
        stats = assert_invariants(pool)
        assert (stats.idle, stats.disposed) == (1, 0)
        pool.resume()


class TestTimeout:
    async def test_the_pool_default_applies_and_each_call_may_override_it(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1, timeout=2)
        holder = await pool.acquire("a")
        start = anyio.current_time()
        with pytest.raises(PoolTimeoutError, match=r"within 2\.0 s"):
            await pool.acquire("a")
        assert anyio.current_time() - start == pytest.approx(2)
        with pytest.raises(PoolTimeoutError, match=r"within 0\.5 s"):
            async with pool.lease("a", timeout=0.5):
                pass  # pragma: no cover
        got: list[Conn] = []

        async def patient() -> None:
            got.append(await pool.acquire("a", timeout=None))  # waits for ever

        async with anyio.create_task_group() as tg:
            tg.start_soon(patient)
            await anyio.sleep(60)
            assert got == []
            await pool.release(holder)
        assert got == [holder]
        assert pool.statistics().timeouts == 2
        await pool.release(holder)

    async def test_a_zero_timeout_still_takes_what_is_free(self) -> None:
        pool = make_pool(timeout=0)
        conn = await pool.acquire("a")  # a sync path: no checkpoint inside the deadline
        await pool.release(conn)
        assert await pool.acquire("a", timeout=0) is conn
        await pool.release(conn)

    async def test_the_timeout_covers_a_slow_factory(self) -> None:
        async def slow(key: str) -> Conn:
            await anyio.sleep(10)
            return Conn(key, 0)  # pragma: no cover

        pool: KeyedResourcePool[str, Conn] = KeyedResourcePool(1, 1, factory=slow)
        with pytest.raises(PoolTimeoutError):
            await pool.acquire("a", timeout=1)
        stats = assert_invariants(pool)
        assert (stats.factory_errors, stats.size, stats.keys) == (1, 0, 0)

    async def test_the_factorys_own_timeout_error_is_not_mistaken_for_ours(self) -> None:
        def factory(key: str) -> Conn:
            raise TimeoutError("the server did not answer")

        pool: KeyedResourcePool[str, Conn] = KeyedResourcePool(1, 1, factory=factory)
        with pytest.raises(TimeoutError, match="did not answer") as info:
            await pool.acquire("a", timeout=5)
        assert not isinstance(info.value, PoolTimeoutError)
        assert pool.statistics().timeouts == 0

    async def test_a_waiter_timing_out_at_handoff_passes_the_resource_on(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1)
        holder = await pool.acquire("a")
        results: list[object] = []

        async def first() -> None:
            try:
                results.append(await pool.acquire("a", timeout=1))
            except PoolTimeoutError:
                results.append("timeout")

        async def second() -> None:
            results.append(await pool.acquire("a", timeout=100))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(1)  # first's deadline arrives...
            await pool.release(holder)  # ...as the resource is handed over
        if results[0] == "timeout":
            assert results == ["timeout", holder]
        else:  # first got it before its deadline was seen; second then waits or times out
            assert results[0] is holder
        stats = pool.statistics()
        assert (stats.size, stats.leased) == (1, 1)  # one owner, never both, never neither


class TestHooks:
    async def test_a_failing_check_disposes_and_takes_the_next_or_a_new_one(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        hooks = Hooks()
        bad: set[int] = set()

        async def check(key: str, conn: Conn) -> bool:
            await anyio.lowlevel.checkpoint()
            if conn.number == 99:
                raise OSError("probe failed")
            return conn.number not in bad

        pool = track(
            KeyedResourcePool(3, 3, factory=hooks.factory, dispose=hooks.dispose, check=check)
        )
        a, b = await pool.acquire("a"), await pool.acquire("a")
        await pool.release(a)
        await pool.release(b)  # idle: a, then b (the most recently returned)
        bad.add(b.number)
        async with pool.lease("a") as conn:
            assert conn is a  # b failed its check and went; a was next
        bad.add(a.number)
        async with pool.lease("a") as conn:
            assert conn.number == 2  # nothing idle passed: a new one
        conn.number = 99
        with caplog.at_level(logging.WARNING, logger="darwin_metrics"):
            async with pool.lease("a") as fresh:
                assert fresh.number == 3
        assert "check('a', Conn('a', 99)) raised; disposing it" in caplog.text
        stats = assert_invariants(pool)
        assert stats.disposals.check_failed == 3
        assert [conn.closed for conn in hooks.made] == [True, True, True, False]

    async def test_a_failing_reset_disposes(self, caplog: pytest.LogCaptureFixture) -> None:
        hooks = Hooks()

        def reset(key: str, conn: Conn) -> None:
            raise ValueError("cannot reset")

        pool = track(
            KeyedResourcePool(1, 1, factory=hooks.factory, dispose=hooks.dispose, reset=reset)
        )
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool.lease("a"):
                pass
        assert "reset('a', Conn('a', 0)) raised; disposing it" in caplog.text
        stats = assert_invariants(pool)
        assert (stats.disposals.reset_failed, stats.keys) == (1, 0)

    async def test_dispose_errors_are_logged_and_free_the_place(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        def dispose(key: str, conn: Conn) -> None:
            raise OSError("already gone")

        pool = track(KeyedResourcePool(1, 1, factory=Hooks().factory, dispose=dispose))
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool.lease("a") as conn:
                await pool.discard(conn)
        assert "dispose('a', Conn('a', 0)) raised; the resource left the pool" in caplog.text
        async with pool.lease("b"):  # the place is free
            pass

    async def test_discard_frees_the_place_for_a_waiter(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=1, max_total=1, hooks=hooks)
        conn = await pool.acquire("a")
        got: list[Conn] = []

        async def waiter() -> None:
            async with pool.lease("b") as other:
                got.append(other)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.discard(conn)
        assert [c.key for c in got] == ["b"]
        assert conn.closed

    async def test_a_factory_failure_reaches_the_caller_and_frees_the_place(self) -> None:
        hooks = Hooks(fail=lambda key, call: call == 1)
        pool = make_pool(max_per_key=1, max_total=1, hooks=hooks)
        with pytest.raises(ConnectionError, match="cannot connect to a"):
            await pool.acquire("a")
        stats = assert_invariants(pool)
        assert (stats.factory_errors, stats.size, stats.keys) == (1, 0, 0)
        async with pool.lease("a"):
            pass

    async def test_a_factory_returning_an_owned_resource_leaks_no_place(self) -> None:
        shared = Conn("x", 0)
        pool: KeyedResourcePool[str, Conn] = KeyedResourcePool(2, 2, factory=lambda key: shared)
        first = await pool.acquire("a")
        with pytest.raises(RuntimeError, match="already owns"):
            await pool.acquire("b")
        await pool.release(first)
        stats = assert_invariants(pool)
        assert (stats.size, stats.keys) == (1, 1)


class TestUpkeep:
    async def test_min_idle_per_key_in_use(self) -> None:
        hooks = Hooks()
        async with make_pool(max_per_key=3, max_total=8, hooks=hooks, min_idle=2) as pool:
            await anyio.sleep(1)
            assert pool.statistics().keys == 0  # no key in use: nothing to prefill
            async with pool.lease("a"):
                await anyio.sleep(1)
                stats = pool.statistics()
                assert (stats.per_key["a"].idle, stats.per_key["a"].leased) == (2, 1)
            async with pool.lease("b"):
                await anyio.sleep(1)
            stats = assert_invariants(pool)
            assert (stats.per_key["a"].idle, stats.per_key["b"].idle) == (3, 3)

    async def test_prefill_never_evicts(self) -> None:
        pool = make_pool(max_per_key=3, max_total=3, min_idle=2)
        a, b = await pool.acquire("a"), await pool.acquire("b")
        async with pool:  # both keys want two idle; one place is left
            await anyio.sleep(5)
            stats = assert_invariants(pool)
            assert (stats.size, stats.idle, stats.disposals.evicted) == (3, 1, 0)
            await pool.release(a)
            await pool.release(b)

    async def test_prefill_stands_back_while_a_task_waits(self) -> None:
        pool = make_pool(max_per_key=2, max_total=4, min_idle=1)
        held = [await pool.acquire("a"), await pool.acquire("a"), await pool.acquire("b")]
        scope = anyio.CancelScope()

        async def waiter() -> None:
            with scope:
                await pool.acquire("a")  # "a" is at its limit: it waits

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            async with pool:
                await anyio.sleep(5)
                b_stats = pool.key_statistics("b")
                assert b_stats is not None
                assert b_stats.idle == 0  # below min_idle, with room, but a task waits
                scope.cancel()
                await anyio.sleep(1)
                b_stats = pool.key_statistics("b")
                assert b_stats is not None
                assert b_stats.idle == 1  # nobody waits: prefill goes on
                for conn in held:
                    await pool.release(conn)

    async def test_idle_reaping_keeps_min_idle_and_drops_unused_keys(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=4, max_total=8, hooks=hooks, min_idle=1, max_idle_time=10)
        async with pool:
            async with pool.lease("a"), pool.lease("a"), pool.lease("a"):
                pass
            async with pool.lease("b"):
                pass
            await anyio.sleep(5)
            async with pool.lease("a"):  # "a" stays in use; "b" is not used again
                pass
            await anyio.sleep(7)
            # 12 s: the "a"s idle since 0 went, down to min_idle (the one used at 5 s);
            # nobody used "b" for 12 s: min_idle no longer holds, the whole key went.
            stats = assert_invariants(pool)
            assert stats.per_key["a"].idle == 1
            assert "b" not in stats.per_key
            await anyio.sleep(10)  # nobody used "a" for 10 s either
            stats = assert_invariants(pool)
            assert (stats.keys, stats.size) == (0, 0)
            assert stats.disposals.idle == len(hooks.made)

    async def test_a_key_with_nothing_left_disappears_at_once(self) -> None:
        pool = make_pool()
        conn = await pool.acquire("a")
        assert pool.statistics().keys == 1
        await pool.discard(conn)
        assert pool.statistics().keys == 0
        assert pool.key_statistics("a") is None
        held = [await pool.acquire(key) for key in ("b", "b", "c", "c")]  # all four places
        with pytest.raises(PoolTimeoutError):
            await pool.acquire("d", timeout=1)  # waited, then gave up
        assert pool.key_statistics("d") is None  # nothing left of "d"
        assert pool.statistics().keys == 2
        for conn in held:
            await pool.release(conn)

    async def test_max_lifetime_retires_idle_returning_and_checked_out_resources(
        self,
    ) -> None:
        hooks = Hooks()
        async with make_pool(hooks=hooks, max_lifetime=10) as pool:
            async with pool.lease("a"):
                await anyio.sleep(11)
            assert pool.statistics().disposals.lifetime == 1  # on its way back
            async with pool.lease("a"):
                pass
            await anyio.sleep(11)  # idle: upkeep retires it
            stats = assert_invariants(pool)
            assert (stats.disposals.lifetime, stats.keys) == (2, 0)
        plain = make_pool(hooks=Hooks(), max_lifetime=10)  # no upkeep running
        async with plain.lease("a") as old:
            pass
        await anyio.sleep(11)
        async with plain.lease("a") as conn:
            assert conn is not old  # too old at checkout: a new one
        assert plain.statistics().disposals.lifetime == 1

    async def test_prefill_retries_a_failing_factory_with_backoff(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        hooks = Hooks(fail=lambda key, call: 2 <= call <= 4)
        pool = make_pool(max_per_key=2, max_total=2, hooks=hooks, min_idle=1)
        conn = await pool.acquire("a")  # call 1; the key wants one idle resource
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            async with pool:
                await anyio.sleep(2)  # calls 2, 3, 4 fail: retried after 0.1, 0.2, 0.4 s
                assert pool.statistics().per_key["a"].idle == 1
                await pool.release(conn)
        assert caplog.text.count("prefill failed") == 3


class TestCancellation:
    async def test_cancelled_before_the_fast_path_checkpoint_takes_nothing(self) -> None:
        pool = make_pool()
        async with pool.lease("a"):
            pass
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.acquire("a")
            raise AssertionError("acquire must be a checkpoint")  # pragma: no cover
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased, stats.acquired) == (1, 0, 1)

    @pytest.mark.parametrize("entry", ["acquire", "lease", "try_acquire", "evicting"])
    async def test_cancellation_at_every_await_point(self, entry: str) -> None:
        """Cancel after k checkpoints, for every k, and check that nothing is lost."""

        async def check(key: str, conn: Conn) -> bool:
            await anyio.lowlevel.checkpoint()
            return True

        async def reset(key: str, conn: Conn) -> None:
            await anyio.lowlevel.checkpoint()

        for delay in range(16):
            hooks = Hooks(checkpoints=3)

            async def dispose(key: str, conn: Conn, hooks: Hooks = hooks) -> None:
                await anyio.lowlevel.checkpoint()
                hooks.dispose(key, conn)

            pool = KeyedResourcePool(
                2, 2, factory=hooks.factory, dispose=dispose, check=check, reset=reset
            )
            if entry == "evicting":  # both places idle, for other keys
                for key in ("x", "y"):
                    async with pool.lease(key):
                        pass
            owned: list[Conn | None] = []

            async def body(
                pool: KeyedResourcePool[str, Conn] = pool, owned: list[Any] = owned
            ) -> None:
                if entry in ("acquire", "evicting"):
                    owned.append(await pool.acquire("a"))
                elif entry == "try_acquire":
                    owned.append(await pool.try_acquire("a"))
                else:
                    async with pool.lease("a") as conn:
                        owned.append(conn)
                        await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                tg.start_soon(body)
                for _ in range(delay):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
            await anyio.sleep(1)  # any dispose still running finishes
            stats = assert_invariants(pool)
            leased = [conn for conn in owned if conn is not None]
            assert stats.leased == (0 if entry == "lease" else len(leased)), (delay, stats)
            assert len(hooks.disposed) == stats.disposed
            if entry != "lease":
                for conn in leased:
                    await pool.release(conn)
            async with pool.lease("a", timeout=1):  # the pool still works
                pass
            await pool.aclose()
            assert hooks.alive() == []

    async def test_a_waiter_cancelled_at_handoff_passes_it_on(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1)
        holder = await pool.acquire("a")
        got: list[Conn] = []
        first = anyio.CancelScope()

        async def waiter(scope: anyio.CancelScope) -> None:
            with scope:
                async with pool.lease("a") as conn:
                    got.append(conn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter, anyio.CancelScope())
            await anyio.wait_all_tasks_blocked()
            await pool.release(holder)  # handed to the first waiter...
            first.cancel()  # ...which is cancelled before it runs
        assert holder in got  # the first had it and gave it back, or the second got it
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased, stats.waiting) == (1, 0, 0)

    async def test_an_evicting_waiter_cancelled_as_it_is_served_frees_its_place(self) -> None:
        """An anyio scope's cancellation reaches a served waiter once it runs (asyncio's own
        task.cancel() can land before: see the native tests): it disposes the resource it
        evicted, then frees the place it was given, for the next waiter."""
        hooks = Hooks(checkpoints=1)  # the factory is a checkpoint: the cancel lands there
        pool = make_pool(max_per_key=1, max_total=1, hooks=hooks)
        holder = await pool.acquire("hot")
        scope = anyio.CancelScope()
        got: list[Conn] = []

        async def cancelled() -> None:
            with scope:
                await pool.acquire("cold")

        async def next_one() -> None:
            async with pool.lease("other") as conn:
                got.append(conn)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(next_one)
            await anyio.wait_all_tasks_blocked()
            await pool.release(holder)  # "cold" is served: it will evict the hot one...
            scope.cancel()  # ...and is cancelled before it runs
        assert holder.closed
        assert [conn.key for conn in got] == ["other"]
        stats = assert_invariants(pool)
        assert (stats.disposals.evicted, stats.factory_errors) == (1, 1)
        assert sorted(stats.per_key) == ["other"]

    async def test_give_back_completes_when_the_task_is_cancelled(self) -> None:
        resets: list[Conn] = []

        async def slow_reset(key: str, conn: Conn) -> None:
            await anyio.sleep(5)
            resets.append(conn)

        pool = KeyedResourcePool(1, 1, factory=Hooks().factory, reset=slow_reset)
        with anyio.move_on_after(1):
            async with pool.lease("a"):
                await anyio.sleep_forever()
        assert len(resets) == 1
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased) == (1, 0)

    async def test_release_and_discard_complete_in_a_cancelled_task(self) -> None:
        hooks = Hooks()

        async def dispose(key: str, conn: Conn) -> None:
            await anyio.sleep(1)
            hooks.dispose(key, conn)

        pool = KeyedResourcePool(2, 2, factory=hooks.factory, dispose=dispose)
        a, b = await pool.acquire("a"), await pool.acquire("b")
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.release(a)
            await pool.discard(b)
        assert b.closed
        stats = assert_invariants(pool)
        assert (stats.idle, stats.leased, stats.size, stats.keys) == (1, 0, 1, 1)
        await pool.aclose()


class TestClose:
    async def test_close_wakes_every_waiter_and_disposes_idle_and_returning(self) -> None:
        hooks = Hooks()
        pool = make_pool(max_per_key=1, max_total=2, hooks=hooks)
        a = await pool.acquire("a")
        async with pool.lease("b"):
            pass  # "b" idle
        errors: list[BaseException] = []

        async def waiter() -> None:
            try:
                await pool.acquire("a")
            except PoolClosedError as error:
                errors.append(error)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await pool.aclose()
        assert len(errors) == 3
        assert [conn.key for conn in hooks.disposed] == ["b"]
        await pool.release(a)  # leased at the close: disposed on its way back
        assert a.closed
        stats = pool.statistics()
        assert (stats.size, stats.keys, stats.waiting) == (0, 0, 0)
        assert stats.disposals.closed == 2
        await pool.aclose()  # idempotent
        with pytest.raises(PoolClosedError):
            await pool.acquire("a")
        with pytest.raises(PoolClosedError):
            await pool.try_acquire("a")

    async def test_async_with_closes_on_exit(self) -> None:
        hooks = Hooks()
        async with make_pool(hooks=hooks) as pool:
            async with pool.lease("a"):
                pass
            with pytest.raises(RuntimeError, match="already running"):
                await pool.__aenter__()
        assert pool.closed
        assert hooks.alive() == []
        with pytest.raises(PoolClosedError):
            async with pool:
                pass  # pragma: no cover

    async def test_close_while_the_factory_runs_disposes_the_new_resource(self) -> None:
        hooks = Hooks(checkpoints=5)
        pool = make_pool(hooks=hooks)

        async def acquire() -> None:
            with pytest.raises(PoolClosedError):
                await pool.acquire("a")

        async with anyio.create_task_group() as tg:
            tg.start_soon(acquire)
            for _ in range(3):  # into the factory's checkpoints
                await anyio.lowlevel.checkpoint()
            assert pool.statistics().size == 1  # a place, its resource being made
            await pool.aclose()
        assert len(hooks.made) == 1
        assert hooks.made[0].closed
        assert pool.statistics().size == 0


class TestEventLoop:
    async def test_another_event_loop_gets_runtime_error_and_changes_nothing(
        self, anyio_backend: Any
    ) -> None:
        pool = make_pool()
        conn = await pool.acquire("a")
        errors: list[BaseException] = []

        def elsewhere() -> None:
            async def use() -> None:
                calls = (
                    lambda: pool.acquire("a"),
                    lambda: pool.try_acquire("b"),
                    lambda: pool.release(conn),
                    lambda: pool.discard(conn),
                    pool.aclose,
                )
                for call in calls:
                    with pytest.raises(RuntimeError) as info:
                        await call()
                    errors.append(info.value)

            anyio.run(use)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(errors) == 5
        assert all("belongs to the event loop that first used it" in str(e) for e in errors)
        stats = assert_invariants(pool)
        assert (stats.leased, stats.keys, pool.closed) == (1, 1, False)
        await pool.release(conn)


class TestStatisticsAndRepr:
    async def test_statistics_overall_and_per_key(self) -> None:
        pool = make_pool(max_per_key=2, max_total=3, min_idle=0, max_waiting=5)
        a = await pool.acquire("a")
        async with pool.lease("b"):
            pass
        stats = pool.statistics()
        assert isinstance(stats, KeyedPoolStatistics)
        assert (stats.max_per_key, stats.max_total, stats.keys) == (2, 3, 2)
        assert (stats.size, stats.idle, stats.leased, stats.waiting) == (2, 1, 1, 0)
        assert (stats.created, stats.acquired, stats.acquired_at_once) == (2, 2, 2)
        assert stats.use_time.count == 1
        assert stats.create_time.count == 2
        assert isinstance(stats.disposals, KeyedPoolDisposals)
        assert stats.per_key["a"] == pool.key_statistics("a")
        a_stats = stats.per_key["a"]
        assert isinstance(a_stats, KeyStatistics)
        assert (a_stats.size, a_stats.leased, a_stats.idle, a_stats.created) == (1, 1, 0, 1)
        assert pool.key_statistics("nobody") is None
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            stats.size = 9  # type: ignore[misc]
        await pool.release(a)

    async def test_wait_statistics(self) -> None:
        pool = make_pool(max_per_key=1, max_total=1)
        holder = await pool.acquire("a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold_until, anyio.Event(), pool, "a")
            await anyio.sleep(2)
            await pool.release(holder)
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
        stats = pool.statistics()
        assert stats.acquired_after_wait == 1
        assert stats.total_wait == pytest.approx(2)
        assert stats.longest_wait == pytest.approx(2)
        assert stats.wait_time.count == 1
        assert stats.per_key["a"].total_wait == pytest.approx(2)

    async def test_repr_shows_the_state_at_a_glance(self) -> None:
        pool = make_pool(max_per_key=2, max_total=4)
        conn = await pool.acquire("a")
        async with pool.lease("b"):
            pass
        text = repr(pool)
        assert text.startswith("<darwin_metrics.KeyedResourcePool at 0x")
        assert text.endswith(", 2 keys, 1/4 leased, 1 idle, 0 waiting, max 2 per key>"), text
        await pool.release(conn)
        await pool.aclose()
        assert repr(pool).endswith("0 keys, 0/4 leased, 0 idle, 0 waiting, max 2 per key, closed>")

    @pytest.mark.parametrize("cls", [KeyedPoolStatistics, KeyStatistics, KeyedPoolDisposals])
    async def test_every_field_has_a_docstring(self, cls: type) -> None:
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        documented = {
            node.target.id
            for node, after in itertools.pairwise(body)
            if isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        }
        assert documented == {field.name for field in attrs.fields(cls)}

    async def test_an_unclosed_pool_with_idle_resources_warns(self) -> None:
        hooks = Hooks()
        pools = [KeyedResourcePool(1, 1, factory=hooks.factory, dispose=hooks.dispose)]
        async with pools[0].lease("a"):
            pass
        with pytest.warns(ResourceWarning, match="never closed"):
            _drop_all(pools)


def _drop_all(objects: list[Any]) -> None:
    objects.clear()
    gc.collect()


def _pool_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"max_per_key": 2, "max_total": 4, "factory": lambda key: key}
    args.update(changes)
    return args


BAD_CONSTRUCTORS = [
    ("max_per_key zero", {"max_per_key": 0}, ValueError, "max_per_key must be at least 1"),
    ("max_per_key type", {"max_per_key": "2"}, TypeError, "max_per_key must be an int"),
    ("max_per_key bool", {"max_per_key": True}, TypeError, "max_per_key must be an int"),
    ("max_total zero", {"max_total": 0}, ValueError, "max_total must be at least 1"),
    ("max_total float", {"max_total": 4.0}, TypeError, "max_total must be an int"),
    ("per key above total", {"max_per_key": 5}, ValueError, "at most max_total"),
    ("no factory", {"factory": None}, TypeError, "factory must be a callable"),
    ("factory type", {"factory": 3}, TypeError, "factory must be callable"),
    ("check type", {"check": "yes"}, TypeError, "check must be callable"),
    ("reset type", {"reset": 1}, TypeError, "reset must be callable"),
    ("dispose type", {"dispose": []}, TypeError, "dispose must be callable"),
    ("min_idle negative", {"min_idle": -1}, ValueError, "min_idle must be at least 0"),
    ("min_idle above", {"min_idle": 3}, ValueError, "at most max_per_key"),
    ("min_idle type", {"min_idle": 1.5}, TypeError, "min_idle must be an int"),
    ("max_idle_time", {"max_idle_time": -1}, ValueError, "max_idle_time must be finite"),
    ("max_lifetime zero", {"max_lifetime": 0}, ValueError, "max_lifetime must be positive"),
    ("max_lifetime inf", {"max_lifetime": math.inf}, ValueError, "max_lifetime"),
    ("hook_timeout nan", {"hook_timeout": math.nan}, ValueError, "hook_timeout"),
    ("timeout negative", {"timeout": -1}, ValueError, "timeout must be finite"),
    ("timeout type", {"timeout": "5"}, TypeError, "timeout must be a number"),
    ("max_waiting negative", {"max_waiting": -1}, ValueError, "max_waiting must be at least"),
    ("max_waiting float", {"max_waiting": 2.5}, TypeError, "max_waiting must be an int"),
    ("max_waiting bool", {"max_waiting": False}, TypeError, "max_waiting must be an int"),
]


class TestBadInput:
    @pytest.mark.parametrize(
        ("changes", "error", "message"),
        [case[1:] for case in BAD_CONSTRUCTORS],
        ids=[case[0] for case in BAD_CONSTRUCTORS],
    )
    async def test_constructor(self, changes: dict[str, Any], error: type, message: str) -> None:
        with pytest.raises(error, match=message):
            KeyedResourcePool(**_pool_args(**changes))

    @pytest.mark.parametrize(
        ("call", "error", "message"),
        [
            (lambda p: p.acquire(["a"]), TypeError, "key must be hashable, got list"),
            (lambda p: p.try_acquire({"a": 1}), TypeError, "key must be hashable, got dict"),
            (lambda p: p.acquire(("a", [1])), TypeError, "key must be hashable, got tuple"),
            (lambda p: p.acquire("a", timeout=-1), ValueError, "timeout"),
            (lambda p: p.acquire("a", timeout="1"), TypeError, "timeout"),
            (lambda p: p.release(Conn("a", 5)), ValueError, "not leased"),
            (lambda p: p.discard(Conn("a", 5)), ValueError, "not leased"),
        ],
        ids=[
            "acquire list",
            "try_acquire dict",
            "acquire tuple of list",
            "acquire timeout",
            "acquire timeout type",
            "release stranger",
            "discard stranger",
        ],
    )
    async def test_calls(self, call: Any, error: type, message: str) -> None:
        pool = make_pool()
        held = await pool.acquire("a")
        with pytest.raises(error, match=message):
            await call(pool)
        with pytest.raises(TypeError, match="key must be hashable"):
            pool.lease([1])  # at once, not on entry
        with pytest.raises(ValueError, match="timeout"):
            pool.lease("a", timeout=math.nan)
        with pytest.raises(TypeError, match="key must be hashable"):
            pool.key_statistics([1])  # type: ignore[arg-type]
        stats = assert_invariants(pool)
        assert (stats.keys, stats.size, stats.leased) == (1, 1, 1)  # nothing changed
        await pool.release(held)
        async with pool.lease("a") as conn:
            assert conn is held
