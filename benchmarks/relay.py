"""Usage relay rows (``ResourceManager.relay``), against a real server started as the tests
start theirs (``tests/_redis_server.py``), in the ``redis`` area.

Two managers in one event loop stand for two processes: each relay has its own connections.
The anchor is the same trip without the relay, raw coredis on two connections of their own:
a writer pipelining ``XADD key MAXLEN ~ N * <the relay's eight fields>`` commands (batches of
up to 1,000, each batch's replies awaited before the next, as the relay does) and a reader
looping on ``XREAD COUNT 1000 BLOCK 500`` from its last id.

- One-way latency across processes: from the call to ``a.track_resource_usage`` to the
  subscriber of a manager in another process holding the usage (``benchmarks/_relay_peer.py``,
  which measures each arrival against the usage's ``wall_time``: both processes read the
  system clock), one usage at a time, both relays publishing and receiving as deployed; p50
  and p99 (goals ≤ 1 ms and ≤ 3 ms). The anchor: one ``XADD`` from this process to a raw
  reader in that process. Samples of the two alternate.
- The same in one process (``b`` in this event loop too): both sides then share one
  interpreter, so it adds the receiving side's work to the sending side's; no goal.
- Throughput: usages per second from a tracking loop in ``a`` (publishing only) to ``b``'s
  subscriber (receiving only: two connections, as the anchor has), against the anchor
  writing and reading the same number of entries (goal ≥ 0.9x). Interleaved rounds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import coredis
from anyio.abc import ByteReceiveStream

from darwin_metrics._redis._relay import _connected
from darwin_metrics.resource import ResourceManager

from ._harness import Config, Goal, Row, ainterleave, compare

ROOT = Path(__file__).resolve().parent.parent
MAXLEN = 1_000_000  # no trimming while measuring
FIELDS = (b"publisher", b"0123456789abcdef", b"seq")
TAIL = (b"source", b"bench-host/1", b"host", b"bench-host", b"since", b"0-0")


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class _Raw:
    """The anchor: one writer and one reader connection, coredis's own requests."""

    def __init__(self, writer: Any, reader: Any, key: bytes) -> None:
        self.writer = writer
        self.reader = reader
        self.key = key
        self.last = b"0-0"
        self.received = 0
        self.arrived = anyio.Event()

    def xadd(self, seq: int) -> Any:
        return self.writer.create_request(
            b"XADD", self.key, b"MAXLEN", b"~", MAXLEN, b"*", *FIELDS, seq,
            b"type", "cpu", b"usage", repr(1.5), b"time", repr(time.time()), *TAIL,
            decode=False,
        )  # fmt: skip

    async def read_forever(self) -> None:
        while True:
            reply = await self.reader.create_request(
                b"XREAD", b"COUNT", 1000, b"BLOCK", 500, b"STREAMS", self.key, self.last,
                decode=False,
            )  # fmt: skip
            if reply:
                entries = reply[self.key]
                self.last = entries[-1][0]
                self.received += len(entries)
                self.arrived.set()


async def _latency_rows(config: Config, backend: str, url: str) -> list[Row]:
    samples = 100 if config.quick else 2000
    ours: list[float] = []
    theirs: list[float] = []
    client = coredis.Redis.from_url(url)
    async with (
        ResourceManager() as a,
        ResourceManager() as b,
        _connected(client, "bench-writer", 5) as writer,
        _connected(client, "bench-reader", 5) as reader,
        anyio.create_task_group() as group,
    ):
        await a.relay(url, prefix="bench:latency:", source="a")
        await b.relay(url, prefix="bench:latency:", source="b")
        subscription = b.subscribe()
        raw = _Raw(writer, reader, b"bench:raw-latency")
        group.start_soon(raw.read_forever)
        await anyio.sleep(0.05)  # the raw reader blocks in XREAD
        for n in range(samples + 20):  # the first 20 warm up
            start = time.perf_counter()
            await a.track_resource_usage("cpu", 1.0)
            await subscription.__anext__()
            mine = time.perf_counter() - start

            raw.arrived = anyio.Event()
            start = time.perf_counter()
            ack = raw.xadd(n)
            await raw.arrived.wait()
            anchor = time.perf_counter() - start
            await ack
            if n >= 20:
                ours.append(mine)
                theirs.append(anchor)
        group.cancel_scope.cancel()
    note = f"{samples} usages one at a time, both managers in this event loop"
    rows = []
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        mine_p, raw_p = _percentile(ours, fraction), _percentile(theirs, fraction)
        rows.append(
            Row(
                "redis",
                f"relay latency in one process, track -> peer's subscriber, {label}",
                backend,
                "s/op",
                "raw XADD -> XREAD",
                mine_p,
                raw_p,
                mine_p / raw_p if raw_p else None,
                note=note,
            )
        )
    return rows


class _Lines:
    """Lines from a process's output, one at a time."""

    def __init__(self, stream: ByteReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> str:
        while b"\n" not in self.buffer:
            self.buffer += await self.stream.receive()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode().strip()


async def _cross_process_rows(config: Config, backend: str, url: str) -> list[Row]:
    samples = 100 if config.quick else 2000
    ours: list[float] = []
    theirs: list[float] = []
    client = coredis.Redis.from_url(url)
    prefix, raw_key = "bench:peer:", b"bench:raw-peer"
    command = [sys.executable, "-m", "benchmarks._relay_peer", url, backend, prefix, raw_key]
    async with (
        await anyio.open_process(command, cwd=ROOT) as peer,
        ResourceManager() as a,
        _connected(client, "bench-writer", 5) as writer,
    ):
        assert peer.stdout is not None
        assert peer.stdin is not None
        lines = _Lines(peer.stdout)
        with anyio.fail_after(60):
            assert await lines.next() == "ready"
            await a.relay(url, prefix=prefix, source="a")
            for n in range(samples + 20):  # the first 20 warm up
                await a.track_resource_usage("cpu", 1.0)
                kind, mine = (await lines.next()).split()
                assert kind == "relay"
                await writer.create_request(
                    b"XADD", raw_key, b"*", b"t", repr(time.time()), decode=False
                )
                kind, anchor = (await lines.next()).split()
                assert kind == "raw"
                if n >= 20:
                    ours.append(float(mine))
                    theirs.append(float(anchor))
        await peer.stdin.aclose()
    note = f"{samples} usages one at a time, received in another process"
    rows = []
    for label, fraction, goal in (
        ("p50", 0.5, Goal("≤ 1 ms", "ours", "<=", 0.001)),
        ("p99", 0.99, Goal("≤ 3 ms", "ours", "<=", 0.003)),
    ):
        mine_p, raw_p = _percentile(ours, fraction), _percentile(theirs, fraction)
        rows.append(
            Row(
                "redis",
                f"relay one-way latency, track -> subscriber in another process, {label}",
                backend,
                "s/op",
                "raw XADD -> XREAD",
                mine_p,
                raw_p,
                mine_p / raw_p if raw_p else None,
                goal=goal,
                note=note,
            )
        )
    return rows


async def _ours_throughput(url: str, usages: int, prefix: str) -> float:
    async with ResourceManager() as a, ResourceManager() as b:
        await a.relay(url, prefix=prefix, source="a", receive=False, maxlen=MAXLEN)
        relay_b = await b.relay(url, prefix=prefix, source="b", publish=False)
        subscription = b.subscribe(buffer_size=usages)
        start = time.perf_counter()
        async with anyio.create_task_group() as group:

            async def track() -> None:
                for n in range(usages):
                    await a.track_resource_usage("cpu", float(n % 100))

            group.start_soon(track)
            got = 0
            while got < usages:
                got += len(await subscription.next_batch())
        elapsed = time.perf_counter() - start
        assert subscription.missed == 0
        assert relay_b.statistics().missed == 0
    return usages / elapsed


async def _raw_throughput(url: str, usages: int, key: bytes) -> float:
    client = coredis.Redis.from_url(url)
    async with (
        _connected(client, "bench-writer", 5) as writer,
        _connected(client, "bench-reader", 5) as reader,
        anyio.create_task_group() as group,
    ):
        raw = _Raw(writer, reader, key)
        raw.last = await writer.create_request(b"XADD", key, b"*", b"start", b"1", decode=False)
        group.start_soon(raw.read_forever)
        start = time.perf_counter()
        sent = 0
        while sent < usages:
            batch = [raw.xadd(sent + i) for i in range(min(1000, usages - sent))]
            for request in batch:
                await request
            sent += len(batch)
        while raw.received < usages:
            raw.arrived = anyio.Event()
            await raw.arrived.wait()
        elapsed = time.perf_counter() - start
        group.cancel_scope.cancel()
    return usages / elapsed


async def _throughput_rows(config: Config, backend: str, url: str) -> list[Row]:
    usages = 1000 if config.quick else 20_000
    rounds = iter(range(1_000_000))

    def fresh(make: Callable[[int], Any]) -> Callable[[], Any]:
        return lambda: make(next(rounds))  # a stream of its own per sample

    mine, theirs = await ainterleave(
        [
            fresh(lambda n: _ours_throughput(url, usages, f"bench:t{n}:")),
            fresh(lambda n: _raw_throughput(url, usages, b"bench:raw%d" % n)),
        ],
        config.repeats,
    )
    return [
        compare(
            "redis",
            "relay throughput, track -> peer's subscriber vs raw XADD -> XREAD",
            backend,
            "1/s",
            "raw XADD -> XREAD",
            mine,
            theirs,
            goal=Goal("≥ 0.9x", "ratio", ">=", 0.9),
            note=(
                f"{usages} usages per sample from a tracking loop; the anchor pipelines "
                "XADDs of the same fields, 1,000 per round trip"
            ),
        )
    ]


async def rows(config: Config, backend: str, url: str) -> list[Row]:
    out = await _cross_process_rows(config, backend, url)
    out += await _latency_rows(config, backend, url)
    out += await _throughput_rows(config, backend, url)
    return out
