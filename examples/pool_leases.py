"""A ResourcePool of real TCP connections, leased by many tasks at once.

The example starts an echo server on 127.0.0.1 (an ephemeral port), then:

1. twenty tasks share a pool of three connections, each sending a few messages;
2. a lease times out while every connection is held;
3. the server hangs up on one connection: the task that notices discards it, and a
   connection marked broken is refused by the pool's ``check`` on checkout;
4. the pool's statistics.

Run it with ``python examples/pool_leases.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
from typing import cast

import anyio
from anyio.abc import SocketAttribute, SocketStream

from darwin_metrics import PoolTimeoutError
from darwin_metrics.resource import ResourcePool

HOST = "127.0.0.1"
HANG_UP = b"hang up"


# ---------------------------------------------------------------- the echo server


async def echo(client: SocketStream) -> None:
    """Send back whatever arrives, until the client leaves or asks the server to hang up."""
    async with client:
        try:
            async for data in client:
                if data == HANG_UP:
                    return  # closes the connection: the client sees it break
                await client.send(data)
        except anyio.BrokenResourceError:
            pass  # the client went away mid-message


# ---------------------------------------------------------------- the client side


def name(connection: SocketStream) -> str:
    """A connection's local port tells the connections apart in the output."""
    return f"conn:{connection.extra(SocketAttribute.local_port)}"


async def round_trip(connection: SocketStream, message: bytes) -> bytes:
    """Send ``message`` and read its echo (TCP may split it: read until all came back)."""
    await connection.send(message)
    reply = b""
    while len(reply) < len(message):
        reply += await connection.receive()
    return reply


async def main() -> None:
    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    async with listener, anyio.create_task_group() as server_group:
        port = listener.extra(SocketAttribute.local_port)
        server_group.start_soon(listener.serve, echo)
        print(f"echo server listening on {HOST}:{port}")

        broken: set[SocketStream] = set()

        async def connect() -> SocketStream:
            return await anyio.connect_tcp(HOST, port)

        async def close(connection: SocketStream) -> None:
            print(f"  pool disposes {name(connection)}")
            await connection.aclose()

        def healthy(connection: SocketStream) -> bool:
            return connection not in broken

        async with ResourcePool(3, factory=connect, check=healthy, dispose=close) as pool:
            # 1. Twenty tasks, three connections: leases are handed out in FIFO order.
            print("\n1. twenty tasks share three connections")
            served: dict[str, int] = {}

            async def client(number: int) -> None:
                async with pool.lease(timeout=5) as connection:
                    for message in range(3):
                        text = f"task {number} message {message}".encode()
                        assert await round_trip(connection, text) == text
                    served[name(connection)] = served.get(name(connection), 0) + 1

            async with anyio.create_task_group() as clients:
                for number in range(20):
                    clients.start_soon(client, number)
            for connection_name, count in sorted(served.items()):
                print(f"  {connection_name} served {count} tasks")
            print(f"  {pool}")

            # 2. Every connection is held: a lease with a timeout gives up.
            print("\n2. a lease that times out")
            async with anyio.create_task_group() as holders:
                all_held = anyio.Event()
                release = anyio.Event()
                holding = 0

                async def hold() -> None:
                    nonlocal holding
                    async with pool.lease():
                        holding += 1
                        if holding == pool.max_size:
                            all_held.set()
                        await release.wait()

                for _ in range(pool.max_size):
                    holders.start_soon(hold)
                await all_held.wait()
                try:
                    async with pool.lease(timeout=0.1):
                        raise AssertionError("every connection is held")
                except PoolTimeoutError as error:
                    print(f"  {type(error).__name__}: {error}")
                release.set()

            # 3. A broken connection: discard it at once, or mark it for the check.
            print("\n3. broken connections")
            async with pool.lease() as connection:
                await connection.send(HANG_UP)
                try:
                    await connection.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    print(f"  the server hung up on {name(connection)}: discard it")
                    await pool.discard(connection)
            async with pool.lease() as connection:
                print(f"  {name(connection)} looks wrong: mark it broken and give it back")
                broken.add(connection)
            async with pool.lease() as connection:
                reply = await round_trip(connection, b"still there?")
                print(f"  the next lease got {name(connection)}, which echoes {reply!r}")

            # 4. What the pool counted.
            print("\n4. statistics")
            stats = pool.statistics()
            for field in ("max_size", "size", "idle", "leased", "created", "disposed"):
                print(f"  {field:>12}: {getattr(stats, field)}")
            for field in ("acquired", "timeouts", "waiting"):
                print(f"  {field:>12}: {getattr(stats, field)}")
            print(f"  {'longest_wait':>12}: {stats.longest_wait:.3f} s")
            assert stats.timeouts == 1
            assert stats.disposed == 2

        server_group.cancel_scope.cancel()  # stop the echo server; then the listener closes
    print("\ndone: the pool closed its connections, the server stopped")


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
