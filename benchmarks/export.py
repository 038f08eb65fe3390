"""Export rows: what the pool's histograms cost, and what a scrape costs.

- The uncontended lease cycle of a pool with its histograms against a second pool whose
  recording is made a no-op from the outside (no-op recorders and a constant clock swapped
  in; the core is not changed): the histograms' whole cost on the hot path.
- Recording one lease's use time, without the scheduler's noise: the statements the pool's
  fast paths run for it (mirrored here: two readings of the loop's clock, the append, the
  fold every 512 acquisitions)
  against what a user would write without it, prometheus_client's ``Histogram.observe`` of a
  ``perf_counter`` difference per lease (with a pre-bound child: their best case); and
  ``_Recorder.observe``, the call that waits and creations pay.
- The same, whole lease cycles: our pool against the no-op pool plus a hand-kept observe.
- One scrape of 10 pools, 10 caches and 100 resource types through ``DarwinCollector``
  against ``generate_latest`` of a registry with the same series kept up to date by hand
  with prometheus_client's own ``Gauge``, ``Counter`` and ``Histogram`` (checked to hold
  exactly the same samples).
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import anyio

from darwin_metrics import PoolTimeoutError
from darwin_metrics._histogram import DEFAULT_BUCKETS, FOLD_EVERY, _Recorder
from darwin_metrics.resource import Cache, ResourceManager, ResourcePool

from ._harness import Config, Goal, Row, ainterleave, compare, interleave

POOLS = 10
CACHES = 10
RESOURCE_TYPES = 100

NOOP = "same pool, recording a no-op"
HAND_KEPT = "prometheus_client Histogram.observe"


class _NoopRecorder:
    """A recorder that records nothing: ``observe``, ``append`` and ``fold`` do nothing.

    A lease's return appends its use time through the pool's ``_record_use`` (a bound
    ``list.append``), swapped for ``deque(maxlen=0).append``: the same kind of C call, which
    keeps nothing. With the constant clock swapped in beside it, what is left of recording in
    this pool is the acquire path's ``acquired % FOLD_EVERY`` test, which lives in the core.
    """

    __slots__ = ("append", "bounds", "counts", "sum")

    def __init__(self) -> None:
        self.bounds = DEFAULT_BUCKETS
        self.counts = [0] * (len(DEFAULT_BUCKETS) + 1)
        self.sum = 0.0
        self.append = collections.deque(maxlen=0).append

    def observe(self, seconds: float) -> None:
        pass

    def fold(self) -> None:
        pass


async def _noop_pool() -> ResourcePool[object]:
    pool: ResourcePool[object] = ResourcePool(10, factory=object)
    async with pool.lease():  # binds the pool to this loop (and resolves its clock)
        pass
    noop = _NoopRecorder()
    pool._wait_time = pool._use_time = pool._create_time = noop  # duck-typed
    pool._record_use = noop.append
    pool._clock = float  # float() is 0.0: a C call, cheaper than either loop's clock
    return pool


async def rows(config: Config, backend: str) -> list[Row]:
    from prometheus_client import CollectorRegistry, Histogram

    out: list[Row] = []
    ops = config.async_ops
    pool: ResourcePool[object] = ResourcePool(10, factory=object)
    async with pool.lease():
        pass
    noop = await _noop_pool()
    child = Histogram(
        "lease_use_seconds",
        "Hand-kept.",
        ["pool"],
        buckets=DEFAULT_BUCKETS,
        registry=CollectorRegistry(),
    ).labels(pool="db")

    async def cycles(target: ResourcePool[object]) -> float:
        start = time.perf_counter()
        for _ in range(ops):
            async with target.lease():
                pass
        return (time.perf_counter() - start) / ops

    async def hand_kept_cycles() -> float:
        perf_counter = time.perf_counter
        observe = child.observe
        start = perf_counter()
        for _ in range(ops):
            began = perf_counter()
            async with noop.lease():
                pass
            observe(perf_counter() - began)
        return (perf_counter() - start) / ops

    samplers: list[Callable[[], Awaitable[float]]] = [
        partial(cycles, pool),
        partial(cycles, noop),
        hand_kept_cycles,
    ]
    ours, without, hand_kept = await ainterleave(samplers, config.repeats)
    # The no-op pool kept nothing; ours recorded every lease.
    assert not noop._use_time.counts[0]
    assert pool.statistics().use_time.count > ops
    out.append(
        compare(
            "export",
            "lease() cycle, uncontended: with histograms",
            backend,
            "s/op",
            NOOP,
            ours,
            without,
            goal=Goal("≤ 1.10x", "ratio", "<=", 1.10),
        )
    )
    out.append(
        compare(
            "export",
            "lease() cycle, uncontended: with histograms",
            backend,
            "s/op",
            "no-op pool + hand-kept Histogram.observe",
            ours,
            hand_kept,
        )
    )

    # --- recording one lease, without the scheduler's noise: the statements that record a
    # lease's use time on the pool's fast paths, against a hand-kept observe per lease
    clock = pool._clock  # the loop's own clock, as the pool reads it
    recorder = _Recorder()
    loops = ops * 10

    class Lease:
        __slots__ = ("acquired_at",)

    lease = Lease()

    def empty() -> float:
        start = time.perf_counter()
        for _ in range(loops):
            pass
        return time.perf_counter() - start

    def ours_inline() -> float:
        # Mirrors what recording adds to ResourcePool._take's fast path (the fold every
        # FOLD_EVERY acquisitions, one clock reading) and to _LeaseContext.__aexit__ (a
        # reading, a subtraction, the append): keep it in step with darwin_metrics/_pool/.
        record = recorder.append
        fold = recorder.fold
        start = time.perf_counter()
        for acquired in range(1, loops + 1):  # the pool's count of acquisitions
            if not acquired % FOLD_EVERY:
                fold()
            lease.acquired_at = clock()
            held = clock() - lease.acquired_at
            record(held)
        recorder.fold()
        return time.perf_counter() - start

    def ours_observe() -> float:
        observe = recorder.observe
        start = time.perf_counter()
        for _ in range(loops):
            began = clock()
            observe(clock() - began)
        return time.perf_counter() - start

    def theirs_observe() -> float:
        perf_counter = time.perf_counter
        observe = child.observe
        start = perf_counter()
        for _ in range(loops):
            began = perf_counter()
            observe(perf_counter() - began)
        return perf_counter() - start

    base, inline, called, theirs_times = interleave(
        [empty, ours_inline, ours_observe, theirs_observe], config.repeats
    )

    def per_op(samples: list[float]) -> list[float]:
        return [max(t - b, 0.0) / loops for t, b in zip(samples, base, strict=True)]

    out.append(
        compare(
            "export",
            "recording one lease's use time",
            backend,
            "s/op",
            HAND_KEPT,
            per_op(inline),
            per_op(theirs_times),
            goal=Goal("≥ 3x cheaper (≤ 0.33x)", "ratio", "<=", 1 / 3),
        )
    )
    out.append(
        compare(
            "export",
            "recording one duration with _Recorder.observe (waits, creations)",
            backend,
            "s/op",
            HAND_KEPT,
            per_op(called),
            per_op(theirs_times),
        )
    )
    return out


# ---------------------------------------------------------------------- the scrape


async def _time_out(pool: ResourcePool[object]) -> None:
    """Wait for a resource of a full pool until the wait times out."""
    with contextlib.suppress(PoolTimeoutError):
        await pool.acquire(timeout=0.001)


async def _sources() -> tuple[
    dict[str, ResourcePool[object]], dict[str, Cache[int, int]], ResourceManager
]:
    pools = {f"pool-{n}": ResourcePool[object](10, factory=object) for n in range(POOLS)}
    for number, pool in enumerate(pools.values()):
        for _ in range(5 + number):
            async with pool.lease():
                pass
        async with anyio.create_task_group() as group, pool.lease():
            for _ in range(2):
                group.start_soon(_time_out, pool)
            await anyio.sleep(0.002)
    caches = {f"cache-{n}": Cache[int, int](60, maxsize=50) for n in range(CACHES)}
    for cache in caches.values():
        for key in range(80):
            cache.set(key, key)
            cache.get(key)
            cache.get_or_set(key + 1000, int)  # a miss and a load
    manager = ResourceManager()
    for round_ in range(3):
        for number in range(RESOURCE_TYPES):
            await manager.track_resource_usage(f"resource-{number}", (number + round_) % 100)
    return pools, caches, manager


def _replay(child: Any, histogram: Any) -> None:
    """Observe into a prometheus_client histogram what ``histogram`` holds, bucket by bucket."""
    for bound, count in zip(
        (*histogram.bounds, histogram.bounds[-1] * 2), histogram.counts, strict=True
    ):
        for _ in range(count):
            child.observe(bound)


def _hand_kept(
    pools: dict[str, ResourcePool[object]],
    caches: dict[str, Cache[int, int]],
    manager: ResourceManager,
) -> Any:
    """A registry with the collector's series, kept with prometheus_client's own metrics."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from darwin_metrics._export import pool_disposals

    registry = CollectorRegistry(auto_describe=False)

    def gauge(name: str, labels: list[str]) -> Gauge:
        return Gauge(name, name, labels, registry=registry)

    def counter(name: str, labels: list[str]) -> Counter:
        return Counter(name, name, labels, registry=registry)

    connections = gauge("darwin_pool_connections", ["pool", "state"])
    maximum = gauge("darwin_pool_max", ["pool"])
    min_idle = gauge("darwin_pool_min_idle", ["pool"])
    pending = gauge("darwin_pool_pending_requests", ["pool"])
    timeouts = counter("darwin_pool_timeouts", ["pool"])
    histograms = {
        kind: Histogram(
            f"darwin_pool_{kind}_seconds",
            kind,
            ["pool"],
            buckets=DEFAULT_BUCKETS,
            registry=registry,
        )
        for kind in ("wait", "use", "create")
    }
    created = counter("darwin_pool_created", ["pool"])
    disposed = counter("darwin_pool_disposed", ["pool", "reason"])
    simple = {
        field: counter(f"darwin_pool_{field}", ["pool"])
        for field in ("factory_errors", "acquired", "acquired_after_wait", "waits_abandoned")
    }
    for name, pool in pools.items():
        stats = pool.statistics()
        connections.labels(name, "idle").set(stats.idle)
        connections.labels(name, "used").set(stats.size - stats.idle)
        maximum.labels(name).set(stats.max_size)
        min_idle.labels(name).set(stats.min_idle)
        pending.labels(name).set(stats.waiting)
        timeouts.labels(name).inc(stats.timeouts)
        created.labels(name).inc(stats.created)
        for reason, count in pool_disposals(stats):
            disposed.labels(name, reason).inc(count)
        for field, metric in simple.items():
            metric.labels(name).inc(getattr(stats, field))
        for kind, histogram in histograms.items():
            _replay(histogram.labels(name), getattr(stats, f"{kind}_time"))
    gets = counter("cache_gets", ["cache", "result"])
    puts = counter("cache_puts", ["cache"])
    evictions = counter("cache_evictions", ["cache", "cause"])
    size = gauge("cache_size", ["cache"])
    max_size = gauge("cache_max_size", ["cache"])
    loads = counter("cache_load", ["cache", "result"])
    load_time = Histogram(
        "cache_load_duration_seconds",
        "load",
        ["cache"],
        buckets=DEFAULT_BUCKETS,
        registry=registry,
    )
    for name, cache in caches.items():
        stats = cache.statistics()
        gets.labels(name, "hit").inc(stats.hits)
        gets.labels(name, "miss").inc(stats.misses)
        puts.labels(name).inc(stats.sets)
        evictions.labels(name, "size").inc(stats.evictions)
        evictions.labels(name, "expired").inc(stats.expirations)
        size.labels(name).set(stats.size)
        max_size.labels(name).set(stats.maxsize or 0)
        loads.labels(name, "success").inc(stats.loads)
        loads.labels(name, "failure").inc(stats.load_failures)
        _replay(load_time.labels(name), stats.load_duration)
    usage = {
        field: gauge(f"darwin_resource_utilization{suffix}_ratio", ["manager", "resource_type"])
        for field, suffix in (("last", ""), ("max", "_peak"), ("min", "_min"), ("mean", "_mean"))
    }
    samples = counter("darwin_resource_samples", ["manager", "resource_type"])
    for resource_type, stats in manager.usage_statistics().items():
        for field, metric in usage.items():
            metric.labels("app", resource_type).set(getattr(stats, field) / 100)
        samples.labels("app", resource_type).inc(stats.count)
    counter("darwin_subscription_missed", ["manager"]).labels("app").inc(manager.missed_events)
    gauge("darwin_subscriptions", ["manager"]).labels("app").set(manager.subscriber_count)
    return registry


def scrape_rows(config: Config) -> list[Row]:
    """One scrape of 10 pools, 10 caches and 100 resource types: ours against the hand-kept."""
    import prometheus_client
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from darwin_metrics.prometheus import register

    # prometheus_client's own counters and histograms also export a ``_created`` series each,
    # which ours do not: leave them out, so that both registries hold the same samples.
    prometheus_client.disable_created_metrics()
    pools, caches, manager = anyio.run(_sources)
    ours_registry = CollectorRegistry()
    register(ours_registry, pools=pools, caches=caches, managers={"app": manager})
    theirs_registry = _hand_kept(pools, caches, manager)

    def series(registry: Any) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        text = generate_latest(registry).decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items())))
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    ours_series, theirs_series = series(ours_registry), series(theirs_registry)
    assert ours_series == theirs_series, ours_series ^ theirs_series
    scrapes = 5 if config.quick else 20

    def timed(registry: Any) -> float:
        start = time.perf_counter()
        for _ in range(scrapes):
            generate_latest(registry)
        return (time.perf_counter() - start) / scrapes

    ours, theirs = interleave(
        [partial(timed, ours_registry), partial(timed, theirs_registry)], config.repeats
    )
    return [
        compare(
            "export",
            f"one scrape, {POOLS} pools + {CACHES} caches + {RESOURCE_TYPES} resource types "
            f"({len(ours_series)} samples)",
            "-",
            "s/op",
            "hand-kept Gauge/Counter/Histogram",
            ours,
            theirs,
            goal=Goal("≤ 1.5x", "ratio", "<=", 1.5),
        )
    ]
