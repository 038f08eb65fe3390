"""The pool's side of ``shared_limit``: a capacity limit shared with other processes.

The pool takes one token of the shared limit for each resource it *creates*, before the
factory runs, and gives it back once the resource has been *disposed*: a shared limit counts
the resources that exist (a database counts open connections, idle ones included), so an
idle resource keeps its token until it is disposed (``max_idle_time`` returns them).

- Waiting for a token is part of the acquisition that needs the new resource: it is bounded by
  the acquisition's timeout and ends with its cancellation, and a token taken for a creation
  that then fails or is cancelled goes back at once.
- A creation waiting for a token *gives way* when a resource of this pool comes back to idle
  meanwhile (its wait is cancelled, and the acquisition takes that resource instead), and when
  the pool closes. Prefill (``min_idle``, ``wait_ready``) takes a token only if one is free at
  once: it never waits for one.
- A token that is lost (its lease ran out while the process could not reach the server), or
  given back because the limiter stopped before the pool closed, marks its resource: it is
  disposed at its next checkout or return, or by upkeep if it is idle.

Nothing here imports the limiter: any object with the :class:`SharedLimit` methods serves.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio

from ._entries import Entry

if TYPE_CHECKING:
    from ._pool import ResourcePool

__all__ = ["GaveWay", "SharedLimit", "attach", "check", "give_back", "give_way", "is_lost", "take"]

logger = logging.getLogger("darwin_metrics")


@runtime_checkable
class SharedLimit(Protocol):
    """What a pool's ``shared_limit`` must offer (``SharedCapacityLimiter`` does)."""

    async def acquire_on_behalf_of(self, borrower: object) -> object: ...

    async def try_acquire_on_behalf_of(self, borrower: object) -> object | None: ...

    def release_on_behalf_of(self, borrower: object) -> None: ...


class GaveWay(Exception):  # a signal between the pool's own functions, never raised out
    """No shared token for this creation: it gave way to an idle resource (or to the pool
    closing), or, not waiting, found none free."""


class Token:
    """The borrower of one shared token: one per resource the pool creates."""

    __slots__ = ("permit",)

    def __init__(self) -> None:
        self.permit: object | None = None

    def __repr__(self) -> str:
        return f"<a ResourcePool's shared token: {self.permit!r}>"


def check(shared_limit: object, factory: object) -> SharedLimit | None:
    """Validate the ``shared_limit`` argument."""
    if shared_limit is None:
        return None
    if not isinstance(shared_limit, SharedLimit):
        raise TypeError(
            "shared_limit must be a SharedCapacityLimiter (or have acquire_on_behalf_of, "
            "try_acquire_on_behalf_of and release_on_behalf_of), not "
            f"{type(shared_limit).__name__}"
        )
    if factory is None:
        raise ValueError("shared_limit counts the resources the pool creates: it needs a factory")
    return shared_limit


async def take(pool: ResourcePool[Any], *, wait: bool) -> Token:
    """Take a shared token for a creation (a checkpoint).

    Raises:
        GaveWay: ``wait`` is false and no token is free, or the wait gave way.
    """
    limit = pool._shared_limit
    assert limit is not None
    token = Token()
    if not wait:
        token.permit = await limit.try_acquire_on_behalf_of(token)
        if token.permit is None:
            raise GaveWay
        return token
    scope = anyio.CancelScope()
    pool._shared_waits.append(scope)
    pool._update_fast_paths()  # every return must look for waiting creations now
    try:
        with scope:
            token.permit = await limit.acquire_on_behalf_of(token)
    finally:
        pool._shared_waits.remove(scope)
        pool._update_fast_paths()
    if token.permit is None:  # cancelled by give_way (the limit gave the token back)
        raise GaveWay
    return token


def attach(pool: ResourcePool[Any], token: Token, entry: Entry) -> None:
    """The new resource ``entry`` holds ``token`` until it is disposed (sync)."""
    key = id(entry.resource)
    pool._shared_tokens[key] = token
    on_lost = getattr(token.permit, "on_lost", None)
    if callable(on_lost):
        on_lost(lambda: _lost(pool, key, token))


def release(pool: ResourcePool[Any], token: Token) -> None:
    """Give ``token`` back to the shared limit (sync); its errors are logged."""
    limit = pool._shared_limit
    assert limit is not None
    try:
        limit.release_on_behalf_of(token)
    except Exception:
        logger.exception("%r could not give a token back to %r", pool, limit)


def give_back(pool: ResourcePool[Any], resource: object) -> None:
    """``resource`` was disposed: give its token back, if it has one (sync)."""
    key = id(resource)
    token = pool._shared_tokens.pop(key, None)
    if token is None:
        return
    if key in pool._shared_lost:
        pool._shared_lost.discard(key)
        pool._update_fast_paths()
    release(pool, token)


def give_way(pool: ResourcePool[Any], *, everyone: bool = False) -> None:
    """Cancel the waits of creations that an idle resource (or a close) makes needless."""
    count = len(pool._shared_waits) if everyone else len(pool._idle)
    for scope in pool._shared_waits:
        if count <= 0:
            return
        if not scope.cancel_called:
            scope.cancel()
            count -= 1


def is_lost(pool: ResourcePool[Any], entry: Entry) -> bool:
    return bool(pool._shared_lost) and id(entry.resource) in pool._shared_lost


def _lost(pool: ResourcePool[Any], key: int, token: Token) -> None:
    """The token of a resource was lost: dispose it as soon as it is checked out, returned or
    found idle (runs in the limit's own task; sync)."""
    if pool._shared_tokens.get(key) is not token:
        return
    logger.warning(
        "%r: a resource's token of its shared limit was lost (%r); the resource is disposed",
        pool,
        token.permit,
    )
    pool._shared_lost.add(key)
    pool._update_fast_paths()
    pool._wake_upkeep()
