"""A pool's, a cache's and a manager's metrics served to Prometheus while a workload runs.

The example registers one ``DarwinCollector`` for a pool of four "connections", a cache of
answers and a manager watching the pool, serves ``/metrics`` on 127.0.0.1 (an ephemeral port)
from a listener in its own task group, and runs a workload for about a second: eight workers
lease connections and look answers up in the cache. Meanwhile it scrapes itself over HTTP, as
Prometheus would, and prints a few of the series from each scrape. Nothing is kept up to date
for the scrapes: each reads the pool's, the cache's and the manager's statistics then.

Run it with ``python examples/prometheus_export.py [--backend asyncio|trio]``; it needs the
``prometheus`` extra (``pip install "darwin-metrics[prometheus]"``). To look at it with your
own eyes, add ``--linger 30`` and open the printed URL while it waits.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys

import anyio

from darwin_metrics.resource import Cache, ResourceManager, ResourcePool

WORKERS = 8
ROUNDS = 6
# The series printed from each scrape (a real scrape holds every bucket of every histogram).
SHOWN = (
    'darwin_pool_connections{pool="db",state="idle"}',
    'darwin_pool_connections{pool="db",state="used"}',
    'darwin_pool_pending_requests{pool="db"}',
    'darwin_pool_acquired_total{pool="db"}',
    'darwin_pool_acquired_after_wait_total{pool="db"}',
    'darwin_pool_wait_seconds_count{pool="db"}',
    'darwin_pool_use_seconds_bucket{le="+Inf",pool="db"}',
    'cache_gets_total{cache="answers",result="hit"}',
    'cache_gets_total{cache="answers",result="miss"}',
    'cache_size{cache="answers"}',
    'darwin_resource_utilization_peak_ratio{manager="app",resource_type="pool:db"}',
)


async def scrape(host: str, port: int) -> str:
    """GET /metrics over a plain TCP connection, as a scraper would; return the body."""
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        response = b""
        try:
            async for chunk in stream:
                response += chunk
        except anyio.BrokenResourceError:
            pass
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body.decode()


def show(title: str, body: str) -> None:
    lines = {line.rpartition(" ")[0]: line for line in body.splitlines() if line[:1] != "#"}
    print(f"{title} ({len(lines)} samples, {len(body)} bytes), among them:")
    for series in SHOWN:
        print(f"  {lines[series]}")


async def main(linger: float) -> None:
    from prometheus_client import CollectorRegistry

    from darwin_metrics.prometheus import register, serve_metrics

    answers: Cache[int, int] = Cache(60, maxsize=100)
    registry = CollectorRegistry()
    async with (
        ResourcePool[object](4, factory=object) as pool,
        ResourceManager() as manager,
        anyio.create_task_group() as group,
    ):
        manager.watch_pool("db", pool)
        register(
            registry, pools={"db": pool}, caches={"answers": answers}, managers={"app": manager}
        )
        server = await group.start(
            functools.partial(serve_metrics, "127.0.0.1", 0, registry=registry)
        )
        host, port = server.addresses[0]
        print(f"serving metrics at {server.url}")

        async def compute(question: int) -> int:
            await anyio.sleep(0.02)  # an expensive answer
            return question * question

        async def worker(number: int) -> None:
            rng = random.Random(number)  # the same questions and holds every run
            for _ in range(ROUNDS):
                async with pool.lease():  # four connections for eight workers: some wait
                    await anyio.sleep(rng.uniform(0.02, 0.08))
                question = rng.randrange(5)
                await answers.get_or_load(question, functools.partial(compute, question))

        async with anyio.create_task_group() as workers:
            for number in range(WORKERS):
                workers.start_soon(worker, number)
            await anyio.sleep(0.15)
            show("a scrape while the workers run", await scrape(host, port))
        await anyio.sleep(0.05)  # the pool watcher records the last change
        show("a scrape once they are done", await scrape(host, port))
        if linger:
            print(f"waiting {linger:g} s: scrape {server.url} yourself")
            await anyio.sleep(linger)
        print(f"the server answered {server.scrapes} scrapes")
        group.cancel_scope.cancel()  # stops the server


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--linger", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args()
    try:
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError:
        print(
            "prometheus_export.py serves metrics with prometheus-client, which is not "
            'installed: pip install "darwin-metrics[prometheus]"',
            file=sys.stderr,
        )
        sys.exit(1)
    anyio.run(main, args.linger, backend=args.backend)
