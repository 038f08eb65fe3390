"""Small parts of the shared cache tier: argument checks, per-key records, error text."""

from __future__ import annotations

import enum
import math
import numbers
import random
import sys
from datetime import timedelta
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import urlparse

import anyio

if TYPE_CHECKING:
    import coredis
    import coredis.connection

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "MISSING",
    "Backoff",
    "Flight",
    "Key",
    "Sentinel",
    "Watch",
    "check_url",
    "close_buffers",
    "dedicated_connection",
    "describe",
    "duration",
    "import_coredis",
    "milliseconds",
]

V = TypeVar("V")
Key = str | bytes


class Sentinel(enum.Enum):
    MISSING = enum.auto()


MISSING: Literal[Sentinel.MISSING] = Sentinel.MISSING


def import_coredis() -> ModuleType:
    try:
        import coredis
        import coredis.exceptions
    except ImportError as exc:  # pragma: no cover - the redis extra is installed in the tests
        raise ImportError(
            "darwin_metrics.redis needs coredis: pip install 'darwin-metrics[redis]'"
        ) from exc
    return coredis


def duration(value: object, name: str, *, optional: bool = False) -> float | None:
    """Validate a duration argument (seconds or a timedelta) and return it in seconds."""
    if value is None and optional:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a number of seconds, a datetime.timedelta or None"
        if not optional:
            expected = "a number of seconds or a datetime.timedelta"
        raise TypeError(f"{name} must be {expected}, not {type(value).__name__}")
    else:
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    if not 0.0 < seconds < math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def check_url(url: str) -> None:
    try:
        parsed = urlparse(url)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"not a valid Valkey/Redis URL: {url!r} ({exc})") from None
    if parsed.scheme == "unix":
        if not parsed.path:
            raise ValueError(f"a unix:// URL needs the socket's path, got {url!r}")
    elif parsed.scheme in ("redis", "rediss"):
        if not parsed.hostname:
            raise ValueError(f"a {parsed.scheme}:// URL needs a host name, got {url!r}")
    else:
        raise ValueError(f"the URL must start with redis://, rediss:// or unix://, got {url!r}")


class Backoff:
    """The wait between two attempts to reconnect: doubling from 50 ms to 1 s, with jitter.

    The jitter keeps the processes of a fleet from reconnecting in step after a server
    restart. :meth:`reset` once connected; :meth:`sleep` after each failure.
    """

    MIN = 0.05
    MAX = 1.0

    __slots__ = ("_delay",)

    def __init__(self) -> None:
        self._delay = self.MIN

    def reset(self) -> None:
        self._delay = self.MIN

    async def sleep(self) -> None:
        """Wait the current delay (80-100% of it), then double it up to :attr:`MAX`."""
        await anyio.sleep(self._delay * random.uniform(0.8, 1.0))
        self._delay = min(self._delay * 2, self.MAX)


class Watch:
    """What happened to one key while some task reads or waits for it."""

    __slots__ = ("changes", "event", "invalidations", "users")

    def __init__(self) -> None:
        #: Invalidations of the key's value (the race guard compares this).
        self.invalidations = 0
        #: Invalidations of the value or of its load lock (lock waiters compare this).
        self.changes = 0
        #: Tasks that hold this watch; it is dropped when the last one lets go.
        self.users = 0
        #: Set (and dropped) at the next change, for a task waiting on another's load lock.
        self.event: anyio.Event | None = None

    def changed(self) -> None:
        self.changes += 1
        event = self.event
        if event is not None:
            self.event = None
            event.set()


class Flight(Generic[V]):
    """One ``get_or_load`` in progress in this process and, once it ends, its outcome."""

    __slots__ = ("error", "event", "loaded", "owner", "traceback", "value", "waiters")

    value: V

    def __init__(self, owner: object) -> None:
        self.owner = owner
        self.loaded = False
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.waiters = 0
        self.event = anyio.Event()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.traceback = error.__traceback__

    def outcome(self) -> V | Literal[Sentinel.MISSING]:
        if self.loaded:
            return self.value
        if self.error is not None:
            raise self.error.with_traceback(self.traceback)
        return MISSING


def dedicated_connection(
    client: coredis.Redis[bytes], name: str
) -> coredis.connection.BaseConnection:
    """A new connection to ``client``'s server, outside its pool, named ``name``.

    For a task that keeps one connection to itself (a listener, a blocking reader): it has
    the pool's address, credentials and database, replies as bytes, and shows as ``name`` in
    ``CLIENT LIST``. The caller runs it (``await task_group.start(connection.run)``), and
    ``invalidate()`` and :func:`close_buffers` it when done.
    """
    pool = client.connection_pool
    options: dict[str, Any] = dict(pool.connection_kwargs)
    for option in ("processing_budget", "max_idle_time", "noreply", "decode_responses"):
        options.pop(option, None)
    options["client_name"] = name
    assert pool.location is not None
    connection: coredis.connection.BaseConnection = pool.connection_class(
        pool.location, decode_responses=False, **options
    )
    return connection


def close_buffers(connection: object) -> None:
    """Close the memory streams of a coredis connection that never ran.

    ``BaseConnection.__init__`` makes them and only ``run()`` closes them; a connection whose
    connect failed would warn (``ResourceWarning``) when collected.
    """
    for name in (
        "_push_message_buffer_in",
        "_push_message_buffer_out",
        "_streamed_message_buffer_in",
        "_streamed_message_buffer_out",
        "_write_buffer_in",
        "_write_buffer_out",
    ):
        stream = getattr(connection, name, None)
        close = getattr(stream, "close", None)
        if callable(close):
            close()


def describe(exc: BaseException) -> str:
    """A one-line account of an error, looking inside exception groups and causes."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text
