"""Who holds a resource: for the warning about resources still leased when a pool closes.

Nothing is recorded on the hot path (capturing the caller's frame on every lease would cost
more than the lease itself). When the pool closes with resources out, the running tasks'
coroutine frames are searched for a local variable that is the resource (``async with
pool.lease() as conn``, ``conn = await pool.acquire()``): the innermost one is where it is
held now. A resource that no running task holds was never given back.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

__all__ = ["find_holders"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _coroutine_frames(coro: Any) -> Iterator[FrameType]:
    """The frames of a coroutine and of what it awaits, outermost first."""
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            return
        yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def _running_frames() -> Iterator[FrameType]:
    """The frames of the running task, innermost first (a running coroutine awaits nothing)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _task_frames(on_trio: bool) -> Iterator[tuple[str, list[FrameType]]]:
    """Each task's name and frames, outermost first."""
    if not on_trio:
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is current:
                yield task.get_name(), list(reversed(list(_running_frames())))
            else:
                yield task.get_name(), list(_coroutine_frames(task.get_coro()))
        return
    trio = sys.modules["trio"]
    current = trio.lowlevel.current_task()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        if task is current:
            yield task.name, list(reversed(list(_running_frames())))
        else:
            yield task.name, list(_coroutine_frames(task.coro))
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)


def find_holders(resources: Iterable[object], on_trio: bool) -> dict[int, str]:
    """Map ``id(resource)`` to "file:line in function (task name)" for those held in a frame."""
    wanted = {id(resource) for resource in resources}
    found: dict[int, str] = {}
    if not wanted:
        return found
    try:
        tasks = list(_task_frames(on_trio))
    except (RuntimeError, KeyError, AttributeError):  # no loop, or a layout we do not know
        return found
    for name, frames in tasks:
        for frame in frames:
            if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
                continue  # the pool's own frames (this search included)
            for value in list(frame.f_locals.values()):
                if id(value) in wanted:  # the innermost frame wins: it overwrites
                    found[id(value)] = (
                        f"{frame.f_code.co_filename}:{frame.f_lineno} in "
                        f"{frame.f_code.co_name} (task {name!r})"
                    )
    return found
