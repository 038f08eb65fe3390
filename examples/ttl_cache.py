"""A Cache in front of an expensive computation: single-flight loads, expiry, statistics.

1. ten tasks ask for the same key at once: one computation, and all ten get its result;
2. asking again is a hit, with no computation and no waiting;
3. after the ttl the entry has expired: the next caller computes it again;
4. a cache bounded in size evicts the entry that nobody looked up;
5. the statistics of each cache, labelled: the ttl cache of parts 1-3 and the small one.

Run it with ``python examples/ttl_cache.py [--backend asyncio|trio]``.
"""

from __future__ import annotations

import argparse
from typing import Any, cast

import anyio

from darwin_metrics.resource import Cache, EvictionCause

TTL = 0.5  # seconds an answer stays in the cache
computations = 0


async def expensive_square(n: int) -> int:
    """Stands for a slow query or a remote call."""
    global computations
    computations += 1
    await anyio.sleep(0.2)
    return n * n


def on_evict(key: object, value: object, cause: EvictionCause) -> None:
    print(f"  evicted {key} -> {value} ({cause.name.lower()})")


async def main() -> None:
    cache: Cache[int, int] = Cache(TTL, on_evict=on_evict)

    # 1. Concurrent callers share one load.
    print("1. ten tasks ask for the square of 12 at once")
    answers: list[int] = []

    async def caller() -> None:
        answers.append(await cache.get_or_load(12, lambda: expensive_square(12)))

    started = anyio.current_time()
    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(caller)
    took = anyio.current_time() - started
    print(f"  {len(answers)} answers {set(answers)}, {computations} computation, {took:.2f} s")
    assert answers == [144] * 10
    assert computations == 1

    # 2. Hits: no computation, no waiting.
    print("\n2. asking again, a hundred times")
    started = anyio.current_time()
    for _ in range(100):
        assert await cache.get_or_load(12, lambda: expensive_square(12)) == 144
    took = anyio.current_time() - started
    print(f"  144 a hundred times in {took * 1000:.1f} ms, still {computations} computation")
    assert computations == 1

    # 3. Expiry.
    print(f"\n3. after the ttl ({TTL} s)")
    await anyio.sleep(TTL)
    print(f"  cache.get(12) -> {cache.get(12)}")
    assert await cache.get_or_load(12, lambda: expensive_square(12)) == 144
    print(f"  get_or_load(12) computed it again: {computations} computations")
    assert computations == 2

    # 4. Size-bounded: the entry nobody looked up goes first (SIEVE).
    print("\n4. a fourth key in a cache bounded to three")
    small: Cache[str, str] = Cache(60, maxsize=3, on_evict=on_evict)
    for key in ("a", "b", "c"):
        small.set(key, key.upper())
    small.get("a")  # looked up: "a" survives the next eviction
    small.get("c")
    small.set("d", "D")
    print(f"  the small cache holds {sorted(key for key in 'abcd' if key in small)}")
    assert "b" not in small

    # 5. What each cache counted.
    print("\n5. statistics")
    describe(f"the ttl cache (parts 1-3, ttl {TTL} s)", cache)
    describe("the small cache (part 4, maxsize 3)", small)


def plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def describe(label: str, cache: Cache[Any, Any]) -> None:
    """Print one cache's statistics in words, under ``label``."""
    stats = cache.statistics()
    print(f"  {label}:")
    print(
        f"    {plural(stats.hits, 'hit', 'hits')}, {plural(stats.misses, 'miss', 'misses')} "
        f"(hit ratio {stats.hit_ratio:.0%}), {plural(stats.sets, 'set', 'sets')}, "
        f"{plural(stats.expirations, 'expiration', 'expirations')}, "
        f"{plural(stats.evictions, 'eviction', 'evictions')}; "
        f"{plural(stats.size, 'entry', 'entries')} held now"
    )


def parse_backend() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return cast(str, parser.parse_args().backend)


if __name__ == "__main__":
    anyio.run(main, backend=parse_backend())
