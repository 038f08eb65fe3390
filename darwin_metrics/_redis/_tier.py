"""``RedisCache``: an in-process :class:`~darwin_metrics.resource.Cache` (L1) in front of
Valkey/Redis (L2), kept coherent by server-assisted invalidation.

How it stays coherent:

- L2 holds every value under ``prefix + key`` (``SET ... PX ttl``). L1 holds copies, filled
  only by reads of L2, never by writes.
- One *listener* per tier, on a dedicated connection, runs ``CLIENT TRACKING ON BCAST PREFIX
  <prefix>``: the server then pushes the name of every key under the prefix that anyone
  changes (a write, a delete, an expiry, an eviction), and ``None`` for a flush. The
  listener drops each named key from L1; a flush clears L1.
- The race guard. A read of L2 and an invalidation travel on different connections, so the
  reply to a read can arrive *after* the invalidation of the value it carries. Before a read
  the tier notes how many invalidations its key has had (``Watch.invalidations``, counted
  only while some read of the key is in flight) and the listener's *epoch*; it fills L1 only
  if neither changed by the time the reply is handled. An invalidation that the listener
  handled before the note was sent by the server before the read was processed, so the
  read saw the new value: nothing stale can be filled.
- The epoch changes whenever the listener stops or starts hearing the server (a dropped or
  silent connection, a reconnect, a flush): L1 is cleared then, and no read that was in
  flight across the change fills it. While the listener is down, L1 stays empty and every
  read goes to L2 (bypass); a ``PING`` every half ``keepalive`` (or any push) proves the
  connection alive, so a silent one is given up within one ``keepalive``.
- The fill's ttl is capped at the key's remaining L2 ttl (``PTTL``, sent with the ``GET`` in
  the same round trip), less the read's round trip.
- A write goes to L2, then drops the key from this process's L1 at once and counts as an
  invalidation for in-flight reads, so the process reads its own writes; other processes
  drop the key when the server's invalidation reaches them.

Everything that changes the tier's state between two awaits is synchronous, so a native
asyncio cancellation (``task.cancel()``) at any await leaves it consistent: the cleanup in
``finally`` blocks never awaits, and a lock that must still be released is handed to a
background task of the tier.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    Protocol,
    TypeVar,
    cast,
    final,
    overload,
)

import anyio
import anyio.abc
import attrs

from .._cache import Cache, CacheStatistics
from .._errors import RedisCacheError, RedisUnavailableError, SerializationError
from .._tasks import exit_task_group
from . import _scripts
from ._serializers import JSONSerializer, Serializer
from ._support import (
    MISSING,
    Backoff,
    Flight,
    Key,
    Sentinel,
    Watch,
    check_url,
    close_buffers,
    dedicated_connection,
    describe,
    duration,
    import_coredis,
    milliseconds,
)

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

if TYPE_CHECKING:
    import coredis
    import coredis.connection

__all__ = ["RedisCache", "RedisCacheStatistics"]

V = TypeVar("V")
V_co = TypeVar("V_co", covariant=True)
T = TypeVar("T")

_logger = logging.getLogger("darwin_metrics")

#: Marks the load-lock key of ``key``: ``prefix + _LOCK_MARK + key``. User keys may not start
#: with NUL, so lock keys never collide with data keys.
_LOCK_MARK = b"\x00lock:"
#: The name the listener's connection gives itself (``CLIENT LIST`` shows it).
LISTENER_NAME = "darwin-metrics-invalidations"
#: How long a waiter for another process's load lock sleeps between two looks while the
#: listener is down (no invalidation can wake it then).
_LOCK_POLL = 0.05
#: How long the background release of a load lock may take before the lock's own expiry
#: is left to free it.
_RELEASE_TIMEOUT = 2.0


class _State(enum.Enum):
    NEW = "new"
    OPENING = "opening"
    OPEN = "open"
    CLOSED = "closed"


class _ListenerSilent(Exception):
    """The listener's connection stopped answering ``PING``."""


class _LocalLookup(Protocol[V_co]):
    """The signature of :attr:`RedisCache.get_local` (``Cache.get``)."""

    @overload
    def __call__(self, key: Key) -> V_co | None: ...

    @overload
    def __call__(self, key: Key, default: T) -> V_co | T: ...


@attrs.frozen
class RedisCacheStatistics:
    """A snapshot of a :class:`RedisCache`'s counters, from :meth:`RedisCache.statistics`.

    Attributes:
        local: The in-process cache's own statistics (its hits are the tier's L1 hits).
        remote_hits: Reads of the server that found a value.
        remote_misses: Reads of the server that found none.
        fills: Values read from the server and cached in-process.
        fills_refused: Values read from the server and *not* cached in-process, because the
            key was invalidated while the read was in flight or the listener was not
            listening (the race guard at work).
        writes: Values stored on the server by ``set`` and by loads.
        removals: ``remove`` calls.
        loads: Calls of a ``get_or_load`` loader that returned.
        invalidations: Keys named by the server's invalidation messages.
        flushes: Flush messages (the server's database was emptied): each cleared L1.
        connects: Times the listener connected and started listening.
        disconnects: Times the listener lost its connection or gave up a silent one.
        listening: Whether the listener hears the server now. While it does not, L1 is
            empty and every read goes to the server.
        listener_id: The listener connection's client id on the server (``CLIENT LIST``),
            or ``None`` while it has none.
    """

    local: CacheStatistics
    remote_hits: int
    remote_misses: int
    fills: int
    fills_refused: int
    writes: int
    removals: int
    loads: int
    invalidations: int
    flushes: int
    connects: int
    disconnects: int
    listening: bool
    listener_id: int | None


@final
class RedisCache(Generic[V]):
    """A two-tier cache shared by processes: an in-process cache in front of Valkey/Redis.

    Reads look in this process's cache (L1) first: a hit is the in-process
    :class:`~darwin_metrics.resource.Cache` lookup, lock-free and without I/O. A miss reads
    the server (L2), where every value lives under ``prefix + key`` with a ttl, and caches what
    it found in-process for at most ``local_ttl`` and never past the key's ttl on the server.
    Writes go to the server, then drop the key from this process's cache. The server tells
    every process's tier which keys changed (client-side caching with ``CLIENT TRACKING ON
    BCAST PREFIX``), and each drops them.

    **Consistency.** A process reads its own writes: once ``set``, ``remove`` or a load's
    store returned (or raised), this process no longer serves the value it replaced. Another
    process stops serving a replaced value within the *invalidation delay* (the time the
    server's message takes to reach its listener: about a millisecond on one host), and never
    serves it after the listener has handled that message, even when one of its reads was in
    flight meanwhile. If the listener's connection drops or goes silent, its process clears
    its in-process cache and reads the server directly until the listener is back; a silent
    connection is detected within ``keepalive`` seconds, during which a stale value may still
    be served (the one window the tier cannot close). Values stored by other clients under
    the prefix are seen the same way; their bytes must be something ``serializer`` reads.

    **Timeouts.** An operation on the server waits as long as the coredis client does: give
    the client a ``stream_timeout`` (in a URL: ``redis://host/0?stream_timeout=2``) or wrap
    calls in :func:`anyio.fail_after`. The listener bounds its own waits by ``keepalive``.

    **Use.** Enter it with ``async with`` in a long-lived task; the listener runs in the
    tier's own task group until the block ends, and the tier belongs to the event loop (and
    thread) that entered it. Works on asyncio and trio. With a URL, the tier makes its own
    coredis client and closes it on exit; with a ``coredis.Redis`` client, the caller owns it,
    must have entered it (``async with client:``) and must keep it open longer than the tier.

    Example::

        async with RedisCache("redis://localhost:6379", prefix="app:users:", ttl=300) as users:
            user = await users.get_or_load(user_id, lambda: fetch_user(user_id))
            await users.set(user_id, {**user, "name": "Ada"})   # every process drops it
            users.get_local(user_id)   # None: the next read goes to the server

    Args:
        redis: A ``redis://``, ``rediss://`` or ``unix://`` URL, or a ``coredis.Redis`` client
            made with ``decode_responses=False`` (the default).
        prefix: Prepended to every key on the server; the tier tracks every key that starts
            with it, so give each tier its own prefix (one tier's prefix must not be the start
            of another's on the same server). ``str`` (UTF-8) or ``bytes``, not empty.
        ttl: The default ttl of values stored on the server: seconds or a timedelta.
        local_ttl: The most a value stays in the in-process cache; ``ttl`` by default.
        maxsize: The most entries the in-process cache holds (SIEVE eviction), or ``None``.
        serializer: Turns values into bytes and back: :class:`JSONSerializer` by default;
            :class:`PickleSerializer` for any picklable value (trusted servers only), or
            any object with ``dumps(value) -> bytes`` and ``loads(bytes) -> value``.
        keepalive: The listener proves its connection alive at least this often (seconds);
            a connection silent for this long is given up and L1 bypassed. Default 1 s.
        lock_timeout: If given, :meth:`get_or_load` is single-flight across processes too: a
            process that misses takes a lock on the server (``SET ... NX PX``) for at most this
            long while it loads, and the others wait for its value. ``None`` (the default):
            each process loads on its own (still single-flight within the process).

    Raises:
        TypeError: An argument has the wrong type (``redis`` is neither a URL nor a
            ``coredis.Redis``, ``serializer`` lacks ``dumps``/``loads``, ...).
        ValueError: A bad URL, an empty prefix, a non-positive duration or ``maxsize``, or a
            client that decodes responses or does not wait for replies.
        ImportError: coredis is not installed (``pip install 'darwin-metrics[redis]'``).
    """

    #: The in-process lookup: ``get_local(key, default=None)`` returns the value this process
    #: caches for ``key``, or ``default``; never any I/O, lock-free, not a checkpoint. It is the
    #: in-process :meth:`Cache.get <darwin_metrics.resource.Cache.get>` itself, so that a hit
    #: costs what a hit of a plain :class:`~darwin_metrics.resource.Cache` costs: it does not
    #: check the key's type (a key that is not ``str`` or ``bytes`` is never cached, so it
    #: misses; an unhashable one raises :exc:`TypeError`). The cache is empty while the
    #: listener is not listening and once the tier is closed, so a miss says nothing about
    #: the server.
    get_local: _LocalLookup[V]

    __slots__ = (
        "__weakref__",
        "_client",
        "_clock",
        "_connection",
        "_connects",
        "_disconnects",
        "_epoch",
        "_errors",
        "_fills",
        "_fills_refused",
        "_flights",
        "_flushes",
        "_invalidations",
        "_keepalive",
        "_l1",
        "_last_heard",
        "_listener_id",
        "_listener_scope",
        "_listening",
        "_loads",
        "_local_ttl",
        "_lock_px",
        "_owns_client",
        "_prefix",
        "_prefix_text",
        "_remote_hits",
        "_remote_misses",
        "_removals",
        "_serializer",
        "_state",
        "_task_group",
        "_thread",
        "_ttl",
        "_url",
        "_watches",
        "_writes",
        "get_local",
    )

    def __init__(
        self,
        redis: str | coredis.Redis[bytes],
        *,
        prefix: str | bytes,
        ttl: float | timedelta,
        local_ttl: float | timedelta | None = None,
        maxsize: int | None = None,
        serializer: Serializer[V] | None = None,
        keepalive: float | timedelta = 1.0,
        lock_timeout: float | timedelta | None = None,
    ) -> None:
        self._url: str | None = None
        self._client: coredis.Redis[bytes] | None = None
        if isinstance(redis, str):
            check_url(redis)
            import_coredis()  # fail now, not at the first use, if coredis is missing
            self._url = redis
        else:
            library = import_coredis()
            if isinstance(redis, library.RedisCluster):
                raise TypeError(
                    "RedisCache needs a coredis.Redis (one server), not a RedisCluster"
                )
            if not isinstance(redis, library.Redis):
                raise TypeError(
                    f"redis must be a URL or a coredis.Redis client, not {type(redis).__name__}"
                )
            if redis.decode_responses:
                raise ValueError(
                    "RedisCache stores bytes: make the client with decode_responses=False"
                )
            if redis.noreply:
                raise ValueError("RedisCache needs replies: make the client with noreply=False")
            self._client = redis
        self._owns_client = self._client is None
        if isinstance(prefix, str):
            prefix_bytes = prefix.encode("utf-8")
        elif isinstance(prefix, bytes):
            prefix_bytes = prefix
        else:
            raise TypeError(f"prefix must be str or bytes, not {type(prefix).__name__}")
        if not prefix_bytes:
            raise ValueError("prefix must not be empty: the tier tracks every key under it")
        self._prefix = prefix_bytes
        self._prefix_text = prefix
        seconds = duration(ttl, "ttl")
        assert seconds is not None
        self._ttl = seconds
        local = duration(local_ttl, "local_ttl", optional=True)
        self._local_ttl = seconds if local is None else local
        if serializer is None:
            serializer = cast("Serializer[V]", JSONSerializer())
        elif not (
            callable(getattr(serializer, "dumps", None))
            and callable(getattr(serializer, "loads", None))
        ):
            raise TypeError(
                "serializer must have dumps(value) -> bytes and loads(bytes) -> value methods, "
                f"not {type(serializer).__name__}"
            )
        self._serializer = serializer
        keep = duration(keepalive, "keepalive")
        assert keep is not None
        self._keepalive = keep
        lock = duration(lock_timeout, "lock_timeout", optional=True)
        self._lock_px = None if lock is None else milliseconds(lock)
        self._clock = time.monotonic
        # Cache validates maxsize (TypeError / ValueError).
        self._l1: Cache[Key, V] = Cache(self._local_ttl, maxsize=maxsize, clock=self._clock)
        self.get_local = self._l1.get

        self._state = _State.NEW
        self._thread: int | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._listener_scope: anyio.CancelScope | None = None
        self._connection: coredis.connection.BaseConnection | None = None
        self._errors: tuple[type[BaseException], type[BaseException]] | None = None
        self._listening = False
        self._epoch = 0
        self._last_heard = 0.0
        self._listener_id: int | None = None
        self._watches: dict[bytes, Watch] = {}
        self._flights: dict[bytes, Flight[V]] = {}
        self._remote_hits = 0
        self._remote_misses = 0
        self._fills = 0
        self._fills_refused = 0
        self._writes = 0
        self._removals = 0
        self._loads = 0
        self._invalidations = 0
        self._flushes = 0
        self._connects = 0
        self._disconnects = 0

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect, start the listener and return the tier, once it listens.

        A checkpoint. If it raises or is cancelled, nothing is left running (a client the tier
        made is closed again) and the tier cannot be entered again.

        Raises:
            RuntimeError: The tier was entered before.
            RedisUnavailableError: The server could not be reached, refused the connection,
                or did not answer within ``keepalive`` seconds.
            RedisCacheError: The server refused ``CLIENT TRACKING`` (it needs Redis 6 or
                Valkey, and a user allowed to run it).
        """
        if self._state is not _State.NEW:
            raise RuntimeError("a RedisCache can be entered only once")
        self._state = _State.OPENING
        library = import_coredis()
        self._errors = (library.exceptions.ConnectionError, library.exceptions.NoScriptError)
        self._thread = threading.get_ident()
        owned: coredis.Redis[bytes] | None = None
        group: anyio.abc.TaskGroup | None = None
        try:
            if self._client is None:
                assert self._url is not None
                owned = library.Redis.from_url(self._url, decode_responses=False)
                await owned.__aenter__()
                self._client = owned
            await self._load_scripts()
            group = anyio.create_task_group()
            await group.__aenter__()
            self._task_group = group
            await group.start(self._listen)
        except BaseException as exc:
            self._state = _State.CLOSED
            self._task_group = None
            with contextlib.suppress(Exception):
                if group is not None:
                    group.cancel_scope.cancel()
                    await group.__aexit__(None, None, None)
            with contextlib.suppress(Exception):
                if owned is not None:
                    await owned.__aexit__(None, None, None)
            if owned is not None:
                self._client = None
            if isinstance(exc, OSError | TimeoutError | library.exceptions.RedisError):
                raise self._unavailable("could not connect", exc) from exc
            raise
        self._state = _State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        """Stop the listener, clear L1, wait for pending lock releases, close an owned client.

        A checkpoint. Once it started, the tier is closed: its methods raise
        :exc:`RuntimeError` (``get_local`` misses).
        """
        if self._state is not _State.OPEN:
            raise RuntimeError("the RedisCache is not open")
        self._state = _State.CLOSED
        self._listening = False  # closing is not a disconnection
        self._set_listening(False)
        group = self._task_group
        assert group is not None
        if self._listener_scope is not None:
            self._listener_scope.cancel()
        for watch in list(self._watches.values()):
            watch.changed()  # lock waiters see the tier closed
        try:
            # Lock releases still pending run to their end (each bounded by a timeout).
            return await exit_task_group(group, exc_type, exc_val, exc_tb)
        finally:
            self._task_group = None
            if self._owns_client and self._client is not None:
                client, self._client = self._client, None
                await client.__aexit__(None, None, None)

    # -- lookups ------------------------------------------------------------------------------

    @overload
    async def get(self, key: Key) -> V | None: ...

    @overload
    async def get(self, key: Key, default: T) -> V | T: ...

    async def get(self, key: Key, default: T | None = None) -> V | T | None:
        """Return the value for ``key``, from this process's cache or from the server.

        A hit in the process's cache returns at once and is *not* a checkpoint. A miss reads
        the server (a checkpoint) and caches what it found in-process, unless the key was
        invalidated meanwhile. If it is cancelled, nothing changed.

        Args:
            key: A ``str`` (stored as UTF-8) or ``bytes`` key; ``"k"`` and ``b"k"`` are the
                same key on the server.
            default: Returned when the server holds no value for ``key``.

        Raises:
            TypeError: ``key`` is not ``str`` or ``bytes``.
            ValueError: ``key`` starts with a NUL character (reserved) or is not valid UTF-8.
            SerializationError: The server holds bytes that ``serializer`` cannot read.
            RedisUnavailableError: The server could not be reached.
            RuntimeError: The tier is not open, or is used from another thread.
        """
        try:
            value = self._l1.get(key, MISSING)
        except TypeError:
            self._raw(key)
            raise
        if value is not MISSING:
            return value
        raw = self._raw(key)
        self._check_open()
        found = await self._read(key, raw)
        return default if found is MISSING else found

    # -- writes -------------------------------------------------------------------------------

    async def set(self, key: Key, value: V, *, ttl: float | timedelta | None = None) -> None:
        """Store ``value`` for ``key`` on the server, then drop the key from this process's cache.

        A checkpoint. Other processes drop the key when the server's invalidation reaches
        them. The value is serialized first: if that fails, nothing is written. If the call
        raises or is cancelled after the value was sent, the server may or may not have stored
        it, and this process's cache has dropped the key either way.

        Args:
            key: A ``str`` or ``bytes`` key.
            value: The value; ``serializer`` must be able to write it.
            ttl: Its ttl on the server, in seconds or as a timedelta; the tier's by default.

        Raises:
            TypeError: ``key`` is not ``str`` or ``bytes``, or ``ttl`` is not a duration.
            ValueError: A reserved or non-UTF-8 key, or a non-positive ``ttl``.
            SerializationError: ``serializer`` cannot write ``value``; nothing was written.
            RedisUnavailableError: The server could not be reached.
            RuntimeError: The tier is not open, or is used from another thread.
        """
        raw = self._raw(key)
        px = self._px(ttl)
        self._check_open()
        data = self._dumps(value, key)
        client = self._client
        assert client is not None
        try:
            await self._command(client.set(raw, data, px=px))
            self._writes += 1
        finally:
            self._invalidate(raw)

    async def remove(self, key: Key) -> bool:
        """Delete ``key`` on the server, then drop it from this process's cache.

        A checkpoint; cancellation or an error leaves the key dropped from this process's
        cache, and deleted on the server or not.

        Returns:
            Whether the server held a value for ``key``.

        Raises:
            TypeError: ``key`` is not ``str`` or ``bytes``.
            ValueError: A reserved or non-UTF-8 key.
            RedisUnavailableError: The server could not be reached.
            RuntimeError: The tier is not open, or is used from another thread.
        """
        raw = self._raw(key)
        self._check_open()
        client = self._client
        assert client is not None
        try:
            removed = await self._command(client.delete([raw]))
            self._removals += 1
        finally:
            self._invalidate(raw)
        return bool(removed)

    def clear_local(self) -> None:
        """Drop every entry of this process's cache (the server keeps its values)."""
        self._epoch += 1  # reads in flight do not fill what was just cleared
        self._l1.clear()

    # -- single-flight loads ------------------------------------------------------------------

    async def get_or_load(
        self,
        key: Key,
        load: Callable[[], Awaitable[V]],
        *,
        ttl: float | timedelta | None = None,
    ) -> V:
        """Return the value for ``key``; if neither tier has one, load, store and return it.

        Single flight in this process: tasks asking for the same key meanwhile wait for one
        load (or one read of the server) and share its outcome; an :class:`Exception` raised
        by ``load`` reaches every one of them and nothing is stored. With ``lock_timeout``, it
        is single flight across processes as well: the process that misses first takes a lock
        on the server, the others wait until its value arrives (woken by the key's
        invalidation) or the lock expires, then read it.

        A loaded value is stored on the server unless another writer stored one meanwhile; in
        that case the stored value stands and is returned. It reaches this process's cache
        through the next read, like any other value.

        Checkpoints and cancellation: a hit in this process's cache returns at once and is
        *not* a checkpoint; anything else is. A cancelled waiter gets nothing and changes
        nothing. If the loading task is cancelled (or ``load`` raises a
        :class:`BaseException` that is not an :class:`Exception`), nothing is stored by it,
        its lock is released in the background, and a waiting task loads instead.

        Args:
            key: A ``str`` or ``bytes`` key.
            load: An async callable with no arguments that returns the value.
            ttl: The stored value's ttl on the server; the tier's by default.

        Raises:
            TypeError: ``key`` is not ``str`` or ``bytes``, ``load`` is not callable, or
                ``ttl`` is not a duration.
            ValueError: A reserved or non-UTF-8 key, or a non-positive ``ttl``.
            SerializationError: ``serializer`` cannot write the loaded value (nothing was
                stored) or read the server's.
            RedisUnavailableError: The server could not be reached.
            RuntimeError: The tier is not open or is used from another thread, or ``load``
                asked for the same key, which would wait for itself forever.
        """
        try:
            value = self._l1.get(key, MISSING)
        except TypeError:
            self._raw(key)
            raise
        if value is not MISSING:
            return value
        raw = self._raw(key)
        if not callable(load):
            raise TypeError(f"load must be callable, not {type(load).__name__}")
        px = self._px(ttl)
        self._check_open()
        me = anyio.get_current_task().id
        flights = self._flights
        while True:
            flight = flights.get(raw)
            if flight is None:
                break
            if flight.owner == me:
                raise RuntimeError(
                    f"get_or_load({key!r}) was called by the load() that is loading the same "
                    "key; it would wait for itself forever"
                )
            flight.waiters += 1
            await flight.event.wait()
            outcome = flight.outcome()
            if outcome is not MISSING:
                return outcome
            self._check_open()  # the loader gave up: maybe load in its place
        flight = flights[raw] = Flight(me)
        try:
            value = await self._read_or_load(key, raw, load, px)
        except Exception as exc:
            flight.fail(exc)
            raise
        else:
            flight.value = value
            flight.loaded = True
            return value
        finally:
            del flights[raw]
            flight.event.set()

    async def _read_or_load(
        self, key: Key, raw: bytes, load: Callable[[], Awaitable[V]], px: int
    ) -> V:
        lock_px = self._lock_px
        lock = self._prefix + _LOCK_MARK + raw[len(self._prefix) :]
        while True:
            watch = self._watch(raw)
            try:
                changes = watch.changes  # before the read: a change after it wakes us below
                value = await self._read(key, raw)
                if value is not MISSING:
                    return value
                if lock_px is None:
                    return await self._load_and_store(key, raw, load, px, None)
                token = secrets.token_hex(16).encode()
                state = await self._script(_scripts.ACQUIRE, (raw, lock), (token, lock_px))
                if state == _scripts.ACQUIRED:
                    return await self._load_and_store(key, raw, load, px, (lock, token))
                if state == _scripts.EXISTS:
                    continue  # stored meanwhile: read it
                wait = (lock_px if state < 0 else int(state)) / 1000 + 0.001
                if not self._listening:
                    wait = min(wait, _LOCK_POLL)
                if watch.changes == changes:
                    event = watch.event
                    if event is None:
                        event = watch.event = anyio.Event()
                    with anyio.move_on_after(wait):
                        await event.wait()
                self._check_open()
            finally:
                self._unwatch(raw, watch)

    async def _load_and_store(
        self,
        key: Key,
        raw: bytes,
        load: Callable[[], Awaitable[V]],
        px: int,
        lock: tuple[bytes, bytes] | None,
    ) -> V:
        try:
            value = await load()
            self._loads += 1
            data = self._dumps(value, key)
        except BaseException:
            if lock is not None:
                self._release_soon(*lock)
            raise
        if lock is None:
            keys: Sequence[bytes] = (raw,)
            args: Sequence[bytes | int] = (data, px)
        else:
            keys = (raw, lock[0])
            args = (data, px, lock[1])
        try:
            reply = await self._script(_scripts.STORE, keys, args)
        except BaseException:
            if lock is not None:
                self._release_soon(*lock)  # the script may not have run
            raise
        finally:
            self._invalidate(raw)
        if reply:
            return self._loads_value(cast("bytes", reply[0]), key)  # another writer's stands
        self._writes += 1
        return value

    # -- introspection ------------------------------------------------------------------------

    @property
    def prefix(self) -> str | bytes:
        """The prefix of every key on the server, as given."""
        return self._prefix_text

    @property
    def ttl(self) -> float:
        """The default ttl of values stored on the server, in seconds."""
        return self._ttl

    @property
    def local_ttl(self) -> float:
        """The most a value stays in this process's cache, in seconds."""
        return self._local_ttl

    @property
    def listening(self) -> bool:
        """Whether the listener hears the server now (otherwise L1 is bypassed)."""
        return self._listening

    def statistics(self) -> RedisCacheStatistics:
        """Return a snapshot of the tier's counters; see :class:`RedisCacheStatistics`."""
        return RedisCacheStatistics(
            local=self._l1.statistics(),
            remote_hits=self._remote_hits,
            remote_misses=self._remote_misses,
            fills=self._fills,
            fills_refused=self._fills_refused,
            writes=self._writes,
            removals=self._removals,
            loads=self._loads,
            invalidations=self._invalidations,
            flushes=self._flushes,
            connects=self._connects,
            disconnects=self._disconnects,
            listening=self._listening,
            listener_id=self._listener_id,
        )

    def __repr__(self) -> str:
        if self._state is _State.OPEN:
            state = "listening" if self._listening else "not listening (L1 bypassed)"
        else:
            state = self._state.value
        return (
            f"<darwin_metrics.redis.RedisCache prefix={self._prefix_text!r} at {id(self):#x}, "
            f"{state}, {len(self._l1)} local entries, ttl={self._ttl}s>"
        )

    # -- the listener -------------------------------------------------------------------------

    async def _listen(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Listen for invalidations for as long as the tier is open, reconnecting."""
        with anyio.CancelScope() as scope:
            self._listener_scope = scope
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
                    await self._listen_once(ready)
                except Exception as exc:
                    if not started:
                        raise self._unavailable("could not start listening", exc) from exc
                    _logger.warning(
                        "RedisCache %r: the invalidation listener stopped (%s); the local "
                        "cache is bypassed until it reconnects",
                        self._prefix_text,
                        describe(exc),
                    )
                await backoff.sleep()

    async def _listen_once(self, ready: Callable[[], None]) -> None:
        client = self._client
        assert client is not None
        connection = dedicated_connection(client, LISTENER_NAME)
        try:
            async with anyio.create_task_group() as group:
                with anyio.fail_after(self._keepalive):
                    await group.start(connection.run)
                    reply = await connection.create_request(
                        b"CLIENT TRACKING", b"ON", b"BCAST", b"PREFIX", self._prefix, decode=False
                    )
                if reply != b"OK":
                    raise RedisCacheError(f"CLIENT TRACKING answered {reply!r}")
                self._connection = connection
                self._listener_id = connection.client_id
                self._last_heard = anyio.current_time()
                self._set_listening(True)
                ready()
                group.start_soon(self._keep_alive, connection)
                await self._consume(connection)
        finally:
            self._set_listening(False)
            self._connection = None
            self._listener_id = None
            connection.invalidate()
            close_buffers(connection)

    async def _consume(self, connection: coredis.connection.BaseConnection) -> None:
        messages = connection.push_messages
        async with contextlib.aclosing(messages):
            async for message in messages:
                self._last_heard = anyio.current_time()
                if len(message) == 2 and message[0] == b"invalidate":
                    keys = message[1]
                    if keys is None:
                        self._flush()
                    elif isinstance(keys, list):
                        for raw in keys:
                            if isinstance(raw, bytes):
                                self._invalidations += 1
                                self._invalidate(raw)
        raise import_coredis().exceptions.ConnectionError("the invalidation stream ended")

    async def _keep_alive(self, connection: coredis.connection.BaseConnection) -> None:
        half = self._keepalive / 2
        while True:
            await anyio.sleep_until(self._last_heard + half)
            now = anyio.current_time()
            if now < self._last_heard + half:
                continue  # a push arrived meanwhile
            answered = False
            with anyio.move_on_after(max(self._last_heard + self._keepalive - now, 0.0)):
                await connection.create_request(b"PING", decode=False)
                answered = True
            if not answered:
                raise _ListenerSilent(f"no answer to PING within {self._keepalive} s")
            self._last_heard = anyio.current_time()

    def _set_listening(self, listening: bool) -> None:
        """The listener started or stopped hearing the server: start L1 afresh."""
        if listening:
            self._connects += 1
        elif self._listening:
            self._disconnects += 1
        self._listening = listening
        self._epoch += 1
        self._l1.clear()
        for watch in list(self._watches.values()):
            watch.invalidations += 1
            watch.changed()

    def _flush(self) -> None:
        self._flushes += 1
        self._epoch += 1
        self._l1.clear()
        for watch in list(self._watches.values()):
            watch.invalidations += 1
            watch.changed()

    def _invalidate(self, raw: bytes) -> None:
        """``raw`` changed on the server (or this process changed it): drop it from L1."""
        prefix = self._prefix
        if not raw.startswith(prefix):
            return
        suffix = raw[len(prefix) :]
        if suffix.startswith(_LOCK_MARK):
            # A load lock was taken, released or expired: wake whoever waits for it.
            watch = self._watches.get(prefix + suffix[len(_LOCK_MARK) :])
            if watch is not None:
                watch.changed()
            return
        watch = self._watches.get(raw)
        if watch is not None:
            watch.invalidations += 1
            watch.changed()
        l1 = self._l1
        l1.remove(suffix)
        try:
            text = suffix.decode("utf-8")
        except UnicodeDecodeError:
            return
        l1.remove(text)

    # -- helpers ------------------------------------------------------------------------------

    def _raw(self, key: object) -> bytes:
        """The server's name for ``key``; validates it."""
        if isinstance(key, str):
            try:
                suffix = key.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"key {key!r} cannot be encoded as UTF-8: {exc.reason}") from None
        elif isinstance(key, bytes):
            suffix = key
        else:
            raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
        if suffix[:1] == b"\x00":
            raise ValueError(
                f"key {key!r} starts with a NUL character, which the tier reserves for its "
                "load locks"
            )
        return self._prefix + suffix

    def _px(self, ttl: object) -> int:
        if ttl is None:
            return milliseconds(self._ttl)
        seconds = duration(ttl, "ttl")
        assert seconds is not None
        return milliseconds(seconds)

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            if self._state is _State.CLOSED:
                raise RuntimeError("the RedisCache is closed")
            raise RuntimeError("the RedisCache is not open: use it inside `async with cache:`")
        if threading.get_ident() != self._thread:
            raise RuntimeError(
                "a RedisCache belongs to the event loop (and thread) that entered it"
            )

    def _watch(self, raw: bytes) -> Watch:
        watch = self._watches.get(raw)
        if watch is None:
            watch = self._watches[raw] = Watch()
        watch.users += 1
        return watch

    def _unwatch(self, raw: bytes, watch: Watch) -> None:
        watch.users -= 1
        if not watch.users and self._watches.get(raw) is watch:
            del self._watches[raw]

    async def _read(self, key: Key, raw: bytes) -> V | Literal[Sentinel.MISSING]:
        """Read ``raw`` from the server; cache the value in L1 if the race guard allows."""
        watch = self._watch(raw)
        try:
            epoch = self._epoch if self._listening else -1
            seen = watch.invalidations
            sent = self._clock()
            data, pttl = await self._get_with_ttl(raw)
            if data is None:
                self._remote_misses += 1
                return MISSING
            value = self._loads_value(data, key)
            self._remote_hits += 1
            if epoch == self._epoch and seen == watch.invalidations:
                ttl = self._local_ttl
                if pttl >= 0:
                    ttl = min(ttl, pttl / 1000 - (self._clock() - sent))
                if ttl > 0:
                    self._l1.set(key, value, ttl=ttl)
                    self._fills += 1
                    return value
            self._fills_refused += 1
            return value
        finally:
            self._unwatch(raw, watch)

    async def _load_scripts(self) -> None:
        client = self._client
        assert client is not None
        for script in (_scripts.ACQUIRE, _scripts.STORE, _scripts.RELEASE):
            await client.script_load(script.source)

    async def _get_with_ttl(self, raw: bytes) -> tuple[bytes | None, int]:
        """``GET`` and ``PTTL`` of ``raw``, sent together on one pooled connection.

        One round trip, like a ``GET``: the two commands go out back to back, as coredis sends
        a non-blocking command (take a connection, queue the request, release the connection,
        await the reply). Another client's write may land between them; its invalidation then
        reaches the race guard, so the pair never fills L1 with a mismatched ttl. One retry if
        the pooled connection turns out to be dead (as coredis's own default policy does).
        """
        client = self._client
        assert client is not None
        assert self._errors is not None
        unavailable = self._errors[0]
        pool = client.connection_pool
        for attempt in (1, 2):
            try:
                connection = await pool.get_connection()
                try:
                    value = connection.create_request(b"GET", raw, decode=False)
                    ttl = connection.create_request(b"PTTL", raw, decode=False)
                finally:
                    pool.release(connection)
                data = await value
                pttl = await ttl
            except unavailable as exc:
                if attempt == 2:
                    raise self._unavailable("lost the connection reading a key", exc) from exc
                continue
            return (data if isinstance(data, bytes) else None), (
                pttl if isinstance(pttl, int) else -1
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _script(
        self, script: _scripts.Script, keys: Sequence[bytes], args: Sequence[bytes | int]
    ) -> Any:
        client = self._client
        assert client is not None
        assert self._errors is not None
        unavailable, no_script = self._errors
        try:
            try:
                return await client.evalsha(script.sha, keys=keys, args=args)
            except no_script:
                return await client.eval(script.source, keys=keys, args=args)
        except unavailable as exc:
            raise self._unavailable(f"lost the connection running {script.name}", exc) from exc

    async def _command(self, request: Awaitable[T]) -> T:
        assert self._errors is not None
        try:
            return await request
        except self._errors[0] as exc:
            raise self._unavailable("lost the connection", exc) from exc

    def _release_soon(self, lock: bytes, token: bytes) -> None:
        """Release a load lock from a background task (this may run in a cancelled task)."""
        group = self._task_group
        if group is not None:
            group.start_soon(self._release, lock, token)

    async def _release(self, lock: bytes, token: bytes) -> None:
        try:
            with anyio.fail_after(_RELEASE_TIMEOUT):
                await self._script(_scripts.RELEASE, (lock,), (token,))
        except Exception as exc:
            _logger.info("RedisCache could not release a load lock (%s); it will expire", exc)

    def _dumps(self, value: V, key: Key) -> bytes:
        try:
            data = self._serializer.dumps(value)
        except Exception as exc:
            raise SerializationError(
                f"{self._serializer!r} cannot serialize the value for key {key!r} "
                f"({type(value).__name__}): {exc}; nothing was written"
            ) from exc
        if not isinstance(data, bytes):
            raise SerializationError(
                f"{self._serializer!r}.dumps() returned {type(data).__name__}, not bytes; "
                "nothing was written"
            )
        return data

    def _loads_value(self, data: bytes, key: Key) -> V:
        try:
            return self._serializer.loads(data)
        except Exception as exc:
            raise SerializationError(
                f"{self._serializer!r} cannot read the {len(data)} bytes stored for key "
                f"{key!r}: {exc}"
            ) from exc

    def _unavailable(self, doing: str, exc: BaseException) -> RedisUnavailableError:
        where = self._url
        if where is None and self._client is not None:
            where = str(self._client.connection_pool.location)
        return RedisUnavailableError(f"RedisCache {doing} to {where}: {describe(exc)}")
