"""The public components of darwin-metrics.

- :class:`ResourcePool`: a pool of reusable resources with cancellation-safe leases.
- :class:`Cache`: a thread-safe TTL cache with lock-free hits, SIEVE eviction, statistics and
  single-flight loads.
- :class:`ResourceManager`: usage tracking broadcast to subscribers, a metric cache, samplers.
"""

from __future__ import annotations

from ._cache import Cache, CacheStatistics, EvictionCause
from ._histogram import Histogram
from ._manager import ResourceManager, ResourceUsage, Subscription, UsageStatistics
from ._pool import PoolDisposals, PoolStatistics, ResourcePool

__all__ = [
    "Cache",
    "CacheStatistics",
    "EvictionCause",
    "Histogram",
    "PoolDisposals",
    "PoolStatistics",
    "ResourceManager",
    "ResourcePool",
    "ResourceUsage",
    "Subscription",
    "UsageStatistics",
]
