"""The invalidation race: one process reads keys while another process writes them.

The reader (this process, on the caller's event loop) hammers a batch of keys with ``get``
while a writer subprocess (``python tests/_redis_race.py writer URL PREFIX WRITES``) stores
each key of the batch ``WRITES`` times in a row; batch after batch until every key was
raced. Then the reader waits ``settle`` seconds and counts the keys it still serves a replaced
value for. The reader is either a :class:`~darwin_metrics.redis.RedisCache` or a coredis
client with its own client-side cache (``coredis.Redis(cache=LRUCache())``), the comparison.

Used by ``tests/test_redis_faults.py`` (ours must be 0) and ``benchmarks/redis.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.streams.text

__all__ = ["RaceResult", "run_race"]

Reader = Literal["tier", "coredis"]
WRITER = os.path.abspath(__file__)


@dataclass(frozen=True)
class RaceResult:
    keys: int
    writes_per_key: int
    #: Keys whose locally cached value was not the last one written, ``settle`` s later.
    stale: int
    #: Reads made while the writer wrote (L1 hits and server reads).
    reads: int
    #: For the tier: fills its race guard refused.
    refused: int | None


def _value(n: int, padding: int) -> str:
    return f"v{n}" + "." * padding


async def _writer_main(url: str, prefix: str, writes: int, padding: int) -> None:
    import coredis

    stdin = anyio.wrap_file(sys.stdin)
    async with coredis.Redis.from_url(url) as client:

        async def write(key: str) -> None:
            for n in range(writes):
                await client.set(prefix + key, json.dumps(_value(n, padding)).encode())

        while True:
            line = (await stdin.readline()).split()
            if not line or line[0] == "q":
                return
            start, stop = int(line[1]), int(line[2])
            async with anyio.create_task_group() as group:
                for i in range(start, stop):
                    group.start_soon(write, f"k{i}")
            sys.stdout.write("done\n")
            sys.stdout.flush()


async def run_race(
    url: str,
    *,
    reader: Reader = "tier",
    keys: int = 2000,
    batch: int = 100,
    writes_per_key: int = 3,
    settle: float = 3.0,
    padding: int = 0,
    prefix: str = "race:",
) -> RaceResult:
    """Race ``keys`` keys, ``batch`` at a time; return how many ended stale for the reader."""
    import coredis
    from coredis.patterns.cache import LRUCache

    from darwin_metrics.redis import RedisCache

    names = [f"k{i}" for i in range(keys)]
    reads = 0
    async with coredis.Redis.from_url(url) as setup:
        for name in names:
            await setup.set(prefix + name, json.dumps("init").encode())

    async with contextlib.AsyncExitStack() as stack:
        if reader == "tier":
            tier = await stack.enter_async_context(RedisCache[Any](url, prefix=prefix, ttl=600))
        else:
            cached = await stack.enter_async_context(
                coredis.Redis.from_url(url, cache=LRUCache(max_keys=keys * 2))
            )

        async def get(name: str) -> object:
            if reader == "tier":
                return await tier.get(name)
            data = await cached.get(prefix + name)
            return None if data is None else json.loads(data)

        for name in names:  # fill the reader's local cache
            await get(name)

        async def hammer(name: str, stop: anyio.Event) -> None:
            nonlocal reads
            while not stop.is_set():
                await get(name)
                reads += 1
                await anyio.lowlevel.checkpoint()

        process = await anyio.open_process(
            [
                sys.executable,
                WRITER,
                "writer",
                url,
                prefix,
                str(writes_per_key),
                str(padding),
            ],
            stderr=None,
        )
        async with process:
            assert process.stdin is not None
            assert process.stdout is not None
            lines = anyio.streams.text.TextReceiveStream(process.stdout)
            pending = ""
            for start in range(0, keys, batch):
                stop_at = min(start + batch, keys)
                stop = anyio.Event()
                async with anyio.create_task_group() as group:
                    for name in names[start:stop_at]:
                        group.start_soon(hammer, name, stop)
                    await process.stdin.send(f"b {start} {stop_at}\n".encode())
                    while "done\n" not in pending:
                        pending += await lines.receive()
                    pending = pending.replace("done\n", "", 1)
                    stop.set()
            await process.stdin.send(b"q\n")
            await process.wait()
        assert process.returncode == 0, process.returncode

        await anyio.sleep(settle)
        final = _value(writes_per_key - 1, padding)
        stale = 0
        for name in names:
            if reader == "tier":
                local = tier.get_local(name)
                if local is not None and local != final:
                    stale += 1
            elif await get(name) != final:
                stale += 1
        refused = tier.statistics().fills_refused if reader == "tier" else None
    return RaceResult(keys, writes_per_key, stale, reads, refused)


if __name__ == "__main__":
    if sys.argv[1:2] == ["writer"]:
        anyio.run(_writer_main, sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit("usage: python tests/_redis_race.py writer URL PREFIX WRITES PADDING")
