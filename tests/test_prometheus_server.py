"""MetricsServer and serve_metrics: ``/metrics`` over real HTTP, on asyncio and trio.

Real sockets on the loopback interface, so these run in real time. Each response is read
with a raw socket and the body parsed with prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from _scrape import aget, ahttp, parse, value
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from darwin_metrics._prometheus._server import parse_address
from darwin_metrics.prometheus import DarwinCollector, MetricsServer, serve_metrics
from darwin_metrics.resource import Cache, ResourcePool

pytestmark = [pytest.mark.anyio, pytest.mark.real_time]
HOST = "127.0.0.1"


@asynccontextmanager
async def serving(registry: CollectorRegistry, **options: Any) -> AsyncIterator[MetricsServer]:
    async with anyio.create_task_group() as group:
        server = await group.start(
            functools.partial(serve_metrics, HOST, 0, registry=registry, **options)
        )
        yield server
        group.cancel_scope.cancel()


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == errno.ECONNREFUSED


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    cache: Cache[str, int] = Cache(60, maxsize=10)
    cache.set("a", 1)
    cache.get("a")
    registry.register(DarwinCollector(pools={"db": ResourcePool(4)}, caches={"pages": cache}))
    return registry


class TestScrape:
    async def test_get(self, registry: CollectorRegistry) -> None:
        async with serving(registry) as server:
            host, port = server.addresses[0]
            assert (host, server.url) == (HOST, f"http://{HOST}:{port}/metrics")
            response = await aget(host, port)
            assert response.status == 200
            assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert int(response.headers["content-length"]) == len(response.body)
            assert response.headers["connection"] == "close"
            families = parse(response.body.decode())
            assert value(families["darwin_pool_max"], pool="db") == 4
            assert value(families["cache_gets"], cache="pages", result="hit") == 1
            assert server.scrapes == 1
            again = await aget(host, port)
            assert parse(again.body.decode()).keys() == families.keys()
            assert server.scrapes == 2
        assert refused(port)  # the listener went with its task

    async def test_head(self, registry: CollectorRegistry) -> None:
        async with serving(registry) as server:
            host, port = server.addresses[0]
            full = await aget(host, port)
            head = await ahttp(host, port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (head.status, head.body) == (200, b"")
            assert head.headers["content-length"] == full.headers["content-length"]

    async def test_openmetrics_when_asked(self, registry: CollectorRegistry) -> None:
        accept = "Accept: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        async with serving(registry) as server:
            response = await aget(*server.addresses[0], headers=accept)
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        text = response.body.decode()
        assert text.endswith("# EOF\n")
        families = {family.name: family for family in openmetrics_families(text)}
        assert families["cache_gets"].type == "counter"
        assert families["darwin_pool_wait_seconds"].unit == "seconds"

    async def test_name_filter(self, registry: CollectorRegistry) -> None:
        async with serving(registry) as server:
            response = await aget(*server.addresses[0], "/metrics?name[]=darwin_pool_max")
        assert set(parse(response.body.decode())) == {"darwin_pool_max"}

    async def test_the_registry_is_read_at_each_scrape(self) -> None:
        registry = CollectorRegistry()
        gauge = Gauge("answer", "The answer.", registry=registry)
        async with serving(registry) as server:
            gauge.set(41)
            first = parse((await aget(*server.addresses[0])).body.decode())
            gauge.set(42)
            second = parse((await aget(*server.addresses[0])).body.decode())
        assert (value(first["answer"]), value(second["answer"])) == (41, 42)

    async def test_the_default_registry(self) -> None:
        from prometheus_client import REGISTRY

        async with anyio.create_task_group() as group:
            server = await group.start(serve_metrics, HOST, 0)
            assert server.registry is REGISTRY
            response = await aget(*server.addresses[0])
            group.cancel_scope.cancel()
        assert response.status == 200
        assert "python_info" in parse(response.body.decode())


class TestBadRequests:
    @pytest.mark.parametrize(
        ("request_bytes", "status"),
        [
            (b"GET /other HTTP/1.1\r\n\r\n", 404),
            (b"GET / HTTP/1.1\r\n\r\n", 404),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
            (b"nonsense\r\n\r\n", 400),
            (b"GET /metrics SPDY/3\r\n\r\n", 400),
            (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
            (b"GET //[::1/metrics HTTP/1.1\r\n\r\n", 400),
            (b"GET /metrics HTTP/1.1\r\nX-Big: " + b"x" * 20000 + b"\r\n\r\n", 431),
        ],
    )
    async def test_status(
        self, registry: CollectorRegistry, request_bytes: bytes, status: int
    ) -> None:
        async with serving(registry) as server:
            response = await ahttp(*server.addresses[0], request_bytes)
            assert response.status == status
            if status == 405:
                assert response.headers["allow"] == "GET, HEAD"
            assert (await aget(*server.addresses[0])).status == 200  # still serving
            assert server.scrapes == 1

    async def test_a_client_that_leaves_without_asking(self, registry: CollectorRegistry) -> None:
        async with serving(registry) as server:
            for _ in range(3):
                stream = await anyio.connect_tcp(*server.addresses[0])
                await stream.send(b"GET /met")
                await stream.aclose()
            assert (await aget(*server.addresses[0])).status == 200

    async def test_a_collector_that_raises(self, caplog: pytest.LogCaptureFixture) -> None:
        class Broken:
            fail = True

            def collect(self) -> list[Metric]:
                if self.fail:
                    raise RuntimeError("exporter bug")
                return []

        broken = Broken()
        registry = CollectorRegistry()
        registry.register(broken)
        async with serving(registry) as server:
            with caplog.at_level(logging.ERROR, logger="darwin_metrics"):
                response = await aget(*server.addresses[0])
            assert response.status == 500
            assert b"collecting the metrics failed" in response.body
            assert "exporter bug" in caplog.text
            broken.fail = False
            assert (await aget(*server.addresses[0])).status == 200

    async def test_a_silent_client_is_disconnected(self, registry: CollectorRegistry) -> None:
        async with serving(registry, request_timeout=0.2, max_connections=1) as server:
            silent = await anyio.connect_tcp(*server.addresses[0])
            started = anyio.current_time()
            # The only connection slot is taken: this one is accepted once the silent one
            # is dropped, after request_timeout.
            response = await aget(*server.addresses[0])
            waited = anyio.current_time() - started
            assert response.status == 200
            assert 0.15 <= waited < 5
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await silent.receive()
            await silent.aclose()


class TestLifecycle:
    async def test_bind_then_serve(self, registry: CollectorRegistry) -> None:
        server = await MetricsServer.bind(HOST, 0, registry=registry)
        port = server.addresses[0][1]
        assert repr(server) == f"<MetricsServer {HOST}:{port}, 0 scrapes>"
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="already serving"):
                await server.serve()
            assert (await aget(HOST, port)).status == 200
            group.cancel_scope.cancel()
        assert repr(server) == "<MetricsServer closed, 1 scrapes>"
        with pytest.raises(RuntimeError, match="closed"):
            await server.serve()
        assert refused(port)

    async def test_aclose_stops_accepting(self, registry: CollectorRegistry) -> None:
        async with await MetricsServer.bind(HOST, 0, registry=registry) as server:
            port = server.addresses[0][1]
            assert not refused(port)
        assert refused(port)
        await server.aclose()  # again: nothing to do

    async def test_aclose_while_serving(self, registry: CollectorRegistry) -> None:
        server = await MetricsServer.bind(HOST, 0, registry=registry)
        port = server.addresses[0][1]
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve)
            assert (await aget(HOST, port)).status == 200
            await server.aclose()
            assert refused(port)
            await anyio.sleep(0.05)  # serve() waits to be cancelled, quietly
            group.cancel_scope.cancel()

    async def test_a_port_in_use(self, registry: CollectorRegistry) -> None:
        async with await MetricsServer.bind(HOST, 0, registry=registry) as server:
            port = server.addresses[0][1]
            with pytest.raises(OSError, match="in use") as info:
                await MetricsServer.bind(HOST, port, registry=registry)
            assert info.value.errno == errno.EADDRINUSE

    async def test_an_address_that_is_not_ours(self) -> None:
        # 192.0.2.0/24 is reserved for documentation: never this machine's. Binding sends
        # nothing anywhere.
        with pytest.raises(OSError, match="assign") as info:
            await MetricsServer.bind("192.0.2.1", 0, registry=CollectorRegistry())
        assert info.value.errno == errno.EADDRNOTAVAIL

    @pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
    async def test_ipv6(self, registry: CollectorRegistry) -> None:
        try:
            server = await MetricsServer.bind("::1", 0, registry=registry)
        except OSError as error:  # pragma: no cover - a machine without ::1
            pytest.skip(f"cannot listen on ::1: {error}")
        async with server, anyio.create_task_group() as group:
            group.start_soon(server.serve)
            port = server.addresses[0][1]
            assert server.url == f"http://[::1]:{port}/metrics"
            assert (await aget("::1", port)).status == 200
            group.cancel_scope.cancel()

    @pytest.mark.parametrize(
        ("arguments", "error", "message"),
        [
            ({"host": 127}, TypeError, "host must be a str or None"),
            ({"port": "9464"}, TypeError, "port must be an int"),
            ({"port": True}, TypeError, "port must be an int"),
            ({"port": 70000}, ValueError, "port must be from 0 to 65535"),
            ({"port": -1}, ValueError, "port must be from 0 to 65535"),
            ({"max_connections": 0}, ValueError, "max_connections must be at least 1"),
            ({"request_timeout": 0}, ValueError, "request_timeout must be finite and positive"),
            ({"request_timeout": "1"}, TypeError, "request_timeout must be a number"),
            ({"registry": object()}, TypeError, "registry must be a prometheus_client registry"),
        ],
    )
    async def test_bad_arguments(
        self, arguments: dict[str, Any], error: type[Exception], message: str
    ) -> None:
        options = {"host": HOST, "port": 0, **arguments}
        with pytest.raises(error, match=message):
            await MetricsServer.bind(**options)

    async def test_serve_metrics_reports_a_bind_error(self) -> None:
        async with await MetricsServer.bind(HOST, 0, registry=CollectorRegistry()) as taken:
            port = taken.addresses[0][1]
            async with anyio.create_task_group() as group:
                with pytest.raises(OSError, match="in use"):
                    await group.start(serve_metrics, HOST, port)


class TestNativeAsyncioCancellation:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # task.cancel() is asyncio's own

    async def test_task_cancel_closes_the_listener(self, registry: CollectorRegistry) -> None:
        server = await MetricsServer.bind(HOST, 0, registry=registry)
        port = server.addresses[0][1]
        task = asyncio.get_running_loop().create_task(server.serve())
        assert (await aget(HOST, port)).status == 200
        slow = await anyio.connect_tcp(HOST, port)  # a connection in progress
        await slow.send(b"GET /metrics HTTP/1.1\r\n")
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert refused(port)
        with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
            await slow.receive()
        await slow.aclose()


class TestParseAddress:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:9464", ("127.0.0.1", 9464)),
            ("localhost:0", ("localhost", 0)),
            (":9464", (None, 9464)),
            ("[::1]:8000", ("::1", 8000)),
            ("metrics.example.org.:65535", ("metrics.example.org.", 65535)),
        ],
    )
    def test_good(self, text: str, expected: tuple[str | None, int]) -> None:
        assert parse_address(text) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("127.0.0.1", "has no port"),
            ("127.0.0.1:", "has no port"),
            ("9464", "has no port"),
            ("host:port", "the port must be a number from 0 to 65535"),
            ("host:65536", "the port must be a number from 0 to 65535"),
            ("host:-1", "the port must be a number"),
            ("host:٣", "the port must be a number"),
            ("bad host:80", "'bad host' is not a host name or an IP address"),
            ("-bad:80", "is not a host name"),
            ("a..b:80", "is not a host name"),
            ("::1:80", "put an IPv6 address in brackets"),
            ("[::1]", "expected HOST:PORT"),
            ("[::1]80", "expected HOST:PORT"),
            ("[nope]:80", "'nope' is not an IPv6 address"),
        ],
    )
    def test_bad(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            parse_address(text)
