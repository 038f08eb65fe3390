"""Frozen snapshots of a KeyedResourcePool: overall, per key, and its disposals by reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, Literal, TypeVar

import attrs

from .._histogram import Histogram

__all__ = [
    "KeyStatistics",
    "KeyedDisposalReason",
    "KeyedPoolDisposals",
    "KeyedPoolStatistics",
]

K = TypeVar("K")

KeyedDisposalReason = Literal[
    "discarded", "check_failed", "reset_failed", "idle", "lifetime", "evicted", "drained", "closed"
]
"""Why a resource left a keyed pool: one field of :class:`KeyedPoolDisposals`."""


@attrs.frozen
class KeyedPoolDisposals:
    """Resources that left a keyed pool, by why they left; the fields add up to ``disposed``."""

    discarded: int
    """Given to :meth:`~darwin_metrics.resource.KeyedResourcePool.discard`."""
    check_failed: int
    """Failed the ``check`` hook on checkout (returned false, raised, or was interrupted)."""
    reset_failed: int
    """Failed the ``reset`` hook on return (raised, or ran past ``hook_timeout``)."""
    idle: int
    """Idle for longer than ``max_idle_time``, or idle in a key that nobody used for that long."""
    lifetime: int
    """Older than ``max_lifetime``."""
    evicted: int
    """Idle in one key while ``max_total`` was reached and a task waited for another key: the
    longest idle resource of the pool made room for it."""
    drained: int
    """Made before :meth:`~darwin_metrics.resource.KeyedResourcePool.drain`: disposed when it
    was called (idle ones) or when they came back (leased ones)."""
    closed: int
    """Idle when the pool closed, or given back after it closed."""


@attrs.frozen
class KeyStatistics:
    """A snapshot of one key of a :class:`~darwin_metrics.resource.KeyedResourcePool`.

    A key's counters start at zero when the key appears (its first acquisition) and go with
    it when it disappears (nothing leased, idle or waiting is left for it).
    """

    size: int
    """Resources counted against ``max_per_key`` now: idle, leased, being made, checked, reset
    or disposed."""
    idle: int
    """Resources of this key waiting to be leased."""
    leased: int
    """Resources of this key leased out now."""
    waiting: int
    """Tasks waiting for a resource of this key (one whose wait was just cancelled counts until
    it runs again)."""
    created: int
    """Resources the factory made for this key."""
    disposed: int
    """Resources of this key that left the pool, for any reason (``evicted`` included)."""
    evicted: int
    """Resources of this key disposed to make room for another key (see
    :attr:`KeyedPoolDisposals.evicted`)."""
    factory_errors: int
    """Calls of the factory for this key that raised (or were cancelled)."""
    acquired: int
    """Successful acquisitions of this key."""
    acquired_after_wait: int
    """Successful acquisitions of this key that had to wait for another task first."""
    waits_abandoned: int
    """Waits for this key that ended without a resource: cancelled, timed out or closed."""
    timeouts: int
    """Acquisitions of this key that ended with :class:`~darwin_metrics.PoolTimeoutError`."""
    rejected: int
    """Acquisitions of this key refused with :class:`~darwin_metrics.PoolOverloadedError`."""
    total_wait: float
    """Seconds that acquisitions of this key spent waiting, summed."""


@attrs.frozen
class KeyedPoolStatistics(Generic[K]):
    """A snapshot of a :class:`~darwin_metrics.resource.KeyedResourcePool`, overall and per key.

    The overall counters cover the pool's whole life, keys that came and went included. The
    durations are :class:`~darwin_metrics.resource.Histogram` snapshots in seconds, with
    buckets from 100 µs to 10 s.
    """

    max_per_key: int
    """The most resources one key may hold, idle and leased together."""
    max_total: int
    """The most resources the pool may hold over all keys, idle and leased together."""
    min_idle: int
    """Idle resources that upkeep keeps ready for each key in use."""
    keys: int
    """Keys the pool holds now: each has something leased, idle, being made or waiting."""
    size: int
    """Resources counted against ``max_total`` now: idle, leased, being made, checked, reset or
    disposed (a resource evicted to make room hands its place to the one being made)."""
    idle: int
    """Resources waiting to be leased, over all keys."""
    leased: int
    """Resources leased out now, over all keys."""
    waiting: int
    """Tasks waiting for a resource, over all keys (``max_waiting`` bounds it; one whose wait
    was just cancelled counts until it runs again)."""
    created: int
    """Resources the factory made."""
    disposed: int
    """Resources that left the pool (discarded, failed a check or reset, retired, evicted,
    closed)."""
    disposals: KeyedPoolDisposals
    """``disposed``, by why each resource left."""
    factory_errors: int
    """Calls of the factory that raised (or were cancelled)."""
    acquired: int
    """Successful acquisitions (``acquire``, ``try_acquire`` and ``lease``)."""
    acquired_after_wait: int
    """Successful acquisitions that had to wait for another task first."""
    waits_abandoned: int
    """Waits that ended without a resource: cancelled, timed out, or closed."""
    timeouts: int
    """Acquisitions that ended with :class:`~darwin_metrics.PoolTimeoutError`."""
    rejected: int
    """Acquisitions refused at once with :class:`~darwin_metrics.PoolOverloadedError` because
    ``max_waiting`` tasks were already waiting."""
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
    per_key: Mapping[K, KeyStatistics]
    """A snapshot of every key the pool holds now."""

    @property
    def acquired_at_once(self) -> int:
        """Successful acquisitions that found a resource without waiting for another task."""
        return self.acquired - self.acquired_after_wait
