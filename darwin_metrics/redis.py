"""Valkey/Redis integrations: the shared cache tier :class:`RedisCache` and its serializers,
and the fleet-wide capacity limit :class:`SharedCapacityLimiter`.

Needs the ``redis`` extra (``pip install 'darwin-metrics[redis]'``, which brings coredis);
importing this module does not import coredis, using them does.
"""

from __future__ import annotations

from ._redis._limiter import SharedCapacityLimiter, SharedCapacityLimiterStatistics, SharedPermit
from ._redis._serializers import JSONSerializer, PickleSerializer, Serializer
from ._redis._tier import RedisCache, RedisCacheStatistics

__all__ = [
    "JSONSerializer",
    "PickleSerializer",
    "RedisCache",
    "RedisCacheStatistics",
    "Serializer",
    "SharedCapacityLimiter",
    "SharedCapacityLimiterStatistics",
    "SharedPermit",
]
