"""``darwin-metrics monitor``: JSON lines, the live view, signals, output errors, usage errors.

The monitor runs in a subprocess (``python -m darwin_metrics``), in real time, on both
backends: behind a pipe, on a real pseudo-terminal of a given width (as a person's terminal
would be), with standard output full or closed, and without psutil or rich (refused by
``tests/run_without.py``, nothing uninstalled). The option checks and the renderer are also
tested in-process, which is faster.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from darwin_metrics.__main__ import main
from darwin_metrics._monitor import GuardedOutput, render_view, usage_json
from darwin_metrics.resource import ResourceUsage, UsageStatistics

pytest.importorskip("psutil")
pytest.importorskip("rich")

ROOT = Path(__file__).resolve().parent.parent
RUN_WITHOUT = Path(__file__).resolve().parent / "run_without.py"
BACKENDS = ["asyncio", "trio"]
FIELDS = {"resource_type": str, "usage_percent": float, "timestamp": float, "wall_time": float}
TIMEOUT = 30
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
FIGURE = r"\d+\.\d%"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and terminals")
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "error", "COLUMNS": "100"}


def _argv(options: Sequence[str], without: Sequence[str] = ()) -> list[str]:
    prefix = [sys.executable]
    if without:
        prefix += [str(RUN_WITHOUT), ",".join(without)]
    return [*prefix, "-m", "darwin_metrics", "monitor", *options]


def _default_signals() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and children
    # inherit that: give the monitor the defaults, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def monitor(
    *options: str, without: Sequence[str] = (), stdout: Any = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(options, without),
        cwd=ROOT,
        env=_env(),
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def parse_lines(stdout: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    for line in lines:
        assert set(line) == set(FIELDS), line
        for field, kind in FIELDS.items():
            assert isinstance(line[field], kind), (field, line)
        assert line["usage_percent"] >= 0
    return lines


def one_line(text: str) -> str:
    """The only line of ``text`` (an error message), which must hold no traceback."""
    assert "Traceback" not in text
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


class Terminal:
    """A run of the monitor on a pseudo-terminal ``columns`` wide, read as a person sees it."""

    def __init__(
        self,
        options: Sequence[str],
        *,
        columns: int,
        without: Sequence[str] = (),
        preexec_fn: Callable[[], None] = _default_signals,
    ) -> None:
        import fcntl
        import pty
        import termios

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        env = {
            name: value
            for name, value in _env().items()
            if name not in {"COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"}
        }
        env["TERM"] = "xterm-256color"
        self.master = master
        self.raw = bytearray()
        self.process = subprocess.Popen(
            _argv(options, without),
            cwd=ROOT,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            preexec_fn=preexec_fn,
        )
        os.close(slave)
        self.deadline = time.monotonic() + TIMEOUT

    def read_until(self, text: str | None) -> bool:
        """Read the terminal until ``text`` appears (True) or the monitor has exited (False)."""
        while text is None or text.encode() not in self.raw:
            remaining = self.deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError(f"{text!r} never came:\n{self.text}")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the monitor closed its side of the terminal
                chunk = b""
            if not chunk:
                return False
            self.raw += chunk
        return True

    def finish(self) -> tuple[int, str]:
        """Read to the end; return the exit status and standard error."""
        self.read_until(None)
        try:
            status = self.process.wait(timeout=TIMEOUT)
            assert self.process.stderr is not None
            err = self.process.stderr.read().decode()
        finally:
            self.close()
        return status, err

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace").replace("\r\n", "\n")

    def summary(self) -> list[str]:
        """The lines printed after the live view was taken down, without colours."""
        after = self.text.rpartition(SHOW_CURSOR)[2]
        return [line.rstrip() for line in ANSI.sub("", after).splitlines() if line.strip()]


def row(lines: Sequence[str], resource: str) -> re.Match[str]:
    """The row of ``resource``: its bar (if any) and its current, peak and mean figures."""
    pattern = (
        rf"^\s*{re.escape(resource)}\s+(?P<bar>[━╸╺ ]*?)\s*({FIGURE})\s+({FIGURE})\s+({FIGURE})"
    )
    for line in lines:
        if match := re.search(pattern, line.replace("│", " ").replace("┃", " ")):
            return match
    raise AssertionError(f"no row for {resource}:\n" + "\n".join(lines))


class TestJsonLines:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_two_intervals_of_documented_fields(self, backend: str) -> None:
        before = time.time()
        completed = monitor(
            "--json", "--interval", "0.2", "--duration", "0.5", "--backend", backend
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stderr == ""
        lines = parse_lines(completed.stdout)
        kinds = [line["resource_type"] for line in lines]
        assert kinds.count("cpu") >= 2  # at 0 s and at 0.2 s, at least
        assert {"cpu", "memory", "swap"} <= set(kinds)
        timestamps = [line["timestamp"] for line in lines]
        assert timestamps == sorted(timestamps)
        assert all(before - 1 <= line["wall_time"] <= time.time() + 1 for line in lines)

    def test_json_is_the_default_when_stdout_is_not_a_terminal(self) -> None:
        completed = monitor("--interval", "0.1", "--duration", "0.15")
        assert completed.returncode == 0, completed.stderr
        assert parse_lines(completed.stdout)

    def test_usage_json_round_trips(self) -> None:
        usage = ResourceUsage("disk:/", 12.5, 3.25, 1_700_000_000.5)
        assert json.loads(usage_json(usage)) == {
            "resource_type": "disk:/",
            "usage_percent": 12.5,
            "timestamp": 3.25,
            "wall_time": 1_700_000_000.5,
        }
        assert "\n" not in usage_json(usage)


class TestLiveView:
    def test_live_view_and_summary(self) -> None:
        completed = monitor("--live", "--interval", "0.1", "--duration", "0.3")
        assert completed.returncode == 0, completed.stderr
        out = completed.stdout
        for text in ("darwin-metrics monitor", "cpu", "memory", "swap", "peak", "mean"):
            assert text in out
        assert "stopped after" in out
        with pytest.raises(json.JSONDecodeError):
            json.loads(out.splitlines()[0])

    @posix_only
    @pytest.mark.parametrize("columns", [40, 120])
    def test_on_a_terminal(self, columns: int) -> None:
        terminal = Terminal(["--interval", "0.1", "--duration", "0.5"], columns=columns)
        status, err = terminal.finish()
        assert status == 0, err
        assert err == ""
        text = terminal.text
        assert HIDE_CURSOR in text
        assert text.rindex(SHOW_CURSOR) > text.rindex(HIDE_CURSOR)  # the cursor is back
        assert "running for" in ANSI.sub("", text)
        summary = terminal.summary()
        assert "stopped after" in summary[-1]
        assert all(len(line) <= columns for line in summary), "\n".join(summary)
        for resource in ("cpu", "memory", "swap"):
            assert row(summary, resource).group("bar"), resource  # figures whole, and a bar
        if columns >= 80:
            assert any("samples" in line for line in summary), "\n".join(summary)
            assert len(row(summary, "cpu").group("bar").strip()) <= 24


class TestLayout:
    STATISTICS = {  # noqa: RUF012
        "disk:/": UsageStatistics(3, 40.0, 40.0, 40.0, 40.0, 1.0),
        "cpu": UsageStatistics(3, 95.0, 10.0, 97.5, 60.0, 1.0),
        "memory": UsageStatistics(3, 45.0, 10.0, 47.5, 40.0, 1.0),
        "swap": UsageStatistics(12345, 0.0, 0.0, 100.0, 0.5, 1.0),
    }

    def render(
        self, statistics: dict[str, UsageStatistics], width: int, **kwargs: Any
    ) -> list[str]:
        from rich.console import Console

        console = Console(record=True, width=width, file=io.StringIO())
        options = {"interval": 0.5, "elapsed": 1.5, **kwargs}
        console.print(render_view(statistics, **options))
        return [line.rstrip() for line in console.export_text().splitlines()]

    def test_render_view(self) -> None:
        text = "\n".join(self.render(self.STATISTICS, 100))
        assert text.index("cpu") < text.index("memory") < text.index("swap")
        assert text.index("swap") < text.index("disk:/")  # cpu, memory, swap, then disks
        for figure in ("95.0%", "97.5%", "60.0%", "40.0%", "100.0%", "12345"):
            assert figure in text
        assert "every 0.5 s" in text
        assert "running for 1.5 s; Ctrl-C to stop" in text

    def test_final_caption(self) -> None:
        assert self.render(self.STATISTICS, 100, final=True)[-1].strip() == "stopped after 1.5 s"

    @pytest.mark.parametrize("width", range(30, 141, 5))
    @pytest.mark.parametrize("names", ["short", "long"])
    def test_every_width_keeps_the_figures(self, width: int, names: str) -> None:
        statistics = dict(self.STATISTICS)
        if names == "long":
            statistics["disk:/var/lib/containers/storage"] = UsageStatistics(
                3, 100.0, 1.0, 250.0, 99.0, 1.0
            )
        lines = self.render(statistics, width)
        text = "\n".join(lines)
        assert all(len(line) <= width for line in lines), text
        expected = {
            "cpu": ("95.0%", "97.5%", "60.0%"),
            "memory": ("45.0%", "47.5%", "40.0%"),
            "swap": ("0.0%", "100.0%", "0.5%"),
            "disk:/": ("40.0%", "40.0%", "40.0%"),
        }
        for resource, figures in expected.items():
            match = row(lines, resource)
            assert match.groups()[1:] == figures, text
            assert len(match.group("bar")) <= 24
        header = next(line for line in lines if "current" in line)
        if width >= 40:
            assert "usage" in header, text  # a bar, however short
            assert len(row(lines, "cpu").group("bar").strip()) >= 4, text
        if width >= 80:
            assert "samples" in header, text
        if names == "long":
            assert ("…" in text) == (width < 60), text  # cut only when it must be
            assert "250.0%" in text

    def test_the_bar_grows_to_24_columns(self) -> None:
        narrow = row(self.render(self.STATISTICS, 60), "cpu").group("bar")
        wide = row(self.render(self.STATISTICS, 140), "cpu").group("bar")
        assert len(narrow) < len(wide) <= 24

    def test_before_the_first_sample(self) -> None:
        assert self.render({}, 80) == [
            "darwin-metrics monitor: " + (platform.node() or "this machine") + ", every 0.5 s",
            "running for 1.5 s, waiting for the first sample; Ctrl-C to stop",
        ]
        final = self.render({}, 80, final=True)
        assert final[-1] == "stopped after 1.5 s, before the first sample"


class TestSaveSvg:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_save_svg(self, tmp_path: Path, backend: str) -> None:
        picture = tmp_path / "monitor.svg"
        picture.write_text("an older picture, longer than nothing" * 1000)
        completed = monitor(
            "--json",
            "--interval",
            "0.1",
            "--duration",
            "0.15",
            "--backend",
            backend,
            "--save-svg",
            str(picture),
        )
        assert completed.returncode == 0, completed.stderr
        svg = picture.read_text(encoding="utf-8")
        assert svg.startswith("<svg")
        assert svg.rstrip().endswith("</svg>")  # all of the old content was replaced
        assert "cpu" in svg
        assert "memory" in svg

    @pytest.mark.parametrize("where", ["missing directory", "a directory"])
    def test_a_path_it_cannot_write_fails_at_the_start(self, tmp_path: Path, where: str) -> None:
        picture = (
            tmp_path / "missing" / "monitor.svg" if where == "missing directory" else tmp_path
        )
        # No --duration: if the path were checked only at the end, this would run forever.
        completed = monitor("--json", "--save-svg", str(picture))
        assert completed.returncode == 2
        assert completed.stdout == ""
        line = one_line(completed.stderr)
        assert line.startswith(
            f"darwin-metrics monitor: error: --save-svg: cannot write {str(picture)!r}"
        )

    def test_a_bad_option_leaves_the_file_alone(self, tmp_path: Path) -> None:
        picture = tmp_path / "monitor.svg"
        completed = monitor("--interval", "0", "--save-svg", str(picture))
        assert completed.returncode == 2
        assert not picture.exists()

    @needs_dev_full
    def test_a_write_that_fails_at_the_end(self) -> None:
        completed = monitor(
            "--json", "--interval", "0.1", "--duration", "0.1", "--save-svg", "/dev/full"
        )
        assert completed.returncode == 1
        line = one_line(completed.stderr)
        assert line.startswith("darwin-metrics monitor: cannot save the SVG to '/dev/full'")
        parse_lines(completed.stdout)

    @posix_only
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_saved_when_piped_into_head(self, tmp_path: Path, backend: str) -> None:
        picture = tmp_path / "monitor.svg"
        producer = subprocess.Popen(
            _argv(["--interval", "0.05", "--backend", backend, "--save-svg", str(picture)]),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert producer.stdout is not None
        head = subprocess.Popen(["head", "-n", "2"], stdin=producer.stdout, stdout=subprocess.PIPE)
        producer.stdout.close()  # head alone reads the pipe: when it exits, the pipe breaks
        try:
            shown, _ = head.communicate(timeout=TIMEOUT)
            # No --duration: the monitor stops because head went away.
            _, err = producer.communicate(timeout=TIMEOUT)
        finally:
            for process in (head, producer):
                process.kill()
                process.wait()
        assert producer.returncode == 0, err
        assert err == b""
        assert len(parse_lines(shown.decode())) == 2
        svg = picture.read_text(encoding="utf-8")
        assert svg.startswith("<svg")
        assert "cpu" in svg or "memory" in svg


@posix_only
class TestStandardOutput:
    @needs_dev_full
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("view", ["--json", "--live"])
    def test_full(self, backend: str, view: str) -> None:
        # JSON lines are written as they come: no --duration, the failed write stops the
        # monitor. The live view writes nothing but its summary when not on a terminal.
        duration = ["--duration", "0.3"] if view == "--live" else []
        with open("/dev/full", "w") as full:
            completed = monitor(
                view, "--interval", "0.05", "--backend", backend, *duration, stdout=full
            )
        assert completed.returncode == 1
        assert one_line(completed.stderr) == (
            "darwin-metrics: cannot write to standard output: No space left on device"
        )

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_not_open_for_writing(self, backend: str) -> None:
        with open(os.devnull, "rb") as read_only:
            completed = monitor(
                "--json", "--interval", "0.05", "--backend", backend, stdout=read_only
            )
        assert completed.returncode == 1
        assert one_line(completed.stderr) == (
            "darwin-metrics: cannot write to standard output: Bad file descriptor"
        )

    @pytest.mark.parametrize("view", ["--json", "--live"])
    def test_closed(self, view: str) -> None:
        completed = subprocess.run(
            _argv([view, "--interval", "0.05"]),
            cwd=ROOT,
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
            timeout=TIMEOUT,
            check=False,
            preexec_fn=lambda: os.close(1),  # as the shell's ">&-" does
        )
        assert completed.returncode == 1
        assert one_line(completed.stderr) == (
            "darwin-metrics: standard output is closed: nothing to write to"
        )

    @needs_dev_full
    def test_guarded_output_keeps_the_first_error(self) -> None:
        full = open("/dev/full", "w")  # noqa: SIM115
        try:
            out = GuardedOutput(full)
            assert out.write("line\n") == 5
            out.flush()
            assert isinstance(out.error, OSError)
            first = out.error
            assert out.write("more\n") == 5  # dropped, and no second error
            out.flush()
            assert out.error is first
            assert not out.isatty()
            assert out.fileno() == full.fileno()
        finally:
            with contextlib.suppress(OSError):  # what is still buffered cannot be written
                full.close()


@posix_only
class TestSignals:
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
    def test_json_lines_stop_quietly(self, backend: str, signum: int, status: int) -> None:
        process = subprocess.Popen(
            _argv(["--json", "--interval", "0.05", "--backend", backend]),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_default_signals,
        )
        try:
            assert process.stdout is not None
            json.loads(process.stdout.readline())  # it runs: the signal receiver is in place
            process.send_signal(signum)
            out, err = process.communicate(timeout=TIMEOUT)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == status, err
        assert err == ""
        parse_lines(out)

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
    def test_live_view_prints_the_summary_and_shows_the_cursor(
        self, backend: str, signum: int, status: int
    ) -> None:
        terminal = Terminal(["--interval", "0.1", "--backend", backend], columns=80)
        try:
            assert terminal.read_until("cpu")  # a few samples in, with the live view up
            terminal.process.send_signal(signum)
        finally:
            exit_status, err = terminal.finish()
        assert exit_status == status, err
        assert err == ""
        text = terminal.text
        assert text.rindex(SHOW_CURSOR) > text.rindex(HIDE_CURSOR)
        summary = terminal.summary()
        assert "stopped after" in summary[-1]
        row(summary, "cpu")

    def test_an_ignored_signal_stays_ignored(self) -> None:
        def ignore_sigint() -> None:
            _default_signals()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for a background job

        process = subprocess.Popen(
            _argv(["--json", "--interval", "0.05"]),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=ignore_sigint,
        )
        try:
            assert process.stdout is not None
            process.stdout.readline()
            process.send_signal(signal.SIGINT)
            for _ in range(5):  # still running, a few intervals later
                json.loads(process.stdout.readline())
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=TIMEOUT)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == 143, err


class TestMissingDependencies:
    @posix_only
    def test_without_rich_a_terminal_gets_json_lines_and_a_note(self) -> None:
        terminal = Terminal(
            ["--interval", "0.1", "--duration", "0.3"], columns=80, without=["rich"]
        )
        status, err = terminal.finish()
        assert status == 0, err
        assert one_line(err) == (
            "darwin-metrics monitor: rich is not installed, so JSON lines instead of the live "
            "view (pip install 'darwin-metrics[monitor]' for the live view)"
        )
        assert parse_lines(terminal.text)

    def test_without_rich_a_pipe_gets_json_lines_as_always(self) -> None:
        completed = monitor("--interval", "0.1", "--duration", "0.15", without=["rich"])
        assert completed.returncode == 0, completed.stderr
        assert completed.stderr == ""
        assert parse_lines(completed.stdout)

    @pytest.mark.parametrize(
        ("options", "without", "message"),
        [
            (
                ["--json"],
                ["psutil"],
                "darwin-metrics monitor needs psutil to read this machine's usage: "
                "pip install 'darwin-metrics[system]'",
            ),
            (
                ["--json"],
                ["psutil", "rich"],
                "darwin-metrics monitor needs psutil to read this machine's usage: "
                "pip install 'darwin-metrics[system]'",
            ),
            (
                ["--live"],
                ["rich"],
                "darwin-metrics monitor needs rich for the live view: "
                "pip install 'darwin-metrics[monitor]'",
            ),
            (
                ["--live"],
                ["psutil", "rich"],
                "darwin-metrics monitor needs psutil and rich for the live view: "
                "pip install 'darwin-metrics[monitor]'",
            ),
            (
                ["--json", "--save-svg", "never-written.svg"],
                ["rich"],
                "darwin-metrics monitor --save-svg needs rich: "
                "pip install 'darwin-metrics[monitor]'",
            ),
        ],
    )
    def test_says_what_to_install(
        self, options: list[str], without: list[str], message: str
    ) -> None:
        completed = monitor(*options, without=without)  # no --duration: it must not start
        assert completed.returncode == 1
        assert completed.stdout == ""
        assert one_line(completed.stderr) == message
        assert not (ROOT / "never-written.svg").exists()

    def test_missing_trio_is_a_usage_error(self) -> None:
        completed = monitor("--backend", "trio", without=["trio"])
        assert completed.returncode == 2
        assert completed.stderr.startswith("usage: darwin-metrics monitor")
        assert "pip install 'darwin-metrics[trio]'" in completed.stderr


class TestUsageErrors:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            (["--interval", "0"], "--interval must be a finite number of seconds above 0"),
            (["--interval", "-1"], "--interval must be"),
            (["--interval", "inf"], "--interval must be"),
            (["--interval", "nan"], "--interval must be"),
            (["--interval", "soon"], "not a number of seconds: 'soon'"),
            (["--duration", "-1"], "--duration must be a finite number of seconds, 0 or more"),
            (["--duration", "inf"], "--duration must be"),
            (["--backend", "curio"], "invalid choice: 'curio'"),
            (["--json", "--live"], "not allowed with argument"),
            (["--bogus"], "unrecognized arguments: --bogus"),
            (["--interval", "1", "extra"], "unrecognized arguments: extra"),
        ],
    )
    def test_bad_option(
        self, options: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["monitor", *options])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: darwin-metrics monitor")  # the monitor's own usage
        assert message in err

    def test_unknown_option_before_the_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["--colour", "monitor"])
        assert exit_info.value.code == 2
        assert "unrecognized arguments: --colour" in capsys.readouterr().err

    def test_no_command_prints_help_and_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main([]) == 2
        err = capsys.readouterr().err
        assert "usage: darwin-metrics" in err
        assert "monitor" in err

    def test_bogus_option_in_a_subprocess(self) -> None:
        completed = monitor("--bogus")
        assert completed.returncode == 2
        assert completed.stderr.startswith("usage: darwin-metrics monitor")
        assert completed.stderr.rstrip().endswith(
            "darwin-metrics monitor: error: unrecognized arguments: --bogus"
        )
        assert "Traceback" not in completed.stderr

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        from darwin_metrics import __version__

        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert __version__ in capsys.readouterr().out

    def test_help_explains_the_exit_statuses(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["monitor", "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "Ctrl-C (exit status 130)" in out
        assert "SIGTERM (exit status 143)" in out


def test_no_internal_jargon_in_what_users_read() -> None:
    """The word "seed" meant the Rust crate darwin-metrics, whose resource module this is."""
    sources = [ROOT / "darwin_metrics" / "_monitor.py", ROOT / "darwin_metrics" / "__main__.py"]
    sources += sorted((ROOT / "examples").glob("*.py"))
    for source in sources:
        assert not re.search(r"\bseeds?\b", source.read_text(encoding="utf-8"), re.I), source
