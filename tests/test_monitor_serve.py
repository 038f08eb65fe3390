"""``darwin-metrics monitor --serve HOST:PORT``: /metrics scraped over real HTTP while it runs.

In a subprocess on both backends (JSON lines and the live view), scraped with a plain socket
and parsed with prometheus_client's parser; in-process, where the scrape is compared with the
manager's statistics exactly; and the addresses it cannot serve on.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest
from _scrape import aget, get, label_names, parse, value, values
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from darwin_metrics.__main__ import main
from darwin_metrics._manager._samplers import read_disks
from darwin_metrics._monitor import GuardedOutput, MonitorOptions, run_monitor
from darwin_metrics.prometheus import MetricsServer
from darwin_metrics.resource import ResourceManager

pytest.importorskip("rich")

ROOT = Path(__file__).resolve().parent.parent
RUN_WITHOUT = Path(__file__).resolve().parent / "run_without.py"
BACKENDS = ["asyncio", "trio"]
HOST = "127.0.0.1"
SERVING = re.compile(
    r"^darwin-metrics monitor: serving metrics at http://127\.0\.0\.1:(\d+)/metrics$"
)

SYSTEM_FAMILIES = {
    "system_cpu_utilization_ratio": set(),
    "system_memory_usage_bytes": {"state"},
    "system_memory_utilization_ratio": {"state"},
    "system_memory_limit_bytes": set(),
    "system_paging_usage_bytes": {"state"},
    "system_filesystem_usage_bytes": {"device", "mountpoint", "state"},
    "system_filesystem_utilization_ratio": {"device", "mountpoint"},
    "system_filesystem_limit_bytes": {"device", "mountpoint"},
}
MANAGER_FAMILIES = {
    "darwin_resource_utilization_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_utilization_peak_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_utilization_min_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_utilization_mean_ratio": ("gauge", {"manager", "resource_type"}),
    "darwin_resource_samples": ("counter", {"manager", "resource_type"}),
    "darwin_subscription_missed": ("counter", {"manager"}),
    "darwin_subscriptions": ("gauge", {"manager"}),
}


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "error", "COLUMNS": "100"}


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == errno.ECONNREFUSED


def check_names(families: dict[str, Metric]) -> None:
    """Only OpenTelemetry's system names and ours; never node_exporter's."""
    for name, family in families.items():
        assert not name.startswith("node_"), name
        assert name.startswith(("system_", "darwin_")), name
        if name.startswith("system_"):
            assert family.type == "gauge", name
            assert label_names(family) == {frozenset(SYSTEM_FAMILIES[name])}, name
        else:
            kind, labels = MANAGER_FAMILIES[name]
            assert family.type == kind, name
            assert label_names(family) == {frozenset(labels)}, name


def check_system(families: dict[str, Metric]) -> None:
    """The system series agree with one another and with this machine."""
    limit = value(families["system_memory_limit_bytes"])
    assert limit == psutil.virtual_memory().total
    usage = values(families["system_memory_usage_bytes"])
    utilization = values(families["system_memory_utilization_ratio"])
    assert {dict(key)["state"] for key in usage} >= {"used", "free"}
    for key, number in usage.items():
        assert 0 <= number <= limit
        assert utilization[key] == pytest.approx(number / limit)
    if sys.platform == "linux":  # used, free, buffered and cached: all of it
        assert sum(usage.values()) == limit
    paging = values(families["system_paging_usage_bytes"])
    assert {dict(key)["state"] for key in paging} == {"used", "free"}
    filesystems = values(families["system_filesystem_limit_bytes"])
    mounted = {(p.device, p.mountpoint) for p in psutil.disk_partitions(all=False)}
    assert {(dict(key)["device"], dict(key)["mountpoint"]) for key in filesystems} <= mounted
    fs_usage = values(families["system_filesystem_usage_bytes"])
    for key, size in filesystems.items():
        where = dict(key)
        states = {
            state: fs_usage[tuple(sorted({**where, "state": state}.items()))]
            for state in ("used", "free", "reserved")
        }
        assert sum(states.values()) == size
        ratio = value(families["system_filesystem_utilization_ratio"], **where)
        assert ratio == pytest.approx(states["used"] / (states["used"] + states["free"]))


@pytest.mark.anyio
@pytest.mark.real_time
class TestInProcess:
    async def test_the_scrape_matches_the_manager(self, anyio_backend_name: str) -> None:
        manager = ResourceManager()
        server = await MetricsServer.bind(HOST, 0, registry=CollectorRegistry())
        port = server.addresses[0][1]
        # One round of samples (the next is a minute away), so the scrape can be compared
        # with the manager's statistics exactly.
        options = MonitorOptions(interval=60.0, json=True, backend=anyio_backend_name)
        expected = {"memory", "swap"} | {name for name, _ in read_disks()[0]}
        out = io.StringIO()
        async with anyio.create_task_group() as group:

            async def monitor() -> None:
                await run_monitor(options, manager, out=GuardedOutput(out), metrics=server)

            group.start_soon(monitor)
            for _ in range(2000):  # the first round of samples, within 20 s
                if set(manager.usage_statistics()) == expected:
                    break
                await anyio.sleep(0.01)
            assert set(manager.usage_statistics()) == expected
            response = await aget(HOST, port)
            statistics = manager.usage_statistics()
            group.cancel_scope.cancel()
        assert refused(port)  # the server went with the monitor
        assert response.status == 200
        families = parse(response.body.decode())
        check_names(families)
        check_system(families)
        # The first reading has no CPU figure: it would cover almost no time.
        assert "system_cpu_utilization_ratio" not in families
        assert set(MANAGER_FAMILIES) <= set(families)
        for resource_type, stats in statistics.items():
            labels = {"manager": "monitor", "resource_type": resource_type}
            for family, number in (
                ("darwin_resource_utilization_ratio", stats.last / 100),
                ("darwin_resource_utilization_peak_ratio", stats.max / 100),
                ("darwin_resource_utilization_min_ratio", stats.min / 100),
                ("darwin_resource_utilization_mean_ratio", stats.mean / 100),
                ("darwin_resource_samples", stats.count),
            ):
                assert value(families[family], **labels) == number, (family, resource_type)
        assert len(values(families["darwin_resource_samples"])) == len(statistics)
        assert value(families["darwin_subscription_missed"], manager="monitor") == 0
        assert value(families["darwin_subscriptions"], manager="monitor") == 1
        # The disks as the manager saw them and as the system series say.
        for resource_type, stats in statistics.items():
            if resource_type.startswith("disk:"):
                mountpoint = resource_type.removeprefix("disk:")
                ratios = [
                    number
                    for key, number in values(
                        families["system_filesystem_utilization_ratio"]
                    ).items()
                    if dict(key)["mountpoint"] == mountpoint
                ]
                assert ratios == [pytest.approx(stats.last / 100, abs=0.002)], resource_type
        usages = [json.loads(line) for line in out.getvalue().splitlines()]
        assert {usage["resource_type"] for usage in usages} == expected


def _start(*options: str) -> tuple[subprocess.Popen[str], int]:
    """Start the monitor serving on a free port; return it and the port it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "darwin_metrics", "monitor", "--serve", f"{HOST}:0", *options],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    ready, _, _ = select.select([process.stderr], [], [], 20)
    if not ready:  # pragma: no cover - reported with what it said
        process.kill()
        raise AssertionError(f"no address on standard error: {process.communicate()}")
    match = SERVING.match(process.stderr.readline().rstrip("\n"))
    assert match is not None
    return process, int(match[1])


def _scrape_until(port: int, family: str, deadline: float = 20.0) -> dict[str, Metric]:
    """Scrape until ``family`` is in the scrape (the CPU figure needs a second reading)."""
    give_up = time.monotonic() + deadline
    while True:
        response = get(HOST, port)
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = parse(response.body.decode())
        if family in families or time.monotonic() > give_up:
            return families
        time.sleep(0.05)


class TestSubprocess:
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_json_lines_and_a_scrape(self, backend: str) -> None:
        process, port = _start(
            "--json", "--interval", "0.2", "--duration", "1.5", "--backend", backend
        )
        try:
            families = _scrape_until(port, "system_cpu_utilization_ratio")
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == 0, err
        assert err == ""  # only the address, read already
        check_names(families)
        check_system(families)
        assert set(SYSTEM_FAMILIES) - {"system_cpu_utilization_ratio"} <= set(families)
        cpu = value(families["system_cpu_utilization_ratio"])
        assert 0 <= cpu <= 1
        # What the scrape said the manager had seen is what the JSON lines show.
        usages = [json.loads(line) for line in out.splitlines()]
        for key, number in values(families["darwin_resource_utilization_ratio"]).items():
            resource_type = dict(key)["resource_type"]
            seen = [
                u["usage_percent"] / 100 for u in usages if u["resource_type"] == resource_type
            ]
            assert number in [pytest.approx(each) for each in seen], resource_type
            samples = value(families["darwin_resource_samples"], **dict(key))
            assert 1 <= samples <= len(seen)
        assert refused(port)

    def test_with_the_live_view(self) -> None:
        process, port = _start("--live", "--interval", "0.2", "--duration", "1")
        try:
            families = _scrape_until(port, "darwin_resource_utilization_ratio")
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait()
        assert process.returncode == 0, err
        check_names(families)
        memory = {"manager": "monitor", "resource_type": "memory"}
        assert 0 <= value(families["darwin_resource_utilization_ratio"], **memory) <= 1
        assert "stopped after" in out  # the summary, as without --serve


class TestAddresses:
    def one_line(self, text: str) -> str:
        assert "Traceback" not in text
        lines = text.splitlines()
        assert len(lines) == 1, text
        return lines[0]

    @pytest.mark.parametrize(
        ("address", "message"),
        [
            ("127.0.0.1", "'127.0.0.1' has no port"),
            ("127.0.0.1:", "has no port"),
            ("127.0.0.1:99999", "the port must be a number from 0 to 65535"),
            ("bad host:9464", "'bad host' is not a host name or an IP address"),
            ("::1:9464", "put an IPv6 address in brackets"),
        ],
    )
    def test_malformed(
        self, address: str, message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with pytest.raises(SystemExit) as exit_info:
            main(["monitor", "--json", "--serve", address])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        line = self.one_line(captured.err)
        assert line.startswith("darwin-metrics monitor: error: --serve: ")
        assert message in line

    def test_a_port_in_use(self, capsys: pytest.CaptureFixture[str]) -> None:
        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert main(["monitor", "--json", "--serve", f"{HOST}:{port}"]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert self.one_line(captured.err) == (
            f"darwin-metrics monitor: error: --serve {HOST}:{port}: cannot listen there: "
            "Address already in use"
        )

    def test_an_address_that_is_not_this_machines(self) -> None:
        # 192.0.2.0/24 is reserved for documentation; binding sends nothing anywhere.
        completed = subprocess.run(
            [sys.executable, "-m", "darwin_metrics", "monitor", "--serve", "192.0.2.1:9464"],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert completed.returncode == 2
        assert completed.stdout == ""
        assert self.one_line(completed.stderr) == (
            "darwin-metrics monitor: error: --serve 192.0.2.1:9464: cannot listen there: "
            "Cannot assign requested address"
        )

    def test_without_prometheus_client(self) -> None:
        completed = subprocess.run(
            [
                sys.executable,
                str(RUN_WITHOUT),
                "prometheus_client",
                "-m",
                "darwin_metrics",
                "monitor",
                "--serve",
                f"{HOST}:0",
            ],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert completed.returncode == 1
        assert self.one_line(completed.stderr) == (
            "darwin-metrics monitor --serve needs prometheus-client: "
            "pip install 'darwin-metrics[prometheus]'"
        )

    def test_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            main(["monitor", "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--serve HOST:PORT" in out
        assert "system_cpu_utilization_ratio" in out
