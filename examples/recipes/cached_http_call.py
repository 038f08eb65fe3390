"""Recipe: a TTL cache in front of an async HTTP call, with ``Cache.get_or_load``.

A slow upstream service (here, a weather service) is called through ``httpx``. The cache
answers repeated questions from memory for ``ttl`` seconds, and when many tasks ask the
same question at once, one request goes out and every task gets its answer (single flight).
A failed request is not cached: every task that was waiting for it gets the same error, and
the next call tries again. It runs on asyncio and trio; the recipe starts its own HTTP
server on 127.0.0.1. Run it with
``python examples/recipes/cached_http_call.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import anyio
import httpx
from _http_server import LocalHTTPServer

from darwin_metrics.resource import Cache

Weather = dict[str, Any]


class WeatherService:
    """The client side: ``await weather.now(city)``, answered from the cache when it can be."""

    def __init__(self, client: httpx.AsyncClient, *, ttl: float) -> None:
        self._client = client
        self._cache: Cache[str, Weather] = Cache(ttl, maxsize=10_000)

    async def now(self, city: str) -> Weather:
        async def load() -> Weather:
            response = await self._client.get(f"/weather/{city}")
            response.raise_for_status()  # an error is raised to every waiter, never cached
            weather: Weather = response.json()
            return weather

        return await self._cache.get_or_load(city, load)

    def is_cached(self, city: str) -> bool:
        return city in self._cache


async def main() -> None:
    with LocalHTTPServer() as server:
        print(f"HTTP server listening on {server.url}")
        async with httpx.AsyncClient(base_url=server.url) as client:
            weather = WeatherService(client, ttl=1.0)

            # 1. Fifty tasks ask at once: one request, fifty answers.
            print("\n1. fifty tasks ask for Paris at once")
            answers: list[Weather] = []

            async def ask(city: str) -> None:
                answers.append(await weather.now(city))

            async with anyio.create_task_group() as tasks:
                for _ in range(50):
                    tasks.start_soon(ask, "paris")
            requests = server.requests["/weather/paris"]
            print(f"  {len(answers)} answers, {requests} request to the service")
            assert len(answers) == 50
            assert requests == 1

            # 2. Asked again within the ttl: from memory.
            print("\n2. asked again within the ttl")
            again = await weather.now("paris")
            print(f"  {again['celsius']} °C, still {server.requests['/weather/paris']} request")
            assert server.requests["/weather/paris"] == 1

            # 3. Once the ttl ran out, the next call asks the service again.
            print("\n3. asked again after the ttl")
            await anyio.sleep(1.1)
            fresh = await weather.now("paris")
            print(f"  answer number {fresh['served']}: the service was asked again")
            assert server.requests["/weather/paris"] == 2

            # 4. A failure reaches every waiting task and is not cached.
            print("\n4. ten tasks ask for a city the service cannot serve")
            errors: list[httpx.HTTPStatusError] = []

            async def ask_atlantis() -> None:
                try:
                    await weather.now("atlantis")
                except httpx.HTTPStatusError as error:
                    errors.append(error)

            async with anyio.create_task_group() as tasks:
                for _ in range(10):
                    tasks.start_soon(ask_atlantis)
            failed = server.requests["/weather/atlantis"]
            status = errors[0].response.status_code
            print(f"  {len(errors)} tasks got HTTP {status} from {failed} request")
            assert len(errors) == 10
            assert failed == 1
            await ask_atlantis()  # not cached: asked again
            print(f"  the next call asked again: {server.requests['/weather/atlantis']} requests")
            assert server.requests["/weather/atlantis"] == 2

            calls = len(answers) + 2 + len(errors) + 1
            print(f"\n5. {calls} calls, {server.requests.total()} requests to the service")
            cached = {city: weather.is_cached(city) for city in ("paris", "atlantis")}
            print(f"  cached now: {cached}")
            assert cached == {"paris": True, "atlantis": False}
    print("\ndone")


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
