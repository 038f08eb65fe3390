"""Every example runs on both backends, finishes by itself and shows what it says it shows.

The README's Python snippets run too, each in a fresh interpreter, so that none goes stale.
These are plain subprocess tests: real time, real sockets, no anyio fixture.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUN_WITHOUT = ROOT / "tests" / "run_without.py"
BACKENDS = ["asyncio", "trio"]
TIMEOUT = 60  # seconds; each example takes one to three

pytest.importorskip("trio")

# What each example must print, beyond exiting with status 0.
EXPECTED = {
    "keyed_pool.py": [
        "4 servers listening on 127.0.0.1: ports ",
        "most connections at once: 4 in all, 2 per server (limits: 4 and 2)",
        "connections closed to make room for another shard's waiting requests: ",
        "four idle connections to the others\n  idle before: {'shard-",
        "shard-d: hello there",
        "; evicted: 1\n",
        "4 leased, 0 idle, shards: ['shard-a', 'shard-b']",
        "after 1 release: shard-c is served (1 connection), 4 tasks of the busy shards",
        "30 tasks waiting",
        "PoolOverloadedError: 30 tasks are already waiting",
        "rejected: 1",
        "open connections after the pool closed: 0",
    ],
    "pool_leases.py": [
        "echo server listening on 127.0.0.1:",
        "twenty tasks share three connections",
        "PoolTimeoutError",
        "discard it",
        "timeouts: 1",
        "disposed: 2",
    ],
    "ttl_cache.py": [
        "10 answers {144}, 1 computation",
        "computed it again: 2 computations",
        "(expired)",
        "(size)",
        # Each cache's statistics, labelled.
        "the ttl cache (parts 1-3, ttl 0.5 s):\n    100 hits, ",
        "the small cache (part 4, maxsize 3):\n    2 hits, 0 misses (hit ratio 100%)",
    ],
    "usage_broadcast.py": [
        "received 100, missed   0",
        "slow",
        "usage statistics:",
        "mean=",
        "peaks, from get_usage_stats(): cpu 90.0%, memory 54.5%",
    ],
    "prometheus_export.py": [
        "serving metrics at http://127.0.0.1:",
        "a scrape while the workers run (",
        "a scrape once they are done (",
        # Deterministic once the workers are done: 8 workers x 6 leases, all returned.
        'darwin_pool_connections{pool="db",state="idle"} 4.0',
        'darwin_pool_acquired_total{pool="db"} 48.0',
        'darwin_pool_use_seconds_bucket{le="+Inf",pool="db"} 48.0',
        'darwin_resource_utilization_peak_ratio{manager="app",resource_type="pool:db"} 1.0',
        "the server answered 2 scrapes",
    ],
    "system_monitor.py": [
        "cpu",
        "memory",
        "pool:workers",
        "usage statistics:",
        "peak=",
        "leases of 4 resources by 8 workers",
        "waiting for a resource:",
    ],
}
# A figure with more decimals than anyone reads (``total_wait=6.774004942999454``).
RAW_FLOAT = re.compile(r"\d\.\d{4,}")


def _env() -> dict[str, str]:
    # The examples import darwin_metrics from this checkout, installed or not.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "error"}


def test_every_example_is_tested() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("example", sorted(EXPECTED))
def test_example_runs(example: str, backend: str) -> None:
    if example == "system_monitor.py":
        pytest.importorskip("psutil")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / example), "--backend", backend],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    for text in EXPECTED[example]:
        assert text in completed.stdout, f"{text!r} not in the output:\n{completed.stdout}"
    assert not RAW_FLOAT.search(completed.stdout), completed.stdout
    assert not re.search(r"\bseed\b", completed.stdout, re.IGNORECASE)


def test_system_monitor_without_psutil_says_so_in_one_line() -> None:
    completed = subprocess.run(
        [sys.executable, str(RUN_WITHOUT), "psutil", str(EXAMPLES / "system_monitor.py")],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr.splitlines() == [
        "system_monitor.py samples this machine with psutil, which is not installed: "
        'pip install "darwin-metrics[system]"'
    ]


def test_the_readme_says_which_examples_need_an_extra() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.partition("## Examples\n")[2].partition("\n## ")[0]
    rows = {
        match[1]: match[2]
        for match in re.finditer(r"^\| \[`(\w+\.py)`\]\([^)]*\) \| ([^|]*) \|", section, re.M)
    }
    assert sorted(rows) == sorted(EXPECTED)
    for example, needs in rows.items():
        assert ("`system` extra" in needs) == (example == "system_monitor.py"), (example, needs)
    assert "`--backend trio` needs the `trio` extra" in section


def test_example_rejects_an_unknown_backend() -> None:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "ttl_cache.py"), "--backend", "curio"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 2
    assert "invalid choice: 'curio'" in completed.stderr


def readme_snippets() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```$", readme, flags=re.MULTILINE | re.DOTALL)


def test_readme_has_snippets() -> None:
    assert len(readme_snippets()) >= 3  # the pool, the cache and the manager


@pytest.mark.parametrize("number", range(len(readme_snippets())))
def test_readme_snippet_runs(number: int, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    snippet = readme_snippets()[number]
    script = tmp_path / f"snippet_{number}.py"
    script.write_text(snippet, encoding="utf-8")
    env = _env()
    if "REDIS_URL" in snippet:  # the shared cache tier's: a server of the tests' own
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
