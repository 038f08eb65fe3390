"""darwin-metrics: structured-concurrency resource management for asyncio and trio.

The Python counterpart of the resource module of the Rust crate darwin-metrics: a resource
pool, a TTL cache and usage tracking, correct under cancellation, on asyncio and trio alike.

The components are importable from here and from :mod:`darwin_metrics.resource`; the errors
from here. Integrations live in their own modules: :mod:`darwin_metrics.redis` (the Valkey/Redis
tier, extra ``redis``).
"""

from __future__ import annotations

from ._errors import (
    CapacityLostError,
    DarwinMetricsError,
    PoolClosedError,
    PoolEmptyError,
    PoolError,
    PoolFullError,
    PoolOverloadedError,
    PoolPausedError,
    PoolTimeoutError,
    RedisCacheError,
    RedisUnavailableError,
    ResourceCheckError,
    SerializationError,
    TrackingTimeoutError,
    UsageRelayError,
)
from .resource import (
    BoundCachedFunction,
    Cache,
    CachedFunction,
    CacheStatistics,
    EvictionCause,
    Histogram,
    KeyedPoolDisposals,
    KeyedPoolStatistics,
    KeyedResourcePool,
    KeyStatistics,
    PoolDisposals,
    PoolStatistics,
    ResourceManager,
    ResourcePool,
    ResourceUsage,
    Subscription,
    UsageStatistics,
    cached,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "BoundCachedFunction",
    "Cache",
    "CacheStatistics",
    "CachedFunction",
    "CapacityLostError",
    "DarwinMetricsError",
    "EvictionCause",
    "Histogram",
    "KeyStatistics",
    "KeyedPoolDisposals",
    "KeyedPoolStatistics",
    "KeyedResourcePool",
    "PoolClosedError",
    "PoolDisposals",
    "PoolEmptyError",
    "PoolError",
    "PoolFullError",
    "PoolOverloadedError",
    "PoolPausedError",
    "PoolStatistics",
    "PoolTimeoutError",
    "RedisCacheError",
    "RedisUnavailableError",
    "ResourceCheckError",
    "ResourceManager",
    "ResourcePool",
    "ResourceUsage",
    "SerializationError",
    "Subscription",
    "TrackingTimeoutError",
    "UsageRelayError",
    "UsageStatistics",
    "__version__",
    "cached",
]
