"""The shared capacity limiter's own connection to Valkey/Redis.

One connection per limiter carries everything: its scripts (sent by SHA1 with ``EVALSHA``, in
the order they were issued, and replied to in that order), and the grant messages addressed to
it (RESP3 lets a subscribed connection run any command, and the server's pub/sub pushes
arrive beside the replies). Requests are queued synchronously (:meth:`Link.send`), so a
give-back issued by code that must not await (a release, the clean-up of a cancelled acquire)
is on its way before the caller returns, ahead of anything the process asks later.

The link reconnects with backoff when the connection drops; on every connection it loads the
scripts, subscribes to the limiter's channel and, once the subscription is confirmed, calls
``on_up``; ``on_down`` when it is lost. Requests in flight when it drops fail with the client
library's ``ConnectionError``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from .._errors import RedisUnavailableError
from ._scripts import Script
from ._support import Backoff, close_buffers, describe, import_coredis

if TYPE_CHECKING:
    import coredis.connection

__all__ = ["Link", "connection_factory"]

_logger = logging.getLogger("darwin_metrics")

#: The name the limiter's connection gives itself (``CLIENT LIST`` shows it).
CLIENT_NAME = "darwin-metrics-limiter"


def connection_factory(
    redis: object,
) -> tuple[Callable[[], coredis.connection.BaseConnection], str]:
    """A function that makes a fresh connection like the client's (or the URL's), and where to.

    Raises:
        TypeError: ``redis`` is neither a URL nor a ``coredis.Redis`` client.
    """
    library = import_coredis()
    if isinstance(redis, str):
        pool = library.ConnectionPool.from_url(redis, decode_responses=False)
        where = redis
    elif isinstance(redis, library.RedisCluster):
        raise TypeError(
            "SharedCapacityLimiter needs a coredis.Redis (one server), not a RedisCluster"
        )
    elif isinstance(redis, library.Redis):
        pool = redis.connection_pool
        where = str(pool.location)
    else:
        raise TypeError(
            f"redis must be a URL or a coredis.Redis client, not {type(redis).__name__}"
        )
    options: dict[str, Any] = dict(pool.connection_kwargs)
    for name in ("processing_budget", "max_idle_time", "noreply", "decode_responses"):
        options.pop(name, None)
    options["client_name"] = CLIENT_NAME
    location = pool.location
    assert location is not None
    connection_class = pool.connection_class

    def make() -> coredis.connection.BaseConnection:
        connection: coredis.connection.BaseConnection = connection_class(
            location, decode_responses=False, **options
        )
        return connection

    return make, where


class Link:
    """One connection at a time, kept up for as long as :meth:`run` runs."""

    __slots__ = (
        "_channel",
        "_connection",
        "_make",
        "_on_down",
        "_on_message",
        "_on_up",
        "_scripts",
        "_timeout",
        "connects",
        "disconnects",
        "where",
    )

    def __init__(
        self,
        make: Callable[[], coredis.connection.BaseConnection],
        where: str,
        *,
        channel: bytes,
        scripts: Sequence[Script],
        timeout: float,
        on_message: Callable[[bytes], None],
        on_up: Callable[[], None],
        on_down: Callable[[], None],
    ) -> None:
        self._make = make
        self.where = where
        self._channel = channel
        self._scripts = scripts
        self._timeout = timeout
        self._on_message = on_message
        self._on_up = on_up
        self._on_down = on_down
        self._connection: coredis.connection.BaseConnection | None = None
        self.connects = 0
        self.disconnects = 0

    @property
    def up(self) -> bool:
        """Whether a connection is subscribed and takes requests."""
        return self._connection is not None

    def unavailable(self, doing: str, exc: BaseException | None = None) -> RedisUnavailableError:
        detail = f": {describe(exc)}" if exc is not None else ""
        return RedisUnavailableError(f"SharedCapacityLimiter {doing} ({self.where}){detail}")

    # -- requests -------------------------------------------------------------------------------

    def send(self, script: Script, keys: Sequence[bytes], args: Sequence[bytes | int]) -> Any:
        """Queue ``EVALSHA`` on the connection now (sync) and return the awaitable request.

        Raises:
            RedisUnavailableError: There is no connection at the moment.
        """
        connection = self._connection
        if connection is None:
            raise self.unavailable("has no connection to the server")
        try:
            return connection.create_request(
                b"EVALSHA", script.sha, len(keys), *keys, *args, decode=False
            )
        except Exception as exc:  # the connection died just now
            raise self.unavailable("lost its connection to the server", exc) from exc

    def send_source(
        self, script: Script, keys: Sequence[bytes], args: Sequence[bytes | int]
    ) -> Any:
        """As :meth:`send`, with the script's source (``EVAL``): after ``NOSCRIPT``."""
        connection = self._connection
        if connection is None:
            raise self.unavailable("has no connection to the server")
        try:
            return connection.create_request(
                b"EVAL", script.source, len(keys), *keys, *args, decode=False
            )
        except Exception as exc:
            raise self.unavailable("lost its connection to the server", exc) from exc

    async def call(
        self, script: Script, keys: Sequence[bytes], args: Sequence[bytes | int]
    ) -> list[Any]:
        """Run ``script`` and return its reply. A checkpoint.

        Raises:
            RedisUnavailableError: No connection, or it was lost before the reply came (the
                script may or may not have run).
        """
        library = import_coredis()
        request = self.send(script, keys, args)
        try:
            try:
                reply = await request
            except library.exceptions.NoScriptError:
                reply = await self.send_source(script, keys, args)
        except (library.exceptions.ConnectionError, TimeoutError) as exc:
            raise self.unavailable(f"lost its connection running {script.name}", exc) from exc
        assert isinstance(reply, list)
        return reply

    async def ping(self) -> None:
        """``PING`` on the connection (a checkpoint); raises like :meth:`call`."""
        library = import_coredis()
        connection = self._connection
        if connection is None:
            raise self.unavailable("has no connection to the server")
        try:
            await connection.create_request(b"PING", decode=False)
        except (library.exceptions.ConnectionError, TimeoutError) as exc:
            raise self.unavailable("lost its connection", exc) from exc

    def drop(self, reason: str) -> None:
        """Give the connection up (it went silent); :meth:`run` makes a new one."""
        connection = self._connection
        if connection is not None:
            _logger.warning("SharedCapacityLimiter (%s): %s; reconnecting", self.where, reason)
            connection.invalidate(reason)

    # -- the connection's life ------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Connect, and reconnect whenever the connection is lost, until cancelled.

        The first connection must succeed: its failure is raised (as
        :class:`RedisUnavailableError`) before ``task_status.started()``.
        """
        backoff = Backoff()
        started = False

        def ready() -> None:
            nonlocal started
            backoff.reset()
            if not started:
                started = True
                task_status.started()

        while True:
            try:
                await self._run_once(ready)
            except Exception as exc:
                if not started:
                    # Cancelled while connecting: the client library may have turned the
                    # cancellation into a connection error; it is a cancellation.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    raise self.unavailable("could not connect", exc) from exc
                _logger.warning(
                    "SharedCapacityLimiter (%s): lost the connection (%s); reconnecting",
                    self.where,
                    describe(exc),
                )
            await backoff.sleep()

    async def _run_once(self, ready: Callable[[], None]) -> None:
        library = import_coredis()
        connection = self._make()
        try:
            async with anyio.create_task_group() as group:
                with anyio.fail_after(self._timeout):
                    await group.start(connection.run)
                    for script in self._scripts:
                        await connection.create_request(
                            b"SCRIPT", b"LOAD", script.source, decode=False
                        )
                    messages = connection.push_messages
                    connection.send_command(b"SUBSCRIBE", self._channel)
                    async for message in messages:  # the confirmation comes first
                        if message[:1] == [b"subscribe"]:
                            break
                async with contextlib.aclosing(messages):
                    self._connection = connection
                    self.connects += 1
                    try:
                        self._on_up()
                        ready()
                        async for message in messages:
                            if len(message) == 3 and message[0] == b"message":
                                payload = message[2]
                                if isinstance(payload, bytes):
                                    self._on_message(payload)
                    finally:
                        self._connection = None
                        self.disconnects += 1
                        self._on_down()
                raise library.exceptions.ConnectionError("the connection ended")
        finally:
            self._connection = None
            connection.invalidate()
            close_buffers(connection)
