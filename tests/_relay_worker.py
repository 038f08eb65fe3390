"""One process of the multi-process relay runs (``tests/test_redis_relay_faults.py``).

``python tests/_relay_worker.py URL BACKEND NAME EVENTS MAXLEN TOTAL PAUSE``

A manager with three subscribers and a relay on ``URL``; prints ``ready`` once the relay
runs, waits for a ``go`` line on standard input, tracks ``EVENTS`` usages (paced, so that the
run lasts long enough for the parent's faults to land in the middle), and waits until every
subscriber has accounted for ``TOTAL`` usages (``received + missed``: its own and every other
process's), or 30 s. Then it prints one JSON line with each subscriber's figures and the
relay's statistics, and exits (its relay says goodbye on the way).

The subscribers:

- ``fast``: ``"drop_oldest"`` with room for everything: it should miss only what the relay
  could not read.
- ``small``: ``"drop_oldest"`` with a buffer of 8, read slowly: it also misses what overflows.
- ``slow``: ``"wait"`` with a buffer of 2 that is not read for ``PAUSE`` seconds after ``go``:
  it holds this process's reader (and its own tracking) meanwhile, so the stream is trimmed
  past what the reader had read (``MAXLEN ~``), and the reader counts the gap.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import Counter
from typing import Any

import anyio
import attrs

from darwin_metrics.resource import ResourceManager, Subscription


class Tally:
    def __init__(self, subscription: Subscription, delay: float = 0.0) -> None:
        self.subscription = subscription
        self.delay = delay
        self.by_source: Counter[str] = Counter()
        self.gate = anyio.Event()

    @property
    def accounted(self) -> int:
        return sum(self.by_source.values()) + self.subscription.missed

    async def run(self) -> None:
        await self.gate.wait()
        async for usage in self.subscription:
            self.by_source[usage.source or "self"] += 1
            if self.delay:
                await anyio.sleep(self.delay)

    def report(self) -> dict[str, Any]:
        return {
            "received": sum(self.by_source.values()),
            "missed": self.subscription.missed,
            "by_source": dict(self.by_source),
        }


async def main(url: str, name: str, events: int, maxlen: int, total: int, pause: float) -> None:
    stdin = anyio.wrap_file(sys.stdin)
    async with ResourceManager() as manager:
        tallies = {
            "fast": Tally(manager.subscribe(buffer_size=100_000)),
            "small": Tally(manager.subscribe(buffer_size=8), delay=0.0005),
            "slow": Tally(manager.subscribe(overflow="wait", buffer_size=2)),
        }
        relay = await manager.relay(url, source=name, maxlen=maxlen, keepalive=0.5)
        async with anyio.create_task_group() as group:
            for tally in tallies.values():
                group.start_soon(tally.run)
            print("ready", flush=True)
            if (await stdin.readline()).strip() != "go":
                raise SystemExit("expected 'go'")
            tallies["fast"].gate.set()
            tallies["small"].gate.set()

            async def open_the_gate() -> None:
                await anyio.sleep(pause)
                tallies["slow"].gate.set()

            group.start_soon(open_the_gate)
            for n in range(events):
                await manager.track_resource_usage("cpu", float(n))
                if n % 10 == 9:
                    await anyio.sleep(0.005)
            with anyio.move_on_after(30):
                # Polling: a gap counted at a goodbye comes with no event to wait for.
                for _ in itertools.count():
                    if all(tally.accounted >= total for tally in tallies.values()):
                        break
                    await anyio.sleep(0.01)
            report = {
                "name": name,
                "subscribers": {key: tally.report() for key, tally in tallies.items()},
                "relay": attrs.asdict(relay.statistics()),
                # For a failure's message: the last sequence number read of each publisher.
                "peers": {peer.source: peer.seq for peer in relay._peers.values()},
                "gone": len(relay._gone),
            }
            print(json.dumps(report), flush=True)
            group.cancel_scope.cancel()


if __name__ == "__main__":
    url, backend, name, events, maxlen, total, pause = sys.argv[1:8]
    anyio.run(main, url, name, int(events), int(maxlen), int(total), float(pause), backend=backend)
