"""Tests of ``@cached``: single flight on asyncio, trio and threads, keys, methods, options,
misuse, and the types the decorated function keeps (checked by mypy)."""

from __future__ import annotations

import functools
import gc
import inspect
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from darwin_metrics.resource import Cache, cached

ROOT = Path(__file__).resolve().parent.parent


def loop_cache(ttl: float = 60, **options: Any) -> Cache[Any, Any]:
    return Cache(ttl, clock=anyio.current_time, **options)


@pytest.mark.anyio
class TestAsync:
    async def test_single_flight_per_key(self) -> None:
        cache = loop_cache()
        calls: list[int] = []

        @cached(cache)
        async def square(x: int) -> int:
            calls.append(x)
            await anyio.sleep(1)
            return x * x

        results: list[int] = []

        async def call(x: int) -> None:
            results.append(await square(x))

        async with anyio.create_task_group() as group:
            for n in range(30):
                group.start_soon(call, n % 3)
        assert sorted(calls) == [0, 1, 2]
        assert sorted(results) == sorted([0, 1, 4] * 10)
        assert await square(2) == 4  # a hit
        info = square.cache_info()
        assert (info.hits, info.misses, info.loads, info.joined) == (1, 30, 3, 27)
        assert square.cache is cache
        assert cache.get(2) == 4  # a one-parameter function's key is its argument

    async def test_a_hit_is_not_a_checkpoint_a_miss_is(self) -> None:
        @cached(loop_cache())
        async def answer(x: int) -> int:
            return 42

        await answer(1)
        with anyio.CancelScope() as scope:
            scope.cancel()
            assert await answer(1) == 42
            await answer(2)
            pytest.fail("a miss did not check for cancellation")  # pragma: no cover
        assert scope.cancelled_caught

    async def test_an_error_reaches_every_caller_and_is_not_cached(self) -> None:
        calls = 0

        @cached(loop_cache())
        async def fail(x: int) -> int:
            nonlocal calls
            calls += 1
            await anyio.sleep(1)
            raise LookupError(x)

        errors: list[BaseException] = []

        async def call() -> None:
            with pytest.raises(LookupError) as info:
                await fail(1)
            errors.append(info.value)

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(call)
        assert calls == 1
        assert all(error is errors[0] for error in errors)
        with pytest.raises(LookupError):
            await fail(1)
        assert calls == 2

    async def test_a_cancelled_call_hands_over(self) -> None:
        calls = 0

        @cached(loop_cache())
        async def slow(x: int) -> int:
            nonlocal calls
            calls += 1
            await anyio.sleep(5 if calls == 1 else 1)
            return calls

        results: list[int] = []

        async def waiter() -> None:
            results.append(await slow(1))

        async with anyio.create_task_group() as group:
            with anyio.move_on_after(2):
                group.start_soon(waiter)
                await slow(1)
        assert results == [2]
        assert slow.cache._async_flights == {}

    async def test_invalidate(self) -> None:
        calls = 0

        @cached(loop_cache())
        async def load(x: int, y: int = 0) -> int:
            nonlocal calls
            calls += 1
            return x + y

        assert await load(1) == 1
        assert load.invalidate(1) is True
        assert load.invalidate(1) is False
        await load(1, y=0)
        assert load.invalidate(x=1) is True  # the same key, however the arguments are given
        assert calls == 2

    async def test_refresh_ahead(self) -> None:
        cache = loop_cache(10)
        version = 0

        @cached(cache, refresh_after=4)
        async def config(name: str) -> str:
            nonlocal version
            version += 1
            await anyio.sleep(1)
            return f"{name} v{version}"

        async with cache.refreshing():
            assert await config("db") == "db v1"  # t=1
            await anyio.sleep(5)  # t=6: due
            started = anyio.current_time()
            assert await config("db") == "db v1"
            assert anyio.current_time() == started
            await anyio.sleep(2)
            assert await config("db") == "db v2"
        assert cache.statistics().refreshes == 1

    async def test_stale_if_error_cache_if_and_ttl(self) -> None:
        cache = loop_cache(100)
        answers: list[Any] = ["v1", RuntimeError("down"), None, None]

        @cached(cache, ttl=lambda value: 1 if value is None else 10, stale_if_error=30)
        async def fetch(key: str) -> str | None:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer  # type: ignore[no-any-return]

        assert await fetch("k") == "v1"
        await anyio.sleep(11)
        assert await fetch("k") == "v1"  # the call failed: the expired value, 1 s old
        assert await fetch("k") is None  # stored for 1 s
        assert await fetch("k") is None
        await anyio.sleep(1)
        assert answers == [None]
        assert cache.statistics().stale_served == 1

        @cached(cache, key=lambda key: ("negative", key), cache_if=lambda value: bool(value))
        async def maybe(key: str) -> str:
            return ""

        assert await maybe("x") == ""
        assert ("negative", "x") not in cache

    async def test_keeps_its_signature_and_kind(self) -> None:
        async def original(a: int, b: str = "x", *, c: bool = False) -> str:
            """Documented."""
            return f"{a}{b}{c}"

        decorated = cached(loop_cache())(original)
        assert inspect.iscoroutinefunction(decorated)
        assert inspect.signature(decorated) == inspect.signature(original)
        assert decorated.__name__ == "original"
        assert decorated.__doc__ == "Documented."
        assert decorated.__wrapped__ is original  # type: ignore[attr-defined]
        assert await decorated(1, c=True) == "1xTrue"
        assert await decorated(1, "x", c=True) == "1xTrue"
        assert decorated.cache_info().loads == 1

    async def test_a_partial_of_an_async_function_is_async(self) -> None:
        async def add(x: int, y: int) -> int:
            return x + y

        add_one = cached(loop_cache())(functools.partial(add, 1))
        assert await add_one(2) == 3
        assert inspect.iscoroutinefunction(add_one)

    async def test_an_object_with_an_async_call(self) -> None:
        class Fetcher:
            async def __call__(self, key: str) -> str:
                return key.upper()

        fetch = cached(loop_cache(), key=lambda key: key)(Fetcher())
        assert await fetch("a") == "A"
        assert fetch.cache.get("a") == "A"


class TestKeys:
    def test_positional_keyword_and_defaults_are_one_key(self) -> None:
        calls = 0

        @cached(Cache(60))
        def area(width: int, height: int = 2, /, *_: Any) -> int:
            raise AssertionError("not this one")  # pragma: no cover

        @cached(Cache(60))
        def volume(x: int, y: int = 2, z: int = 3) -> int:
            nonlocal calls
            calls += 1
            return x * y * z

        assert volume(1) == volume(1, 2) == volume(1, 2, 3) == volume(x=1) == 6
        assert volume(1, z=3, y=2) == volume(z=3, x=1) == 6
        assert calls == 1
        assert volume(1, 3) == 9
        assert calls == 2
        assert volume.cache.keys() == [(1, 2, 3), (1, 3, 3)]
        assert area.cache is not volume.cache

    def test_parameter_names_of_any_kind(self) -> None:
        calls = 0

        @cached(Cache(60))
        def f(key: int, cache: int = 1, entry: int = 2, /, value: int = 3) -> int:
            nonlocal calls
            calls += 1
            return key + cache + entry + value

        @cached(Cache(60))
        def g(_dm_key: int) -> int:  # a name of the generated code's: the general wrapper
            return -_dm_key

        assert f(1) == f(1, 1, 2) == f(1, value=3) == 7
        assert calls == 1
        assert f.cache.keys() == [(1, 1, 2, 3)]
        assert f.invalidate(1, 1, 2, value=3)
        assert g(2) == g(_dm_key=2) == -2
        assert g.cache.keys() == [2]
        assert f.__name__ == "f"
        assert g.__name__ == "g"

    def test_mutable_defaults_are_the_functions_own(self) -> None:
        marker: list[int] = []

        @cached(Cache(60), key=lambda x, into=marker: x)
        def fill(x: int, into: list[int] = marker) -> int:
            into.append(x)
            return len(into)

        @cached(Cache(60))
        def same(x: int, into: tuple[int, ...] = (1, 2)) -> tuple[int, ...]:
            return into

        assert fill(1) == 1
        assert marker == [1]
        assert same(0) is same.__wrapped__(0)  # type: ignore[attr-defined]

    def test_general_signatures(self) -> None:
        calls = 0

        @cached(Cache(60))
        def f(a: int, *rest: int, flag: bool = False, **extra: int) -> int:
            nonlocal calls
            calls += 1
            return a + sum(rest) + sum(extra.values())

        assert f(1, 2, 3) == f(1, 2, 3, flag=False) == 6
        assert f(1, x=1, y=2) == f(1, y=2, x=1) == 4
        assert calls == 2
        assert f(1, 2, 3, flag=True) == 6
        assert calls == 3

    def test_wrong_arguments_are_the_functions_type_error(self) -> None:
        @cached(Cache(60))
        def one(x: int) -> int:
            return x  # pragma: no cover

        @cached(Cache(60))
        def general(x: int, *, flag: bool = False) -> int:
            return x  # pragma: no cover

        for function in (one, general):
            with pytest.raises(TypeError, match="positional"):
                function(1, 2)  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="missing"):
                function()  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="unexpected keyword"):
                function(1, y=2)  # type: ignore[call-arg]
            with pytest.raises(TypeError, match="multiple values"):
                function(1, x=2)  # type: ignore[misc]
        assert one.cache_info().misses == general.cache_info().misses == 0

    def test_positional_only_parameters_are_not_keywords(self) -> None:
        @cached(Cache(60))
        def f(x: int, /, y: int = 0) -> int:
            return x + y  # pragma: no cover

        with pytest.raises(TypeError):
            f(x=1)  # type: ignore[call-arg]

    def test_unhashable_arguments(self) -> None:
        @cached(Cache(60))
        def total(values: list[int]) -> int:
            return sum(values)  # pragma: no cover

        with pytest.raises(TypeError, match="unhashable"):
            total([1, 2])

    def test_a_key_function(self) -> None:
        calls = 0

        @cached(Cache(60), key=lambda user_id, **_: user_id)
        def load_user(user_id: int, *, verbose: bool = False) -> str:
            nonlocal calls
            calls += 1
            return f"user {user_id}"

        assert load_user(7) == load_user(7, verbose=True) == "user 7"
        assert calls == 1
        assert load_user.cache.get(7) == "user 7"
        assert load_user.invalidate(7)

    def test_a_key_function_that_raises_propagates(self) -> None:
        def key(x: int) -> int:
            raise ArithmeticError("bad key")

        @cached(Cache(60), key=key)
        def f(x: int) -> int:
            return x  # pragma: no cover

        with pytest.raises(ArithmeticError, match="bad key"):
            f(1)
        assert f.cache_info().misses == 0

    def test_two_functions_cannot_share_default_keys(self) -> None:
        cache: Cache[Any, int] = Cache(60)

        @cached(cache)
        def f(x: int) -> int:
            return x

        with pytest.raises(ValueError, match="key="):

            @cached(cache)
            def g(x: int) -> int:
                return x  # pragma: no cover

        @cached(cache, key=lambda x: ("h", x))
        def h(x: int) -> int:
            return -x

        assert (f(1), h(1)) == (1, -1)
        cached(cache)(f.__wrapped__)  # type: ignore[attr-defined]  # the same function again

    def test_the_claim_ends_with_the_function(self) -> None:
        cache: Cache[Any, int] = Cache(60)

        def make() -> Any:
            @cached(cache)
            def f(x: int) -> int:
                return x  # pragma: no cover

            return f

        first = make()
        del first
        gc.collect()
        make()  # the first function is gone: its claim went with it


class TestMethods:
    def test_self_is_part_of_the_key(self) -> None:
        cache: Cache[Any, str] = Cache(60)

        class Repo:
            def __init__(self, name: str) -> None:
                self.name = name

            @cached(cache)
            def find(self, key: int) -> str:
                return f"{self.name}:{key}"

        a, b = Repo("a"), Repo("b")
        assert a.find(1) == "a:1"
        assert b.find(1) == "b:1"
        assert len(cache) == 2
        assert Repo.find.invalidate(a, 1)
        assert a.find.invalidate(b, 1)  # the function's own invalidate: self comes first
        assert len(cache) == 0

    @pytest.mark.anyio
    async def test_exclude_self_shares_entries(self) -> None:
        cache = loop_cache()
        calls = 0

        class Client:
            @cached(cache, exclude_self=True)
            async def get(self, path: str) -> str:
                nonlocal calls
                calls += 1
                return path.upper()

            @cached(cache, exclude_self=True, key=lambda path, scale: (path, scale))
            async def scaled(self, path: str, scale: int) -> str:
                return path * scale

        one, two = Client(), Client()
        assert await one.get("/a") == await two.get("/a") == await two.get(path="/a") == "/A"
        assert calls == 1
        assert cache.get("/a") == "/A"
        assert await one.scaled("x", 2) == "xx"
        assert cache.get(("x", 2)) == "xx"
        assert Client.get.invalidate(one, "/a")
        assert not Client.get.invalidate(two, "/a")

    def test_exclude_self_needs_a_first_parameter(self) -> None:
        with pytest.raises(TypeError, match="exclude_self"):

            @cached(Cache(60), exclude_self=True)
            def f(*, x: int) -> int:
                return x  # pragma: no cover

    def test_staticmethod_goes_on_top(self) -> None:
        with pytest.raises(TypeError, match="below @staticmethod"):
            cached(Cache(60))(staticmethod(len))  # type: ignore[call-overload]

        class Tools:
            @staticmethod
            @cached(Cache(60))
            def double(x: int) -> int:
                return 2 * x

        assert Tools.double(2) == Tools().double(2) == 4


class TestThreads:
    def test_single_flight_in_threads(self) -> None:
        cache: Cache[Any, int] = Cache(60)
        calls = 0
        entered = threading.Event()
        release = threading.Event()

        @cached(cache)
        def slow(x: int) -> int:
            nonlocal calls
            calls += 1
            entered.set()
            assert release.wait(10)
            return x + 1

        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(slow(1))) for _ in range(6)]
        threads[0].start()
        assert entered.wait(10)
        for thread in threads[1:]:
            thread.start()
        while cache._thread_flights[1].waiters < 5:
            release.wait(0.001)
        release.set()
        for thread in threads:
            thread.join(10)
        assert results == [2] * 6
        assert calls == 1
        assert slow.cache_info().joined == 5

    def test_a_sync_function_returning_a_coroutine(self) -> None:
        async def fetch() -> int:
            return 1  # pragma: no cover

        @cached(Cache(60))
        def sneaky(x: int) -> Any:
            return fetch()

        with pytest.raises(TypeError, match="async def"):
            sneaky(1)
        gc.collect()  # the coroutine was closed: no "never awaited" warning (an error here)
        assert len(sneaky.cache) == 0


class TestExpiry:
    def test_entries_expire(self) -> None:
        now = [0.0]
        calls = 0

        @cached(Cache(10, clock=lambda: now[0]))
        def f(x: int) -> int:
            nonlocal calls
            calls += 1
            return calls

        assert f(1) == f(1) == 1
        now[0] = 9.999
        assert f(1) == 1
        now[0] = 10
        assert f(1) == 2
        assert f.cache_info().expirations == 1

    @pytest.mark.anyio
    async def test_ttl_after_access(self) -> None:
        cache = loop_cache(10, ttl_after_access=2)
        calls = 0

        @cached(cache)
        async def f(x: int) -> int:
            nonlocal calls
            calls += 1
            return calls

        for _ in range(4):
            assert await f(1) == 1  # each read restarts the idle time
            await anyio.sleep(1.5)
        await anyio.sleep(1)
        assert await f(1) == 2
        info = f.cache_info()
        assert (info.hits, info.misses) == (3, 2)


class TestBadInput:
    @pytest.mark.parametrize(
        ("arguments", "error", "match"),
        [
            ({"cache": {}}, TypeError, "needs a Cache"),
            ({"key": "x"}, TypeError, "key"),
            ({"exclude_self": 1}, TypeError, "exclude_self"),
            ({"ttl": -1}, ValueError, "ttl"),
            ({"ttl": "1"}, TypeError, "ttl"),
            ({"refresh_after": 60}, ValueError, "shorter than the ttl"),
            ({"refresh_after": 0}, ValueError, "refresh_after"),
            ({"stale_if_error": []}, TypeError, "stale_if_error"),
            ({"cache_if": 3}, TypeError, "cache_if"),
        ],
    )
    def test_options(self, arguments: dict[str, Any], error: type[Exception], match: str) -> None:
        arguments.setdefault("cache", Cache(60))
        with pytest.raises(error, match=match):
            cached(**arguments)

    def test_refresh_after_needs_an_async_function(self) -> None:
        with pytest.raises(TypeError, match="refresh_after needs an async function"):

            @cached(Cache(60), refresh_after=10)
            def f(x: int) -> int:
                return x  # pragma: no cover

    def test_a_builtin(self) -> None:
        length = cached(Cache(60))(len)
        assert length("abc") == 3
        assert length.cache_info().loads == 1

    def test_not_a_function(self) -> None:
        with pytest.raises(TypeError, match="decorates a function"):
            cached(Cache(60))(42)  # type: ignore[call-overload]


TYPED = """
from __future__ import annotations

from typing import Any

from typing_extensions import assert_type  # type-checked only, as Python 3.10

from darwin_metrics.resource import Cache, CacheStatistics, cached

users: Cache[int, str] = Cache(60)


@cached(users)
async def load_user(user_id: int, *, fresh: bool = False) -> str:
    return str(user_id)


@cached(Cache[Any, float](60))
def ratio(a: int, b: int) -> float:
    return a / b


class Repo:
    @cached(users, exclude_self=True)
    async def find(self, key: int) -> str:
        return str(key)


async def main() -> None:
    assert_type(await load_user(1), str)
    assert_type(await load_user(1, fresh=True), str)
    assert_type(ratio(1, 2), float)
    assert_type(load_user.invalidate(1), bool)
    assert_type(load_user.cache_info(), CacheStatistics)
    repo = Repo()
    assert_type(await repo.find(3), str)
    assert_type(Repo.find.invalidate(repo, 3), bool)
    assert_type(repo.find.invalidate(repo, 3), bool)
    await load_user("1")  # E: wrong type
    ratio(1)  # E: missing argument
    await repo.find()  # E: missing argument
"""


@pytest.mark.real_time
def test_types_are_kept(tmp_path: Path) -> None:
    """mypy sees the decorated functions' own parameters and results."""
    pytest.importorskip("mypy")
    source = tmp_path / "typed.py"
    source.write_text(TYPED, encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(source)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors = [line for line in completed.stdout.splitlines() if ": error:" in line]
    lines = TYPED.splitlines()
    flagged = sorted({int(line.split(":")[1]) for line in errors})
    expected = [number for number, text in enumerate(lines, start=1) if "# E:" in text]
    assert flagged == expected, completed.stdout
