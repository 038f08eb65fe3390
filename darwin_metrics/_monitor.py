"""``darwin-metrics monitor``: a ResourceManager sampling this machine, shown live or as JSON.

The monitor is the library's three parts at work: :meth:`ResourceManager.sample_system`
tracks cpu, memory, swap and disk usage every interval, one :class:`Subscription` carries the
usages to the view, and :meth:`ResourceManager.usage_statistics` gives the peaks and means.

Two views read the same subscription:

- JSON lines: one object per :class:`ResourceUsage`, flushed as it arrives, for piping.
- Live: a ``rich`` table with a bar per resource (current, peak, mean), redrawn whenever a
  batch of usages arrives, that is every interval; a summary is printed on exit.

Everything here runs inside one ``anyio.run``; the command line is in ``__main__``.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, TextIO

import anyio
import attrs

from ._manager import ResourceManager, ResourceUsage, Subscription, UsageStatistics

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["MonitorOptions", "render_view", "run_monitor", "usage_json"]

Backend = Literal["asyncio", "trio"]

# Enough for many intervals of a machine with many disks: the view never falls behind that far,
# and if it does, the oldest usages are dropped (the statistics still count them).
_BUFFER_SIZE = 4096
_SYSTEM_ORDER = {"cpu": 0, "memory": 1, "swap": 2}
_BAR_WIDTH = 24


@attrs.frozen
class MonitorOptions:
    """What ``darwin-metrics monitor`` was asked to do."""

    interval: float = 1.0
    """Seconds between two samples of the machine (finite and positive)."""
    duration: float = 0.0
    """Seconds after which the monitor stops by itself; 0 runs until interrupted."""
    backend: Backend = "asyncio"
    """The event loop that runs the monitor."""
    json: bool = False
    """Print JSON lines instead of the live view."""
    save_svg: str | None = None
    """Where to save the final view as an SVG picture, if anywhere."""


def usage_json(usage: ResourceUsage) -> str:
    """Return one usage as a JSON object on one line.

    Its fields are those of :class:`ResourceUsage`: ``resource_type`` (str), ``usage_percent``
    (a number, 0 or more), ``timestamp`` (the event loop's clock, in seconds) and
    ``wall_time`` (seconds since the epoch).
    """
    return json.dumps(attrs.asdict(usage), allow_nan=False)


def _sort_key(resource_type: str) -> tuple[int, str]:
    return _SYSTEM_ORDER.get(resource_type, len(_SYSTEM_ORDER)), resource_type


def _style(percent: float) -> str:
    if percent >= 90:
        return "red"
    if percent >= 70:
        return "yellow"
    return "green"


def render_view(
    statistics: Mapping[str, UsageStatistics],
    *,
    interval: float,
    elapsed: float,
    final: bool = False,
) -> RenderableType:
    """Return the monitor's table: a row per resource with a bar, current, peak and mean.

    Args:
        statistics: What the manager recorded, by resource type.
        interval: The sampling interval, for the title.
        elapsed: Seconds since the monitor started, for the caption.
        final: Whether this is the summary printed on exit.
    """
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    host = platform.node() or "this machine"
    table = Table(
        title=f"darwin-metrics monitor: {host}, every {interval:g} s",
        caption=(
            f"{'stopped' if final else 'running'} after {elapsed:.1f} s"
            + ("" if final else "; Ctrl-C to stop")
        ),
        title_style="bold",
        caption_justify="right",
    )
    table.add_column("resource", no_wrap=True)
    table.add_column("usage", width=_BAR_WIDTH, no_wrap=True)
    table.add_column("current", justify="right", no_wrap=True)
    table.add_column("peak", justify="right", no_wrap=True)
    table.add_column("mean", justify="right", no_wrap=True)
    table.add_column("samples", justify="right", no_wrap=True, style="dim")
    for resource_type in sorted(statistics, key=_sort_key):
        stats = statistics[resource_type]
        style = _style(stats.last)
        bar = ProgressBar(
            total=100.0,
            completed=min(stats.last, 100.0),
            width=_BAR_WIDTH,
            complete_style=style,
            finished_style=style,
        )
        table.add_row(
            resource_type,
            bar,
            Text(f"{stats.last:.1f}%", style=style),
            Text(f"{stats.max:.1f}%", style=_style(stats.max)),
            f"{stats.mean:.1f}%",
            str(stats.count),
        )
    if not statistics:
        table.add_row("(waiting for the first sample)", "", "", "", "", "")
    return table


async def _print_json(subscription: Subscription, out: TextIO) -> None:
    # One batch per wake-up: a burst (cpu, memory, swap, then the disks) costs one flush.
    while batch := await subscription.next_batch():
        out.write("".join(usage_json(usage) + "\n" for usage in batch))
        out.flush()


async def _show_live(
    manager: ResourceManager, subscription: Subscription, console: Console, interval: float
) -> None:
    from rich.live import Live

    started = anyio.current_time()

    def view() -> RenderableType:
        elapsed = anyio.current_time() - started
        return render_view(manager.usage_statistics(), interval=interval, elapsed=elapsed)

    with Live(view(), console=console, auto_refresh=False, transient=True) as live:
        while await subscription.next_batch():
            live.update(view(), refresh=True)


async def run_monitor(
    options: MonitorOptions,
    manager: ResourceManager,
    *,
    out: TextIO | None = None,
    console: Console | None = None,
) -> None:
    """Sample this machine with ``manager`` until ``options.duration`` runs out or cancelled.

    Prints JSON lines to ``out`` (standard output by default) when ``options.json``, else the
    live view to ``console``. The caller keeps ``manager``, so it can still print the summary
    from :meth:`ResourceManager.usage_statistics` after a ``KeyboardInterrupt``.

    Raises:
        ModuleNotFoundError: psutil (or, for the live view, rich) is not installed.
    """
    deadline = math.inf if options.duration == 0 else options.duration
    async with manager:
        with manager.subscribe(buffer_size=_BUFFER_SIZE) as subscription:
            manager.sample_system(interval=options.interval)
            with anyio.move_on_after(deadline):
                if options.json:
                    await _print_json(subscription, sys.stdout if out is None else out)
                else:
                    assert console is not None
                    await _show_live(manager, subscription, console, options.interval)
