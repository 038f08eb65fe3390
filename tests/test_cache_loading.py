"""Loading through the cache: refresh ahead, stale-if-error, negative caching, per-result ttl,
bulk single flight, removal during a load, misuse, and the statistics that show it all.

Async tests run on asyncio and trio in virtual time; their caches read the event loop's clock
(``clock=anyio.current_time``), so that expiry and load times follow ``anyio.sleep`` exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import looptime
import pytest

from darwin_metrics._cache import Cache, EvictionCause

pytestmark = pytest.mark.anyio


def loop_cache(ttl: float = 10, **options: Any) -> Cache[Any, Any]:
    return Cache(ttl, clock=anyio.current_time, **options)


class Loader:
    """An async loader that counts its calls, takes ``delay`` seconds and can be made to fail."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self.calls = 0
        self.fail_with: BaseException | None = None
        self.results: list[Any] = []

    async def __call__(self) -> int:
        self.calls += 1
        await anyio.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        if self.results:
            return int(self.results.pop(0))
        return self.calls


class TestRefreshAhead:
    async def test_readers_never_wait_and_one_refresh_runs(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=3)
        async with cache.refreshing():
            assert await cache.get_or_load("k", load, refresh_after=5) == 1  # stored at t=3
            await anyio.sleep(6)  # t=9: 6 s old, due for a refresh
            answers = []

            async def read() -> None:
                started = anyio.current_time()
                answers.append(await cache.get_or_load("k", load, refresh_after=5))
                assert anyio.current_time() == started  # the reader did not wait at all

            async with anyio.create_task_group() as group:
                for _ in range(20):
                    group.start_soon(read)
            assert answers == [1] * 20
            await anyio.wait_all_tasks_blocked()
            assert load.calls == 2  # twenty due reads, one refresh
            await anyio.sleep(1)
            assert await cache.get_or_load("k", load, refresh_after=5) == 1  # still refreshing
            assert load.calls == 2
            await anyio.sleep(2.5)  # t=12.5: the refresh ended at t=12
            assert cache.get("k") == 2
            assert await cache.get_or_load("k", load, refresh_after=5) == 2
            assert load.calls == 2  # fresh again: no refresh
        stats = cache.statistics()
        assert (stats.refreshes, stats.refresh_failures, stats.loads) == (1, 0, 2)
        assert stats.load_duration.count == 2
        assert stats.load_duration.sum == pytest.approx(6.0)
        assert cache._async_flights == {}

    async def test_a_due_hit_is_not_a_checkpoint(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=0)
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=1)
            await anyio.sleep(2)
            with anyio.CancelScope() as scope:
                scope.cancel()
                assert await cache.get_or_load("k", load, refresh_after=1) == 1
            assert not scope.cancelled_caught
            await anyio.wait_all_tasks_blocked()
        assert load.calls == 2

    async def test_a_failed_refresh_keeps_the_value(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        cache = loop_cache(10)
        load = Loader(delay=1)
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=2)
            await anyio.sleep(3)
            load.fail_with = ConnectionError("backend down")
            with caplog.at_level(logging.WARNING, logger="darwin_metrics"):
                assert await cache.get_or_load("k", load, refresh_after=2) == 1
                await anyio.sleep(2)
            assert cache.get("k") == 1
            # The next due read tries again.
            load.fail_with = None
            assert await cache.get_or_load("k", load, refresh_after=2) == 1
            await anyio.sleep(2)
            assert cache.get("k") == 3
        assert "refreshing 'k' failed" in caplog.text
        assert "backend down" in caplog.text
        stats = cache.statistics()
        assert (stats.refreshes, stats.refresh_failures) == (2, 1)
        assert (stats.loads, stats.load_failures) == (2, 1)

    async def test_a_miss_during_a_refresh_waits_for_it(self) -> None:
        cache = loop_cache(4)
        load = Loader(delay=3)
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=1)  # stored at t=3, expires t=7
            await anyio.sleep(3)  # t=6: due
            assert await cache.get_or_load("k", load, refresh_after=1) == 1  # refresh until t=9
            await anyio.sleep(1.5)  # t=7.5: expired, refresh in flight
            assert cache.get("k") is None
            assert await cache.get_or_load("k", load, refresh_after=1) == 2  # joined it
        stats = cache.statistics()
        assert load.calls == 2
        assert stats.joined == 1

    async def test_without_a_block_it_warns_once(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=0)
        await cache.get_or_load("k", load, refresh_after=1)
        await anyio.sleep(2)
        with pytest.warns(RuntimeWarning, match="refreshing"):
            assert await cache.get_or_load("k", load, refresh_after=1) == 1
        assert await cache.get_or_load("k", load, refresh_after=1) == 1  # no second warning
        assert load.calls == 1
        assert cache.statistics().refreshes == 0

    async def test_leaving_the_block_cancels_running_refreshes(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=5)
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=1)
            await anyio.sleep(2)
            await cache.get_or_load("k", load, refresh_after=1)
            await anyio.wait_all_tasks_blocked()
            assert len(cache._async_flights) == 1
            started = anyio.current_time()
        assert anyio.current_time() == started  # cancelled, not waited for
        assert cache._async_flights == {}
        assert cache._refreshers == {}
        assert cache.get("k") == 1
        stats = cache.statistics()
        assert (stats.refreshes, stats.loads, stats.load_failures) == (1, 1, 0)

    async def test_a_task_group_of_yours_owns_the_refreshes(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=5)
        async with anyio.create_task_group() as group:
            async with cache.refreshing(group) as entered:
                assert entered is cache
                await cache.get_or_load("k", load, refresh_after=1)  # t=5
                await anyio.sleep(2)
                await cache.get_or_load("k", load, refresh_after=1)  # refresh until t=12
            assert cache._refreshers == {}
        assert anyio.current_time() == pytest.approx(12)  # the group waited for it
        assert cache.get("k") == 2

    async def test_one_block_per_event_loop(self) -> None:
        cache = loop_cache(10)
        async with cache.refreshing():
            with pytest.raises(RuntimeError, match="another"):
                async with cache.refreshing():
                    pass  # pragma: no cover
        block = cache.refreshing()
        async with block:
            with pytest.raises(RuntimeError, match="already active"):
                await block.__aenter__()
        async with cache.refreshing():  # fine again after the first one ended
            pass

    async def test_the_blocks_own_exception_comes_out_as_itself(self) -> None:
        cache = loop_cache(10)
        with pytest.raises(KeyError, match="mine"):
            async with cache.refreshing():
                raise KeyError("mine")
        assert cache._refreshers == {}

    async def test_bad_arguments(self) -> None:
        cache = loop_cache(10)
        with pytest.raises(TypeError, match="task group"):
            cache.refreshing(object())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="shorter than the ttl"):
            await cache.get_or_load("k", Loader(), refresh_after=10)
        with pytest.raises(ValueError, match="shorter than the ttl"):
            await cache.get_or_load("k", Loader(), ttl=3, refresh_after=5)
        with pytest.raises(ValueError, match="refresh_after"):
            await cache.get_or_load("k", Loader(), refresh_after=-1)
        with pytest.raises(TypeError, match="refresh_after"):
            await cache.get_or_load("k", Loader(), refresh_after="5")  # type: ignore[arg-type]
        assert "k" not in cache

    async def test_a_value_set_meanwhile_wins(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=3)
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=1)
            await anyio.sleep(2)
            await cache.get_or_load("k", load, refresh_after=1)  # refresh until t=8
            await anyio.sleep(1)
            cache.set("k", 100)
            await anyio.sleep(3)
            assert cache.get("k") == 100  # not overwritten by the refresh
        assert load.calls == 2

    async def test_a_removal_meanwhile_wins(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=3)
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=1)
            await anyio.sleep(2)
            await cache.get_or_load("k", load, refresh_after=1)
            await anyio.sleep(1)
            assert cache.remove("k")
            await anyio.sleep(3)
            assert "k" not in cache
        assert load.calls == 2

    async def test_cache_if_refusing_a_refresh_keeps_the_value(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=1)
        load.results = [5, 0]
        async with cache.refreshing():
            await cache.get_or_load("k", load, refresh_after=2, cache_if=bool)
            await anyio.sleep(3)
            await cache.get_or_load("k", load, refresh_after=2, cache_if=bool)
            await anyio.sleep(2)
        assert cache.get("k") == 5
        assert load.calls == 2

    async def test_get_or_load_many_refreshes_due_keys_in_one_call(self) -> None:
        cache = loop_cache(10)
        calls: list[list[int]] = []

        async def load_many(keys: list[int]) -> dict[int, int]:
            calls.append(keys)
            await anyio.sleep(1)
            return {key: key * 10 + len(calls) for key in keys if key != 3 or len(calls) == 1}

        async with cache.refreshing():
            assert await cache.get_or_load_many([1, 2, 3], load_many, refresh_after=3) == {
                1: 11,
                2: 21,
                3: 31,
            }
            await anyio.sleep(1)
            await cache.get_or_load_many([4], load_many)  # fresh, stored at t=3
            await anyio.sleep(1.5)  # t=4.5: 1-3 are 3.5 s old, 4 is 1.5 s old
            found = await cache.get_or_load_many([1, 2, 3, 4], load_many, refresh_after=3)
            assert found == {1: 11, 2: 21, 3: 31, 4: 42}
            await anyio.sleep(2)
        assert calls == [[1, 2, 3], [4], [1, 2, 3]]
        # 3 was left out of the refresh's answer: it keeps its value.
        assert cache.get_many([1, 2, 3, 4]) == {1: 13, 2: 23, 3: 31, 4: 42}
        assert cache.statistics().refreshes == 1


class TestStaleIfError:
    async def test_an_expired_value_is_served_within_the_window(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=0)
        assert await cache.get_or_load("k", load, stale_if_error=5) == 1  # expires t=10
        await anyio.sleep(12)
        assert cache.get("k") is None  # expired: invisible
        assert "k" not in cache
        assert cache.keys() == []
        assert len(cache) == 1  # but kept for a failing load
        load.fail_with = TimeoutError("slow backend")
        assert await cache.get_or_load("k", load, stale_if_error=5) == 1
        await anyio.sleep(4)  # t=16: expired 6 s ago
        with pytest.raises(TimeoutError, match="slow backend"):
            await cache.get_or_load("k", load, stale_if_error=5)
        stats = cache.statistics()
        assert stats.stale_served == 1
        assert stats.load_failures == 2

    async def test_waiters_get_the_stale_value_too(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=1)
        await cache.get_or_load("k", load, stale_if_error=30)
        await anyio.sleep(15)
        load.fail_with = OSError("down")
        answers = []

        async def read() -> None:
            answers.append(await cache.get_or_load("k", load, stale_if_error=30))

        async with anyio.create_task_group() as group:
            for _ in range(5):
                group.start_soon(read)
        assert answers == [1] * 5
        assert load.calls == 2
        stats = cache.statistics()
        assert (stats.stale_served, stats.joined) == (5, 4)

    async def test_kept_until_the_window_passes(self) -> None:
        reports: list[tuple[str, int, EvictionCause]] = []
        cache = loop_cache(10, on_evict=lambda *report: reports.append(report))
        await cache.get_or_load("k", Loader(delay=0), stale_if_error=5)
        await anyio.sleep(11)
        assert cache.clear_expired() == 0
        assert cache.get("k") is None
        assert len(cache) == 1
        await anyio.sleep(5)
        assert cache.clear_expired() == 1
        assert len(cache) == 0
        assert reports == [("k", 1, EvictionCause.EXPIRED)]

    async def test_a_success_stores_the_new_value(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=0)
        await cache.get_or_load("k", load, stale_if_error=5)
        await anyio.sleep(12)
        assert await cache.get_or_load("k", load, stale_if_error=5) == 2
        assert cache.get("k") == 2
        assert cache.statistics().stale_served == 0

    async def test_an_entry_stored_without_a_window_is_not_kept(self) -> None:
        cache = loop_cache(10)
        cache.set("k", 1)
        await anyio.sleep(12)
        load = Loader(delay=0)
        load.fail_with = OSError("down")
        with pytest.raises(OSError, match="down"):
            await cache.get_or_load("k", load, stale_if_error=5)
        assert len(cache) == 0

    async def test_a_plain_entry_becomes_one_with_a_window(self) -> None:
        cache = loop_cache(10, maxsize=4)
        cache.set("k", 0)
        await anyio.sleep(11)
        load = Loader(delay=0)
        assert await cache.get_or_load("k", load, stale_if_error=5) == 1
        await anyio.sleep(11)
        load.fail_with = OSError("down")
        assert await cache.get_or_load("k", load, stale_if_error=5) == 1
        assert len(cache._queue or []) >= len(cache)

    def test_get_or_set(self) -> None:
        now = [0.0]
        cache: Cache[str, int] = Cache(10, clock=lambda: now[0])
        assert cache.get_or_set("k", lambda: 1, stale_if_error=5) == 1
        now[0] = 12

        def fail() -> int:
            raise KeyError("gone")

        assert cache.get_or_set("k", fail, stale_if_error=5) == 1
        now[0] = 16
        with pytest.raises(KeyError, match="gone"):
            cache.get_or_set("k", fail, stale_if_error=5)
        assert cache.statistics().stale_served == 1

    async def test_get_or_load_many_needs_every_key(self) -> None:
        cache = loop_cache(10)
        failing = False

        async def load_many(keys: list[str]) -> dict[str, str]:
            if failing:
                raise OSError("down")
            return {key: key.upper() for key in keys}

        await cache.get_or_load_many(["a", "b"], load_many, stale_if_error=5)
        await anyio.sleep(12)
        failing = True
        assert await cache.get_or_load_many(["a", "b"], load_many, stale_if_error=5) == {
            "a": "A",
            "b": "B",
        }
        assert cache.statistics().stale_served == 2
        with pytest.raises(OSError, match="down"):
            await cache.get_or_load_many(["a", "c"], load_many, stale_if_error=5)
        assert cache.statistics().stale_served == 2


class TestNegativeCaching:
    async def test_cache_if_false_is_returned_not_stored(self) -> None:
        cache = loop_cache(10)
        calls = 0

        async def find() -> str | None:
            nonlocal calls
            calls += 1
            return None

        assert await cache.get_or_load("k", find, cache_if=lambda v: v is not None) is None
        assert await cache.get_or_load("k", find, cache_if=lambda v: v is not None) is None
        assert calls == 2
        assert "k" not in cache
        stats = cache.statistics()
        assert (stats.loads, stats.sets) == (2, 0)

    async def test_a_ttl_function_of_the_value(self) -> None:
        cache = loop_cache(60)
        results = iter([None, "found"])

        async def find() -> str | None:
            return next(results)

        def ttl(value: str | None) -> float:
            return 1 if value is None else 30

        assert await cache.get_or_load("k", find, ttl=ttl) is None
        assert "k" in cache
        await anyio.sleep(1)
        assert "k" not in cache
        assert await cache.get_or_load("k", find, ttl=ttl) == "found"
        await anyio.sleep(29.5)
        assert cache.get("k") == "found"

    @pytest.mark.parametrize(
        ("returned", "error"),
        [(0, ValueError), (-1, ValueError), (math.nan, ValueError), ("5", TypeError)],
    )
    async def test_a_bad_ttl_from_the_function_is_an_error(
        self, returned: object, error: type[Exception]
    ) -> None:
        cache = loop_cache(60)
        with pytest.raises(error, match="ttl function returned"):
            await cache.get_or_load("k", Loader(delay=0), ttl=lambda value: returned)
        assert "k" not in cache
        assert cache._async_flights == {}

    async def test_callback_errors_reach_every_caller(self) -> None:
        cache = loop_cache(60)
        errors: list[BaseException] = []

        def refuse(value: object) -> bool:
            raise LookupError("bad predicate")

        async def read() -> None:
            with pytest.raises(LookupError) as info:
                await cache.get_or_load("k", Loader(delay=1), cache_if=refuse)
            errors.append(info.value)

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(read)
        assert len(errors) == 3
        assert all(error is errors[0] for error in errors)
        assert "k" not in cache

    def test_set_many_with_a_ttl_function(self) -> None:
        now = [0.0]
        cache: Cache[str, str] = Cache(60, clock=lambda: now[0])
        cache.set_many({"a": "", "b": "full"}, ttl=lambda value: 5 if value else 1)
        now[0] = 1
        assert cache.get_many(["a", "b"]) == {"b": "full"}
        with pytest.raises(ValueError, match="ttl function"):
            cache.set_many({"c": "x"}, ttl=lambda value: 0)
        assert "c" not in cache

    async def test_bad_options(self) -> None:
        cache = loop_cache(60)
        with pytest.raises(TypeError, match="cache_if"):
            await cache.get_or_load("k", Loader(), cache_if=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ttl"):
            await cache.get_or_load("k", Loader(), ttl="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="stale_if_error"):
            await cache.get_or_load("k", Loader(), stale_if_error=0)
        with pytest.raises(TypeError, match="stale_if_error"):
            cache.get_or_set("k", int, stale_if_error=True)
        assert len(cache) == 0


class TestLoadMany:
    async def test_loads_only_the_missing_keys_in_one_call(self) -> None:
        cache = loop_cache(60)
        cache.set_many({1: "one", 2: "two"})
        calls: list[list[int]] = []

        async def load_many(keys: list[int]) -> dict[int, str]:
            calls.append(keys)
            await anyio.sleep(1)
            return {key: str(key) for key in keys}

        found = await cache.get_or_load_many([3, 1, 4, 2, 3], load_many)
        assert list(found.items()) == [(3, "3"), (1, "one"), (4, "4"), (2, "two")]
        assert calls == [[3, 4]]
        stats = cache.statistics()
        assert (stats.hits, stats.misses, stats.loads) == (2, 2, 1)
        assert cache.get(4) == "4"

    async def test_all_hits_is_not_a_checkpoint(self) -> None:
        cache = loop_cache(60)
        cache.set_many({1: "one"})

        async def load_many(keys: list[int]) -> dict[int, str]:
            raise AssertionError("not called")  # pragma: no cover

        with anyio.CancelScope() as scope:
            scope.cancel()
            assert await cache.get_or_load_many([1], load_many) == {1: "one"}
            await cache.get_or_load_many([2], load_many)
            pytest.fail("a miss did not check for cancellation")  # pragma: no cover
        assert scope.cancelled_caught

    async def test_overlapping_callers_share_loads_per_key(self) -> None:
        cache = loop_cache(60)
        calls: list[list[int]] = []

        async def load_many(keys: list[int]) -> dict[int, int]:
            calls.append(sorted(keys))
            await anyio.sleep(2)
            return {key: key * 10 for key in keys}

        async def single() -> int:
            await anyio.sleep(2)
            return 50

        results: dict[str, Any] = {}

        async def first() -> None:
            results["first"] = await cache.get_or_load_many([1, 2, 3], load_many)

        async def second() -> None:
            await anyio.sleep(0.5)
            results["second"] = await cache.get_or_load_many([2, 3, 4, 5], load_many)

        async def third() -> None:
            await anyio.sleep(1)
            results["third"] = await cache.get_or_load(5, single)

        async def fourth() -> None:
            await anyio.sleep(0.25)
            results["fourth"] = await cache.get_or_load(1, single)

        async with anyio.create_task_group() as group:
            for task in (first, second, third, fourth):
                group.start_soon(task)
        assert calls == [[1, 2, 3], [4, 5]]
        assert results["first"] == {1: 10, 2: 20, 3: 30}
        assert results["second"] == {2: 20, 3: 30, 4: 40, 5: 50}
        assert results["third"] == 50  # waited for the second caller's load of 5
        assert results["fourth"] == 10  # waited for the first caller's load of 1
        stats = cache.statistics()
        assert (stats.loads, stats.joined) == (2, 4)  # 2, 3 for the second; 5; 1
        assert cache._async_flights == {}

    async def test_a_bulk_caller_waits_for_a_single_load(self) -> None:
        cache = loop_cache(60)
        calls: list[list[str]] = []

        async def load_many(keys: list[str]) -> dict[str, str]:
            calls.append(keys)
            return {key: key * 2 for key in keys}

        async def slow() -> str:
            await anyio.sleep(3)
            return "single"

        async with anyio.create_task_group() as group:
            group.start_soon(cache.get_or_load, "a", slow)
            await anyio.wait_all_tasks_blocked()
            assert await cache.get_or_load_many(["a", "b"], load_many) == {
                "a": "single",
                "b": "bb",
            }
        assert calls == [["b"]]

    async def test_absent_keys_are_left_out_and_not_cached(self) -> None:
        cache = loop_cache(60)

        async def load_many(keys: list[str]) -> dict[str, str]:
            await anyio.sleep(1)
            return {key: key for key in keys if key != "ghost"} | {"extra": "ignored"}

        async def single() -> str:
            return "from get_or_load"

        results: list[Any] = []

        async def waiter() -> None:
            await anyio.sleep(0.5)
            results.append(await cache.get_or_load("ghost", single))

        async with anyio.create_task_group() as group:
            group.start_soon(waiter)
            assert await cache.get_or_load_many(["a", "ghost"], load_many) == {"a": "a"}
        # The single caller waited, found no value for its key, and loaded it itself.
        assert results == ["from get_or_load"]
        assert "extra" not in cache

    async def test_an_error_reaches_every_caller_and_nothing_is_cached(self) -> None:
        cache = loop_cache(60)
        errors: list[BaseException] = []

        async def load_many(keys: list[str]) -> dict[str, str]:
            await anyio.sleep(1)
            raise ConnectionError("refused")

        async def single() -> str:
            raise AssertionError("not called")  # pragma: no cover

        async def waiter() -> None:
            with pytest.raises(ConnectionError) as info:
                await cache.get_or_load("b", single)
            errors.append(info.value)

        async def bulk() -> None:
            with pytest.raises(ConnectionError) as info:
                await cache.get_or_load_many(["a", "b"], load_many)
            errors.append(info.value)

        async with anyio.create_task_group() as group:
            group.start_soon(bulk)
            await anyio.wait_all_tasks_blocked()
            group.start_soon(waiter)
            group.start_soon(waiter)
        assert len(errors) == 3
        assert all(error is errors[0] for error in errors)
        assert len(cache) == 0
        assert cache.statistics().load_failures == 1

    async def test_a_cancelled_bulk_load_hands_over(self) -> None:
        cache = loop_cache(60)
        calls: list[list[str]] = []

        async def load_many(keys: list[str]) -> dict[str, str]:
            calls.append(keys)
            await anyio.sleep(5 if len(calls) == 1 else 1)
            return {key: f"{key}{len(calls)}" for key in keys}

        results: list[Any] = []

        async def waiter() -> None:
            results.append(await cache.get_or_load_many(["b", "c"], load_many))

        async with anyio.create_task_group() as group:
            with anyio.move_on_after(2):
                group.start_soon(waiter)
                await cache.get_or_load_many(["a", "b"], load_many)
        assert calls == [["a", "b"], ["c"], ["b"]]
        assert results == [{"b": "b3", "c": "c2"}]
        assert "a" not in cache
        assert cache._async_flights == {}

    async def test_bad_loaders(self) -> None:
        cache = loop_cache(60)

        def not_async(keys: list[str]) -> dict[str, str]:
            return {}

        async def a_list(keys: list[str]) -> list[str]:
            return keys

        with pytest.raises(TypeError, match="load_many must be callable"):
            await cache.get_or_load_many(["a"], 3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not awaitable"):
            await cache.get_or_load_many(["a"], not_async)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="mapping"):
            await cache.get_or_load_many(["a"], a_list)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="unhashable"):
            await cache.get_or_load_many([["a"]], a_list)  # type: ignore[list-item]
        assert cache._async_flights == {}
        assert len(cache) == 0

    async def test_recursion_is_an_error(self) -> None:
        cache = loop_cache(60)

        async def load_many(keys: list[str]) -> dict[str, str]:
            return await cache.get_or_load_many(keys, load_many)

        with pytest.raises(RuntimeError, match="wait for itself"):
            await cache.get_or_load_many(["a"], load_many)
        assert cache._async_flights == {}


class TestRemovedWhileLoading:
    @pytest.mark.parametrize("how", ["remove", "pop", "del", "clear"])
    async def test_the_value_is_returned_not_stored(self, how: str) -> None:
        cache = loop_cache(60)

        def delete() -> None:
            with pytest.raises(KeyError):  # nothing live to delete, but the load is stopped
                del cache["k"]

        removers: dict[str, Callable[[], object]] = {
            "remove": lambda: cache.remove("k"),
            "pop": lambda: cache.pop("k", None),
            "del": delete,
            "clear": cache.clear,
        }
        results = []

        async def read() -> None:
            results.append(await cache.get_or_load("k", Loader(delay=2)))

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.sleep(1)
            removers[how]()
        assert results == [1]
        assert "k" not in cache
        assert cache.statistics().loads == 1

    def test_get_or_set_in_threads(self) -> None:
        cache: Cache[str, int] = Cache(60)
        making = threading.Event()
        release = threading.Event()

        def make() -> int:
            making.set()
            assert release.wait(10)
            return 1

        results = []
        thread = threading.Thread(target=lambda: results.append(cache.get_or_set("k", make)))
        thread.start()
        assert making.wait(10)
        assert not cache.remove("k")
        release.set()
        thread.join(10)
        assert results == [1]
        assert "k" not in cache

    async def test_a_load_after_the_removal_is_stored(self) -> None:
        cache = loop_cache(60)
        cache.set("k", 0)
        cache.remove("k")
        assert await cache.get_or_load("k", Loader(delay=1)) == 1
        assert cache.get("k") == 1


class TestSingleFlightDetails:
    async def test_the_load_starts_before_other_callers_run(self) -> None:
        # A stampede: the first caller's load must not wait for a loop iteration in which
        # every other caller runs first (its miss is still a checkpoint: it yields after).
        cache = loop_cache(60)
        started: list[int] = []
        seen_at_load: list[int] = []

        async def load() -> int:
            seen_at_load.append(len(started))
            await anyio.sleep(1)
            return 1

        async def caller(number: int) -> None:
            started.append(number)
            assert await cache.get_or_load("k", load) == 1

        async with anyio.create_task_group() as group:
            for number in range(50):
                group.start_soon(caller, number)
        assert seen_at_load == [1]
        assert cache.statistics().joined == 49

    async def test_a_task_the_loader_starts_waits_for_it(self) -> None:
        cache = loop_cache(60)
        results: list[int] = []

        async def child() -> None:
            results.append(await cache.get_or_load("k", load))

        async def load() -> int:
            outer.start_soon(child)  # not awaited by the load: the child waits for it
            await anyio.sleep(1)
            return 7

        async with anyio.create_task_group() as outer:
            assert await cache.get_or_load("k", load) == 7
        assert results == [7]
        assert cache.statistics().joined == 1

    async def test_a_cancelled_miss_before_loading_leaves_nothing(self) -> None:
        cache = loop_cache(60)
        load = Loader(delay=1)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await cache.get_or_load("k", load)
        assert scope.cancelled_caught
        assert load.calls == 0
        assert cache._async_flights == {}
        assert await cache.get_or_load("k", load) == 1


class TestMisuse:
    """Issue 11: a sync callable where an async one belongs, and the reverse, fail loudly."""

    def test_get_or_set_with_an_async_function(self) -> None:
        cache: Cache[str, int] = Cache(60)

        async def fetch() -> int:
            return 1  # pragma: no cover

        with pytest.raises(TypeError, match="get_or_load"):
            cache.get_or_set("k", fetch)  # type: ignore[arg-type]
        gc.collect()  # a coroutine never awaited would warn here (warnings are errors)
        assert "k" not in cache
        assert cache._thread_flights == {}
        stats = cache.statistics()
        assert (stats.loads, stats.load_failures, stats.sets) == (0, 0, 0)
        assert cache.get_or_set("k", lambda: 2) == 2

    def test_get_or_set_waiters_get_the_same_error(self) -> None:
        cache: Cache[str, Any] = Cache(60)
        inside = threading.Event()
        release = threading.Event()
        errors: list[BaseException] = []

        async def fetch() -> int:
            return 1  # pragma: no cover

        def make() -> Any:
            inside.set()
            assert release.wait(10)
            return fetch()

        def call() -> None:
            try:
                cache.get_or_set("k", make)
            except TypeError as exc:
                errors.append(exc)

        first = threading.Thread(target=call)
        first.start()
        assert inside.wait(10)
        second = threading.Thread(target=call)
        second.start()
        while not cache._thread_flights["k"].waiters:
            release.wait(0.001)
        release.set()
        first.join(10)
        second.join(10)
        gc.collect()
        assert len(errors) == 2
        assert errors[0] is errors[1]
        assert "get_or_load" in str(errors[0])

    async def test_get_or_load_with_a_sync_function(self) -> None:
        cache: Cache[str, int] = Cache(60)
        with pytest.raises(TypeError, match="get_or_set"):
            await cache.get_or_load("k", lambda: 5)  # type: ignore[arg-type, return-value]
        assert "k" not in cache
        assert cache._async_flights == {}
        stats = cache.statistics()
        assert (stats.loads, stats.load_failures) == (0, 0)

    async def test_get_or_load_waiters_get_the_same_error(self) -> None:
        cache: Cache[str, int] = Cache(60)
        errors: list[BaseException] = []

        def not_async() -> int:
            return 5

        async def read() -> None:
            with pytest.raises(TypeError) as info:
                await cache.get_or_load("k", not_async)  # type: ignore[arg-type]
            errors.append(info.value)

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(read)
        assert len(errors) == 3
        assert "get_or_set" in str(errors[0])


class TestLoadStatistics:
    async def test_single_flight_is_visible(self) -> None:
        cache = loop_cache(60)
        load_time = 0.25

        async def load(key: int) -> int:
            await anyio.sleep(load_time)
            return key

        async with anyio.create_task_group() as group:
            for n in range(30):
                key = n % 3
                group.start_soon(cache.get_or_load, key, lambda key=key: load(key))
        stats = cache.statistics()
        assert (stats.hits, stats.misses) == (0, 30)
        assert (stats.loads, stats.load_failures, stats.joined) == (3, 0, 27)
        assert stats.load_duration.count == 3
        assert stats.load_time == pytest.approx(3 * load_time)
        # 0.25 s falls in the bucket whose upper bound is 0.25.
        assert dict(stats.load_duration.cumulative())[0.25] == 3
        assert dict(stats.load_duration.cumulative())[0.1] == 0

    async def test_failures_and_their_times(self) -> None:
        cache = loop_cache(60)
        load = Loader(delay=2)
        load.fail_with = ValueError("no")
        for _ in range(2):
            with pytest.raises(ValueError, match="no"):
                await cache.get_or_load("k", load)
        load.fail_with = None
        await cache.get_or_load("k", load)
        stats = cache.statistics()
        assert (stats.loads, stats.load_failures) == (1, 2)
        assert stats.load_duration.count == 3
        assert stats.load_time == pytest.approx(6)

    async def test_a_cancelled_load_counts_in_neither(self) -> None:
        cache = loop_cache(60)
        with anyio.move_on_after(1):
            await cache.get_or_load("k", Loader(delay=5))
        stats = cache.statistics()
        assert (stats.loads, stats.load_failures, stats.load_duration.count) == (0, 0, 0)

    def test_get_or_set_threads(self) -> None:
        now = [0.0]
        cache: Cache[str, int] = Cache(60, clock=lambda: now[0])

        def make() -> int:
            now[0] += 0.003
            return 1

        cache.get_or_set("k", make)
        cache.get_or_set("k", make)
        stats = cache.statistics()
        assert (stats.hits, stats.misses, stats.loads) == (1, 1, 1)
        assert stats.load_time == pytest.approx(0.003)


async def _unused(_: Mapping[str, str], __: Callable[[], Awaitable[None]]) -> None:
    """Keeps the imported names used by type annotations of the tests above."""
    await anyio.lowlevel.checkpoint()  # pragma: no cover


class TestNativeAsyncioCancellation:
    """``task.cancel()`` and ``asyncio.wait_for`` (as ``asyncio.timeout``) are not anyio cancel
    scopes: every await point of a load must survive them without a stranded flight."""

    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, Any]]:
        """asyncio only (in virtual time, as conftest.py makes it)."""
        return "asyncio", {"loop_factory": lambda: looptime.new_event_loop(start=0)}

    async def test_a_loader_cancelled_by_its_task_hands_over(self) -> None:
        cache = loop_cache(60)
        load = Loader(delay=5)
        loader = asyncio.ensure_future(cache.get_or_load("k", load))
        await asyncio.sleep(1)
        waiters = [asyncio.ensure_future(cache.get_or_load("k", load)) for _ in range(3)]
        await asyncio.sleep(1)
        loader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loader
        assert await asyncio.gather(*waiters) == [2, 2, 2]
        assert cache._async_flights == {}
        assert cache.get("k") == 2

    async def test_wait_for_at_every_point(self) -> None:
        for timeout in (0, 0.5, 0.999, 1.0, 1.001, 1.5):
            cache = loop_cache(60)
            load = Loader(delay=1)
            for _ in range(3):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(cache.get_or_load("k", load), timeout)
                assert cache._async_flights == {}
            assert await cache.get_or_load("k", load) >= 1
            assert cache._async_flights == {}

    async def test_a_waiter_timed_out_by_asyncio_leaves_the_load_alone(self) -> None:
        cache = loop_cache(60)
        load = Loader(delay=5)
        loader = asyncio.ensure_future(cache.get_or_load("k", load))
        await asyncio.sleep(0)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.get_or_load("k", load), 1)
        assert await loader == 1
        assert load.calls == 1

    async def test_a_bulk_load_cancelled_by_its_task(self) -> None:
        cache = loop_cache(60)

        async def load_many(keys: list[str]) -> dict[str, str]:
            await anyio.sleep(5)
            return {key: key for key in keys}  # pragma: no cover

        task = asyncio.ensure_future(cache.get_or_load_many(["a", "b"], load_many))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cache._async_flights == {}
        assert len(cache) == 0

    async def test_a_refreshing_block_cancelled_by_its_task(self) -> None:
        cache = loop_cache(10)
        load = Loader(delay=5)
        await cache.get_or_load("k", Loader(delay=0))

        async def run() -> None:
            async with cache.refreshing():
                await anyio.sleep(2)
                await cache.get_or_load("k", load, refresh_after=1)
                await anyio.sleep_forever()

        task = asyncio.ensure_future(run())
        await asyncio.sleep(3)
        assert cache._async_flights  # the refresh is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cache._async_flights == {}
        assert cache._refreshers == {}
        assert cache.get("k") == 1
