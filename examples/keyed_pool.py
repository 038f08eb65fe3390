"""A keyed pool of TCP connections to several servers: one key per server.

The example starts four small servers ("shards") on 127.0.0.1, each on an ephemeral port,
that answer every message with their name. A ``KeyedResourcePool`` keeps connections to
them: at most two per shard, at most four in all (fewer than the shards could use). Then:

1. thirty requests to three shards at once: both limits hold;
2. a request for the fourth shard, with four idle connections to the others: the one idle
   the longest is closed to make room;
3. fairness: two busy shards hold every connection and have queues of their own; a request
   for a shard with no connection is served by the very next release;
4. admission control: with ``max_waiting=30`` tasks already waiting, the next request is
   refused at once (``PoolOverloadedError``) instead of queueing;
5. the statistics, overall and per shard.

Run it with ``python examples/keyed_pool.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable
from typing import cast

import anyio
from anyio.abc import SocketAttribute, SocketStream

from darwin_metrics import PoolOverloadedError
from darwin_metrics.resource import KeyedResourcePool

HOST = "127.0.0.1"
SHARDS = ("shard-a", "shard-b", "shard-c", "shard-d")


# ---------------------------------------------------------------- the servers


def answering_as(name: str) -> Callable[[SocketStream], Awaitable[None]]:
    """A connection handler that answers every message with ``name: message``."""

    async def handle(client: SocketStream) -> None:
        async with client:
            try:
                async for data in client:
                    await client.send(name.encode() + b": " + data)
            except anyio.BrokenResourceError:
                pass  # the client went away mid-message

    return handle


# ---------------------------------------------------------------- the client side


async def ask(connection: SocketStream, message: str) -> str:
    """Send ``message`` and read the whole answer (TCP may split it)."""
    await connection.send(message.encode())
    expected = len(message) + len(": ") + len(SHARDS[0])
    answer = b""
    while len(answer) < expected:
        answer += await connection.receive()
    return answer.decode()


async def main() -> None:
    async with contextlib.AsyncExitStack() as listeners, anyio.create_task_group() as servers:
        addresses: dict[str, tuple[str, int]] = {}
        for name in SHARDS:
            listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
            await listeners.enter_async_context(listener)  # closed however this ends
            addresses[name] = (HOST, listener.extra(SocketAttribute.local_port))
            servers.start_soon(listener.serve, answering_as(name))
        ports = ", ".join(str(port) for _, port in addresses.values())
        print(f"{len(SHARDS)} servers listening on {HOST}: ports {ports}")

        open_now: dict[str, int] = dict.fromkeys(SHARDS, 0)
        peak = {"total": 0, "per shard": 0}

        async def connect(shard: str) -> SocketStream:
            connection = await anyio.connect_tcp(*addresses[shard])
            open_now[shard] += 1
            peak["total"] = max(peak["total"], sum(open_now.values()))
            peak["per shard"] = max(peak["per shard"], open_now[shard])
            return connection

        async def close(shard: str, connection: SocketStream) -> None:
            await connection.aclose()
            open_now[shard] -= 1
            print(f"    closed a connection to {shard}")

        pool = KeyedResourcePool(2, 4, factory=connect, dispose=close, max_waiting=30, timeout=5)
        async with pool:
            # 1. Thirty requests over three shards at once.
            print("\n1. thirty requests to three shards at once")
            answers: dict[str, list[int]] = {name: [] for name in SHARDS}

            async def request(shard: str, number: int) -> None:
                async with pool.lease(shard) as connection:
                    answer = await ask(connection, f"request {number:02}")
                    assert answer.startswith(shard)
                    answers[shard].append(number)
                    await anyio.sleep(0.01)

            async with anyio.create_task_group() as clients:
                for number in range(30):
                    clients.start_soon(request, SHARDS[number % 3], number)
            for shard in SHARDS[:3]:
                print(f"  {shard}: {len(answers[shard])} requests answered")
            evicted = pool.statistics().disposals.evicted
            print(
                f"  connections closed to make room for another shard's waiting requests: "
                f"{evicted}"
            )
            print(
                f"  most connections at once: {peak['total']} in all, "
                f"{peak['per shard']} per server (limits: 4 and 2)"
            )
            print(f"  {pool}")

            # 2. The fourth shard: the connection idle the longest makes room.
            print("\n2. a request for the fourth shard, four idle connections to the others")
            stats = pool.statistics()
            evicted = stats.disposals.evicted
            idle = {name: s.idle for name, s in sorted(stats.per_key.items())}
            print(f"  idle before: {idle}")
            async with pool.lease("shard-d") as connection:
                print(f"  {await ask(connection, 'hello there')}")
            stats = pool.statistics()
            idle = {name: s.idle for name, s in sorted(stats.per_key.items())}
            print(f"  idle after: {idle}; evicted: {stats.disposals.evicted - evicted}")

            # 3. Fairness: busy shards cannot starve one that has nothing.
            print("\n3. two busy shards hold every connection; shard-c has none")
            held = [await pool.acquire(shard) for shard in ("shard-a", "shard-a")]
            held += [await pool.acquire(shard) for shard in ("shard-b", "shard-b")]
            stats = pool.statistics()
            print(f"  {stats.leased} leased, {stats.idle} idle, shards: {sorted(stats.per_key)}")
            served: list[str] = []

            async def wait_for(shard: str) -> None:
                async with pool.lease(shard, timeout=None) as connection:
                    served.append(shard)
                    await ask(connection, "my turn?")

            async with anyio.create_task_group() as clients:
                for shard in ("shard-a", "shard-b", "shard-a", "shard-b"):
                    clients.start_soon(wait_for, shard)  # the busy shards' own queues
                await anyio.wait_all_tasks_blocked()
                clients.start_soon(wait_for, "shard-c")
                await anyio.wait_all_tasks_blocked()
                print(f"  {pool.statistics().waiting} tasks waiting, shard-c's the last")
                await pool.release(held.pop(0))  # one shard-a connection comes back...
                shard_c = pool.key_statistics("shard-c")
                assert shard_c is not None
                print(
                    f"  after 1 release: shard-c is served ({shard_c.size} connection), "
                    f"{pool.statistics().waiting} tasks of the busy shards still wait"
                )
                for connection in held:
                    await pool.release(connection)
            print(f"  served in all: {', '.join(sorted(served))}")

            # 4. Admission control: with 30 tasks waiting, the next one is refused at once.
            print("\n4. admission control (max_waiting=30)")
            done = anyio.Event()

            async def occupy(shard: str) -> None:
                async with pool.lease(shard):
                    await done.wait()

            async with anyio.create_task_group() as clients:
                for shard in ("shard-a", "shard-a", "shard-b", "shard-b"):
                    clients.start_soon(occupy, shard)
                await anyio.wait_all_tasks_blocked()
                for shard in ("shard-a", "shard-b", "shard-c") * 10:
                    clients.start_soon(occupy, shard)
                await anyio.wait_all_tasks_blocked()
                print(f"  {pool.statistics().waiting} tasks waiting")
                try:
                    async with pool.lease("shard-d"):
                        raise AssertionError("30 tasks wait: this one is refused")
                except PoolOverloadedError as error:
                    print(f"  {type(error).__name__}: {error}")
                done.set()

            # 5. What the pool counted.
            print("\n5. statistics")
            stats = pool.statistics()
            for field in ("max_per_key", "max_total", "size", "idle", "created", "disposed"):
                print(f"  {field:>19}: {getattr(stats, field)}")
            for field in ("acquired", "acquired_after_wait", "rejected"):
                print(f"  {field:>19}: {getattr(stats, field)}")
            print(f"  {'evicted':>19}: {stats.disposals.evicted}")
            print(f"  {'longest_wait':>19}: {stats.longest_wait * 1000:.1f} ms")
            for shard, key_stats in sorted(stats.per_key.items()):
                print(
                    f"  {shard}: {key_stats.acquired} leases, {key_stats.created} connections "
                    f"made, {key_stats.evicted} evicted, {key_stats.idle} idle"
                )
            assert peak["total"] <= 4
            assert peak["per shard"] <= 2
            assert stats.rejected == 1
        print(f"\n  open connections after the pool closed: {sum(open_now.values())}")
        servers.cancel_scope.cancel()  # stop the servers; their listeners close
    print("done: the pool closed its connections, the servers stopped")


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
