"""The exceptions darwin-metrics raises on purpose.

Every one of them derives from :class:`DarwinMetricsError`; each also derives from the
built-in or anyio exception whose meaning it shares, so ``except TimeoutError`` and
``except anyio.ClosedResourceError`` catch them too.
"""

from __future__ import annotations

import anyio

__all__ = [
    "CapacityLostError",
    "DarwinMetricsError",
    "PoolClosedError",
    "PoolEmptyError",
    "PoolError",
    "PoolFullError",
    "PoolOverloadedError",
    "PoolPausedError",
    "PoolTimeoutError",
    "RedisCacheError",
    "RedisUnavailableError",
    "ResourceCheckError",
    "SerializationError",
    "TrackingTimeoutError",
    "UsageRelayError",
]


class DarwinMetricsError(Exception):
    """Base class of every error that darwin-metrics raises on purpose."""


class PoolError(DarwinMetricsError):
    """Base class of the errors raised by :class:`~darwin_metrics.resource.ResourcePool` and
    :class:`~darwin_metrics.resource.KeyedResourcePool`."""


class PoolFullError(PoolError):
    """A new resource was added to a pool that already owns ``max_size`` resources.

    The pool is unchanged; the resource still belongs to the caller.
    """


class PoolEmptyError(PoolError):
    """A lease was asked of a pool that owns no resource and has no factory to make one.

    Waiting could never end, so :meth:`~darwin_metrics.resource.ResourcePool.lease` raises
    this at once instead (``acquire`` answers ``None``). Release a resource into the pool,
    or give it a ``factory``.
    """


class PoolClosedError(PoolError, anyio.ClosedResourceError):
    """The pool was closed before, or while, the operation waited."""


class PoolOverloadedError(PoolError):
    """An acquisition was refused at once because too many tasks already wait.

    Raised instead of waiting when the pool's ``max_waiting`` tasks are already waiting for a
    resource, so that a service under load sheds work instead of queueing it for ever (as
    psycopg_pool's ``max_waiting`` does). Nothing was taken and nothing changed; try again
    later, or answer the request with an error (an HTTP 503, say).
    """


class PoolTimeoutError(PoolError, TimeoutError):
    """No resource became available within the ``timeout`` given to acquire or lease."""


class PoolPausedError(PoolError):
    """The pool was paused with ``pause(reject=True)``: acquisitions fail until ``resume()``.

    Leases already out keep working and can be given back.
    """


class ResourceCheckError(PoolError):
    """A resource the factory had just made failed ``check`` (with ``check_on_create``).

    It was disposed, and counted as a factory error; nothing was acquired.
    """


class TrackingTimeoutError(DarwinMetricsError, TimeoutError):
    """Delivering a usage event to ``"wait"`` subscribers took longer than the timeout.

    The usage was recorded in the statistics; the subscribers that received it keep it.
    """

    def __init__(self, resource_type: str, timeout: float) -> None:
        super().__init__(
            f"tracking {resource_type!r} usage did not finish within {timeout} s: "
            "a 'wait' subscriber's buffer stayed full"
        )
        self.resource_type = resource_type
        self.timeout = timeout


class RedisCacheError(DarwinMetricsError):
    """Base class of the errors raised by :class:`~darwin_metrics.redis.RedisCache`."""


class RedisUnavailableError(RedisCacheError, ConnectionError):
    """The Valkey/Redis server could not be reached, refused the connection, or dropped it.

    Raised by :class:`~darwin_metrics.redis.RedisCache` and by
    :class:`~darwin_metrics.redis.SharedCapacityLimiter`.

    The error's ``__cause__`` is the client library's own error. An operation that raised
    this left the in-process tier consistent: a write that may or may not have reached the
    server has still dropped the key from the process's local cache. Starting a usage relay
    (:meth:`ResourceManager.relay <darwin_metrics.resource.ResourceManager.relay>`) raises it
    too, and then leaves nothing running.
    """


class SerializationError(RedisCacheError, ValueError):
    """A value could not be turned into bytes, or bytes read from the server into a value.

    Raised before anything is written (a value the serializer cannot handle), or instead of
    returning what the server holds (bytes the serializer cannot read; nothing is cached
    locally). The error's ``__cause__`` is the serializer's own error.
    """


class UsageRelayError(DarwinMetricsError):
    """The server refused what a usage relay needs: its stream key holds another type of
    value, or the user may not run ``XADD`` / ``XREAD`` / ``XINFO`` on it.

    Raised when the relay starts (nothing is left running); the message names the key and
    the server's answer.
    """


class CapacityLostError(DarwinMetricsError):
    """A permit of a :class:`~darwin_metrics.redis.SharedCapacityLimiter` was lost while held.

    Its lease ran out before the limiter could renew it (the process could not reach the
    server for a whole lease), so the server may have granted it to another process; or the
    limiter stopped. The ``async with limiter:`` block that held it was cancelled, and leaving
    it raises this.
    """
