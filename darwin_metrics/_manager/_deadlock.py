"""Finding the nesting that can never end: a subscriber inside the manager's own block.

::

    async with ResourceManager() as manager:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, manager.subscribe())   # loops until the manager exits
            ...
        # tg waits for consume, consume waits for the manager to exit: neither ever happens

The manager's watchdog (a task in its task group) looks, now and then, at the task that
entered the manager: if it is waiting for a task group to finish (its coroutine is suspended
in a task group's ``__aexit__``), and every task still running in that group waits for an
event of one of this manager's subscriptions (or is itself waiting, the same way, for such a
group), nothing inside can end the wait. The waiting subscribers are then woken with a
:class:`RuntimeError` that explains the nesting, so the program fails loudly instead of
hanging. This looks at the event loops' task and task-group objects (a task group's
``_tasks`` on asyncio, a nursery's ``child_tasks`` on trio); if their layout is not the
expected one, it finds nothing and stays quiet.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["current_task", "stuck_waiters"]

_MAX_DEPTH = 8  # task groups nested in tasks nested in task groups: deep enough


def current_task(on_trio: bool) -> object:
    """The running task object (asyncio's or trio's own)."""
    if on_trio:
        task: object = sys.modules["trio"].lowlevel.current_task()
        return task
    return asyncio.current_task()


def _coroutine(task: Any) -> Any:
    get_coro = getattr(task, "get_coro", None)
    return get_coro() if get_coro is not None else getattr(task, "coro", None)


def _children(group: object) -> set[object] | None:
    """The tasks still running in a task group or nursery, or None if it is not one."""
    tasks = getattr(group, "_tasks", None)  # anyio's asyncio TaskGroup, asyncio.TaskGroup
    if isinstance(tasks, set):
        return {task for task in tasks if not task.done()}
    nursery = getattr(group, "_nursery", None)  # anyio's trio TaskGroup, trio's NurseryManager
    child_tasks = getattr(nursery if nursery is not None else group, "child_tasks", None)
    if isinstance(child_tasks, frozenset):
        return set(child_tasks)
    return None


def _groups_waited_for(task: object) -> Iterator[set[object]]:
    """The running tasks of each task group whose exit ``task`` is suspended in."""
    coro = _coroutine(task)
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            return
        if frame.f_code.co_name == "__aexit__":
            children = _children(frame.f_locals.get("self"))
            if children is not None:
                yield children
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


def stuck_waiters(host: object, waiting: dict[object, Any]) -> list[Any]:
    """The subscribers (values of ``waiting``, keyed by their task) that can never be woken.

    ``host`` is the task that entered the manager. Returns the subscribers of every task in
    the task groups ``host`` waits for, when all of those tasks wait on a subscription (or,
    recursively, for such a group); else an empty list.
    """

    def blocked(task: object, depth: int, found: list[Any]) -> bool:
        if depth > _MAX_DEPTH:
            return False
        for children in _groups_waited_for(task):
            if not children:
                continue
            group_found: list[Any] = []
            for child in children:
                if child in waiting:
                    group_found.append(waiting[child])
                elif not blocked(child, depth + 1, group_found):
                    break
            else:
                found.extend(group_found)
                return True
        return False

    found: list[Any] = []
    if waiting and blocked(host, 0, found):
        return found
    return []
