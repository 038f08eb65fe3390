"""Valkey/Redis integrations: the shared cache tier :class:`RedisCache` and its serializers, and
the usage relay (:class:`UsageRelay`, started by ``ResourceManager.relay()``).

Needs the ``redis`` extra (``pip install 'darwin-metrics[redis]'``, which brings coredis);
importing this module does not import coredis, using the tier or the relay does.
"""

from __future__ import annotations

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
    "UsageRelay",
]
