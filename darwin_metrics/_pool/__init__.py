"""The resource pool, one idea per module.

- :mod:`._pool`: :class:`ResourcePool` (checkout, give-back, waiting, upkeep) and its leases.
- :mod:`._statistics`: :class:`PoolStatistics`, the frozen snapshot.
- :mod:`._args`: argument checks shared by the pool's constructor and methods.
"""

from __future__ import annotations

from ._pool import ResourcePool
from ._statistics import PoolDisposals, PoolStatistics

__all__ = ["PoolDisposals", "PoolStatistics", "ResourcePool"]
