"""``darwin-metrics monitor``: JSON lines, the live view, Ctrl-C, and usage errors.

The monitor runs in a subprocess (``python -m darwin_metrics``), in real time, on both
backends; the option checks and the renderer are also tested in-process, which is faster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from darwin_metrics.__main__ import main
from darwin_metrics._monitor import render_view, usage_json
from darwin_metrics.resource import ResourceUsage, UsageStatistics

pytest.importorskip("psutil")
pytest.importorskip("rich")

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["asyncio", "trio"]
FIELDS = {"resource_type": str, "usage_percent": float, "timestamp": float, "wall_time": float}
TIMEOUT = 30


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "error", "COLUMNS": "100"}


def monitor(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "darwin_metrics", "monitor", *options],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
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

    def test_save_svg(self, tmp_path: Path) -> None:
        picture = tmp_path / "monitor.svg"
        completed = monitor(
            "--json", "--interval", "0.1", "--duration", "0.15", "--save-svg", str(picture)
        )
        assert completed.returncode == 0, completed.stderr
        svg = picture.read_text(encoding="utf-8")
        assert svg.startswith("<svg")
        assert "cpu" in svg
        assert "memory" in svg

    def test_save_svg_where_it_cannot(self, tmp_path: Path) -> None:
        picture = tmp_path / "missing" / "monitor.svg"
        completed = monitor(
            "--json", "--interval", "0.1", "--duration", "0.1", "--save-svg", str(picture)
        )
        assert completed.returncode == 1
        assert "cannot save the SVG" in completed.stderr
        assert "Traceback" not in completed.stderr

    def test_render_view(self) -> None:
        from rich.console import Console

        statistics = {
            "disk:/": UsageStatistics(3, 40.0, 40.0, 40.0, 40.0, 1.0),
            "cpu": UsageStatistics(3, 95.0, 10.0, 97.5, 60.0, 1.0),
        }
        console = Console(record=True, width=100, file=open(os.devnull, "w"))  # noqa: SIM115
        with console.file:
            console.print(render_view(statistics, interval=0.5, elapsed=1.5))
        text = console.export_text()
        assert text.index("cpu") < text.index("disk:/")  # cpu, memory, swap, then disks
        for figure in ("95.0%", "97.5%", "60.0%", "40.0%", "every 0.5 s", "Ctrl-C"):
            assert figure in text

    def test_render_view_before_the_first_sample(self) -> None:
        from rich.console import Console

        console = Console(record=True, width=100, file=open(os.devnull, "w"))  # noqa: SIM115
        with console.file:
            console.print(render_view({}, interval=1, elapsed=0, final=True))
        assert "waiting for the first sample" in console.export_text()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ctrl_c_exits_quietly(backend: str) -> None:
    def default_sigint() -> None:
        # A shell without job control starts background jobs with SIGINT ignored, and
        # children inherit that: give the monitor the default, as a terminal would.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(
        [sys.executable, "-m", "darwin_metrics", "monitor", "--json", "--interval", "0.05"],
        cwd=ROOT,
        env={**_env(), "PYTHONWARNINGS": "error"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # it runs: the event loop handles SIGINT now
        json.loads(first)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err == ""
    parse_lines(out)


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
        ],
    )
    def test_bad_option(
        self, options: list[str], message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["monitor", *options])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: darwin-metrics monitor")
        assert message in err

    def test_unknown_option(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["monitor", "--colour"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: darwin-metrics")
        assert "unrecognized arguments: --colour" in err

    def test_no_command_prints_help_and_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main([]) == 2
        err = capsys.readouterr().err
        assert "usage: darwin-metrics" in err
        assert "monitor" in err

    def test_missing_trio_is_a_usage_error(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        find_spec = importlib.util.find_spec

        def without_trio(name: str, package: str | None = None) -> Any:
            return None if name == "trio" else find_spec(name, package)

        monkeypatch.setattr(importlib.util, "find_spec", without_trio)
        with pytest.raises(SystemExit) as exit_info:
            main(["monitor", "--backend", "trio"])
        assert exit_info.value.code == 2
        assert "pip install 'darwin-metrics[trio]'" in capsys.readouterr().err

    def test_missing_psutil_says_what_to_install(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        find_spec = importlib.util.find_spec

        def without_psutil(name: str, package: str | None = None) -> Any:
            return None if name == "psutil" else find_spec(name, package)

        monkeypatch.setattr(importlib.util, "find_spec", without_psutil)
        assert main(["monitor", "--json"]) == 1
        assert "pip install 'darwin-metrics[monitor]'" in capsys.readouterr().err

    def test_bad_option_in_a_subprocess(self) -> None:
        completed = monitor("--interval", "0")
        assert completed.returncode == 2
        assert "usage: darwin-metrics monitor" in completed.stderr
        assert "Traceback" not in completed.stderr

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        from darwin_metrics import __version__

        with pytest.raises(SystemExit) as exit_info:
            main(["--version"])
        assert exit_info.value.code == 0
        assert __version__ in capsys.readouterr().out
