"""The public surface: what ``__all__`` says is exactly what the package offers."""

from __future__ import annotations

import types

import pytest

import darwin_metrics
import darwin_metrics.otel
import darwin_metrics.prometheus
import darwin_metrics.redis
import darwin_metrics.resource

MODULES = [
    darwin_metrics,
    darwin_metrics.otel,
    darwin_metrics.prometheus,
    darwin_metrics.redis,
    darwin_metrics.resource,
]


@pytest.mark.parametrize("module", MODULES)
def test_all_is_sorted_and_complete(module: types.ModuleType) -> None:
    exported = module.__all__
    assert list(exported) == sorted(exported)
    assert len(set(exported)) == len(exported)
    for name in exported:
        assert hasattr(module, name), name
    public = {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }
    assert public == set(exported) - {"__version__"}


def test_components_and_errors_are_where_the_docs_say() -> None:
    from darwin_metrics import (
        DarwinMetricsError,
        PoolClosedError,
        PoolEmptyError,
        PoolError,
        PoolFullError,
        PoolTimeoutError,
        TrackingTimeoutError,
    )
    from darwin_metrics.resource import Cache, ResourceManager, ResourcePool, ResourceUsage

    assert issubclass(PoolTimeoutError, TimeoutError)
    assert issubclass(TrackingTimeoutError, TimeoutError)
    assert issubclass(PoolClosedError, PoolError)
    assert all(
        issubclass(error, DarwinMetricsError)
        for error in (PoolError, PoolFullError, PoolEmptyError, TrackingTimeoutError)
    )
    for component in (Cache, ResourceManager, ResourcePool, ResourceUsage):
        assert component.__module__.startswith("darwin_metrics._")  # private modules


def test_the_redis_tier_and_its_errors() -> None:
    import subprocess
    import sys

    from darwin_metrics import RedisCacheError, RedisUnavailableError, SerializationError
    from darwin_metrics.redis import JSONSerializer, PickleSerializer, RedisCache

    assert issubclass(RedisUnavailableError, RedisCacheError)
    assert issubclass(RedisUnavailableError, ConnectionError)
    assert issubclass(SerializationError, RedisCacheError)
    assert issubclass(SerializationError, ValueError)
    assert issubclass(RedisCacheError, darwin_metrics.DarwinMetricsError)
    for component in (RedisCache, JSONSerializer, PickleSerializer):
        assert component.__module__.startswith("darwin_metrics._redis.")
    # The core never imports the integration, and the integration imports coredis lazily.
    code = (
        "import sys, darwin_metrics, darwin_metrics.resource, darwin_metrics.redis; "
        "assert 'coredis' not in sys.modules, 'coredis imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
