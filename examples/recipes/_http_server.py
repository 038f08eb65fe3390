"""A small HTTP/1.1 server on 127.0.0.1 for the recipes, in a thread of its own.

It stands for the service a real application calls. It is the standard library's
``ThreadingHTTPServer`` with keep-alive, so clients reuse their connections as they would
with any real server; it runs in a thread, so it serves asyncio and trio programs alike.

Routes (GET):

- ``/login?user=NAME`` sets the cookie ``session=NAME``; ``/whoami`` answers that session's
  user, or ``anonymous``.
- ``/slow`` answers after two seconds.
- ``/weather/CITY`` answers ``{"city": CITY, "celsius": ..., "served": N}`` after 0.1 s;
  ``/weather/atlantis`` answers 503 (a city the upstream service cannot serve).

Every request is counted in :attr:`LocalHTTPServer.requests`, by path.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

__all__ = ["LocalHTTPServer"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves many requests
    server: _Server

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        self.server.count(url.path)
        headers: dict[str, str] = {}
        status = 200
        if url.path == "/login":
            user = parse_qs(url.query).get("user", ["someone"])[0]
            headers["Set-Cookie"] = f"session={user}; Path=/"
            body = f"hello {user}"
        elif url.path == "/whoami":
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            body = cookie["session"].value if "session" in cookie else "anonymous"
        elif url.path == "/slow":
            time.sleep(2)
            body = "done"
        elif url.path.startswith("/weather/"):
            city = url.path.removeprefix("/weather/")
            time.sleep(0.1)  # the upstream service takes its time
            if city == "atlantis":
                status, body = 503, "no weather station there"
            else:
                celsius = 10 + len(city)
                served = self.server.requests[url.path]
                body = json.dumps({"city": city, "celsius": celsius, "served": served})
                headers["Content-Type"] = "application/json"
        else:
            status, body = 404, "not found"
        data = body.encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the recipes print what matters


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a request still sleeping does not hold up the shutdown

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def count(self, path: str) -> None:
        with self._lock:
            self.requests[path] += 1


class LocalHTTPServer:
    """``with LocalHTTPServer() as server:`` serves on ``server.url`` until the block ends."""

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def requests(self) -> collections.Counter[str]:
        """Requests served so far, by path."""
        return self._server.requests

    def __enter__(self) -> LocalHTTPServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
