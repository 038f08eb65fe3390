"""The TTL cache, one idea per module.

- :mod:`._core`: :class:`Cache`: storage, lock-free lookups, changes under one lock, SIEVE
  eviction by count or weight, the mapping face, bulk get and set, statistics.
- :mod:`._loading`: single-flight loads (``get_or_load``, ``get_or_set``,
  ``get_or_load_many``), stale-if-error and negative caching.
- :mod:`._refresh`: refresh ahead and the ``refreshing()`` block that runs it.
- :mod:`._entry`: what is stored (entries, sentinels) and :class:`EvictionCause`.
- :mod:`._flight`: a load in progress, shared by the callers that wait for it.
- :mod:`._statistics`: :class:`CacheStatistics`, the frozen snapshot.
- :mod:`._options`: argument checks, and the per-load options the loading methods share.
"""

from __future__ import annotations

from ._core import Cache
from ._entry import EvictionCause
from ._statistics import CacheStatistics

__all__ = ["Cache", "CacheStatistics", "EvictionCause"]
