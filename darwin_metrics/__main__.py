"""The ``darwin-metrics`` command (also ``python -m darwin_metrics``).

``darwin-metrics monitor`` samples this machine (cpu, memory, swap, disks) with a
:class:`~darwin_metrics.resource.ResourceManager` and shows it live, or prints JSON lines when
standard output is not a terminal. See ``darwin-metrics monitor --help``.

Exit status: 0 when done, 130 after Ctrl-C, 2 for a usage error (including no command), 1
when a dependency is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import sys
import time
from collections.abc import Sequence

import anyio

from . import __version__
from ._manager import ResourceManager
from ._monitor import MonitorOptions, render_view, run_monitor

__all__ = ["main"]

_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
_SVG_WIDTH = 80


def _seconds(text: str) -> float:
    """Parse a number of seconds for argparse; range checks come after parsing."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """Return the top-level parser and the ``monitor`` subcommand's parser."""
    parser = argparse.ArgumentParser(
        prog="darwin-metrics",
        description="Structured-concurrency resource management for asyncio and trio.",
        epilog="Run 'darwin-metrics monitor --help' for the monitor's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    monitor = commands.add_parser(
        "monitor",
        help="watch this machine's cpu, memory, swap and disks, live or as JSON lines",
        description=(
            "Sample this machine's cpu, memory, swap and disk usage with a ResourceManager "
            "and show a bar per resource with its current, peak and mean usage, refreshed "
            "every interval. When standard output is not a terminal, print one JSON object "
            "per usage per line instead (fields: resource_type, usage_percent, timestamp, "
            "wall_time). Ctrl-C stops it (exit status 130)."
        ),
    )
    monitor.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="seconds between two samples (default: 1)",
    )
    monitor.add_argument(
        "--duration",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="stop by itself after this many seconds (default: 0, run until Ctrl-C)",
    )
    monitor.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the event loop to run on (default: asyncio; trio needs trio installed)",
    )
    view = monitor.add_mutually_exclusive_group()
    view.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per usage per line (the default when not a terminal)",
    )
    view.add_argument(
        "--live",
        action="store_true",
        help="show the live view even when standard output is not a terminal",
    )
    monitor.add_argument(
        "--save-svg",
        metavar="PATH",
        help="on exit, also save the view as an SVG picture at PATH",
    )
    return parser, monitor


def _check_options(monitor: argparse.ArgumentParser, args: argparse.Namespace) -> MonitorOptions:
    """Validate the monitor's options; exit with status 2 and a usage message if wrong."""
    interval: float = args.interval
    duration: float = args.duration
    if not (math.isfinite(interval) and interval > 0):
        monitor.error(f"--interval must be a finite number of seconds above 0, got {interval}")
    if not (math.isfinite(duration) and duration >= 0):
        monitor.error(f"--duration must be a finite number of seconds, 0 or more, got {duration}")
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        monitor.error(
            "--backend trio needs trio, which is not installed: pip install 'darwin-metrics[trio]'"
        )
    use_json = bool(args.json) or (not args.live and not sys.stdout.isatty())
    return MonitorOptions(
        interval=interval,
        duration=duration,
        backend=args.backend,
        json=use_json,
        save_svg=args.save_svg,
    )


def _missing(options: MonitorOptions) -> list[str]:
    needed = ["psutil"] if options.json and options.save_svg is None else ["psutil", "rich"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _only(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` is a ``kind``, or an exception group of nothing else (nested)."""
    if isinstance(error, kind):
        return True
    # A BaseExceptionGroup (built in from Python 3.11, the exceptiongroup backport before).
    inner = getattr(error, "exceptions", None)
    return (
        isinstance(inner, tuple)
        and bool(inner)
        and all(isinstance(each, BaseException) and _only(each, kind) for each in inner)
    )


def monitor(options: MonitorOptions) -> int:
    """Run the monitor until its duration runs out or Ctrl-C; return the exit status."""
    console = None
    if not options.json:
        from rich.console import Console

        console = Console()
    manager = ResourceManager()
    started = time.monotonic()
    status = 0
    try:
        anyio.run(lambda: run_monitor(options, manager, console=console), backend=options.backend)
    except BaseException as error:
        if _only(error, KeyboardInterrupt):
            status = _INTERRUPTED
        elif _only(error, BrokenPipeError):
            # The reader went away (``| head``): nothing more to say, and nowhere to say it.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        else:
            raise
    elapsed = time.monotonic() - started
    statistics = manager.usage_statistics()
    if console is not None:
        console.print(
            render_view(statistics, interval=options.interval, elapsed=elapsed, final=True)
        )
    if options.save_svg is not None:
        from rich.console import Console

        recorder = Console(record=True, width=_SVG_WIDTH, file=io.StringIO())
        recorder.print(render_view(statistics, interval=options.interval, elapsed=elapsed))
        try:
            recorder.save_svg(options.save_svg, title="darwin-metrics monitor")
        except OSError as error:
            print(f"darwin-metrics monitor: cannot save the SVG: {error}", file=sys.stderr)
            return status or 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``darwin-metrics`` command line; return the exit status."""
    parser, monitor_parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    options = _check_options(monitor_parser, args)
    missing = _missing(options)
    if missing:
        print(
            f"darwin-metrics monitor needs {' and '.join(missing)}: "
            "pip install 'darwin-metrics[monitor]'",
            file=sys.stderr,
        )
        return 1
    try:
        return monitor(options)
    except KeyboardInterrupt:  # between the event loop's end and the summary
        return _INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
