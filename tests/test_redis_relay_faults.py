"""Eight processes publishing and relaying usages through one server, under faults.

Each process (``tests/_relay_worker.py``, half of them on asyncio, half on trio) tracks its
own usages and relays everyone's; each of its three subscribers (lossless buffer, small
dropping buffer, a ``"wait"`` one that holds the reader for a while) must account for every
usage published by all eight: ``received + missed == published``, exactly, while the stream
is trimmed under a lagging reader, while the relays' connections are killed (``CLIENT KILL``),
and across a server restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from _redis_server import RedisServer, ServerError

pytestmark = [pytest.mark.redis, pytest.mark.real_time]

WORKER = str(Path(__file__).with_name("_relay_worker.py"))
PROCESSES = 8
EVENTS = 300
RELAY_NAMES = ("darwin-metrics-relay-reader", "darwin-metrics-relay-publisher")


def read_line(process: subprocess.Popen[str], deadline: float) -> str:
    """The process's next line of output, or a failure with its error output."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not selector.select(timeout=max(deadline - time.monotonic(), 0)):
            if time.monotonic() >= deadline:
                process.kill()
                _, errors = process.communicate()
                pytest.fail(f"a worker said nothing in time; its errors:\n{errors[-3000:]}")
    line = process.stdout.readline()
    if not line:
        _, errors = process.communicate()
        pytest.fail(f"a worker exited early ({process.returncode}):\n{errors[-3000:]}")
    return line.strip()


@contextmanager
def workers(url: str, *, maxlen: int, pause: float) -> Iterator[list[subprocess.Popen[str]]]:
    total = PROCESSES * EVENTS
    processes = []
    try:
        for n in range(PROCESSES):
            backend = ("asyncio", "trio")[n % 2]
            args = [url, backend, f"worker-{n}", EVENTS, maxlen, total, pause]
            processes.append(
                subprocess.Popen(
                    [sys.executable, WORKER, *map(str, args)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            )
        deadline = time.monotonic() + 60
        for process in processes:
            assert read_line(process, deadline) == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


def reports(processes: Sequence[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    return [json.loads(read_line(process, deadline)) for process in processes]


def check_exact(results: Sequence[dict[str, Any]]) -> None:
    total = PROCESSES * EVENTS
    for result in results:
        for name, figures in result["subscribers"].items():
            accounted = figures["received"] + figures["missed"]
            if accounted != total:
                pytest.fail(
                    f"{result['name']}, {name}: {accounted} of {total}\n{json.dumps(result)}"
                )
            for source, count in figures["by_source"].items():
                assert count <= EVENTS, (result["name"], name, source, count)


def kill_relay_connections(server: RedisServer) -> int:
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    killed = 0
    for line in listing.decode().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("name") in RELAY_NAMES:
            with contextlib.suppress(ServerError):  # gone meanwhile
                killed += server.command("CLIENT", "KILL", "ID", fields["id"]) == 1
    return killed


def test_trimming_and_killed_connections(redis_server: RedisServer) -> None:
    # MAXLEN ~ 20 keeps about a hundred entries: a reader held for 0.3 s falls far behind.
    with workers(redis_server.url, maxlen=20, pause=0.3) as processes:
        time.sleep(0.15)
        first = kill_relay_connections(redis_server)
        time.sleep(0.25)
        second = kill_relay_connections(redis_server)
        results = reports(processes)
    assert first > 0
    assert second > 0
    check_exact(results)
    assert sum(result["relay"]["missed"] for result in results) > 0  # trimming was seen
    assert all(result["relay"]["disconnects"] >= 1 for result in results)
    # The lossless subscriber misses only what the relay could not read.
    for result in results:
        assert result["subscribers"]["fast"]["missed"] == result["relay"]["missed"]


def test_server_restart(redis_server: RedisServer) -> None:
    with workers(redis_server.url, maxlen=100_000, pause=0.05) as processes:
        time.sleep(0.2)
        restart = threading.Thread(target=redis_server.restart, kwargs={"down_for": 0.3})
        restart.start()
        restart.join()
        results = reports(processes)
    check_exact(results)
    assert all(result["relay"]["disconnects"] >= 1 for result in results)
    assert redis_server.starts == 2
