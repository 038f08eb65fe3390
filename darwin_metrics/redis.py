"""The shared cache tier on Valkey/Redis: :class:`RedisCache` and its serializers.

Needs the ``redis`` extra (``pip install 'darwin-metrics[redis]'``, which brings coredis);
importing this module does not import coredis, using the tier does.
"""

from __future__ import annotations

from ._redis._serializers import JSONSerializer, PickleSerializer, Serializer
from ._redis._tier import RedisCache, RedisCacheStatistics

__all__ = [
    "JSONSerializer",
    "PickleSerializer",
    "RedisCache",
    "RedisCacheStatistics",
    "Serializer",
]
