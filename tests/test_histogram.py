"""The fixed-bucket duration histogram behind every ``*_seconds`` statistic."""

from __future__ import annotations

import math

import pytest

from darwin_metrics._histogram import DEFAULT_BUCKETS, Histogram, _Recorder


def test_buckets_are_inclusive_upper_bounds() -> None:
    recorder = _Recorder((0.1, 1.0))
    for value in (0.0, 0.1, 0.1000001, 1.0, 1.5, -3.0):
        recorder.observe(value)
    snapshot = recorder.snapshot()
    # 0.0, 0.1 and -3.0 (counted as 0) <= 0.1; 0.1000001 and 1.0 <= 1.0; 1.5 above.
    assert snapshot.counts == (3, 2, 1)
    assert snapshot.count == 6
    assert snapshot.sum == pytest.approx(0.1 + 0.1000001 + 1.0 + 1.5)
    assert snapshot.cumulative() == [(0.1, 3), (1.0, 5), (math.inf, 6)]
    assert snapshot.mean == pytest.approx(snapshot.sum / 6)


def test_snapshot_is_frozen_and_independent() -> None:
    recorder = _Recorder()
    recorder.observe(0.002)
    snapshot = recorder.snapshot()
    recorder.observe(0.002)
    assert snapshot.count == 1
    assert snapshot.bounds == DEFAULT_BUCKETS
    assert len(snapshot.counts) == len(DEFAULT_BUCKETS) + 1
    assert Histogram(bounds=(1.0,), counts=(0, 0), count=0, sum=0.0).mean == 0.0


@pytest.mark.parametrize(
    ("bounds", "error"),
    [
        ((), ValueError),
        ((1.0, 0.5), ValueError),
        ((0.0,), ValueError),
        ((math.inf,), ValueError),
        (("1",), TypeError),
        ((True,), TypeError),
    ],
)
def test_bad_bounds(bounds: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        _Recorder(bounds)  # type: ignore[arg-type]
