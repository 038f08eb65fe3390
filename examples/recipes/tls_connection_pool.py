"""Recipe: a pool of TLS connections (anyio streams), with check, reset and dispose.

The pool lends out raw TLS streams to a line-protocol server, the shape of a database or
cache driver's connection pool. Each hook has one job:

- ``factory`` connects, completes the TLS handshake and waits for the server's first answer,
  so a connection in the pool is known to work.
- ``check`` runs on checkout and refuses, without any I/O, a connection that cannot be
  trusted: one whose last request never got its reply (its lease was cancelled or timed out
  mid-request, so that reply may still arrive), or one the server has closed meanwhile (an
  idle connection with something to read is closing: the test urllib3 uses too).
- ``reset`` runs on every return and undoes what the lease changed on the server side of the
  connection (here ``NAME``; in a database, ``DISCARD ALL`` or ``RESET``), so the next lease
  starts clean. The pool protects it from cancellation and bounds it with ``hook_timeout``.
- ``dispose`` closes a connection that leaves the pool without waiting for the peer
  (``anyio.aclose_forcefully``): a dead peer never holds it up.

The recipe starts its own server on 127.0.0.1 with a certificate made at run time by
``trustme`` (the ``test`` extra), and shows each hook at work. Run it with
``python examples/recipes/tls_connection_pool.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
import select
import socket
import ssl
from typing import cast

import anyio
import trustme
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSListener

from darwin_metrics import PoolTimeoutError
from darwin_metrics.resource import ResourcePool

HOST = "127.0.0.1"
IDLE_TIMEOUT = 1.0  # the server closes a connection idle for this long, as real servers do
MAX_LINE = 64 * 1024


# ---------------------------------------------------------------- the client side


class Connection:
    """One TLS connection and its protocol state: what a driver's connection object holds."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.reader = BufferedByteReceiveStream(stream)
        self.socket: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self.port: int = stream.extra(SocketAttribute.local_port)
        self.in_request = False  # a request was sent and its whole reply not read yet

    async def request(self, line: str) -> str:
        """Send one command and return the server's one-line reply."""
        self.in_request = True
        await self.stream.send(line.encode() + b"\n")
        reply = await self.reader.receive_until(b"\n", MAX_LINE)
        self.in_request = False  # only once the whole reply was read
        return reply.decode()

    def __repr__(self) -> str:
        return f"<connection from port {self.port}>"


def is_usable(conn: Connection) -> bool:
    """The ``check`` hook: no I/O, so checkout stays cheap."""
    if conn.in_request or conn.reader.buffer:
        return False  # the protocol is out of step: a late reply may still arrive
    if conn.socket.fileno() < 0:
        return False
    readable, _, _ = select.select([conn.socket], [], [], 0)
    return not readable  # an idle connection with something to read is closing


async def reset(conn: Connection) -> None:
    """The ``reset`` hook: forget what the lease changed in the connection's session."""
    if conn.in_request:
        return  # interrupted mid-request: ``check`` refuses it at its next checkout
    reply = await conn.request("RESET")
    if reply != "OK":
        raise ConnectionError(f"RESET answered {reply!r}")  # the pool disposes it


async def dispose(conn: Connection) -> None:
    """The ``dispose`` hook: close at once, without waiting for the peer."""
    await anyio.aclose_forcefully(conn.stream)


def connector(port: int, tls: ssl.SSLContext) -> object:
    """The ``factory`` hook: connect, shake hands, and wait for the server's first answer."""

    async def connect() -> Connection:
        stream = await anyio.connect_tcp(
            HOST, port, ssl_context=tls, tls_standard_compatible=False
        )
        try:
            conn = Connection(stream)
            # Also reads what the server sent after the handshake (TLS 1.3 session tickets),
            # so that an idle connection has nothing to read unless it is closing.
            if await conn.request("PING") != "PONG":
                raise ConnectionError("the server did not answer PING")
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
        return conn

    return connect


# ---------------------------------------------------------------- the server


async def serve(client: ByteStream) -> None:
    """A line protocol: PING, NAME <name>, WHOAMI, RESET, SLOW; idle connections are closed."""
    async with client:
        reader = BufferedByteReceiveStream(client)
        name = "-"
        try:
            while True:
                with anyio.move_on_after(IDLE_TIMEOUT):
                    line = (await reader.receive_until(b"\n", MAX_LINE)).decode()
                if not line:  # idle for IDLE_TIMEOUT seconds (or an empty line): hang up
                    return
                command, _, argument = line.partition(" ")
                if command == "PING":
                    reply = "PONG"
                elif command == "NAME":
                    name, reply = argument, "OK"
                elif command == "WHOAMI":
                    reply = name
                elif command == "RESET":
                    name, reply = "-", "OK"
                elif command == "SLOW":
                    await anyio.sleep(2)
                    reply = "DONE"
                else:
                    reply = f"ERR unknown command {command!r}"
                await client.send(reply.encode() + b"\n")
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            pass  # the client went away


def certificates() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A throwaway certificate authority: the server's context and a client's that trusts it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


# ---------------------------------------------------------------- the recipe at work


async def main() -> None:
    server_tls, client_tls = certificates()
    tcp = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    port = tcp.extra(SocketAttribute.local_port)
    listener = TLSListener(tcp, server_tls, standard_compatible=False)
    async with listener, anyio.create_task_group() as server_group:
        server_group.start_soon(listener.serve, serve)
        print(f"TLS server listening on {HOST}:{port}")

        async with ResourcePool(
            3,
            factory=connector(port, client_tls),
            check=is_usable,
            reset=reset,
            dispose=dispose,
            max_idle_time=30,  # close connections nobody used for half a minute
            hook_timeout=5,
        ) as pool:
            # 1. Leases share three connections; reset gives each a clean session.
            print("\n1. twelve tasks share three TLS connections")
            started_anonymous = 0

            async def task(number: int) -> None:
                nonlocal started_anonymous
                async with pool.lease(timeout=10) as conn:
                    if await conn.request("WHOAMI") == "-":
                        started_anonymous += 1
                    assert await conn.request(f"NAME task-{number}") == "OK"
                    assert await conn.request("WHOAMI") == f"task-{number}"

            async with anyio.create_task_group() as tasks:
                for number in range(12):
                    tasks.start_soon(task, number)
            print(f"  {started_anonymous} of 12 leases started with a clean session (reset)")
            print(f"  {pool}")
            assert started_anonymous == 12

            # 2. A lease that gives up mid-request: check refuses its connection afterwards.
            print("\n2. a request cancelled before its reply")
            with anyio.move_on_after(0.2) as scope:
                async with pool.lease() as conn:
                    interrupted = conn
                    await conn.request("SLOW")
            print(f"  gave up waiting: {scope.cancelled_caught}; {interrupted} is out of step")
            async with pool.lease() as conn:
                assert conn is not interrupted
                print(f"  the next lease got {conn}: {await conn.request('PING')}")

            # 3. The server closes idle connections: check notices before anyone uses one.
            print(f"\n3. the server closes connections idle for {IDLE_TIMEOUT:.0f} s")
            await anyio.sleep(IDLE_TIMEOUT + 0.5)
            async with pool.lease() as conn:
                print(f"  the next lease got a fresh {conn}: {await conn.request('PING')}")

            # 4. All three held: a lease with a timeout gives up instead of waiting for ever.
            print("\n4. every connection held")
            async with pool.lease(), pool.lease(), pool.lease():
                try:
                    async with pool.lease(timeout=0.1):
                        raise AssertionError("every connection is held")
                except PoolTimeoutError as error:
                    print(f"  {type(error).__name__}: {error}")

            stats = pool.statistics()
            refused = stats.disposals.check_failed
            print("\n5. statistics")
            print(f"  connections made: {stats.created}, open now: {stats.size}")
            print(f"  refused by check on checkout: {refused}")
            print(f"  leases: {stats.acquired}, timeouts: {stats.timeouts}")
            assert refused >= 2  # the interrupted one, and those the server closed
            assert stats.timeouts == 1
        server_group.cancel_scope.cancel()
    print("\ndone: the pool closed its connections, the server stopped")


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
