"""What the exporters share: the named sources they read, and how a snapshot maps to series.

:mod:`darwin_metrics.prometheus` and :mod:`darwin_metrics.otel` both export pools, caches and
managers registered under a name. :class:`Sources` holds them (replaced, never mutated, so a
scrape in another thread iterates over a consistent set), and the functions below turn one
snapshot into the figures both exporters publish, so that the two never disagree.

Nothing here imports a third-party library.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final, TypeAlias, TypeVar

import attrs

from ._cache import Cache, CacheStatistics, EvictionCause
from ._manager import ResourceManager
from ._pool import (
    KeyedPoolStatistics,
    KeyedResourcePool,
    PoolStatistics,
    ResourcePool,
)

__all__ = [
    "EVICTION_CAUSES",
    "AnyPool",
    "AnyPoolStatistics",
    "Sources",
    "cache_evictions",
    "pool_connections",
    "pool_disposals",
    "pool_max",
]

#: What the exporters take as a pool: a :class:`ResourcePool`, or a
#: :class:`KeyedResourcePool` exported as one pool (its totals over every key).
AnyPool: TypeAlias = "ResourcePool[Any] | KeyedResourcePool[Any, Any]"
AnyPoolStatistics: TypeAlias = "PoolStatistics | KeyedPoolStatistics[Any]"

#: The ``cause`` label's values of ``cache_evictions_total`` / ``cache.evictions``.
EVICTION_CAUSES: Final = ("size", "expired")

S = TypeVar("S")


def pool_connections(stats: AnyPoolStatistics) -> tuple[int, int]:
    """``(idle, used)``: used is every resource the pool owns that is not idle.

    That is the leased ones and any being checked or reset, so that idle + used is the
    pool's size, as OpenTelemetry's ``db.client.connection.count`` states add up.
    """
    return stats.idle, stats.size - stats.idle


def pool_max(stats: AnyPoolStatistics) -> int:
    """The most resources the pool may own: ``max_size``, or a keyed pool's ``max_total``."""
    if isinstance(stats, PoolStatistics):
        return stats.max_size
    return stats.max_total


def pool_disposals(stats: AnyPoolStatistics) -> Iterator[tuple[str, int]]:
    """``(reason, count)`` for each field of the snapshot's disposals, in their order.

    A :class:`ResourcePool`'s reasons are :class:`PoolDisposals`' fields; a keyed pool's are
    its own (``evicted`` among them, no ``shrunk``).
    """
    disposals = stats.disposals
    for field in attrs.fields(type(disposals)):
        yield field.name, getattr(disposals, field.name)


def cache_evictions(stats: CacheStatistics) -> tuple[tuple[str, int], ...]:
    """``(cause, count)`` for each value of :data:`EVICTION_CAUSES`.

    ``size``: live entries evicted to respect ``maxsize`` or ``max_weight``; ``expired``:
    expired entries dropped. Entries removed on purpose or replaced are not evictions (as
    Caffeine, whose users' dashboards read these series, counts them).
    """
    by_cause = stats.evictions_by_cause
    return (("size", by_cause[EvictionCause.SIZE]), ("expired", by_cause[EvictionCause.EXPIRED]))


def _check_name(kind: str, name: object, *, empty: bool = False) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a {kind}'s name must be a str, got {type(name).__name__} {name!r}")
    if not name and not empty:
        raise ValueError(f"a {kind}'s name must not be empty")
    return name


def _mapping(argument: str, values: Mapping[str, S] | None) -> Mapping[str, S]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(
            f"{argument} must be a mapping of names to sources, got {type(values).__name__}"
        )
    return values


class Sources:
    """Pools, caches and managers by name, for an exporter to read at collection time.

    Every method is safe from any thread: the mappings are replaced, never changed in place,
    so a collection running meanwhile sees the sources as they were when it started.
    """

    __slots__ = ("_caches", "_managers", "_pools")

    def __init__(
        self,
        *,
        pools: Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]] | None = None,
        caches: Mapping[str, Cache[Any, Any]] | None = None,
        managers: Mapping[str, ResourceManager] | None = None,
    ) -> None:
        self._pools: dict[str, AnyPool] = {}
        self._caches: dict[str, Cache[Any, Any]] = {}
        self._managers: dict[str, ResourceManager] = {}
        for name, pool in _mapping("pools", pools).items():
            self.add_pool(name, pool)
        for name, cache in _mapping("caches", caches).items():
            self.add_cache(name, cache)
        for name, manager in _mapping("managers", managers).items():
            self.add_manager(name, manager)

    @staticmethod
    def _added(
        kind: str,
        current: dict[str, S],
        name: object,
        source: object,
        cls: type[Any] | tuple[type[Any], ...],
    ) -> dict[str, S]:
        checked = _check_name(kind, name)
        if not isinstance(source, cls):
            expected = (
                " or a ".join(c.__name__ for c in cls) if isinstance(cls, tuple) else cls.__name__
            )
            raise TypeError(
                f"{kind} {checked!r} must be a {expected}, got {type(source).__name__}"
            )
        if checked in current:
            raise ValueError(
                f"a {kind} named {checked!r} is already exported: remove it first, or choose "
                "another name"
            )
        return {**current, checked: source}

    def add_pool(self, name: str, pool: ResourcePool[Any] | KeyedResourcePool[Any, Any]) -> None:
        """Export ``pool`` under ``name`` (the value of its pool name label or attribute).

        A :class:`~darwin_metrics.resource.KeyedResourcePool` is exported as one pool: its
        totals over every key, with ``max_total`` as its maximum and its own disposal reasons.

        Raises:
            TypeError: ``name`` is not a str, or ``pool`` is neither a ResourcePool nor a
                KeyedResourcePool.
            ValueError: ``name`` is empty, or a pool is already exported under it.
        """
        self._pools = self._added(
            "pool", self._pools, name, pool, (ResourcePool, KeyedResourcePool)
        )

    def add_cache(self, name: str, cache: Cache[Any, Any]) -> None:
        """Export ``cache`` under ``name`` (the value of its ``cache`` label or attribute).

        Raises:
            TypeError: ``name`` is not a str, or ``cache`` is not a Cache.
            ValueError: ``name`` is empty, or a cache is already exported under it.
        """
        self._caches = self._added("cache", self._caches, name, cache, Cache)

    def add_manager(self, name: str, manager: ResourceManager) -> None:
        """Export ``manager``'s usage statistics under ``name`` (its manager label or attribute).

        Raises:
            TypeError: ``name`` is not a str, or ``manager`` is not a ResourceManager.
            ValueError: ``name`` is empty, or a manager is already exported under it.
        """
        self._managers = self._added("manager", self._managers, name, manager, ResourceManager)

    def remove_pool(self, name: str) -> bool:
        """Stop exporting the pool named ``name``; return whether there was one.

        Raises:
            TypeError: ``name`` is not a str.
        """
        present = _check_name("pool", name, empty=True) in self._pools
        self._pools = {key: value for key, value in self._pools.items() if key != name}
        return present

    def remove_cache(self, name: str) -> bool:
        """Stop exporting the cache named ``name``; return whether there was one.

        Raises:
            TypeError: ``name`` is not a str.
        """
        present = _check_name("cache", name, empty=True) in self._caches
        self._caches = {key: value for key, value in self._caches.items() if key != name}
        return present

    def remove_manager(self, name: str) -> bool:
        """Stop exporting the manager named ``name``; return whether there was one.

        Raises:
            TypeError: ``name`` is not a str.
        """
        present = _check_name("manager", name, empty=True) in self._managers
        self._managers = {key: value for key, value in self._managers.items() if key != name}
        return present

    @property
    def pools(self) -> Mapping[str, ResourcePool[Any] | KeyedResourcePool[Any, Any]]:
        """The exported pools by name (a snapshot: adding or removing one replaces it)."""
        return self._pools

    @property
    def caches(self) -> Mapping[str, Cache[Any, Any]]:
        """The exported caches by name (a snapshot: adding or removing one replaces it)."""
        return self._caches

    @property
    def managers(self) -> Mapping[str, ResourceManager]:
        """The exported managers by name (a snapshot: adding or removing one replaces it)."""
        return self._managers
