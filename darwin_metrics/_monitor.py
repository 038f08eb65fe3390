"""``darwin-metrics monitor``: a ResourceManager sampling this machine, shown live or as JSON.

The monitor is the library's three parts at work: :meth:`ResourceManager.sample_system`
tracks cpu, memory, swap and disk usage every interval, one :class:`Subscription` carries the
usages to the view, and :meth:`ResourceManager.usage_statistics` gives the peaks and means.

Two views read the same subscription:

- JSON lines: one object per :class:`ResourceUsage`, flushed as it arrives, for piping.
- Live: a ``rich`` table with a bar per resource (current, peak, mean), redrawn whenever a
  batch of usages arrives, that is every interval, and laid out for the terminal's width
  each time it is drawn; a summary is printed on exit.

With ``--redis URL`` (:attr:`MonitorOptions.redis`) the manager also runs a usage relay
(:meth:`ResourceManager.relay`): it publishes this machine's usages and receives every other
relay's on the same server, and both views show a row per source and resource
(:func:`render_fleet_view`), or a ``source`` in each JSON line.

Everything here runs inside one ``anyio.run``, on asyncio or trio; the command line (options,
missing dependencies, exit statuses) is in ``__main__``. The monitor writes through a
:class:`GuardedOutput`, so a full disk or a reader that went away ends the run quietly
instead of raising from deep inside rich, and it stops on SIGINT and SIGTERM alike, through
an anyio signal receiver in its task group: the live view is taken down (the terminal's
cursor shown again) and the caller prints the summary.
"""

from __future__ import annotations

import json
import math
import platform
import signal
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Literal, TextIO

import anyio
import attrs

from ._manager import ResourceManager, ResourceUsage, Subscription, UsageStatistics

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
    from rich.table import Table

    from ._prometheus._server import MetricsServer
    from .redis import UsageRelay

__all__ = [
    "GuardedOutput",
    "MonitorOptions",
    "MonitorRun",
    "render_fleet_view",
    "render_view",
    "run_monitor",
    "usage_json",
]

Backend = Literal["asyncio", "trio"]

# Enough for many intervals of a machine with many disks: the view never falls behind that far,
# and if it does, the oldest usages are dropped (the statistics still count them).
_BUFFER_SIZE = 4096
_SYSTEM_ORDER = {"cpu": 0, "memory": 1, "swap": 2}
_MAX_BAR = 24  # columns of the usage bar when there is room
_MIN_BAR = 5  # below this a bar says nothing: drop it
_MIN_NAME = 12  # resource names are cut (with an ellipsis) no shorter than this, bar kept
_HEADERS = ("resource", "usage", "current", "peak", "mean", "samples")


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
    serve: tuple[str | None, int] | None = None
    """``(host, port)`` to serve ``/metrics`` on while monitoring (host ``None``: every
    interface), if anywhere."""
    redis: str | None = None
    """A Valkey/Redis URL: relay usages through it and show every source's, or ``None``."""


@attrs.frozen
class MonitorRun:
    """How a run of the monitor ended, from :func:`run_monitor`."""

    elapsed: float
    """Seconds the monitor ran, on the event loop's clock."""
    signal: signal.Signals | None
    """The signal that stopped it (SIGINT or SIGTERM), or ``None``: its duration ran out, or
    its output failed (see :attr:`GuardedOutput.error`)."""
    source: str | None = None
    """This monitor's name on the usages it relayed (with :attr:`MonitorOptions.redis`)."""
    server: str | None = None
    """The relay's server, without credentials (with :attr:`MonitorOptions.redis`)."""


class GuardedOutput:
    """A text stream (standard output) that keeps its first write error instead of raising it.

    The monitor writes everything through one of these: JSON lines, the live view (as the
    ``file`` of rich's console) and the summary. A write or flush that fails with
    :class:`OSError` (a full disk, a closed pipe, a file descriptor not open for writing) is
    kept in :attr:`error`, later writes are dropped, and the monitor stops at its next step;
    the command line then says what happened in one line.

    Args:
        stream: Where the text goes, typically ``sys.stdout``.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.error: OSError | None = None
        """The first error writing or flushing raised, or ``None`` while all went well."""
        self.encoding: str = getattr(stream, "encoding", None) or "utf-8"
        """The stream's encoding: rich chooses its box characters by it."""

    def write(self, text: str) -> int:
        """Write ``text`` unless an earlier write failed; return its length either way."""
        if self.error is None:
            try:
                self._stream.write(text)
            except OSError as error:
                self.error = error
        return len(text)

    def flush(self) -> None:
        """Flush the stream unless an earlier write failed."""
        if self.error is None:
            try:
                self._stream.flush()
            except OSError as error:
                self.error = error

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        """The stream's file descriptor."""
        return self._stream.fileno()


def usage_json(usage: ResourceUsage, *, source: str | None = None) -> str:
    """Return one usage as a JSON object on one line.

    Its fields are those of :class:`ResourceUsage`: ``resource_type`` (str), ``usage_percent``
    (a number, 0 or more), ``timestamp`` (the event loop's clock, in seconds) and
    ``wall_time`` (seconds since the epoch), then ``source`` (str): the usage's own source
    for one relayed from another process, else ``source`` if given (this process's name on
    the relay); without either, no ``source`` field.
    """
    fields = attrs.asdict(usage)
    del fields["source"]
    origin = usage.source if usage.source is not None else source
    if origin is not None:
        fields["source"] = origin
    return json.dumps(fields, allow_nan=False)


def _sort_key(resource_type: str) -> tuple[int, str]:
    return _SYSTEM_ORDER.get(resource_type, len(_SYSTEM_ORDER)), resource_type


def _style(percent: float) -> str:
    if percent >= 90:
        return "red"
    if percent >= 70:
        return "yellow"
    return "green"


@attrs.frozen
class _Layout:
    """How the table fits a width: a border or not, the gaps, which columns, how wide."""

    boxed: bool
    gap: int  # columns between two cells, when not boxed
    samples: bool
    name_width: int
    bar_width: int  # 0: no bar column


def _overhead(boxed: bool, gap: int, columns: int) -> int:
    """Columns a table takes beyond its cells' content."""
    # Boxed: "│ a │ b │", a border and a space each side of every cell. Otherwise: the gaps.
    return 3 * columns + 1 if boxed else gap * (columns - 1)


def _fit(width: int, name_width: int, numbers: Sequence[int], samples_width: int) -> _Layout:
    """Choose the layout for ``width`` columns: the numbers always, then the names, the bar.

    From the widest layout to the narrowest: boxed with a samples column; no border, two
    spaces between cells; without samples; one space between cells. The first where the names
    and a bar of at least ``_MIN_BAR`` fit wins, and its bar takes the rest (up to
    ``_MAX_BAR``). If none fits, names are cut to make room for the shortest bar, and below
    that the bar goes.
    """
    fixed = sum(numbers)
    candidates = ((True, 1, True), (False, 2, True), (False, 2, False), (False, 1, False))
    for boxed, gap, samples in candidates:
        columns = 6 if samples else 5
        room = width - _overhead(boxed, gap, columns) - fixed - (samples_width if samples else 0)
        if room >= name_width + _MIN_BAR:
            bar = min(_MAX_BAR, room - name_width)
            return _Layout(boxed, gap, samples, name_width, bar)
    room = width - _overhead(False, 1, 5) - fixed
    if name_width > _MIN_NAME and room >= _MIN_NAME + _MIN_BAR:
        return _Layout(False, 1, False, room - _MIN_BAR, _MIN_BAR)
    room = width - _overhead(False, 1, 4) - fixed
    return _Layout(False, 1, False, max(1, min(name_width, room)), 0)


@attrs.frozen
class _View:
    """The monitor's table, laid out anew for the width it is drawn at."""

    statistics: Mapping[str, UsageStatistics]
    interval: float
    elapsed: float
    final: bool

    def title(self) -> str:
        host = platform.node() or "this machine"
        return f"darwin-metrics monitor: {host}, every {self.interval:g} s"

    def caption(self) -> str:
        waiting = not self.statistics
        if self.final:
            return f"stopped after {self.elapsed:.1f} s" + (", before the first sample" * waiting)
        return (
            f"running for {self.elapsed:.1f} s"
            + (", waiting for the first sample" * waiting)
            + "; Ctrl-C to stop"
        )

    def rows(self) -> list[tuple[str, UsageStatistics]]:
        """The table's rows, in order: cpu, memory and swap first, then the rest by name."""
        return [(name, self.statistics[name]) for name in sorted(self.statistics, key=_sort_key)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich.text import Text

        if not self.statistics:
            yield Text(self.title(), style="bold")
            yield Text(self.caption())
            return
        yield self.table(options.max_width)

    def table(self, width: int) -> Table:
        """The table for a console ``width`` columns wide."""
        from rich import box
        from rich.cells import cell_len
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        rows = self.rows()
        figures = [
            (f"{stats.last:.1f}%", f"{stats.max:.1f}%", f"{stats.mean:.1f}%", str(stats.count))
            for _, stats in rows
        ]

        def widest(header: str, cells: list[str]) -> int:
            return max(cell_len(text) for text in [header, *cells])

        numbers = [widest(_HEADERS[2 + i], [row[i] for row in figures]) for i in range(3)]
        samples_width = widest(_HEADERS[5], [row[3] for row in figures])
        name_width = widest(_HEADERS[0], [name for name, _ in rows])
        layout = _fit(width, name_width, numbers, samples_width)

        if layout.boxed:
            table = Table(box=box.HEAVY_HEAD)
        else:
            table = Table(
                box=box.SIMPLE_HEAD,
                show_edge=False,
                pad_edge=False,
                padding=(0, layout.gap // 2),
                collapse_padding=True,
            )
        table.title = self.title()
        table.title_style = "bold"
        table.caption = self.caption()
        table.caption_justify = "right"
        table.add_column(_HEADERS[0], width=layout.name_width, no_wrap=True, overflow="ellipsis")
        if layout.bar_width:
            table.add_column(_HEADERS[1], width=layout.bar_width, no_wrap=True)
        for header, column_width in zip(_HEADERS[2:5], numbers, strict=True):
            table.add_column(header, width=column_width, justify="right", no_wrap=True)
        if layout.samples:
            table.add_column(
                _HEADERS[5], width=samples_width, justify="right", no_wrap=True, style="dim"
            )
        for (name, stats), (current, peak, mean, count) in zip(rows, figures, strict=True):
            style = _style(stats.last)
            cells: list[RenderableType] = [name]
            if layout.bar_width:
                cells.append(
                    ProgressBar(
                        total=100.0,
                        completed=min(stats.last, 100.0),
                        width=layout.bar_width,
                        complete_style=style,
                        finished_style=style,
                    )
                )
            cells += [Text(current, style=style), Text(peak, style=_style(stats.max)), mean]
            if layout.samples:
                cells.append(count)
            table.add_row(*cells)
        return table


def render_view(
    statistics: Mapping[str, UsageStatistics],
    *,
    interval: float,
    elapsed: float,
    final: bool = False,
) -> RenderableType:
    """Return the monitor's view: a row per resource with a bar, current, peak and mean.

    The view fits the width it is printed at: with room, a bordered table with a bar of up
    to 24 columns and a samples column; narrower, no border, then no samples column, a
    shorter bar, resource names cut short; the current, peak and mean figures always stay
    whole (down to about 30 columns).

    Args:
        statistics: What the manager recorded, by resource type.
        interval: The sampling interval, for the title.
        elapsed: Seconds since the monitor started, for the caption.
        final: Whether this is the summary printed on exit.
    """
    return _View(dict(statistics), interval, elapsed, final)


async def _print_json(
    subscription: Subscription, out: GuardedOutput, source: str | None = None
) -> None:
    # One batch per wake-up: a burst (cpu, memory, swap, then the disks) costs one flush.
    while batch := await subscription.next_batch():
        out.write("".join(usage_json(usage, source=source) + "\n" for usage in batch))
        out.flush()
        if out.error is not None:
            return


async def _show_live(
    manager: ResourceManager,
    subscription: Subscription,
    console: Console,
    out: GuardedOutput,
    interval: float,
    started: float,
    relay: UsageRelay | None = None,
) -> None:
    from rich.console import Group
    from rich.live import Live

    def view() -> RenderableType:
        elapsed = anyio.current_time() - started
        if relay is not None:
            table = fleet_view(
                manager, relay.source, interval=interval, elapsed=elapsed, where=relay.server
            )
        else:
            table = render_view(manager.usage_statistics(), interval=interval, elapsed=elapsed)
        # An empty last line keeps the cursor at the start of a line: the "^C" a terminal
        # echoes would wrap a line as wide as the terminal, and the view, taken down, would
        # leave its first line behind.
        return Group(table, "")

    # Leaving the block, however (duration, signal, failed output), takes the view down and
    # shows the cursor again.
    with Live(view(), console=console, auto_refresh=False, transient=True) as live:
        while out.error is None and await subscription.next_batch():
            live.update(view(), refresh=True)


async def run_monitor(
    options: MonitorOptions,
    manager: ResourceManager,
    *,
    out: GuardedOutput,
    console: Console | None = None,
    stop_signals: Sequence[signal.Signals] = (),
    metrics: MetricsServer | None = None,
) -> MonitorRun:
    """Sample this machine with ``manager`` until the duration runs out or a signal stops it.

    Prints JSON lines to ``out`` when ``options.json``, else the live view to ``console``
    (whose file should be ``out``). Stops early when writing to ``out`` fails. While it runs,
    each of ``stop_signals`` (received through :func:`anyio.open_signal_receiver`, in the
    monitor's task group, on asyncio and trio alike) stops it as its duration running out
    would: the view is taken down and the run returns normally, naming the signal. The caller
    keeps ``manager``, so it can print the summary from
    :meth:`ResourceManager.usage_statistics` afterwards.

    With ``metrics``, a listening server, it also serves ``/metrics`` there while it runs
    (in its task group): this machine's usage under OpenTelemetry's system metric names and
    the manager's series, read every interval; the server is closed when the run ends.

    With ``options.redis``, a usage relay runs on that server (started before the first
    sample): this machine's usages are published, every other relay's shown too.

    Checkpoint: yes. If cancelled, the sampling stops and the live view is taken down.

    Raises:
        BaseExceptionGroup: What the sampling or the view raised, in the monitor's task
            group; for example a ``ModuleNotFoundError`` when psutil (or, for the live
            view, rich) is not installed, which the command line checks before it starts,
            or a :exc:`~darwin_metrics.RedisUnavailableError` when the relay's server
            cannot be reached.
    """
    deadline = math.inf if options.duration == 0 else options.duration
    received: signal.Signals | None = None
    source = server = None
    started = anyio.current_time()
    with ExitStack() as handlers:  # signal handlers, restored once the task group is done
        async with anyio.create_task_group() as group:
            if stop_signals:
                signals = handlers.enter_context(anyio.open_signal_receiver(*stop_signals))

                async def stop_on_signal() -> None:
                    nonlocal received
                    async for signum in signals:
                        received = signum
                        group.cancel_scope.cancel()
                        return

                group.start_soon(stop_on_signal)
            async with manager:
                if metrics is not None:  # serving until the group is done
                    from ._prometheus._system import serve_monitor_metrics

                    await group.start(serve_monitor_metrics, metrics, manager, options.interval)
                with manager.subscribe(buffer_size=_BUFFER_SIZE) as subscription:
                    relay = await _start_relay(manager, options)
                    source = None if relay is None else relay.source
                    server = None if relay is None else relay.server
                    manager.sample_system(interval=options.interval)
                    with anyio.move_on_after(deadline):
                        if options.json:
                            await _print_json(subscription, out, source)
                        else:
                            assert console is not None
                            await _show_live(
                                manager,
                                subscription,
                                console,
                                out,
                                options.interval,
                                started,
                                relay,
                            )
            group.cancel_scope.cancel()  # done: stop waiting for signals
    elapsed = anyio.current_time() - started
    return MonitorRun(elapsed=elapsed, signal=received, source=source, server=server)


# ---------------------------------------------------------------------- the fleet (--redis)


@attrs.frozen
class _FleetView(_View):
    """The monitor's table with a row per source and resource, this machine's first."""

    sources: int = 0
    where: str = ""

    def title(self) -> str:
        plural = "s" * (self.sources != 1)
        return (
            f"darwin-metrics monitor: {self.sources} source{plural} via {self.where}, "
            f"every {self.interval:g} s"
        )

    def rows(self) -> list[tuple[str, UsageStatistics]]:
        return list(self.statistics.items())  # ordered by render_fleet_view


def render_fleet_view(
    local_source: str,
    local: Mapping[str, UsageStatistics],
    remote: Mapping[str, Mapping[str, UsageStatistics]],
    *,
    interval: float,
    elapsed: float,
    where: str = "redis",
    final: bool = False,
) -> RenderableType:
    """Return the monitor's view of several sources: a row per source and resource.

    Rows are named ``"<source> <resource>"``: this process's (``local``, named
    ``local_source``) first, then the other sources by name, each with cpu, memory and swap
    first. The layout adapts to the width as :func:`render_view`'s does.

    Args:
        local_source: This process's name on the relay.
        local: What this process tracked (:meth:`ResourceManager.usage_statistics`).
        remote: What other processes relayed, by source
            (:meth:`ResourceManager.usage_statistics_by_source`).
        interval: The sampling interval, for the title.
        elapsed: Seconds since the monitor started, for the caption.
        where: The relay's server, for the title.
        final: Whether this is the summary printed on exit.
    """
    rows: dict[str, UsageStatistics] = {}
    sources = [(local_source, local)]
    sources += sorted((name, stats) for name, stats in remote.items() if name != local_source)
    for name, statistics in sources:
        for resource in sorted(statistics, key=_sort_key):
            rows[f"{name} {resource}"] = statistics[resource]
    count = len([name for name, statistics in sources if statistics])
    return _FleetView(rows, interval, elapsed, final, sources=count, where=where)


def fleet_view(
    manager: ResourceManager,
    source: str,
    *,
    interval: float,
    elapsed: float,
    where: str = "redis",
    final: bool = False,
) -> RenderableType:
    """:func:`render_fleet_view` of what ``manager`` holds now (``source``: its relay's name)."""
    return render_fleet_view(
        source,
        manager.usage_statistics(),
        manager.usage_statistics_by_source(),
        interval=interval,
        elapsed=elapsed,
        where=where,
        final=final,
    )


async def _start_relay(manager: ResourceManager, options: MonitorOptions) -> UsageRelay | None:
    """Start the usage relay that ``--redis`` asks for, or nothing."""
    if options.redis is None:
        return None
    return await manager.relay(options.redis)
