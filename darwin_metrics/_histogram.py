"""Fixed-bucket histograms of durations, cheap enough for a hot path.

A :class:`_Recorder` keeps one count per bucket and a running sum. Recording a duration is
one list append; the appended durations are counted into the buckets in batches (sorted,
then one bisect per bucket bound for the whole batch), which costs far less per duration
than a bisect each.
:meth:`_Recorder.snapshot` returns a frozen :class:`Histogram` for ``statistics()``.
"""

from __future__ import annotations

import itertools
import math
import threading
from bisect import bisect_right
from collections.abc import Iterable

import attrs

__all__ = ["DEFAULT_BUCKETS", "Histogram"]

#: How many appended durations a hot path lets pile up before it folds them.
FOLD_EVERY = 512

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
    """The live side of a :class:`Histogram`: ``observe`` on the hot path, ``snapshot`` to read.

    Recording appends the duration to a list (:attr:`append`, one C call, is what hot paths
    use); :meth:`fold` sorts what was appended and counts it into the buckets in one go
    (16 bisects for the lot), under a lock, as :meth:`snapshot` does first. Hot paths that use
    :attr:`append` directly call :meth:`fold` now and then (every few hundred appends), so
    the list stays short. Appends from one thread may race with a fold from another: a fold
    takes what it saw, and whatever is appended meanwhile stays for the next.
    """

    __slots__ = ("_lock", "append", "bounds", "counts", "pending", "sum")

    def __init__(self, bounds: Iterable[float] = DEFAULT_BUCKETS) -> None:
        self.bounds: tuple[float, ...] = (
            DEFAULT_BUCKETS if bounds is DEFAULT_BUCKETS else _check_bounds(bounds)
        )
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.pending: list[float] = []
        self.append = self.pending.append
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Record one duration (negative ones, from a clock that stepped back, count as 0)."""
        pending = self.pending
        pending.append(seconds)
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Count the appended durations into the buckets."""
        with self._lock:
            pending = self.pending
            taken = len(pending)
            if not taken:
                return
            batch = pending[:taken]
            del pending[:taken]  # one step: what is appended meanwhile stays
            batch.sort()
            if batch[0] < 0.0:
                batch = [max(seconds, 0.0) for seconds in batch]  # still sorted
            counts = self.counts
            low = 0
            for index, bound in enumerate(self.bounds):
                high = bisect_right(batch, bound, low)  # durations <= bound
                counts[index] += high - low
                low = high
            counts[-1] += taken - low
            self.sum += sum(batch)

    def snapshot(self) -> Histogram:
        self.fold()
        counts = tuple(self.counts)
        return Histogram(bounds=self.bounds, counts=counts, count=sum(counts), sum=self.sum)
