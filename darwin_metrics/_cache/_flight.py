"""Loads in progress, shared by every caller that asks for the same key meanwhile."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable
from types import TracebackType
from typing import Generic, Literal, TypeVar

import anyio
import anyio.lowlevel

from ._entry import _MISSING, _Sentinel

V = TypeVar("V")


class _Flight(Generic[V]):
    """One load in progress and, once it ends, its outcome.

    The outcome is one of: ``loaded`` (with ``value``), an ``error``, ``absent`` (a bulk
    loader did not return this key), or nothing at all: the load was abandoned (its task was
    cancelled, or it raised a ``BaseException`` that is not an ``Exception``), and a waiter
    must load the key itself.
    """

    __slots__ = (
        "absent",
        "error",
        "invalidated",
        "loaded",
        "owner",
        "traceback",
        "value",
        "waiters",
    )

    value: V

    def __init__(self, owner: object) -> None:
        #: The thread or task that loads (see current()); a waiter that is the owner would
        #: wait forever. ``None`` for a refresh until its task starts.
        self.owner = owner
        self.loaded = False
        self.absent = False
        #: Set under the cache's lock when the key is removed while it loads: the result goes
        #: to the callers but is not stored.
        self.invalidated = False
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        #: How many callers have waited for this load (for tests and debugging).
        self.waiters = 0

    def succeed(self, value: V) -> None:
        self.value = value
        self.loaded = True

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.traceback = error.__traceback__

    def outcome(self) -> V | Literal[_Sentinel.MISSING]:
        """The loaded value; raises the load's error; ``_MISSING`` if absent or abandoned."""
        if self.loaded:
            return self.value
        if self.error is not None:
            # Every waiter re-raises the same exception object with the traceback that the
            # load gave it (as asyncio.Future.result() does), so it does not grow per waiter.
            raise self.error.with_traceback(self.traceback)
        return _MISSING


def current() -> tuple[Hashable, object]:
    """The running event loop (the key of its flights) and the current task (their owner).

    What :func:`anyio.lowlevel.current_token` and :func:`anyio.get_current_task` identify, at
    a tenth of their cost (they look the backend up on every call): the asyncio loop and task,
    or, outside any asyncio task, trio's token for the current run and trio's task (a trio
    guest on an asyncio host runs its tasks outside any asyncio task).
    """
    loop = asyncio._get_running_loop()
    if loop is not None:
        task = asyncio.current_task(loop)
        if task is not None:
            return loop, task
    try:
        import trio
    except ImportError:  # pragma: no cover - without trio, anyio runs only asyncio
        return anyio.lowlevel.current_token(), anyio.get_current_task().id
    return trio.lowlevel.current_trio_token(), trio.lowlevel.current_task()


class _AsyncFlight(_Flight[V]):
    __slots__ = ("event",)

    def __init__(self, owner: object) -> None:
        super().__init__(owner)
        self.event = anyio.Event()


class _ThreadFlight(_Flight[V]):
    __slots__ = ("event",)

    def __init__(self, owner: object) -> None:
        super().__init__(owner)
        self.event = threading.Event()
