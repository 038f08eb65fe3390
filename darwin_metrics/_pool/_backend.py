"""The running backend's own primitives, resolved once, for the pools' hot paths.

``anyio.lowlevel.checkpoint()`` and ``anyio.current_time()`` look the running backend up on
every call (about 0.8 µs each); a pool bound to one event loop knows its backend and can call
the backend's primitive directly: ``asyncio.sleep(0)`` or ``trio.lowlevel.checkpoint()``, the
asyncio loop's ``time`` or the trio run's clock object. Both behave exactly as anyio's wrappers
do under cancellation (anyio's wrappers call them).

These are the same primitives :mod:`._pool` resolves for itself; they live here so that the
keyed pool uses them without reaching into that module's private names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from anyio.lowlevel import checkpoint

__all__ = ["get_running_loop", "loop_clock", "trio_checkpoint", "trio_token"]

get_running_loop = asyncio.get_running_loop

if TYPE_CHECKING:
    trio_checkpoint = checkpoint

    def trio_token() -> object: ...
    def _trio_clock() -> Any: ...
else:
    try:
        from trio.lowlevel import checkpoint as trio_checkpoint
        from trio.lowlevel import current_clock as _trio_clock
        from trio.lowlevel import current_trio_token as trio_token
    except ImportError:  # trio is optional; nothing calls these without it
        trio_checkpoint = checkpoint
        _trio_clock = None

        def trio_token() -> object:
            raise RuntimeError("trio is not installed")


def loop_clock(on_trio: bool) -> Callable[[], float]:
    """The running event loop's clock (what ``anyio.current_time()`` reads), resolved once."""
    if on_trio:
        clock: Callable[[], float] = _trio_clock().current_time
        return clock
    return asyncio.get_running_loop().time
