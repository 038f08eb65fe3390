"""Measuring, comparing and printing: what every benchmark area shares.

Every figure is sampled several times, our implementation and its anchors interleaved
(``A B C C B A A B C ...``: the order flips each round, so drift and warm-up hit every side
alike). A row's ratio is the median of the per-round ratios ``ours / anchor``, so that a slow
moment of the machine, which slows both sides of one round, cancels out. The noise shown is the
interquartile range of those per-round ratios relative to their median.
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")

Unit = Literal["s/op", "1/s", "B/entry", "fraction", "x", "keys"]
"""How a figure is measured: seconds per operation, operations per second, bytes per entry,
a fraction (a hit ratio or a spread), a plain factor or a count of keys."""


@dataclass(frozen=True)
class Goal:
    """A target for a row: ``on`` (the ratio, or our own figure) compared with ``limit``."""

    text: str
    on: Literal["ratio", "ours"]
    op: Literal["<=", ">="]
    limit: float

    def met(self, row: Row) -> bool | None:
        value = row.ratio if self.on == "ratio" else row.ours
        if value is None or math.isnan(value):
            return None
        return value <= self.limit if self.op == "<=" else value >= self.limit


@dataclass(frozen=True)
class Summary:
    """The samples of one figure, summarized."""

    median: float
    low: float
    high: float
    iqr: float  # interquartile range relative to the median
    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        values = sorted(samples)
        median = statistics.median(values)
        if len(values) >= 2 and median:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
            iqr = (q3 - q1) / abs(median)
        else:
            iqr = 0.0
        return cls(median, values[0], values[-1], iqr, tuple(samples))


@dataclass
class Row:
    """One line of the table: our figure, the anchor's figure from the same run, the ratio."""

    area: str
    name: str
    backend: str
    unit: Unit
    anchor: str
    ours: float
    anchor_value: float | None
    ratio: float | None
    ours_summary: Summary | None = None
    anchor_summary: Summary | None = None
    ratio_summary: Summary | None = None
    goal: Goal | None = None
    note: str = ""
    met: bool | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.met = None if self.goal is None else self.goal.met(self)

    @property
    def status(self) -> str:
        if self.goal is None:
            return ""
        return {True: "MET", False: "MISSED", None: "n/a"}[self.met]

    def as_json(self) -> dict[str, Any]:
        def summary(s: Summary | None) -> dict[str, Any] | None:
            if s is None:
                return None
            return {
                "median": s.median,
                "min": s.low,
                "max": s.high,
                "iqr_rel": s.iqr,
                "samples": list(s.samples),
            }

        return {
            "area": self.area,
            "name": self.name,
            "backend": self.backend,
            "unit": self.unit,
            "anchor": self.anchor,
            "ours": self.ours,
            "anchor_value": self.anchor_value,
            "ratio": self.ratio,
            "ours_samples": summary(self.ours_summary),
            "anchor_samples": summary(self.anchor_summary),
            "ratio_samples": summary(self.ratio_summary),
            "goal": None if self.goal is None else self.goal.text,
            "met": self.met,
            "note": self.note,
        }


def compare(
    area: str,
    name: str,
    backend: str,
    unit: Unit,
    anchor: str,
    ours: Sequence[float],
    theirs: Sequence[float],
    goal: Goal | None = None,
    note: str = "",
) -> Row:
    """A row from interleaved samples: ``ours[i]`` and ``theirs[i]`` come from round ``i``."""
    ratios = [o / t for o, t in zip(ours, theirs, strict=False) if t]
    ours_summary = Summary.of(ours)
    theirs_summary = Summary.of(theirs)
    ratio_summary = Summary.of(ratios) if ratios else None
    return Row(
        area=area,
        name=name,
        backend=backend,
        unit=unit,
        anchor=anchor,
        ours=ours_summary.median,
        anchor_value=theirs_summary.median,
        ratio=None if ratio_summary is None else ratio_summary.median,
        ours_summary=ours_summary,
        anchor_summary=theirs_summary,
        ratio_summary=ratio_summary,
        goal=goal,
        note=note,
    )


def interleave(
    samplers: Sequence[Callable[[], T]], repeats: int, *, warmup: bool = True
) -> list[list[T]]:
    """Run every sampler ``repeats`` times, round-robin, the order flipping each round.

    With ``warmup``, each sampler runs once first, unrecorded. A full collection runs before
    each sample so that no side pays for garbage that another left behind.
    """
    if warmup:
        for sampler in samplers:
            sampler()
    results: list[list[T]] = [[] for _ in samplers]
    order = list(range(len(samplers)))
    for round_ in range(repeats):
        for index in order if round_ % 2 == 0 else reversed(order):
            gc.collect()
            results[index].append(samplers[index]())
    return results


async def ainterleave(
    samplers: Sequence[Callable[[], Awaitable[T]]], repeats: int, *, warmup: bool = True
) -> list[list[T]]:
    """:func:`interleave` for async samplers, all run in the current event loop."""
    if warmup:
        for sampler in samplers:
            await sampler()
    results: list[list[T]] = [[] for _ in samplers]
    order = list(range(len(samplers)))
    for round_ in range(repeats):
        for index in order if round_ % 2 == 0 else reversed(order):
            gc.collect()
            results[index].append(await samplers[index]())
    return results


# ---------------------------------------------------------------------- formatting


def format_value(value: float | None, unit: Unit) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "s/op":
        if value < 1e-6:
            return f"{value * 1e9:.0f} ns"
        if value < 1e-3:
            return f"{value * 1e6:.2f} µs"
        return f"{value * 1e3:.2f} ms"
    if unit == "1/s":
        if value >= 1e6:
            return f"{value / 1e6:.2f}M/s"
        if value >= 1e3:
            return f"{value / 1e3:.0f}k/s"
        return f"{value:.0f}/s"
    if unit == "B/entry":
        return f"{value:.0f} B"
    if unit == "fraction":
        return f"{value * 100:.2f}%" if value < 0.1 else f"{value:.3f}"
    if unit == "keys":
        return f"{value:.0f}"
    return f"{value:.2f}x"


def format_table(rows: Sequence[Row], *, markdown: bool = False) -> str:
    header = ("area", "row", "backend", "ours", "anchor", "anchor's", "ratio", "noise", "goal")
    lines = [header]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        noise = "-" if row.ratio_summary is None else f"{row.ratio_summary.iqr * 100:.0f}%"
        goal = "" if row.goal is None else f"{row.goal.text}: {row.status}"
        lines.append(
            (
                row.area,
                row.name,
                row.backend,
                format_value(row.ours, row.unit),
                row.anchor,
                format_value(row.anchor_value, row.unit),
                ratio,
                noise,
                goal,
            )
        )
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        return "\n".join(out)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


@dataclass(frozen=True)
class Config:
    """How much to measure: ``--quick`` (seconds, to check that the suite works) or full."""

    quick: bool
    repeats: int  # samples per figure, interleaved
    async_ops: int  # operations per sample of an async micro-benchmark
    cache_loops: int  # passes over the 10k keys per sample of a cache micro-benchmark
    thread_gets: int  # gets per thread per sample of the threads benchmark
    contended_per_task: int  # leases per task in the contended pool benchmark
    contended_repeats: int
    deliveries: int  # deliveries per sample of a broadcast benchmark
    broadcast_repeats: int
    zipf_keys: int
    zipf_length: int
    zipf_seeds: int
    memory_entries: int
    stampede_callers: int
    stampede_repeats: int
    smoke: bool = False  # --smoke: areas with sizes of their own make them smallest too

    @classmethod
    def make(cls, quick: bool, smoke: bool = False) -> Config:
        if smoke:  # the test suite's run: every row once, as small as still means something
            return cls(
                quick=True,
                repeats=2,
                async_ops=300,
                cache_loops=1,
                thread_gets=5_000,
                contended_per_task=20,
                contended_repeats=1,
                deliveries=1_000,
                broadcast_repeats=2,
                zipf_keys=2_000,
                zipf_length=10_000,
                zipf_seeds=1,
                memory_entries=5_000,
                stampede_callers=100,
                stampede_repeats=1,
                smoke=True,
            )
        if quick:
            return cls(
                quick=True,
                repeats=3,
                async_ops=2_000,
                cache_loops=1,
                thread_gets=30_000,
                contended_per_task=100,
                contended_repeats=2,
                deliveries=4_000,
                broadcast_repeats=3,
                zipf_keys=20_000,
                zipf_length=100_000,
                zipf_seeds=1,
                memory_entries=30_000,
                stampede_callers=200,
                stampede_repeats=1,
            )
        return cls(
            quick=False,
            repeats=11,
            async_ops=10_000,
            cache_loops=5,
            thread_gets=300_000,
            contended_per_task=500,
            contended_repeats=5,
            deliveries=30_000,
            broadcast_repeats=7,
            zipf_keys=100_000,
            zipf_length=500_000,
            zipf_seeds=2,
            memory_entries=100_000,
            stampede_callers=1_000,
            stampede_repeats=5,
        )
