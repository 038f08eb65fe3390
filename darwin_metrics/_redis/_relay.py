"""The usage relay: a :class:`~darwin_metrics.resource.ResourceManager`'s usages shared with
other processes through one Valkey/Redis stream.

How it works:

- **Publishing.** The manager calls the relay's hook with every usage it tracks (synchronously,
  in the tracking call); the hook numbers it (a per-relay sequence, from 1) and queues it. A
  publisher task sends what is queued on a connection of its own, in pipelined calls of a
  small Lua script that runs one ``XADD prefix:usage MAXLEN ~ N * ...`` per usage (plain
  ``XADD`` commands if the server refuses scripts), and forgets the usages only once the
  server acknowledged them. If the connection fails, the batch is sent again on a new one: a
  usage may then be in the stream twice, which readers recognize by its sequence number.
  While idle, it appends a *tick* (its last sequence number, no usage) every ``keepalive``.
- **Receiving.** A reader task on another connection runs ``XREAD BLOCK`` from the last entry
  it read, skips its own relay's entries, and hands each other entry to the manager, which
  sends it to the subscribers as tracking does (the same overflow policies) and records it in
  the statistics of its source. A ``"wait"`` subscriber without room makes it wait; if that
  wait is cancelled (the connection dropped, the relay stops) the usage stays reserved for
  that subscriber. After a reconnection it resumes from its last entry; if the stream is
  behind that entry (the server restarted empty, or the key was deleted) it reads the stream
  from its start, and the sequence numbers filter what it had already delivered.
- **Counting what was lost.** Each publisher's entries carry consecutive sequence numbers, so
  a reader knows how many it did not get (trimmed by ``MAXLEN`` while it lagged, lost by a
  server restart, dropped by a publisher whose queue overflowed while the server was down):
  the gap, counted as ``missed`` by every subscription. The server's own lag figures are not
  used (Redis 7.0 and Valkey 9 report them differently after trimming). A gap at the end of
  a burst shows at the publisher's next usage, its next tick, or its goodbye: when a relay
  stops it sends what is still queued and a goodbye carrying its last sequence number.
- **Where counting starts.** A relay reads from the end of the stream as it was when it
  started (its *start position*); every entry carries its publisher's start position. A
  publisher that started at or after the reader is counted from its first usage. For one
  already running, the reader reads the stream's latest entries before its start position
  (up to 1,000) to learn where each stood; one not found there is counted from the first of
  its entries the reader gets.

Everything that changes the relay's state between two awaits is synchronous, so a native
asyncio cancellation at any await leaves it consistent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final, final
from urllib.parse import urlparse, urlunparse

import anyio
import anyio.abc
import attrs
from anyio.lowlevel import checkpoint

from .._errors import RedisUnavailableError, UsageRelayError
from .._lowlevel import Parker
from .._manager._usage import ResourceUsage
from . import _scripts
from ._support import (
    Backoff,
    check_url,
    close_buffers,
    dedicated_connection,
    describe,
    duration,
    import_coredis,
)

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    import coredis
    import coredis.connection

    from .._manager._manager import ResourceManager

__all__ = ["PUBLISHER_NAME", "READER_NAME", "RelayStatistics", "UsageRelay", "start_relay"]

_logger = logging.getLogger("darwin_metrics")

#: The names the relay's connections give themselves (``CLIENT LIST`` shows them).
READER_NAME: Final = "darwin-metrics-relay-reader"
PUBLISHER_NAME: Final = "darwin-metrics-relay-publisher"
#: Entries per ``XREAD`` reply, and ``XADD`` commands per pipelined batch, at most.
_BATCH: Final = 1000
#: Entries read back from the start position when a relay starts, at most (see _look_back).
_LOOK_BACK: Final = 1000
#: Publishers that said goodbye, remembered so that re-reading the stream never delivers
#: their usages twice.
_GONE_MAX: Final = 10_000

#: The longest a queued usage waits for more to join its batch, in seconds.
_GATHER: Final = 0.002
#: Usages per call of the publishing script, at most.
_PER_SCRIPT: Final = 100
#: Resource type names decoded once and kept, at most.
_TYPES_MAX: Final = 10_000
_INFINITY: Final = float("inf")

#: The relay of each manager that has one running (one at a time: two relays of one manager on
#: one stream would deliver each other's usages, the manager's own, back to it).
_relays: weakref.WeakKeyDictionary[ResourceManager, UsageRelay] = weakref.WeakKeyDictionary()

# The fields of an entry, in the order the relay writes them (the publishing script too).
_PUBLISHER: Final = b"publisher"
_SEQ: Final = b"seq"
_TYPE: Final = b"type"
_USAGE: Final = b"usage"
_TIME: Final = b"time"
_BYE: Final = b"bye"
_TICK: Final = b"tick"
_SOURCE: Final = b"source"
_HOST: Final = b"host"
_SINCE: Final = b"since"
#: A usage: ``publisher ID seq N type T usage U time W source S host H since X``.
_USAGE_FIELDS: Final = [_PUBLISHER, _SEQ, _TYPE, _USAGE, _TIME, _SOURCE, _HOST, _SINCE]
#: A goodbye: ``publisher ID seq LAST bye 1 source S host H since X``.
_BYE_FIELDS: Final = [_PUBLISHER, _SEQ, _BYE, _SOURCE, _HOST, _SINCE]
#: Where an idle publisher stands: ``publisher ID seq LAST tick 1 source S host H since X``.
_TICK_FIELDS: Final = [_PUBLISHER, _SEQ, _TICK, _SOURCE, _HOST, _SINCE]


def _position(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id (``b"1700000000000-3"``) as a tuple that compares as the server does."""
    ms, _, sequence = entry_id.partition(b"-")
    return int(ms), int(sequence or b"0")


class _ConnectionLostError(ConnectionError):
    """The server closed one of the relay's connections."""


async def _run_until_lost(
    connection: coredis.connection.BaseConnection,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    await connection.run(task_status=task_status)
    # run() returns quietly when an established connection drops: say so.
    raise _ConnectionLostError("the server closed the connection")


@contextlib.asynccontextmanager
async def _connected(
    client: coredis.Redis[bytes], name: str, timeout: float
) -> AsyncIterator[coredis.connection.BaseConnection]:
    """A connection of the relay's own for the block; the block is cancelled if it drops."""
    connection = dedicated_connection(client, name)
    try:
        async with anyio.create_task_group() as group:
            with anyio.fail_after(timeout):
                await group.start(_run_until_lost, connection)
            yield connection
            group.cancel_scope.cancel()
    finally:
        connection.invalidate()
        close_buffers(connection)


class _Peer:
    """What a reader knows of another relay: its source and the last sequence number read."""

    __slots__ = ("seq", "source")

    def __init__(self, source: str, seq: int) -> None:
        self.source = source
        self.seq = seq


@attrs.frozen
class RelayStatistics:
    """A snapshot of a :class:`UsageRelay`'s counters, from :meth:`UsageRelay.statistics`.

    Attributes:
        published: This manager's usages the server acknowledged.
        pending: This manager's usages queued for the server and not acknowledged yet.
        dropped: This manager's usages dropped from the queue because it held
            ``max_pending`` while the server was unreachable (other relays count them missed).
        received: Other processes' usages delivered to this manager's subscribers.
        missed: Other processes' usages that this relay knows it could not read (gaps in
            their sequence numbers); each was counted in every open subscription's ``missed``.
        duplicates: Entries read a second time (a publisher sent a batch again after a
            connection failed, or the stream was read again after a restart) and skipped.
        ignored: Entries in the stream that are not a relay's (another program's) and skipped.
        publishers: Other relays heard from that have not said goodbye.
        connects: Times one of the relay's two connections was established.
        disconnects: Times one of them was lost or given up as silent.
        resets: Times the stream turned out to be behind the last entry read (the server
            restarted empty, or the key was deleted), so that reading started over from its
            beginning.
        connected: Whether the connections the relay needs are up now.
        last_id: The id of the last stream entry read (``"0-0"`` before the first).
    """

    published: int
    pending: int
    dropped: int
    received: int
    missed: int
    duplicates: int
    ignored: int
    publishers: int
    connects: int
    disconnects: int
    resets: int
    connected: bool
    last_id: str


@final
class UsageRelay:
    """A :class:`~darwin_metrics.resource.ResourceManager`'s link to other processes' usages.

    Made and started by :meth:`ResourceManager.relay
    <darwin_metrics.resource.ResourceManager.relay>`, which documents the options. It runs in
    the manager's task group until the manager exits, :meth:`cancel` or :meth:`aclose`.

    **Delivery model.** Every usage that a relay's manager tracks is appended to the stream
    ``prefix + "usage"`` at least once (a batch interrupted by a dropped connection is sent
    again), in tracking order, unless it was dropped from the relay's queue (``max_pending``)
    while the server was unreachable. Every other relay on the same stream delivers it to its
    own manager's subscribers at most once, in each publisher's order (the sequence numbers
    weed out the copies), with :attr:`ResourceUsage.source
    <darwin_metrics.resource.ResourceUsage.source>` set; usages of different publishers
    interleave as the server received them. A usage that a reader could not read (trimmed by
    ``MAXLEN ~`` while it lagged by more than about ``maxlen`` entries, lost by a server
    restart, dropped by its publisher) is counted in the ``missed`` of every subscription open
    when the reader notices the gap, at the publisher's next entry (a usage, a tick within
    ``keepalive`` while it is idle, or its goodbye); so for each subscriber ``received +
    missed`` equals what was published while it was subscribed. Exceptions: a publisher already
    running when this relay started and not among the stream's last 1,000 entries then is
    counted from the first of its entries this relay reads; the usages of a publisher that was
    killed (no goodbye, no more ticks) after the last entry of it that was read are not
    counted. A ``"wait"`` subscriber whose buffer is full makes the reader wait, so the stream
    may be trimmed meanwhile: the trimmed usages count as missed, for every subscriber. A
    usage's trip takes under a millisecond on one host (``benchmarks/RESULTS.md``).

    The relay's own connections are ``darwin-metrics-relay-publisher`` and
    ``darwin-metrics-relay-reader`` in ``CLIENT LIST``.
    """

    __slots__ = (
        "__weakref__",
        "_busy",
        "_client",
        "_connects",
        "_disconnects",
        "_dropped",
        "_duplicates",
        "_error",
        "_gone",
        "_hook",
        "_host",
        "_id",
        "_ignored",
        "_inflight",
        "_keepalive",
        "_key",
        "_last_id",
        "_manager",
        "_max_pending",
        "_maxlen",
        "_missed",
        "_outbox",
        "_parker",
        "_peers",
        "_publish_enabled",
        "_published",
        "_publisher_up",
        "_reader_up",
        "_ready",
        "_receive_enabled",
        "_received",
        "_resets",
        "_scope",
        "_script",
        "_seq",
        "_since",
        "_source",
        "_state",
        "_stopped",
        "_types",
        "_warned_script",
        "_where",
    )

    def __init__(
        self,
        manager: ResourceManager,
        redis: str | coredis.Redis[bytes],
        *,
        prefix: str | bytes,
        source: str | None,
        maxlen: int,
        publish: bool,
        receive: bool,
        keepalive: float | timedelta,
        max_pending: int,
    ) -> None:
        if isinstance(redis, str):
            check_url(redis)
            library = import_coredis()
            self._client: coredis.Redis[bytes] = library.Redis.from_url(
                redis, decode_responses=False
            )
            self._where = _without_password(redis)
        else:
            library = import_coredis()
            if isinstance(redis, library.RedisCluster):
                raise TypeError("the relay needs a coredis.Redis (one server), not a RedisCluster")
            if not isinstance(redis, library.Redis):
                raise TypeError(
                    f"redis must be a URL or a coredis.Redis client, not {type(redis).__name__}"
                )
            if redis.decode_responses:
                raise ValueError(
                    "the relay reads bytes: make the client with decode_responses=False"
                )
            self._client = redis
            self._where = str(redis.connection_pool.location)
        if isinstance(prefix, str):
            prefix_bytes = prefix.encode("utf-8")
        elif isinstance(prefix, bytes):
            prefix_bytes = prefix
        else:
            raise TypeError(f"prefix must be str or bytes, not {type(prefix).__name__}")
        if not prefix_bytes:
            raise ValueError("prefix must not be empty")
        self._key = prefix_bytes + b"usage"
        if source is None:
            source = f"{socket.gethostname()}/{os.getpid()}"
        elif not isinstance(source, str):
            raise TypeError(f"source must be a str or None, not {type(source).__name__}")
        elif not source:
            raise ValueError("source must not be empty")
        self._source = source
        self._maxlen = _positive_int("maxlen", maxlen)
        self._max_pending = _positive_int("max_pending", max_pending)
        for name, flag in (("publish", publish), ("receive", receive)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        if not (publish or receive):
            raise ValueError("a relay that neither publishes nor receives does nothing")
        self._publish_enabled = publish
        self._receive_enabled = receive
        seconds = duration(keepalive, "keepalive")
        assert seconds is not None
        self._keepalive = seconds

        self._manager = manager
        self._id = secrets.token_hex(8).encode()
        self._host = socket.gethostname()
        self._scope = anyio.CancelScope()
        self._ready = anyio.Event()
        self._stopped = anyio.Event()
        self._state = "starting"  # "running", then "stopping" and "stopped"
        self._error: BaseException | None = None
        # The start position: the stream's last id when the relay started.
        self._since: bytes | None = None
        # Publishing: numbered usages queued, and the batch the server has not acknowledged.
        self._seq = 0
        self._outbox: deque[tuple[int, ResourceUsage]] = deque()
        self._inflight: list[tuple[int, ResourceUsage]] = []
        self._parker: Parker | None = None
        self._busy = False  # usages were queued while the last batch was on its way
        # The bound method, made once: the manager tells its hooks apart by identity.
        self._hook = self._publish
        self._script: bytes | None = None  # the publishing script's SHA1, if the server has it
        self._warned_script = False
        # Receiving.
        self._last_id = b"0-0"
        self._peers: dict[bytes, _Peer] = {}
        self._gone: OrderedDict[bytes, None] = OrderedDict()
        self._types: dict[bytes, str] = {}
        self._reader_up = False
        self._publisher_up = False
        self._published = 0
        self._dropped = 0
        self._received = 0
        self._missed = 0
        self._duplicates = 0
        self._ignored = 0
        self._connects = 0
        self._disconnects = 0
        self._resets = 0

    # -- the public surface -------------------------------------------------------------------

    @property
    def source(self) -> str:
        """This process's name on the usages it publishes.

        Their :attr:`~darwin_metrics.resource.ResourceUsage.source` in other processes.
        """
        return self._source

    @property
    def publisher_id(self) -> str:
        """This relay's own id in the stream's entries (random, unique to this relay)."""
        return self._id.decode()

    @property
    def stream(self) -> bytes:
        """The stream's key on the server: ``prefix + b"usage"``."""
        return self._key

    @property
    def server(self) -> str:
        """The server's address (``host:port`` or the socket's path), without credentials."""
        return str(self._client.connection_pool.location)

    @property
    def connected(self) -> bool:
        """Whether the connections the relay needs (to publish, to receive) are up now."""
        return self._state == "running" and (
            (self._publisher_up or not self._publish_enabled)
            and (self._reader_up or not self._receive_enabled)
        )

    @property
    def running(self) -> bool:
        """Whether the relay runs (it stops with the manager, or by :meth:`cancel`)."""
        return self._state == "running"

    def statistics(self) -> RelayStatistics:
        """Return a snapshot of the relay's counters; see :class:`RelayStatistics`."""
        return RelayStatistics(
            published=self._published,
            pending=len(self._outbox) + len(self._inflight),
            dropped=self._dropped,
            received=self._received,
            missed=self._missed,
            duplicates=self._duplicates,
            ignored=self._ignored,
            publishers=len(self._peers),
            connects=self._connects,
            disconnects=self._disconnects,
            resets=self._resets,
            connected=self.connected,
            last_id=self._last_id.decode(),
        )

    def cancel(self) -> None:
        """Stop the relay, without waiting. Not a checkpoint; idempotent.

        No usage tracked from now on is published, and none is delivered any more. In the
        background, within the manager's task group, the relay sends what is still queued
        and its goodbye (for at most ``keepalive`` seconds), then closes its connections.
        """
        self._manager._remove_publisher(self._hook)
        if self._state in ("starting", "running"):
            self._state = "stopping"
        self._scope.cancel()

    async def aclose(self) -> None:
        """Stop the relay (as :meth:`cancel`) and wait until it has stopped.

        Checkpoint: yes. Cancellation: the relay stops all the same, in the background; only
        the waiting is cancelled.
        """
        self.cancel()
        await self._stopped.wait()

    def __repr__(self) -> str:
        state = self._state
        if state == "running" and not self.connected:
            state = "running, reconnecting"
        return (
            f"<darwin_metrics.redis.UsageRelay {self._source!r} at {id(self):#x}, {state}, "
            f"stream={self._key.decode(errors='replace')!r}, {self._published} published, "
            f"{self._received} received, {self._missed} missed>"
        )

    # -- the hook -----------------------------------------------------------------------------

    def _publish(self, event: ResourceUsage) -> None:
        """The manager's publish hook: number ``event`` and queue it (sync, never raises)."""
        self._seq += 1
        outbox = self._outbox
        outbox.append((self._seq, event))
        if len(outbox) > self._max_pending:
            outbox.popleft()
            self._dropped += 1
        parker = self._parker
        if parker is not None:
            parker.wake()

    # -- running ------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as group:
                    try:
                        # The first connection to come up reads the start position.
                        if self._receive_enabled:
                            await group.start(self._read_loop)
                        if self._publish_enabled:
                            await group.start(self._publish_loop)
                    except Exception as exc:
                        self._error = exc
                        group.cancel_scope.cancel()
                        return
                    if self._state == "starting":
                        self._state = "running"
                        if self._publish_enabled:
                            self._manager._add_publisher(self._hook)
                    self._ready.set()
        finally:
            self._manager._remove_publisher(self._hook)
            if _relays.get(self._manager) is self:
                del _relays[self._manager]
            self._state = "stopped"
            self._reader_up = self._publisher_up = False
            self._ready.set()
            self._stopped.set()

    async def _stream_position(self, connection: coredis.connection.BaseConnection) -> bytes:
        """The id of the stream's last entry ever (``b"0-0"`` if there is no stream)."""
        library = import_coredis()
        try:
            info = await connection.create_request(b"XINFO", b"STREAM", self._key, decode=False)
        except library.exceptions.WrongTypeError as exc:
            raise UsageRelayError(
                f"the usage relay's key {self._key.decode(errors='replace')!r} on {self._where} "
                f"holds something other than a stream ({exc}): give the relay another prefix"
            ) from exc
        except library.exceptions.ResponseError as exc:
            if "no such key" in str(exc).lower():
                return b"0-0"
            raise UsageRelayError(
                f"the server {self._where} refused XINFO STREAM {self._key!r}: {exc}"
            ) from exc
        last = info.get(b"last-generated-id") if isinstance(info, dict) else None
        if not isinstance(last, bytes):
            raise UsageRelayError(f"XINFO STREAM {self._key!r} answered without an id: {info!r}")
        return last

    def _log_stop(self, side: str, exc: BaseException) -> None:
        _logger.warning(
            "usage relay %r: the %s connection to %s stopped (%s); reconnecting",
            self._source,
            side,
            self._where,
            describe(exc),
        )

    # -- receiving ----------------------------------------------------------------------------

    async def _read_loop(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        backoff = Backoff()
        started = False
        while True:
            try:
                async with _connected(self._client, READER_NAME, self._keepalive) as connection:
                    with anyio.fail_after(self._keepalive):
                        position = await self._stream_position(connection)
                    if not started:
                        if self._since is None:
                            self._since = position
                        self._last_id = position
                        if position != b"0-0":
                            with anyio.fail_after(self._keepalive):
                                await self._look_back(connection, position)
                    elif _position(position) < _position(self._last_id):
                        self._last_id = b"0-0"  # the stream started afresh: read all of it
                        self._resets += 1
                    self._reader_up = True
                    self._connects += 1
                    if not started:
                        started = True
                        task_status.started()
                    backoff.reset()
                    await self._read_forever(connection)
            except Exception as exc:
                if not started:
                    raise
                self._log_stop("reader", exc)
            finally:
                if self._reader_up:
                    self._reader_up = False
                    self._disconnects += 1
            await backoff.sleep()

    async def _look_back(
        self, connection: coredis.connection.BaseConnection, position: bytes
    ) -> None:
        """Learn where the publishers already running stand at this relay's start position.

        Each one's last sequence number before it (from the stream's latest entries, up to
        ``_LOOK_BACK`` of them) is where counting its usages starts, so that even one whose
        next usages are trimmed before this relay reads any of them is counted exactly.
        """
        count = min(self._maxlen, _LOOK_BACK)
        request = connection.create_request(
            b"XREVRANGE", self._key, position, b"-", b"COUNT", count, decode=False
        )
        entries: Any = await request
        peers = self._peers
        for _entry_id, fields in entries or ():
            try:
                publisher = fields[1]
                if publisher in peers or publisher in self._gone or publisher == self._id:
                    continue  # only its latest entry counts
                names = fields[0::2]
                if names in (_USAGE_FIELDS, _TICK_FIELDS):
                    peers[publisher] = _Peer(fields[-5].decode(), int(fields[3]))
                elif names == _BYE_FIELDS:
                    self._forget(publisher)
            except (TypeError, ValueError, IndexError, AttributeError, UnicodeDecodeError):
                continue

    async def _read_forever(self, connection: coredis.connection.BaseConnection) -> None:
        """Read batches of entries and deliver each batch before reading the next."""
        key = self._key
        block = max(1, round(self._keepalive * 500))  # the server answers every keepalive / 2
        timeout = self._keepalive
        while True:
            with anyio.fail_after(timeout):  # a silent server is given up
                reply: Any = await connection.create_request(
                    b"XREAD",
                    b"COUNT",
                    _BATCH,
                    b"BLOCK",
                    block,
                    b"STREAMS",
                    key,
                    self._last_id,
                    decode=False,
                )
            if not reply:
                continue
            # RESP3 answers {key: entries}; RESP2 [[key, entries]].
            entries = reply.get(key) if isinstance(reply, dict) else reply[0][1]
            if entries:
                await self._deliver(entries)

    async def _deliver(self, entries: Sequence[Any]) -> None:
        """Hand the entries of one ``XREAD`` reply to the manager, in order.

        A delivery that waits for room in a ``"wait"`` subscriber's buffer keeps the usage
        reserved for it if the wait is cancelled (the connection dropped, the relay stops):
        the subscriber gets it in its turn, and reading resumes after it.
        """
        manager = self._manager
        own = self._id
        peers = self._peers
        types = self._types
        arrived = anyio.current_time()
        for entry_id, fields in entries:
            self._last_id = entry_id
            try:
                publisher = fields[1]
                if publisher == own and fields[0] == _PUBLISHER:
                    continue
                names = fields[0::2]
                if names == _USAGE_FIELDS:
                    mark = None
                elif names in (_TICK_FIELDS, _BYE_FIELDS):
                    mark = names[2]
                else:
                    self._ignored += 1
                    continue
                seq = int(fields[3])
                peer = peers.get(publisher)
                if peer is None:
                    if publisher in self._gone:
                        self._duplicates += 1
                        continue
                    peer = self._meet(publisher, fields, seq, mark is not None)
                if mark is None:
                    raw = fields[5]
                    name = types.get(raw)
                    if name is None:
                        name = raw.decode()
                        if len(types) < _TYPES_MAX:
                            types[raw] = name
                    usage = float(fields[7])
                    if not 0.0 <= usage < _INFINITY:
                        raise ValueError(f"not a usage: {usage}")
                    event = ResourceUsage(name, usage, arrived, float(fields[9]), peer.source)
            except (TypeError, ValueError, IndexError, AttributeError, UnicodeDecodeError):
                self._ignored += 1
                continue
            if mark is not None:
                self._catch_up(peer, seq)
                if mark == _BYE:
                    self._part(publisher, peer)
                continue
            if seq <= peer.seq:
                self._duplicates += 1
                continue
            gap = seq - peer.seq - 1
            peer.seq = seq
            if gap:
                self._missed += gap
                manager._count_missed(gap)
            self._received += 1
            blocked = manager._receive_nowait(event)
            if blocked is not None:
                await manager._deliver_blocked(event, blocked, withdraw=False)

    def _meet(self, publisher: bytes, fields: list[Any], seq: int, marker: bool) -> _Peer:
        """A publisher heard from for the first time: where does its count start?

        ``marker``: the entry is a tick or a goodbye (``seq`` is its last usage), not a usage.
        """
        if not isinstance(publisher, bytes):
            raise TypeError("the publisher's id is not a string")
        source = fields[-5].decode()
        since = self._since
        assert since is not None
        # One that started after this relay did: all of its usages are ours to count. One that
        # was running before: count from this one.
        start = 0 if _position(fields[-1]) >= _position(since) else seq if marker else seq - 1
        peer = self._peers[publisher] = _Peer(source, start)
        return peer

    def _catch_up(self, peer: _Peer, last: int) -> None:
        """A tick or goodbye says ``peer``'s last usage is ``last``: count what we did not get."""
        gap = last - peer.seq
        if gap > 0:
            peer.seq = last
            self._missed += gap
            self._manager._count_missed(gap)

    def _part(self, publisher: bytes, peer: _Peer) -> None:
        """A publisher's goodbye: forget it (and its source's statistics, if it was the last)."""
        del self._peers[publisher]
        self._forget(publisher)
        if all(other.source != peer.source for other in self._peers.values()):
            self._manager.forget_source(peer.source)

    def _forget(self, publisher: bytes) -> None:
        """Remember that ``publisher`` said goodbye (its copies are skipped from now on)."""
        self._gone[publisher] = None
        if len(self._gone) > _GONE_MAX:
            self._gone.popitem(last=False)

    # -- publishing ---------------------------------------------------------------------------

    async def _publish_loop(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        backoff = Backoff()
        started = False
        try:
            while True:
                try:
                    async with _connected(
                        self._client, PUBLISHER_NAME, self._keepalive
                    ) as connection:
                        with anyio.fail_after(self._keepalive):
                            if self._since is None:
                                self._since = await self._stream_position(connection)
                            self._script = await self._load_script(connection)
                        self._publisher_up = True
                        self._connects += 1
                        if not started:
                            started = True
                            task_status.started()
                        backoff.reset()
                        await self._send_forever(connection)
                except Exception as exc:
                    if not started:
                        raise
                    self._log_stop("publisher", exc)
                finally:
                    self._requeue()
                    if self._publisher_up:
                        self._publisher_up = False
                        self._disconnects += 1
                await backoff.sleep()
        except anyio.get_cancelled_exc_class():
            if started:
                await self._farewell()
            raise

    async def _load_script(self, connection: coredis.connection.BaseConnection) -> bytes | None:
        """Load the publishing script; ``None`` if the server refuses scripts (plain XADDs)."""
        library = import_coredis()
        try:
            sha = await connection.create_request(
                b"SCRIPT", b"LOAD", _scripts.PUBLISH.source, decode=False
            )
        except library.exceptions.ResponseError as exc:
            if self._script is not None or not self._warned_script:
                self._warned_script = True
                _logger.info(
                    "usage relay %r: %s refused SCRIPT LOAD (%s); publishing one XADD per "
                    "command instead",
                    self._source,
                    self._where,
                    exc,
                )
            return None
        return sha if isinstance(sha, bytes) else None

    def _requeue(self) -> None:
        """The batch in flight was not acknowledged: send it again first (sync)."""
        inflight = self._inflight
        if inflight:
            self._outbox.extendleft(reversed(inflight))
            inflight.clear()
            while len(self._outbox) > self._max_pending:
                self._outbox.popleft()
                self._dropped += 1

    async def _send_forever(self, connection: coredis.connection.BaseConnection) -> None:
        outbox = self._outbox
        parker = Parker(self._manager._trio)
        while True:
            if not outbox:
                # Idle. Once anything was published, say where this publisher stands every
                # keepalive: a reader whose copy of the last usages was trimmed while it
                # lagged learns what it missed without waiting for the next usage.
                self._parker = parker
                try:
                    with anyio.move_on_after(self._keepalive if self._seq else _INFINITY):
                        await parker.park()
                finally:
                    self._parker = None
                if not outbox:
                    await self._send_marker(connection, _TICK)
                continue
            if self._busy:
                # In a burst (usages were queued while the last batch was on its way): let
                # the tasks that are tracking add to the batch while the queue keeps growing,
                # for at most _GATHER seconds. Fewer, fuller batches: far fewer round trips.
                # (Two looks in a row without growth: trio may run this task first in a
                # round.) A lone usage goes at once.
                deadline = anyio.current_time() + _GATHER
                size = len(outbox)
                still = 0
                while size < _BATCH and still < 2:
                    await checkpoint()
                    if len(outbox) == size:
                        still += 1
                    else:
                        still = 0
                        size = len(outbox)
                        if anyio.current_time() >= deadline:
                            break
            await self._send_batch(connection)
            self._busy = bool(outbox)

    async def _send_batch(self, connection: coredis.connection.BaseConnection) -> None:
        """Send up to a batch of queued usages and wait for the server's acknowledgements.

        With the publishing script, up to ``_PER_SCRIPT`` usages per command; without, one
        ``XADD`` each. The commands are pipelined: one round trip for the batch.
        """
        outbox = self._outbox
        inflight = self._inflight
        for _ in range(min(len(outbox), _BATCH)):
            inflight.append(outbox.popleft())
        create = connection.create_request
        key = self._key
        since = self._since
        assert since is not None
        script = self._script
        requests = []
        if script is not None:
            common = (self._maxlen, self._id, self._source, self._host, since)
            for first in range(0, len(inflight), _PER_SCRIPT):
                args: list[Any] = [*common]
                for seq, event in inflight[first : first + _PER_SCRIPT]:
                    # repr: the exact float, which coredis's %.15g is not.
                    usage, wall = repr(event.usage_percent), repr(event.wall_time)
                    args += (seq, event.resource_type, usage, wall)
                requests.append(create(b"EVALSHA", script, 1, key, *args, decode=False))
        else:
            head = (key, b"MAXLEN", b"~", self._maxlen, b"*", _PUBLISHER, self._id, _SEQ)
            tail = (_SOURCE, self._source, _HOST, self._host, _SINCE, since)
            for seq, event in inflight:
                usage, wall = repr(event.usage_percent), repr(event.wall_time)
                fields = (seq, _TYPE, event.resource_type, _USAGE, usage, _TIME, wall)
                requests.append(create(b"XADD", *head, *fields, *tail, decode=False))
        with anyio.fail_after(self._keepalive):
            for request in requests:
                await request
        self._published += len(inflight)
        inflight.clear()

    async def _send_marker(
        self, connection: coredis.connection.BaseConnection, mark: bytes
    ) -> None:
        """``XADD`` a tick or the goodbye: this publisher's last sequence number, no usage."""
        since = self._since
        assert since is not None
        with anyio.fail_after(self._keepalive):
            await connection.create_request(
                b"XADD", self._key, b"MAXLEN", b"~", self._maxlen, b"*",
                _PUBLISHER, self._id, _SEQ, self._seq, mark, b"1",
                _SOURCE, self._source, _HOST, self._host, _SINCE, since,
                decode=False,
            )  # fmt: skip

    async def _farewell(self) -> None:
        """Stopping: send what is queued and the goodbye, within ``keepalive`` (shielded)."""
        self._manager._remove_publisher(self._hook)  # nothing more is queued
        self._state = "stopping"
        self._requeue()
        since = self._since
        assert since is not None
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._keepalive):
            try:
                async with _connected(self._client, PUBLISHER_NAME, self._keepalive) as connection:
                    self._script = await self._load_script(connection)
                    while self._outbox:
                        await self._send_batch(connection)
                    await self._send_marker(connection, _BYE)
            except Exception as exc:
                _logger.info(
                    "usage relay %r: could not send its goodbye to %s (%s); %d usages unsent",
                    self._source,
                    self._where,
                    describe(exc),
                    len(self._outbox) + len(self._inflight),
                )
        self._requeue()


def _without_password(url: str) -> str:
    """``url`` for messages and logs: a password in it is replaced by ``***``."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.rpartition("@")[2]
    user = parsed.username or ""
    return urlunparse(parsed._replace(netloc=f"{user}:***@{netloc}"))


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return value


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _start_error(relay: UsageRelay, exc: BaseException) -> BaseException:
    """The error the caller of ``relay()`` gets for a relay that could not start."""
    library = import_coredis()
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, UsageRelayError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, OSError | TimeoutError | library.exceptions.RedisError):
            error = RedisUnavailableError(
                f"the usage relay could not connect to {relay._where}: {describe(leaf)}"
            )
            error.__cause__ = leaf
            return error
    return exc


async def start_relay(
    manager: ResourceManager,
    task_group: anyio.abc.TaskGroup,
    redis: str | coredis.Redis[bytes],
    **options: Any,
) -> UsageRelay:
    """Make a relay, start it in ``task_group`` and return it once it runs (see
    :meth:`ResourceManager.relay`)."""
    relay = UsageRelay(manager, redis, **options)
    running = _relays.get(manager)
    # One that is stopping publishes and delivers nothing more: it does not count.
    if running is not None and running._state in ("starting", "running"):
        raise RuntimeError(
            f"this manager already relays ({running!r}): one relay per manager; stop it "
            "first (await relay.aclose())"
        )
    _relays[manager] = relay
    task_group.start_soon(relay._run, name=f"darwin-metrics usage relay {relay.source!r}")
    try:
        await relay._ready.wait()
    except BaseException:
        relay.cancel()  # no half-started relay: it stops in the background
        raise
    if relay._error is not None:
        error = _start_error(relay, relay._error)
        if error is relay._error:
            raise error
        raise error from error.__cause__
    if relay._state != "running":
        raise RuntimeError("the usage relay stopped before it started: the manager is exiting")
    return relay
