"""darwin_metrics.otel: the instruments against sources in known states, read by the SDK.

The OpenTelemetry SDK's in-memory reader collects what the instruments report, as an
exporter would; the histograms are fed through the pools' ``on_timing`` listener.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import attrs
import pytest
from _scrape import hand_buckets
from opentelemetry.metrics import NoOpMeter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)

from darwin_metrics import PoolTimeoutError
from darwin_metrics._histogram import DEFAULT_BUCKETS
from darwin_metrics.otel import DarwinInstruments, instrument, pool_timing_listener
from darwin_metrics.resource import (
    Cache,
    KeyedPoolDisposals,
    KeyedResourcePool,
    PoolDisposals,
    ResourceManager,
    ResourcePool,
)

pytestmark = pytest.mark.anyio
NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


class Collected:
    """What one collection of the reader holds, by instrument name."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        data = reader.get_metrics_data()
        self.metrics: dict[str, Metric] = {}
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    assert metric.name not in self.metrics, metric.name
                    self.metrics[metric.name] = metric

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
        metric = self.metrics[name]
        found = {}
        for point in metric.data.data_points:
            key = frozenset((point.attributes or {}).items())
            assert key not in found
            found[key] = point
        return found

    def value(self, name: str, **attributes: str) -> float:
        point = self.points(name)[frozenset(attributes.items())]
        assert isinstance(point, NumberDataPoint)
        return point.value

    def kind(self, name: str) -> str:
        data = self.metrics[name].data
        if isinstance(data, Gauge):
            return "gauge"
        if isinstance(data, Sum):
            return "counter" if data.is_monotonic else "updown"
        return "histogram"


def provider_and_reader() -> tuple[MeterProvider, InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    return MeterProvider(metric_readers=[reader]), reader


@pytest.fixture
def sdk() -> Iterator[tuple[Any, InMemoryMetricReader]]:
    provider, reader = provider_and_reader()
    yield provider.get_meter("darwin-metrics-tests"), reader
    provider.shutdown()


POOL_INSTRUMENTS = {
    "db.client.connection.count": ("updown", "{connection}"),
    "db.client.connection.max": ("updown", "{connection}"),
    "db.client.connection.idle.min": ("updown", "{connection}"),
    "db.client.connection.pending_requests": ("updown", "{request}"),
    "db.client.connection.timeouts": ("counter", "{timeout}"),
    "darwin.pool.created": ("counter", "{resource}"),
    "darwin.pool.disposed": ("counter", "{resource}"),
    "darwin.pool.factory_errors": ("counter", "{error}"),
    "darwin.pool.acquired": ("counter", "{acquisition}"),
    "darwin.pool.acquired_after_wait": ("counter", "{acquisition}"),
    "darwin.pool.waits_abandoned": ("counter", "{wait}"),
}
TIMINGS = {
    "wait": "db.client.connection.wait_time",
    "use": "db.client.connection.use_time",
    "create": "db.client.connection.create_time",
}


class TestPools:
    async def test_observable_instruments_match_the_statistics(
        self, sdk: tuple[Any, InMemoryMetricReader]
    ) -> None:
        meter, reader = sdk
        pool: ResourcePool[object] = ResourcePool(3, factory=object)
        other: ResourcePool[object] = ResourcePool(1, factory=object)
        instrument(meter, pools={"db": pool, "jobs": other})
        leased = await pool.acquire()
        async with pool.lease():
            pass
        await pool.discard(await pool.acquire())
        async with other.lease():
            with pytest.raises(PoolTimeoutError):
                await other.acquire(timeout=0.5)
            stats = pool.statistics()
            collected = Collected(reader)
        for name, (kind, unit) in POOL_INSTRUMENTS.items():
            assert collected.kind(name) == kind, name
            assert collected.metrics[name].unit == unit, name
        assert collected.value("db.client.connection.count", **{NAME: "db", STATE: "idle"}) == 0
        assert collected.value("db.client.connection.count", **{NAME: "db", STATE: "used"}) == 1
        assert stats.idle == 0
        assert stats.leased == 1
        used = {NAME: "jobs", STATE: "used"}
        assert collected.value("db.client.connection.count", **used) == 1
        db = {NAME: "db"}
        assert collected.value("db.client.connection.max", **db) == stats.max_size == 3
        assert collected.value("db.client.connection.idle.min", **db) == 0
        assert collected.value("db.client.connection.pending_requests", **db) == 0
        assert collected.value("db.client.connection.timeouts", **db) == 0
        assert collected.value("db.client.connection.timeouts", **{NAME: "jobs"}) == 1
        assert collected.value("darwin.pool.created", **db) == stats.created == 2
        assert collected.value("darwin.pool.acquired", **db) == stats.acquired == 3
        assert collected.value("darwin.pool.waits_abandoned", **{NAME: "jobs"}) == 1
        disposed = collected.points("darwin.pool.disposed")
        assert len(disposed) == 2 * len(attrs.fields(PoolDisposals))  # every reason, two pools
        reason = "darwin.pool.disposal.reason"
        assert collected.value("darwin.pool.disposed", **db, **{reason: "discarded"}) == 1
        assert collected.value("darwin.pool.disposed", **db, **{reason: "closed"}) == 0
        # No histogram without a timing listener.
        assert not set(TIMINGS.values()) & set(collected.metrics)
        assert leased is not None

    async def test_a_keyed_pool_is_one_pool(self, sdk: tuple[Any, InMemoryMetricReader]) -> None:
        # Its totals over every key: max is max_total, the disposal reasons its own.
        meter, reader = sdk
        async with KeyedResourcePool[str, object](2, 3, factory=lambda key: object()) as pool:
            instrument(meter, pools={"hosts": pool})
            async with pool.lease("a"), pool.lease("b"):
                pass
            held = await pool.acquire("c")
            await pool.acquire("c")  # max_total reached: a's idle resource is evicted
            stats = pool.statistics()
            collected = Collected(reader)
            await pool.release(held)
        hosts = {NAME: "hosts"}
        assert collected.value("db.client.connection.max", **hosts) == stats.max_total == 3
        count = "db.client.connection.count"
        assert collected.value(count, **hosts, **{STATE: "idle"}) == stats.idle == 1
        assert collected.value(count, **hosts, **{STATE: "used"}) == 2
        assert collected.value("darwin.pool.acquired", **hosts) == stats.acquired == 4
        assert collected.value("darwin.pool.created", **hosts) == stats.created == 4
        reason = "darwin.pool.disposal.reason"
        reasons = [field.name for field in attrs.fields(KeyedPoolDisposals)]
        assert len(collected.points("darwin.pool.disposed")) == len(reasons)
        assert collected.value("darwin.pool.disposed", **hosts, **{reason: "evicted"}) == 1
        assert stats.disposals.evicted == 1

    async def test_a_pending_request(self, sdk: tuple[Any, InMemoryMetricReader]) -> None:
        meter, reader = sdk
        pool: ResourcePool[object] = ResourcePool(1, factory=object)
        instrument(meter, pools={"db": pool})
        async with anyio.create_task_group() as group, pool.lease():
            group.start_soon(pool.acquire)
            await anyio.wait_all_tasks_blocked()
            pending = Collected(reader).value(
                "db.client.connection.pending_requests", **{NAME: "db"}
            )
            group.cancel_scope.cancel()
        assert pending == 1

    async def test_timing_histograms_have_hand_computed_buckets(
        self, sdk: tuple[Any, InMemoryMetricReader]
    ) -> None:
        meter, reader = sdk

        async def factory() -> object:
            await anyio.sleep(0.004)
            return object()

        pool: ResourcePool[object] = ResourcePool(
            1, factory=factory, on_timing=pool_timing_listener(meter, "db")
        )

        async def waiter() -> None:
            async with pool.lease():
                await anyio.sleep(0.07)

        async with anyio.create_task_group() as group, pool.lease():  # created in 4 ms
            group.start_soon(waiter)  # waits 1.2 s
            await anyio.sleep(1.2)  # held 1.2 s
        async with pool.lease():
            await anyio.sleep(30)  # past the last bound
        durations = {"create": [0.004], "use": [1.2, 0.07, 30.0], "wait": [1.2]}
        collected = Collected(reader)
        stats = pool.statistics()
        for kind, name in TIMINGS.items():
            assert collected.kind(name) == "histogram"
            assert collected.metrics[name].unit == "s"
            (point,) = collected.points(name).values()
            assert isinstance(point, HistogramDataPoint)
            assert dict(point.attributes or {}) == {NAME: "db"}
            assert tuple(point.explicit_bounds) == DEFAULT_BUCKETS
            assert point.count == len(durations[kind])
            assert point.sum == pytest.approx(sum(durations[kind]))
            cumulative = []
            running = 0
            for bound, count in zip(
                (*DEFAULT_BUCKETS, math.inf), point.bucket_counts, strict=True
            ):
                running += count
                cumulative.append((bound, float(running)))
            assert cumulative == hand_buckets(durations[kind]), kind
            # The same counts as the pool's own histogram.
            own = getattr(stats, f"{kind}_time")
            assert tuple(point.bucket_counts) == own.counts

    async def test_a_listener_per_pool(self, sdk: tuple[Any, InMemoryMetricReader]) -> None:
        meter, reader = sdk
        first: ResourcePool[object] = ResourcePool(
            1, factory=object, on_timing=pool_timing_listener(meter, "first")
        )
        second: ResourcePool[object] = ResourcePool(
            1, factory=object, on_timing=instrument(meter).timing_listener("second")
        )
        for pool, leases in ((first, 2), (second, 3)):
            for _ in range(leases):
                async with pool.lease():
                    pass
        points = Collected(reader).points("db.client.connection.use_time")
        counts = {dict(key)[NAME]: point.count for key, point in points.items()}
        assert counts == {"first": 2, "second": 3}

    def test_bad_listener_names(self, sdk: tuple[Any, InMemoryMetricReader]) -> None:
        meter, _ = sdk
        with pytest.raises(TypeError, match="pool_name must be a str"):
            pool_timing_listener(meter, None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="pool_name must not be empty"):
            pool_timing_listener(meter, "")


class TestCaches:
    def test_observable_instruments_match_the_statistics(
        self, sdk: tuple[Any, InMemoryMetricReader]
    ) -> None:
        meter, reader = sdk
        now = [0.0]
        small: Cache[str, int] = Cache(10, maxsize=1, clock=lambda: now[0])
        small.set("a", 1)
        small.set("b", 2, ttl=1)  # evicts a
        now[0] = 2.0
        assert small.get("b") is None  # expired
        assert small.get("a") is None
        small.set("c", 3)
        assert small.get("c") == 3
        with pytest.raises(LookupError):
            small.get_or_set("d", lambda: {}["d"])  # a load that fails
        big: Cache[str, int] = Cache(10)
        instrument(meter, caches={"small": small, "big": big})
        stats = small.statistics()
        collected = Collected(reader)
        kinds = {
            "cache.gets": "counter",
            "cache.puts": "counter",
            "cache.evictions": "counter",
            "cache.size": "updown",
            "cache.max_size": "updown",
            "cache.loads": "counter",
        }
        for name, kind in kinds.items():
            assert collected.kind(name) == kind, name
        assert collected.value("cache.gets", cache="small", result="hit") == stats.hits == 1
        assert collected.value("cache.gets", cache="small", result="miss") == stats.misses == 3
        assert collected.value("cache.puts", cache="small") == stats.sets == 3
        assert collected.value("cache.evictions", cache="small", cause="size") == 1
        assert collected.value("cache.evictions", cache="small", cause="expired") == 1
        assert collected.value("cache.size", cache="small") == 1
        assert collected.value("cache.size", cache="big") == 0
        assert set(collected.points("cache.max_size")) == {frozenset({("cache", "small")})}
        assert collected.value("cache.loads", cache="small", result="success") == stats.loads
        assert collected.value("cache.loads", cache="small", result="failure") == 1


class TestManagers:
    async def test_observable_instruments_match_the_statistics(
        self, sdk: tuple[Any, InMemoryMetricReader]
    ) -> None:
        meter, reader = sdk
        async with ResourceManager() as manager:
            lagging = manager.subscribe(buffer_size=1)
            instrument(meter, managers={"app": manager})
            for usage in (20.0, 80.0, 50.0):
                await manager.track_resource_usage("memory", usage)
            collected = Collected(reader)
            lagging.close()
        memory = {"darwin.manager.name": "app", "darwin.resource.type": "memory"}
        assert collected.kind("darwin.resource.utilization") == "gauge"
        assert collected.metrics["darwin.resource.utilization"].unit == "1"
        assert collected.value("darwin.resource.utilization", **memory) == 0.5
        assert collected.value("darwin.resource.utilization.peak", **memory) == 0.8
        assert collected.value("darwin.resource.utilization.min", **memory) == 0.2
        assert collected.value("darwin.resource.utilization.mean", **memory) == pytest.approx(0.5)
        assert collected.kind("darwin.resource.samples") == "counter"
        assert collected.value("darwin.resource.samples", **memory) == 3
        per_manager = {"darwin.manager.name": "app"}
        assert collected.value("darwin.subscription.missed", **per_manager) == 2
        assert collected.value("darwin.subscriptions", **per_manager) == 1


class TestInstrument:
    def test_one_set_per_meter(self, sdk: tuple[Any, InMemoryMetricReader]) -> None:
        meter, reader = sdk
        first = instrument(meter, caches={"a": Cache(1)})
        second = instrument(meter, caches={"b": Cache(1)})
        assert first is second
        assert set(first.caches) == {"a", "b"}
        assert first.meter is meter
        assert repr(first).endswith(": 0 pools, 2 caches, 0 managers>")
        with pytest.raises(ValueError, match="already has darwin-metrics instruments"):
            DarwinInstruments(meter)
        with pytest.raises(ValueError, match="a cache named 'a' is already exported"):
            instrument(meter, caches={"c": Cache(1), "a": Cache(1)})
        assert set(first.caches) == {"a", "b"}  # nothing added
        points = Collected(reader).points("cache.size")
        assert {dict(key)["cache"] for key in points} == {"a", "b"}

    def test_another_meter_another_set(self) -> None:
        provider, reader = provider_and_reader()
        try:
            one = instrument(provider.get_meter("one"), caches={"c": Cache(1)})
            two = instrument(provider.get_meter("two"), caches={"c": Cache(1)})
            assert one is not two
            scopes = reader.get_metrics_data().resource_metrics[0].scope_metrics
            assert {scope.scope.name for scope in scopes} == {"one", "two"}
        finally:
            provider.shutdown()

    def test_remove(self, sdk: tuple[Any, InMemoryMetricReader]) -> None:
        meter, reader = sdk
        instruments = instrument(meter, caches={"gone": Cache(1), "kept": Cache(1)})
        assert instruments.remove_cache("gone")
        points = Collected(reader).points("cache.size")
        assert {dict(key)["cache"] for key in points} == {"kept"}

    def test_the_api_alone(self) -> None:
        # Without an SDK, the API's no-op meter takes the instruments and does nothing.
        meter = NoOpMeter("no-sdk")
        listener = pool_timing_listener(meter, "db")
        listener("use", 0.1)
        instrument(meter, pools={"db": ResourcePool(1)})

    def test_the_instruments_do_not_keep_their_meter_alive(self) -> None:
        meter = NoOpMeter("short-lived")
        instruments = instrument(meter, caches={"c": Cache(1)})
        assert instruments.meter is meter
        gone = weakref.ref(meter)
        del meter, instruments
        gc.collect()
        assert gone() is None

    @pytest.mark.parametrize(
        ("arguments", "error", "message"),
        [
            ({"pools": {"": ResourcePool(1)}}, ValueError, "must not be empty"),
            ({"caches": {"c": ResourcePool(1)}}, TypeError, "must be a Cache"),
            ({"managers": ["m"]}, TypeError, "managers must be a mapping"),
        ],
    )
    def test_bad_sources(
        self,
        sdk: tuple[Any, InMemoryMetricReader],
        arguments: dict[str, Any],
        error: type[Exception],
        message: str,
    ) -> None:
        meter, _ = sdk
        with pytest.raises(error, match=message):
            instrument(meter, **arguments)
        instruments = instrument(meter)  # a bad first call left nothing behind
        with pytest.raises(error, match=message):
            instrument(meter, **arguments)
        assert not instruments.pools
        assert not instruments.caches
        assert not instruments.managers

    def test_not_a_meter(self) -> None:
        with pytest.raises(TypeError, match="meter must be an OpenTelemetry Meter"):
            instrument("meter")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="meter must be an OpenTelemetry Meter"):
            pool_timing_listener(object(), "db")  # type: ignore[arg-type]
