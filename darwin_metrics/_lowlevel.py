"""Event-loop plumbing shared by the pool and the manager.

Three things anyio does not give us in the shape we need:

- **Which event loop is this?** :func:`current_loop` names the running loop (an asyncio loop or
  a trio run's token), so that an object bound to one loop can refuse, with a clear
  :class:`RuntimeError`, to be used from another (:func:`wrong_loop_error`).
- **Waiting without taking.** A :class:`Parker` parks one task until another task wakes it,
  and says afterwards whether the wake-up arrived. It hands nothing over, so a task that is
  cancelled just as it is woken loses nothing: its waker gave it *permission* (a capacity
  token, a resource bound to its lease, "an event is buffered") that it can pass on or leave
  in place. The backends' own primitives are used directly (an asyncio future; trio's
  ``wait_task_rescheduled``): they are the cheapest, and they behave the same under native
  asyncio cancellation (``task.cancel()``) as under anyio's cancel scopes.
- **Work that must finish.** :func:`run_protected` runs a hook (a reset, a dispose) that must
  complete even when the calling task is cancelled. anyio's ``CancelScope(shield=True)``
  stops anyio and trio cancellation but not asyncio's own ``task.cancel()`` (which
  ``asyncio.timeout``, ``asyncio.wait_for``, ``asyncio.TaskGroup`` and ``asyncio.run``'s
  shutdown use), so on asyncio an async hook runs in a task of its own, which the caller
  awaits again after a native cancellation, and the cancellation is handed back to the
  caller to re-raise once its bookkeeping is done. Every hook gets a time bound.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "HookTimeoutError",
    "Parker",
    "current_loop",
    "duration_clock",
    "get_running_loop",
    "is_interrupt",
    "run_protected",
    "running_loop_or_none",
    "trio_checkpoint",
    "trio_clock",
    "trio_token",
    "wrong_loop_error",
]


def current_loop() -> tuple[bool, object]:
    """Return ``(on_trio, loop)`` for the event loop running in this thread.

    ``loop`` is the asyncio event loop, or the trio run's :class:`trio.lowlevel.TrioToken`:
    an object that stays the same for the whole run and differs between runs and threads.

    Raises:
        RuntimeError: No asyncio or trio event loop is running in this thread.
    """
    try:
        return False, asyncio.get_running_loop()
    except RuntimeError:
        pass
    if _trio_lowlevel is not None:
        try:
            return True, _trio_lowlevel.current_trio_token()
        except RuntimeError:
            pass
    raise RuntimeError("no asyncio or trio event loop is running in this thread")


def running_loop_or_none(on_trio: bool) -> object | None:
    """The running loop of the given kind in this thread (as :func:`current_loop`), or None."""
    try:
        if on_trio:
            return _trio_token()
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def wrong_loop_error(obj: object, kind: str) -> RuntimeError:
    """The error for an object used from an event loop other than the one it belongs to."""
    return RuntimeError(
        f"{obj!r} belongs to the event loop that first used it, and is now used from "
        f"another one (a second anyio.run, asyncio.run or trio.run, or another thread). "
        f"A {kind} works in one event loop only: create one per event loop, inside the "
        f"code that event loop runs."
    )


def is_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` is, or holds, a ``KeyboardInterrupt`` or ``SystemExit``."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(is_interrupt(inner) for inner in exc.exceptions)
    return False


class HookTimeoutError(TimeoutError):
    """A hook that must finish did not finish within its time bound (logged, never raised)."""


# ---------------------------------------------------------------------- parking


class Parker:
    """One task waiting to be woken by another; reusable, one wait at a time.

    The waiting task calls :meth:`park`; another task (never the waiter itself) calls
    :meth:`wake`. ``wake`` returns whether the waiter will see the wake-up: false when the
    waiter was cancelled first (it is leaving, and must not be given anything). After
    ``park`` raised a cancellation, :attr:`woken` tells whether a wake-up arrived just
    before (asyncio only: trio commits a wake-up, so there ``park`` then returns normally).
    """

    __slots__ = ("_future", "_on_trio", "_task", "woken")

    def __init__(self, on_trio: bool) -> None:
        self._on_trio = on_trio
        self._future: asyncio.Future[None] | None = None
        self._task: Any = None
        self.woken = False

    async def park(self) -> None:
        """Wait until :meth:`wake` is called. A checkpoint; cancellation raises as usual."""
        self.woken = False
        if self._on_trio:
            self._task = _trio_lowlevel.current_task()
            await _trio_lowlevel.wait_task_rescheduled(self._abort)
        else:
            future = self._future = asyncio.get_running_loop().create_future()
            try:
                await future
            finally:
                self._future = None

    def _abort(self, _raise_cancel: object) -> _trio_lowlevel.Abort:
        self._task = None  # a cancelled trio waiter can no longer be woken
        return _trio_lowlevel.Abort.SUCCEEDED

    @property
    def parked(self) -> bool:
        """Whether a task waits here and can still be woken."""
        if self._on_trio:
            return self._task is not None
        future = self._future
        return future is not None and not future.done()

    def wake(self) -> bool:
        """Wake the waiting task; return whether it will see the wake-up (sync, idempotent)."""
        if self._on_trio:
            task = self._task
            if task is None:
                return False
            self._task = None
            self.woken = True
            _trio_lowlevel.reschedule(task)
            return True
        future = self._future
        if future is None or future.done():
            return False
        future.set_result(None)
        self.woken = True
        return True


# ---------------------------------------------------------------------- protected hooks


async def run_protected(
    call: Callable[[], object], *, on_trio: bool, timeout: float | None
) -> tuple[BaseException | None, BaseException | None]:
    """Call ``call()`` and await its result if it is awaitable, letting no cancellation in.

    Returns ``(failure, deferred)``:

    - ``failure`` is what went wrong with the hook, or ``None`` if it returned: the exception
      it raised (whatever its kind, a ``CancelledError`` of its own included), or a
      :class:`HookTimeoutError` when it ran past ``timeout`` seconds (it is then cancelled
      and, on asyncio, left to finish by itself).
    - ``deferred`` is an exception the caller must raise once its bookkeeping is done: a
      native asyncio cancellation of the calling task that arrived meanwhile, or a
      ``KeyboardInterrupt`` / ``SystemExit`` raised by the hook.

    anyio and trio cancellation never reach the hook (a shield); a native asyncio
    cancellation of the caller is caught and deferred while the hook runs in its own task.
    """
    try:
        result = call()
    except BaseException as exc:
        return exc, (exc if is_interrupt(exc) else None)
    if not _is_awaitable(result):
        return None, None
    awaitable: Awaitable[object] = result  # type: ignore[assignment]
    if on_trio:
        return await _run_shielded(awaitable, timeout)
    return await _run_in_own_task(awaitable, timeout)


def _is_awaitable(value: object) -> bool:
    return hasattr(type(value), "__await__")


async def _run_shielded(
    awaitable: Awaitable[object], timeout: float | None
) -> tuple[BaseException | None, BaseException | None]:
    cancelled = anyio.get_cancelled_exc_class()
    failure: BaseException | None = None
    with anyio.CancelScope(shield=True) as scope:
        if timeout is not None:
            scope.deadline = anyio.current_time() + timeout
        try:
            await awaitable
        except cancelled:
            raise  # our own deadline: the scope catches it
        except BaseException as exc:
            failure = exc
    if scope.cancelled_caught:
        return HookTimeoutError(f"did not finish within {timeout} s"), None
    if failure is not None:
        return failure, (failure if is_interrupt(failure) else None)
    return None, None


async def _guard(awaitable: Awaitable[object]) -> BaseException | None:
    # Runs as a task of its own: it must never let an exception out (a KeyboardInterrupt
    # escaping a task stops the whole event loop), so it returns what it caught.
    try:
        await awaitable
    except BaseException as exc:
        return exc
    return None


async def _run_in_own_task(
    awaitable: Awaitable[object], timeout: float | None
) -> tuple[BaseException | None, BaseException | None]:
    loop = asyncio.get_running_loop()
    task = loop.create_task(_guard(awaitable))
    deferred: BaseException | None = None
    deadline = None if timeout is None else loop.time() + timeout
    # The shield keeps anyio's cancel scopes from cancelling us again and again meanwhile.
    with anyio.CancelScope(shield=True):
        while not task.done():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                task.cancel()
                return HookTimeoutError(f"did not finish within {timeout} s"), deferred
            try:
                await asyncio.wait((task,), timeout=remaining)
            except asyncio.CancelledError as exc:
                deferred = exc  # a native cancellation: finish the hook first
    failure = task.result()
    if failure is not None and is_interrupt(failure) and deferred is None:
        deferred = failure
    return failure, deferred


# trio's low-level primitives, used only when running under trio (an optional dependency).
if TYPE_CHECKING:
    import trio.lowlevel as _trio_lowlevel
else:
    try:
        import trio.lowlevel as _trio_lowlevel
    except ImportError:  # pragma: no cover - trio is optional; nothing here runs without it
        _trio_lowlevel = None


def _trio_token() -> object:
    if _trio_lowlevel is None:
        raise RuntimeError("trio is not installed")
    return _trio_lowlevel.current_trio_token()


# The backends' own checkpoint, clock and loop identity, for hot paths that resolve them once
# (anyio looks the running backend up on every call).
get_running_loop = asyncio.get_running_loop
if TYPE_CHECKING:
    trio_checkpoint = anyio.lowlevel.checkpoint

    def trio_token() -> object: ...
    def trio_clock() -> Any: ...
else:
    try:
        from trio.lowlevel import checkpoint as trio_checkpoint
        from trio.lowlevel import current_clock as trio_clock
        from trio.lowlevel import current_trio_token as trio_token
    except ImportError:  # pragma: no cover - trio is optional; nothing calls these without it
        trio_checkpoint = anyio.lowlevel.checkpoint
        trio_clock = None
        trio_token = _trio_token


def duration_clock(on_trio: bool) -> Callable[[], float]:
    """A clock for measuring durations in the running event loop, as cheap as it can be.

    It runs at the loop's rate (virtual time under a test clock) but may have another origin:
    only differences between its readings mean anything. On a stock asyncio loop that is
    :func:`time.monotonic` itself (what ``loop.time()`` returns, without the method call); on
    trio's own clock :func:`time.perf_counter` (its ``current_time()`` adds a fixed offset).
    Any other clock (looptime, trio's ``MockClock``, uvloop) is used as it is.
    """
    if on_trio:
        clock = trio_clock()
        if type(clock).__name__ == "SystemClock" and type(clock).__module__.startswith("trio."):
            return time.perf_counter
        current_time: Callable[[], float] = clock.current_time
        return current_time
    loop = asyncio.get_running_loop()
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time
