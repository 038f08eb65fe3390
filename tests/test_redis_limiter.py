"""SharedCapacityLimiter against a real Valkey/Redis server, on asyncio and trio.

Two limiters with the same name stand for two processes: each has its own connection and
owner id, so the server sees two independent clients. The multi-process tests (a storm with a
process killed mid-run, FIFO across processes, pools in three processes) are in
``test_redis_limiter_fleet.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import pytest
from _redis_server import RedisServer

from darwin_metrics import (
    CapacityLostError,
    PoolClosedError,
    PoolTimeoutError,
    RedisUnavailableError,
)
from darwin_metrics.redis import (
    SharedCapacityLimiter,
    SharedCapacityLimiterStatistics,
    SharedPermit,
)
from darwin_metrics.resource import ResourcePool

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.real_time,
    pytest.mark.redis,
    # coredis leaves a failed connection's memory streams unclosed (see conftest.py).
    pytest.mark.filterwarnings(
        r"ignore:Unclosed <MemoryObject(Send|Receive)Stream:ResourceWarning"
    ),
]

NAME = "test"
KEYS = {
    suffix: f"darwin-metrics:limiter:{{{NAME}}}:{suffix}"
    for suffix in ("holders", "queue", "waiters", "fences", "state", "gone")
}


def limiter(url: str, total: int = 2, **options: Any) -> SharedCapacityLimiter:
    options.setdefault("lease", 3.0)
    return SharedCapacityLimiter(url, NAME, total, **options)


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> float:
    """Poll ``condition`` (real time) until it holds; return how long that took."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        for _ in itertools.count():  # the server's doing: no event to wait for
            if condition():
                break
            await anyio.sleep(0.002)
    return anyio.current_time() - start


def on_server(server: RedisServer) -> tuple[int, int, int]:
    """(holders, queued, waiters) as the server has them."""
    counts = [server.command("ZCARD", KEYS[key]) for key in ("holders", "queue", "waiters")]
    assert all(isinstance(count, int) for count in counts)
    holders, queued, waiters = counts
    return holders, queued, waiters  # type: ignore[return-value]


async def assert_idle(server: RedisServer, *limiters: SharedCapacityLimiter) -> None:
    """Nothing is held or queued, here or on the server (releases are confirmed later)."""
    try:
        await wait_for(lambda: on_server(server) == (0, 0, 0))
    except TimeoutError:
        holders = server.command("ZRANGE", KEYS["holders"], "0", "-1")
        queued = server.command("ZRANGE", KEYS["queue"], "0", "-1")
        owners = [each._owner for each in limiters]
        raise AssertionError(f"left on the server: {holders=} {queued=} ({owners=})") from None
    fences = server.command("HLEN", KEYS["fences"])
    assert fences == 0
    for each in limiters:
        stats = each.statistics()
        assert stats.borrowed_tokens == 0, stats
        assert stats.tasks_waiting == 0, stats
        assert not each._by_member, each._by_member
        assert not each._by_borrower, each._by_borrower
        assert not each._blocks


async def finishes(body: Callable[[], Awaitable[object]], a: SharedCapacityLimiter) -> bool:
    """Run ``body`` in a task; whether it ended within 3 s. If not, ``a``'s background is
    cancelled by force (shields included), so that the test fails instead of hanging."""
    done = anyio.Event()

    async def run() -> None:
        try:
            await body()
        finally:
            done.set()

    async with anyio.create_task_group() as group:
        group.start_soon(run)
        with anyio.move_on_after(3):
            await done.wait()
        if done.is_set():
            return True
        for scope in a._shields:
            scope.cancel()
        return False


@contextlib.asynccontextmanager
async def running(*limiters: SharedCapacityLimiter) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for each in limiters:
            await stack.enter_async_context(each.running())
        yield


async def cancel_natively(task: asyncio.Future[Any], style: str, step: int, unit: float) -> None:
    """Cancel ``task`` asyncio's own way, as users' code does, and wait until it is done.

    ``"cancel"``: ``task.cancel()`` after ``step`` loop iterations; ``"timeout"`` and
    ``"wait_for"``: ``asyncio.timeout`` / ``asyncio.wait_for`` of ``step * unit`` seconds
    (``wait_for`` where ``asyncio.timeout`` does not exist, before Python 3.11). The task
    may finish first; its cancellation is not raised here.
    """
    if style == "cancel":
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    elif style == "timeout" and hasattr(asyncio, "timeout"):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(step * unit):
                await task
    else:
        assert style in ("timeout", "wait_for"), style
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, step * unit)


class TestAcquireAndRelease:
    async def test_async_with_holds_one_permit_of_the_fleets(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url)
        async with a.running():
            async with a as permit:
                assert isinstance(permit, SharedPermit)
                assert permit.held
                assert not permit.lost
                assert permit.borrower == anyio.get_current_task()
                assert permit.ticket >= 1
                assert permit.fencing_token >= 1
                assert a.borrowed_tokens == 1
                assert on_server(redis_session_server) == (1, 0, 0)
                assert "1 held here, 1/2 in the fleet" in repr(a)
            assert not permit.held
            assert a.borrowed_tokens == 0
            await assert_idle(redis_session_server, a)

    async def test_fleet_wide_limit_and_fifo_between_limiters(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url), limiter(redis_url)
        async with running(a, b):
            first = await a.acquire()
            second = await b.acquire()
            assert on_server(redis_session_server) == (2, 0, 0)
            granted: list[tuple[int, int, str]] = []

            async def take(lim: SharedCapacityLimiter, label: str) -> None:
                async with lim as permit:
                    granted.append((permit.ticket, permit.fencing_token, label))
                    await anyio.sleep(0.005)

            async with anyio.create_task_group() as group:
                for n in range(6):
                    group.start_soon(take, (a, b)[n % 2], f"t{n}")
                    await wait_for(lambda n=n: on_server(redis_session_server)[1] == n + 1)
                await wait_for(
                    lambda: a.statistics().tasks_waiting == b.statistics().tasks_waiting == 3
                )
                assert b.statistics().fleet_waiting == 6 or a.statistics().fleet_waiting == 6
                first.release()
                second.release()
            # Granted (fencing tokens are given in grant order) in the order they queued,
            # whichever limiter they used.
            granted.sort(key=lambda grant: grant[1])
            assert [label for _, _, label in granted] == [f"t{n}" for n in range(6)]
            tickets = [ticket for ticket, _, _ in granted]
            assert tickets == sorted(tickets)
            assert len({fence for _, fence, _ in granted}) == 6
            assert a.statistics().acquired_after_wait == 3
            await assert_idle(redis_session_server, a, b)

    async def test_acquire_and_release_on_behalf_of(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=3)
        async with a.running():
            borrowers = [object() for _ in range(3)]
            permits = [await a.acquire_on_behalf_of(b) for b in borrowers]
            assert [p.borrower for p in permits] == borrowers
            assert set(a.statistics().borrowers) == set(borrowers)
            assert a.available_tokens == 0
            with pytest.raises(RuntimeError, match="already holds"):
                await a.acquire_on_behalf_of(borrowers[0])
            a.release_on_behalf_of(borrowers[0])
            with pytest.raises(RuntimeError, match="holds no permit"):
                a.release_on_behalf_of(borrowers[0])
            permits[1].release()
            permits[1].release()  # idempotent
            a.release_on_behalf_of(borrowers[2])
            permits[2].release()  # released already: nothing happens
            assert a.statistics().released == 3
            await assert_idle(redis_session_server, a)

    async def test_acquire_and_release_by_the_current_task(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url)
        async with a.running():
            await a.acquire()
            with pytest.raises(RuntimeError, match="already holds"):
                await a.acquire()
            with pytest.raises(RuntimeError, match="already holds"):
                async with a:
                    pass  # pragma: no cover
            a.release()
            with pytest.raises(RuntimeError, match="holds no permit"):
                a.release()
            await assert_idle(redis_session_server, a)

    async def test_a_block_may_release_early(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=1)
        async with a.running():
            async with a as permit:
                permit.release()
                async with a:  # the permit is free again: no deadlock
                    pass
            await assert_idle(redis_session_server, a)

    async def test_try_acquire_never_queues(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        async with running(a, b):
            permit = await a.try_acquire()
            assert permit is not None
            assert permit.held
            assert await b.try_acquire() is None
            assert await b.try_acquire_on_behalf_of(object()) is None
            assert on_server(redis_session_server) == (1, 0, 0)
            # While someone waits, a free permit is the waiter's, not a newcomer's.
            async with anyio.create_task_group() as group:
                group.start_soon(b.acquire_on_behalf_of, "waiter")
                await wait_for(lambda: on_server(redis_session_server)[1] == 1)
                permit.release()
            assert b.statistics().borrowers == ("waiter",)
            assert await a.try_acquire() is None
            b.release_on_behalf_of("waiter")
            await assert_idle(redis_session_server, a, b)

    async def test_fencing_tokens_grow_with_every_grant(self, redis_url: str) -> None:
        a, b = limiter(redis_url), limiter(redis_url)
        async with running(a, b):
            seen = []
            for n in range(10):
                async with (a, b)[n % 2] as permit:
                    seen.append(permit.fencing_token)
            assert seen == sorted(seen)
            assert len(set(seen)) == 10

    async def test_fencing_tokens_keep_growing_after_the_server_forgets_everything(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        # A restart without persistence (or a promoted replica that missed the latest grants)
        # forgets the counter: a guarded resource that remembers the highest token it saw
        # must not refuse every holder after that, nor accept a stale one.
        a = limiter(redis_url, total=1)
        async with a.running():
            before = []
            for _ in range(5):
                async with a as permit:
                    before.append(permit.fencing_token)
            redis_session_server.command("FLUSHALL")
            after = []
            for _ in range(5):
                async with a as permit:
                    after.append(permit.fencing_token)
            assert before + after == sorted(before + after)
            assert len(set(before + after)) == 10
            assert min(after) > max(before)
            # Exact integers, in the grant message too (a waiter's token comes that way).
            holding = await a.acquire_on_behalf_of("holder")
            async with anyio.create_task_group() as group:
                group.start_soon(a.acquire_on_behalf_of, "waiter")
                await wait_for(lambda: a.statistics().tasks_waiting == 1)
                holding.release()
            (waiter,) = (p for p in a._by_borrower.values() if p.borrower == "waiter")
            assert isinstance(waiter.fencing_token, int)
            assert waiter.fencing_token > holding.fencing_token > max(after)
            fence = redis_session_server.command("HGET", KEYS["fences"], waiter._member)
            assert fence == str(waiter.fencing_token).encode()
            waiter.release()

    async def test_statistics_and_repr(self, redis_url: str) -> None:
        a = limiter(redis_url, total=4)
        assert "new" in repr(a)
        assert repr(a).startswith("<darwin_metrics.redis.SharedCapacityLimiter")
        async with a.running(), a:
            stats = a.statistics()
            assert isinstance(stats, SharedCapacityLimiterStatistics)
            assert stats.name == NAME
            assert (stats.total_tokens, stats.borrowed_tokens, stats.fleet_borrowed) == (4, 1, 1)
            assert stats.connected
            assert stats.connects == 1
            with pytest.raises(AttributeError):
                stats.lost = 1  # type: ignore[misc]
            assert "running" in repr(a)
        stats = a.statistics()
        assert (stats.acquired, stats.released, stats.lost, stats.cancelled) == (1, 1, 0, 0)
        assert "stopped" in repr(a)
        assert a.name == NAME
        assert a.lease == 3.0


class TestTotalTokens:
    async def test_growing_lets_waiters_in_and_shrinking_takes_nothing_back(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        async with running(a, b):
            await a.acquire_on_behalf_of("one")
            async with anyio.create_task_group() as group:
                for n in range(2):
                    group.start_soon(b.acquire_on_behalf_of, f"w{n}")
                await wait_for(lambda: on_server(redis_session_server)[1] == 2)
                a.total_tokens = 3  # both waiters get in at once
            assert b.borrowed_tokens == 2
            assert b.total_tokens == 3  # the server reports it to every limiter
            assert redis_session_server.command("HGET", KEYS["state"], "total") == b"3"
            a.total_tokens = 1  # nobody loses a permit...
            await wait_for(lambda: b.statistics().fleet_borrowed == 3 and b.total_tokens == 1)
            assert a.borrowed_tokens == 1
            assert b.borrowed_tokens == 2
            b.release_on_behalf_of("w0")
            b.release_on_behalf_of("w1")
            assert await b.try_acquire() is None  # ...but 1 is held: no room below 1
            a.release_on_behalf_of("one")
            await wait_for(lambda: on_server(redis_session_server)[0] == 0)
            assert await b.try_acquire() is not None
            b.release()
            await assert_idle(redis_session_server, a, b)

    async def test_the_last_limiter_to_start_sets_the_total(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=5)
        a.total_tokens = 6  # before running: written when it starts
        async with a.running():
            assert a.total_tokens == 6
            b = limiter(redis_url, total=2)
            async with b.running():
                assert redis_session_server.command("HGET", KEYS["state"], "total") == b"2"
                async with a:  # a learns it from its next request's reply
                    assert a.total_tokens == 2

    def test_bad_totals(self, redis_url: str) -> None:
        a = limiter(redis_url)
        with pytest.raises(ValueError, match="at least 1"):
            a.total_tokens = 0
        with pytest.raises(TypeError, match="must be an int"):
            a.total_tokens = 2.5  # type: ignore[assignment]
        with pytest.raises(ValueError, match="at most"):
            a.total_tokens = 2**60
        assert a.total_tokens == 2


class TestBadInput:
    @pytest.mark.parametrize(
        ("args", "options", "error", "match"),
        [
            (("url", "x", 0), {}, ValueError, "total_tokens must be at least 1"),
            (("url", "x", -3), {}, ValueError, "total_tokens must be at least 1"),
            (("url", "x", 2.0), {}, TypeError, "total_tokens must be an int"),
            (("url", "x", True), {}, TypeError, "total_tokens must be an int"),
            (("url", "x", "2"), {}, TypeError, "total_tokens must be an int"),
            (("url", "x", 2**53), {}, ValueError, r"total_tokens must be at most 2\*\*53 - 1"),
            (("url", b"x", 2), {}, TypeError, "name must be a str, not bytes"),
            (("url", None, 2), {}, TypeError, "name must be a str, not NoneType"),
            (("url", "", 2), {}, ValueError, "name must not be empty"),
            (("url", "x", 2), {"lease": 0.2}, ValueError, r"lease must be at least 0\.3 s"),
            (("url", "x", 2), {"lease": timedelta(milliseconds=100)}, ValueError, "renew"),
            (("url", "x", 2), {"lease": 0}, ValueError, "positive"),
            (("url", "x", 2), {"lease": "30"}, TypeError, "lease must be a number"),
            (("url", "x", 2), {"lease": float("nan")}, ValueError, "lease"),
            (("url", "x", 2), {"lease": 1e300}, ValueError, "lease must be at most 1e"),
            (("url", "x", 2), {"lease": float("inf")}, ValueError, "lease"),
            (("redis://:bad", "x", 2), {}, ValueError, "URL"),
            (("http://host", "x", 2), {}, ValueError, "must start with redis://"),
            ((42, "x", 2), {}, TypeError, "must be a URL or a coredis.Redis client, not int"),
        ],
    )
    def test_constructor_arguments(
        self,
        redis_url: str,
        args: tuple[Any, ...],
        options: dict[str, Any],
        error: type[Exception],
        match: str,
    ) -> None:
        args = tuple(redis_url if arg == "url" else arg for arg in args)
        with pytest.raises(error, match=match):
            SharedCapacityLimiter(*args, **options)

    def test_a_cluster_client_is_refused(self) -> None:
        cluster = coredis.RedisCluster("localhost", 7000)  # never connected
        with pytest.raises(TypeError, match="RedisCluster"):
            SharedCapacityLimiter(cluster, "x", 2)

    async def test_a_socket_nobody_listens_on(self, redis_server: RedisServer) -> None:
        url = redis_server.url
        redis_server.stop()
        a = limiter(url)
        with pytest.raises(RedisUnavailableError, match="could not connect") as info:
            async with a.running():
                pass  # pragma: no cover
        assert isinstance(info.value, ConnectionError)
        assert url.removeprefix("unix://") in str(info.value)
        assert "stopped" in repr(a)
        with pytest.raises(RuntimeError, match="runs once"):
            async with a.running():
                pass  # pragma: no cover
        with pytest.raises(RuntimeError, match="stopped"):
            await a.acquire()

    async def test_a_host_that_refuses(self) -> None:
        with pytest.raises(RedisUnavailableError, match=r"127\.0\.0\.1"):
            async with limiter("redis://127.0.0.1:1/0").running():
                pass  # pragma: no cover

    async def test_a_server_that_wants_a_password(self, redis_binary: Any) -> None:
        with RedisServer(redis_binary, extra_args=("--requirepass", "secret")) as server:
            with pytest.raises(RedisUnavailableError, match=r"(?i)auth"):
                async with limiter(server.url).running():
                    pass  # pragma: no cover
            user, _, path = server.url.partition("//")
            async with limiter(f"{user}//:secret@{path}").running() as ok, ok:
                assert ok.borrowed_tokens == 1

    async def test_a_client_lends_its_settings(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        client = coredis.Redis.from_url(redis_url, decode_responses=True)
        async with limiter(client).running() as a, a:  # the client need not be entered
            assert on_server(redis_session_server)[0] == 1
            names = redis_session_server.command("CLIENT", "LIST")
            assert isinstance(names, bytes)
            assert b"name=darwin-metrics-limiter" in names

    async def test_misuse_raises(self, redis_url: str) -> None:
        a = limiter(redis_url)
        with pytest.raises(RuntimeError, match="not running"):
            await a.acquire()
        with pytest.raises(RuntimeError, match="not running"):
            async with a:
                pass  # pragma: no cover
        with pytest.raises(RuntimeError, match="not running"):
            await a._stop(None, None, None)
        async with a.running():
            with pytest.raises(RuntimeError, match="runs once"):
                async with a.running():
                    pass  # pragma: no cover
            with pytest.raises(RuntimeError, match="did not enter"):
                await a.__aexit__(None, None, None)
            with pytest.raises(TypeError, match="callable"):
                (await a.acquire()).on_lost(42)  # type: ignore[arg-type]
            a.release()
        with pytest.raises(RuntimeError, match="stopped"):
            await a.try_acquire()
        a.release_on_behalf_of("anyone")  # stopped: everything was given back already

    async def test_another_thread_is_refused(self, redis_url: str) -> None:
        a = limiter(redis_url)
        async with a.running():
            permit = await a.acquire()
            errors: list[BaseException] = []

            def attempt(call: Callable[[], object]) -> None:
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(exc)

            def elsewhere() -> None:
                attempt(permit.release)
                attempt(a.release)
                attempt(lambda: setattr(a, "total_tokens", 3))

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
            assert len(errors) == 3
            assert all("thread" in str(error) for error in errors)
            assert permit.held
            permit.release()


class TestLeases:
    async def test_a_dead_holders_permit_returns_within_one_lease(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=1)
        async with a.running():
            # A holder of another process that will never renew: its deadline in 0.4 s.
            now = redis_session_server.command("TIME")
            assert isinstance(now, list)
            ms = int(now[0]) * 1000 + int(now[1]) // 1000
            redis_session_server.command("ZADD", KEYS["holders"], str(ms + 400), "dead:1")
            redis_session_server.command("HSET", KEYS["fences"], "dead:1", "1")
            start = anyio.current_time()
            async with a:  # granted when the dead holder's lease runs out: no polling
                waited = anyio.current_time() - start
            assert 0.3 <= waited <= 0.8  # at its deadline (0.4 s), not at the next renewal
            stats = a.statistics()
            assert stats.reaped == 1
            assert stats.acquired_after_wait == 1
            await assert_idle(redis_session_server, a)

    async def test_a_dead_waiter_does_not_block_the_queue(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        async with running(a, b):
            holding = await a.acquire_on_behalf_of("holder")
            # A waiter of a process that died, ahead of ours.
            redis_session_server.command("ZADD", KEYS["queue"], "0", "dead:1")
            redis_session_server.command("ZADD", KEYS["waiters"], "1", "dead:1")
            async with anyio.create_task_group() as group:
                group.start_soon(b.acquire_on_behalf_of, "next")
                await wait_for(lambda: b.statistics().tasks_waiting == 1)
                holding.release()
            assert b.statistics().borrowers == ("next",)
            b.release_on_behalf_of("next")
            await assert_idle(redis_session_server, a, b)

    async def test_holders_renew_and_keep_their_permits(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=1, lease=0.9)
        async with a.running(), a as permit:
            await anyio.sleep(2.0)  # more than two leases
            assert permit.held
            assert a.statistics().renewals >= 4
            assert on_server(redis_session_server) == (1, 0, 0)

    async def test_a_permit_gone_from_the_server_is_lost_and_its_block_cancelled(
        self, redis_url: str, redis_session_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        a = limiter(redis_url, total=1, lease=0.9)
        noticed: list[str] = []
        async with a.running():
            outcome: list[BaseException] = []
            try:
                async with a as permit:
                    permit.on_lost(lambda: noticed.append("lost"))
                    redis_session_server.command("DEL", KEYS["holders"])
                    await anyio.sleep(5)  # cancelled at the next renewal
            except CapacityLostError as exc:
                outcome.append(exc)
            assert "lost" in str(outcome[0])
            assert permit.lost
            assert not permit.held
            assert noticed == ["lost"]
            permit.on_lost(lambda: noticed.append("late"))  # lost already: called at once
            assert noticed == ["lost", "late"]
            assert a.statistics().lost == 1
            assert "was lost" in caplog.text
            async with a:  # the limiter goes on
                pass
            await assert_idle(redis_session_server, a)

    async def test_a_partition_longer_than_a_lease_loses_the_permit(
        self, redis_server: RedisServer
    ) -> None:
        a = limiter(redis_server.url, total=1, lease=0.6)
        async with a.running():
            permit = await a.acquire()
            failed: list[BaseException] = []

            async def wait() -> None:
                try:
                    await a.acquire_on_behalf_of("waiter")
                except RedisUnavailableError as exc:
                    failed.append(exc)

            async with anyio.create_task_group() as group:
                group.start_soon(wait)
                await wait_for(lambda: a.statistics().tasks_waiting == 1)
                with anyio.CancelScope() as scope:
                    permit.on_lost(scope.cancel)
                    redis_server.pause()  # the process can no longer reach the server
                    try:
                        await anyio.sleep(5)
                    finally:
                        redis_server.resume()
            assert scope.cancelled_caught
            assert permit.lost
            assert a.statistics().lost == 1
            # The waiter's place lapsed with its lease too: it was told so.
            assert "whole lease" in str(failed[0])
            assert a.statistics().tasks_waiting == 0
            a.release()  # takes the lost permit back here; frees nothing on the server
            # The connection is replaced, and the limiter works again.
            await wait_for(lambda: a.statistics().connected, timeout=5)
            async with a:
                pass
            assert a.statistics().connects >= 2
            await assert_idle(redis_server, a)

    async def test_renewals_the_server_refuses_lose_the_permit_before_it_is_regranted(
        self, redis_server: RedisServer
    ) -> None:
        # The connection stays up, but the server refuses every script (here by ACL; READONLY
        # after a failover, or OOM, look the same): the server reaps our permit after its
        # lease, so this process must stop believing it holds it by then.
        a, b = limiter(redis_server.url, total=1, lease=0.6), limiter(redis_server.url, total=1)
        async with running(a, b):
            permit = await a.acquire()
            failed: list[BaseException] = []

            async def wait() -> None:
                try:
                    await a.acquire_on_behalf_of("waiter")
                except RedisUnavailableError as exc:
                    failed.append(exc)

            events: list[str] = []
            with anyio.fail_after(15):  # (without the fix the waiter waited for ever)
                async with anyio.create_task_group() as group:
                    group.start_soon(wait)
                    await wait_for(lambda: a.statistics().tasks_waiting == 1)
                    permit.on_lost(lambda: events.append("lost"))
                    redis_server.command("ACL", "SETUSER", "default", "-evalsha", "-eval")
                    try:
                        await anyio.sleep(0.6 + 0.3)  # the server's deadlines for a pass
                    finally:
                        redis_server.command("ACL", "SETUSER", "default", "+@all")
                    await b.acquire()  # the server reaps a's permit and grants it to b...
                    events.append("granted elsewhere")
            # ...by then, a had let it go, and its waiter was told its place had lapsed.
            assert events == ["lost", "granted elsewhere"]
            assert permit.lost
            assert a.statistics().lost == 1
            # The waiter's place lapsed with its lease too: it was told so.
            assert "whole lease" in str(failed[0])
            assert a.statistics().tasks_waiting == 0
            a.release()
            b.release()
            async with a:
                pass
            await assert_idle(redis_server, a, b)

    async def test_waiters_survive_a_reconnect(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        async with running(a, b):
            holding = await a.acquire_on_behalf_of("holder")
            async with anyio.create_task_group() as group:
                group.start_soon(b.acquire_on_behalf_of, "waiter")
                await wait_for(lambda: b.statistics().tasks_waiting == 1)
                # The waiter's connection drops; the grant is published while it is down.
                redis_session_server.command("CLIENT", "KILL", "TYPE", "pubsub")
                holding.release()
            assert b.statistics().borrowers == ("waiter",)
            assert b.statistics().disconnects >= 1
            b.release_on_behalf_of("waiter")
            await assert_idle(redis_session_server, a, b)

    async def test_the_server_restarting_loses_nothing_it_can_keep(
        self, redis_server: RedisServer
    ) -> None:
        a = limiter(redis_server.url, total=1)
        async with a.running():
            lost = []
            try:
                async with a:
                    redis_server.restart()  # the server forgets every permit
                    await anyio.sleep(10)  # cancelled once the limiter learns it
            except CapacityLostError as exc:
                lost.append(exc)
            assert lost
            await wait_for(lambda: a.statistics().connected, timeout=5)
            async with a:
                assert on_server(redis_server)[0] == 1
            await assert_idle(redis_server, a)

    async def test_acquire_without_a_connection_fails_fast(
        self, redis_server: RedisServer
    ) -> None:
        a = limiter(redis_server.url)
        async with a.running():
            redis_server.stop()
            await wait_for(lambda: not a.statistics().connected)
            with pytest.raises(RedisUnavailableError, match="no connection"):
                await a.acquire()
            assert "reconnecting" in repr(a)
            redis_server.start()
            await wait_for(lambda: a.statistics().connected, timeout=5)
            async with a:
                pass

    async def test_stopping_while_reconnecting_still_gives_back(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        # The connection drops just as the limiter stops: its releases go out once it is
        # back (within the 5 s the exit waits), not a lease (here 20 s) later.
        a = limiter(redis_url, total=2, lease=20.0)
        async with a.running():
            await a.acquire_on_behalf_of("still held at the exit")
            async with a:
                redis_session_server.command("CLIENT", "KILL", "TYPE", "pubsub")
            await wait_for(lambda: not a.statistics().connected)
        assert on_server(redis_session_server)[0] == 0
        await assert_idle(redis_session_server)

    async def test_stopping_gives_back_what_is_still_held(
        self,
        redis_url: str,
        redis_session_server: RedisServer,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        outcome: list[BaseException] = []

        async def hold_in_a_block() -> None:
            try:
                async with a:
                    await anyio.sleep(10)
            except CapacityLostError as exc:
                outcome.append(exc)

        async with b.running(), anyio.create_task_group() as group:
            async with a.running():
                group.start_soon(hold_in_a_block)
                await wait_for(lambda: a.borrowed_tokens == 1)
                group.start_soon(b.acquire_on_behalf_of, "waiter")
                await wait_for(lambda: b.statistics().tasks_waiting == 1)
            # a stopped: its block is cancelled, b's waiter is granted the permit.
            await wait_for(lambda: b.borrowed_tokens == 1)
            b.release_on_behalf_of("waiter")
        assert isinstance(outcome[0], CapacityLostError)
        assert "stopped while this block held" in str(outcome[0])
        assert "still held" in caplog.text
        await assert_idle(redis_session_server, b)


class TestCancellation:
    async def test_cancel_scopes_at_every_moment_of_a_contended_acquire(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        async with running(a, b):
            for step in range(25):
                holding = await a.acquire_on_behalf_of("holder")
                got: list[SharedPermit] = []

                async def take(step: int = step, got: list[SharedPermit] = got) -> None:
                    with anyio.move_on_after(step * 0.0004):
                        got.append(await b.acquire())

                async with anyio.create_task_group() as group:
                    group.start_soon(take)
                    await anyio.sleep(step * 0.0002)
                    holding.release()
                # The permit went to the waiter, or back: never lost.
                for permit in got:
                    permit.release()
                await assert_idle(redis_session_server, a, b)
            assert b.statistics().cancelled > 0

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_asyncio_cancellation_at_every_await(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        async with running(a, b):
            outcomes = set()
            for style, step in itertools.product(("cancel", "timeout", "wait_for"), range(40)):
                holding = await a.acquire_on_behalf_of("holder")
                release_at = step % 7

                async def take() -> None:
                    async with b:
                        await asyncio.sleep(0)

                async def release_soon(
                    release_at: int = release_at, holding: SharedPermit = holding
                ) -> None:
                    for _ in range(release_at):
                        await asyncio.sleep(0)
                    holding.release()

                helper = asyncio.ensure_future(release_soon())
                task = asyncio.ensure_future(take())
                await cancel_natively(task, style, step, 0.0003)
                await helper
                outcomes.add(task.cancelled())
                await assert_idle(redis_session_server, a, b)
            assert outcomes == {True, False}  # some were cut short, some got through

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_cancellation_of_an_uncontended_acquire(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=1)
        async with a.running():
            for step in range(12):
                task = asyncio.ensure_future(a.acquire_on_behalf_of("x"))
                for _ in range(step):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    permit = await task
                except asyncio.CancelledError:
                    pass
                else:
                    permit.release()
                await assert_idle(redis_session_server, a)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_release_and_exit_are_never_interrupted(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=1)
        async with a.running():

            async def block() -> None:
                async with a:
                    task = asyncio.current_task()
                    assert task is not None
                    task.cancel()  # pending when the block exits

            with pytest.raises(asyncio.CancelledError):
                await asyncio.ensure_future(block())
            await assert_idle(redis_session_server, a)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_cancellation_of_running(self, redis_server: RedisServer) -> None:
        before = asyncio.all_tasks()
        redis_server.pause()
        try:
            a = limiter(redis_server.url, lease=1.5)
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await asyncio.wait_for(a.running().__aenter__(), 0.2)
            assert "stopped" in repr(a)
        finally:
            redis_server.resume()
        await asyncio.sleep(0.05)
        assert asyncio.all_tasks() <= before

    async def test_cancelling_the_entry_of_running_at_every_moment(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        # Cancelled while it connects (before or after the connection is up): entering
        # raises the cancellation at once and leaves nothing running.
        stuck, entered = [], 0
        for step in range(40):
            a = limiter(redis_url)
            delay = step * 0.0002 if step < 39 else 1.0  # the last one gets in

            async def enter(a: SharedCapacityLimiter = a, delay: float = delay) -> None:
                nonlocal entered
                with anyio.move_on_after(delay):
                    async with a.running():
                        entered += 1

            if not await finishes(enter, a):
                stuck.append(step)
                break
            assert "stopped" in repr(a)
        assert not stuck, f"entering running() hung when cancelled at steps {stuck}"
        assert 0 < entered < 40  # some were cut short, some got in
        await assert_idle(redis_session_server)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_cancellation_of_the_entry_of_running_at_every_await(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        before = asyncio.all_tasks()
        stuck = []
        for style, step in itertools.product(("cancel", "wait_for"), range(30)):
            a = limiter(redis_url)

            async def enter(a: SharedCapacityLimiter = a) -> None:
                async with a.running():
                    await asyncio.sleep(0)

            async def cancel(
                a: SharedCapacityLimiter = a, style: str = style, step: int = step
            ) -> None:
                task = asyncio.ensure_future(enter(a))
                await cancel_natively(task, style, step, 0.0002)

            if not await finishes(cancel, a):
                stuck.append((style, step))
                break
        assert not stuck, f"entering running() hung when cancelled at {stuck}"
        await asyncio.sleep(0.05)
        assert asyncio.all_tasks() <= before
        await assert_idle(redis_session_server)

    async def test_stopping_under_cancellation_still_gives_back(
        self, redis_url: str, redis_session_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING)
        a = limiter(redis_url, total=2)
        with anyio.CancelScope() as scope:
            async with a.running():
                await a.acquire_on_behalf_of("forgotten")
                scope.cancel()
        await assert_idle(redis_session_server)


class Connections:
    """A factory and dispose hook that note what exists, and the fleet's count at each step."""

    def __init__(self, server: RedisServer, limiter: SharedCapacityLimiter | None = None) -> None:
        self.server = server
        self.limiter = limiter
        self.made = 0
        self.open: set[int] = set()
        self.held_at_dispose: list[int] = []
        self.fail_next = False

    async def create(self) -> int:
        await anyio.lowlevel.checkpoint()
        if self.fail_next:
            self.fail_next = False
            raise OSError("the database refused the connection")
        self.made += 1
        self.open.add(self.made)
        return self.made

    async def dispose(self, resource: int) -> None:
        # The resource's token is still held while it is being closed.
        if self.limiter is not None:
            self.held_at_dispose.append(self.limiter.borrowed_tokens)
        await anyio.sleep(0.01)
        self.open.discard(resource)


class TestPoolSharedLimit:
    async def test_a_token_per_resource_from_creation_to_disposal(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=3)
        hooks = Connections(redis_session_server, a)
        async with a.running():
            pool = ResourcePool(
                3, factory=hooks.create, dispose=hooks.dispose, shared_limit=a, max_idle_time=0.2
            )
            async with pool:
                async with pool.lease(), pool.lease():
                    assert on_server(redis_session_server)[0] == 2
                # Idle resources keep their tokens...
                assert pool.statistics().idle == 2
                assert a.borrowed_tokens == 2
                # ...until idle reaping disposes them.
                await wait_for(lambda: pool.statistics().size == 0)
                await wait_for(lambda: on_server(redis_session_server)[0] == 0)
                assert hooks.held_at_dispose == [2, 1]
                assert pool.statistics().disposals.idle == 2
                async with pool.lease():
                    pass
            assert not hooks.open
            await assert_idle(redis_session_server, a)

    async def test_waiting_for_a_token_is_bounded_by_the_timeout(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        hooks = Connections(redis_session_server)
        async with running(a, b):
            elsewhere = await b.acquire_on_behalf_of("another process")
            async with ResourcePool(2, factory=hooks.create, shared_limit=a) as pool:
                with pytest.raises(PoolTimeoutError):
                    await pool.acquire(timeout=0.1)
                stats = pool.statistics()
                assert (stats.size, stats.timeouts, stats.factory_errors) == (0, 1, 0)
                assert hooks.made == 0
                # Cancelled while it waits: nothing made, nothing held.
                with anyio.move_on_after(0.05):
                    await pool.acquire()
                assert a.statistics().tasks_waiting == 0
                elsewhere.release()
                async with pool.lease() as conn:  # the token is free now
                    assert conn == 1
            await assert_idle(redis_session_server, a, b)

    async def test_a_failed_creation_gives_its_token_back_at_once(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a = limiter(redis_url, total=1)
        hooks = Connections(redis_session_server)
        async with a.running(), ResourcePool(1, factory=hooks.create, shared_limit=a) as pool:
            hooks.fail_next = True
            with pytest.raises(OSError, match="refused"):
                await pool.acquire()
            assert pool.statistics().factory_errors == 1
            await wait_for(lambda: on_server(redis_session_server)[0] == 0)
            assert a.borrowed_tokens == 0
            async with pool.lease():
                assert on_server(redis_session_server)[0] == 1

    async def test_a_creation_waiting_for_a_token_takes_a_resource_that_comes_back(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=2), limiter(redis_url, total=2)
        hooks = Connections(redis_session_server)
        async with running(a, b):
            await b.acquire_on_behalf_of("another process")
            async with ResourcePool(3, factory=hooks.create, shared_limit=a) as pool:
                first = await pool.acquire()
                got: list[int] = []

                async def second() -> None:
                    got.append(await pool.acquire(timeout=5))  # no token: it waits

                async with anyio.create_task_group() as group:
                    group.start_soon(second)
                    await wait_for(lambda: a.statistics().tasks_waiting == 1)
                    await pool.release(first)  # ...and takes this one instead
                assert got == [first]
                assert hooks.made == 1
                assert a.statistics().cancelled == 1  # the wait gave way
                await pool.release(got[0])
                b.release_on_behalf_of("another process")
            await assert_idle(redis_session_server, a, b)

    async def test_closing_ends_creations_waiting_for_a_token(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        hooks = Connections(redis_session_server)
        async with running(a, b):
            await b.acquire_on_behalf_of("another process")
            pool = ResourcePool(2, factory=hooks.create, shared_limit=a)
            errors: list[BaseException] = []

            async def acquire() -> None:
                try:
                    await pool.acquire()
                except PoolClosedError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as group:
                group.start_soon(acquire)
                await wait_for(lambda: a.statistics().tasks_waiting == 1)
                await pool.aclose()
            assert len(errors) == 1
            b.release_on_behalf_of("another process")
            await assert_idle(redis_session_server, a, b)

    async def test_prefill_takes_only_free_tokens(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=3), limiter(redis_url, total=3)
        hooks = Connections(redis_session_server)
        async with running(a, b):
            taken = [await b.acquire_on_behalf_of(n) for n in range(2)]
            pool = ResourcePool(3, factory=hooks.create, shared_limit=a, min_idle=3)
            async with pool:  # one token free: one made, and entering does not wait
                assert pool.statistics().idle == 1
                assert a.statistics().tasks_waiting == 0
                for permit in taken:
                    permit.release()
                # Upkeep tries again (with backoff) and fills up once tokens are free.
                await wait_for(lambda: pool.statistics().idle == 3, timeout=5)
            await assert_idle(redis_session_server, a, b)

    async def test_a_lost_token_disposes_its_resource(
        self, redis_url: str, redis_session_server: RedisServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        a = limiter(redis_url, total=3, lease=0.9)
        hooks = Connections(redis_session_server)
        async with a.running():
            pool = ResourcePool(3, factory=hooks.create, dispose=hooks.dispose, shared_limit=a)
            async with pool:
                leased = await pool.acquire()
                async with pool.lease():
                    pass  # one idle, one leased
                redis_session_server.command("DEL", KEYS["holders"])  # both tokens gone
                await wait_for(lambda: a.statistics().lost == 2)
                idle = next(iter(hooks.open - {leased}))
                await wait_for(lambda: idle not in hooks.open)  # upkeep disposed it
                assert pool.statistics().idle == 0
                await pool.release(leased)  # and the leased one goes when it comes back
                stats = pool.statistics()
                assert stats.disposals.limit_lost == 2
                assert stats.size == 0
                assert not hooks.open
                assert "token of its shared limit was lost" in caplog.text
                async with pool.lease():  # a new one, under a new token
                    assert a.borrowed_tokens == 1
            await assert_idle(redis_session_server, a)

    async def test_a_limiter_that_stops_first_takes_its_pools_resources_with_it(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        # The pool outlives its limiter's 'running()' block: the limiter gives every permit
        # back as it stops, so the pool must not keep (or hand out) what they stood for.
        a, b = limiter(redis_url, total=2), limiter(redis_url, total=2)
        hooks = Connections(redis_session_server)
        async with b.running():
            pool = ResourcePool(2, factory=hooks.create, dispose=hooks.dispose, shared_limit=a)
            async with pool:
                async with a.running():
                    leased = await pool.acquire()
                    async with pool.lease():
                        pass  # one idle, one leased
                    assert a.borrowed_tokens == 2
                # Both permits are free on the server now: another process takes them...
                taken = [await b.acquire_on_behalf_of(n) for n in range(2)]
                assert len(taken) == 2
                # ...so the idle resource goes at once (upkeep), the leased one when it returns.
                idle = next(iter(hooks.open - {leased}))
                await wait_for(lambda: idle not in hooks.open)
                assert pool.statistics().idle == 0
                await pool.release(leased)
                assert not hooks.open
                assert pool.statistics().disposals.limit_lost == 2
                with pytest.raises(RuntimeError, match="stopped"):
                    await pool.acquire()  # no resource without a permit
                for permit in taken:
                    permit.release()
            await assert_idle(redis_session_server, b)

    async def test_bad_shared_limits(self, redis_url: str) -> None:
        with pytest.raises(TypeError, match="shared_limit must be a SharedCapacityLimiter"):
            ResourcePool(2, factory=object, shared_limit=anyio.CapacityLimiter(2))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="needs a factory"):
            ResourcePool(2, shared_limit=limiter(redis_url))
        a = limiter(redis_url)
        async with a.running(), ResourcePool(2, factory=object, shared_limit=a) as pool:
            with pytest.raises(ValueError, match="only the resources its factory made"):
                await pool.release(object())
            assert pool.statistics().size == 0

    async def test_cancellation_at_every_moment_of_a_wait_for_a_token(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        hooks = Connections(redis_session_server)
        async with running(a, b), ResourcePool(1, factory=hooks.create, shared_limit=a) as pool:
            for step in range(20):
                elsewhere = await b.acquire_on_behalf_of("another process")

                async def take(step: int = step) -> None:
                    with anyio.move_on_after(step * 0.0004):
                        async with pool.lease():
                            pass

                async with anyio.create_task_group() as group:
                    group.start_soon(take)
                    await anyio.sleep(step * 0.0002)
                    elsewhere.release()
                # Whatever happened, the pool and the fleet agree.
                await wait_for(
                    lambda: on_server(redis_session_server)[0] == pool.statistics().size
                )
                assert a.borrowed_tokens == pool.statistics().size
                await pool.drain()
                await assert_idle(redis_session_server, a, b)

    @pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
    async def test_native_cancellation_of_a_wait_for_a_token(
        self, redis_url: str, redis_session_server: RedisServer
    ) -> None:
        a, b = limiter(redis_url, total=1), limiter(redis_url, total=1)
        hooks = Connections(redis_session_server)
        async with running(a, b), ResourcePool(1, factory=hooks.create, shared_limit=a) as pool:
            for style, step in itertools.product(("cancel", "wait_for"), range(25)):
                elsewhere = await b.acquire_on_behalf_of("another process")

                async def take() -> None:
                    async with pool.lease():
                        await asyncio.sleep(0)

                task = asyncio.ensure_future(take())
                for _ in range(step % 5):
                    await asyncio.sleep(0)
                elsewhere.release()
                await cancel_natively(task, style, step, 0.0003)
                await wait_for(
                    lambda: on_server(redis_session_server)[0] == pool.statistics().size
                )
                await pool.drain()
                await assert_idle(redis_session_server, a, b)
