"""Task groups that live as long as a user's ``async with`` block."""

from __future__ import annotations

import sys
from types import TracebackType

from anyio.abc import TaskGroup

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["exit_task_group"]


async def exit_task_group(
    task_group: TaskGroup,
    exc_type: type[BaseException] | None,
    exc_val: BaseException | None,
    exc_tb: TracebackType | None,
) -> bool | None:
    """Exit a task group that was entered by hand around the user's block.

    A task group wraps what its host raised in an exception group. When the block's own
    exception is the only error, let it propagate as itself: ``async with pool:`` around
    ``raise KeyError`` raises ``KeyError``. Errors of the background tasks still arrive as an
    exception group, as anyio and trio deliver them.
    """
    try:
        return await task_group.__aexit__(exc_type, exc_val, exc_tb)
    except BaseExceptionGroup as group:
        if exc_val is not None and len(group.exceptions) == 1 and group.exceptions[0] is exc_val:
            return False  # the with statement re-raises exc_val, with its own traceback
        raise
