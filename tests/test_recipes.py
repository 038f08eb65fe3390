"""Every recipe in ``examples/recipes/`` runs on both backends and shows what it says it shows.

The recipes talk to servers they start themselves on 127.0.0.1 (HTTP, and TLS with a
certificate made by trustme). Plain subprocess tests: real time, real sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"
TIMEOUT = 60  # seconds; each recipe takes two or three

pytest.importorskip("trio")
pytest.importorskip("httpx")
pytest.importorskip("trustme")

# What each recipe must print, beyond exiting with status 0 and printing no warning.
EXPECTED = {
    "http_client_pool.py": [
        "12 of 12 leases started logged out (reset cleared the cookies)",
        "PoolTimeoutError: no resource became available within 0.1 s",
        "gave up on /slow: True",
        "which answers 200",
        "clients made: 3, leases: 17",
        "timeouts: 1, disposed: 0",
        "done: the pool closed its clients",
    ],
    "tls_connection_pool.py": [
        "TLS server listening on 127.0.0.1:",
        "12 of 12 leases started with a clean session (reset)",
        "gave up waiting: True",
        "is out of step",
        "the next lease got a fresh <connection from port",
        "PoolTimeoutError: no resource became available within 0.1 s",
        "refused by check on checkout:",
        "done: the pool closed its connections, the server stopped",
    ],
    "cached_http_call.py": [
        "50 answers, 1 request to the service",
        "still 1 request",
        "answer number 2: the service was asked again",
        "10 tasks got HTTP 503 from 1 request",
        "the next call asked again: 2 requests",
        "64 calls, 4 requests to the service",
        "cached now: {'paris': True, 'atlantis': False}",
    ],
}


def test_every_recipe_is_tested() -> None:
    recipes = [path.name for path in RECIPES.glob("*.py") if not path.name.startswith("_")]
    assert sorted(recipes) == sorted(EXPECTED)


def test_every_recipe_is_in_the_docs() -> None:
    page = (ROOT / "docs" / "recipes.rst").read_text(encoding="utf-8")
    for recipe in EXPECTED:
        assert f".. literalinclude:: ../examples/recipes/{recipe}" in page, recipe


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_runs(recipe: str, backend: str) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(RECIPES / recipe), "--backend", backend],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "error"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    for text in EXPECTED[recipe]:
        assert text in completed.stdout, f"{text!r} not in the output:\n{completed.stdout}"
