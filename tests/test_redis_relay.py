"""The usage relay (``ResourceManager.relay``) against a real Valkey/Redis server, on asyncio
and trio.

Two managers in one process stand for two processes: each relay has its own two connections,
so the server sees independent clients. Entries written by hand (``inject``) test the
reader's counting exactly. The eight-process runs are in ``test_redis_relay_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import pytest
from _native import cancel_after_steps
from _redis_server import RedisServer

from darwin_metrics import RedisUnavailableError, UsageRelayError
from darwin_metrics.redis import RelayStatistics, UsageRelay
from darwin_metrics.resource import ResourceManager, ResourceUsage, Subscription

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.real_time,
    pytest.mark.redis,
    # coredis leaves a failed connection's memory streams unclosed (see conftest.py).
    pytest.mark.filterwarnings(
        r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning"
    ),
]

STREAM = "darwin-metrics:usage"
RELAY_NAMES = (b"darwin-metrics-relay-reader", b"darwin-metrics-relay-publisher")


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll ``condition`` (real time) until it holds: the server's doing, no event to wait on."""
    with anyio.fail_after(timeout):
        for _ in itertools.count():
            if condition():
                return
            await anyio.sleep(0.002)


def relay_clients(server: RedisServer) -> list[tuple[int, bytes]]:
    """``(id, name)`` of the relays' connections on the server now."""
    listing = server.command("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    found = []
    for line in listing.decode().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        name = fields.get("name", "").encode()
        if name in RELAY_NAMES:
            found.append((int(fields["id"]), name))
    return found


class Tally:
    """Consumes a subscription in the background and counts what arrived, by source."""

    def __init__(self, subscription: Subscription, *, pause: anyio.Event | None = None) -> None:
        self.subscription = subscription
        self.by_source: Counter[str | None] = Counter()
        self.events: list[ResourceUsage] = []
        self.pause = pause

    @property
    def received(self) -> int:
        return sum(self.by_source.values())

    @property
    def accounted(self) -> int:
        return self.received + self.subscription.missed

    async def run(self) -> None:
        if self.pause is not None:
            await self.pause.wait()
        async for usage in self.subscription:
            self.by_source[usage.source] += 1
            self.events.append(usage)


async def inject(client: coredis.Redis[bytes], *fields: str | bytes | int) -> None:
    """Append one entry to the stream by hand, as another relay (or program) would."""
    pairs = dict(zip(fields[::2], fields[1::2], strict=True))
    await client.xadd(STREAM, pairs)  # type: ignore[arg-type]


def usage_entry(
    publisher: str, seq: int, *, since: str = "0-0", usage: object = 50.0
) -> list[Any]:
    return [
        "publisher", publisher, "seq", seq, "type", "cpu", "usage", str(usage), "time", "1.5",
        "source", f"host/{publisher}", "host", "host", "since", since,
    ]  # fmt: skip


def bye_entry(publisher: str, seq: int, *, since: str = "0-0") -> list[Any]:
    return ["publisher", publisher, "seq", seq, "bye", "1", "source", f"host/{publisher}",
            "host", "host", "since", since]  # fmt: skip


@contextlib.asynccontextmanager
async def pair(
    url: str, **options: Any
) -> AsyncIterator[tuple[ResourceManager, ResourceManager, UsageRelay, UsageRelay]]:
    async with ResourceManager() as a, ResourceManager() as b:
        relay_a = await a.relay(url, source="a", **options)
        relay_b = await b.relay(url, source="b", **options)
        yield a, b, relay_a, relay_b


class TestDelivery:
    async def test_usages_reach_the_other_manager_once_with_their_source(
        self, redis_url: str
    ) -> None:
        async with pair(redis_url) as (a, b, relay_a, relay_b):
            sub_a, sub_b = a.subscribe(), b.subscribe()
            await a.track_resource_usage("cpu", 12.5)
            await b.track_resource_usage("memory", 50.0)
            await wait_for(lambda: sub_a.buffered == 2 and sub_b.buffered == 2)
            await anyio.sleep(0.05)  # and nothing more arrives: no echo of one's own
            got_a, got_b = sub_a.drain(), sub_b.drain()
        assert [(u.resource_type, u.source) for u in got_a] in (
            [("cpu", None), ("memory", "b")],
            [("memory", "b"), ("cpu", None)],
        )
        assert sorted((u.resource_type, str(u.source)) for u in got_b) == [
            ("cpu", "a"),
            ("memory", "None"),
        ]
        local_cpu = next(u for u in got_a if u.source is None)
        remote_cpu = next(u for u in got_b if u.source == "a")
        assert remote_cpu.usage_percent == 12.5
        assert remote_cpu.wall_time == local_cpu.wall_time  # the publisher's own
        assert relay_a.statistics().published == 1
        assert relay_b.statistics().received == 1

    async def test_statistics_by_source_stay_apart_from_the_local_ones(
        self, redis_url: str
    ) -> None:
        async with pair(redis_url) as (a, b, _, relay_b):
            for value in (10.0, 30.0, 20.0):
                await a.track_resource_usage("cpu", value)
            await b.track_resource_usage("cpu", 99.0)
            await wait_for(lambda: relay_b.statistics().received == 3)
            remote = b.usage_statistics_by_source()
            assert set(remote) == {"a"}
            stats = remote["a"]["cpu"]
            assert (stats.count, stats.last, stats.min, stats.max, stats.mean) == (
                3, 20.0, 10.0, 30.0, 20.0,
            )  # fmt: skip
            assert stats.last_timestamp <= anyio.current_time()  # this loop's clock
            assert b.usage_statistics()["cpu"].count == 1  # its own only
            assert b.get_usage_stats() == {"cpu": 99.0}
            assert b.forget_source("a") is True
            assert b.usage_statistics_by_source() == {}
            assert b.forget_source("a") is False
            with pytest.raises(TypeError, match="source must be a str"):
                b.forget_source(None)  # type: ignore[arg-type]

    async def test_values_round_trip_exactly(self, redis_url: str) -> None:
        values = [0.1 + 0.2, 1e300, 0.0, 123456.789, 5e-324, 250.0]
        async with pair(redis_url) as (a, b, _, _relay_b):
            sub = b.subscribe()
            for n, value in enumerate(values):
                await a.track_resource_usage(f"disk:/mnt/é{n}", value)
            await wait_for(lambda: sub.buffered == len(values))
            got = sub.drain()
        assert [u.usage_percent for u in got] == values
        assert [u.resource_type for u in got] == [f"disk:/mnt/é{n}" for n in range(len(values))]

    async def test_the_entries_in_the_stream(self, redis_url: str) -> None:
        async with (
            ResourceManager() as a,
            coredis.Redis.from_url(redis_url) as client,
        ):
            relay = await a.relay(redis_url, source="web-1", maxlen=100, receive=False)
            for n in range(1000):
                await a.track_resource_usage("cpu", float(n % 100))
            await wait_for(lambda: relay.statistics().published == 1000)
            entries = await client.xrange(STREAM, count=1)
            length = await client.xlen(STREAM)
        fields = entries[0].field_values
        assert list(fields) == [
            b"publisher",
            b"seq",
            b"type",
            b"usage",
            b"time",
            b"source",
            b"host",
            b"since",
        ]
        assert fields[b"publisher"] == relay.publisher_id.encode()
        assert fields[b"source"] == b"web-1"
        assert fields[b"type"] == b"cpu"
        assert 100 <= length <= 300  # MAXLEN ~ 100: trimmed by whole nodes

    async def test_publish_only_and_receive_only(self, redis_url: str) -> None:
        async with ResourceManager() as a, ResourceManager() as b:
            talker = await a.relay(redis_url, source="a", receive=False)
            listener = await b.relay(redis_url, source="b", publish=False)
            sub_a, sub_b = a.subscribe(), b.subscribe()
            await b.track_resource_usage("memory", 1.0)  # not published
            await a.track_resource_usage("cpu", 2.0)
            await wait_for(lambda: sub_b.buffered == 2)
            await anyio.sleep(0.05)
            assert [u.source for u in sub_a.drain()] == [None]  # nothing from b
            assert sorted(str(u.source) for u in sub_b.drain()) == ["None", "a"]
            assert talker.statistics().received == 0
            assert listener.statistics().published == 0

    async def test_a_clean_stop_says_goodbye(self, redis_url: str) -> None:
        async with pair(redis_url) as (a, b, relay_a, relay_b):
            sub = b.subscribe()
            await a.track_resource_usage("cpu", 1.0)
            await wait_for(lambda: relay_b.statistics().publishers == 1)
            assert "a" in b.usage_statistics_by_source()
            await relay_a.aclose()
            assert not relay_a.running
            assert "stopped" in repr(relay_a)
            await wait_for(lambda: relay_b.statistics().publishers == 0)
            assert b.usage_statistics_by_source() == {}  # the source is gone
            await a.track_resource_usage("cpu", 2.0)  # no longer published
            await anyio.sleep(0.05)
            assert [u.source for u in sub.drain()] == ["a"]
            assert sub.missed == 0
            assert relay_a.statistics().published == 1

    async def test_the_managers_exit_sends_what_is_queued(self, redis_url: str) -> None:
        async with ResourceManager() as b:
            relay_b = await b.relay(redis_url, source="b")
            sub = b.subscribe(buffer_size=1000)
            async with ResourceManager() as a:
                await a.relay(redis_url, source="a")
                for n in range(300):
                    await a.track_resource_usage("cpu", float(n))
                # Exit at once: what the publisher had not sent yet goes out on the way.
            await wait_for(lambda: relay_b.statistics().publishers == 0 and sub.buffered == 300)
            assert [u.usage_percent for u in sub.drain()] == [float(n) for n in range(300)]
            assert sub.missed == 0

    async def test_statistics_and_repr(self, redis_url: str) -> None:
        async with pair(redis_url) as (a, _, relay_a, _relay_b):
            await a.track_resource_usage("cpu", 1.0)
            await wait_for(lambda: relay_a.statistics().published == 1)
            stats = relay_a.statistics()
            assert isinstance(stats, RelayStatistics)
            assert stats.connected is True
            assert stats.connects == 2  # the reader and the publisher
            assert stats.pending == 0
            assert relay_a.connected
            assert relay_a.running
            assert relay_a.source == "a"
            assert relay_a.stream == b"darwin-metrics:usage"
            assert len(relay_a.publisher_id) == 16
            assert "'a'" in repr(relay_a)
            assert "1 published" in repr(relay_a)

    async def test_the_default_source_is_host_and_process(self, redis_url: str) -> None:
        import os
        import socket

        async with ResourceManager() as a:
            relay = await a.relay(redis_url)
            assert relay.source == f"{socket.gethostname()}/{os.getpid()}"

    async def test_a_coredis_client_lends_its_address(self, redis_url: str) -> None:
        async with pair(redis_url) as (_, b, _relay_a, relay_b):
            client = coredis.Redis.from_url(redis_url)  # not even entered: only its address
            async with ResourceManager() as c:
                await c.relay(client, source="c")
                await c.track_resource_usage("cpu", 3.0)
                await wait_for(lambda: relay_b.statistics().received == 1)
            assert "c" not in b.usage_statistics_by_source()  # said goodbye on exit


class TestCounting:
    """``received + missed`` is exact: gaps, copies, goodbyes and foreign entries, by hand."""

    async def test_gaps_copies_goodbyes_and_foreign_entries(self, redis_url: str) -> None:
        later = "9999999999999-0"  # started after the relay: counted from its first usage
        async with (
            coredis.Redis.from_url(redis_url) as client,
            ResourceManager() as b,
        ):
            relay = await b.relay(redis_url, source="b")
            sub = b.subscribe()
            for seq in (2, 2, 3, 6):  # 1 missed, a copy of 2, then 4 and 5 missed
                await inject(client, *usage_entry("p1", seq, since=later))
            await inject(client, "x", "y")  # another program's entry
            await inject(client, *usage_entry("p1", 7, since=later, usage=-1))  # not a usage
            await inject(client, *usage_entry("p1", 8, since=later, usage="nan"))
            await inject(client, *bye_entry("p1", 10, since=later))  # 9 and 10 missed
            await inject(client, *usage_entry("p1", 11, since=later))  # after its goodbye
            await wait_for(lambda: relay.statistics().duplicates == 2)
            got = [u.usage_percent for u in sub.drain()]
        stats = relay.statistics()
        assert got == [50.0, 50.0, 50.0]  # 2, 3 and 6
        # 10 published: 3 received; 1, 4, 5, 9 and 10 missed, and so are 7 and 8, which
        # could not be read (also counted as ignored, with the foreign entry).
        assert (stats.received, stats.missed, stats.duplicates, stats.ignored) == (3, 7, 2, 3)
        assert sub.missed == 7
        assert stats.publishers == 0

    async def test_a_publisher_older_than_the_relay(self, redis_url: str) -> None:
        async with (
            coredis.Redis.from_url(redis_url) as client,
            ResourceManager() as b,
        ):
            for seq in (1, 2, 3):
                await inject(client, *usage_entry("old", seq))
            relay = await b.relay(redis_url, source="b")  # learns that "old" stands at 3
            sub = b.subscribe()
            await inject(client, *usage_entry("old", 6))  # so 4 and 5 are missed
            await wait_for(lambda: relay.statistics().received == 1)
            assert sub.missed == 2
            assert relay.statistics().publishers == 1

    async def test_missed_counts_for_every_open_subscription(self, redis_url: str) -> None:
        later = "9999999999999-0"
        async with (
            coredis.Redis.from_url(redis_url) as client,
            ResourceManager() as b,
        ):
            relay = await b.relay(redis_url, source="b")
            subs = [b.subscribe(), b.subscribe(overflow="wait", buffer_size=4)]
            await inject(client, *usage_entry("p", 3, since=later))
            await wait_for(lambda: relay.statistics().received == 1)
            assert [sub.missed for sub in subs] == [2, 2]
            assert b.missed_events == 4

    async def test_trimmed_while_a_wait_subscriber_holds_the_reader(self, redis_url: str) -> None:
        published = 600
        async with pair(redis_url, maxlen=20) as (a, b, relay_a, relay_b):
            held = anyio.Event()
            slow = Tally(b.subscribe(overflow="wait", buffer_size=1), pause=held)
            fast = Tally(b.subscribe(buffer_size=10_000))
            async with anyio.create_task_group() as group:
                group.start_soon(slow.run)
                group.start_soon(fast.run)
                for n in range(published):
                    await a.track_resource_usage("cpu", float(n))
                    if n % 50 == 0:
                        await anyio.sleep(0.001)
                await wait_for(lambda: relay_a.statistics().published == published)
                held.set()  # the reader was stuck on it: the stream was trimmed meanwhile
                await wait_for(lambda: slow.accounted == published and fast.accounted == published)
                group.cancel_scope.cancel()
        assert relay_b.statistics().missed > 0
        for tally in (slow, fast):
            assert tally.by_source["a"] + tally.subscription.missed == published
        assert fast.subscription.missed == slow.subscription.missed  # one gap, seen by both
        received = [u.usage_percent for u in fast.events]
        assert received == sorted(received)  # in the publisher's order

    async def test_a_quiet_publishers_trimmed_tail_is_counted(self, redis_url: str) -> None:
        # a publishes, then falls quiet; c publishes after it, so that a's last usages are
        # trimmed while b's reader is held. a's next tick (every keepalive while idle) tells
        # b where a stands, with no usage of a's to come.
        async with (
            ResourceManager() as a,
            ResourceManager() as b,
            ResourceManager() as c,
        ):
            relay_a = await a.relay(redis_url, source="a", maxlen=20, keepalive=0.2)
            relay_b = await b.relay(redis_url, source="b", maxlen=20, keepalive=0.2)
            relay_c = await c.relay(redis_url, source="c", maxlen=20, keepalive=0.2)
            held = anyio.Event()
            slow = Tally(b.subscribe(overflow="wait", buffer_size=1), pause=held)
            async with anyio.create_task_group() as group:
                group.start_soon(slow.run)
                for n in range(300):
                    await a.track_resource_usage("cpu", float(n))
                await wait_for(lambda: relay_a.statistics().published == 300)
                for n in range(300):
                    await c.track_resource_usage("cpu", float(n))
                await wait_for(lambda: relay_c.statistics().published == 300)
                held.set()
                await wait_for(lambda: slow.accounted == 600)
                group.cancel_scope.cancel()
        assert slow.by_source["a"] < 300  # a's tail was trimmed before b read it
        assert relay_b.statistics().missed == slow.subscription.missed > 0


class TestFaults:
    async def test_client_kill_of_every_relay_connection(self, redis_server: RedisServer) -> None:
        published = 2000
        async with pair(redis_server.url, keepalive=0.5) as (a, b, relay_a, relay_b):
            tally = Tally(b.subscribe(buffer_size=published))
            async with anyio.create_task_group() as group:
                group.start_soon(tally.run)
                for n in range(published):
                    await a.track_resource_usage("cpu", float(n))
                    if n % 20 == 0:
                        await anyio.sleep(0.0005)
                    if n in (500, 1200):
                        for client_id, _ in relay_clients(redis_server):
                            redis_server.command("CLIENT", "KILL", "ID", str(client_id))
                await wait_for(lambda: tally.accounted == published)
                group.cancel_scope.cancel()
            await wait_for(lambda: relay_a.connected and relay_b.connected)
        # Nothing lost, nothing twice: a resent batch's copies are recognized.
        assert [u.usage_percent for u in tally.events] == [float(n) for n in range(published)]
        assert tally.subscription.missed == 0
        assert relay_b.statistics().disconnects >= 2
        assert relay_a.statistics().connects >= 4

    async def test_a_killed_reader_loses_nothing_for_a_wait_subscriber(
        self, redis_server: RedisServer
    ) -> None:
        async with pair(redis_server.url, keepalive=0.5) as (a, b, _, relay_b):
            held = anyio.Event()
            slow = Tally(b.subscribe(overflow="wait", buffer_size=1), pause=held)
            async with anyio.create_task_group() as group:
                group.start_soon(slow.run)
                for n in range(10):
                    await a.track_resource_usage("cpu", float(n))
                # The reader delivers into the full buffer, and waits: kill its connection.
                await wait_for(lambda: relay_b.statistics().received >= 2)
                for client_id, name in relay_clients(redis_server):
                    if name == RELAY_NAMES[0]:
                        redis_server.command("CLIENT", "KILL", "ID", str(client_id))
                await wait_for(lambda: relay_b.statistics().disconnects == 1)
                held.set()
                await wait_for(lambda: slow.accounted == 10)
                group.cancel_scope.cancel()
        assert [u.usage_percent for u in slow.events] == [float(n) for n in range(10)]
        assert slow.subscription.missed == 0

    async def test_server_restart(self, redis_server: RedisServer) -> None:
        published = 1500
        async with pair(redis_server.url, keepalive=0.5) as (a, b, relay_a, relay_b):
            tally = Tally(b.subscribe(buffer_size=published))
            async with anyio.create_task_group() as group:
                group.start_soon(tally.run)
                for n in range(published):
                    await a.track_resource_usage("cpu", float(n))
                    if n % 20 == 0:
                        await anyio.sleep(0.001)
                    if n == 500:
                        await anyio.to_thread.run_sync(redis_server.stop)
                        await wait_for(lambda: not relay_a.connected and not relay_b.connected)
                    if n == 700:  # tracked meanwhile: queued, sent once the server is back
                        await anyio.to_thread.run_sync(redis_server.start)
                await wait_for(lambda: tally.accounted == published, timeout=5)
                group.cancel_scope.cancel()
        # What the old server had acknowledged but the reader had not read is gone with it:
        # missed, and counted. Everything else arrives, once, in order.
        assert tally.by_source["a"] + tally.subscription.missed == published
        received = [u.usage_percent for u in tally.events]
        assert received == sorted(set(received))
        # Tracked after the old server was gone: queued, then sent to the new one.
        assert {float(n) for n in range(501, published)} <= set(received)
        assert relay_b.statistics().disconnects >= 1

    async def test_a_full_queue_drops_the_oldest_and_the_peer_counts_them(
        self, redis_server: RedisServer
    ) -> None:
        async with pair(redis_server.url, keepalive=0.3, max_pending=5) as (a, b, relay_a, _):
            sub = b.subscribe()
            await a.track_resource_usage("cpu", 0.0)
            await wait_for(lambda: sub.buffered == 1)
            await anyio.to_thread.run_sync(redis_server.stop)
            await wait_for(lambda: not relay_a.connected)
            for n in range(1, 21):  # the server is away: 5 are kept, the 15 oldest dropped
                await a.track_resource_usage("cpu", float(n))
            assert relay_a.statistics().dropped == 15
            assert relay_a.statistics().pending == 5
            await anyio.to_thread.run_sync(redis_server.start)
            await wait_for(lambda: sub.buffered == 6)
            assert [u.usage_percent for u in sub.drain()] == [0.0, 16.0, 17.0, 18.0, 19.0, 20.0]
            assert sub.missed == 15
            assert relay_a.statistics().pending == 0

    async def test_a_silent_server_is_given_up_and_reconnected(
        self, redis_server: RedisServer
    ) -> None:
        async with pair(redis_server.url, keepalive=0.3) as (a, b, relay_a, relay_b):
            sub = b.subscribe()
            redis_server.pause()
            try:
                await a.track_resource_usage("cpu", 1.0)  # queued: the server is frozen
                await wait_for(lambda: not relay_b.connected, timeout=1)
            finally:
                redis_server.resume()
            await wait_for(lambda: relay_a.connected and relay_b.connected)
            await wait_for(lambda: sub.buffered == 1)
            assert sub.drain()[0].source == "a"
            assert sub.missed == 0


BAD_ARGUMENTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"redis": "http://x"}, ValueError, "must start with redis://"),
    ({"redis": "redis://:notaport"}, ValueError, "not a valid Valkey/Redis URL"),
    ({"redis": 42}, TypeError, "redis must be a URL or a coredis.Redis"),
    ({"prefix": ""}, ValueError, "prefix must not be empty"),
    ({"prefix": 3}, TypeError, "prefix must be str or bytes"),
    ({"source": ""}, ValueError, "source must not be empty"),
    ({"source": b"x"}, TypeError, "source must be a str or None"),
    ({"maxlen": 0}, ValueError, "maxlen must be at least 1"),
    ({"maxlen": 1.5}, TypeError, "maxlen must be an int"),
    ({"maxlen": True}, TypeError, "maxlen must be an int"),
    ({"max_pending": -1}, ValueError, "max_pending must be at least 1"),
    ({"publish": 1}, TypeError, "publish must be a bool"),
    ({"publish": False, "receive": False}, ValueError, "neither publishes nor receives"),
    ({"keepalive": 0}, ValueError, "keepalive must be a positive"),
    ({"keepalive": "1"}, TypeError, "keepalive must be a number of seconds"),
]


class TestBadInput:
    async def test_bad_arguments(self, redis_url: str) -> None:
        async with ResourceManager() as manager:
            for bad, error, match in BAD_ARGUMENTS:
                options = {"redis": redis_url, **bad}
                with pytest.raises(error, match=match):
                    await manager.relay(options.pop("redis"), **options)
                assert manager._publishers == (), bad
            await manager.track_resource_usage("cpu", 1.0)  # still works
            relay = await manager.relay(redis_url)  # and so does a good relay
            assert relay.running

    async def test_a_client_that_decodes(self, redis_url: str) -> None:
        async with ResourceManager() as manager:
            with pytest.raises(ValueError, match="decode_responses=False"):
                await manager.relay(coredis.Redis.from_url(redis_url, decode_responses=True))

    async def test_one_relay_per_manager(self, redis_url: str) -> None:
        async with ResourceManager() as manager:
            relay = await manager.relay(redis_url)
            with pytest.raises(RuntimeError, match="already relays"):
                await manager.relay(redis_url, prefix="other:")
            await relay.aclose()
            again = await manager.relay(redis_url)  # once it stopped, another may start
            assert again.running

    async def test_outside_the_manager(self, redis_url: str) -> None:
        with pytest.raises(RuntimeError, match="inside 'async with manager:'"):
            await ResourceManager().relay(redis_url)

    async def test_no_server(self, redis_server: RedisServer) -> None:
        url = redis_server.url
        redis_server.stop()
        async with ResourceManager() as manager:
            with pytest.raises(RedisUnavailableError, match="could not connect to unix://"):
                await manager.relay(url)
            assert manager._publishers == ()

    async def test_a_server_that_refuses(self, redis_binary: Any) -> None:
        with RedisServer(redis_binary, extra_args=("--requirepass", "sekrit")) as server:
            async with ResourceManager() as manager:
                with pytest.raises(RedisUnavailableError, match="Authentication"):
                    await manager.relay(server.url)
                with pytest.raises(RedisUnavailableError) as raised:
                    await manager.relay(f"unix://:wrong@{server.socket_path}")
                assert "wrong" not in str(raised.value)  # no password in messages
                assert "unix://:***@/" in str(raised.value)
                relay = await manager.relay(f"unix://:sekrit@{server.socket_path}")
                assert relay.connected  # with the password, it connects

    async def test_a_key_that_is_not_a_stream(self, redis_url: str) -> None:
        async with (
            coredis.Redis.from_url(redis_url) as client,
            ResourceManager() as manager,
        ):
            await client.set("bad:usage", "not a stream")
            with pytest.raises(UsageRelayError, match=r"'bad:usage' .* other than a stream"):
                await manager.relay(redis_url, prefix="bad:")
            with pytest.raises(UsageRelayError, match="other than a stream"):
                await manager.relay(redis_url, prefix="bad:", receive=False)
            assert manager._publishers == ()


class TestCancellation:
    async def check_nothing_left(
        self, manager: ResourceManager, relay: UsageRelay | None, server: RedisServer
    ) -> None:
        if relay is not None:
            assert relay.running
            await relay.aclose()
        assert manager._publishers == ()
        await wait_for(lambda: not relay_clients(server))

    async def test_cancel_scopes_at_every_await(self, redis_session_server: RedisServer) -> None:
        url = redis_session_server.url
        async with ResourceManager() as manager:
            cancelled = finished = 0
            for step in itertools.count():  # later and later, until it finished thrice
                assert step < 1000, "relay() never finished"
                relay = None
                with anyio.move_on_after(step * 0.0002):
                    relay = await manager.relay(url)
                await self.check_nothing_left(manager, relay, redis_session_server)
                if relay is None:
                    cancelled += 1
                else:
                    finished += 1
                    if finished == 3:
                        break
        assert cancelled > 0

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_asyncio_cancellation(self, redis_session_server: RedisServer) -> None:
        url = redis_session_server.url
        async with ResourceManager() as manager:
            relays: list[UsageRelay] = []

            async def start() -> None:
                relays.append(await manager.relay(url))

            cancelled = finished = 0
            for step in itertools.count():  # a loop iteration later each time
                assert step < 2000, "relay() never finished"
                relays.clear()
                if await cancel_after_steps(start, step):
                    finished += 1
                else:
                    cancelled += 1
                await self.check_nothing_left(
                    manager, relays[0] if relays else None, redis_session_server
                )
                if finished == 3:
                    break
            assert cancelled > 10
            for timeout in (0.0001, 0.0005, 0.001, 0.002, 0.005):
                relays.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(start(), timeout)
                await self.check_nothing_left(
                    manager, relays[0] if relays else None, redis_session_server
                )

    async def test_cancelling_aclose_still_stops(self, redis_url: str) -> None:
        async with pair(redis_url) as (a, _, relay_a, relay_b):
            await a.track_resource_usage("cpu", 1.0)
            with anyio.move_on_after(0):
                await relay_a.aclose()
            assert a._publishers == ()  # no usage is published any more, at once
            await wait_for(lambda: not relay_a.running)
            # Queued before: sent on the way out, then the goodbye.
            await wait_for(lambda: relay_b.statistics().received == 1)
            await wait_for(lambda: relay_b.statistics().publishers == 0)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_cancellation_of_aclose(self, redis_url: str) -> None:
        async with pair(redis_url) as (_, _b, relay_a, _relay_b):
            task = asyncio.ensure_future(relay_a.aclose())
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_for(lambda: not relay_a.running)

    async def test_cancel_is_immediate_and_idempotent(self, redis_url: str) -> None:
        async with pair(redis_url) as (a, _, relay_a, _relay_b):
            relay_a.cancel()
            relay_a.cancel()
            assert a._publishers == ()
            assert not relay_a.running
            await a.track_resource_usage("cpu", 1.0)
            assert relay_a.statistics().pending == 0  # not queued
            await relay_a.aclose()
            assert relay_a.statistics().published == 0
