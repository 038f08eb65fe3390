"""MetricsServer: a registry's ``/metrics`` over HTTP, from an anyio TCP listener.

prometheus_client's own servers run in a thread (``start_http_server``) or need an ASGI
server; this one is a small HTTP/1.1 responder that runs in the caller's task group, so it
works the same on asyncio and trio and stops when its task is cancelled. It answers ``GET``
and ``HEAD`` of ``/metrics`` (with prometheus_client's content negotiation: the Prometheus
text format, or OpenMetrics when the scraper asks for it, and its ``name[]`` filter), one
request per connection, each connection in a task of its own with a time bound, and at most
``max_connections`` at once.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import re
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn
from urllib.parse import parse_qs, urlsplit

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute, SocketListener, SocketStream

from ._collector import import_prometheus_client

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry
    from typing_extensions import Self

__all__ = ["MetricsServer", "parse_address", "serve_metrics"]

logger = logging.getLogger("darwin_metrics")

_MAX_HEAD: Final = 16 * 1024  # bytes of request line and headers
_RETRY_ACCEPT: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


def _check_host(host: str) -> str:
    """Return ``host`` if it is an IP address or a host name (RFC 1123), else raise."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return host
    name = host[:-1] if host.endswith(".") else host
    if name and len(name) <= 253 and all(_HOST_LABEL.match(part) for part in name.split(".")):
        return host
    raise ValueError(f"{host!r} is not a host name or an IP address")


def parse_address(text: str) -> tuple[str | None, int]:
    """Parse ``HOST:PORT`` (``[::1]:9464`` for IPv6; ``:9464`` for every interface).

    Returns:
        ``(host, port)``; ``host`` is ``None`` for every interface.

    Raises:
        ValueError: Not of that form, the host is neither an IP address nor a host name, or
            the port is not a number from 0 to 65535 (0 picks a free one).
    """
    if not isinstance(text, str):
        raise TypeError(f"the address must be a str, got {type(text).__name__}")
    example = "expected HOST:PORT, such as 127.0.0.1:9464, [::1]:9464 or :9464"
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{text!r}: {example}")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        result_host: str | None = host
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"{text!r} has no port: {example}")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, such as [::1]:9464")
        result_host = _check_host(host) if host else None
    if not port_text:
        raise ValueError(f"{text!r} has no port: {example}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return result_host, int(port_text)


def _response(
    status: int, content_type: str, body: bytes, *, head: bool, extra: str = ""
) -> bytes:
    lines = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return lines.encode("latin-1") + (b"" if head else body)


def _text(status: int, message: str, *, head: bool = False, extra: str = "") -> bytes:
    return _response(
        status, "text/plain; charset=utf-8", (message + "\n").encode(), head=head, extra=extra
    )


class MetricsServer:
    """Serves a prometheus_client registry's metrics at ``/metrics`` over HTTP.

    Make one with :meth:`bind` (it listens at once, so an address in use fails there), then
    run :meth:`serve` in your task group; cancel that task (or leave the group) to stop. Or
    start both in one step with :func:`serve_metrics`.

    Example::

        async with anyio.create_task_group() as group:
            server = await MetricsServer.bind("127.0.0.1", 9464)
            group.start_soon(server.serve)
            print("scrape", server.url)
            ...
            group.cancel_scope.cancel()

    Every connection gets one response and is closed. ``GET`` and ``HEAD`` of ``/metrics``
    answer 200 with the registry's metrics, in the Prometheus text format or OpenMetrics
    when the ``Accept`` header asks for it; ``?name[]=...`` restricts them to those names.
    Other paths get 404, other methods 405; a request that is malformed or whose head is over
    16 KiB gets 400 or 431. A registry that raises while collecting gives 500 and an error
    logged (logger ``darwin_metrics``); serving goes on. A client that does not send its
    request or read the response within ``request_timeout`` is disconnected.
    """

    __slots__ = (
        "_closed",
        "_connections",
        "_listeners",
        "_max_connections",
        "_registry",
        "_request_timeout",
        "_scrapes",
    )

    def __init__(
        self,
        listeners: list[SocketListener],
        registry: CollectorRegistry,
        *,
        max_connections: int,
        request_timeout: float,
    ) -> None:
        # Use bind(): it checks the arguments and makes the listeners.
        self._listeners = listeners
        self._registry = registry
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._connections: anyio.Semaphore | None = None
        self._closed = False
        self._scrapes = 0

    @classmethod
    async def bind(
        cls,
        host: str | None = "127.0.0.1",
        port: int = 9464,
        *,
        registry: CollectorRegistry | None = None,
        max_connections: int = 64,
        request_timeout: float = 10.0,
    ) -> Self:
        """Listen on ``host:port`` for scrapes of ``registry``; serve them with :meth:`serve`.

        Checkpoint: yes. If cancelled, nothing is listening.

        Args:
            host: An IP address or a host name to listen on (every address it resolves to),
                or ``None`` for every interface.
            port: The TCP port; 0 picks a free one (see :attr:`addresses`).
            registry: What to serve: prometheus_client's default ``REGISTRY`` if ``None``.
            max_connections: Connections served at once (an int of at least 1); more wait
                in the listen queue.
            request_timeout: Seconds a client has to send its request and read the response
                (finite and positive).

        Returns:
            The server, listening; close it with :meth:`aclose` or ``async with``, or let
            :meth:`serve` close it when it ends.

        Raises:
            ModuleNotFoundError: prometheus-client is not installed.
            TypeError: An argument is of the wrong type.
            ValueError: ``port``, ``max_connections`` or ``request_timeout`` is out of range.
            OSError: It cannot listen there: the port is in use, the address is not this
                machine's, or the host name does not resolve (``socket.gaierror``).
        """
        import_prometheus_client()
        if host is not None and not isinstance(host, str):
            raise TypeError(f"host must be a str or None, got {type(host).__name__}")
        for name, value, low in (("port", port, 0), ("max_connections", max_connections, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < low or (name == "port" and value > 65535):
                wanted = "from 0 to 65535" if name == "port" else "at least 1"
                raise ValueError(f"{name} must be {wanted}, got {value!r}")
        if isinstance(request_timeout, bool) or not isinstance(request_timeout, (int, float)):
            kind = type(request_timeout).__name__
            raise TypeError(f"request_timeout must be a number of seconds, got {kind}")
        if not (math.isfinite(request_timeout) and request_timeout > 0):
            raise ValueError(
                f"request_timeout must be finite and positive, got {request_timeout!r}"
            )
        if registry is None:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        elif not callable(getattr(registry, "collect", None)):
            raise TypeError(
                f"registry must be a prometheus_client registry, got {type(registry).__name__}"
            )
        multi = await anyio.create_tcp_listener(local_host=host or None, local_port=port)
        listeners = [each for each in multi.listeners if isinstance(each, SocketListener)]
        return cls(
            listeners,
            registry,
            max_connections=max_connections,
            request_timeout=float(request_timeout),
        )

    # ------------------------------------------------------------------ introspection

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(address, port)`` pairs listened on (one per address family bound)."""
        pairs = []
        for listener in self._listeners:
            address = listener.extra(SocketAttribute.local_address)
            assert isinstance(address, tuple)
            pairs.append((str(address[0]), int(address[1])))
        return pairs

    @property
    def url(self) -> str:
        """The URL to scrape, on the first address listened on (``http://host:port/metrics``)."""
        host, port = self.addresses[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/metrics"

    @property
    def registry(self) -> CollectorRegistry:
        """The registry served."""
        return self._registry

    @property
    def scrapes(self) -> int:
        """Requests for ``/metrics`` answered with the metrics so far."""
        return self._scrapes

    def __repr__(self) -> str:
        state = "closed" if self._closed else ", ".join(f"{h}:{p}" for h, p in self.addresses)
        return f"<{type(self).__name__} {state}, {self._scrapes} scrapes>"

    # ------------------------------------------------------------------ serving

    async def serve(self) -> NoReturn:
        """Answer scrapes until cancelled; then close the listeners.

        Checkpoint: yes; it returns only by raising (cancellation, or an error accepting
        connections that retrying cannot help). On the way out, every connection in progress
        is dropped and the server is closed.

        Raises:
            RuntimeError: The server is closed, or already serving.
        """
        if self._closed:
            raise RuntimeError("this MetricsServer is closed: bind a new one")
        if self._connections is not None:
            raise RuntimeError("this MetricsServer is already serving")
        self._connections = anyio.Semaphore(self._max_connections)
        try:
            async with anyio.create_task_group() as group:
                for listener in self._listeners:
                    group.start_soon(self._accept, listener, group)
        finally:
            await self.aclose()
        raise AssertionError("unreachable: the accept loops end only by raising")

    async def _accept(self, listener: SocketListener, group: anyio.abc.TaskGroup) -> NoReturn:
        connections = self._connections
        assert connections is not None
        while True:
            await connections.acquire()
            try:
                stream = await listener.accept()
            except BaseException as error:
                connections.release()
                if isinstance(error, anyio.ClosedResourceError):
                    await anyio.sleep_forever()  # closed by aclose(): wait to be cancelled
                # trio's backend reports the socket's error as the cause of BrokenResourceError.
                cause = error.__cause__ if isinstance(error, anyio.BrokenResourceError) else error
                if isinstance(cause, ConnectionAbortedError):
                    continue  # the client gave up before it was accepted
                if isinstance(cause, OSError) and cause.errno in _RETRY_ACCEPT:
                    logger.error("metrics server: cannot accept a connection: %s", cause)
                    await anyio.sleep(0.1)  # out of descriptors or memory: let some go
                    continue
                raise
            group.start_soon(self._handle, stream)

    async def _handle(self, stream: SocketStream) -> None:
        connections = self._connections
        assert connections is not None
        try:
            with anyio.move_on_after(self._request_timeout):
                request = await self._read_head(stream)
                if request is not None:
                    await stream.send(self._respond(request))
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream):
            pass  # the client went away
        except Exception:  # a bug here must not stop the server: log it, drop the connection
            logger.exception("metrics server: answering a request failed")
        finally:
            connections.release()
            await anyio.aclose_forcefully(stream)

    async def _read_head(self, stream: SocketStream) -> bytes | None:
        """The request's line and headers, or ``None`` if the client sent none."""
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) <= _MAX_HEAD:
                data += await stream.receive(65536)
        except anyio.EndOfStream:
            return None
        head = data.partition(b"\r\n\r\n")[0]
        if len(head) > _MAX_HEAD:
            await stream.send(_text(431, "request head too large"))
            return None
        return head

    def _respond(self, head: bytes) -> bytes:
        """The whole response to a request whose line and headers are ``head``."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _text(400, "bad request line")
        method, target, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                return _text(400, "bad header line")
            headers[name.lower()] = value.strip()
        head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _text(405, "only GET and HEAD", extra="Allow: GET, HEAD\r\n")
        try:
            url = urlsplit(target)
            query = parse_qs(url.query)
        except ValueError:  # such as an unclosed "[" in the target
            return _text(400, "bad request target", head=head_only)
        if url.path != "/metrics":
            return _text(404, "not found: the metrics are at /metrics", head=head_only)
        return self._metrics(headers.get("accept", ""), query, head_only)

    def _metrics(self, accept: str, query: dict[str, list[str]], head: bool) -> bytes:
        from prometheus_client.exposition import choose_encoder

        registry: Any = self._registry
        names = query.get("name[]")
        if names:
            registry = registry.restricted_registry(names)
        encoder: Callable[[Any], bytes]
        encoder, content_type = choose_encoder(accept)
        try:
            body = encoder(registry)
        except Exception:
            logger.exception("metrics server: collecting the metrics raised")
            return _text(500, "collecting the metrics failed (see the server's log)", head=head)
        self._scrapes += 1
        return _response(200, content_type, body, head=head)

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Stop listening. A running :meth:`serve` goes on until it is cancelled.

        Checkpoint: yes; every listener is closed even if it is cancelled. Closing again does
        nothing more.
        """
        if self._closed:
            await anyio.lowlevel.checkpoint()
            return
        self._closed = True
        failure: BaseException | None = None
        for listener in self._listeners:
            try:
                # Both backends close the socket whatever their checkpoint raises, so each
                # listener is closed, also under asyncio's own task.cancel().
                await anyio.aclose_forcefully(listener)
            except BaseException as error:  # noqa: PERF203 (a loop of one or two, once)
                failure = failure or error
        if failure is not None:
            raise failure

    async def __aenter__(self) -> Self:
        """Return the server, which is already listening (:meth:`bind` made it so)."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the server, as :meth:`aclose` does."""
        await self.aclose()


async def serve_metrics(
    host: str | None = "127.0.0.1",
    port: int = 9464,
    *,
    registry: CollectorRegistry | None = None,
    max_connections: int = 64,
    request_timeout: float = 10.0,
    task_status: anyio.abc.TaskStatus[MetricsServer] = anyio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``registry``'s ``/metrics`` on ``host:port`` until cancelled.

    Start it with ``server = await task_group.start(serve_metrics, host, port)``: that
    returns once it listens (or raises, for an address it cannot listen on), with the
    :class:`MetricsServer`, whose :attr:`~MetricsServer.url` says where to scrape (with port
    0, the port picked).

    Checkpoint: yes; it returns only by raising. The arguments are :meth:`MetricsServer.bind`'s.
    """
    server = await MetricsServer.bind(
        host,
        port,
        registry=registry,
        max_connections=max_connections,
        request_timeout=request_timeout,
    )
    try:
        task_status.started(server)
    except BaseException:
        await server.aclose()
        raise
    await server.serve()
