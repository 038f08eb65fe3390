"""OpenTelemetry instruments over pools, caches and managers, and the pools' timing listener.

Observable instruments (counters, up-down counters, gauges) whose callbacks read each source's
``statistics()`` snapshot when the SDK collects, following OpenTelemetry's semantic
conventions for connection pools (``db.client.connection.*``). OpenTelemetry has no
observable histogram, so the wait, use and create times are recorded as they happen, by the
listener :meth:`DarwinInstruments.timing_listener` gives, passed to the pool as
``on_timing``. Only the OpenTelemetry API is needed (imported when instruments are made);
the SDK, or whatever implements the API, does the rest.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from ._cache import Cache
from ._export import (
    AnyPoolStatistics,
    Sources,
    cache_evictions,
    pool_connections,
    pool_disposals,
    pool_max,
)
from ._histogram import DEFAULT_BUCKETS
from ._manager import ResourceManager
from ._pool import KeyedResourcePool, ResourcePool
from ._pool._statistics import TimingKind

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

__all__ = ["DarwinInstruments", "instrument", "pool_timing_listener"]

_INSTALL = 'pip install "darwin-metrics[otel]"'
POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"
REASON: Final = "darwin.pool.disposal.reason"
CACHE: Final = "cache"
MANAGER: Final = "darwin.manager.name"
RESOURCE_TYPE: Final = "darwin.resource.type"

# The meters that have instruments, and theirs: an SDK keeps one instrument per name and
# meter (a second with the same name gets the first, callbacks and all), so there is one
# DarwinInstruments per meter.
_by_meter: weakref.WeakKeyDictionary[Any, DarwinInstruments] = weakref.WeakKeyDictionary()
_by_meter_lock = threading.Lock()


def _import_otel() -> Any:
    try:
        from opentelemetry import metrics
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"darwin_metrics.otel needs the OpenTelemetry API: {_INSTALL}",
            name="opentelemetry",
        ) from exc
    return metrics


PoolReading = Callable[[AnyPoolStatistics], Iterable[tuple[float, Mapping[str, str]]]]

# (name, kind, unit, description, reading): kind is "counter", "updown" or "gauge".
_POOL_INSTRUMENTS: Final[tuple[tuple[str, str, str, str, PoolReading], ...]] = (
    (
        "db.client.connection.count",
        "updown",
        "{connection}",
        "The number of connections that are currently in the state described by the state "
        "attribute (used: leased, or being checked or reset).",
        lambda s: zip(pool_connections(s), ({STATE: "idle"}, {STATE: "used"}), strict=True),
    ),
    (
        "db.client.connection.max",
        "updown",
        "{connection}",
        "The maximum number of open connections allowed.",
        lambda s: ((pool_max(s), {}),),
    ),
    (
        "db.client.connection.idle.min",
        "updown",
        "{connection}",
        "The minimum number of idle open connections allowed.",
        lambda s: ((s.min_idle, {}),),
    ),
    (
        "db.client.connection.pending_requests",
        "updown",
        "{request}",
        "The number of current pending requests for an open connection.",
        lambda s: ((s.waiting, {}),),
    ),
    (
        "db.client.connection.timeouts",
        "counter",
        "{timeout}",
        "The number of connection timeouts that have occurred trying to obtain a connection "
        "from the pool.",
        lambda s: ((s.timeouts, {}),),
    ),
    (
        "darwin.pool.created",
        "counter",
        "{resource}",
        "Resources the pool took ownership of: made by the factory or added by hand.",
        lambda s: ((s.created, {}),),
    ),
    (
        "darwin.pool.disposed",
        "counter",
        "{resource}",
        "Resources that left the pool, by reason.",
        lambda s: ((count, {REASON: r}) for r, count in pool_disposals(s)),
    ),
    (
        "darwin.pool.factory_errors",
        "counter",
        "{error}",
        "Calls of the factory that raised.",
        lambda s: ((s.factory_errors, {}),),
    ),
    (
        "darwin.pool.acquired",
        "counter",
        "{acquisition}",
        "Successful acquisitions.",
        lambda s: ((s.acquired, {}),),
    ),
    (
        "darwin.pool.acquired_after_wait",
        "counter",
        "{acquisition}",
        "Successful acquisitions that had to wait for another task's resource first.",
        lambda s: ((s.acquired_after_wait, {}),),
    ),
    (
        "darwin.pool.waits_abandoned",
        "counter",
        "{wait}",
        "Waits for a resource that ended without one: cancelled, or timed out.",
        lambda s: ((s.waits_abandoned, {}),),
    ),
)

_TIMINGS: Final[tuple[tuple[TimingKind, str, str], ...]] = (
    (
        "wait",
        "db.client.connection.wait_time",
        "The time it took to obtain an open connection from the pool.",
    ),
    (
        "use",
        "db.client.connection.use_time",
        "The time between borrowing a connection and returning it to the pool.",
    ),
    ("create", "db.client.connection.create_time", "The time it took to create a new connection."),
)


class DarwinInstruments(Sources):
    """OpenTelemetry instruments that read pools, caches and managers when metrics are collected.

    Get the one of a meter with :func:`instrument`; add and remove sources on it by name
    (safe from any thread, also while the SDK collects). It keeps its sources alive until
    they are removed.

    Pools (attribute ``db.client.connection.pool.name``), as OpenTelemetry's semantic
    conventions name them: ``db.client.connection.count`` (attribute
    ``db.client.connection.state``: ``idle``, or ``used`` for leased and being checked or
    reset), ``db.client.connection.max``, ``db.client.connection.idle.min``,
    ``db.client.connection.pending_requests`` and ``db.client.connection.timeouts``; and the
    pool's own ``darwin.pool.created``, ``darwin.pool.disposed`` (attribute
    ``darwin.pool.disposal.reason``), ``darwin.pool.factory_errors``,
    ``darwin.pool.acquired``, ``darwin.pool.acquired_after_wait`` and
    ``darwin.pool.waits_abandoned``. The histograms ``db.client.connection.wait_time``,
    ``.use_time`` and ``.create_time`` (seconds) come from :meth:`timing_listener`. A
    :class:`~darwin_metrics.resource.KeyedResourcePool` is exported as one pool: its totals
    over every key, ``max_total`` as its maximum, and its own disposal reasons.

    Caches (attribute ``cache``, as Micrometer names them): ``cache.gets`` (attribute
    ``result``: ``hit`` or ``miss``), ``cache.puts``, ``cache.evictions`` (attribute
    ``cause``: ``size`` or ``expired``), ``cache.size``, ``cache.max_size`` (for a cache
    with a ``maxsize``) and ``cache.loads`` (attribute ``result``: ``success`` or
    ``failure``).

    Managers (attribute ``darwin.manager.name``, and ``darwin.resource.type`` for each
    tracked type): ``darwin.resource.utilization`` (the latest usage as a fraction: 1 is
    100%), ``darwin.resource.utilization.peak``, ``.min`` and ``.mean``,
    ``darwin.resource.samples``; and per manager ``darwin.subscription.missed`` and
    ``darwin.subscriptions``.
    """

    __slots__ = ("__weakref__", "_histograms", "_meter")

    def __init__(
        self,
        meter: Meter,
        *,
        pools: Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]] | None = None,
        caches: Mapping[str, Cache[Any, Any]] | None = None,
        managers: Mapping[str, ResourceManager] | None = None,
    ) -> None:
        metrics = _import_otel()
        if not isinstance(meter, metrics.Meter):
            raise TypeError(f"meter must be an OpenTelemetry Meter, got {type(meter).__name__}")
        super().__init__(pools=pools, caches=caches, managers=managers)
        # Weakly: the meter's instruments hold this object's callbacks, and the registry of
        # meters holds this object; a strong reference back would keep the meter for ever.
        self._meter: weakref.ref[Meter] = weakref.ref(meter)
        with _by_meter_lock:  # held while the instruments are made: one set per meter
            if meter in _by_meter:
                raise ValueError(
                    "this meter already has darwin-metrics instruments: get them with "
                    "instrument(meter) and add the sources to them"
                )
            self._make_instruments(meter)
            # Histograms without a recording export nothing: made now, they need no meter
            # later.
            self._histograms: dict[TimingKind, Histogram] = {
                kind: meter.create_histogram(
                    name,
                    unit="s",
                    description=description,
                    explicit_bucket_boundaries_advisory=DEFAULT_BUCKETS,
                )
                for kind, name, description in _TIMINGS
            }
            _by_meter[meter] = self

    @property
    def meter(self) -> Meter | None:
        """The meter the instruments belong to (``None`` once nothing else refers to it)."""
        return self._meter()

    # ------------------------------------------------------------------ observable ones

    def _make_instruments(self, meter: Meter) -> None:
        makers = {
            "counter": meter.create_observable_counter,
            "updown": meter.create_observable_up_down_counter,
            "gauge": meter.create_observable_gauge,
        }
        for name, kind, unit, description, reading in _POOL_INSTRUMENTS:
            makers[kind](name, [self._pool_callback(reading)], unit, description)

        def cache_instrument(
            name: str, kind: str, unit: str, description: str, reading: Callable[..., Any]
        ) -> None:
            makers[kind](name, [self._cache_callback(reading)], unit, description)

        cache_instrument(
            "cache.gets",
            "counter",
            "{lookup}",
            "Lookups, by result: hit (a live entry was found) or miss.",
            lambda s: ((s.hits, {"result": "hit"}), (s.misses, {"result": "miss"})),
        )
        cache_instrument(
            "cache.puts",
            "counter",
            "{entry}",
            "Entries stored (replacements included).",
            lambda s: ((s.sets, {}),),
        )
        cache_instrument(
            "cache.evictions",
            "counter",
            "{entry}",
            "Entries that left the cache by themselves, by cause: size (evicted to respect "
            "the size bound) or expired.",
            lambda s: ((count, {"cause": cause}) for cause, count in cache_evictions(s)),
        )
        cache_instrument(
            "cache.size",
            "updown",
            "{entry}",
            "Entries held now, including expired ones not dropped yet.",
            lambda s: ((s.size, {}),),
        )
        cache_instrument(
            "cache.max_size",
            "updown",
            "{entry}",
            "The size bound (absent for a cache without one).",
            lambda s: () if s.maxsize is None else ((s.maxsize, {}),),
        )
        cache_instrument(
            "cache.loads",
            "counter",
            "{load}",
            "Loader calls, by result: success (returned a value) or failure (raised).",
            lambda s: ((s.loads, {"result": "success"}), (s.load_failures, {"result": "failure"})),
        )
        # The cache's load-time histogram has no OpenTelemetry counterpart here: OpenTelemetry
        # has no observable histogram, and the cache has no listener (as the pool's on_timing)
        # to record each load as it ends.

        for name, unit, description, field, scale in (
            (
                "darwin.resource.utilization",
                "1",
                "The latest usage tracked for the resource type, as a fraction (1 is 100%).",
                "last",
                0.01,
            ),
            (
                "darwin.resource.utilization.peak",
                "1",
                "The highest usage tracked for the resource type, as a fraction.",
                "max",
                0.01,
            ),
            (
                "darwin.resource.utilization.min",
                "1",
                "The lowest usage tracked for the resource type, as a fraction.",
                "min",
                0.01,
            ),
            (
                "darwin.resource.utilization.mean",
                "1",
                "The mean of the usages tracked for the resource type, as a fraction.",
                "mean",
                0.01,
            ),
        ):
            meter.create_observable_gauge(
                name, [self._usage_callback(field, scale)], unit, description
            )
        meter.create_observable_counter(
            "darwin.resource.samples",
            [self._usage_callback("count", 1)],
            "{sample}",
            "Usages tracked for the resource type.",
        )
        meter.create_observable_counter(
            "darwin.subscription.missed",
            [self._manager_callback(lambda m: m.missed_events)],
            "{event}",
            "Events dropped for subscribers whose buffer was full, all subscriptions together.",
        )
        meter.create_observable_up_down_counter(
            "darwin.subscriptions",
            [self._manager_callback(lambda m: m.subscriber_count)],
            "{subscription}",
            "Subscriptions that receive the usages tracked now.",
        )

    def _pool_callback(
        self, reading: PoolReading
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        from opentelemetry.metrics import Observation

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for name, pool in self._pools.items():
                for value, attributes in reading(pool.statistics()):
                    yield Observation(value, {POOL_NAME: name, **attributes})

        return callback

    def _cache_callback(
        self, reading: Callable[..., Iterable[tuple[float, Mapping[str, str]]]]
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        from opentelemetry.metrics import Observation

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for name, cache in self._caches.items():
                for value, attributes in reading(cache.statistics()):
                    yield Observation(value, {CACHE: name, **attributes})

        return callback

    def _usage_callback(
        self, field: str, scale: float
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        from opentelemetry.metrics import Observation

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for name, manager in self._managers.items():
                for resource_type, stats in manager.usage_statistics().items():
                    value = getattr(stats, field)
                    yield Observation(
                        value * scale if scale != 1 else value,
                        {MANAGER: name, RESOURCE_TYPE: resource_type},
                    )

        return callback

    def _manager_callback(
        self, reading: Callable[[ResourceManager], int]
    ) -> Callable[[CallbackOptions], Iterator[Observation]]:
        from opentelemetry.metrics import Observation

        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for name, manager in self._managers.items():
                yield Observation(reading(manager), {MANAGER: name})

        return callback

    # ------------------------------------------------------------------ the histograms

    def timing_listener(self, pool_name: str) -> Callable[[TimingKind, float], None]:
        """A pool's ``on_timing`` listener recording into this meter's histograms.

        ``db.client.connection.wait_time``, ``.use_time`` and ``.create_time``, in seconds,
        with the attribute ``db.client.connection.pool.name`` set to ``pool_name``; the
        buckets advised to the SDK are the pool's own (100 µs to 10 s), which an SDK view
        can change. Pass it as ``ResourcePool(..., on_timing=...)``: the pool calls it
        synchronously with every duration it measures, and a pool without one pays nothing.

        Example::

            instruments = instrument(meter)
            pool = ResourcePool(10, factory=connect, on_timing=instruments.timing_listener("db"))
            instruments.add_pool("db", pool)

        Raises:
            TypeError: ``pool_name`` is not a str.
            ValueError: ``pool_name`` is empty.
        """
        if not isinstance(pool_name, str):
            raise TypeError(
                f"pool_name must be a str, got {type(pool_name).__name__} {pool_name!r}"
            )
        if not pool_name:
            raise ValueError("pool_name must not be empty")
        histograms = self._histograms
        attributes = {POOL_NAME: pool_name}
        # One bound method per kind, looked up by kind: the listener is on the pool's hot path.
        records = {kind: histogram.record for kind, histogram in histograms.items()}

        def on_timing(kind: TimingKind, seconds: float) -> None:
            records[kind](seconds, attributes)

        on_timing.__qualname__ = f"timing_listener({pool_name!r})"
        return on_timing

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} of {self._meter()!r}: {len(self._pools)} pools, "
            f"{len(self._caches)} caches, {len(self._managers)} managers>"
        )


def instrument(
    meter: Meter,
    *,
    pools: Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]] | None = None,
    caches: Mapping[str, Cache[Any, Any]] | None = None,
    managers: Mapping[str, ResourceManager] | None = None,
) -> DarwinInstruments:
    """Export pools, caches and managers through ``meter``'s instruments.

    The instruments are made once per meter (OpenTelemetry keeps one instrument per name and
    meter): calling this again with the same meter returns the same
    :class:`DarwinInstruments`, with these sources added.

    Example::

        from opentelemetry import metrics
        from darwin_metrics import otel

        meter = metrics.get_meter("my-service")
        otel.instrument(meter, pools={"db": pool}, caches={"pages": cache})

    Args:
        meter: An OpenTelemetry ``Meter``.
        pools: Pools to export, by name (ResourcePool or KeyedResourcePool).
        caches: Caches to export, by name.
        managers: Managers to export, by name.

    Raises:
        ModuleNotFoundError: The OpenTelemetry API is not installed (the ``otel`` extra).
        TypeError: ``meter`` is not a Meter, a mapping is not a mapping, a name is not a str
            or a source is not of its kind.
        ValueError: A name is empty or already exported for its kind; nothing was added.
    """
    metrics = _import_otel()
    if not isinstance(meter, metrics.Meter):
        raise TypeError(f"meter must be an OpenTelemetry Meter, got {type(meter).__name__}")
    with _by_meter_lock:
        existing = _by_meter.get(meter)
    if existing is None:
        try:
            return DarwinInstruments(meter, pools=pools, caches=caches, managers=managers)
        except ValueError:
            with _by_meter_lock:
                existing = _by_meter.get(meter)
            if existing is None:
                raise
    # Check everything first, so that a bad source adds none.
    Sources(pools=pools, caches=caches, managers=managers)
    for kind, given, current in (
        ("pool", pools, existing.pools),
        ("cache", caches, existing.caches),
        ("manager", managers, existing.managers),
    ):
        for name in given or ():
            if name in current:
                raise ValueError(
                    f"a {kind} named {name!r} is already exported: remove it first, or "
                    "choose another name"
                )
    for name, pool in (pools or {}).items():
        existing.add_pool(name, pool)
    for name, cache in (caches or {}).items():
        existing.add_cache(name, cache)
    for name, manager in (managers or {}).items():
        existing.add_manager(name, manager)
    return existing


def pool_timing_listener(meter: Meter, pool_name: str) -> Callable[[TimingKind, float], None]:
    """``instrument(meter).timing_listener(pool_name)``: a pool's ``on_timing`` for OTel.

    Example::

        pool = ResourcePool(10, factory=connect, on_timing=pool_timing_listener(meter, "db"))

    Raises:
        ModuleNotFoundError: The OpenTelemetry API is not installed (the ``otel`` extra).
        TypeError: ``meter`` is not a Meter, or ``pool_name`` not a str.
        ValueError: ``pool_name`` is empty.
    """
    return instrument(meter).timing_listener(pool_name)
