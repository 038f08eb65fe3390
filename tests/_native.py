"""Native asyncio cancellation, at every await point of an operation.

anyio's cancel scopes and trio are tested elsewhere; this drives the three ways asyncio
itself cancels a task, which anyio's shields do not stop:

- ``task.cancel()``, scheduled after ``k`` event loop iterations (``call_soon`` chains), so
  that it lands at each zero-time await point in turn, or at a virtual time;
- ``asyncio.timeout`` expiring at a virtual time (it cancels the task natively, then turns
  the cancellation into ``TimeoutError``);
- ``asyncio.wait_for`` with a virtual timeout (on 3.11 it runs the operation in a task of its
  own and cancels that task).

Every run happens on a ``looptime`` loop (virtual time), so "at 1.5 ms" is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import looptime
import pytest

STYLES = ("task.cancel", "asyncio.timeout", "asyncio.wait_for")


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """asyncio only, in virtual time: native cancellation is asyncio's own."""
    return "asyncio", {"loop_factory": lambda: looptime.new_event_loop(start=0)}


def _cancel_after_iterations(task: asyncio.Task[Any], iterations: int) -> None:
    if task.done():
        return
    if iterations <= 0:
        task.cancel()
        return
    asyncio.get_running_loop().call_soon(_cancel_after_iterations, task, iterations - 1)


async def cancel_after_steps(operation: Callable[[], Awaitable[object]], steps: int) -> bool:
    """Run ``operation()`` in a task and ``task.cancel()`` it after ``steps`` loop iterations.

    Returns whether the operation finished before the cancellation could land (then every
    later step would finish too).
    """
    task = asyncio.ensure_future(operation())
    _cancel_after_iterations(task, steps)
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


async def cancel_at(operation: Callable[[], Awaitable[object]], style: str, delay: float) -> bool:
    """Run ``operation()`` and cancel it natively ``delay`` virtual seconds later.

    Returns whether the operation finished before the cancellation landed.
    """
    loop = asyncio.get_running_loop()
    if style == "task.cancel":
        task = asyncio.ensure_future(operation())
        handle = loop.call_later(delay, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            return False
        finally:
            handle.cancel()
        return True
    if style == "asyncio.timeout":

        async def under_timeout() -> None:
            async with asyncio.timeout(delay):
                await operation()

        try:
            await asyncio.ensure_future(under_timeout())
        except TimeoutError:
            return False
        return True
    assert style == "asyncio.wait_for", style
    try:
        await asyncio.wait_for(operation(), delay)
    except TimeoutError:
        return False
    return True


def delays(step: float, count: int) -> Iterator[float]:
    """Cancellation times that land between and on the await points of a hook of ``step`` s.

    All after 0: a cancellation at 0 lands before the operation has started at all.
    """
    for index in range(1, count + 1):
        yield index * step / 2


@contextlib.contextmanager
def no_cancel_leak() -> Iterator[None]:
    """The test task itself must not end up cancelled by what it drove."""
    task = asyncio.current_task()
    assert task is not None
    before = task.cancelling()
    yield
    assert task.cancelling() == before, "a native cancellation leaked into the test task"
