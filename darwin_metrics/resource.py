"""The public components of darwin-metrics.

- :class:`ResourcePool`: a pool of reusable resources with cancellation-safe leases.
- :class:`KeyedResourcePool`: a pool of pools by key (per host, per tenant), under a per-key
  and an overall limit, fair across keys.
- :class:`Cache`: a thread-safe TTL cache with lock-free hits, SIEVE eviction, statistics and
  single-flight loads.
- :class:`ResourceManager`: usage tracking broadcast to subscribers, a metric cache, samplers.
"""

from __future__ import annotations

from ._cache import Cache, CacheStatistics, EvictionCause
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
    "Cache",
    "CacheStatistics",
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
]
