"""Shared fixtures: every async test runs on asyncio and on trio.

By default both backends run in *virtual time*: trio with ``MockClock(autojump_threshold=0)``
and asyncio with a ``looptime`` loop, so ``anyio.sleep(60)`` and ``fail_after`` finish at once
while ``anyio.current_time()`` moves exactly as if they had waited. Tests that need real time
(threads, sockets, subprocesses: virtual clocks jump past them) are marked ``real_time``.
"""

from __future__ import annotations

from typing import Any

import looptime
import pytest
import trio.testing


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    name: str = request.param
    if request.node.get_closest_marker("real_time") is not None:
        return name, {}
    if name == "asyncio":
        return name, {"loop_factory": lambda: looptime.new_event_loop(start=0)}
    return name, {"clock": trio.testing.MockClock(autojump_threshold=0)}
