"""The resource pool, one idea per module.

- :mod:`._pool`: :class:`ResourcePool`: checkout, give-back, the wait queue, the public API.
- :mod:`._upkeep`: prefill, idle reaping, retirement and leak warnings (the upkeep task).
- :mod:`._lease`: what ``lease()`` returns.
- :mod:`._entries`: what the pool keeps per resource and per lease.
- :mod:`._statistics`: :class:`PoolStatistics` and :class:`PoolDisposals`, frozen snapshots.
- :mod:`._args`: argument checks shared by the pool's constructor and methods.
"""

from __future__ import annotations

from ._pool import ResourcePool
from ._statistics import PoolDisposals, PoolStatistics

__all__ = ["PoolDisposals", "PoolStatistics", "ResourcePool"]
