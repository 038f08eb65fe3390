"""The ``darwin-metrics`` command (also ``python -m darwin_metrics``).

``darwin-metrics monitor`` samples this machine (cpu, memory, swap, disks) with a
:class:`~darwin_metrics.resource.ResourceManager` and shows it live, or prints JSON lines when
standard output is not a terminal. See ``darwin-metrics monitor --help``.

Exit status: 0 when done (also when the reader of a pipe went away, as with ``| head``), 1
when a dependency is missing, standard output cannot be written or the ``--redis`` server
cannot be reached (a one-line message says which), 2 for a usage error (including no command,
a ``--save-svg`` path that cannot be written and a ``--serve`` address that cannot be
listened on), 130 after Ctrl-C (SIGINT) and 143 after SIGTERM (``timeout``, ``kill``): 128
plus the signal's number, as shells report a process that a signal ended.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO, cast

import anyio
import attrs

from . import __version__
from ._errors import RedisUnavailableError, UsageRelayError
from ._manager import ResourceManager
from ._monitor import (
    GuardedOutput,
    MonitorOptions,
    MonitorRun,
    fleet_view,
    render_view,
    run_monitor,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["main"]

_PROG = "darwin-metrics monitor"
_INTERRUPTED = 128 + signal.SIGINT  # 130, as shells report it
_SVG_WIDTH = 80
_INSTALL_MONITOR = "pip install 'darwin-metrics[monitor]'"
_INSTALL_SYSTEM = "pip install 'darwin-metrics[system]'"
_INSTALL_PROMETHEUS = "pip install 'darwin-metrics[prometheus]'"
_INSTALL_REDIS = "pip install 'darwin-metrics[redis]'"


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
            "wall_time). Ctrl-C (exit status 130) and SIGTERM (exit status 143) stop it and "
            "print the summary."
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
        help=(
            "print one JSON object per usage per line (the default when not a terminal, "
            "or when rich is not installed)"
        ),
    )
    view.add_argument(
        "--live",
        action="store_true",
        help="show the live view even when standard output is not a terminal",
    )
    monitor.add_argument(
        "--save-svg",
        metavar="PATH",
        help="on exit, also save the view as an SVG picture at PATH (checked at the start)",
    )
    monitor.add_argument(
        "--serve",
        metavar="HOST:PORT",
        help=(
            "while monitoring, also serve /metrics for Prometheus at HOST:PORT ([::1]:PORT "
            "for IPv6, :PORT for every interface, port 0 for a free one; the address is "
            "printed on standard error): this machine's usage as OpenTelemetry's system "
            "metrics (system_cpu_utilization_ratio, system_memory_usage_bytes, ...) and the "
            "monitor's own darwin_resource_* series"
        ),
    )
    _add_redis_option(monitor)
    return parser, monitor


def _add_redis_option(monitor: argparse.ArgumentParser) -> None:
    monitor.add_argument(
        "--redis",
        metavar="URL",
        help=(
            "also publish this machine's usage to the Valkey/Redis server at URL "
            "(redis://, rediss:// or unix://) and show every monitor's and relay's there: a "
            "row per source and resource, or a 'source' field in each JSON line "
            f"(needs coredis: {_INSTALL_REDIS})"
        ),
    )


def _check_redis_url(monitor: argparse.ArgumentParser, url: str | None) -> str | None:
    """Validate ``--redis``; exit with status 2 and a usage message if it is not a URL."""
    if url is None:
        return None
    from ._redis._support import check_url  # no coredis needed to check a URL

    try:
        check_url(url)
    except ValueError as error:
        monitor.error(f"--redis: {error}")
    return url


def _importable(name: str) -> bool:
    """Whether ``name`` can be imported (it is, if so: the monitor uses it right after)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _check_options(monitor: argparse.ArgumentParser, args: argparse.Namespace) -> MonitorOptions:
    """Validate the monitor's options; exit with status 2 and a usage message if wrong."""
    interval: float = args.interval
    duration: float = args.duration
    if not (math.isfinite(interval) and interval > 0):
        monitor.error(f"--interval must be a finite number of seconds above 0, got {interval}")
    if not (math.isfinite(duration) and duration >= 0):
        monitor.error(f"--duration must be a finite number of seconds, 0 or more, got {duration}")
    if args.backend == "trio" and not _importable("trio"):
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
        serve=None if args.serve is None else _serve_address(monitor, args.serve),
        redis=_check_redis_url(monitor, args.redis),
    )


def _serve_address(monitor: argparse.ArgumentParser, text: str) -> tuple[str | None, int]:
    """Parse ``--serve HOST:PORT``; if it is malformed, exit with status 2 (one line)."""
    from ._prometheus._server import parse_address

    try:
        return parse_address(text)
    except ValueError as error:
        monitor.exit(2, f"{monitor.prog}: error: --serve: {error}\n")


def _check_dependencies(options: MonitorOptions, *, live_asked: bool) -> MonitorOptions | str:
    """Return the options to run with, or the one line that says what to install.

    Without rich, the live view falls back to JSON lines (with a note on standard error)
    unless ``--live`` asked for it by name; ``--save-svg`` needs rich either way.
    """
    psutil = _importable("psutil")
    if not options.json:
        rich = _importable("rich")
        if psutil and not rich and not live_asked:
            print(
                f"{_PROG}: rich is not installed, so JSON lines instead of the live view "
                f"({_INSTALL_MONITOR} for the live view)",
                file=sys.stderr,
            )
            options = attrs.evolve(options, json=True)
        elif not (psutil and rich):
            needed = (("psutil", psutil), ("rich", rich))
            missing = " and ".join(name for name, present in needed if not present)
            return f"{_PROG} needs {missing} for the live view: {_INSTALL_MONITOR}"
    if not psutil:
        return f"{_PROG} needs psutil to read this machine's usage: {_INSTALL_SYSTEM}"
    if options.save_svg is not None and not _importable("rich"):
        return f"{_PROG} --save-svg needs rich: {_INSTALL_MONITOR}"
    if options.serve is not None and not _importable("prometheus_client"):
        return f"{_PROG} --serve needs prometheus-client: {_INSTALL_PROMETHEUS}"
    if options.redis is not None and not _importable("coredis"):
        return f"{_PROG} --redis needs coredis: {_INSTALL_REDIS}"
    return options


class _SvgFile:
    """The ``--save-svg`` file, opened before the run so that a bad path fails at once.

    Opening creates the file if it is missing but leaves an existing one as it was until
    :meth:`save`. A file that opening created is removed again unless a save succeeds.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            self._created = True
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY)
            self._created = False
        self._file: TextIO | None = open(fd, "w", encoding="utf-8")  # noqa: SIM115

    def save(self, svg: str) -> None:
        """Replace the file's content with ``svg`` and close it.

        Raises:
            OSError: The picture could not be written; the file is closed all the same.
        """
        file, self._file = self._file, None
        assert file is not None, "saved twice"
        try:
            if stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                file.truncate(0)  # not for /dev/stdout or a named pipe
            file.write(svg)
            file.close()  # flushes: a full disk shows here
        except OSError:
            self._discard(file)
            raise

    def close(self) -> None:
        """Close the file if :meth:`save` did not."""
        file, self._file = self._file, None
        if file is not None:
            self._discard(file)

    def _discard(self, file: TextIO) -> None:
        with contextlib.suppress(OSError):  # what is still buffered cannot be written
            file.close()
        if self._created:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _open_svg(monitor: argparse.ArgumentParser, path: str) -> _SvgFile:
    """Open the ``--save-svg`` file; if it cannot be written, exit with status 2 (one line)."""
    try:
        return _SvgFile(path)
    except OSError as error:
        reason = error.strerror or str(error)
        monitor.exit(2, f"{monitor.prog}: error: --save-svg: cannot write {path!r}: {reason}\n")


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the monitor as Ctrl-C does: SIGINT and SIGTERM, unless ignored.

    A signal that was ignored when the command started (a shell starts background jobs with
    SIGINT ignored; ``nohup``) stays ignored. Signal handlers belong to the main thread, and
    asyncio has none on Windows: there, Ctrl-C arrives as ``KeyboardInterrupt``.
    """
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        return ()
    return tuple(
        signum
        for signum in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(signum) is not signal.SIG_IGN
    )


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


def _relay_error(error: BaseException) -> BaseException | None:
    """The relay's error (unreachable server, refused key) in ``error``, if that is all."""
    if isinstance(error, RedisUnavailableError | UsageRelayError):
        return error
    inner = getattr(error, "exceptions", None)  # an exception group: look inside
    if isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        return _relay_error(inner[0])
    return None


def _final_view(
    options: MonitorOptions,
    manager: ResourceManager,
    run: MonitorRun | None,
    elapsed: float,
    *,
    final: bool = False,
) -> RenderableType:
    """The view printed on exit (and saved by ``--save-svg``): one source, or all of them."""
    if run is not None and run.source is not None:
        where = run.server or "redis"
        return fleet_view(
            manager,
            run.source,
            interval=options.interval,
            elapsed=elapsed,
            where=where,
            final=final,
        )
    statistics = manager.usage_statistics()
    return render_view(statistics, interval=options.interval, elapsed=elapsed, final=final)


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that the interpreter's last flush succeeds.

    After a failed write, what is still buffered in ``sys.stdout`` would fail again at exit
    and print an "Exception ignored" traceback.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _cannot_write(error: OSError) -> int:
    """Report a failed write to standard output in one line; return the exit status."""
    _silence_stdout()
    if isinstance(error, BrokenPipeError):
        return 0  # the reader went away (``| head``): nothing more to say, nowhere to say it
    reason = error.strerror or str(error)
    print(f"darwin-metrics: cannot write to standard output: {reason}", file=sys.stderr)
    return 1


class _CannotServe(Exception):
    """The ``--serve`` address cannot be listened on; the message says why, in one line."""


async def _run(options: MonitorOptions, manager: ResourceManager, **kwargs: Any) -> MonitorRun:
    """Run the monitor, listening on the ``--serve`` address first if there is one."""
    if options.serve is None:
        return await run_monitor(options, manager, **kwargs)
    from prometheus_client import CollectorRegistry

    from ._prometheus._server import MetricsServer

    host, port = options.serve
    shown = f"[{host}]:{port}" if host and ":" in host else f"{host or ''}:{port}"
    try:
        server = await MetricsServer.bind(host, port, registry=CollectorRegistry())
    except OSError as error:
        reason = error.strerror or str(error)
        raise _CannotServe(f"--serve {shown}: cannot listen there: {reason}") from None
    async with server:
        print(f"{_PROG}: serving metrics at {server.url}", file=sys.stderr, flush=True)
        return await run_monitor(options, manager, metrics=server, **kwargs)


def monitor(options: MonitorOptions, svg: _SvgFile | None = None) -> int:
    """Run the monitor until its duration runs out or a signal; return the exit status."""
    out = GuardedOutput(sys.stdout)
    console = None
    if not options.json:
        from rich.console import Console

        console = Console(file=cast(TextIO, out))  # rich needs only write, flush, isatty
    manager = ResourceManager()
    started = time.monotonic()
    run: MonitorRun | None = None
    status = 0
    try:
        run = anyio.run(
            functools.partial(
                _run,
                options,
                manager,
                out=out,
                console=console,
                stop_signals=_stop_signals(),
            ),
            backend=options.backend,
        )
    except _CannotServe as error:  # before anything was shown
        print(f"{_PROG}: error: {error}", file=sys.stderr)
        return 2
    except BaseException as error:
        relay_error = _relay_error(error)
        if relay_error is not None:  # --redis: the server cannot be reached, or refuses
            out.flush()
            print(f"{_PROG}: --redis: {relay_error}", file=sys.stderr)
            return 1
        if not _only(error, KeyboardInterrupt):  # Ctrl-C before or after the signal receiver
            raise
        status = _INTERRUPTED
    if run is not None and run.signal is not None:
        status = 128 + run.signal
    elapsed = run.elapsed if run is not None else time.monotonic() - started
    if console is not None:
        console.print(_final_view(options, manager, run, elapsed, final=True))
    out.flush()
    if svg is not None:
        from rich.console import Console

        # Colours as on a terminal, so the bars are drawn in full as the live view draws them.
        recorder = Console(
            record=True, width=_SVG_WIDTH, file=io.StringIO(), color_system="truecolor"
        )
        recorder.print(_final_view(options, manager, run, elapsed))
        try:
            svg.save(recorder.export_svg(title="darwin-metrics monitor"))
        except OSError as error:
            reason = error.strerror or str(error)
            print(f"{_PROG}: cannot save the SVG to {svg.path!r}: {reason}", file=sys.stderr)
            status = status or 1
    if out.error is not None:
        return _cannot_write(out.error) or status
    return status


def _parse(argv: Sequence[str] | None) -> argparse.Namespace | int:
    """Parse the command line: the namespace, or 2 when no command was given.

    ``--help``, ``--version`` and usage errors exit from argparse (``SystemExit``).
    """
    parser, monitor_parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # say it with the usage of the command it was given to
        chosen = monitor_parser if args.command == "monitor" else parser
        chosen.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    args.monitor_parser = monitor_parser
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``darwin-metrics`` command line; return the exit status."""
    parsed = _parse(argv)
    if isinstance(parsed, int):
        return parsed
    monitor_parser: argparse.ArgumentParser = parsed.monitor_parser
    if sys.stdout is None:  # started with standard output closed (">&-")
        print("darwin-metrics: standard output is closed: nothing to write to", file=sys.stderr)
        return 1
    checked = _check_dependencies(
        _check_options(monitor_parser, parsed), live_asked=bool(parsed.live)
    )
    if isinstance(checked, str):
        print(checked, file=sys.stderr)
        return 1
    svg = None if checked.save_svg is None else _open_svg(monitor_parser, checked.save_svg)
    try:
        return monitor(checked, svg)
    except KeyboardInterrupt:  # between the event loop's end and the summary
        return _INTERRUPTED
    finally:
        if svg is not None:
            svg.close()


if __name__ == "__main__":
    sys.exit(main())
