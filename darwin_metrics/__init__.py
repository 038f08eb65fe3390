"""darwin-metrics: structured-concurrency resource management for asyncio and trio.

The components live in :mod:`darwin_metrics.resource`; the errors are importable from here.
"""

from __future__ import annotations

from ._errors import (
    DarwinMetricsError,
    PoolClosedError,
    PoolEmptyError,
    PoolError,
    PoolFullError,
    PoolTimeoutError,
    RedisCacheError,
    RedisUnavailableError,
    SerializationError,
    TrackingTimeoutError,
    UsageRelayError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "DarwinMetricsError",
    "PoolClosedError",
    "PoolEmptyError",
    "PoolError",
    "PoolFullError",
    "PoolTimeoutError",
    "RedisCacheError",
    "RedisUnavailableError",
    "SerializationError",
    "TrackingTimeoutError",
    "UsageRelayError",
    "__version__",
]
