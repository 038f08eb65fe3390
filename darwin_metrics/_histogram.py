"""Fixed-bucket histograms of durations, cheap enough for a hot path.

A :class:`_Recorder` keeps one count per bucket and a running sum; recording is a
:func:`bisect.bisect_left` and two additions (the total count is derived), with no lock:
the pool and the manager record from their event loop's thread only, and the cache records
under its own lock.
:meth:`_Recorder.snapshot` returns a frozen :class:`Histogram` for ``statistics()``.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Iterable

import attrs

__all__ = ["DEFAULT_BUCKETS", "Histogram"]

#: Upper bounds (seconds, inclusive) of the buckets every darwin-metrics histogram uses: from
#: 100 µs to 10 s, roughly 1-2.5-5 per decade, as Prometheus' own defaults are spaced.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@attrs.frozen
class Histogram:
    """A snapshot of a histogram of durations, in seconds.

    ``counts[i]`` is the number of observations ``v`` with ``bounds[i-1] < v <= bounds[i]``
    (the first bucket starts at 0, and the last one, ``counts[len(bounds)]``, holds those
    above the highest bound). :meth:`cumulative` gives Prometheus' ``le`` buckets.
    """

    bounds: tuple[float, ...]
    """The buckets' upper bounds, in seconds, ascending (the ``+Inf`` bucket is implied)."""
    counts: tuple[int, ...]
    """Observations per bucket, not cumulative; one more entry than ``bounds``."""
    count: int
    """How many durations were observed."""
    sum: float
    """The observed durations added up, in seconds."""

    def cumulative(self) -> list[tuple[float, int]]:
        """Return ``(upper_bound, observations <= upper_bound)`` pairs, ending with ``inf``."""
        pairs: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return pairs

    @property
    def mean(self) -> float:
        """The mean duration, or ``0.0`` before the first observation."""
        return self.sum / self.count if self.count else 0.0


def _check_bounds(bounds: Iterable[float]) -> tuple[float, ...]:
    values = tuple(bounds)
    if not values:
        raise ValueError("histogram buckets must not be empty")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"histogram bucket bounds must be numbers, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"histogram bucket bounds must be positive and finite, got {value!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"histogram bucket bounds must be strictly ascending, got {values!r}")
    return tuple(float(value) for value in values)


class _Recorder:
    """The live side of a :class:`Histogram`: ``observe`` on the hot path, ``snapshot`` to read."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = DEFAULT_BUCKETS) -> None:
        self.bounds: tuple[float, ...] = (
            DEFAULT_BUCKETS if bounds is DEFAULT_BUCKETS else _check_bounds(bounds)
        )
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one duration (negative ones, from a clock that stepped back, count as 0)."""
        if seconds < 0.0:
            seconds = 0.0
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> Histogram:
        counts = tuple(self.counts)
        return Histogram(bounds=self.bounds, counts=counts, count=sum(counts), sum=self.sum)
