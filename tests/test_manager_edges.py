"""ResourceManager at the edges: a second event loop, the block's own exception on trio,
samplers that do not disturb each other, and statistics that can forget."""

from __future__ import annotations

import sys
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from darwin_metrics.resource import ResourceManager

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = pytest.mark.anyio


class TestExceptionIdentity:
    async def test_block_error_while_an_outer_scope_cancels(self) -> None:
        error = KeyError("mine")
        caught: list[BaseException] = []
        with anyio.CancelScope() as outer:
            try:
                async with ResourceManager():
                    outer.cancel()
                    raise error
            except KeyError as exc:
                caught.append(exc)
        assert caught == [error]
        assert caught[0] is error

    async def test_block_raising_an_exception_group(self) -> None:
        group = ExceptionGroup("mine", [ValueError(1), KeyError(2)])
        with pytest.raises(ExceptionGroup) as info:
            async with ResourceManager():
                raise group
        assert info.value is group

    async def test_a_failing_sampler_still_comes_out_in_a_group(self) -> None:
        async def broken() -> tuple[list[tuple[str, float]], list[str]]:
            raise OSError("sensor gone")

        async def run() -> None:
            async with ResourceManager() as manager:
                manager._running_task_group("test").start_soon(
                    manager._sample_periodically, broken, 1.0, anyio.CancelScope()
                )
                await anyio.sleep_forever()

        with pytest.raises(ExceptionGroup) as info:
            await run()
        assert [type(exc) for exc in info.value.exceptions] == [OSError]


def run_in(backend: str, func: Callable[[], Any]) -> Any:
    return anyio.run(func, backend=backend)


class TestSecondEventLoop:
    pytestmark = pytest.mark.real_time

    @pytest.mark.parametrize("second", ["asyncio", "trio"])
    @pytest.mark.parametrize("first", ["asyncio", "trio"])
    def test_a_second_run(self, first: str, second: str) -> None:
        manager = ResourceManager()
        subscription = manager.subscribe()

        async def use() -> None:
            await manager.track_resource_usage("cpu", 1)

        run_in(first, use)
        before = manager.usage_statistics()

        async def misuse() -> list[str]:
            errors: list[str] = []

            async def enter() -> None:
                async with manager:
                    pass  # pragma: no cover

            for operation in (
                use,
                lambda: manager.track_resource_usage_with_timeout("cpu", 2, 1),
                enter,
                subscription.next_batch,
                subscription.__anext__,
            ):
                with pytest.raises(RuntimeError, match="belongs to the event loop") as info:
                    await operation()
                errors.append(str(info.value))
            return errors

        errors = run_in(second, misuse)
        assert "A manager works in one event loop only" in errors[0]
        assert manager.usage_statistics() == before
        assert [usage.usage_percent for usage in subscription.drain()] == [1.0]


CpuTimes = namedtuple(
    "CpuTimes", "user nice system idle iowait irq softirq steal guest guest_nice"
)


def cpu_times(busy: float, idle: float) -> CpuTimes:
    # Guest time is counted inside user time as well, as Linux reports it.
    return CpuTimes(busy, 0.0, 0.0, idle, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0)


class TestSamplers:
    def test_cpu_usage_between_two_readings(self) -> None:
        from darwin_metrics._manager._samplers import cpu_busy_percent

        assert cpu_busy_percent(cpu_times(10, 10), cpu_times(13, 11)) == pytest.approx(75.0)
        assert cpu_busy_percent(cpu_times(10, 10), cpu_times(10, 10)) == 0.0
        assert cpu_busy_percent(cpu_times(10, 10), cpu_times(20, 10)) == 100.0

    async def test_two_samplers_keep_their_own_cpu_baseline(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Item 10: psutil.cpu_percent(None) keeps one baseline per thread; ours don't share."""
        psutil = pytest.importorskip("psutil")
        from darwin_metrics._manager import _samplers

        # The machine's counters over time: fully busy, then idle, then busy again.
        readings = iter(
            [cpu_times(0, 0), cpu_times(0, 0), cpu_times(4, 0), cpu_times(4, 4), cpu_times(8, 4)]
        )
        monkeypatch.setattr(psutil, "cpu_times", lambda percpu=False: next(readings))
        monkeypatch.setattr(_samplers, "read_disks", lambda: ([], set()))
        first, second = _samplers.SystemReader(), _samplers.SystemReader()  # at (0, 0)
        await first()
        await second()  # priming rounds: no cpu
        cpu_first = dict((await first())[0])["cpu"]  # (0,0) -> (4,0): all busy
        cpu_second = dict((await second())[0])["cpu"]  # (0,0) -> (4,4): half
        assert cpu_first == 100.0
        assert cpu_second == 50.0
        assert dict((await first())[0])["cpu"] == 50.0  # (4,0) -> (8,4)

    async def test_unmounted_disks_are_reported_gone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Item 11: a disk that is unmounted is reported gone; one unreadable once is not."""
        pytest.importorskip("psutil")
        from darwin_metrics._manager import _samplers

        rounds = iter(
            [
                ([("disk:/", 10.0), ("disk:/mnt/x", 20.0)], {"disk:/", "disk:/mnt/x"}),
                ([("disk:/", 11.0)], {"disk:/", "disk:/mnt/x"}),  # unreadable this round
                ([("disk:/", 12.0)], {"disk:/"}),  # unmounted
            ]
        )
        monkeypatch.setattr(_samplers, "read_disks", lambda: next(rounds))
        reader = _samplers.SystemReader()
        gone = [(await reader())[1] for _ in range(3)]
        assert gone == [[], [], ["disk:/mnt/x"]]

    async def test_the_sampler_forgets_what_is_gone(self) -> None:
        """Item 11: a long run does not pile up the disks that came and went."""
        rounds = iter(
            [
                ([("disk:/", 10.0), ("disk:/mnt/x", 20.0)], []),
                ([("disk:/", 11.0)], ["disk:/mnt/x"]),
            ]
        )

        async def read() -> tuple[list[tuple[str, float]], list[str]]:
            return next(rounds, ([], []))

        async with ResourceManager() as manager:
            manager._running_task_group("test").start_soon(
                manager._sample_periodically, read, 1.0, anyio.CancelScope()
            )
            await anyio.sleep(0.5)
            assert set(manager.usage_statistics()) == {"disk:/", "disk:/mnt/x"}
            await anyio.sleep(1)
            stats = manager.usage_statistics()
            assert set(stats) == {"disk:/"}
            assert stats["disk:/"].count == 2
            manager._running_task_group("test").cancel_scope.cancel()

    async def test_forget(self) -> None:
        manager = ResourceManager()
        await manager.track_resource_usage("disk:/mnt/x", 5)
        await manager.track_resource_usage("cpu", 5)
        assert manager.forget("disk:/mnt/x") is True
        assert manager.forget("disk:/mnt/x") is False
        assert set(manager.usage_statistics()) == {"cpu"}
        await manager.track_resource_usage("disk:/mnt/x", 7)
        assert manager.usage_statistics()["disk:/mnt/x"].count == 1
        with pytest.raises(TypeError, match="resource_type must be a str"):
            manager.forget(1)  # type: ignore[arg-type]


class TestMissedEvents:
    async def test_the_total_counts_every_subscription_closed_ones_included(self) -> None:
        manager = ResourceManager()
        small = manager.subscribe(buffer_size=1)
        other = manager.subscribe(buffer_size=2)
        lossless = manager.subscribe(buffer_size=1, overflow="wait")
        lossless.close()
        for number in range(4):
            await manager.track_resource_usage("cpu", number)
        assert (small.missed, other.missed) == (3, 2)
        assert manager.missed_events == 5
        small.close()
        await manager.track_resource_usage("cpu", 5)
        assert manager.missed_events == 6
        other.close()
