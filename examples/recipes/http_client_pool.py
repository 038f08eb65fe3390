"""Recipe: a pool of ``httpx.AsyncClient`` objects, with check, reset and dispose.

An ``httpx.AsyncClient`` already keeps its own pool of connections, so most programs need
just one client. Pool clients when each caller needs a client *of its own* for a while: a
client holds cookies (a logged-in session), default headers and auth, which must not leak
from one caller to the next; and when the calls to one service must be bounded, served
first come, first served, and given up after a timeout, with statistics to show for it.

- ``factory`` makes a client for one base URL, with one connection (the pool bounds them).
- ``check`` refuses a client that was closed (``is_closed``).
- ``reset`` clears the cookies a lease collected, so the next lease starts logged out.
- ``dispose`` closes the client and its connection (``aclose``).
- ``max_lifetime`` replaces clients now and then, so that none lives for ever (a server
  that moved to a new address is picked up).

A cancelled request needs nothing from the pool: httpx closes the interrupted connection
itself, and the client stays usable. httpx runs on asyncio and trio. The recipe starts its
own HTTP server on 127.0.0.1. Run it with
``python examples/recipes/http_client_pool.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
from typing import cast

import anyio
import httpx
from _http_server import LocalHTTPServer

from darwin_metrics import PoolTimeoutError
from darwin_metrics.resource import ResourcePool


def client_pool(base_url: str, size: int) -> ResourcePool[httpx.AsyncClient]:
    """A pool of ``size`` clients of ``base_url``, each with one connection."""

    def make_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        )

    def is_open(client: httpx.AsyncClient) -> bool:
        return not client.is_closed

    def forget_session(client: httpx.AsyncClient) -> None:
        client.cookies.clear()

    async def close(client: httpx.AsyncClient) -> None:
        await client.aclose()

    return ResourcePool(
        size,
        factory=make_client,
        check=is_open,
        reset=forget_session,
        dispose=close,
        max_lifetime=300,  # seconds
    )


async def main() -> None:
    with LocalHTTPServer() as server:
        print(f"HTTP server listening on {server.url}")
        async with client_pool(server.url, 3) as pool:
            # 1. Each lease logs in and sees only its own session.
            print("\n1. twelve users share three clients")
            clean = 0

            async def user(number: int) -> None:
                nonlocal clean
                async with pool.lease(timeout=10) as client:
                    if (await client.get("/whoami")).text == "anonymous":
                        clean += 1  # no cookie left by the lease before (reset)
                    await client.get("/login", params={"user": f"user-{number}"})
                    assert (await client.get("/whoami")).text == f"user-{number}"

            async with anyio.create_task_group() as users:
                for number in range(12):
                    users.start_soon(user, number)
            print(f"  {clean} of 12 leases started logged out (reset cleared the cookies)")
            print(f"  {pool}")
            assert clean == 12

            # 2. Every client busy: give up after a timeout (a web app would answer 503).
            print("\n2. every client busy")
            async with pool.lease(), pool.lease(), pool.lease():
                try:
                    async with pool.lease(timeout=0.1):
                        raise AssertionError("every client is leased")
                except PoolTimeoutError as error:
                    print(f"  {type(error).__name__}: {error}")

            # 3. A request cancelled midway: the client is still fine.
            print("\n3. a request cancelled midway")
            with anyio.move_on_after(0.2) as scope:
                async with pool.lease() as client:
                    interrupted = client
                    await client.get("/slow")
            print(f"  gave up on /slow: {scope.cancelled_caught}")
            async with pool.lease() as client:
                reply = await client.get("/whoami")
                same = "the same client" if client is interrupted else "a client"
                print(f"  the next lease got {same}, which answers {reply.status_code}")

            stats = pool.statistics()
            print("\n4. statistics")
            print(f"  clients made: {stats.created}, leases: {stats.acquired}")
            print(f"  waited for a client: {stats.acquired_after_wait}")
            print(f"  timeouts: {stats.timeouts}, disposed: {stats.disposed}")
            assert stats.created == 3
            assert stats.timeouts == 1
        print(f"\ndone: the pool closed its clients; the server saw {server.requests.total()}")


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
