"""DarwinCollector: a prometheus_client collector that reads the snapshots at scrape time.

Nothing is kept up to date between scrapes: :meth:`DarwinCollector.collect` takes each
source's ``statistics()`` snapshot and builds the metric families from it, so exporting costs
nothing while the pools, caches and managers work. prometheus_client is imported when a
collector is made, never by the core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from .._cache import Cache
from .._export import (
    Sources,
    cache_evictions,
    pool_connections,
    pool_disposals,
    pool_max,
)
from .._histogram import Histogram
from .._manager import ResourceManager
from .._pool import KeyedResourcePool, ResourcePool

if TYPE_CHECKING:
    from prometheus_client.metrics_core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "Conventions",
    "DarwinCollector",
    "import_prometheus_client",
    "register",
]

Conventions = Literal["darwin", "db"]
"""The names of the pool series: ``"darwin"`` (``darwin_pool_*``) or ``"db"``
(OpenTelemetry's ``db_client_connection_*``, as its Prometheus exporter spells them)."""

_CONVENTIONS: Final = ("darwin", "db")

Spec = tuple[str, str, str, tuple[str, ...]]
"""A family: its type (``counter``, ``gauge``, ``histogram``), name, help text and labels."""
_INSTALL = 'pip install "darwin-metrics[prometheus]"'


def import_prometheus_client() -> Any:
    """Import prometheus_client, or raise ModuleNotFoundError saying what to install."""
    try:
        import prometheus_client
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"darwin_metrics.prometheus needs prometheus-client: {_INSTALL}",
            name="prometheus_client",
        ) from exc
    return prometheus_client


class _Buckets:
    """The ``le`` label values of a histogram's buckets, formatted once per set of bounds."""

    def __init__(self) -> None:
        self._labels: dict[tuple[float, ...], tuple[str, ...]] = {}

    def pairs(self, histogram: Histogram) -> list[tuple[str, float]]:
        labels = self._labels.get(histogram.bounds)
        if labels is None:
            from prometheus_client import utils

            # Formatted as prometheus_client's own histograms format their bounds.
            go_string = cast(Callable[[float], str], utils.floatToGoString)
            labels = tuple(go_string(bound) for bound in (*histogram.bounds, math.inf))
            self._labels[histogram.bounds] = labels
        pairs: list[tuple[str, float]] = []
        running = 0
        for label, count in zip(labels, histogram.counts, strict=True):
            running += count
            pairs.append((label, running))
        return pairs


# ---------------------------------------------------------------------- the families
#
# Each tuple: (type, name, help, labels). Counters are named without ``_total``, which
# prometheus_client appends to their samples.

_POOL_DARWIN: Final[dict[str, Spec]] = {
    "connections": (
        "gauge",
        "darwin_pool_connections",
        "Resources the pool owns, by state: idle, or used (leased, or being checked or reset).",
        ("pool", "state"),
    ),
    "max": ("gauge", "darwin_pool_max", "The most resources the pool may own.", ("pool",)),
    "min_idle": (
        "gauge",
        "darwin_pool_min_idle",
        "Idle resources that the pool keeps ready.",
        ("pool",),
    ),
    "pending": (
        "gauge",
        "darwin_pool_pending_requests",
        "Tasks waiting for a resource.",
        ("pool",),
    ),
    "timeouts": (
        "counter",
        "darwin_pool_timeouts",
        "Acquisitions that timed out waiting for a resource.",
        ("pool",),
    ),
    "wait": (
        "histogram",
        "darwin_pool_wait_seconds",
        "How long acquisitions that had to wait waited, in seconds.",
        ("pool",),
    ),
    "use": (
        "histogram",
        "darwin_pool_use_seconds",
        "How long resources were held, from acquisition to return, in seconds.",
        ("pool",),
    ),
    "create": (
        "histogram",
        "darwin_pool_create_seconds",
        "How long the factory took to make a resource, in seconds.",
        ("pool",),
    ),
}

# OpenTelemetry's semantic conventions for connection pools, through its Prometheus exporter:
# dots become underscores, counters get ``_total``, seconds ``_seconds``.
_DB_POOL: Final = "db_client_connection_pool_name"
_POOL_DB: Final[dict[str, Spec]] = {
    "connections": (
        "gauge",
        "db_client_connection_count",
        "The number of connections that are currently in the state described by the state "
        "attribute.",
        (_DB_POOL, "db_client_connection_state"),
    ),
    "max": (
        "gauge",
        "db_client_connection_max",
        "The maximum number of open connections allowed.",
        (_DB_POOL,),
    ),
    "min_idle": (
        "gauge",
        "db_client_connection_idle_min",
        "The minimum number of idle open connections allowed.",
        (_DB_POOL,),
    ),
    "pending": (
        "gauge",
        "db_client_connection_pending_requests",
        "The number of current pending requests for an open connection.",
        (_DB_POOL,),
    ),
    "timeouts": (
        "counter",
        "db_client_connection_timeouts",
        "The number of connection timeouts that have occurred trying to obtain a connection "
        "from the pool.",
        (_DB_POOL,),
    ),
    "wait": (
        "histogram",
        "db_client_connection_wait_time_seconds",
        "The time it took to obtain an open connection from the pool.",
        (_DB_POOL,),
    ),
    "use": (
        "histogram",
        "db_client_connection_use_time_seconds",
        "The time between borrowing a connection and returning it to the pool.",
        (_DB_POOL,),
    ),
    "create": (
        "histogram",
        "db_client_connection_create_time_seconds",
        "The time it took to create a new connection.",
        (_DB_POOL,),
    ),
}

# The pool's own numbers that OpenTelemetry has no name for: the same under either convention.
_POOL_OWN: Final[dict[str, Spec]] = {
    "created": (
        "counter",
        "darwin_pool_created",
        "Resources the pool took ownership of: made by the factory or added by hand.",
        ("pool",),
    ),
    "disposed": (
        "counter",
        "darwin_pool_disposed",
        "Resources that left the pool, by reason.",
        ("pool", "reason"),
    ),
    "factory_errors": (
        "counter",
        "darwin_pool_factory_errors",
        "Calls of the factory that raised.",
        ("pool",),
    ),
    "acquired": (
        "counter",
        "darwin_pool_acquired",
        "Successful acquisitions.",
        ("pool",),
    ),
    "acquired_after_wait": (
        "counter",
        "darwin_pool_acquired_after_wait",
        "Successful acquisitions that had to wait for another task's resource first.",
        ("pool",),
    ),
    "waits_abandoned": (
        "counter",
        "darwin_pool_waits_abandoned",
        "Waits for a resource that ended without one: cancelled, or timed out.",
        ("pool",),
    ),
}

# Micrometer's cache names (what Caffeine users' dashboards expect), label ``cache``.
_CACHE: Final[dict[str, Spec]] = {
    "gets": (
        "counter",
        "cache_gets",
        "Lookups, by result: hit (a live entry was found) or miss.",
        ("cache", "result"),
    ),
    "puts": ("counter", "cache_puts", "Entries stored (replacements included).", ("cache",)),
    "evictions": (
        "counter",
        "cache_evictions",
        "Entries that left the cache by themselves, by cause: size (evicted to respect the "
        "size bound) or expired.",
        ("cache", "cause"),
    ),
    "size": (
        "gauge",
        "cache_size",
        "Entries held now, including expired ones not dropped yet.",
        ("cache",),
    ),
    "max_size": (
        "gauge",
        "cache_max_size",
        "The size bound (absent for a cache without one).",
        ("cache",),
    ),
    "loads": (
        "counter",
        "cache_load",
        "Loader calls, by result: success (returned a value) or failure (raised).",
        ("cache", "result"),
    ),
    "load_time": (
        "histogram",
        "cache_load_duration_seconds",
        "How long each load and refresh took, in seconds, whether it returned or raised.",
        ("cache",),
    ),
}

_USAGE: Final[dict[str, Spec]] = {
    "current": (
        "gauge",
        "darwin_resource_utilization_ratio",
        "The latest usage tracked for the resource type, as a ratio (1 is 100%).",
        ("manager", "resource_type"),
    ),
    "peak": (
        "gauge",
        "darwin_resource_utilization_peak_ratio",
        "The highest usage tracked for the resource type, as a ratio.",
        ("manager", "resource_type"),
    ),
    "min": (
        "gauge",
        "darwin_resource_utilization_min_ratio",
        "The lowest usage tracked for the resource type, as a ratio.",
        ("manager", "resource_type"),
    ),
    "mean": (
        "gauge",
        "darwin_resource_utilization_mean_ratio",
        "The mean of the usages tracked for the resource type, as a ratio.",
        ("manager", "resource_type"),
    ),
    "samples": (
        "counter",
        "darwin_resource_samples",
        "Usages tracked for the resource type.",
        ("manager", "resource_type"),
    ),
    "missed": (
        "counter",
        "darwin_subscription_missed",
        "Events dropped for subscribers whose buffer was full, all subscriptions together.",
        ("manager",),
    ),
    "subscriptions": (
        "gauge",
        "darwin_subscriptions",
        "Subscriptions that receive the usages tracked now.",
        ("manager",),
    ),
}

_UNITS: Final = ("seconds", "ratio", "bytes")


def _unit(name: str) -> str:
    return next((unit for unit in _UNITS if name.endswith("_" + unit)), "")


def _counter(spec: Spec) -> CounterMetricFamily:
    from prometheus_client.metrics_core import CounterMetricFamily

    kind, name, documentation, labels = spec
    assert kind == "counter", spec
    return CounterMetricFamily(name, documentation, labels=labels, unit=_unit(name))


def _gauge(spec: Spec) -> GaugeMetricFamily:
    from prometheus_client.metrics_core import GaugeMetricFamily

    kind, name, documentation, labels = spec
    assert kind == "gauge", spec
    return GaugeMetricFamily(name, documentation, labels=labels, unit=_unit(name))


def _histogram(spec: Spec) -> HistogramMetricFamily:
    from prometheus_client.metrics_core import HistogramMetricFamily

    kind, name, documentation, labels = spec
    assert kind == "histogram", spec
    return HistogramMetricFamily(name, documentation, labels=labels, unit=_unit(name))


_BUILDERS: Final = {"counter": _counter, "gauge": _gauge, "histogram": _histogram}


def _check_conventions(value: object) -> Conventions:
    if not isinstance(value, str):
        raise TypeError(f"conventions must be a str, got {type(value).__name__} {value!r}")
    if value == "darwin":
        return "darwin"
    if value == "db":
        return "db"
    raise ValueError(f"conventions must be one of {_CONVENTIONS}, got {value!r}")


class DarwinCollector(Sources):
    """A prometheus_client collector for pools, caches and managers, read at scrape time.

    Register it once (``REGISTRY.register(collector)``, or use :func:`register`) and add
    every pool, cache and manager to it by name: one collector holds them all, and each scrape
    builds the series from their ``statistics()`` snapshots, so exporting costs nothing
    between scrapes. Adding and removing sources is safe from any thread, also while a scrape
    runs. The collector keeps its sources alive until they are removed.

    Pools (label ``pool``): ``darwin_pool_connections{state="idle"|"used"}`` (used: leased,
    or being checked or reset), ``darwin_pool_max``, ``darwin_pool_min_idle``,
    ``darwin_pool_pending_requests``, ``darwin_pool_timeouts_total``, and the histograms
    ``darwin_pool_wait_seconds``, ``darwin_pool_use_seconds`` and
    ``darwin_pool_create_seconds``. With ``conventions="db"``, these are exported under the
    names OpenTelemetry's Prometheus exporter gives its connection pool metrics instead:
    ``db_client_connection_count{db_client_connection_state}``, ``..._max``,
    ``..._idle_min``, ``..._pending_requests``, ``..._timeouts_total``,
    ``..._wait_time_seconds``, ``..._use_time_seconds`` and ``..._create_time_seconds``,
    labelled ``db_client_connection_pool_name``, so that dashboards made for those work.
    Under either convention, the numbers OpenTelemetry has no name for:
    ``darwin_pool_created_total``, ``darwin_pool_disposed_total{reason}``,
    ``darwin_pool_factory_errors_total``, ``darwin_pool_acquired_total``,
    ``darwin_pool_acquired_after_wait_total`` and ``darwin_pool_waits_abandoned_total``.
    A :class:`~darwin_metrics.resource.KeyedResourcePool` is exported as one pool: its totals
    over every key, ``max_total`` as its maximum, and its own disposal reasons (``evicted``
    among them, no ``shrunk``).

    Caches (label ``cache``, Micrometer's names): ``cache_gets_total{result="hit"|"miss"}``,
    ``cache_puts_total``, ``cache_evictions_total{cause="size"|"expired"}``, ``cache_size``,
    ``cache_max_size`` (only for a cache with a ``maxsize``),
    ``cache_load_total{result="success"|"failure"}`` and the histogram
    ``cache_load_duration_seconds``.

    Managers (label ``manager``, and ``resource_type`` for each tracked type):
    ``darwin_resource_utilization_ratio`` (the latest usage as a ratio: 1 is 100%),
    ``darwin_resource_utilization_peak_ratio``, ``darwin_resource_utilization_min_ratio``,
    ``darwin_resource_utilization_mean_ratio`` and ``darwin_resource_samples_total``; and
    per manager ``darwin_subscription_missed_total`` and ``darwin_subscriptions``.

    Example::

        from prometheus_client import REGISTRY
        from darwin_metrics.prometheus import DarwinCollector

        collector = DarwinCollector(pools={"db": pool}, caches={"pages": cache})
        REGISTRY.register(collector)
        collector.add_manager("app", manager)

    Args:
        pools: Pools to export, by name (ResourcePool or KeyedResourcePool).
        caches: Caches to export, by name.
        managers: Managers to export, by name.
        conventions: ``"darwin"`` (the default) or ``"db"``: the names of the pool series.

    Raises:
        ModuleNotFoundError: prometheus-client is not installed (the ``prometheus`` extra).
        TypeError: A mapping is not a mapping, a name is not a str, a source is not of its
            kind, or ``conventions`` is not a str.
        ValueError: A name is empty, or ``conventions`` is neither ``"darwin"`` nor ``"db"``.
    """

    __slots__ = ("_buckets", "_conventions", "_pool_specs")

    def __init__(
        self,
        *,
        pools: Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]] | None = None,
        caches: Mapping[str, Cache[Any, Any]] | None = None,
        managers: Mapping[str, ResourceManager] | None = None,
        conventions: Conventions = "darwin",
    ) -> None:
        import_prometheus_client()
        self._conventions = _check_conventions(conventions)
        super().__init__(pools=pools, caches=caches, managers=managers)
        self._pool_specs: dict[str, Spec] = {
            **(_POOL_DB if conventions == "db" else _POOL_DARWIN),
            **_POOL_OWN,
        }
        self._buckets = _Buckets()

    @property
    def conventions(self) -> Conventions:
        """The names of the pool series: ``"darwin"`` or ``"db"``."""
        return self._conventions

    def describe(self) -> Iterator[Metric]:
        """Yield every family this collector may export, without samples.

        prometheus_client's registry calls it on ``register`` to find names that clash with
        another collector's.
        """
        for specs in (self._pool_specs, _CACHE, _USAGE):
            for spec in specs.values():
                yield _BUILDERS[spec[0]](spec)

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families, built from a snapshot of every source taken now.

        prometheus_client calls it at each scrape, in whatever thread serves the scrape.
        Families without a sample (a manager that tracked nothing yet has no
        ``darwin_resource_*`` series, an unbounded cache no ``cache_max_size``) are left out.
        """
        pools, caches, managers = self._pools, self._caches, self._managers
        families: list[Metric] = []
        if pools:
            families += self._collect_pools(pools)
        if caches:
            families += self._collect_caches(caches)
        if managers:
            families += self._collect_managers(managers)
        for family in families:
            if family.samples:
                yield family

    def _collect_pools(
        self, pools: Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]]
    ) -> list[Metric]:
        specs = self._pool_specs
        connections = _gauge(specs["connections"])
        max_size = _gauge(specs["max"])
        min_idle = _gauge(specs["min_idle"])
        pending = _gauge(specs["pending"])
        timeouts = _counter(specs["timeouts"])
        created = _counter(specs["created"])
        disposed = _counter(specs["disposed"])
        factory_errors = _counter(specs["factory_errors"])
        acquired = _counter(specs["acquired"])
        after_wait = _counter(specs["acquired_after_wait"])
        abandoned = _counter(specs["waits_abandoned"])
        wait = _histogram(specs["wait"])
        use = _histogram(specs["use"])
        create = _histogram(specs["create"])
        buckets = self._buckets.pairs
        for name, pool in pools.items():
            stats = pool.statistics()
            label = [name]
            idle, used = pool_connections(stats)
            connections.add_metric([name, "idle"], idle)
            connections.add_metric([name, "used"], used)
            max_size.add_metric(label, pool_max(stats))
            min_idle.add_metric(label, stats.min_idle)
            pending.add_metric(label, stats.waiting)
            timeouts.add_metric(label, stats.timeouts)
            created.add_metric(label, stats.created)
            for reason, count in pool_disposals(stats):
                disposed.add_metric([name, reason], count)
            factory_errors.add_metric(label, stats.factory_errors)
            acquired.add_metric(label, stats.acquired)
            after_wait.add_metric(label, stats.acquired_after_wait)
            abandoned.add_metric(label, stats.waits_abandoned)
            wait.add_metric(label, buckets(stats.wait_time), stats.wait_time.sum)
            use.add_metric(label, buckets(stats.use_time), stats.use_time.sum)
            create.add_metric(label, buckets(stats.create_time), stats.create_time.sum)
        return [
            connections,
            max_size,
            min_idle,
            pending,
            timeouts,
            wait,
            use,
            create,
            created,
            disposed,
            factory_errors,
            acquired,
            after_wait,
            abandoned,
        ]

    def _collect_caches(self, caches: Mapping[str, Cache[Any, Any]]) -> list[Metric]:
        gets = _counter(_CACHE["gets"])
        puts = _counter(_CACHE["puts"])
        evictions = _counter(_CACHE["evictions"])
        size = _gauge(_CACHE["size"])
        max_size = _gauge(_CACHE["max_size"])
        loads = _counter(_CACHE["loads"])
        load_time = _histogram(_CACHE["load_time"])
        for name, cache in caches.items():
            stats = cache.statistics()
            label = [name]
            gets.add_metric([name, "hit"], stats.hits)
            gets.add_metric([name, "miss"], stats.misses)
            puts.add_metric(label, stats.sets)
            for cause, count in cache_evictions(stats):
                evictions.add_metric([name, cause], count)
            size.add_metric(label, stats.size)
            if stats.maxsize is not None:
                max_size.add_metric(label, stats.maxsize)
            loads.add_metric([name, "success"], stats.loads)
            loads.add_metric([name, "failure"], stats.load_failures)
            load_time.add_metric(label, self._buckets.pairs(stats.load_duration), stats.load_time)
        return [gets, puts, evictions, size, max_size, loads, load_time]

    def _collect_managers(self, managers: Mapping[str, ResourceManager]) -> list[Metric]:
        current = _gauge(_USAGE["current"])
        peak = _gauge(_USAGE["peak"])
        low = _gauge(_USAGE["min"])
        mean = _gauge(_USAGE["mean"])
        samples = _counter(_USAGE["samples"])
        missed = _counter(_USAGE["missed"])
        subscriptions = _gauge(_USAGE["subscriptions"])
        for name, manager in managers.items():
            for resource_type, stats in manager.usage_statistics().items():
                labels = [name, resource_type]
                current.add_metric(labels, stats.last / 100.0)
                peak.add_metric(labels, stats.max / 100.0)
                low.add_metric(labels, stats.min / 100.0)
                mean.add_metric(labels, stats.mean / 100.0)
                samples.add_metric(labels, stats.count)
            missed.add_metric([name], manager.missed_events)
            subscriptions.add_metric([name], manager.subscriber_count)
        return [current, peak, low, mean, samples, missed, subscriptions]


def register(
    registry: CollectorRegistry | None = None,
    *,
    pools: Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]] | None = None,
    caches: Mapping[str, Cache[Any, Any]] | None = None,
    managers: Mapping[str, ResourceManager] | None = None,
    conventions: Conventions = "darwin",
) -> DarwinCollector:
    """Make a :class:`DarwinCollector` for these sources and register it.

    Example::

        collector = register(pools={"db": pool}, caches={"pages": cache})
        collector.add_pool("jobs", jobs)  # more can be added (and removed) later

    Args:
        registry: Where to register it: prometheus_client's default ``REGISTRY`` if ``None``.
        pools: Pools to export, by name (ResourcePool or KeyedResourcePool).
        caches: Caches to export, by name.
        managers: Managers to export, by name.
        conventions: ``"darwin"`` or ``"db"``, as for :class:`DarwinCollector`.

    Returns:
        The registered collector: add and remove sources on it; unregister it with
        ``registry.unregister(collector)``.

    Raises:
        ValueError: What :class:`DarwinCollector` raises, or the registry already has
            collectors of these names (prometheus_client's "Duplicated timeseries"): register
            one collector per registry and add every source to it.
        TypeError: What :class:`DarwinCollector` raises.
    """
    collector = DarwinCollector(
        pools=pools, caches=caches, managers=managers, conventions=conventions
    )
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    registry.register(collector)
    return collector
