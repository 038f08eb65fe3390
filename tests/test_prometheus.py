"""darwin_metrics.prometheus: the collector against sources in known states, and register().

Every scrape here goes through prometheus_client's own text exposition and parser, as a
Prometheus server would read it. The HTTP server is in ``test_prometheus_server.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from _scrape import buckets, hand_buckets, label_names, parse, value, values
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from darwin_metrics import PoolTimeoutError
from darwin_metrics.prometheus import DarwinCollector, register
from darwin_metrics.resource import (
    Cache,
    Histogram,
    KeyedPoolDisposals,
    KeyedResourcePool,
    PoolDisposals,
    ResourceManager,
    ResourcePool,
)

pytestmark = pytest.mark.anyio

POOL_FAMILIES = {
    "darwin_pool_connections": ("gauge", {"pool", "state"}),
    "darwin_pool_max": ("gauge", {"pool"}),
    "darwin_pool_min_idle": ("gauge", {"pool"}),
    "darwin_pool_pending_requests": ("gauge", {"pool"}),
    "darwin_pool_timeouts": ("counter", {"pool"}),
    "darwin_pool_created": ("counter", {"pool"}),
    "darwin_pool_disposed": ("counter", {"pool", "reason"}),
    "darwin_pool_factory_errors": ("counter", {"pool"}),
    "darwin_pool_acquired": ("counter", {"pool"}),
    "darwin_pool_acquired_after_wait": ("counter", {"pool"}),
    "darwin_pool_waits_abandoned": ("counter", {"pool"}),
    "darwin_pool_wait_seconds": ("histogram", {"pool"}),
    "darwin_pool_use_seconds": ("histogram", {"pool"}),
    "darwin_pool_create_seconds": ("histogram", {"pool"}),
}
DB = "db_client_connection_pool_name"
DB_FAMILIES = {
    "db_client_connection_count": ("gauge", {DB, "db_client_connection_state"}),
    "db_client_connection_max": ("gauge", {DB}),
    "db_client_connection_idle_min": ("gauge", {DB}),
    "db_client_connection_pending_requests": ("gauge", {DB}),
    "db_client_connection_timeouts": ("counter", {DB}),
    "db_client_connection_wait_time_seconds": ("histogram", {DB}),
    "db_client_connection_use_time_seconds": ("histogram", {DB}),
    "db_client_connection_create_time_seconds": ("histogram", {DB}),
}
CACHE_FAMILIES = {
    "cache_gets": ("counter", {"cache", "result"}),
    "cache_puts": ("counter", {"cache"}),
    "cache_evictions": ("counter", {"cache", "cause"}),
    "cache_size": ("gauge", {"cache"}),
    "cache_max_size": ("gauge", {"cache"}),
    "cache_load": ("counter", {"cache", "result"}),
    "cache_load_duration_seconds": ("histogram", {"cache"}),
}
USAGE_FAMILIES = {
    "darwin_resource_utilization_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_utilization_peak_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_utilization_min_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_utilization_mean_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_samples": ("counter", {"manager", "resource_type"}),
    "darwin_subscription_missed": ("counter", {"manager"}),
    "darwin_subscriptions": ("gauge", {"manager"}),
}


def scrape(collector: DarwinCollector) -> dict[str, Metric]:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def check_shape(families: dict[str, Metric], expected: dict[str, tuple[str, set[str]]]) -> None:
    for name, (kind, labels) in expected.items():
        assert name in families, name
        assert families[name].type == kind, name
        assert label_names(families[name]) == {frozenset(labels)}, name


async def pool_in_a_known_state() -> tuple[ResourcePool[object], dict[str, list[float]]]:
    """A pool whose every duration is known (virtual time): what each histogram must hold."""

    async def factory() -> object:
        await anyio.sleep(0.02)
        return object()

    pool: ResourcePool[object] = ResourcePool(2, factory=factory)
    async with pool.lease():  # created in 20 ms
        await anyio.sleep(0.003)  # held 3 ms
    first = await pool.acquire()  # the idle one: held until the end
    second = await pool.acquire()  # created in 20 ms, held 2 s

    async def waiter() -> None:
        async with pool.lease():  # waits 2 s for the second, holds it 0.3 s
            await anyio.sleep(0.3)

    async with anyio.create_task_group() as group:
        group.start_soon(waiter)
        with pytest.raises(PoolTimeoutError):
            await pool.acquire(timeout=0.75)  # waits 0.75 s, then times out
        await anyio.sleep(1.25)
        assert first is not None
        assert second is not None
        await pool.release(second)
    await pool.discard(first)  # held 2.32 s (from 0.023 s, before the second was made)
    return pool, {
        "create": [0.02, 0.02],
        "use": [0.003, 2.0, 0.3, 2.32],
        "wait": [0.75, 2.0],
    }


class TestPools:
    async def test_every_series_matches_the_statistics(self) -> None:
        pool, durations = await pool_in_a_known_state()
        leased = await pool.acquire()  # one leased, none idle, at the scrape
        stats = pool.statistics()
        families = scrape(DarwinCollector(pools={"db": pool}))
        check_shape(families, POOL_FAMILIES)
        assert set(families) == set(POOL_FAMILIES)  # nothing else, no db_* names

        assert value(families["darwin_pool_connections"], pool="db", state="idle") == 0
        assert value(families["darwin_pool_connections"], pool="db", state="used") == 1
        assert stats.idle + stats.leased == stats.size == 1
        for family, number in {
            "darwin_pool_max": stats.max_size,
            "darwin_pool_min_idle": stats.min_idle,
            "darwin_pool_pending_requests": stats.waiting,
            "darwin_pool_timeouts": stats.timeouts,
            "darwin_pool_created": stats.created,
            "darwin_pool_factory_errors": stats.factory_errors,
            "darwin_pool_acquired": stats.acquired,
            "darwin_pool_acquired_after_wait": stats.acquired_after_wait,
            "darwin_pool_waits_abandoned": stats.waits_abandoned,
        }.items():
            assert value(families[family], pool="db") == number, family
        assert (stats.timeouts, stats.created, stats.acquired, stats.acquired_after_wait) == (
            1,
            2,
            5,
            1,
        )
        disposed = values(families["darwin_pool_disposed"])
        reasons = [field.name for field in attrs.fields(PoolDisposals)]
        assert "discarded" in reasons
        assert disposed == {
            (("pool", "db"), ("reason", reason)): (1.0 if reason == "discarded" else 0.0)
            for reason in reasons
        }

        for kind, family in (
            ("wait", "darwin_pool_wait_seconds"),
            ("use", "darwin_pool_use_seconds"),
            ("create", "darwin_pool_create_seconds"),
        ):
            assert buckets(families[family], pool="db") == hand_buckets(durations[kind]), kind
            histogram: Histogram = getattr(stats, f"{kind}_time")
            assert buckets(families[family], pool="db") == [
                (bound, float(count)) for bound, count in histogram.cumulative()
            ]
            count = value(families[family], family + "_count", pool="db")
            assert count == len(durations[kind])
            total = value(families[family], family + "_sum", pool="db")
            assert total == pytest.approx(sum(durations[kind]))
        assert leased is not None

    async def test_db_conventions(self) -> None:
        pool, durations = await pool_in_a_known_state()
        collector = DarwinCollector(pools={"db": pool}, conventions="db")
        assert collector.conventions == "db"
        families = scrape(collector)
        check_shape(families, DB_FAMILIES)
        own = {name: spec for name, spec in POOL_FAMILIES.items() if "_seconds" not in name}
        for name in ("connections", "max", "min_idle", "pending_requests", "timeouts"):
            del own[f"darwin_pool_{name}"]
        check_shape(families, own)  # the numbers OpenTelemetry has no name for, as ever
        assert set(families) == set(DB_FAMILIES) | set(own)
        stats = pool.statistics()
        count = families["db_client_connection_count"]
        assert value(count, **{DB: "db", "db_client_connection_state": "idle"}) == stats.idle
        assert value(count, **{DB: "db", "db_client_connection_state": "used"}) == 0
        assert value(families["db_client_connection_max"], **{DB: "db"}) == 2
        assert value(families["db_client_connection_timeouts"], **{DB: "db"}) == 1
        wait = families["db_client_connection_wait_time_seconds"]
        assert buckets(wait, **{DB: "db"}) == hand_buckets(durations["wait"])

    async def test_several_pools_and_a_waiting_task(self) -> None:
        busy: ResourcePool[object] = ResourcePool(1, factory=object)
        empty: ResourcePool[object] = ResourcePool(5, factory=object)
        async with anyio.create_task_group() as group, busy.lease():
            group.start_soon(busy.acquire)
            await anyio.wait_all_tasks_blocked()
            families = scrape(DarwinCollector(pools={"busy": busy, "empty": empty}))
            group.cancel_scope.cancel()
        pending = families["darwin_pool_pending_requests"]
        assert values(pending) == {(("pool", "busy"),): 1.0, (("pool", "empty"),): 0.0}
        assert value(families["darwin_pool_max"], pool="empty") == 5
        connections = families["darwin_pool_connections"]
        assert value(connections, pool="busy", state="used") == 1
        assert value(connections, pool="empty", state="idle") == 0

    async def test_a_keyed_pool_is_exported_as_one_pool(self) -> None:
        # Its totals over every key: max is max_total, the disposal reasons its own.
        async with KeyedResourcePool[str, object](
            2, 3, factory=lambda key: object(), min_idle=0
        ) as pool:
            async with pool.lease("a"), pool.lease("b"):
                await anyio.sleep(0.25)
            held = await pool.acquire("c")  # max_total reached: a's idle one is evicted
            async with anyio.create_task_group() as group:
                group.start_soon(pool.acquire, "c")  # c has one leased, one idle (b's) ...
                await anyio.wait_all_tasks_blocked()
                group.cancel_scope.cancel()
            await pool.drain()
            stats = pool.statistics()
            families = scrape(DarwinCollector(pools={"hosts": pool}))
            await pool.release(held)
        check_shape(families, POOL_FAMILIES)
        assert set(families) == set(POOL_FAMILIES)
        for family, number in {
            "darwin_pool_max": 3,
            "darwin_pool_min_idle": 0,
            "darwin_pool_pending_requests": stats.waiting,
            "darwin_pool_timeouts": stats.timeouts,
            "darwin_pool_created": stats.created,
            "darwin_pool_factory_errors": 0,
            "darwin_pool_acquired": stats.acquired,
            "darwin_pool_acquired_after_wait": stats.acquired_after_wait,
            "darwin_pool_waits_abandoned": stats.waits_abandoned,
        }.items():
            assert value(families[family], pool="hosts") == number, family
        assert stats.acquired >= 3
        connections = families["darwin_pool_connections"]
        assert value(connections, pool="hosts", state="idle") == stats.idle
        assert value(connections, pool="hosts", state="used") == stats.size - stats.idle >= 1
        disposed = values(families["darwin_pool_disposed"])
        reasons = [field.name for field in attrs.fields(KeyedPoolDisposals)]
        assert "evicted" in reasons
        assert "shrunk" not in reasons
        assert disposed == {
            (("pool", "hosts"), ("reason", reason)): float(getattr(stats.disposals, reason))
            for reason in reasons
        }
        assert stats.disposals.evicted >= 1
        assert stats.disposals.drained >= 1
        use = families["darwin_pool_use_seconds"]
        assert value(use, "darwin_pool_use_seconds_count", pool="hosts") == stats.use_time.count
        assert value(use, "darwin_pool_use_seconds_sum", pool="hosts") == pytest.approx(
            stats.use_time.sum
        )

    async def test_min_idle(self) -> None:
        async with ResourcePool(4, factory=object, min_idle=2) as pool:
            await anyio.sleep(0.1)  # prefilled by upkeep
            families = scrape(DarwinCollector(pools={"ready": pool}))
        assert value(families["darwin_pool_min_idle"], pool="ready") == 2
        assert value(families["darwin_pool_connections"], pool="ready", state="idle") == 2


class TestCaches:
    def test_every_series_matches_the_statistics(self) -> None:
        now = [0.0]
        small: Cache[str, int] = Cache(10, maxsize=2, clock=lambda: now[0])
        small.set("a", 1)
        small.set("b", 2)
        small.set("c", 3)  # evicts one (size)
        small.set("short", 4, ttl=1)  # evicts another
        now[0] = 5.0
        assert small.get("short") is None  # expired, and a miss
        assert small.get("c") == 3
        assert small.get("nothing") is None
        unbounded: Cache[str, int] = Cache(10)
        unbounded.set("x", 1)
        stats = small.statistics()
        assert (stats.hits, stats.misses, stats.sets, stats.evictions, stats.expirations) == (
            1,
            2,
            4,
            2,
            1,
        )
        families = scrape(DarwinCollector(caches={"small": small, "big": unbounded}))
        check_shape(families, CACHE_FAMILIES)
        assert set(families) == set(CACHE_FAMILIES)
        assert value(families["cache_gets"], cache="small", result="hit") == stats.hits
        assert value(families["cache_gets"], cache="small", result="miss") == stats.misses
        assert value(families["cache_puts"], cache="small") == stats.sets
        evictions = families["cache_evictions"]
        assert value(evictions, cache="small", cause="size") == stats.evictions
        assert value(evictions, cache="small", cause="expired") == stats.expirations
        assert value(families["cache_size"], cache="small") == stats.size == len(small)
        assert value(families["cache_size"], cache="big") == 1
        # Only a bounded cache has a bound.
        assert values(families["cache_max_size"]) == {(("cache", "small"),): 2.0}

    def test_loads_and_their_durations(self) -> None:
        now = [0.0]
        cache: Cache[str, int] = Cache(60, clock=lambda: now[0])

        def load(seconds: float, fail: bool = False) -> Callable[[], int]:
            def make() -> int:
                now[0] += seconds  # the load takes this long on the cache's clock
                if fail:
                    raise LookupError("no answer")
                return 1

            return make

        cache.get_or_set("a", load(0.003))
        cache.get_or_set("b", load(0.2))
        with pytest.raises(LookupError):
            cache.get_or_set("c", load(12.0, fail=True))
        assert cache.get_or_set("a", load(5.0)) == 1  # a hit: no load
        stats = cache.statistics()
        assert (stats.loads, stats.load_failures) == (2, 1)
        families = scrape(DarwinCollector(caches={"answers": cache}))
        assert values(families["cache_load"]) == {
            (("cache", "answers"), ("result", "success")): 2.0,
            (("cache", "answers"), ("result", "failure")): 1.0,
        }
        durations = families["cache_load_duration_seconds"]
        assert buckets(durations, cache="answers") == hand_buckets([0.003, 0.2, 12.0])
        assert value(durations, "cache_load_duration_seconds_count", cache="answers") == 3
        total = value(durations, "cache_load_duration_seconds_sum", cache="answers")
        assert total == pytest.approx(12.203)


class TestManagers:
    async def test_every_series_matches_the_statistics(self) -> None:
        async with ResourceManager() as manager:
            slow = manager.subscribe(buffer_size=1)
            for usage in (50.0, 70.0, 60.0):
                await manager.track_resource_usage("cpu", usage)
            await manager.track_resource_usage("disk:/", 12.5)
            stats = manager.usage_statistics()
            families = scrape(DarwinCollector(managers={"app": manager}))
            slow.close()
        check_shape(families, USAGE_FAMILIES)
        assert set(families) == set(USAGE_FAMILIES)
        cpu = {"manager": "app", "resource_type": "cpu"}
        assert value(families["darwin_resource_utilization_ratio"], **cpu) == 0.6
        assert value(families["darwin_resource_utilization_peak_ratio"], **cpu) == 0.7
        assert value(families["darwin_resource_utilization_min_ratio"], **cpu) == 0.5
        mean = value(families["darwin_resource_utilization_mean_ratio"], **cpu)
        assert mean == pytest.approx(stats["cpu"].mean / 100)
        assert value(families["darwin_resource_samples"], **cpu) == 3
        disk = {"manager": "app", "resource_type": "disk:/"}
        assert value(families["darwin_resource_utilization_ratio"], **disk) == 0.125
        # The subscriber buffered one of four and missed three.
        assert value(families["darwin_subscription_missed"], manager="app") == 3
        assert manager.missed_events == 3
        assert value(families["darwin_subscriptions"], manager="app") == 1

    async def test_forgotten_types_leave_the_scrape(self) -> None:
        manager = ResourceManager()
        collector = DarwinCollector(managers={"app": manager})
        await manager.track_resource_usage("disk:/mnt", 40)
        assert values(scrape(collector)["darwin_resource_samples"])
        assert manager.forget("disk:/mnt")
        families = scrape(collector)
        assert "darwin_resource_samples" not in families  # no sample: no family
        assert value(families["darwin_subscriptions"], manager="app") == 0


class TestCollector:
    async def test_all_kinds_together_and_describe(self) -> None:
        pool: ResourcePool[object] = ResourcePool(1, factory=object)
        collector = DarwinCollector(
            pools={"db": pool}, caches={"c": Cache(1)}, managers={"m": ResourceManager()}
        )
        described = {family.name for family in collector.describe()}
        assert described == set(POOL_FAMILIES) | set(CACHE_FAMILIES) | set(USAGE_FAMILIES)
        assert all(not family.samples for family in collector.describe())
        # A manager that tracked nothing still has its per-manager series.
        families = scrape(collector)
        assert set(families) <= described
        assert value(families["darwin_subscriptions"], manager="m") == 0
        db = {family.name for family in DarwinCollector(conventions="db").describe()}
        assert set(DB_FAMILIES) <= db
        assert not db & {"darwin_pool_connections", "darwin_pool_wait_seconds"}

    def test_nothing_to_export_exports_nothing(self) -> None:
        assert scrape(DarwinCollector()) == {}

    async def test_add_and_remove(self) -> None:
        collector = DarwinCollector()
        pool: ResourcePool[object] = ResourcePool(3, factory=object)
        collector.add_pool("db", pool)
        collector.add_cache("db", Cache(1))  # names are per kind
        collector.add_manager("db", ResourceManager())
        assert set(collector.pools) == set(collector.caches) == set(collector.managers) == {"db"}
        assert value(scrape(collector)["darwin_pool_max"], pool="db") == 3
        assert collector.remove_pool("db")
        assert not collector.remove_pool("db")
        assert not collector.remove_pool("")
        with pytest.raises(TypeError, match="a pool's name must be a str"):
            collector.remove_pool(None)  # type: ignore[arg-type]
        assert collector.remove_cache("db")
        assert collector.remove_manager("db")
        assert scrape(collector) == {}

    @pytest.mark.parametrize(
        ("call", "error", "message"),
        [
            (lambda c: c.add_pool(1, ResourcePool(1)), TypeError, "a pool's name must be a str"),
            (lambda c: c.add_pool("", ResourcePool(1)), ValueError, "must not be empty"),
            (
                lambda c: c.add_pool("p", Cache(1)),
                TypeError,
                "must be a ResourcePool or a KeyedResourcePool",
            ),
            (lambda c: c.add_cache("c", ResourcePool(1)), TypeError, "must be a Cache"),
            (lambda c: c.add_manager("m", None), TypeError, "must be a ResourceManager"),
            (lambda c: c.add_pool("taken", ResourcePool(1)), ValueError, "already exported"),
        ],
    )
    def test_bad_sources(self, call: Any, error: type[Exception], message: str) -> None:
        taken: ResourcePool[object] = ResourcePool(2)
        collector = DarwinCollector(pools={"taken": taken})
        with pytest.raises(error, match=message):
            call(collector)
        assert dict(collector.pools) == {"taken": taken}  # unchanged
        assert not collector.caches
        assert not collector.managers

    @pytest.mark.parametrize(
        ("arguments", "error", "message"),
        [
            ({"pools": [("db", ResourcePool(1))]}, TypeError, "pools must be a mapping"),
            ({"caches": {"": Cache(1)}}, ValueError, "must not be empty"),
            ({"managers": {"m": "manager"}}, TypeError, "must be a ResourceManager"),
            ({"conventions": "otel"}, ValueError, "conventions must be one of"),
            ({"conventions": None}, TypeError, "conventions must be a str"),
        ],
    )
    def test_bad_arguments(self, arguments: Any, error: type[Exception], message: str) -> None:
        with pytest.raises(error, match=message):
            DarwinCollector(**arguments)

    def test_names_are_escaped(self) -> None:
        odd = 'db "primary"\nwith a \\ and ü'
        families = scrape(DarwinCollector(pools={odd: ResourcePool(1)}))
        assert value(families["darwin_pool_max"], pool=odd) == 1

    def test_sources_change_while_another_thread_scrapes(self) -> None:
        collector = DarwinCollector()
        registry = CollectorRegistry()
        registry.register(collector)
        stop = threading.Event()
        errors: list[BaseException] = []

        def scraper() -> None:
            try:
                while not stop.is_set():
                    parse(generate_latest(registry).decode())
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            for round_ in range(300):
                collector.add_cache(f"c{round_}", Cache(1))
                if round_ % 2:
                    collector.remove_cache(f"c{round_ - 1}")
        finally:
            stop.set()
            thread.join()
        assert errors == []
        assert len(collector.caches) == 150


class TestRegister:
    def test_register_with_a_registry(self) -> None:
        registry = CollectorRegistry()
        collector = register(registry, caches={"c": Cache(1)})
        assert value(parse(generate_latest(registry).decode())["cache_size"], cache="c") == 0
        # One collector per registry: a second clashes by name, as prometheus_client says.
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            register(registry)
        registry.unregister(collector)
        register(registry, conventions="db")

    def test_register_with_the_default_registry(self) -> None:
        from prometheus_client import REGISTRY

        collector = register(pools={"default-test": ResourcePool(7)})
        try:
            assert REGISTRY.get_sample_value("darwin_pool_max", {"pool": "default-test"}) == 7
        finally:
            REGISTRY.unregister(collector)

    def test_importing_the_module_does_not_import_prometheus_client(self) -> None:
        import subprocess
        import sys

        code = (
            "import sys, darwin_metrics.prometheus, darwin_metrics.otel; "
            "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported'; "
            "assert 'opentelemetry' not in sys.modules, 'opentelemetry imported'"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    def test_without_prometheus_client_it_says_what_to_install(self, tmp_path: Path) -> None:
        import subprocess
        import sys

        run_without = Path(__file__).resolve().parent / "run_without.py"
        code = (
            "from darwin_metrics.prometheus import DarwinCollector\n"
            "try:\n    DarwinCollector()\n"
            "except ModuleNotFoundError as error:\n    print(error)\n"
        )
        script = tmp_path / "no_prometheus.py"
        script.write_text(code, encoding="utf-8")
        completed = subprocess.run(
            [sys.executable, str(run_without), "prometheus_client", str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert 'pip install "darwin-metrics[prometheus]"' in completed.stdout
