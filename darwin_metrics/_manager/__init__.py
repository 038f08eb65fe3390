"""The usage tracker, one idea per module.

- :mod:`._manager`: :class:`ResourceManager` (tracking, fan-out, statistics, samplers).
- :mod:`._subscription`: :class:`Subscription` and how events reach each subscriber.
- :mod:`._samplers`: what the samplers read (a pool, this machine through psutil).
- :mod:`._usage`: :class:`ResourceUsage`, :class:`UsageStatistics` and the argument checks.
"""

from __future__ import annotations

from ._manager import ResourceManager
from ._subscription import OverflowPolicy, Subscription
from ._usage import ResourceUsage, UsageStatistics

__all__ = ["OverflowPolicy", "ResourceManager", "ResourceUsage", "Subscription", "UsageStatistics"]
