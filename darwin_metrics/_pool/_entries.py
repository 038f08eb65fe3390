"""What the pool keeps per resource and per lease."""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Any

from .._lowlevel import Parker

__all__ = ["Entry", "Lease", "where_acquired"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Entry:
    """One resource the pool owns, with its bookkeeping."""

    __slots__ = ("created_at", "generation", "idle_since", "resource", "retire_at")

    def __init__(
        self, resource: Any, created_at: float, retire_at: float, generation: int
    ) -> None:
        self.resource = resource
        self.created_at = created_at
        self.retire_at = retire_at
        self.idle_since = created_at
        self.generation = generation  # drain() disposes the resources of older generations


class Lease:
    """A lease: the limiter's borrower object, what it holds, and its place in the queue.

    ``entry`` is ``None`` until the lease is bound to a resource, and again once the resource
    was given back or discarded. ``granted`` is true while a waiter holds a token that the
    pool handed it (with or without an entry) and has not acted on yet.
    """

    __slots__ = ("acquired_at", "entry", "granted", "leak_at", "parker", "warned", "where")

    def __init__(self) -> None:
        self.entry: Entry | None = None
        self.acquired_at = 0.0
        self.where = ""
        self.warned = False
        self.leak_at = 0.0  # with leak_threshold: when it becomes a leak, on the loop's clock
        self.granted = False
        self.parker: Parker | None = None


def where_acquired() -> str:
    """The first caller frame outside darwin_metrics and the async libraries, as file:line."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PACKAGE_DIR) and not any(
            part in filename for part in ("/anyio/", "/trio/", "/asyncio/", "contextlib")
        ):
            return f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"
