"""One process of the fleet tests and benchmarks of ``SharedCapacityLimiter``.

:class:`Fleet` starts workers as processes forked from a forkserver that has imported
darwin-metrics, coredis, anyio and trio once (a fresh interpreter pays about a second for
that). Each worker gets its mode and options (``url``, ``name``, ``total``, ``lease``,
``backend`` and the mode's own), starts its limiter, says ``ready``, waits for ``go``, does its
part and sends one report of what it saw, then exits. Modes:

- ``storm``: ``tasks`` tasks acquire and release for ``duration`` seconds, with random holds,
  cancellations (anyio scopes, and asyncio's own ``asyncio.timeout`` on asyncio) and
  timeouts. Every holder counts itself in the server key ``counter`` (``INCR`` once it holds,
  ``DECR`` before it gives back) and records any count above ``total``: the holders' own,
  independent check that the limit holds.
- ``victim``: acquires ``hold`` permits, counts them in ``counter``, prints
  ``holding OWNER`` and sleeps until it is killed.
- ``fifo``: ``tasks`` tasks acquire, hold for ``hold`` seconds and release, over and over, for
  ``duration`` seconds; reports every grant's ticket and fencing token.
- ``pool``: a ``ResourcePool(max_size, shared_limit=limiter)`` whose factory counts the
  resources that exist fleet-wide in the server key ``open`` (``INCR`` on creation, ``DECR``
  on disposal) and records any count above ``total``; ``tasks`` tasks lease for
  ``duration`` seconds, pausing now and then for longer than ``max_idle_time``.
- ``bench``: ``tasks`` tasks acquire, hold for ``hold`` seconds, release and wait ``think``
  seconds, over and over, for ``duration`` seconds; reports the grant count per task.
- ``lock``: the same work with the polling ``SET NX PX`` lock recipe instead of the limiter:
  ``total`` lock keys (holding one of them is a permit), tried in turn, then a sleep of
  ``poll`` seconds before trying again; given back by a compare-and-delete script.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread

from darwin_metrics._lowlevel import run_protected
from darwin_metrics.redis import SharedCapacityLimiter
from darwin_metrics.resource import ResourcePool

__all__ = ["Fleet", "Worker"]

_PRELOAD = [
    "darwin_metrics.redis",
    "darwin_metrics.resource",
    "coredis",
    "anyio",
    "trio",
    __name__,
]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(_PRELOAD)

# The worker's end of its pipe, in the worker process.
_pipe: multiprocessing.connection.Connection | None = None


def _say(message: Any) -> None:
    assert _pipe is not None
    _pipe.send(message)


async def protected(call: Any, on_trio: bool) -> tuple[Any, BaseException | None]:
    """Run ``await call()`` to its end whatever cancels the caller (asyncio's own
    ``task.cancel()`` included), so that a count on the server is never left half done.
    Returns its result and the cancellation that arrived meanwhile (the caller raises it)."""
    result: list[Any] = []

    async def run() -> None:
        result.append(await call())

    failure, deferred = await run_protected(run, on_trio=on_trio, timeout=10)
    if failure is not None and failure is not deferred:
        raise failure
    return (result[0] if result else None), deferred


async def _go() -> None:
    assert _pipe is not None
    message = await anyio.to_thread.run_sync(_pipe.recv)
    if message != "go":
        raise SystemExit(f"expected 'go', got {message!r}")


async def storm(options: dict[str, Any], limiter: SharedCapacityLimiter, client: Any) -> None:
    total = options["total"]
    counter = options["counter"]
    native = options["backend"] == "asyncio"
    seen = {"grants": 0, "cancelled": 0, "timeouts": 0, "violations": 0, "max": 0}
    rng = random.Random(options["seed"])

    on_trio = not native

    async def hold() -> None:
        count, cancellation = await protected(lambda: client.incr(counter), on_trio)
        seen["grants"] += 1
        seen["max"] = max(seen["max"], count)
        if count > total:
            seen["violations"] += 1
        try:
            if cancellation is not None:
                raise cancellation
            await anyio.sleep(rng.uniform(0, 0.004))
        finally:
            _, cancellation = await protected(lambda: client.decr(counter), on_trio)
            if cancellation is not None:
                raise cancellation

    async def once() -> None:
        action = rng.random()
        if action < 0.35:
            async with limiter:
                await hold()
        elif action < 0.55:
            with anyio.move_on_after(rng.uniform(0, 0.006)) as scope:
                async with limiter:
                    await hold()
            seen["cancelled"] += scope.cancelled_caught
        elif action < 0.7:
            try:
                with anyio.fail_after(rng.uniform(0, 0.01)):
                    async with limiter:
                        await hold()
            except TimeoutError:
                seen["timeouts"] += 1
        elif action < 0.85 and native and hasattr(asyncio, "timeout"):  # 3.11+
            try:
                async with asyncio.timeout(rng.uniform(0, 0.006)):
                    async with limiter:
                        await hold()
            except TimeoutError:
                seen["timeouts"] += 1
        else:
            borrower = object()
            await limiter.acquire_on_behalf_of(borrower)
            try:
                await hold()
            finally:
                limiter.release_on_behalf_of(borrower)

    async def task() -> None:
        deadline = time.monotonic() + options["duration"]
        while time.monotonic() < deadline:
            await once()

    async with anyio.create_task_group() as group:
        for _ in range(options["tasks"]):
            group.start_soon(task)
    stats = limiter.statistics()
    seen.update(owner=limiter._owner, lost=stats.lost, reaped=stats.reaped)
    _say(seen)


async def victim(options: dict[str, Any], limiter: SharedCapacityLimiter, client: Any) -> None:
    for _ in range(options["hold"]):
        await limiter.acquire_on_behalf_of(object())
    await client.incrby(options["counter"], options["hold"])
    _say(("holding", limiter._owner))
    await anyio.sleep(3600)


async def fifo(options: dict[str, Any], limiter: SharedCapacityLimiter, client: Any) -> None:
    grants: list[list[list[int]]] = []
    hold = options["hold"]

    async def task(mine: list[list[int]]) -> None:
        deadline = time.monotonic() + options["duration"]
        while time.monotonic() < deadline:
            async with limiter as permit:
                mine.append([permit.ticket, permit.fencing_token])
                if hold:
                    await anyio.sleep(hold)

    async with anyio.create_task_group() as group:
        for _ in range(options["tasks"]):
            grants.append([])
            group.start_soon(task, grants[-1])
    _say({"grants": grants, "waited": limiter.statistics().acquired_after_wait})


async def pool(options: dict[str, Any], limiter: SharedCapacityLimiter, client: Any) -> None:
    total = options["total"]
    seen = {"created": 0, "violations": 0, "max": 0, "leases": 0}
    rng = random.Random(options["seed"])

    on_trio = options["backend"] == "trio"

    async def create() -> object:
        count, cancellation = await protected(lambda: client.incr("open"), on_trio)
        if cancellation is not None:  # counted, then cancelled: nothing was made
            await protected(lambda: client.decr("open"), on_trio)
            raise cancellation
        seen["created"] += 1
        seen["max"] = max(seen["max"], count)
        if count > total:
            seen["violations"] += 1
        return object()

    async def dispose(resource: object) -> None:
        # The pool runs dispose out of any cancellation's reach already.
        await client.decr("open")

    async with ResourcePool(
        options["max_size"],
        factory=create,
        dispose=dispose,
        shared_limit=limiter,
        max_idle_time=options["max_idle_time"],
        max_lifetime=options["max_lifetime"],
    ) as resources:

        async def task() -> None:
            deadline = time.monotonic() + options["duration"]
            while time.monotonic() < deadline:
                with anyio.move_on_after(rng.uniform(0.01, 0.05)):
                    async with resources.lease():
                        seen["leases"] += 1
                        await anyio.sleep(rng.uniform(0, 0.005))
                # Now and then a pause longer than max_idle_time, so that tokens move.
                await anyio.sleep(rng.choice((0.0, 0.002, 0.005, 0.05)))

        async with anyio.create_task_group() as group:
            for _ in range(options["tasks"]):
                group.start_soon(task)
        seen["size_at_end"] = resources.statistics().size
    _say(seen)


async def bench(options: dict[str, Any], limiter: SharedCapacityLimiter, client: Any) -> None:
    counts = [0] * options["tasks"]
    hold, think = options["hold"], options["think"]
    deadline = 0.0

    async def task(n: int) -> None:
        while time.monotonic() < deadline:
            async with limiter:
                counts[n] += 1
                if hold:
                    await anyio.sleep(hold)
            if think:
                await anyio.sleep(think)

    deadline = time.monotonic() + options["duration"]
    async with anyio.create_task_group() as group:
        for n in range(options["tasks"]):
            group.start_soon(task, n)
    _say({"counts": counts})


async def lock(options: dict[str, Any], client: Any) -> None:
    """The polling recipe: try each of ``total`` lock keys with SET NX PX, sleep, retry."""
    counts = [0] * options["tasks"]
    attempts = 0
    keys = [f"{options['name']}:lock:{n}" for n in range(options["total"])]
    from coredis.tokens import PureToken

    poll, hold, think = options["poll"], options["hold"], options["think"]
    px = round(options["lease"] * 1000)
    deadline = 0.0
    release = await client.script_load(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then "
        "return redis.call('DEL', KEYS[1]) end return 0"
    )

    async def task(n: int) -> None:
        nonlocal attempts
        token = os.urandom(8).hex()
        while time.monotonic() < deadline:
            for key in keys:
                attempts += 1
                if await client.set(key, token, condition=PureToken.NX, px=px):
                    counts[n] += 1
                    if hold:
                        await anyio.sleep(hold)
                    await client.evalsha(release, keys=[key], args=[token])
                    if think:
                        await anyio.sleep(think)
                    break
            else:
                await anyio.sleep(poll)

    deadline = time.monotonic() + options["duration"]
    async with anyio.create_task_group() as group:
        for n in range(options["tasks"]):
            group.start_soon(task, n)
    _say({"counts": counts, "attempts": attempts})


async def main(mode: str, options: dict[str, Any]) -> None:
    import coredis

    async with coredis.Redis.from_url(options["url"], decode_responses=True) as client:
        if mode == "lock":
            _say("ready")
            await _go()
            await lock(options, client)
            return
        limiter = SharedCapacityLimiter(
            options["url"], options["name"], options["total"], lease=options["lease"]
        )
        async with limiter.running():
            _say("ready")
            await _go()
            await {"storm": storm, "victim": victim, "fifo": fifo, "pool": pool, "bench": bench}[
                mode
            ](options, limiter, client)


def _run(mode: str, options: dict[str, Any], pipe: multiprocessing.connection.Connection) -> None:
    global _pipe
    _pipe = pipe
    anyio.run(main, mode, options, backend=options["backend"])


class Worker:
    """A worker process, and its end of the pipe."""

    def __init__(self, mode: str, options: dict[str, Any]) -> None:
        self.mode = mode
        self.pipe, theirs = _context.Pipe()
        self.process = _context.Process(target=_run, args=(mode, options, theirs), daemon=True)
        self.process.start()
        theirs.close()

    def receive(self, timeout: float = 60.0) -> Any:
        if not self.pipe.poll(timeout):
            raise AssertionError(f"{self.mode} worker said nothing within {timeout} s")
        try:
            return self.pipe.recv()
        except EOFError:
            self.process.join(5)
            raise AssertionError(
                f"{self.mode} worker exited ({self.process.exitcode}) without a word"
            ) from None

    def expect(self, message: Any, timeout: float = 60.0) -> None:
        got = self.receive(timeout)
        if got != message:
            raise AssertionError(f"{self.mode} worker said {got!r}, not {message!r}")

    def go(self) -> None:
        self.pipe.send("go")

    def report(self, timeout: float = 60.0) -> Any:
        report = self.receive(timeout)
        self.process.join(timeout)
        if self.process.exitcode != 0:
            raise AssertionError(f"{self.mode} worker exited with {self.process.exitcode}")
        return report

    def kill(self) -> None:
        """``SIGKILL``: the process dies at once, as in a crash."""
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)


class Fleet:
    """Workers started together: ``ready`` from all, then ``go`` to all."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []

    def start(self, mode: str, **options: Any) -> Worker:
        worker = Worker(mode, options)
        self.workers.append(worker)
        return worker

    def ready(self, timeout: float = 60.0) -> None:
        for worker in self.workers:
            worker.expect("ready", timeout)

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.kill()
            worker.process.join(10)
            worker.pipe.close()


@contextmanager
def fleet() -> Iterator[Fleet]:
    workers = Fleet()
    try:
        yield workers
    finally:
        workers.close()
