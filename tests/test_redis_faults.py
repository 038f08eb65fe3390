"""RedisCache under faults, against a real server: the invalidation race between two
processes, the listener's connection killed, the server restarted and the server frozen.

Each fault test runs a workload while the fault happens: a writer tier stores increasing
versions of a few keys, a reader tier reads them all the time. A read is *stale* when it
returns a version older than one whose write had completed ``GRACE`` before the read began
(far longer than the invalidation delay, far shorter than the time a stale value would
otherwise live): the tests require none.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from _redis_race import run_race
from _redis_server import RedisServer

from darwin_metrics import RedisUnavailableError
from darwin_metrics.redis import RedisCache

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.real_time,
    pytest.mark.redis,
    # coredis leaves a failed connection's memory streams unclosed (see conftest.py).
    pytest.mark.filterwarnings(
        r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning"
    ),
]

KEEPALIVE = 0.5
GRACE = 0.1
KEYS = [f"k{i}" for i in range(8)]


async def wait_for(condition: Callable[[], bool], timeout: float) -> float:
    """Poll ``condition`` until it holds; return how long that took (real time)."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        for _ in itertools.count():  # the listener's doing: no event to wait for
            if condition():
                break
            await anyio.sleep(0.002)
    return anyio.current_time() - start


class Workload:
    """A writer tier and a reader tier on the same prefix, and the stale reads seen."""

    def __init__(self, reader: RedisCache[Any], writer: RedisCache[Any]) -> None:
        self.reader = reader
        self.writer = writer
        #: key -> [(time the write completed, version)], in order.
        self.committed: dict[str, list[tuple[float, int]]] = {key: [] for key in KEYS}
        self.stale: list[tuple[str, int, int]] = []
        self.reads = 0
        self.errors = 0
        self.version = 0

    def floor(self, key: str, now: float) -> int:
        """The newest version of ``key`` committed at least GRACE before ``now``."""
        best = -1
        for when, version in self.committed[key]:
            if when <= now - GRACE:
                best = version
        return best

    async def write_forever(self) -> None:
        while True:
            for key in KEYS:
                self.version += 1
                try:
                    await self.writer.set(key, self.version)
                except RedisUnavailableError:
                    self.errors += 1
                    await anyio.sleep(0.01)
                    continue
                self.committed[key].append((anyio.current_time(), self.version))
            await anyio.sleep(0.005)

    async def read_forever(self) -> None:
        while True:
            for key in KEYS:
                floor = self.floor(key, anyio.current_time())
                try:
                    value = await self.reader.get(key)
                except RedisUnavailableError:
                    self.errors += 1
                    await anyio.sleep(0.01)
                    continue
                self.reads += 1
                # None: the restarted server lost the key; that is not a cached value.
                if value is not None and value < floor:
                    self.stale.append((key, value, floor))
            await anyio.lowlevel.checkpoint()

    def serving_from_l1(self) -> bool:
        """Whether the reader serves every key from its in-process cache again."""
        return all(self.reader.get_local(key) is not None for key in KEYS)


async def fill(work: Workload) -> None:
    """Read every key until the reader caches them all (within 2 s)."""
    with anyio.fail_after(2):
        while not work.serving_from_l1():
            for key in KEYS:
                await work.reader.get(key)
            await anyio.sleep(0.002)


def tiers(url: str) -> tuple[RedisCache[Any], RedisCache[Any]]:
    return (
        RedisCache(url, prefix="fault:", ttl=60, keepalive=KEEPALIVE),
        RedisCache(url, prefix="fault:", ttl=60, keepalive=KEEPALIVE),
    )


class TestRace:
    async def test_no_reader_serves_a_replaced_value(self, redis_url: str) -> None:
        # 2,000 keys, each read here while a writer process writes it three times; 3 s later
        # no key is served stale. (coredis's own client cache is measured on the same race
        # by ``python -m benchmarks --only redis``.)
        with anyio.fail_after(60):
            result = await run_race(redis_url, keys=2000, settle=3.0)
        assert result.stale == 0
        assert result.reads > result.keys


class TestListenerFaults:
    async def test_client_kill_of_the_listener(self, redis_server: RedisServer) -> None:
        reader, writer = tiers(redis_server.url)
        async with reader, writer, anyio.create_task_group() as group:
            work = Workload(reader, writer)
            group.start_soon(work.write_forever)
            group.start_soon(work.read_forever)
            await wait_for(work.serving_from_l1, 2)
            listener = reader.statistics().listener_id
            assert listener is not None

            redis_server.command("CLIENT", "KILL", "ID", str(listener))
            # Bypassed within one keepalive (here: as soon as the connection closes).
            await wait_for(lambda: reader.statistics().disconnects == 1, KEEPALIVE)
            # Back, and serving hits, within 2 s.
            await wait_for(lambda: reader.listening, 2)
            assert reader.statistics().listener_id != listener
            await wait_for(work.serving_from_l1, 2)
            await anyio.sleep(0.2)  # more reads and writes after the reconnection
            group.cancel_scope.cancel()
        assert work.stale == []
        assert work.reads > 100
        assert work.errors == 0
        assert reader.statistics().connects == 2

    async def test_server_restart(self, redis_server: RedisServer) -> None:
        reader, writer = tiers(redis_server.url)
        async with reader, writer, anyio.create_task_group() as group:
            work = Workload(reader, writer)
            group.start_soon(work.write_forever)
            group.start_soon(work.read_forever)
            await wait_for(work.serving_from_l1, 2)

            await anyio.to_thread.run_sync(redis_server.stop)
            await wait_for(lambda: not reader.listening, KEEPALIVE)
            assert all(reader.get_local(key) is None for key in KEYS)
            await anyio.sleep(0.3)  # down for a while: reads and writes fail meanwhile
            await anyio.to_thread.run_sync(redis_server.start)
            back = await wait_for(work.serving_from_l1, 2)
            assert back <= 2
            await anyio.sleep(0.2)
            group.cancel_scope.cancel()
        assert work.stale == []
        assert work.errors > 0  # the outage was seen
        stats = reader.statistics()
        assert stats.disconnects >= 1
        assert stats.listening is False  # closed now

    async def test_silent_server(self, redis_server: RedisServer) -> None:
        reader, writer = tiers(redis_server.url)
        async with reader, writer:
            for key in KEYS:
                await writer.set(key, 1)
            work = Workload(reader, writer)
            await fill(work)

            redis_server.pause()  # connections stay open, nothing answers
            try:
                silent = await wait_for(lambda: not reader.listening, KEEPALIVE + 0.1)
                assert silent <= KEEPALIVE + 0.1
                assert all(reader.get_local(key) is None for key in KEYS)
                await anyio.sleep(0.3)
            finally:
                redis_server.resume()
            await wait_for(lambda: reader.listening, 2)
            await fill(work)
            assert [await reader.get(key) for key in KEYS] == [1] * len(KEYS)
