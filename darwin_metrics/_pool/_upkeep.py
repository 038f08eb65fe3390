"""The pool's upkeep: prefill to ``min_idle``, idle reaping, retirement, leak warnings.

It runs as one task in the task group of ``async with pool:``; these functions take the pool
and work on its state, which they share with the checkout and give-back code in
:mod:`._pool` (nothing here awaits between two changes that belong together).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from anyio import CancelScope, WouldBlock
from anyio.lowlevel import checkpoint

from ._entries import Entry, Lease

if TYPE_CHECKING:
    from ._pool import ResourcePool
    from ._statistics import DisposalReason

__all__ = [
    "collect_expired",
    "entry_due",
    "expiry_reason",
    "keep_alive",
    "next_due",
    "prefill",
    "run",
    "warn_leak",
]

logger = logging.getLogger("darwin_metrics")

_PREFILL_BACKOFF_MAX = 10.0  # seconds between prefill attempts after factory failures


def warn_leak(pool: ResourcePool[Any], resource: object, lease: Lease, held: float) -> None:
    lease.warned = True
    logger.warning(
        "a lease of %r has been held for %.3g s (leak_threshold=%s s); acquired at %s",
        resource,
        held,
        pool._leak_threshold,
        lease.where or "<unknown>",
    )


async def run(pool: ResourcePool[Any], scope: CancelScope) -> None:
    backoff = 0.0
    retry_prefill_at = -math.inf
    keepalive_blocked_until = -math.inf
    with scope:
        while True:
            pool._upkeep_wakeup = wakeup = anyio.Event()
            pool._upkeep_due = -math.inf  # awake: changes need no wake-up
            await pool._dispose_entries(collect_expired(pool))
            keepalive = pool._keepalive
            if (
                keepalive is not None
                and anyio.current_time() >= keepalive_blocked_until
                and await keep_alive(pool) is False
            ):
                # No token to be had: try again a little later, without spinning.
                keepalive_blocked_until = anyio.current_time() + min(keepalive, 1.0)
            if anyio.current_time() >= retry_prefill_at:
                try:
                    await prefill(pool)
                except Exception:
                    backoff = min(max(backoff * 2, 0.1), _PREFILL_BACKOFF_MAX)
                    retry_prefill_at = anyio.current_time() + backoff
                    logger.exception("prefill failed; retrying in %.3g s", backoff)
                else:
                    backoff = 0.0
            now = anyio.current_time()
            due = next_due(pool)
            if keepalive_blocked_until > now:
                due = max(due, min(keepalive_blocked_until, next_due(pool, keepalive=False)))
            if retry_prefill_at > now and len(pool._idle) < pool._min_idle:
                due = min(due, retry_prefill_at)
            # Anything else that needs upkeep sooner (a checkout below min_idle, a
            # creation that ended, a resize) sets the wake-up event.
            pool._upkeep_due = due
            if due > now:
                with anyio.move_on_after(due - now):
                    await wakeup.wait()
            else:
                await checkpoint()


def expiry_reason(pool: ResourcePool[Any], entry: Entry) -> DisposalReason:
    """Why upkeep takes out an expired idle entry."""
    return "lifetime" if entry.retire_at <= anyio.current_time() else "idle"


def collect_expired(pool: ResourcePool[Any]) -> list[Entry]:
    """Take out idle resources that are past max_idle_time or max_lifetime (sync).

    The caller forgets and disposes them.
    """
    now = anyio.current_time()
    doomed: list[Entry] = []
    if pool._idle and (pool._max_idle_time is not None or pool._max_lifetime is not None):
        keep: list[Entry] = []
        # Oldest-idle first, so the most recently used ones stay when min_idle binds.
        removable = len(pool._idle) - pool._min_idle
        for entry in pool._idle:
            if entry.retire_at <= now or (
                removable > 0
                and pool._max_idle_time is not None
                and now >= entry.idle_since + pool._max_idle_time
            ):
                doomed.append(entry)
                removable -= 1
            else:
                keep.append(entry)
        pool._idle[:] = keep
    if pool._leak_threshold is not None:
        for lease in pool._leased.values():
            if not lease.warned and lease.entry is not None and now >= lease.leak_at:
                warn_leak(pool, lease.entry.resource, lease, pool._clock() - lease.acquired_at)
    return doomed


def entry_due(pool: ResourcePool[Any], entry: Entry, keepalive: bool = True) -> float:
    """When upkeep must look at an idle entry next."""
    due = entry.retire_at
    if keepalive and pool._keepalive is not None:
        due = min(due, entry.idle_since + pool._keepalive)
    if pool._max_idle_time is None or len(pool._idle) <= pool._min_idle:
        return due
    return min(due, entry.idle_since + pool._max_idle_time)


def next_due(pool: ResourcePool[Any], keepalive: bool = True) -> float:
    due = math.inf
    for entry in pool._idle:
        due = min(due, entry_due(pool, entry, keepalive))
    if pool._leak_threshold is not None:
        for lease in pool._leased.values():
            if not lease.warned:
                # The very expression _collect_expired tests, so rounding can't make
                # upkeep wake before it is due, again and again.
                due = min(due, lease.leak_at)
    return due


async def keep_alive(pool: ResourcePool[Any]) -> bool | None:
    """Exercise the idle resource idle the longest, if it is due; dispose it if it fails.

    One at a time, under a capacity token taken without waiting (so that the pool's promise
    holds: every token holder finds a resource or room), and never while tasks wait (an
    idle resource would have gone to them). Returns ``None`` when nothing was due, ``False``
    when one was due but no token could be had, ``True`` when one was exercised.
    """
    keepalive = pool._keepalive
    assert keepalive is not None
    now = anyio.current_time()
    due = [entry for entry in pool._idle if now >= entry.idle_since + keepalive]
    if not due:
        return None
    if pool._waiters or pool._closed:
        return False
    limiter = pool._limiter
    assert limiter is not None
    borrower = Lease()
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except WouldBlock:
        return False
    entry = min(due, key=lambda entry: entry.idle_since)
    pool._idle.remove(entry)
    hook = pool._ping if pool._ping is not None else pool._check
    assert hook is not None
    ok, deferred = await pool._run_hook("ping", _answers_true(hook), entry.resource)
    if ok:
        entry.idle_since = anyio.current_time()
        orphan = pool._put_back(entry)  # or disposed: the pool closed or drained meanwhile
    else:
        pool._forget(entry, "check_failed")
        orphan = entry
    pool._release_token(borrower)
    if orphan is not None:
        deferred = await pool._dispose_resource(orphan.resource) or deferred
    if deferred is not None:
        raise deferred
    return True


def _answers_true(hook: Callable[[Any], object]) -> Callable[[Any], Awaitable[None]]:
    """Wrap ``ping`` (or ``check``) so that returning ``False`` fails like raising does."""

    async def exercised(resource: Any) -> None:
        result = hook(resource)
        if inspect.isawaitable(result):
            result = await result
        if result is False:
            raise ValueError(f"the keepalive hook returned False for {resource!r}")

    return exercised


async def prefill(pool: ResourcePool[Any]) -> None:
    """Create idle resources up to ``min_idle``, each under a capacity token.

    Holding a token while creating keeps the limiter's promise that every token holder
    finds an idle resource or room to create one; releasing it after the resource is
    idle hands the new resource to the longest waiter, if any. When tasks are waiting
    (no token to be had), prefill stands back: they create their own.
    """
    limiter = pool._limiter
    assert limiter is not None
    while (
        not pool._closed
        and pool._factory is not None
        and not pool._waiters
        and len(pool._idle) + pool._creating < pool._min_idle
        and pool._size + pool._creating < pool._max_size
    ):
        borrower = Lease()
        try:
            limiter.acquire_on_behalf_of_nowait(borrower)
        except WouldBlock:
            return
        try:
            entry = await pool._create_checked()
        except BaseException:
            pool._release_token(borrower)
            raise
        if pool._is_closed() or pool._size > pool._max_size:  # closed or shrunk meanwhile
            pool._forget(entry, "closed" if pool._is_closed() else "shrunk")
            pool._release_token(borrower)
            deferred = await pool._dispose_resource(entry.resource)
            if deferred is not None:
                raise deferred
            continue
        pool._idle.append(entry)
        pool._release_token(borrower)
