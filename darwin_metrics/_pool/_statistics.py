"""PoolStatistics: a frozen snapshot of a ResourcePool's state and counters."""

from __future__ import annotations

from typing import Literal

import attrs

from .._histogram import Histogram

__all__ = ["DisposalReason", "PoolDisposals", "PoolStatistics", "TimingKind"]

DisposalReason = Literal[
    "discarded", "check_failed", "reset_failed", "idle", "lifetime", "shrunk", "drained", "closed"
]
"""Why a resource left a pool: one field of :class:`PoolDisposals`."""

TimingKind = Literal["wait", "use", "create"]
"""What a duration given to a pool's ``on_timing`` listener measured."""


@attrs.frozen
class PoolDisposals:
    """Resources that left a pool, by why they left; the fields add up to ``disposed``."""

    discarded: int
    """Given to :meth:`~darwin_metrics.resource.ResourcePool.discard`, or refused by
    :meth:`~darwin_metrics.resource.ResourcePool.retain`."""
    check_failed: int
    """Failed the ``check`` hook on checkout or creation, or ``ping`` while idle (returned
    false, raised, or was interrupted)."""
    reset_failed: int
    """Failed the ``reset`` hook on return (raised, or ran past ``hook_timeout``)."""
    idle: int
    """Idle for longer than ``max_idle_time``."""
    lifetime: int
    """Older than ``max_lifetime``."""
    shrunk: int
    """Surplus once :meth:`~darwin_metrics.resource.ResourcePool.resize` made the pool
    smaller."""
    drained: int
    """Made before :meth:`~darwin_metrics.resource.ResourcePool.drain` was called."""
    closed: int
    """Idle when the pool closed, or given back after it closed."""


@attrs.frozen
class PoolStatistics:
    """A snapshot of a :class:`ResourcePool`'s state and counters.

    The durations are :class:`~darwin_metrics.resource.Histogram` snapshots in seconds,
    with buckets from 100 µs to 10 s.
    """

    max_size: int
    """The most resources the pool may own, idle and leased together."""
    min_idle: int
    """Idle resources that upkeep keeps ready."""
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
    disposals: PoolDisposals
    """``disposed``, by why each resource left."""
    factory_errors: int
    """Calls of the factory that raised (or were cancelled)."""
    acquired: int
    """Successful acquisitions (``acquire``, ``try_acquire`` and ``lease``)."""
    acquired_after_wait: int
    """Successful acquisitions that had to wait for another task's resource first."""
    waits_abandoned: int
    """Waits that ended without a resource: cancelled, or timed out."""
    timeouts: int
    """Acquisitions that ended with :class:`~darwin_metrics.PoolTimeoutError`."""
    total_wait: float
    """Seconds that acquisitions spent waiting for a resource, summed."""
    longest_wait: float
    """The longest time one acquisition waited for a resource, in seconds."""
    wait_time: Histogram
    """How long acquisitions that had to wait waited (those that gave up included)."""
    use_time: Histogram
    """How long resources were held, from acquisition to return (or discard)."""
    create_time: Histogram
    """How long the factory took to make each resource it made."""

    @property
    def acquired_at_once(self) -> int:
        """Successful acquisitions that found a resource without waiting for another task."""
        return self.acquired - self.acquired_after_wait
