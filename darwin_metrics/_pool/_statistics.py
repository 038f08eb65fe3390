"""PoolStatistics: a frozen snapshot of a ResourcePool's state and counters."""

from __future__ import annotations

import attrs

__all__ = ["PoolStatistics"]


@attrs.frozen
class PoolStatistics:
    """A snapshot of a :class:`ResourcePool`'s state and counters."""

    max_size: int
    """The most resources the pool may own, idle and leased together."""
    size: int
    """Resources the pool owns now (idle, leased, and any being checked or reset)."""
    idle: int
    """Resources waiting in the pool to be leased."""
    leased: int
    """Resources leased out now."""
    waiting: int
    """Tasks waiting for a resource."""
    created: int
    """Resources the pool took ownership of: made by the factory or added with ``release``."""
    disposed: int
    """Resources that left the pool (discarded, failed a check or reset, retired, closed)."""
    acquired: int
    """Successful acquisitions (``acquire``, ``try_acquire`` and ``lease``)."""
    timeouts: int
    """Acquisitions that ended with :class:`~darwin_metrics.PoolTimeoutError`."""
    total_wait: float
    """Seconds that acquisitions spent waiting for a resource, summed."""
    longest_wait: float
    """The longest time one acquisition waited for a resource, in seconds."""
