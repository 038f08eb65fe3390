"""RedisCache against a real Valkey/Redis server, on asyncio and trio.

Two tiers on the same prefix stand for two processes: each has its own client, listener
connection and in-process cache, so the server sees two independent clients. The fault and
multi-process tests are in ``test_redis_faults.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import pickle
import threading
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import pytest
from _redis_server import RedisServer

from darwin_metrics import RedisCacheError, RedisUnavailableError, SerializationError
from darwin_metrics.redis import (
    JSONSerializer,
    PickleSerializer,
    RedisCache,
    RedisCacheStatistics,
    Serializer,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.real_time,
    pytest.mark.redis,
    # coredis leaves a failed connection's memory streams unclosed (see conftest.py).
    pytest.mark.filterwarnings(
        r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning"
    ),
]

PREFIX = "test:"


def tier(url: str, **options: Any) -> RedisCache[Any]:
    options.setdefault("prefix", PREFIX)
    options.setdefault("ttl", 60)
    return RedisCache(url, **options)


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> float:
    """Poll ``condition`` (real time) until it holds; return how long that took."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        # Polling: the condition is the server's or the listener's doing, with no event to
        # wait for.
        for _ in itertools.count():
            if condition():
                break
            await anyio.sleep(0.001)
    return anyio.current_time() - start


async def heard(cache: RedisCache[Any], invalidations: int) -> None:
    """Wait until ``cache``'s listener has handled this many invalidations in all.

    A read sent before the invalidation of a write arrives is not cached (the race guard
    cannot tell it from a stale one), so tests that expect a fill wait for the message first.
    """
    await wait_for(lambda: cache.statistics().invalidations >= invalidations)


async def cached(cache: RedisCache[Any], key: str) -> object:
    """Read ``key`` until this process caches it (a read racing an invalidation is not)."""
    with anyio.fail_after(2):
        while True:
            value = await cache.get(key)
            if cache.get_local(key, None) is not None:
                return value
            await anyio.sleep(0.001)


def assert_idle(cache: RedisCache[Any]) -> None:
    """Nothing in flight: no flight, no watch left behind by a finished or cancelled call."""
    assert cache._flights == {}
    assert cache._watches == {}


class TestReadsAndWrites:
    async def test_a_write_reaches_the_other_process_and_drops_its_copy(
        self, redis_url: str
    ) -> None:
        async with tier(redis_url) as a, tier(redis_url) as b:
            assert a.listening
            assert b.listening
            await a.set("user:1", {"name": "Ada"})
            assert a.get_local("user:1") is None  # writes never fill L1
            await heard(b, 1)
            assert await b.get("user:1") == {"name": "Ada"}  # from the server...
            assert b.get_local("user:1") == {"name": "Ada"}  # ...and now in b's L1
            before = b.statistics().local.hits
            assert await b.get("user:1") == {"name": "Ada"}
            assert b.statistics().local.hits == before + 1

            await a.set("user:1", {"name": "Grace"})
            await wait_for(lambda: b.get_local("user:1") is None)
            await heard(b, 2)
            assert await b.get("user:1") == {"name": "Grace"}
            stats = b.statistics()
            assert isinstance(stats, RedisCacheStatistics)
            assert stats.invalidations >= 2  # a's two writes
            assert stats.remote_hits == 2
            assert stats.fills == 2
            assert stats.listening
            assert stats.connects == 1
            assert stats.disconnects == 0
            assert isinstance(stats.listener_id, int)
            assert_idle(a)
            assert_idle(b)

    async def test_a_process_reads_its_own_writes(self, redis_url: str) -> None:
        async with tier(redis_url) as a:
            await a.set("k", 1)
            assert await a.get("k") == 1
            await a.set("k", 2)
            assert a.get_local("k") is None  # dropped at once, before any message
            assert await a.get("k") == 2
            assert await a.remove("k") is True
            assert a.get_local("k") is None
            assert await a.get("k") is None
            assert await a.get("k", "default") == "default"
            assert await a.remove("k") is False

    async def test_str_and_bytes_keys_are_one_key(self, redis_url: str) -> None:
        async with tier(redis_url) as a, tier(redis_url) as b:
            await a.set("é", "text")
            assert await b.get("é".encode()) == "text"
            assert await b.get("é") == "text"
            await a.set(b"\xc3\xa9", "bytes")
            await wait_for(lambda: b.get_local("é") is None and b.get_local("é".encode()) is None)
            assert await b.get("é") == "bytes"

    async def test_the_value_lives_under_the_prefix_with_its_ttl(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async with tier(redis_url, ttl=timedelta(seconds=30)) as a:
            await a.set("k", [1, "two"])
            await a.set("short", 1, ttl=2.5)
        assert redis_session_server.command("GET", "test:k") == b'[1,"two"]'
        ttl = redis_session_server.command("PTTL", "test:k")
        assert isinstance(ttl, int)
        assert 29_000 < ttl <= 30_000
        short = redis_session_server.command("PTTL", "test:short")
        assert isinstance(short, int)
        assert 2_000 < short <= 2_500

    async def test_a_flush_clears_the_local_cache(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async with tier(redis_url) as a:
            await a.set("k", 1)
            assert await cached(a, "k") == 1
            redis_session_server.command("FLUSHDB")
            await wait_for(lambda: a.get_local("k") is None)
            assert a.statistics().flushes == 1
            assert await a.get("k") is None

    async def test_other_clients_writes_and_expiries_invalidate(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async with tier(redis_url) as a:
            redis_session_server.command("SET", "test:k", json.dumps("raw"))
            assert await cached(a, "k") == "raw"
            redis_session_server.command("DEL", "test:k")
            await wait_for(lambda: a.get_local("k") is None)
            redis_session_server.command("SET", "test:other", "1")
            redis_session_server.command("SET", "unrelated:k", "1")  # not under the prefix
            assert await cached(a, "other") == 1
            assert a.statistics().local.size == 1

    async def test_the_local_ttl_never_outlives_the_servers(
        self, redis_server: RedisServer
    ) -> None:
        # The server is frozen after the read: no invalidation can come, so only the
        # capped local ttl makes the entry go.
        async with tier(redis_server.url, ttl=600, keepalive=30) as a:
            await a.set("k", "v", ttl=0.4)
            assert await cached(a, "k") == "v"
            redis_server.pause()
            try:
                await anyio.sleep(0.45)
                assert a.get_local("k") is None
            finally:
                redis_server.resume()

    async def test_local_ttl_bounds_the_local_copy(self, redis_server: RedisServer) -> None:
        async with tier(redis_server.url, ttl=600, local_ttl=0.3, keepalive=30) as a:
            assert a.local_ttl == 0.3
            assert a.ttl == 600
            await a.set("k", "v")
            await cached(a, "k")
            redis_server.pause()
            try:
                await anyio.sleep(0.35)
                assert a.get_local("k") is None
            finally:
                redis_server.resume()

    async def test_maxsize_bounds_the_local_cache(self, redis_url: str) -> None:
        async with tier(redis_url, maxsize=3) as a:
            for i in range(10):
                await a.set(f"k{i}", i)
                await cached(a, f"k{i}")
            assert a.statistics().local.size == 3
            assert [await a.get(f"k{i}") for i in range(10)] == list(range(10))

    async def test_an_invalidation_during_a_read_refuses_the_fill(
        self, redis_server: RedisServer
    ) -> None:
        # The race guard, with the arrival order forced: the server is frozen while the read
        # waits for its reply, and the listener handles the key's invalidation meanwhile.
        async with tier(redis_server.url, keepalive=30) as a:
            await a.set("k", "old")
            await heard(a, 1)
            result: list[object] = []

            async def read() -> None:
                result.append(await a.get("k"))

            for disturb in (
                lambda: a._invalidate(b"test:k"),  # what the listener does with a message
                lambda: (a._set_listening(False), a._set_listening(True)),  # a reconnection
            ):
                redis_server.pause()
                try:
                    async with anyio.create_task_group() as group:
                        group.start_soon(read)
                        await wait_for(lambda: b"test:k" in a._watches)
                        disturb()
                        redis_server.resume()
                finally:
                    redis_server.resume()
                assert result.pop() == "old"
                assert a.get_local("k") is None
            assert a.statistics().fills_refused == 2
            assert await cached(a, "k") == "old"
            assert_idle(a)

    async def test_repr_and_properties(self, redis_url: str) -> None:
        cache = tier(redis_url, prefix=b"bytes:")
        assert cache.prefix == b"bytes:"
        assert "new" in repr(cache)
        async with cache:
            assert "listening" in repr(cache)
            assert "prefix=b'bytes:'" in repr(cache)
        assert "closed" in repr(cache)
        assert not cache.listening


class TestGetOrLoad:
    async def test_single_flight_in_a_process(self, redis_url: str) -> None:
        calls = 0

        async def load() -> str:
            nonlocal calls
            calls += 1
            await anyio.sleep(0.05)
            return "loaded"

        async with tier(redis_url) as a, tier(redis_url) as b:
            results: list[str] = []

            async def ask() -> None:
                results.append(await a.get_or_load("k", load))

            async with anyio.create_task_group() as group:
                for _ in range(10):
                    group.start_soon(ask)
            assert results == ["loaded"] * 10
            assert calls == 1
            assert a.statistics().loads == 1
            assert await b.get("k") == "loaded"  # stored on the server
            assert await b.get_or_load("k", load) == "loaded"
            assert calls == 1
            assert_idle(a)

    async def test_a_failed_load_reaches_every_waiter_and_stores_nothing(
        self, redis_url: str
    ) -> None:
        started = anyio.Event()

        async def load() -> str:
            started.set()
            await anyio.sleep(0.05)
            raise LookupError("no such user")

        async with tier(redis_url) as a:
            errors: list[BaseException] = []

            async def ask() -> None:
                try:
                    await a.get_or_load("k", load)
                except LookupError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as group:
                for _ in range(5):
                    group.start_soon(ask)
            assert len(errors) == 5
            assert all(error is errors[0] for error in errors)
            assert await a.get("k") is None
            assert_idle(a)

    async def test_a_stored_value_that_arrived_meanwhile_stands(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async with tier(redis_url) as a:

            async def load() -> str:
                redis_session_server.command("SET", "test:k", json.dumps("theirs"))
                return "mine"

            assert await a.get_or_load("k", load) == "theirs"
            assert await a.get("k") == "theirs"

    async def test_load_asking_for_its_own_key_raises(self, redis_url: str) -> None:
        async with tier(redis_url) as a:

            async def load() -> str:
                return await a.get_or_load("k", load)

            with pytest.raises(RuntimeError, match="wait for itself"):
                await a.get_or_load("k", load)
            assert_idle(a)

    async def test_single_flight_across_processes(self, redis_url: str) -> None:
        calls = 0

        async def load() -> str:
            nonlocal calls
            calls += 1
            await anyio.sleep(0.1)
            return "once"

        async with (
            tier(redis_url, lock_timeout=10) as a,
            tier(redis_url, lock_timeout=10) as b,
            tier(redis_url, lock_timeout=10) as c,
        ):
            results: list[str] = []

            async def ask(cache: RedisCache[Any]) -> None:
                results.append(await cache.get_or_load("k", load))

            with anyio.fail_after(2):  # woken by the key's invalidation, not the lock's expiry
                async with anyio.create_task_group() as group:
                    for cache in (a, b, c, a, b, c):
                        group.start_soon(ask, cache)
            assert results == ["once"] * 6
            assert calls == 1
            for cache in (a, b, c):
                assert_idle(cache)

    async def test_a_failed_lock_holder_lets_another_process_load_at_once(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        holder_started = anyio.Event()

        async def failing() -> str:
            holder_started.set()
            await anyio.sleep(0.05)
            raise LookupError("database down")

        async def working() -> str:
            return "second"

        async with tier(redis_url, lock_timeout=30) as a, tier(redis_url, lock_timeout=30) as b:
            result: list[str] = []

            async def second() -> None:
                await holder_started.wait()
                result.append(await b.get_or_load("k", working))

            with anyio.fail_after(2):  # far less than the 30 s lock
                async with anyio.create_task_group() as group:
                    group.start_soon(second)
                    with pytest.raises(LookupError):
                        await a.get_or_load("k", failing)
            assert result == ["second"]
            assert redis_session_server.command("EXISTS", "test:\x00lock:k") == 0

    async def test_a_cancelled_lock_holder_releases_its_lock(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async def slow() -> str:
            await anyio.sleep(10)
            return "never"

        async with tier(redis_url, lock_timeout=30) as a, tier(redis_url, lock_timeout=30) as b:
            with anyio.move_on_after(0.1):
                await a.get_or_load("k", slow)
            await wait_for(lambda: redis_session_server.command("EXISTS", "test:\x00lock:k") == 0)

            async def quick() -> str:
                return "b"

            with anyio.fail_after(2):
                assert await b.get_or_load("k", quick) == "b"
            assert_idle(a)


class TestSerializers:
    async def test_pickle_round_trip(self, redis_url: str) -> None:
        value = {"set": {1, 2}, "tuple": (1, 2.5), "bytes": b"\x00"}
        async with (
            tier(redis_url, serializer=PickleSerializer()) as a,
            tier(redis_url, serializer=PickleSerializer(protocol=4)) as b,
        ):
            await a.set("k", value)
            assert await b.get("k") == value

    async def test_a_value_the_serializer_cannot_write_writes_nothing(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async with tier(redis_url) as a:
            await a.set("k", "old")
            await cached(a, "k")
            for bad in ({1, 2}, math.nan, object()):
                with pytest.raises(SerializationError, match="nothing was written") as info:
                    await a.set("k", bad)
                assert isinstance(info.value, ValueError)
                assert info.value.__cause__ is not None
            assert redis_session_server.command("GET", "test:k") == b'"old"'
            assert a.get_local("k") == "old"  # nothing changed, so nothing was dropped

            async def load() -> object:
                return {1, 2}

            with pytest.raises(SerializationError):
                await a.get_or_load("other", load)
            assert redis_session_server.command("EXISTS", "test:other") == 0
            assert_idle(a)

    async def test_bytes_the_serializer_cannot_read_are_an_error_not_a_value(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        async with tier(redis_url) as a:
            redis_session_server.command("SET", "test:k", b"\xff not json")
            with pytest.raises(SerializationError, match="cannot read"):
                await a.get("k")
            assert a.get_local("k") is None
            assert_idle(a)

    async def test_a_custom_serializer(self, redis_url: str) -> None:
        class Upper:
            def dumps(self, value: str) -> bytes:
                return value.upper().encode()

            def loads(self, data: bytes) -> str:
                return data.decode()

        class NotBytes:
            def dumps(self, value: str) -> str:
                return value

            def loads(self, data: bytes) -> str:
                return data.decode()

        assert isinstance(Upper(), Serializer)
        async with tier(redis_url, serializer=Upper()) as a:
            await a.set("k", "shout")
            assert await a.get("k") == "SHOUT"
        async with tier(redis_url, serializer=NotBytes()) as b:
            with pytest.raises(SerializationError, match="not bytes"):
                await b.set("k", "x")

    def test_serializers_refuse_bad_options(self) -> None:
        with pytest.raises(TypeError):
            PickleSerializer(protocol="5")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="protocol"):
            PickleSerializer(protocol=pickle.HIGHEST_PROTOCOL + 1)
        assert JSONSerializer(sort_keys=True).dumps({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
        assert "JSONSerializer" in repr(JSONSerializer())


class TestBadInput:
    @pytest.mark.parametrize(
        ("options", "error", "match"),
        [
            ({"redis": "http://localhost"}, ValueError, "redis://, rediss:// or unix://"),
            ({"redis": "localhost:6379"}, ValueError, "must start with"),
            ({"redis": "redis://"}, ValueError, "host name"),
            ({"redis": "redis://host:port"}, ValueError, "not a valid"),
            ({"redis": "unix://"}, ValueError, "path"),
            ({"redis": 6379}, TypeError, "URL or a coredis.Redis"),
            ({"prefix": ""}, ValueError, "prefix must not be empty"),
            ({"prefix": 1}, TypeError, "prefix must be str or bytes"),
            ({"ttl": 0}, ValueError, "ttl must be a positive"),
            ({"ttl": "60"}, TypeError, "ttl must be a number"),
            ({"ttl": True}, TypeError, "ttl must be a number"),
            ({"local_ttl": -1}, ValueError, "local_ttl"),
            ({"keepalive": math.inf}, ValueError, "keepalive"),
            ({"lock_timeout": "1"}, TypeError, "lock_timeout"),
            ({"maxsize": 0}, ValueError, "maxsize"),
            ({"serializer": "json"}, TypeError, "dumps"),
        ],
    )
    def test_constructor_arguments(
        self, options: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        arguments: dict[str, Any] = {"redis": "redis://localhost", "prefix": "p:", "ttl": 60}
        arguments.update(options)
        with pytest.raises(error, match=match):
            RedisCache(**arguments)

    async def test_clients_that_cannot_serve_the_tier(self, redis_url: str) -> None:
        with pytest.raises(ValueError, match="decode_responses=False"):
            RedisCache(coredis.Redis.from_url(redis_url, decode_responses=True), prefix="p", ttl=1)
        with pytest.raises(ValueError, match="noreply=False"):
            RedisCache(coredis.Redis.from_url(redis_url, noreply=True), prefix="p", ttl=1)

    async def test_keys_that_are_not_str_or_bytes(self, redis_url: str) -> None:
        async def load() -> int:
            return 1

        async with tier(redis_url) as a:
            for key in (1, None, ("a",), ["unhashable"], bytearray(b"k")):
                if isinstance(key, list | bytearray):
                    with pytest.raises(TypeError, match="unhashable"):
                        a.get_local(key)  # type: ignore[arg-type]
                else:  # Cache.get itself: a key of another type is never cached
                    assert a.get_local(key, "miss") == "miss"  # type: ignore[arg-type]
                with pytest.raises(TypeError, match="key must be str or bytes"):
                    await a.get(key)  # type: ignore[arg-type]
                with pytest.raises(TypeError, match="key must be str or bytes"):
                    await a.set(key, 1)  # type: ignore[arg-type]
                with pytest.raises(TypeError, match="key must be str or bytes"):
                    await a.remove(key)  # type: ignore[arg-type]
                with pytest.raises(TypeError, match="key must be str or bytes"):
                    await a.get_or_load(key, load)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="NUL"):
                await a.set("\x00lock:k", 1)
            with pytest.raises(ValueError, match="UTF-8"):
                await a.set("\ud800", 1)
            with pytest.raises(TypeError, match="load must be callable"):
                await a.get_or_load("k", "not callable")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="ttl"):
                await a.set("k", 1, ttl=-1)
            with pytest.raises(TypeError, match="ttl"):
                await a.get_or_load("k", load, ttl="1")  # type: ignore[arg-type]
            # Nothing was written, and the tier still works.
            assert a.statistics().writes == 0
            await a.set("k", 2)
            assert await a.get_or_load("k", load) == 2
            assert_idle(a)

    async def test_a_socket_nobody_listens_on(self, redis_server: RedisServer) -> None:
        url = redis_server.url
        redis_server.stop()
        cache = tier(url)
        with pytest.raises(RedisUnavailableError, match="could not connect") as info:
            await cache.__aenter__()
        assert isinstance(info.value, ConnectionError)
        assert info.value.__cause__ is not None
        assert "closed" in repr(cache)
        with pytest.raises(RuntimeError, match="only once"):
            await cache.__aenter__()
        with pytest.raises(RuntimeError, match="closed"):
            await cache.get("k")

    async def test_a_host_that_refuses(self) -> None:
        # Port 1 on the loopback: nothing listens there, so the connection is refused.
        with pytest.raises(RedisUnavailableError, match=r"127\.0\.0\.1"):
            async with tier("redis://127.0.0.1:1/0"):
                pass  # pragma: no cover

    async def test_a_server_that_wants_a_password(self, redis_binary: Any) -> None:
        with RedisServer(redis_binary, extra_args=("--requirepass", "secret")) as server:
            server_url = server.url
            with pytest.raises(RedisUnavailableError, match=r"(?i)auth"):
                async with tier(server_url):
                    pass  # pragma: no cover
            user, _, path = server_url.partition("//")
            async with tier(f"{user}//:secret@{path}") as ok:
                await ok.set("k", 1)
                assert await ok.get("k") == 1

    async def test_a_server_that_refuses_client_tracking(self, redis_server: RedisServer) -> None:
        redis_server.command("ACL", "SETUSER", "default", "-client|tracking")
        with pytest.raises(RedisCacheError, match=r"(?i)tracking") as info:
            async with tier(redis_server.url):
                pass  # pragma: no cover
        assert "NOPERM" in str(info.value) or "permission" in str(info.value).lower()

    async def test_misuse_raises(self, redis_url: str) -> None:
        cache = tier(redis_url)
        with pytest.raises(RuntimeError, match="not open"):
            await cache.get("k")
        with pytest.raises(RuntimeError, match="not open"):
            await cache.set("k", 1)
        with pytest.raises(RuntimeError, match="not open"):
            await cache.__aexit__(None, None, None)
        async with cache:
            await cache.set("k", 1)
            await cache.get("k")
            with pytest.raises(RuntimeError, match="only once"):
                await cache.__aenter__()
        assert cache.get_local("k") is None  # nothing is served once no listener runs
        with pytest.raises(RuntimeError, match="closed"):
            await cache.get("k")
        with pytest.raises(RuntimeError, match="closed"):
            await cache.remove("k")

    async def test_another_thread_is_refused(self, redis_url: str) -> None:
        async with tier(redis_url) as a:
            errors: list[BaseException] = []

            def elsewhere() -> None:
                try:
                    anyio.run(a.get, "k")
                except RuntimeError as exc:
                    errors.append(exc)

            thread = threading.Thread(target=elsewhere)
            thread.start()
            await anyio.to_thread.run_sync(thread.join)
            assert len(errors) == 1
            assert "thread" in str(errors[0])

    async def test_the_callers_client_stays_the_callers(self, redis_url: str) -> None:
        async with coredis.Redis.from_url(redis_url) as client:
            async with RedisCache[int](client, prefix="own:", ttl=5) as a:
                await a.set("k", 1)
                assert await a.get("k") == 1
            assert await client.get("own:k") == b"1"  # still open: the tier did not close it


class TestCancellation:
    """Cancelling any call at any await leaves nothing behind, with anyio scopes and natively."""

    @pytest.fixture
    async def pair(self, redis_url: str) -> AsyncIterator[tuple[RedisCache[Any], RedisCache[Any]]]:
        async with (
            tier(redis_url, lock_timeout=5) as a,
            tier(redis_url, lock_timeout=5) as b,
        ):
            yield a, b

    @staticmethod
    async def operations(cache: RedisCache[Any], key: str) -> list[Callable[[], Any]]:
        async def slow_load() -> str:
            await anyio.sleep(0.002)
            return "loaded"

        return [
            lambda: cache.get(key),
            lambda: cache.set(key, "written"),
            lambda: cache.remove(key),
            lambda: cache.get_or_load(key, slow_load),
        ]

    async def check_consistent(
        self, a: RedisCache[Any], b: RedisCache[Any], server: RedisServer, key: str
    ) -> None:
        await wait_for(lambda: server.command("EXISTS", f"test:\x00lock:{key}") == 0)
        assert_idle(a)
        assert_idle(b)
        assert a.listening
        assert b.listening
        # A cancelled write may still reach the server after the call returned (it was
        # sent); once it did and its invalidation was heard, both tiers agree with the server.
        with anyio.fail_after(2):
            while True:
                truth = server.command("GET", f"test:{key}")
                expected = None if truth is None else json.loads(truth)  # type: ignore[arg-type]
                if (
                    await a.get(key) == expected
                    and await b.get(key) == expected
                    and server.command("GET", f"test:{key}") == truth
                ):
                    break
                await anyio.sleep(0.002)

    async def test_cancel_scopes_at_every_await(
        self,
        pair: tuple[RedisCache[Any], RedisCache[Any]],
        redis_session_server: RedisServer,
    ) -> None:
        a, b = pair
        for n, operation in enumerate(await self.operations(a, "k")):
            for step in range(12):
                await b.set("k", f"v{n}.{step}")
                await a.get("k")
                with anyio.move_on_after(step * 0.0002):
                    await operation()
                await self.check_consistent(a, b, redis_session_server, "k")

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_native_asyncio_cancellation(
        self,
        pair: tuple[RedisCache[Any], RedisCache[Any]],
        redis_session_server: RedisServer,
    ) -> None:
        a, b = pair
        for n, operation in enumerate(await self.operations(a, "k")):
            for step in range(12):
                await b.set("k", f"v{n}.{step}")
                await a.get("k")
                if step % 2:
                    task = asyncio.ensure_future(operation())
                    for _ in range(step):
                        await asyncio.sleep(0)
                    task.cancel()  # unless it finished already
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                else:
                    with contextlib.suppress(asyncio.TimeoutError):  # or it finished in time
                        await asyncio.wait_for(operation(), step * 0.0002)
                await self.check_consistent(a, b, redis_session_server, "k")

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_native_cancellation_of_waiters_and_loaders(self, redis_url: str) -> None:
        async def slow() -> str:
            await asyncio.sleep(0.05)
            return "v"

        async with tier(redis_url, lock_timeout=5) as a, tier(redis_url, lock_timeout=5) as b:
            loader = asyncio.ensure_future(a.get_or_load("k", slow))
            waiter_here = asyncio.ensure_future(a.get_or_load("k", slow))
            waiter_there = asyncio.ensure_future(b.get_or_load("k", slow))
            await asyncio.sleep(0.01)
            loader.cancel()  # the in-process waiter takes over...
            assert await asyncio.wait_for(waiter_here, 2) == "v"
            assert await asyncio.wait_for(waiter_there, 2) == "v"  # ...and the other process
            assert loader.cancelled()
            assert_idle(a)
            assert_idle(b)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"])
    async def test_native_cancellation_of_entering(self, redis_server: RedisServer) -> None:
        before = asyncio.all_tasks()
        redis_server.pause()
        try:
            cache = tier(redis_server.url, keepalive=5)
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):  # one class from 3.11
                await asyncio.wait_for(cache.__aenter__(), 0.2)
            assert "closed" in repr(cache)
        finally:
            redis_server.resume()
        # Nothing of it is left running.
        await asyncio.sleep(0.05)
        assert asyncio.all_tasks() <= before
