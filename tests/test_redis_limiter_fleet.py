"""SharedCapacityLimiter across real processes, against a real Valkey/Redis server.

Each test starts worker processes (``tests/_limiter_worker.py``) on asyncio or trio, lets them
get ready, starts them together, and checks what they report and what the server holds:

- a storm of eight processes, one of them killed (``SIGKILL``) while it holds permits: the
  holders count themselves on the server and never exceed ``total_tokens``; the killed
  process's permits return within one lease; nothing is held at the end;
- FIFO across processes: grants follow ticket order, and every task gets its share;
- pools in three processes with ``shared_limit``: never more resources fleet-wide than the
  limit.

``DARWIN_METRICS_STRESS=1`` makes the storm ten times longer.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

import pytest
from _limiter_worker import Fleet, fleet
from _redis_server import RedisServer

pytestmark = [pytest.mark.real_time, pytest.mark.redis]

STRESS = os.environ.get("DARWIN_METRICS_STRESS") == "1"
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


def key(name: str, suffix: str) -> str:
    return f"darwin-metrics:limiter:{{{name}}}:{suffix}"


@pytest.fixture(name="fleet")
def fleet_fixture() -> Iterator[Fleet]:
    with fleet() as workers:
        yield workers


def server_ms(server: RedisServer) -> int:
    now = server.command("TIME")
    assert isinstance(now, list)
    return int(now[0]) * 1000 + int(now[1]) // 1000


def assert_nothing_held(server: RedisServer, name: str) -> None:
    for suffix in ("holders", "queue", "waiters"):
        assert server.command("ZCARD", key(name, suffix)) == 0, suffix
    assert server.command("HLEN", key(name, "fences")) == 0


@pytest.mark.stress
@BACKENDS
def test_storm_of_eight_processes_one_killed(
    backend: str, redis_url: str, redis_session_server: RedisServer, fleet: Fleet
) -> None:
    name, total, lease, victim_holds = "storm", 4, 1.0, 2
    duration = 20.0 if STRESS else 2.0
    common = {"url": redis_url, "name": name, "total": total, "lease": lease, "backend": backend}
    victim = fleet.start("victim", **common, hold=victim_holds, counter="counter")
    stormers = [
        fleet.start("storm", **common, tasks=4, duration=duration, seed=n, counter="counter")
        for n in range(7)
    ]
    fleet.ready()
    victim.go()
    said, owner = victim.receive()
    assert said == "holding"
    for worker in stormers:
        worker.go()
    time.sleep(min(0.5, duration / 4))

    # The victim dies holding its permits.
    victim.kill()
    killed = time.monotonic()
    holders = redis_session_server.command("ZRANGE", key(name, "holders"), "0", "-1", "WITHSCORES")
    assert isinstance(holders, list)
    deadlines = [
        int(float(score))
        for member, score in zip(holders[::2], holders[1::2], strict=True)
        if member.startswith(owner.encode())
    ]
    assert len(deadlines) == victim_holds
    # Until the server reaps them, the counter counts the victim's permits too; it stops just
    # before (it cannot take them back itself), so a holder never sees a dead one counted.
    time.sleep(max(0.0, (max(deadlines) - server_ms(redis_session_server) - 100) / 1000))
    redis_session_server.command("DECRBY", "counter", str(victim_holds))

    def victims() -> int:
        members = redis_session_server.command("ZRANGE", key(name, "holders"), "0", "-1")
        assert isinstance(members, list)
        return sum(member.startswith(owner.encode()) for member in members)

    while victims() and time.monotonic() - killed < 5 * lease:
        time.sleep(0.005)
    returned = time.monotonic() - killed
    assert victims() == 0
    # Its deadlines were at most one lease after its death (it renewed every lease / 3), and
    # the processes waiting reaped them right then; the margin is for a loaded machine.
    assert returned <= lease + 0.5, f"the dead process's permits came back after {returned} s"

    reports = [worker.report() for worker in stormers]
    assert sum(report["violations"] for report in reports) == 0, reports
    assert max(report["max"] for report in reports) <= total
    assert all(report["grants"] > 0 for report in reports), reports
    assert sum(report["cancelled"] for report in reports) > 0
    assert sum(report["timeouts"] for report in reports) > 0
    assert sum(report["reaped"] for report in reports) == victim_holds
    assert sum(report["lost"] for report in reports) == 0
    # Nothing is held at the end, and every holder took itself off the counter.
    assert_nothing_held(redis_session_server, name)
    assert redis_session_server.command("GET", "counter") == b"0"


@BACKENDS
def test_fifo_across_processes(
    backend: str, redis_url: str, redis_session_server: RedisServer, fleet: Fleet
) -> None:
    name = "fifo"
    common = {"url": redis_url, "name": name, "total": 2, "lease": 3.0, "backend": backend}
    workers = [fleet.start("fifo", **common, tasks=2, duration=1.5, hold=0.002) for _ in range(4)]
    fleet.ready()
    for worker in workers:
        worker.go()
    reports = [worker.report() for worker in workers]
    grants = [grant for report in reports for task in report["grants"] for grant in task]
    # Fencing tokens follow the order of grants: tickets must follow it too.
    by_grant = sorted(grants, key=lambda grant: grant[1])
    tickets = [ticket for ticket, _ in by_grant]
    assert tickets == sorted(tickets)
    assert len({fence for _, fence in grants}) == len(grants)
    counts = [len(task) for report in reports for task in report["grants"]]
    mean = statistics.mean(counts)
    assert mean >= 20, counts
    assert max(counts) - min(counts) <= 0.1 * mean, counts
    assert_nothing_held(redis_session_server, name)


@BACKENDS
def test_pools_in_three_processes_share_the_limit(
    backend: str, redis_url: str, redis_session_server: RedisServer, fleet: Fleet
) -> None:
    name, total = "pools", 5
    common = {"url": redis_url, "name": name, "total": total, "lease": 3.0, "backend": backend}
    workers = [
        fleet.start(
            "pool",
            **common,
            max_size=4,
            tasks=6,
            duration=1.5,
            max_idle_time=0.02,
            max_lifetime=0.3,
            seed=n,
        )
        for n in range(3)
    ]
    fleet.ready()
    for worker in workers:
        worker.go()
    reports = [worker.report() for worker in workers]
    assert sum(report["violations"] for report in reports) == 0, reports
    assert max(report["max"] for report in reports) <= total
    # Idle reaping gave tokens back, so every process created (and leased) resources.
    assert all(report["created"] > 0 for report in reports), reports
    assert sum(report["created"] for report in reports) > 3 * total
    assert all(report["leases"] > 0 for report in reports), reports
    assert redis_session_server.command("GET", "open") == b"0"
    assert_nothing_held(redis_session_server, name)
