"""The public components of darwin-metrics.

- :class:`ResourcePool`: a pool of reusable resources with cancellation-safe leases.
"""

from __future__ import annotations

from ._pool import PoolStatistics, ResourcePool

__all__ = [
    "PoolStatistics",
    "ResourcePool",
]
