"""Task groups that live as long as a user's ``async with`` block."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["exit_task_group"]


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _is_the_blocks_own(group: BaseExceptionGroup, exc_val: BaseException) -> bool:
    """Whether ``group`` holds nothing but ``exc_val`` (or a copy of it) and cancellations.

    trio's nursery also reports the ``Cancelled`` of a background task that an outer scope
    cancelled, and its ``split()`` copies groups, so an identity test of the group's members
    misses a group that the block raised. The leaves are never copied: compare them.
    """
    cancelled = anyio.get_cancelled_exc_class()
    theirs = [id(leaf) for leaf in _leaves(group) if not isinstance(leaf, cancelled)]
    ours = [id(leaf) for leaf in _leaves(exc_val) if not isinstance(leaf, cancelled)]
    return sorted(theirs) == sorted(ours)


async def exit_task_group(
    task_group: TaskGroup,
    exc_type: type[BaseException] | None,
    exc_val: BaseException | None,
    exc_tb: TracebackType | None,
) -> bool | None:
    """Exit a task group that was entered by hand around the user's block.

    A task group wraps what its host raised in an exception group. When the block's own
    exception is the only error (beside the cancellations of the background tasks), let it
    propagate as itself: ``async with pool:`` around ``raise KeyError`` raises ``KeyError``,
    and a block that raised an exception group raises that very group. Errors of the
    background tasks still arrive as an exception group, as anyio and trio deliver them.
    """
    try:
        return await task_group.__aexit__(exc_type, exc_val, exc_tb)
    except BaseExceptionGroup as group:
        if exc_val is not None and _is_the_blocks_own(group, exc_val):
            return False  # the with statement re-raises exc_val, with its own traceback
        raise
