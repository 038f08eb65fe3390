"""The public components of darwin-metrics.

- :class:`ResourcePool`: a pool of reusable resources with cancellation-safe leases.
- :class:`Cache`: a thread-safe TTL cache with lock-free hits, SIEVE eviction, statistics and
  single-flight loads.
"""

from __future__ import annotations

from ._cache import Cache, CacheStatistics, EvictionCause
from ._pool import PoolStatistics, ResourcePool

__all__ = [
    "Cache",
    "CacheStatistics",
    "EvictionCause",
    "PoolStatistics",
    "ResourcePool",
]
