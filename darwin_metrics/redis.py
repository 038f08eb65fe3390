"""Valkey/Redis integrations: the shared cache tier :class:`RedisCache` and its serializers, the
usage relay (:class:`UsageRelay`, started by ``ResourceManager.relay()``), and the fleet-wide
capacity limit :class:`SharedCapacityLimiter`.

Needs the ``redis`` extra (``pip install 'darwin-metrics[redis]'``, which brings coredis);
importing this module does not import coredis, using the tier, the relay or the limiter does.
"""

from __future__ import annotations

from ._redis._limiter import SharedCapacityLimiter, SharedCapacityLimiterStatistics, SharedPermit
from ._redis._relay import RelayStatistics, UsageRelay
from ._redis._serializers import JSONSerializer, PickleSerializer, Serializer
from ._redis._tier import RedisCache, RedisCacheStatistics

__all__ = [
    "JSONSerializer",
    "PickleSerializer",
    "RedisCache",
    "RedisCacheStatistics",
    "RelayStatistics",
    "Serializer",
    "SharedCapacityLimiter",
    "SharedCapacityLimiterStatistics",
    "SharedPermit",
    "UsageRelay",
]
