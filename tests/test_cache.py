"""Tests of the TTL cache: expiry, eviction, on_evict, statistics, threads, single flight."""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import attrs
import pytest

import darwin_metrics._cache._core as cache_module
from darwin_metrics._cache import Cache, CacheStatistics, EvictionCause

THREAD_TIMEOUT = 10.0
STRESS = bool(os.environ.get("DARWIN_METRICS_STRESS"))


class FakeClock:
    """A clock that moves only when told to; safe to read from any thread."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    """An ``on_evict`` callback that records every call; safe to call from any thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, EvictionCause]] = []
        self._lock = threading.Lock()

    def __call__(self, key: Any, value: Any, cause: EvictionCause) -> None:
        with self._lock:
            self.calls.append((key, value, cause))

    def causes(self) -> Counter[EvictionCause]:
        return Counter(cause for _, _, cause in self.calls)


class Value:
    """A value that can be weakly referenced, to see when the cache lets go of it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Value({self.name!r})"


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for another thread to reach a state, polling (real time, bounded)."""
    deadline = time.monotonic() + THREAD_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.001)


def run_threads(target: Callable[[int], None], count: int) -> None:
    """Run ``target(i)`` in ``count`` threads; re-raise the first error any of them raised."""
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_TIMEOUT)
        assert not thread.is_alive(), "a thread is stuck"
    if errors:
        raise errors[0]


class TestBadInput:
    @pytest.mark.parametrize("ttl", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, 10**400])
    def test_ttl_out_of_range(self, ttl: float) -> None:
        with pytest.raises(ValueError, match="ttl"):
            Cache(ttl)

    @pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
    def test_timedelta_ttl_out_of_range(self, ttl: timedelta) -> None:
        with pytest.raises(ValueError, match="ttl"):
            Cache(ttl)

    @pytest.mark.parametrize("ttl", [True, False, "60", None, [60]])
    def test_ttl_not_a_number(self, ttl: Any) -> None:
        with pytest.raises(TypeError, match="ttl"):
            Cache(ttl)

    def test_per_entry_ttl(self) -> None:
        cache: Cache[str, int] = Cache(60)
        with pytest.raises(ValueError, match="ttl"):
            cache.set("k", 1, ttl=0)
        with pytest.raises(ValueError, match="ttl"):
            cache.set("k", 1, ttl=math.nan)
        with pytest.raises(TypeError, match="ttl"):
            cache.set("k", 1, ttl=True)
        assert "k" not in cache
        assert cache.statistics().sets == 0

    @pytest.mark.parametrize("maxsize", [0, -1])
    def test_maxsize_below_one(self, maxsize: int) -> None:
        with pytest.raises(ValueError, match="maxsize"):
            Cache(60, maxsize=maxsize)

    @pytest.mark.parametrize("maxsize", [1.5, 10.0, "10", True])
    def test_maxsize_not_an_int(self, maxsize: Any) -> None:
        with pytest.raises(TypeError, match="maxsize"):
            Cache(60, maxsize=maxsize)

    def test_callables(self) -> None:
        with pytest.raises(TypeError, match="clock"):
            Cache(60, clock=1.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="on_evict"):
            Cache(60, on_evict="print")  # type: ignore[arg-type]
        cache: Cache[str, int] = Cache(60)
        with pytest.raises(TypeError, match="make"):
            cache.get_or_set("k", 1)  # type: ignore[arg-type]

    def test_unhashable_key(self) -> None:
        cache: Cache[Any, int] = Cache(60, maxsize=10)
        operations: list[Callable[[], object]] = [
            lambda: cache.get([1]),
            lambda: cache.set([1], 1),
            lambda: cache.remove([1]),
            lambda: [1] in cache,
            lambda: cache.get_or_set([1], lambda: 1),
        ]
        for operation in operations:
            with pytest.raises(TypeError, match="unhashable"):
                operation()
        assert len(cache) == 0
        assert cache.statistics().sets == 0

    @pytest.mark.anyio
    async def test_get_or_load_arguments(self) -> None:
        cache: Cache[str, int] = Cache(60)
        calls = 0

        async def load() -> int:
            nonlocal calls
            calls += 1
            return 1

        with pytest.raises(TypeError, match="load"):
            await cache.get_or_load("k", 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="ttl"):
            await cache.get_or_load("k", load, ttl=-1)
        assert calls == 0


class TestBasics:
    def test_get_set(self) -> None:
        cache: Cache[str, int] = Cache(60)
        assert cache.get("k") is None
        assert cache.get("k", 7) == 7
        cache.set("k", 1)
        assert cache.get("k") == 1
        assert cache.get("k", 7) == 1
        cache.set("k", 2)
        assert cache.get("k") == 2
        assert len(cache) == 1

    def test_values_are_not_copied(self) -> None:
        cache: Cache[str, list[int]] = Cache(60)
        value = [1]
        cache.set("k", value)
        assert cache.get("k") is value

    def test_none_is_a_value(self) -> None:
        cache: Cache[str, None] = Cache(60)
        cache.set("k", None)
        assert "k" in cache
        assert cache.get("k", "default") is None

    def test_remove(self) -> None:
        cache: Cache[str, int] = Cache(60)
        cache.set("k", 1)
        assert cache.remove("k") is True
        assert cache.remove("k") is False
        assert cache.remove("never") is False
        assert "k" not in cache
        assert len(cache) == 0

    def test_clear_and_len(self) -> None:
        cache: Cache[int, int] = Cache(60, maxsize=10)
        for key in range(5):
            cache.set(key, key)
        assert len(cache) == 5
        cache.clear()
        assert len(cache) == 0
        assert cache.get(1) is None
        cache.set(1, 1)  # usable after clear
        assert cache.get(1) == 1

    def test_contains_counts_nothing(self) -> None:
        cache: Cache[str, int] = Cache(60)
        cache.set("k", 1)
        assert "k" in cache
        assert "other" not in cache
        stats = cache.statistics()
        assert (stats.hits, stats.misses) == (0, 0)

    def test_properties_and_repr(self) -> None:
        bounded: Cache[str, int] = Cache(timedelta(minutes=1), maxsize=100)
        assert bounded.ttl == 60.0
        assert bounded.maxsize == 100
        bounded.set("a", 1)
        bounded.get("a")
        bounded.get("a")
        bounded.get("a")
        bounded.get("b")
        assert repr(bounded) == (
            f"<darwin_metrics.Cache at {id(bounded):#x}, 1/100 entries, ttl=60.0s, hit ratio 0.75>"
        )
        unbounded: Cache[str, int] = Cache(1.5)
        assert unbounded.maxsize is None
        assert repr(unbounded) == (
            f"<darwin_metrics.Cache at {id(unbounded):#x}, 0 entries, ttl=1.5s, hit ratio n/a>"
        )

    def test_public_names(self) -> None:
        import darwin_metrics._cache
        import darwin_metrics.resource

        assert darwin_metrics._cache.__all__ == ["Cache", "CacheStatistics", "EvictionCause"]
        for name in darwin_metrics._cache.__all__:
            assert name in darwin_metrics.resource.__all__
            assert getattr(darwin_metrics.resource, name) is getattr(darwin_metrics._cache, name)


class TestExpiry:
    def test_boundary(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache.set("k", 1)
        clock.advance(10 - 1e-6)
        assert cache.get("k") == 1
        assert "k" in cache
        clock.advance(1e-6)  # exactly the ttl: gone
        assert cache.get("k") is None
        assert "k" not in cache

    def test_just_after_the_ttl(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache.set("k", 1)
        clock.advance(10.001)
        assert "k" not in cache
        assert cache.get("k") is None

    def test_per_entry_ttl(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache.set("short", 1, ttl=1)
        cache.set("long", 2, ttl=timedelta(seconds=100))
        cache.set("default", 3)
        clock.advance(1)
        assert cache.get("short") is None
        assert cache.get("default") == 3
        clock.advance(9)
        assert cache.get("default") is None
        assert cache.get("long") == 2
        clock.advance(90)
        assert cache.get("long") is None

    def test_set_restarts_the_ttl(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache.set("k", 1)
        clock.advance(8)
        cache.set("k", 2)
        clock.advance(8)
        assert cache.get("k") == 2

    def test_dropped_lazily_when_touched(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache.set("a", 1)
        cache.set("b", 2)
        clock.advance(10)
        assert len(cache) == 2  # expired, but nobody looked
        assert cache.get("a") is None
        assert len(cache) == 1
        assert "b" not in cache
        assert len(cache) == 0
        assert cache.statistics().expirations == 2

    def test_clear_expired(self) -> None:
        clock = FakeClock()
        cache: Cache[int, int] = Cache(10, clock=clock)
        for key in range(5):
            cache.set(key, key, ttl=1 + key)
        clock.advance(3)
        assert cache.clear_expired() == 3  # ttls 1, 2 and 3
        assert len(cache) == 2
        assert cache.clear_expired() == 0
        assert [cache.get(key) for key in range(5)] == [None, None, None, 3, 4]

    def test_new_keys_sweep_expired_entries_of_an_unbounded_cache(self) -> None:
        clock = FakeClock()
        cache: Cache[int, int] = Cache(1, clock=clock)
        for key in range(100):
            cache.set(key, key)
        clock.advance(1)
        for key in range(100, 200):
            cache.set(key, key)
        # Nobody touched keys 0..99 again, yet they did not pile up.
        assert len(cache) <= 100
        assert cache.statistics().expirations >= 100

    def test_a_miss_does_not_drop_a_fresher_entry(self) -> None:
        # Another thread sets the key between a lookup's read of the expired entry and its
        # attempt to drop it: the fresh entry must survive.
        clock = FakeClock()
        cache: Cache[str, str] = Cache(10, clock=clock)
        cache.set("k", "stale")
        clock.advance(10)
        racing = True

        def racing_clock() -> float:
            nonlocal racing
            if racing:
                racing = False
                cache.set("k", "fresh")
            return clock()

        cache._clock = racing_clock
        assert cache.get("k") is None  # it found the stale entry
        assert cache.get("k") == "fresh"
        assert cache.statistics().expirations == 1  # the stale one, counted once

    @pytest.mark.parametrize("maxsize", [None, 10])
    def test_a_racing_lookup_never_returns_a_dropped_value(self, maxsize: int | None) -> None:
        # Another thread removes the entry just after a lookup compared its expiry: the lookup
        # returns the value it found, or misses; never what the cache put in the value's place.
        cache: Cache[str, str] = Cache(10, maxsize=maxsize)
        cache.set("k", "v")
        real_clock = cache._clock

        class RacingNow(float):
            def __lt__(self, other: float) -> bool:
                result = float(self) < other
                cache.remove("k")
                return result

        cache._clock = lambda: RacingNow(real_clock())
        assert cache.get("k") in ("v", None)
        cache._clock = real_clock
        assert "k" not in cache


class TestLockFreeReads:
    """A lookup takes no lock: a writer may change the entry between any two of its reads."""

    @staticmethod
    def interrupt_next_value_read(
        monkeypatch: pytest.MonkeyPatch, writer: Callable[[], object], *, before: bool
    ) -> Callable[[], None]:
        """Return ``arm``: after it, the next read of an entry's value runs ``writer`` first
        (``before=True``) or just after reading (``before=False``), as another thread could.
        """
        armed: list[Callable[[], object]] = []
        slot = cache_module._Entry.__dict__["value"]  # the slot's descriptor

        class InterruptedEntry(cache_module._Entry[Any, Any]):
            __slots__ = ()

            @property
            def value(self) -> Any:
                if before and armed:
                    armed.pop()()
                value = slot.__get__(self)
                if not before and armed:
                    armed.pop()()
                return value

            @value.setter
            def value(self, value: Any) -> None:
                slot.__set__(self, value)

        monkeypatch.setattr(cache_module, "_Entry", InterruptedEntry)
        return lambda: armed.append(writer)

    @pytest.mark.parametrize("maxsize", [None, 10])
    def test_removed_between_reading_the_expiry_and_the_value(
        self, monkeypatch: pytest.MonkeyPatch, maxsize: int | None
    ) -> None:
        cache: Cache[str, str] = Cache(10, maxsize=maxsize)
        arm = self.interrupt_next_value_read(monkeypatch, lambda: cache.remove("k"), before=True)
        cache.set("k", "v")
        arm()
        assert cache.get("k") is None  # never the placeholder of a dropped value
        assert cache.statistics().misses == 1

    def test_replaced_after_reading_an_expired_value(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        clock = FakeClock()
        cache: Cache[str, str] = Cache(10, clock=clock)

        def writer() -> None:
            clock.advance(1)  # "v" has expired by the time the reader reads the clock
            cache.set("k", "new")

        arm = self.interrupt_next_value_read(monkeypatch, writer, before=False)
        cache.set("k", "v")
        clock.advance(9.5)
        arm()
        assert cache.get("k") is None  # not "v": it expired before the reader's clock read
        assert cache.get("k") == "new"

    def test_replaced_between_reading_the_expiry_and_the_value(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cache: Cache[str, str] = Cache(10)
        arm = self.interrupt_next_value_read(
            monkeypatch, lambda: cache.set("k", "new"), before=True
        )
        cache.set("k", "v")
        arm()
        assert cache.get("k") in (None, "new")
        assert cache.get("k") == "new"


class TestEviction:
    def test_bound(self) -> None:
        cache: Cache[int, int] = Cache(60, maxsize=10)
        for key in range(100):
            cache.set(key, key)
            assert len(cache) <= 10
        assert len(cache) == 10
        assert cache.statistics().evictions == 90

    def test_unvisited_oldest_goes_first(self) -> None:
        recorder = Recorder()
        cache: Cache[str, int] = Cache(60, maxsize=3, on_evict=recorder)
        for key in "abc":
            cache.set(key, 0)
        cache.get("a")
        cache.set("d", 0)  # a was looked up: it survives, b goes
        cache.set("e", 0)  # then c, the next unvisited one
        assert [key for key, _, _ in recorder.calls] == ["b", "c"]
        assert {key for key in "ade" if key in cache} == {"a", "d", "e"}

    def test_hits_survive_eviction(self) -> None:
        cache: Cache[int, str] = Cache(60, maxsize=10)
        cache.set(-1, "hot")
        for key in range(1000):
            assert cache.get(-1) == "hot"
            cache.set(key, "cold")
        assert cache.get(-1) == "hot"

    def test_replacing_a_key_evicts_nothing(self) -> None:
        cache: Cache[int, int] = Cache(60, maxsize=3)
        for key in range(3):
            cache.set(key, key)
        for round_ in range(100):
            cache.set(round_ % 3, round_)
        assert len(cache) == 3
        assert cache.statistics().evictions == 0

    def test_expired_entries_go_before_live_ones(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(60, maxsize=3, clock=clock, on_evict=recorder)
        cache.set("b", 0)
        cache.set("short", 0, ttl=1)
        cache.set("c", 0)
        clock.advance(1)
        cache.set("d", 0)
        assert recorder.calls == [("short", 0, EvictionCause.EXPIRED)]
        assert all(key in cache for key in "bcd")
        stats = cache.statistics()
        assert (stats.evictions, stats.expirations) == (0, 1)

    def test_a_visited_but_expired_entry_is_not_spared(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(60, maxsize=2, clock=clock, on_evict=recorder)
        cache.set("a", 0, ttl=1)
        cache.get("a")
        cache.set("b", 0)
        clock.advance(1)
        cache.set("c", 0)
        assert recorder.calls == [("a", 0, EvictionCause.EXPIRED)]

    def test_the_hand_drops_an_expired_entry_it_meets(self) -> None:
        # Right after a sweep, the next sweep waits for more sets; meanwhile the eviction hand
        # takes the expired entries it passes before any live one.
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(10, maxsize=4, clock=clock, on_evict=recorder)
        cache.set("a", 0, ttl=1)
        for key in "bcd":
            cache.set(key, 0)
        clock.advance(1)
        cache.set("e", 0, ttl=0.5)  # sweeps a away
        for key in "bcd":
            cache.get(key)
        clock.advance(0.5)
        cache.set("f", 0)
        assert recorder.calls == [("a", 0, EvictionCause.EXPIRED), ("e", 0, EvictionCause.EXPIRED)]
        stats = cache.statistics()
        assert (stats.evictions, stats.expirations) == (0, 2)

    def test_removed_values_are_released(self) -> None:
        clock = FakeClock()
        cache: Cache[str, Value] = Cache(10, maxsize=2, clock=clock)

        def stored(key: str, **kwargs: Any) -> weakref.ref[Value]:
            value = Value(key)
            cache.set(key, value, **kwargs)
            return weakref.ref(value)

        removed = stored("removed")
        cache.remove("removed")
        replaced = stored("replaced")
        stored("replaced")
        expired = stored("expired", ttl=1)
        clock.advance(1)
        cache.get("expired")
        evicted = stored("evicted")
        stored("x")
        stored("y")
        gc.collect()
        assert [ref() for ref in (removed, replaced, expired, evicted)] == [None] * 4

    def test_the_queue_stays_proportional_to_the_entries(self) -> None:
        # Entries that leave stay in SIEVE's queue (without their value) until it is compacted.
        cache: Cache[int, int] = Cache(60, maxsize=100)
        for key in range(20_000):
            cache.set(key, key)  # evicts
            cache.set(-1, key)  # replaces
            if key % 3 == 0:
                cache.remove(key)
        queue = cache._queue
        assert queue is not None
        assert len(queue) <= 2 * len(cache) + 1

    def test_sieve_beats_lru_on_a_zipf_trace(self) -> None:
        # 1% of the key space, Zipf(1.0): SIEVE's hit ratio is about 0.6, LRU's about 0.5.
        rng = random.Random(1)
        keys = 10_000
        weights = [1 / rank for rank in range(1, keys + 1)]
        trace = rng.choices(range(keys), weights, k=50_000)
        cache: Cache[int, int] = Cache(60, maxsize=keys // 100)
        for key in trace:
            if cache.get(key) is None:
                cache.set(key, key)
        lru_hits = 0
        lru: OrderedDict[int, None] = OrderedDict()
        for key in trace:
            if key in lru:
                lru_hits += 1
                lru.move_to_end(key)
            else:
                if len(lru) >= keys // 100:
                    lru.popitem(last=False)
                lru[key] = None
        assert cache.statistics().hit_ratio >= lru_hits / len(trace) + 0.02


class TestOnEvict:
    def test_every_cause(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(10, maxsize=2, clock=clock, on_evict=recorder)
        cache.set("a", 1)
        cache.set("a", 2)
        assert recorder.calls[-1] == ("a", 1, EvictionCause.REPLACED)
        cache.remove("a")
        assert recorder.calls[-1] == ("a", 2, EvictionCause.REMOVED)
        cache.set("b", 3)
        cache.set("c", 4)
        cache.set("d", 5)
        assert recorder.calls[-1] == ("b", 3, EvictionCause.SIZE)
        clock.advance(10)
        cache.get("c")
        assert recorder.calls[-1] == ("c", 4, EvictionCause.EXPIRED)
        assert len(recorder.calls) == 4

    def test_expired_whichever_operation_finds_it(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(10, clock=clock, on_evict=recorder)
        for key in "abcd":
            cache.set(key, 0)
        clock.advance(10)
        assert "a" not in cache
        cache.set("b", 1)  # over an expired entry: it expired, it was not replaced
        assert cache.remove("c") is False
        assert cache.clear_expired() == 1
        cache.clear()
        assert recorder.calls == [
            ("a", 0, EvictionCause.EXPIRED),
            ("b", 0, EvictionCause.EXPIRED),
            ("c", 0, EvictionCause.EXPIRED),
            ("d", 0, EvictionCause.EXPIRED),
            ("b", 1, EvictionCause.REMOVED),
        ]
        assert cache.statistics().expirations == 4

    def test_clear_reports_each_entry(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(10, clock=clock, on_evict=recorder)
        cache.set("old", 1, ttl=1)
        cache.set("new", 2)
        clock.advance(1)
        cache.clear()
        assert sorted(recorder.calls) == [
            ("new", 2, EvictionCause.REMOVED),
            ("old", 1, EvictionCause.EXPIRED),
        ]

    def test_runs_outside_the_lock(self) -> None:
        # A callback that uses the cache would deadlock if it ran under the lock.
        seen: list[tuple[str, int | None]] = []
        cache: Cache[str, int] = Cache(60, maxsize=2)

        def on_evict(key: str, value: int, cause: EvictionCause) -> None:
            seen.append((key, cache.get(key)))
            if key == "a":
                cache.set("moved", value)

        cache._on_evict = on_evict
        cache.set("a", 1)
        cache.remove("a")
        assert seen == [("a", None)]
        assert cache.get("moved") == 1

    def test_finalizers_run_outside_the_lock(self) -> None:
        # A value's __del__ is user code too: if the last reference went under the lock, a
        # finalizer that uses the cache would deadlock.
        clock = FakeClock()
        cache: Cache[str, object] = Cache(10, maxsize=2, clock=clock)

        class UsesTheCache:
            def __del__(self) -> None:
                cache.set("from __del__", 0)

        def scenario() -> None:
            cache.set("removed", UsesTheCache())
            cache.remove("removed")
            cache.set("replaced", UsesTheCache())
            cache.set("replaced", 0)
            cache.set("evicted", UsesTheCache())
            cache.set("x", 0)
            cache.set("y", 0)
            cache.set("expired", UsesTheCache(), ttl=1)
            clock.advance(1)
            cache.clear_expired()
            cache.set("swept", UsesTheCache(), ttl=1)
            clock.advance(1)
            cache.set("z", 0)

        thread = threading.Thread(target=scenario, daemon=True)
        thread.start()
        thread.join(THREAD_TIMEOUT)
        assert not thread.is_alive(), "deadlocked: a finalizer ran under the cache's lock"

    def test_errors_are_logged_not_raised(self, caplog: pytest.LogCaptureFixture) -> None:
        def on_evict(key: str, value: int, cause: EvictionCause) -> None:
            raise RuntimeError("boom")

        cache: Cache[str, int] = Cache(60, maxsize=1, on_evict=on_evict)
        with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
            cache.set("a", 1)
            cache.set("a", 2)
            cache.set("b", 3)
            assert cache.remove("b") is True
        assert cache.statistics().sets == 3
        assert len(caplog.records) == 3
        assert all(record.name == "darwin_metrics" for record in caplog.records)
        assert all(record.exc_info is not None for record in caplog.records)
        assert "'a'" in caplog.records[0].getMessage()


class TestStatistics:
    def test_counts(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, maxsize=2, clock=clock)
        empty = cache.statistics()
        assert empty == CacheStatistics(
            hits=0,
            misses=0,
            sets=0,
            evictions=0,
            expirations=0,
            removals=0,
            replacements=0,
            loads=0,
            load_failures=0,
            joined=0,
            refreshes=0,
            refresh_failures=0,
            stale_served=0,
            load_duration=empty.load_duration,
            size=0,
            maxsize=2,
            weight=0,
            max_weight=None,
            hit_ratio=0.0,
        )
        assert empty.load_duration.count == 0
        cache.set("a", 1)
        cache.set("a", 2)  # a replacement
        cache.set("b", 1, ttl=1)
        cache.get("a")
        cache.get("a")
        cache.get("a")
        cache.get("nope")
        clock.advance(1)
        cache.get("b")  # expired: a miss and an expiration
        cache.set("c", 1)
        cache.set("d", 1)  # evicts one of a or c
        cache.remove("d")
        stats = cache.statistics()
        assert stats == attrs.evolve(
            empty,
            hits=3,
            misses=2,
            sets=5,
            evictions=1,
            expirations=1,
            removals=1,
            replacements=1,
            size=1,
            weight=1,
            hit_ratio=0.6,
        )
        assert stats.evictions_by_cause == {
            EvictionCause.EXPIRED: 1,
            EvictionCause.SIZE: 1,
            EvictionCause.REMOVED: 1,
            EvictionCause.REPLACED: 1,
        }

    def test_is_frozen(self) -> None:
        stats: CacheStatistics = Cache[str, int](60).statistics()
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            stats.hits = 1  # type: ignore[misc]

    def test_single_flight_counts(self) -> None:
        cache: Cache[str, int] = Cache(60)
        assert cache.get_or_set("k", lambda: 1) == 1
        assert cache.get_or_set("k", lambda: 2) == 1
        stats = cache.statistics()
        assert (stats.hits, stats.misses, stats.sets) == (1, 1, 1)


class TestThreads:
    def test_hammer(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        maxsize = 32
        cache: Cache[int, tuple[int, int]] = Cache(
            1, maxsize=maxsize, clock=clock, on_evict=recorder
        )
        operations = 4000
        gets = [0] * 8
        sets = [0] * 8
        made = [0] * 8

        def worker(index: int) -> None:
            rng = random.Random(index)
            for step in range(operations):
                key = rng.randrange(100)
                roll = rng.random()
                if roll < 0.5:
                    gets[index] += 1
                    value = cache.get(key)
                    assert value is None or value[0] == key
                elif roll < 0.8:
                    sets[index] += 1
                    cache.set(key, (key, index), ttl=rng.choice([None, 0.5, 2]))
                elif roll < 0.9:
                    cache.remove(key)
                elif roll < 0.95:
                    gets[index] += 1

                    def make(key: int = key) -> tuple[int, int]:
                        made[index] += 1
                        return (key, index)

                    assert cache.get_or_set(key, make)[0] == key
                elif roll < 0.97:
                    cache.clear_expired()
                else:
                    assert cache.statistics().size <= maxsize
                    assert isinstance(key in cache, bool)
                if index == 0 and step % 50 == 0:
                    clock.advance(0.1)
                assert len(cache) <= maxsize

        run_threads(worker, 8)
        stats = cache.statistics()
        causes = recorder.causes()
        assert len(cache) == stats.size <= maxsize
        # Exact, counted under the lock. A make() whose key was removed meanwhile is returned
        # but not stored, so not every make() is a set.
        assert stats.loads == sum(made)
        assert sum(sets) <= stats.sets <= sum(sets) + sum(made)
        assert stats.evictions == causes[EvictionCause.SIZE] > 0
        assert stats.expirations == causes[EvictionCause.EXPIRED] > 0
        # Every set added an entry or replaced one; every other departure took one away.
        departed = sum(causes.values()) - causes[EvictionCause.REPLACED]
        assert stats.size == stats.sets - causes[EvictionCause.REPLACED] - departed
        # Hits and misses may lose increments between threads, never gain any.
        assert 0 < stats.hits + stats.misses <= sum(gets)

    def test_two_threads_reading(self) -> None:
        cache: Cache[int, int] = Cache(60, maxsize=100)
        for key in range(100):
            cache.set(key, key)

        def reader(index: int) -> None:
            for _ in range(200):
                for key in range(100):
                    assert cache.get(key) == key

        run_threads(reader, 2)
        assert len(cache) == 100
        assert cache.statistics().evictions == 0


class TestGetOrSet:
    def test_hit_and_miss(self) -> None:
        cache: Cache[str, int] = Cache(60)
        assert cache.get_or_set("k", lambda: 1, ttl=5) == 1
        assert cache.get_or_set("k", lambda: 2) == 1
        assert cache.get("k") == 1

    def test_ttl(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(60, clock=clock)
        cache.get_or_set("k", lambda: 1, ttl=5)
        clock.advance(5)
        assert cache.get("k") is None

    def test_one_make_for_many_threads(self) -> None:
        cache: Cache[str, object] = Cache(60)
        release = threading.Event()
        calls = 0
        results: list[object] = []
        result = object()

        def make() -> object:
            nonlocal calls
            calls += 1
            assert release.wait(THREAD_TIMEOUT)
            return result

        def caller(index: int) -> None:
            results.append(cache.get_or_set("k", make))

        thread = threading.Thread(target=release_when_waiting, args=(cache, "k", 7, release))
        thread.start()
        run_threads(caller, 8)
        thread.join()
        assert calls == 1
        assert results == [result] * 8
        assert cache._thread_flights == {}

    def test_an_error_reaches_every_waiter(self) -> None:
        cache: Cache[str, int] = Cache(60)
        release = threading.Event()
        calls = 0
        errors: list[BaseException] = []

        def make() -> int:
            nonlocal calls
            calls += 1
            assert release.wait(THREAD_TIMEOUT)
            raise LookupError("no such thing")

        def caller(index: int) -> None:
            with pytest.raises(LookupError) as info:
                cache.get_or_set("k", make)
            errors.append(info.value)

        thread = threading.Thread(target=release_when_waiting, args=(cache, "k", 5, release))
        thread.start()
        run_threads(caller, 6)
        thread.join()
        assert calls == 1
        assert len(errors) == 6
        assert all(error is errors[0] for error in errors)
        assert "k" not in cache
        assert cache.get_or_set("k", lambda: 1) == 1  # nothing stuck

    def test_waiters_take_over_when_the_maker_gives_up(self) -> None:
        # A BaseException that is not an Exception (KeyboardInterrupt, SystemExit) is not the
        # make's result: a waiter makes the value instead.
        cache: Cache[str, str] = Cache(60)
        release = threading.Event()
        calls = 0
        results: list[str] = []

        class GaveUp(BaseException):
            pass

        def make() -> str:
            nonlocal calls
            calls += 1
            if calls == 1:
                assert release.wait(THREAD_TIMEOUT)
                raise GaveUp
            return "made"

        def caller(index: int) -> None:
            try:
                results.append(cache.get_or_set("k", make))
            except GaveUp:
                results.append("gave up")

        thread = threading.Thread(target=release_when_waiting, args=(cache, "k", 3, release))
        thread.start()
        run_threads(caller, 4)
        thread.join()
        assert calls == 2
        assert sorted(results) == ["gave up", "made", "made", "made"]

    def test_recursion_is_an_error(self) -> None:
        cache: Cache[str, int] = Cache(60)

        def make() -> int:
            return cache.get_or_set("k", make)

        with pytest.raises(RuntimeError, match="wait for itself"):
            cache.get_or_set("k", make)
        assert cache._thread_flights == {}


def release_when_waiting(
    cache: Cache[Any, Any], key: object, waiters: int, release: threading.Event
) -> None:
    """Set ``release`` once ``waiters`` threads wait for the thread that makes ``key``."""

    def waiting() -> bool:
        flight = cache._thread_flights.get(key)
        return flight is not None and flight.waiters == waiters

    try:
        wait_until(waiting, f"{waiters} threads wait for {key!r}")
    finally:
        release.set()


class TestGetOrLoad:
    @pytest.mark.anyio
    async def test_hit_and_miss(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(60, clock=clock)
        calls = 0

        async def load() -> int:
            nonlocal calls
            calls += 1
            await anyio.sleep(1)
            return calls

        assert await cache.get_or_load("k", load, ttl=5) == 1
        assert await cache.get_or_load("k", load) == 1
        assert calls == 1
        clock.advance(5)
        assert await cache.get_or_load("k", load) == 2
        stats = cache.statistics()
        assert (stats.hits, stats.misses, stats.sets) == (1, 2, 2)

    @pytest.mark.anyio
    async def test_one_load_for_many_callers(self) -> None:
        cache: Cache[str, object] = Cache(60)
        calls = 0
        result = object()
        results: list[object] = []

        async def load() -> object:
            nonlocal calls
            calls += 1
            await anyio.sleep(1)
            return result

        async def caller() -> None:
            results.append(await cache.get_or_load("k", load))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(caller)
        assert calls == 1
        assert results == [result] * 20
        assert cache.get("k") is result
        assert cache._async_flights == {}

    @pytest.mark.anyio
    async def test_different_keys_load_concurrently(self) -> None:
        cache: Cache[int, int] = Cache(60)
        loading: set[int] = set()
        most = 0

        async def load(key: int) -> int:
            nonlocal most
            loading.add(key)
            most = max(most, len(loading))
            await anyio.sleep(1)
            loading.discard(key)
            return key

        async with anyio.create_task_group() as tg:
            for key in range(5):
                tg.start_soon(cache.get_or_load, key, lambda key=key: load(key))
        assert most == 5
        assert [cache.get(key) for key in range(5)] == list(range(5))

    @pytest.mark.anyio
    async def test_an_error_reaches_every_waiter(self) -> None:
        cache: Cache[str, int] = Cache(60)
        calls = 0
        errors: list[BaseException] = []

        async def load() -> int:
            nonlocal calls
            calls += 1
            await anyio.sleep(1)
            raise LookupError("no such thing")

        async def caller() -> None:
            with pytest.raises(LookupError) as info:
                await cache.get_or_load("k", load)
            errors.append(info.value)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(caller)
        assert calls == 1
        assert len(errors) == 5
        assert all(error is errors[0] for error in errors)
        assert "k" not in cache
        assert cache._async_flights == {}

        async def load_again() -> int:
            return 2

        assert await cache.get_or_load("k", load_again) == 2

    @pytest.mark.anyio
    async def test_a_cancelled_loader_hands_over(self) -> None:
        cache: Cache[str, int] = Cache(60)
        calls = 0
        results: list[int] = []

        async def load() -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                await anyio.sleep_forever()
            await anyio.sleep(1)
            return calls

        async def waiter() -> None:
            results.append(await cache.get_or_load("k", load))

        loader_scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancellable_get_or_load, cache, "k", load, loader_scope)
            await anyio.wait_all_tasks_blocked()
            for _ in range(5):
                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            assert calls == 1
            loader_scope.cancel()
        assert calls == 2
        assert results == [2] * 5
        assert cache.get("k") == 2
        assert cache._async_flights == {}

    @pytest.mark.anyio
    async def test_a_cancelled_waiter_leaves_the_load_alone(self) -> None:
        cache: Cache[str, int] = Cache(60)
        calls = 0

        async def load() -> int:
            nonlocal calls
            calls += 1
            await anyio.sleep(5)
            return 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get_or_load, "k", load)
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(1) as scope:
                await cache.get_or_load("k", load)
            assert scope.cancelled_caught
        assert calls == 1
        assert cache.get("k") == 1

    @pytest.mark.anyio
    async def test_a_hit_is_not_a_checkpoint_a_miss_is(self) -> None:
        cache: Cache[str, int] = Cache(60)
        cache.set("hit", 1)
        calls = 0

        async def load() -> int:
            nonlocal calls
            calls += 1
            return 2

        with anyio.CancelScope() as scope:
            scope.cancel()
            assert await cache.get_or_load("hit", load) == 1
            await cache.get_or_load("miss", load)
            pytest.fail("a miss did not check for cancellation")  # pragma: no cover
        assert scope.cancelled_caught
        assert calls == 0
        assert "miss" not in cache
        assert cache._async_flights == {}

    @pytest.mark.anyio
    async def test_recursion_is_an_error(self) -> None:
        cache: Cache[str, int] = Cache(60)

        async def load() -> int:
            return await cache.get_or_load("k", load)

        with pytest.raises(RuntimeError, match="wait for itself"):
            await cache.get_or_load("k", load)
        assert cache._async_flights == {}

    @pytest.mark.parametrize("backend", ["asyncio", "trio"])
    def test_event_loops_in_two_threads(self, backend: str) -> None:
        # Single flight is per event loop: a loop never waits on another loop's event. Each
        # loop loads for itself, even while the other loop's load is in progress.
        cache: Cache[str, str] = Cache(60)
        first_loading = threading.Event()
        second_loaded = threading.Event()
        results: list[str] = []

        async def first_load() -> str:
            first_loading.set()
            assert second_loaded.wait(THREAD_TIMEOUT)  # blocks this loop: that is fine here
            return "first"

        async def second_load() -> str:
            second_loaded.set()
            return "second"

        async def first() -> None:
            results.append(await cache.get_or_load("k", first_load))

        async def second() -> None:
            assert first_loading.wait(THREAD_TIMEOUT)
            results.append(await cache.get_or_load("k", second_load))

        def run(index: int) -> None:
            anyio.run(first if index == 0 else second, backend=backend)

        run_threads(run, 2)
        assert sorted(results) == ["first", "second"]
        assert cache.get("k") == "first"  # the last value loaded
        assert cache._async_flights == {}


async def cancellable_get_or_load(
    cache: Cache[str, int], key: str, load: Callable[[], Any], scope: anyio.CancelScope
) -> None:
    with scope:
        await cache.get_or_load(key, load)


class TestNewOptionsBadInput:
    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"weigher": len}, TypeError, "max_weight"),
            ({"max_weight": 10}, TypeError, "weigher"),
            ({"weigher": "len", "max_weight": 10}, TypeError, "weigher"),
            ({"weigher": len, "max_weight": 0}, ValueError, "max_weight"),
            ({"weigher": len, "max_weight": 1.5}, TypeError, "max_weight"),
            ({"weigher": len, "max_weight": True}, TypeError, "max_weight"),
            ({"ttl_after_access": 0}, ValueError, "ttl_after_access"),
            ({"ttl_after_access": "5"}, TypeError, "ttl_after_access"),
            ({"ttl_after_access": 60}, ValueError, "shorter than ttl"),
            ({"ttl_after_access": timedelta(minutes=2)}, ValueError, "shorter than ttl"),
        ],
    )
    def test_constructor(
        self, options: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        with pytest.raises(error, match=match):
            Cache(60, **options)

    @pytest.mark.parametrize(
        ("weight", "error", "match"),
        [
            (-1, ValueError, "negative"),
            (1.0, TypeError, "must return an int"),
            ("3", TypeError, "must return an int"),
            (True, TypeError, "must return an int"),
            (None, TypeError, "must return an int"),
            (11, ValueError, "above max_weight"),
        ],
    )
    def test_a_bad_weight_is_an_error_at_set(
        self, weight: object, error: type[Exception], match: str
    ) -> None:
        cache: Cache[str, object] = Cache(60, weigher=lambda key, value: value, max_weight=10)
        cache.set("a", 4)
        operations: list[Callable[[], object]] = [
            lambda: cache.set("k", weight),
            lambda: cache.__setitem__("k", weight),
            lambda: cache.set_many({"ok": 1, "k": weight}),
            lambda: cache.set("a", weight),
        ]
        for operation in operations:
            with pytest.raises(error, match=match):
                operation()
        assert cache.items() == [("a", 4)]
        stats = cache.statistics()
        assert (stats.sets, stats.weight) == (1, 4)

    def test_a_weigher_that_raises_propagates(self) -> None:
        def weigher(key: str, value: int) -> int:
            raise ZeroDivisionError("weigher bug")

        cache: Cache[str, int] = Cache(60, weigher=weigher, max_weight=10)
        with pytest.raises(ZeroDivisionError, match="weigher bug"):
            cache.set("k", 1)
        assert len(cache) == 0

    def test_set_many_checks_everything_first(self) -> None:
        cache: Cache[Any, int] = Cache(60)
        with pytest.raises(TypeError, match="mapping"):
            cache.set_many([("a", 1)])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="unhashable"):
            cache.set_many({"a": 1, ("b", []): 2})  # hashable container, unhashable inside
        with pytest.raises(ValueError, match="ttl"):
            cache.set_many({"a": 1}, ttl=0)
        assert len(cache) == 0


class TestMapping:
    def test_getitem_setitem_delitem(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache["a"] = 1
        assert cache["a"] == 1
        with pytest.raises(KeyError, match="b"):
            cache["b"]
        del cache["a"]
        with pytest.raises(KeyError, match="a"):
            del cache["a"]
        cache["c"] = 3
        clock.advance(10)
        with pytest.raises(KeyError):
            cache["c"]  # expired
        cache["d"] = 4
        clock.advance(10)
        with pytest.raises(KeyError):
            del cache["d"]  # expired: dropped, but nothing live was removed
        assert len(cache) == 0
        stats = cache.statistics()
        assert (stats.hits, stats.misses, stats.removals, stats.expirations) == (1, 2, 1, 2)

    def test_pop(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(10, clock=clock, on_evict=recorder)
        cache["a"] = 1
        assert cache.pop("a") == 1
        assert cache.pop("a", None) is None
        with pytest.raises(KeyError, match="a"):
            cache.pop("a")
        cache["b"] = 2
        clock.advance(10)
        assert cache.pop("b", -1) == -1  # expired: not returned
        assert recorder.calls == [("a", 1, EvictionCause.REMOVED), ("b", 2, EvictionCause.EXPIRED)]

    def test_snapshots(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, clock=clock)
        cache.set_many({"a": 1, "b": 2})
        cache.set("c", 3, ttl=1)
        keys = cache.keys()
        items = cache.items()
        cache.set("d", 4)  # snapshots do not change
        assert keys == ["a", "b", "c"]
        assert items == [("a", 1), ("b", 2), ("c", 3)]
        clock.advance(1)
        assert cache.keys() == ["a", "b", "d"]
        assert list(cache) == ["a", "b", "d"]
        assert cache.values() == [1, 2, 4]
        for key in cache:  # iterating over a snapshot: changing the cache is fine
            cache.remove(key)
        assert cache.keys() == []
        assert cache.statistics().hits == 0  # snapshots count no lookups

    def test_get_many(self) -> None:
        cache: Cache[str, int] = Cache(10)
        cache.set_many({"a": 1, "b": 2})
        assert cache.get_many(["b", "x", "a"]) == {"b": 2, "a": 1}
        assert cache.get_many([]) == {}
        stats = cache.statistics()
        assert (stats.hits, stats.misses) == (2, 1)
        with pytest.raises(TypeError, match="unhashable"):
            cache.get_many([["a"]])  # type: ignore[list-item]


class TestWeights:
    def test_evicts_until_the_new_entry_fits(self) -> None:
        recorder = Recorder()
        cache: Cache[str, bytes] = Cache(
            60, weigher=lambda key, value: len(value), max_weight=10, on_evict=recorder
        )
        cache.set_many({"a": b"xxx", "b": b"xxx", "c": b"xxx"})
        assert cache.statistics().weight == 9
        cache.set("d", b"xxxxxxx")  # 7: a and b must go (c stays: 3 + 7 = 10)
        assert cache.keys() == ["c", "d"]
        assert recorder.calls == [
            ("a", b"xxx", EvictionCause.SIZE),
            ("b", b"xxx", EvictionCause.SIZE),
        ]
        stats = cache.statistics()
        assert (stats.weight, stats.max_weight, stats.evictions, len(cache)) == (10, 10, 2, 2)
        assert "weight 10/10" in repr(cache)

    def test_hits_survive(self) -> None:
        cache: Cache[str, bytes] = Cache(60, weigher=lambda key, value: len(value), max_weight=4)
        cache.set_many({"a": b"x", "b": b"x", "c": b"x", "d": b"x"})
        assert cache.get("a") == b"x"
        cache.set("e", b"xx")
        assert cache.keys() == ["a", "d", "e"]

    def test_a_replacement_that_grows_evicts_others(self) -> None:
        cache: Cache[str, bytes] = Cache(60, weigher=lambda key, value: len(value), max_weight=6)
        cache.set_many({"a": b"xx", "b": b"xx", "c": b"xx"})
        cache.set("b", b"xxxxx")  # 2 + 5 + 2 > 6: others go, b keeps its new value
        assert cache.get("b") == b"xxxxx"
        assert cache.statistics().weight <= 6
        cache.set("b", b"x")
        assert cache.statistics().weight == sum(len(value) for value in cache.values())

    def test_zero_weights_and_maxsize_together(self) -> None:
        cache: Cache[int, int] = Cache(
            60, weigher=lambda key, value: value, max_weight=5, maxsize=3
        )
        cache.set_many({1: 0, 2: 0, 3: 0})
        cache.set(4, 0)  # the count bound
        assert len(cache) == 3
        cache.set(5, 5)  # the weight bound
        assert cache.statistics().weight == 5
        assert len(cache) <= 3

    def test_expired_entries_go_first(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(
            10, weigher=lambda key, value: value, max_weight=4, clock=clock
        )
        cache.set("old", 2, ttl=1)
        cache.set("live", 2)
        clock.advance(1)
        cache.get("live")
        cache.set("new", 2)
        assert cache.keys() == ["live", "new"]
        assert cache.statistics().expirations == 1

    @pytest.mark.anyio
    async def test_a_loaded_value_too_heavy_is_returned_not_cached(self) -> None:
        cache: Cache[str, bytes] = Cache(60, weigher=lambda key, value: len(value), max_weight=3)

        async def load() -> bytes:
            return b"too heavy"

        assert await cache.get_or_load("k", load) == b"too heavy"
        assert "k" not in cache
        assert cache.get_or_set("j", lambda: b"also too heavy") == b"also too heavy"
        assert len(cache) == 0

    def test_hammer(self) -> None:
        """8 threads of weighted sets, loads, removals and reads: the bound always holds and
        every on_evict report matches a value that was really stored."""
        clock = FakeClock()
        recorder = Recorder()
        max_weight = 200
        cache: Cache[int, tuple[int, int, int]] = Cache(
            1,
            weigher=lambda key, value: value[2],
            max_weight=max_weight,
            maxsize=64,
            clock=clock,
            on_evict=recorder,
        )
        stored: list[Counter[tuple[int, int, int]]] = [Counter() for _ in range(8)]
        operations = 3000 if STRESS else 1500

        def worker(index: int) -> None:
            rng = random.Random(index)
            for step in range(operations):
                key = rng.randrange(80)
                value = (key, index, rng.randrange(0, 25))
                roll = rng.random()
                if roll < 0.4:
                    got = cache.get(key)
                    assert got is None or got[0] == key
                elif roll < 0.7:
                    # 0.05 s runs out at the next tick of the clock, whichever thread ticks.
                    cache.set(key, value, ttl=rng.choice([None, 0.05, 0.5]))
                    stored[index][value] += 1
                elif roll < 0.8:
                    cache.set_many({key: value})
                    stored[index][value] += 1
                elif roll < 0.88:
                    made = cache.get_or_set(key, lambda value=value: value)
                    assert made[0] == key
                    if made == value:
                        stored[index][value] += 1  # made here (and stored unless removed)
                elif roll < 0.95:
                    cache.pop(key, None)
                else:
                    cache.clear_expired()
                stats = cache.statistics()
                assert stats.weight <= max_weight
                if step % 50 == 0:
                    clock.advance(0.1)  # every thread: time moves whatever the schedule

        run_threads(worker, 8)
        stats = cache.statistics()
        assert stats.weight <= max_weight
        assert stats.weight == sum(value[2] for value in cache.values()) + sum(
            value[2] for key, value in held_expired(cache)
        )
        causes = recorder.causes()
        assert stats.evictions == causes[EvictionCause.SIZE] > 0
        assert stats.expirations == causes[EvictionCause.EXPIRED] > 0
        assert stats.removals == causes[EvictionCause.REMOVED] > 0
        assert stats.replacements == causes[EvictionCause.REPLACED] > 0
        # Every report is of a value that was stored, and no value is reported more often than
        # it was stored; what is still held was stored and not reported.
        made = sum(stored, Counter())
        reported = Counter(value for _, value, _ in recorder.calls)
        for value, count in reported.items():
            assert count <= made[value], value
        for key, value in held_all(cache):
            assert value[0] == key
            assert reported[value] < made[value], value
        assert len(cache) == stats.size <= 64


def held_all(cache: Cache[Any, Any]) -> list[tuple[Any, Any]]:
    """Every entry held, live or expired (a test's look inside)."""
    return [(entry.key, entry.value) for entry in cache._data.values()]


def held_expired(cache: Cache[Any, Any]) -> list[tuple[Any, Any]]:
    live = dict(cache.items())
    return [(key, value) for key, value in held_all(cache) if key not in live]


class TestIdleExpiry:
    def test_reads_keep_an_entry_alive_up_to_its_ttl(self) -> None:
        clock = FakeClock()
        recorder = Recorder()
        cache: Cache[str, int] = Cache(10, ttl_after_access=3, clock=clock, on_evict=recorder)
        assert cache.ttl_after_access == 3
        cache.set("session", 1)
        for _ in range(3):
            clock.advance(2.9)
            assert cache.get("session") == 1  # each read restarts its 3 s
        clock.advance(1.2)  # 9.9 s after the set, 1.2 s after the last read
        assert cache["session"] == 1
        clock.advance(0.1)  # 10 s after the set: the ttl bounds it
        assert cache.get("session") is None
        assert recorder.calls == [("session", 1, EvictionCause.EXPIRED)]

    def test_an_idle_entry_expires(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, ttl_after_access=3, clock=clock)
        cache.set("a", 1)
        cache.set("b", 2)
        clock.advance(2)
        assert "a" in cache  # `in` is not a read that keeps it
        assert cache.get("b") == 2
        clock.advance(1)
        assert "a" not in cache
        assert cache.keys() == ["b"]
        clock.advance(2)
        assert cache.keys() == []
        assert cache.clear_expired() == 1  # "a" was dropped already

    def test_a_set_restarts_it(self) -> None:
        clock = FakeClock()
        cache: Cache[str, int] = Cache(10, ttl_after_access=3, clock=clock)
        cache.set("a", 1)
        clock.advance(2.5)
        cache.set("a", 2)
        clock.advance(2.5)
        assert cache.get("a") == 2

    def test_idle_entries_are_evicted_first_and_swept(self) -> None:
        clock = FakeClock()
        cache: Cache[int, int] = Cache(100, ttl_after_access=5, maxsize=3, clock=clock)
        cache.set_many({1: 1, 2: 2, 3: 3})
        clock.advance(4)
        assert cache.get(2) == 2
        assert cache.get(3) == 3
        clock.advance(2)  # 1 has been idle 6 s
        cache.set(4, 4)
        assert cache.keys() == [2, 3, 4]
        assert cache.statistics().expirations == 1
        clock.advance(10)
        assert cache.clear_expired() == 3

    @pytest.mark.anyio
    async def test_loads_read_it_too(self) -> None:
        cache: Cache[str, int] = Cache(10, ttl_after_access=2, clock=anyio.current_time)
        calls = 0

        async def load() -> int:
            nonlocal calls
            calls += 1
            return calls

        for _ in range(4):
            assert await cache.get_or_load("k", load) == 1
            await anyio.sleep(1.5)
        await anyio.sleep(1)
        assert await cache.get_or_load("k", load) == 2

    def test_threads(self) -> None:
        cache: Cache[int, int] = Cache(60, ttl_after_access=30, maxsize=50)

        def worker(index: int) -> None:
            rng = random.Random(index)
            for _ in range(2000):
                key = rng.randrange(80)
                if rng.random() < 0.5:
                    cache.set(key, key)
                else:
                    value = cache.get(key)
                    assert value is None or value == key

        run_threads(worker, 4)
        assert len(cache) <= 50
