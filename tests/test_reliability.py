"""Reliability across the components: broadcast accounting, a cache thread hammer, and one
bad-input table over every public constructor and method.

``DARWIN_METRICS_STRESS=1`` makes the broadcast and the hammer ten times bigger (the pool's
storm lives in ``test_pool_storm.py``).
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import random
import threading
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from darwin_metrics.resource import (
    Cache,
    EvictionCause,
    ResourceManager,
    ResourcePool,
    Subscription,
)

SCALE = 10 if os.environ.get("DARWIN_METRICS_STRESS") == "1" else 1


# --------------------------------------------------------------------------- broadcast


class Consumer:
    """One subscriber of the broadcast storm, and what it saw."""

    def __init__(self, name: str, subscription: Subscription, *, slowness: int = 0) -> None:
        self.name = name
        self.subscription = subscription
        self.slowness = slowness
        self.received: list[int] = []
        self.close_after: int | None = None
        self.published_while_open: int | None = None

    async def run(self, published: list[int]) -> None:
        async for usage in self.subscription:
            self.received.append(int(usage.usage_percent))
            for _ in range(self.slowness):
                await anyio.lowlevel.checkpoint()
            if self.close_after is not None and len(self.received) >= self.close_after:
                self.subscription.close()
                self.published_while_open = published[0]
        if self.published_while_open is None:
            self.published_while_open = published[0]

    def check_order(self) -> None:
        received = self.received
        assert all(a < b for a, b in itertools.pairwise(received)), (
            f"{self.name}: out of order or duplicated"
        )


@pytest.mark.anyio
async def test_broadcast_accounting() -> None:
    events = 3000 * SCALE
    published = [0]
    consumers: list[Consumer] = []
    async with anyio.create_task_group() as tg, ResourceManager() as manager:

        def add(name: str, slowness: int = 0, **options: Any) -> Consumer:
            consumer = Consumer(name, manager.subscribe(**options), slowness=slowness)
            consumers.append(consumer)
            tg.start_soon(consumer.run, published)
            return consumer

        for number in range(8):
            add(f"fast-{number}", buffer_size=16)
        for number in range(4):
            add(f"slow-{number}", slowness=20, buffer_size=8)
        for number in range(3):
            add(f"wait-{number}", slowness=number, buffer_size=4, overflow="wait")
        for number in range(4):
            closer = add(f"closer-{number}", slowness=number, buffer_size=8)
            closer.close_after = 200 * (number + 1)
        forgotten = manager.subscribe(buffer_size=4)
        forgotten_ref = weakref.ref(forgotten)

        for seq in range(events):
            published[0] = seq + 1  # counted before the event can arrive
            await manager.track_resource_usage("load", seq)
            if seq == events // 3:
                subscribers = manager.subscriber_count
                del forgotten  # dropped mid-stream, with events buffered
                gc.collect()
                assert forgotten_ref() is None
                assert manager.subscriber_count == subscribers - 1
        # The manager's exit closed every subscription: the consumers' loops end.

    assert manager.get_usage_stats() == {"load": events - 1}
    for consumer in consumers:
        consumer.check_order()
        missed = consumer.subscription.missed
        if consumer.name.startswith("wait"):
            assert consumer.received == list(range(events)), consumer.name
            assert missed == 0
        elif consumer.close_after is not None:
            assert len(consumer.received) >= consumer.close_after, consumer.name
            assert consumer.published_while_open is not None
            assert len(consumer.received) + missed <= consumer.published_while_open
        else:
            assert len(consumer.received) + missed == events, consumer.name
            assert consumer.received[-1] == events - 1  # the newest is never the dropped one
    assert any(c.subscription.missed for c in consumers if c.name.startswith("slow"))
    assert manager.subscriber_count == 0  # the exit ended every subscription


# --------------------------------------------------------------------------- cache hammer


class MovingClock:
    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_cache_thread_hammer() -> None:
    """8 threads of mixed operations on a bounded cache, with a clock that moves."""
    clock = MovingClock()
    reports: list[tuple[int, tuple[int, int, int], EvictionCause]] = []
    reports_lock = threading.Lock()

    def on_evict(key: int, value: tuple[int, int, int], cause: EvictionCause) -> None:
        with reports_lock:
            reports.append((key, value, cause))

    maxsize = 48
    cache: Cache[int, tuple[int, int, int]] = Cache(
        1.0, maxsize=maxsize, clock=clock, on_evict=on_evict
    )
    written: list[set[tuple[int, int, int]]] = [set() for _ in range(8)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(index: int) -> None:
        rng = random.Random(index)
        mine = written[index]
        try:
            barrier.wait()
            for step in range(3000 * SCALE):
                key = rng.randrange(120)
                roll = rng.random()
                if roll < 0.45:
                    value = cache.get(key)
                    assert value is None or value[0] == key
                elif roll < 0.75:
                    value = (key, index, step)
                    mine.add(value)
                    cache.set(key, value, ttl=rng.choice([None, 0.3, 2.0]))
                elif roll < 0.85:
                    cache.remove(key)
                elif roll < 0.95:

                    def make(key: int = key, step: int = step) -> tuple[int, int, int]:
                        value = (key, index, -step - 1)
                        mine.add(value)
                        return value

                    assert cache.get_or_set(key, make)[0] == key
                else:
                    cache.clear_expired()
                if step % 40 == 0:
                    clock.advance(0.05)
                assert len(cache) <= maxsize
        except BaseException as exc:  # reported below, with the thread's name
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    every_value = set().union(*written)
    stats = cache.statistics()
    assert len(cache) == stats.size <= maxsize
    causes = Counter(cause for _, _, cause in reports)
    assert stats.evictions == causes[EvictionCause.SIZE] > 0
    assert stats.expirations == causes[EvictionCause.EXPIRED] > 0
    assert causes[EvictionCause.REMOVED] > 0
    # Every on_evict call reports a value that was really set, under its own key, once.
    reported = Counter(value for _, value, _ in reports)
    for key, value, _ in reports:
        assert value in every_value
        assert value[0] == key
    assert max(reported.values()) == 1, "an entry was reported as leaving twice"
    # What is still cached was set and has not been reported as gone.
    for key in range(120):
        value = cache.get(key)
        if value is not None:
            assert value in every_value
            assert value not in reported


# --------------------------------------------------------------------------- bad input


def _pool() -> ResourcePool[int]:
    return ResourcePool(2, factory=lambda: 7)


Case = tuple[str, Callable[[], Any], type[Exception], str]

CONSTRUCTORS: list[Case] = [
    ("pool max_size", lambda: ResourcePool(0), ValueError, "max_size"),
    ("pool max_size type", lambda: ResourcePool("2"), TypeError, "max_size"),
    ("pool max_size bool", lambda: ResourcePool(True), TypeError, "max_size"),
    ("pool min_idle", lambda: ResourcePool(2, factory=int, min_idle=3), ValueError, "min_idle"),
    ("pool factory", lambda: ResourcePool(2, factory=5), TypeError, "factory"),
    ("pool check", lambda: ResourcePool(2, check="x"), TypeError, "check"),
    ("pool reset", lambda: ResourcePool(2, reset=1), TypeError, "reset"),
    ("pool dispose", lambda: ResourcePool(2, dispose=[]), TypeError, "dispose"),
    ("pool idle", lambda: ResourcePool(2, max_idle_time=-1), ValueError, "max_idle_time"),
    ("pool lifetime", lambda: ResourcePool(2, max_lifetime=math.inf), ValueError, "lifetime"),
    ("pool leak", lambda: ResourcePool(2, leak_threshold="1"), TypeError, "leak_threshold"),
    ("cache ttl zero", lambda: Cache(0), ValueError, "ttl"),
    ("cache ttl nan", lambda: Cache(math.nan), ValueError, "ttl"),
    ("cache ttl type", lambda: Cache("60"), TypeError, "ttl"),
    ("cache ttl bool", lambda: Cache(True), TypeError, "ttl"),
    ("cache maxsize", lambda: Cache(1, maxsize=0), ValueError, "maxsize"),
    ("cache maxsize type", lambda: Cache(1, maxsize=1.5), TypeError, "maxsize"),
    ("cache clock", lambda: Cache(1, clock=3), TypeError, "clock"),
    ("cache on_evict", lambda: Cache(1, on_evict=3), TypeError, "on_evict"),
    ("manager cache_ttl", lambda: ResourceManager(cache_ttl=-1), ValueError, "cache_ttl"),
    ("manager cache_ttl type", lambda: ResourceManager(cache_ttl="1"), TypeError, "cache_ttl"),
    (
        "manager cleanup",
        lambda: ResourceManager(cleanup_interval=math.inf),
        ValueError,
        "cleanup_interval",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "name"),
    [case[1:] for case in CONSTRUCTORS],
    ids=[case[0] for case in CONSTRUCTORS],
)
def test_bad_constructor_arguments(
    make: Callable[[], Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        make()


# Each case: (id, call on the object, exception, name in the message). The object is made
# fresh, put to use, hit with the bad call, and then must still work with nothing lost.
PoolCall = Callable[[ResourcePool[int]], Awaitable[Any]]
POOL_CALLS: list[tuple[str, PoolCall, type[Exception], str]] = [
    ("acquire timeout", lambda p: p.acquire(timeout=-1), ValueError, "timeout"),
    ("acquire timeout type", lambda p: p.acquire(timeout="1"), TypeError, "timeout"),
    ("discard unknown", lambda p: p.discard(99), ValueError, "not leased"),
    ("resize zero", lambda p: p.resize(0), ValueError, "max_size"),
    ("resize type", lambda p: p.resize(2.5), TypeError, "max_size"),
    ("retain", lambda p: p.retain(3), TypeError, "predicate"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("call", "error", "name"),
    [case[1:] for case in POOL_CALLS],
    ids=[case[0] for case in POOL_CALLS],
)
async def test_bad_pool_calls(call: PoolCall, error: type[Exception], name: str) -> None:
    pool = _pool()
    held = await pool.acquire()
    with pytest.raises(error, match=name):
        await call(pool)
    with pytest.raises(ValueError, match="timeout"):
        pool.lease(timeout=math.nan)
    stats = pool.statistics()
    assert (stats.size, stats.leased, stats.max_size) == (1, 1, 2)
    await pool.release(held)
    async with pool.lease() as resource:
        assert resource == 7
    assert pool.statistics().leased == 0


CacheCall = Callable[[Cache[Any, Any]], Any]
CACHE_CALLS: list[tuple[str, CacheCall, type[Exception], str]] = [
    ("get unhashable", lambda c: c.get([1]), TypeError, "unhashable"),
    ("set unhashable", lambda c: c.set({}, 1), TypeError, "unhashable"),
    ("remove unhashable", lambda c: c.remove([1]), TypeError, "unhashable"),
    ("set ttl", lambda c: c.set("k", 1, ttl=-1), ValueError, "ttl"),
    ("set ttl type", lambda c: c.set("k", 1, ttl="1"), TypeError, "ttl"),
    ("get_or_set make", lambda c: c.get_or_set("k", 3), TypeError, "make"),
    ("get_or_set ttl", lambda c: c.get_or_set("k", int, ttl=0), ValueError, "ttl"),
]


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [case[1:] for case in CACHE_CALLS],
    ids=[case[0] for case in CACHE_CALLS],
)
def test_bad_cache_calls(call: CacheCall, error: type[Exception], name: str) -> None:
    cache: Cache[Any, Any] = Cache(60, maxsize=4)
    cache.set("a", 1)
    with pytest.raises(error, match=name):
        call(cache)
    assert cache.get("a") == 1
    assert "k" not in cache
    assert len(cache) == 1
    cache.set("b", 2)
    assert cache.get("b") == 2


@pytest.mark.anyio
async def test_bad_get_or_load_calls() -> None:
    cache: Cache[str, int] = Cache(60)
    with pytest.raises(TypeError, match="load"):
        await cache.get_or_load("k", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        await cache.get_or_load("k", _load_one, ttl=math.inf)
    assert await cache.get_or_load("k", _load_one) == 1


async def _load_one() -> int:
    return 1


ManagerCall = Callable[[ResourceManager], Any]
MANAGER_CALLS: list[tuple[str, ManagerCall, type[Exception], str]] = [
    ("type empty", lambda m: m.track_resource_usage("", 1), ValueError, "resource_type"),
    ("type int", lambda m: m.track_resource_usage(1, 1), TypeError, "resource_type"),
    ("usage negative", lambda m: m.track_resource_usage("cpu", -1), ValueError, "usage"),
    ("usage nan", lambda m: m.track_resource_usage("cpu", math.nan), ValueError, "usage"),
    ("usage inf", lambda m: m.track_resource_usage("cpu", math.inf), ValueError, "usage"),
    ("usage bool", lambda m: m.track_resource_usage("cpu", True), TypeError, "usage"),
    ("usage str", lambda m: m.track_resource_usage("cpu", "5"), TypeError, "usage"),
    (
        "timeout negative",
        lambda m: m.track_resource_usage_with_timeout("cpu", 1, -1),
        ValueError,
        "timeout",
    ),
    (
        "timeout type",
        lambda m: m.track_resource_usage_with_timeout("cpu", 1, None),
        TypeError,
        "timeout",
    ),
    ("buffer zero", lambda m: m.subscribe(buffer_size=0), ValueError, "buffer_size"),
    ("buffer type", lambda m: m.subscribe(buffer_size=1.0), TypeError, "buffer_size"),
    ("overflow", lambda m: m.subscribe(overflow="newest"), ValueError, "overflow"),
    ("metric value", lambda m: m.cache_metric("k", "text"), TypeError, "value"),
    ("metric key", lambda m: m.cache_metric(1, b"x"), TypeError, "key"),
    ("watch name", lambda m: m.watch_pool("", _pool()), ValueError, "name"),
    ("watch pool", lambda m: m.watch_pool("db", object()), TypeError, "pool"),
    ("watch interval", lambda m: m.watch_pool("db", _pool(), interval=0), ValueError, "interval"),
    ("system interval", lambda m: m.sample_system(interval=-1), ValueError, "interval"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("call", "error", "name"),
    [case[1:] for case in MANAGER_CALLS],
    ids=[case[0] for case in MANAGER_CALLS],
)
async def test_bad_manager_calls(call: ManagerCall, error: type[Exception], name: str) -> None:
    async with ResourceManager() as manager:
        with manager.subscribe() as subscription:
            await manager.track_resource_usage("cpu", 10)
            with pytest.raises(error, match=name):
                await _invoke(call, manager)
            # Nothing was recorded or delivered for the rejected call; the manager still works.
            await manager.track_resource_usage("cpu", 20)
            assert [u.usage_percent for u in subscription.drain()] == [10.0, 20.0]
            assert manager.usage_statistics()["cpu"].count == 2
            assert manager.subscriber_count == 1
            manager.cache_metric("k", b"v")
            assert manager.get_cached_metric("k") == b"v"


async def _invoke(call: ManagerCall, manager: ResourceManager) -> None:
    result = call(manager)
    if isinstance(result, Awaitable):
        await result
