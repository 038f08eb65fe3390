"""The benchmark suite keeps working: ``python -m benchmarks --smoke`` runs and reports.

``--smoke`` is ``--quick`` with the smallest sizes, so that every row runs within the test
suite's time; ``--quick`` and full runs share the same code.

No test here asserts a speed: the figures depend on the machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _redis_server import REQUIRE_ENV, find_server_binary

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("cachetools")
pytest.importorskip("trio")


def test_quick_run_reports_every_area(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--json", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "ratio" in completed.stdout

    data = json.loads(report.read_text(encoding="utf-8"))
    rows = data["rows"]
    # The redis area needs a server binary (the tests' own); CI requires one.
    redis = not isinstance(find_server_binary(), str) or os.environ.get(REQUIRE_ENV) == "1"
    areas = {"pool", "cache", "broadcast", "export"} | ({"redis", "limiter"} if redis else set())
    assert {row["area"] for row in rows} == areas
    assert {row["backend"] for row in rows} >= {"asyncio", "trio"}
    for row in rows:
        assert isinstance(row["ours"], float), row
        assert math.isfinite(row["ours"]), row
        assert row["ours"] >= 0, row
        if row["anchor_value"] is not None:
            assert math.isfinite(row["anchor_value"]), row
        if row["goal"] is not None:
            assert row["met"] in (True, False), row
    names = {row["name"] for row in rows}
    for expected in (
        "lease() cycle, uncontended",
        "keyed lease(key) cycle, 50 keys, uncontended",
        "max_waiting=0: acquire refused (PoolOverloadedError)",
        "get hit, int keys",
        "set, str keys",
        "track_resource_usage, 100 subscribers",
        "lease() cycle, uncontended: with histograms",
        "recording one lease's use time",
    ):
        assert expected in names
    assert any(name.startswith("hit ratio") for name in names)
    assert any(name.startswith("hit ratio") and "max_weight" in name for name in names)
    assert "@cached hit, 1k int keys" in names
    assert any(name.startswith("stampede") and name.endswith("loads") for name in names)
    decorated = {
        (row["backend"], row["anchor"]) for row in rows if row["name"].startswith("@cached")
    }
    assert {("asyncio", "get + coroutine"), ("trio", "get + coroutine")} <= decorated
    for row in rows:
        if row["name"].startswith("stampede") and row["name"].endswith("loads"):
            assert row["ours"] == 1.0, row  # single flight: one load, whatever the machine
    assert any(name.startswith("memory per entry") for name in names)
    assert any(name.startswith("two threads") for name in names)
    assert any(name.startswith("contended") for name in names)
    assert any(
        name.startswith("one scrape, 10 pools + 10 caches + 100 resource types") for name in names
    )
    if redis:
        for expected in (
            "L1 hit: tier.get_local vs Cache.get, str keys",
            "L1 miss + L2 hit: get_or_load vs raw GET",
            "invalidation delay, write ack -> peer L1 drop, p99",
            "relay one-way latency, track -> subscriber in another process, p50",
            "relay one-way latency, track -> subscriber in another process, p99",
            "relay latency in one process, track -> peer's subscriber, p50",
            "relay throughput, track -> peer's subscriber vs raw XADD -> XREAD",
        ):
            assert expected in names
        assert "uncontended acquire+release vs one raw EVALSHA" in names
        assert any(name.startswith("contended:") and "fairness" in name for name in names)
        race = [row for row in rows if row["name"].startswith("race,")]
        assert {row["backend"] for row in race} == {"asyncio", "trio"}
        assert all(row["ours"] == 0 for row in race), race  # no stale key, ever
    assert data["machine"]["packages"]["anyio"]
