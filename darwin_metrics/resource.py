"""The public components of darwin-metrics.

- :class:`ResourcePool`: a pool of reusable resources with cancellation-safe leases.
- :class:`KeyedResourcePool`: a pool of pools by key (per host, per tenant), under a per-key
  and an overall limit, fair across keys.
- :class:`Cache`: a thread-safe TTL cache with lock-free hits, SIEVE eviction by count or
  weight, statistics, single-flight loads, refresh ahead and stale-if-error.
- :func:`cached`: a decorator that caches an async or sync function's results in a
  :class:`Cache`, one call per key at a time.
- :class:`ResourceManager`: usage tracking broadcast to subscribers, a metric cache, samplers.
"""

from __future__ import annotations

from ._cache import Cache, CacheStatistics, EvictionCause
from ._cached import BoundCachedFunction, CachedFunction, cached
from ._histogram import Histogram
from ._manager import ResourceManager, ResourceUsage, Subscription, UsageStatistics
from ._pool import (
    KeyedPoolDisposals,
    KeyedPoolStatistics,
    KeyedResourcePool,
    KeyStatistics,
    PoolDisposals,
    PoolStatistics,
    ResourcePool,
)

__all__ = [
    "BoundCachedFunction",
    "Cache",
    "CacheStatistics",
    "CachedFunction",
    "EvictionCause",
    "Histogram",
    "KeyStatistics",
    "KeyedPoolDisposals",
    "KeyedPoolStatistics",
    "KeyedResourcePool",
    "PoolDisposals",
    "PoolStatistics",
    "ResourceManager",
    "ResourcePool",
    "ResourceUsage",
    "Subscription",
    "UsageStatistics",
    "cached",
]
