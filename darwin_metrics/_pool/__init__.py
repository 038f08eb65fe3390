"""The resource pools, one idea per module.

- :mod:`._pool`: :class:`ResourcePool`: checkout, give-back, the wait queue, the public API.
- :mod:`._upkeep`: prefill, idle reaping, retirement and leak warnings (the upkeep task).
- :mod:`._shared`: ``shared_limit``: a token of a limit shared with other processes per
  resource created, given back once the resource is disposed.
- :mod:`._lease`: what ``lease()`` returns.
- :mod:`._entries`: what the pool keeps per resource and per lease.
- :mod:`._statistics`: :class:`PoolStatistics` and :class:`PoolDisposals`, frozen snapshots.
- :mod:`._args`: argument checks shared by the pool's constructor and methods.
- :mod:`._keyed`: :class:`KeyedResourcePool`, a pool of pools by key under a per-key and an
  overall limit, with its queues of keys and its fairness rule (with :mod:`._keyed_core`,
  :mod:`._keyed_upkeep`, :mod:`._keyed_parts` and :mod:`._keyed_statistics`).
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
