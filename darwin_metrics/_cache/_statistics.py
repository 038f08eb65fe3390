"""CacheStatistics: a frozen snapshot of a Cache's counters."""

from __future__ import annotations

import attrs

from .._histogram import Histogram
from ._entry import EvictionCause

__all__ = ["CacheStatistics"]


@attrs.frozen
class CacheStatistics:
    """A snapshot of a :class:`Cache`'s counters, from :meth:`Cache.statistics`.

    Exact when the cache is used from one thread. Everything but ``hits`` and ``misses``
    changes under the cache's lock and is always exact. ``hits`` and ``misses`` are counted
    without a lock (an unlocked ``+= 1`` on the hit path), so when several threads look keys
    up at the same moment a few increments can be lost: they may under-count, never
    over-count.

    **How single flight shows.** Every lookup that finds no live value is a miss, whatever
    happens next, so ``hit_ratio`` is the share of lookups answered from the cache at once.
    A miss then either runs the loader (counted in ``loads`` or ``load_failures``) or waits
    for another caller's load of the same key (``joined``). Thirty concurrent
    ``get_or_load`` calls over three cold keys read ``misses=30, loads=3, joined=27``:
    thirty callers, three loads. (A miss may also find that a load finished while it
    yielded, and count in neither.)

    The names follow Micrometer's cache metrics: ``hits``/``misses`` are its gets by result,
    ``sets`` its puts, ``evictions_by_cause`` its evictions, ``loads``/``load_failures`` its
    loads by result and ``load_duration`` its load time.
    """

    hits: int
    """Lookups that found a live entry (``get``, ``cache[key]``, ``get_many``, the loading
    methods and decorated functions)."""
    misses: int
    """Lookups that found no entry, or only an expired one."""
    sets: int
    """Entries stored, by ``set``, ``set_many``, ``cache[key] = value``, a load or a refresh
    (replacements included)."""
    evictions: int
    """Live entries evicted to respect ``maxsize`` or ``max_weight``."""
    expirations: int
    """Expired entries dropped, whichever operation found them."""
    removals: int
    """Entries removed on purpose (``remove``, ``pop``, ``del``, ``clear``, ``invalidate``)."""
    replacements: int
    """Live entries whose value a new one replaced."""
    loads: int
    """Loader calls that returned a value: ``get_or_load``, ``get_or_set``,
    ``get_or_load_many`` (one per call of ``load_many``), decorated functions and refreshes."""
    load_failures: int
    """Loader calls that raised an exception (cancelled loads count in neither)."""
    joined: int
    """Callers that found another caller's load of the same key in progress and waited for
    it instead of loading (per key, for ``get_or_load_many``)."""
    refreshes: int
    """Background refreshes started by ``refresh_after``."""
    refresh_failures: int
    """Refreshes whose loader raised (the entry kept its value); also in ``load_failures``."""
    stale_served: int
    """Callers given an expired value because the load failed (``stale_if_error``)."""
    load_duration: Histogram
    """How long each load and refresh took, in seconds, by the cache's clock, whether it
    returned or raised; ``load_duration.sum`` is the total load time."""
    size: int
    """Entries held now, including expired ones that have not been dropped yet."""
    maxsize: int | None
    """The bound on the number of entries, or ``None``."""
    weight: int
    """The total weight of the entries held; their number when the cache has no weigher."""
    max_weight: int | None
    """The bound on the total weight, or ``None`` when the cache has no weigher."""
    hit_ratio: float
    """``hits / (hits + misses)``, or ``0.0`` before the first lookup."""

    @property
    def load_time(self) -> float:
        """The total time spent loading, in seconds (``load_duration.sum``)."""
        return self.load_duration.sum

    @property
    def evictions_by_cause(self) -> dict[EvictionCause, int]:
        """How many entries left the cache, by :class:`EvictionCause`."""
        return {
            EvictionCause.EXPIRED: self.expirations,
            EvictionCause.SIZE: self.evictions,
            EvictionCause.REMOVED: self.removals,
            EvictionCause.REPLACED: self.replacements,
        }
