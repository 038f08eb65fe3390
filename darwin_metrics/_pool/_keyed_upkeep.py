"""The keyed pool's upkeep: prefill to ``min_idle`` per key, idle reaping, retirement.

It runs in the task that ``async with pool:`` starts, and sleeps until the next idle
resource is due (or until it is woken: a checkout below ``min_idle``, a freed place while a
key waits for prefill, a resource returned that is due sooner). Prefill makes one resource
at a time, in a place of its own, only while nobody waits and ``max_total`` leaves room: it
never evicts. A key keeps its ``min_idle`` most recently used resources, unless nobody used
the whole key for ``max_idle_time``: then it loses them all and disappears.
"""

from __future__ import annotations

import logging
import math

import anyio
from anyio import CancelScope

from ._keyed_core import _KeyedCore
from ._keyed_parts import _Key, _Slot

__all__ = ["_KeyedUpkeep"]

logger = logging.getLogger("darwin_metrics")

_PREFILL_BACKOFF_MAX = 10.0  # seconds between prefill attempts after factory failures


class _KeyedUpkeep(_KeyedCore):
    """The upkeep task's rounds, on top of the pool's core."""

    __slots__ = ()

    def _key_unused(self, k: _Key, now: float) -> bool:
        """Whether ``k`` holds only idle resources, nobody waits, and nobody used it for
        ``max_idle_time``: then it loses them all, ``min_idle`` or not."""
        mit = self._max_idle_time
        return (
            mit is not None
            and k.slots == len(k.idle)
            and not k.waiters
            and now >= k.last_used + mit
        )

    async def _upkeep(self, scope: CancelScope) -> None:
        backoff = 0.0
        retry_prefill_at = -math.inf
        with scope:
            while True:
                self._upkeep_wakeup = wakeup = anyio.Event()
                self._upkeep_due = -math.inf  # awake: changes need no wake-up
                await self._dispose_entries(self._collect_expired(), None)
                if self._clock() >= retry_prefill_at:
                    try:
                        await self._prefill()
                    except Exception:
                        backoff = min(max(backoff * 2, 0.1), _PREFILL_BACKOFF_MAX)
                        retry_prefill_at = self._clock() + backoff
                        logger.exception("prefill failed; retrying in %.3g s", backoff)
                    else:
                        backoff = 0.0
                now = self._clock()
                due = self._next_due()
                if retry_prefill_at > now and self._needs_fill:
                    due = min(due, retry_prefill_at)
                # Anything that needs upkeep sooner (a checkout below min_idle, a slot freed
                # while a key waits for prefill, an entry due sooner) sets the wake-up event.
                self._upkeep_due = due
                if due > now:
                    with anyio.move_on_after(due - now):
                        await wakeup.wait()
                else:
                    await anyio.lowlevel.checkpoint()

    def _collect_expired(self) -> list[_Slot]:
        """Take out idle resources past ``max_idle_time`` or ``max_lifetime`` (sync).

        A key keeps its ``min_idle`` most recently used resources, unless the whole key went
        unused for ``max_idle_time``. The caller forgets and disposes what is returned.
        """
        mit = self._max_idle_time
        if mit is None and self._max_lifetime is None:
            return []
        now = self._clock()
        doomed: list[_Slot] = []
        for k in list(self._keys.values()):
            idle = k.idle
            if not idle:
                continue
            if self._key_unused(k, now):
                doomed.extend(idle)
                for entry in idle:
                    del self._lru[entry]
                idle.clear()
                continue
            removable = len(idle) - self._min_idle
            keep: list[_Slot] = []
            for entry in idle:  # the longest idle first
                if entry.retire_at <= now or (
                    removable > 0 and mit is not None and now >= entry.idle_since + mit
                ):
                    doomed.append(entry)
                    del self._lru[entry]
                    removable -= 1
                else:
                    keep.append(entry)
            if len(keep) != len(idle):
                idle[:] = keep
        return doomed

    def _entry_due(self, entry: _Slot) -> float:
        """When upkeep must look at an idle entry next (the expressions it tests)."""
        mit = self._max_idle_time
        if mit is None:
            return entry.retire_at
        return min(entry.retire_at, entry.idle_since + mit)

    def _next_due(self) -> float:
        due = math.inf
        mit = self._max_idle_time
        for k in self._keys.values():
            idle = k.idle
            if not idle:
                continue
            removable = mit is not None and len(idle) > self._min_idle
            for entry in idle:
                due = min(due, entry.retire_at)
                if removable:
                    assert mit is not None
                    due = min(due, entry.idle_since + mit)
            if mit is not None and k.slots == len(idle) and not k.waiters:
                due = min(due, k.last_used + mit)  # the whole key, as _key_unused tests it
        return due

    async def _prefill(self) -> None:
        """Make idle resources up to ``min_idle`` for the keys below it, one at a time.

        Each is made in a slot of its own, only while nobody waits (waiting tasks make their
        own) and ``max_total`` leaves room: prefill never evicts.
        """
        needs = self._needs_fill
        while needs and not self._closed and not self._waiting:
            k = next(iter(needs))
            if (
                k.dropped
                or len(k.idle) + k.creating >= self._min_idle
                or self._key_unused(k, self._clock())
                or k.slots >= self._max_per_key
            ):
                del needs[k]  # noted again when it needs it (a checkout, a freed slot)
                continue
            if self._slots >= self._max_total:
                return  # woken again when a slot is freed
            slot = self._new_slot(k)
            try:
                await self._create_into(slot)
            except BaseException:
                self._free_slot(slot)
                raise
            if self._is_closed():
                self._forget(slot, "closed")
                deferred = await self._dispose_and_free(slot)
                if deferred is not None:
                    raise deferred
                return
            slot.idle_since = self._clock()
            self._idle_put(slot)
