"""Shared fixtures: every async test runs on asyncio and on trio.

By default both backends run in *virtual time*: trio with ``MockClock(autojump_threshold=0)``
and asyncio with a ``looptime`` loop, so ``anyio.sleep(60)`` and ``fail_after`` finish at once
while ``anyio.current_time()`` moves exactly as if they had waited. Tests that need real time
(threads, sockets, subprocesses: virtual clocks jump past them) are marked ``real_time``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import warnings
from collections.abc import Iterator
from typing import Any

import looptime
import pytest
import trio.testing
from _redis_server import REQUIRE_ENV, RedisServer, ServerBinary, find_server_binary


class _RealTimeLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, minus one race of anyio's UNIX socket streams (anyio 4.16 and master).

    A receive on a UNIX socket waits for a future that an ``add_reader`` callback completes
    with ``set_result``; the reader is removed only by the future's done callback, one
    iteration later. When the receive is cancelled in the very iteration in which the socket
    becomes readable (coredis cancels its reader when the writer finds the connection broken,
    as a server shutting down makes it), the callback runs on a cancelled future and raises
    ``InvalidStateError`` inside the loop: harmless (the reader is removed next), but anyio's
    test runner reports it as the test's error. Exactly that case is dropped here.
    """

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        handle = context.get("handle")
        future = getattr(getattr(handle, "_callback", None), "__self__", None)
        if (
            isinstance(context.get("exception"), asyncio.InvalidStateError)
            and isinstance(future, asyncio.Future)
            and future.cancelled()
            and getattr(handle, "_callback", None) == future.set_result
        ):
            return
        super().call_exception_handler(context)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name: str = request.param
    if request.node.get_closest_marker("real_time") is not None:
        if name == "asyncio":
            return name, {"loop_factory": _RealTimeLoop}
        return name, {}
    if name == "asyncio":
        return name, {"loop_factory": lambda: looptime.new_event_loop(start=0)}
    return name, {"clock": trio.testing.MockClock(autojump_threshold=0)}


# -- Valkey/Redis servers ----------------------------------------------------------------------
#
# ``redis_url``: a server shared by the whole session, flushed before each test.
# ``redis_server``: a server of the test's own (a ``RedisServer``), which it may stop, restart,
# pause or kill; its ``url`` can be handed to subprocesses.
# Either one marks the test ``redis`` and ``real_time``. Without a server binary the test skips,
# saying why, unless DARWIN_METRICS_REQUIRE_REDIS=1 (CI), which makes it fail instead.

_REDIS_FIXTURES = {"redis_url", "redis_server", "redis_binary", "redis_session_server"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # First, so that ``-m redis`` sees the markers added here.
    for item in items:
        if _REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)
            item.add_marker(pytest.mark.real_time)


def pytest_report_header() -> str:
    binary = find_server_binary()
    if isinstance(binary, str):
        return f"redis server: none ({binary})"
    try:
        version = subprocess.run(
            [binary.path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except OSError as exc:
        version = f"cannot run: {exc}"
    return f"redis server: {binary.path} (from {binary.source}): {version}"


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but a Redis test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _collect_coredis_garbage(request: pytest.FixtureRequest) -> Iterator[None]:
    """coredis leaves the memory streams of a connection whose connect failed unclosed; they
    warn (ResourceWarning) when collected. Collect them within the test that made them, where
    the ``redis`` tests' filter ignores exactly that warning."""
    yield
    if request.node.get_closest_marker("redis") is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "Unclosed <MemoryObject(Send|Receive)Stream", ResourceWarning
            )
            gc.collect()


@pytest.fixture(scope="session")
def redis_binary() -> ServerBinary:
    try:
        import coredis  # noqa: F401
    except ImportError:
        _unavailable("coredis is not installed: pip install -e '.[test]'")
    binary = find_server_binary()
    if isinstance(binary, str):
        _unavailable(binary)
        raise AssertionError("unreachable")
    return binary


@pytest.fixture(scope="session")
def redis_session_server(redis_binary: ServerBinary) -> Iterator[RedisServer]:
    with RedisServer(redis_binary) as server:
        yield server


@pytest.fixture
def redis_url(redis_session_server: RedisServer) -> str:
    if redis_session_server.process is None or redis_session_server.process.poll() is not None:
        redis_session_server.stop()
        redis_session_server.start()
    redis_session_server.command("FLUSHALL")
    return redis_session_server.url


@pytest.fixture
def redis_server(redis_binary: ServerBinary) -> Iterator[RedisServer]:
    with RedisServer(redis_binary) as server:
        yield server
