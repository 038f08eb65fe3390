"""Who holds a resource: for the warning about resources still leased when a pool closes.

Nothing is recorded on the hot path (capturing the caller's frame on every lease would cost
more than the lease itself). When the pool closes with resources out, the running tasks'
coroutine frames are searched for a local variable that is the resource (``async with
pool.lease() as conn``, ``conn = await pool.acquire()``): the innermost one is where it is
held now. A resource that no running task holds was never given back.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["find_holders"]


def _coroutine_frames(coro: Any) -> Iterator[FrameType]:
    """The frames of a coroutine and of what it awaits, outermost first."""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            return
        yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def _task_coroutines(on_trio: bool) -> Iterator[tuple[str, Any]]:
    if not on_trio:
        for task in asyncio.all_tasks():
            yield task.get_name(), task.get_coro()
        return
    trio = sys.modules["trio"]
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        yield task.name, task.coro
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)


def find_holders(resources: Iterable[object], on_trio: bool) -> dict[int, str]:
    """Map ``id(resource)`` to "file:line in function (task name)" for those held in a frame."""
    wanted = {id(resource) for resource in resources}
    found: dict[int, str] = {}
    if not wanted:
        return found
    try:
        tasks = list(_task_coroutines(on_trio))
    except (RuntimeError, KeyError, AttributeError):  # no loop, or a layout we do not know
        return found
    for name, coro in tasks:
        for frame in _coroutine_frames(coro):
            for value in list(frame.f_locals.values()):
                if id(value) in wanted:  # the innermost frame wins: it overwrites
                    found[id(value)] = (
                        f"{frame.f_code.co_filename}:{frame.f_lineno} in "
                        f"{frame.f_code.co_name} (task {name!r})"
                    )
    return found
