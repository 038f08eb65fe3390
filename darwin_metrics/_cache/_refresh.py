"""Refresh ahead: hits on old entries reload them in the background, in a task group the cache
is given for the length of a ``refreshing()`` block.

A hit older than ``refresh_after`` returns its value at once; if no load of that key is in
flight in this event loop, it registers a flight for it (so that no second refresh starts, and
callers that miss meanwhile wait for this one) and starts a task in the block's task group.
Nothing here awaits on the reader's path. The task stores the new value only if the entry is
still the one it refreshed (not replaced, re-set or removed meanwhile); if the loader fails,
the entry keeps its value, and the failure is logged and counted.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Awaitable, Callable, Hashable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from .._tasks import exit_task_group
from ._entry import _MISSING, _Entry, _Sentinel
from ._flight import _AsyncFlight, current
from ._loading import _awaitable, not_awaitable, store_loaded
from ._options import _LoadOptions

if TYPE_CHECKING:
    from ._core import Cache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_logger = logging.getLogger("darwin_metrics")

#: The keys due for a refresh, with the entry and expiry that each refresh replaces.
_Due = dict[K, tuple[_Entry[K, V], float]]


def get_refreshing(
    cache: Cache[K, V],
    key: K,
    refresh_after: float,
    load: Callable[[], Awaitable[V]],
    options: _LoadOptions[V],
) -> V | Literal[_Sentinel.MISSING]:
    """:meth:`Cache.get` (counted alike) that also starts a refresh of an old hit."""
    entry = cache._data.get(key)
    if entry is not None:
        now = cache._clock()
        expires = cache._expiry(entry)
        value = cache._read(entry, now, touch=True)
        if value is not _MISSING:
            entry.visited = True
            cache._hits += 1
            if cache._age(entry, now, options.assumed_ttl or cache._ttl) >= refresh_after:
                start(cache, {key: (entry, expires)}, load, options, many=False)
            return value
        cache._drop_expired(key, entry, now)
    cache._misses += 1
    return _MISSING


def get_many_refreshing(
    cache: Cache[K, V],
    keys: list[K],
    refresh_after: float,
    load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    options: _LoadOptions[V],
    found: dict[K, V],
    missing: list[K],
) -> None:
    """Look ``keys`` up as :meth:`Cache.get_many` does; refresh the old hits in one call."""
    due: _Due[K, V] = {}
    assumed = options.assumed_ttl or cache._ttl
    for key in keys:
        entry = cache._data.get(key)
        if entry is not None:
            now = cache._clock()
            expires = cache._expiry(entry)
            value = cache._read(entry, now, touch=True)
            if value is not _MISSING:
                entry.visited = True
                cache._hits += 1
                found[key] = value
                if cache._age(entry, now, assumed) >= refresh_after:
                    due[key] = (entry, expires)
                continue
            cache._drop_expired(key, entry, now)
        cache._misses += 1
        missing.append(key)
    if due:
        start(cache, due, load_many, options, many=True)


def start(
    cache: Cache[K, V],
    due: _Due[K, V],
    loader: Callable[..., Awaitable[Any]],
    options: _LoadOptions[V],
    *,
    many: bool,
) -> None:
    """Start one background refresh of the keys of ``due`` not already loading. No await."""
    token = current()[0]
    flights = cache._async_flights
    keys = [key for key in due if (token, key) not in flights]
    if not keys:
        return
    group = cache._refreshers.get(token)
    if group is None:
        if not cache._warned_refresh:
            cache._warned_refresh = True
            warnings.warn(
                "cache entries are due for a refresh (refresh_after), but no "
                "`async with cache.refreshing():` block is active in this event loop, so none "
                "is refreshed: they are reloaded when they expire",
                RuntimeWarning,
                stacklevel=4,
            )
        return
    started: dict[K, tuple[_AsyncFlight[V], _Entry[K, V], float]] = {}
    for key in keys:
        flight: _AsyncFlight[V] = _AsyncFlight(None)  # its task becomes the owner
        flights[(token, key)] = flight
        started[key] = (flight, *due[key])
    try:
        group.start_soon(_refresh, cache, token, started, loader, options, many)
    except BaseException:
        for key, (flight, _, _) in started.items():
            del flights[(token, key)]
            flight.event.set()
        raise
    cache._count_refresh(started=1)


async def _refresh(
    cache: Cache[K, V],
    token: Hashable,
    started: dict[K, tuple[_AsyncFlight[V], _Entry[K, V], float]],
    loader: Callable[..., Awaitable[Any]],
    options: _LoadOptions[V],
    many: bool,
) -> None:
    """The background task of one refresh: load, then store what is still wanted."""
    flights = cache._async_flights
    try:
        me = current()[1]
        for flight, _, _ in started.values():
            flight.owner = me
        keys = list(started)
        begun = cache._clock()
        try:
            awaitable = loader(keys) if many else loader()
            if not _awaitable(awaitable):
                raise not_awaitable(options, awaitable)
            result = await awaitable
            if many and not isinstance(result, Mapping):
                raise TypeError(
                    "get_or_load_many: load_many must return a mapping of key to value, "
                    f"returned {type(result).__name__}"
                )
        except Exception as exc:
            cache._record_load(cache._clock() - begun, failed=True)
            cache._count_refresh(failed=1)
            _logger.warning(
                "refreshing %s failed; the cache keeps the value it had",
                repr(keys[0]) if len(keys) == 1 else f"{len(keys)} keys",
                exc_info=True,
            )
            for flight, _, _ in started.values():
                flight.fail(exc)
            return
        cache._record_load(cache._clock() - begun, failed=False)
        for key, (flight, entry, expires) in started.items():
            if many:
                if key not in result:
                    flight.absent = True  # the entry keeps its value
                    continue
                value = result[key]
            else:
                value = result
            try:
                store_loaded(cache, key, value, options, flight, refreshed=(entry, expires))
            except Exception as exc:
                _logger.warning(
                    "storing the refreshed value of %r failed; the cache keeps the value it had",
                    key,
                    exc_info=True,
                )
                flight.fail(exc)
                continue
            flight.succeed(value)
    finally:
        for key, (flight, _, _) in started.items():
            del flights[(token, key)]
            flight.event.set()


class Refreshing:
    """What :meth:`Cache.refreshing` returns: registers a task group for this event loop."""

    __slots__ = ("_cache", "_given", "_group", "_token")

    def __init__(self, cache: Cache[Any, Any], task_group: TaskGroup | None) -> None:
        self._cache = cache
        self._given = task_group
        self._group: TaskGroup | None = None
        self._token: Hashable | None = None

    def _check_free(self, token: Hashable) -> None:
        if token in self._cache._refreshers:
            raise RuntimeError(
                "another `async with cache.refreshing():` block of this cache is active in this "
                "event loop; use that one"
            )

    async def __aenter__(self) -> Cache[Any, Any]:
        if self._token is not None:
            raise RuntimeError("this refreshing() block is already active")
        token = current()[0]
        self._check_free(token)
        group = self._given
        if group is None:
            own = anyio.create_task_group()
            await own.__aenter__()
            if token in self._cache._refreshers:  # another task entered one meanwhile
                own.cancel_scope.cancel()
                await own.__aexit__(None, None, None)
                self._check_free(token)
            self._group = group = own
        self._cache._refreshers[token] = group
        self._token = token
        return self._cache

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool | None:
        token, self._token = self._token, None
        assert token is not None
        del self._cache._refreshers[token]
        group, self._group = self._group, None
        if group is None:
            return None
        group.cancel_scope.cancel()  # refreshes still running: the cache keeps its values
        return await exit_task_group(group, exc_type, exc_val, exc_tb)

    def __repr__(self) -> str:
        state = "active" if self._token is not None else "inactive"
        where = "its own task group" if self._given is None else "a given task group"
        return f"<darwin_metrics cache refreshing() block, {state}, in {where}>"
