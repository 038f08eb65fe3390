"""The resource pools, one idea per module.

- :mod:`._pool`: :class:`ResourcePool` (checkout, give-back, waiting, upkeep) and its leases.
- :mod:`._keyed`: :class:`KeyedResourcePool`, a pool of pools by key under a per-key and an
  overall limit, with its queues of keys and its fairness rule.
- :mod:`._statistics` and :mod:`._keyed_statistics`: the frozen snapshots.
- :mod:`._args`: argument checks shared by the pools' constructors and methods.
- :mod:`._backend`: the running backend's primitives, resolved once for the hot paths.
"""

from __future__ import annotations

from ._keyed import KeyedResourcePool
from ._keyed_statistics import KeyedPoolDisposals, KeyedPoolStatistics, KeyStatistics
from ._pool import ResourcePool
from ._statistics import PoolDisposals, PoolStatistics

__all__ = [
    "KeyStatistics",
    "KeyedPoolDisposals",
    "KeyedPoolStatistics",
    "KeyedResourcePool",
    "PoolDisposals",
    "PoolStatistics",
    "ResourcePool",
]
