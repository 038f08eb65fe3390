"""The running backend's own primitives, resolved once, for the pools' hot paths.

They live in :mod:`darwin_metrics._lowlevel` (the pool, the keyed pool and the manager share
them); this module names the ones the keyed pool uses, plus the loop's own clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .._lowlevel import get_running_loop, trio_checkpoint, trio_clock, trio_token

__all__ = ["get_running_loop", "loop_clock", "trio_checkpoint", "trio_token"]


def loop_clock(on_trio: bool) -> Callable[[], float]:
    """The running event loop's clock (what ``anyio.current_time()`` reads), resolved once."""
    if on_trio:
        clock: Callable[[], float] = trio_clock().current_time
        return clock
    return asyncio.get_running_loop().time
