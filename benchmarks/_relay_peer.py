"""The receiving process of the cross-process relay latency rows (``benchmarks/relay.py``).

``python -m benchmarks._relay_peer URL BACKEND PREFIX RAW_KEY``

Runs a manager with a relay on ``PREFIX`` and a raw coredis reader looping on ``XREAD BLOCK``
on ``RAW_KEY``; prints ``ready`` once both read, then one line per arrival: ``relay SECONDS``
for a relayed usage (now minus the usage's ``wall_time``, the publisher's clock: both
processes read the same system clock) and ``raw SECONDS`` for a raw entry (now minus the
time in its ``t`` field). Ends when standard input closes.
"""

from __future__ import annotations

import sys
import time

import anyio
import coredis

from darwin_metrics._redis._relay import _connected
from darwin_metrics.resource import ResourceManager


async def main(url: str, prefix: str, raw_key: bytes) -> None:
    client = coredis.Redis.from_url(url)
    async with (
        ResourceManager() as manager,
        _connected(client, "bench-peer-reader", 5) as reader,
        anyio.create_task_group() as group,
    ):
        await manager.relay(url, prefix=prefix, source="peer")
        subscription = manager.subscribe()
        last = await reader.create_request(b"XADD", raw_key, b"*", b"t", b"0", decode=False)

        async def relayed() -> None:
            async for usage in subscription:
                print(f"relay {time.time() - usage.wall_time}", flush=True)

        async def raw() -> None:
            nonlocal last
            while True:
                reply = await reader.create_request(
                    b"XREAD", b"BLOCK", 500, b"STREAMS", raw_key, last, decode=False
                )
                if reply:
                    for entry_id, fields in reply[raw_key]:
                        last = entry_id
                        print(f"raw {time.time() - float(fields[1])}", flush=True)

        async def until_stdin_closes() -> None:
            await anyio.to_thread.run_sync(sys.stdin.read)
            group.cancel_scope.cancel()

        group.start_soon(relayed)
        group.start_soon(raw)
        group.start_soon(until_stdin_closes)
        print("ready", flush=True)


if __name__ == "__main__":
    url, backend, prefix, raw_key = sys.argv[1:5]
    anyio.run(main, url, prefix, raw_key.encode(), backend=backend)
