"""``darwin-metrics monitor --redis URL``: monitors on several processes see each other.

Each monitor runs as a process of its own against a real server; the one started first runs
until the second has finished, so that each sees the other's usages: a row per source and
resource in the live view, a ``source`` in every JSON line. The renderer is also tested
directly.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _redis_server import RedisServer
from rich.console import Console

from darwin_metrics._monitor import render_fleet_view, usage_json
from darwin_metrics.resource import ResourceUsage, UsageStatistics

ROOT = Path(__file__).resolve().parent.parent
RUN_WITHOUT = Path(__file__).resolve().parent / "run_without.py"
TIMEOUT = 30
HOST = socket.gethostname()

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "error", "COLUMNS": "100"}


def _argv(options: Sequence[str], without: Sequence[str] = ()) -> list[str]:
    prefix = [sys.executable]
    if without:
        prefix += [str(RUN_WITHOUT), ",".join(without)]
    return [*prefix, "-m", "darwin_metrics", "monitor", *options]


def monitor(*options: str, without: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _argv(options, without),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def relay_connections(server: RedisServer) -> int:
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    return listing.count(b"name=darwin-metrics-relay-")


@contextmanager
def first_monitor(server: RedisServer, *options: str) -> Iterator[subprocess.Popen[str]]:
    """A monitor that runs (until SIGTERM) with its relay connected to ``server``."""
    process = subprocess.Popen(
        _argv(["--redis", server.url, "--interval", "0.1", *options]),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while relay_connections(server) < 2:  # its reader and its publisher
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the first monitor's relay never connected"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def stop(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=TIMEOUT)
    return process.returncode, out, err


def sources(lines: list[dict[str, Any]]) -> set[str]:
    return {line["source"] for line in lines}


@posix_only
class TestAcrossProcesses:
    def test_json_lines_carry_every_sources_usage(self, redis_server: RedisServer) -> None:
        with first_monitor(redis_server, "--json", "--backend", "trio") as first:
            second = monitor(
                "--redis", redis_server.url, "--json", "--interval", "0.1", "--duration", "0.6"
            )
            assert second.returncode == 0, second.stderr
            assert second.stderr == ""
            status, out, err = stop(first)
        assert status == 128 + signal.SIGTERM, err
        theirs = [json.loads(line) for line in second.stdout.splitlines()]
        ours = [json.loads(line) for line in out.splitlines()]
        assert all(set(line) == {"resource_type", "usage_percent", "timestamp", "wall_time",
                                 "source"} for line in theirs + ours)  # fmt: skip
        first_source, second_source = f"{HOST}/{first.pid}", f"{HOST}/"
        assert sources(theirs) >= {first_source}  # the first monitor's usages...
        assert any(s.startswith(second_source) and s != first_source for s in sources(theirs))
        assert sources(ours) == sources(theirs)  # ...and each sees the other
        kinds = {line["resource_type"] for line in theirs if line["source"] == first_source}
        assert {"memory", "swap"} <= kinds

    def test_the_live_view_has_a_row_per_source_and_resource(
        self, redis_server: RedisServer
    ) -> None:
        with first_monitor(redis_server, "--json") as first:
            second = monitor(
                "--redis", redis_server.url, "--live", "--interval", "0.1", "--duration", "0.8"
            )
            stop(first)
        assert second.returncode == 0, second.stderr
        summary = second.stdout.split("stopped after")[0].rsplit("darwin-metrics monitor:", 1)[1]
        assert "2 sources via" in summary
        assert f"{HOST}/{first.pid} memory" in summary  # the other one's rows
        own = [line for line in summary.splitlines() if " memory " in line]
        assert len(own) == 2  # one per source

    def test_an_unreachable_server(self, redis_server: RedisServer) -> None:
        url = redis_server.url
        redis_server.stop()
        completed = monitor("--redis", url, "--json", "--duration", "0.5")
        assert completed.returncode == 1
        assert completed.stdout == ""
        lines = completed.stderr.splitlines()
        assert len(lines) == 1, completed.stderr
        assert lines[0].startswith("darwin-metrics monitor: --redis: the usage relay could not")
        assert "Traceback" not in completed.stderr


class TestOptions:
    def test_a_bad_url_is_a_usage_error(self) -> None:
        completed = monitor("--redis", "http://localhost", "--duration", "0.1")
        assert completed.returncode == 2
        assert "--redis: the URL must start with redis://" in completed.stderr
        assert completed.stderr.startswith("usage: darwin-metrics monitor")

    def test_without_coredis(self) -> None:
        completed = monitor("--redis", "redis://localhost", "--json", without=["coredis"])
        assert completed.returncode == 1
        assert completed.stderr.strip() == (
            "darwin-metrics monitor --redis needs coredis: pip install 'darwin-metrics[redis]'"
        )

    def test_the_help_names_the_option(self) -> None:
        completed = monitor("--help")
        assert "--redis URL" in completed.stdout


class TestRendering:
    def test_usage_json_with_a_source(self) -> None:
        local = ResourceUsage("cpu", 1.5, 2.0, 3.0)
        relayed = ResourceUsage("cpu", 1.5, 2.0, 3.0, source="web-2/7")
        assert "source" not in json.loads(usage_json(local))
        assert json.loads(usage_json(local, source="web-1/5"))["source"] == "web-1/5"
        assert json.loads(usage_json(relayed, source="web-1/5"))["source"] == "web-2/7"

    def test_rows_per_source_this_one_first(self) -> None:
        def stats(value: float) -> UsageStatistics:
            return UsageStatistics(1, value, value, value, value, 0.0)

        view = render_fleet_view(
            "web-1/5",
            {"memory": stats(40.0), "cpu": stats(10.0)},
            {"api-0/9": {"disk:/": stats(70.0), "cpu": stats(20.0)}, "empty/1": {}},
            interval=1.0,
            elapsed=2.0,
            where="localhost:6379",
        )
        console = Console(file=io.StringIO(), width=100, color_system=None)
        console.print(view)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        names = [
            name
            for name in ("web-1/5 cpu", "web-1/5 memory", "api-0/9 cpu", "api-0/9 disk:/")
            if name in text
        ]
        assert names == ["web-1/5 cpu", "web-1/5 memory", "api-0/9 cpu", "api-0/9 disk:/"]
        positions = [text.index(name) for name in names]
        assert positions == sorted(positions)
        assert "2 sources via localhost:6379, every 1 s" in text
        assert "empty/1" not in text
