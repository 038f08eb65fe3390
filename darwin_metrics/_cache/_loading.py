"""Single-flight loads: the miss paths of ``get_or_load``, ``get_or_set`` and ``get_or_load_many``.

A miss registers a *flight* for its key (per event loop for async loads, per cache for
threads) and runs the loader; callers that miss the same key meanwhile find the flight and
wait for its outcome instead of loading again. The flight is removed and its event set in a
``finally``, so a cancelled or interrupted loader never strands its waiters: they find no
outcome and one of them loads instead.

Each function here runs after the caller's lookup missed (and counted the miss).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeVar

import anyio
import anyio.lowlevel

from . import _options
from ._entry import _GONE, _MISSING, _Entry, _Sentinel
from ._flight import _AsyncFlight, _Flight, _ThreadFlight, current
from ._options import _LoadOptions

if TYPE_CHECKING:
    from ._core import Cache

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_Departed = list[tuple[Any, Any, Any]]

PLAIN_GET_OR_LOAD: _LoadOptions[Any] = _LoadOptions("get_or_load")
PLAIN_GET_OR_SET: _LoadOptions[Any] = _LoadOptions("get_or_set")
_PLAIN = {
    "get_or_load": PLAIN_GET_OR_LOAD,
    "get_or_set": PLAIN_GET_OR_SET,
    "get_or_load_many": _LoadOptions[Any]("get_or_load_many"),
}


def options(
    name: str, ttl: object, stale_if_error: object, cache_if: object, *, refresh: bool = False
) -> _LoadOptions[Any]:
    """The checked options of one call; a shared object when there are none."""
    if ttl is None and stale_if_error is None and cache_if is None and not refresh:
        return _PLAIN[name]
    return _LoadOptions(name, ttl, stale_if_error, cache_if, refresh=refresh)


def _awaitable(value: object) -> bool:
    """Whether a loader's result can be awaited (typed ``object``: that is what is checked)."""
    return inspect.isawaitable(value)


def not_awaitable(options: _LoadOptions[Any], result: object) -> TypeError:
    return TypeError(
        f"{options.name}: the loader returned {type(result).__name__} {result!r}, which is not "
        "awaitable; for a synchronous function use get_or_set"
    )


def coroutine_error(options: _LoadOptions[Any]) -> TypeError:
    if options.name == "get_or_set":
        return TypeError(
            "get_or_set: make() returned a coroutine, which would be cached un-awaited; for an "
            "async function use `await cache.get_or_load(key, make)`"
        )
    return TypeError(
        f"{options.name}() returned a coroutine, which would be cached un-awaited: @cached "
        "treats a function as async only if it is an `async def` (or a partial of one)"
    )


def store_loaded(
    cache: Cache[K, V],
    key: K,
    value: V,
    options: _LoadOptions[V],
    flight: _Flight[V],
    refreshed: tuple[_Entry[K, V], float] | None = None,
) -> None:
    """Store what a load returned, as its options say (outside the lock: the callbacks).

    Nothing is stored when ``cache_if`` refuses the value, when it is heavier than
    ``max_weight``, when the key was removed while it loaded, or, for a refresh
    (``refreshed`` is the entry and expiry it refreshed), when the key got another value
    meanwhile.
    """
    cache_if = options.cache_if
    if cache_if is not None and not cache_if(value):
        return
    ttl = cache._ttl if options.ttl is None else _options.resolve_ttl(options.ttl, value)
    weight = cache._weigh(key, value)
    if cache._too_heavy(weight):
        return
    stale = options.stale_if_error or 0.0
    departed: _Departed = []
    now = cache._clock()
    cache._lock.acquire()
    try:
        if flight.invalidated:
            return
        if refreshed is not None:
            current = cache._data.get(key)
            entry, expires = refreshed
            if current is not None and (
                current is not entry or cache._expiry(entry) is not expires
            ):
                return
        cache._store_locked(key, value, now, ttl, stale, weight, departed, options.rich)
    finally:
        cache._lock.release()
    if departed and cache._on_evict is not None:
        cache._notify(departed)


def stale_value(
    cache: Cache[K, V], key: K, window: float | None
) -> V | Literal[_Sentinel.MISSING]:
    """A value to return instead of a load's error: live, or expired less than ``window`` ago.

    Counts ``stale_served`` when it returns an expired value.
    """
    found = _stale_lookup(cache, key, window)
    if found[1]:
        cache._count_stale()
    return found[0]


def _stale_lookup(
    cache: Cache[K, V], key: K, window: float | None
) -> tuple[V | Literal[_Sentinel.MISSING], bool]:
    """What :func:`stale_value` returns, and whether it is an expired value; counts nothing."""
    if window is None:
        return _MISSING, False
    entry = cache._data.get(key)
    if entry is None:
        return _MISSING, False
    expires = cache._expiry(entry)
    value = entry.value
    now = cache._clock()
    if cache._expiry(entry) is not expires or value is _GONE:
        return _MISSING, False
    if cache._live(entry, now):
        return value, False  # stored meanwhile: not stale at all
    if now >= cache._deadline(entry) + window:
        return _MISSING, False
    return value, True


# -- async, one key ---------------------------------------------------------------------------


async def load_one(
    cache: Cache[K, V], key: K, load: Callable[[], Awaitable[V]], options: _LoadOptions[V]
) -> V:
    """The miss path of ``get_or_load`` and of decorated async functions.

    A miss is a checkpoint: a caller that finds a load in flight waits for it; one that does
    not registers its own flight first (so that callers arriving meanwhile wait for it instead
    of yielding too), then yields once inside it, then loads.
    """
    loop, me = current()
    flight_key = (loop, key)
    flights = cache._async_flights
    # Only this event loop's tasks use ``flight_key``, and nothing below awaits between
    # looking a flight up and registering one: no other task can slip in between.
    while True:
        flight = flights.get(flight_key)
        if flight is None:
            break
        if flight.owner is me:
            raise RuntimeError(
                f"{options.name}({key!r}) was called by the loader that is loading the same "
                "key; it would wait for itself forever"
            )
        flight.waiters += 1
        cache._count_joined()
        await flight.event.wait()
        try:
            value = flight.outcome()
        except Exception:
            stale = stale_value(cache, key, options.stale_if_error)
            if stale is not _MISSING:
                return stale
            raise
        if value is not _MISSING:
            return value
        # The loading task was cancelled (or the key was absent from a bulk load): loop, and
        # maybe become the loader.
    flight = flights[flight_key] = _AsyncFlight(me)
    try:
        # A checkpoint in two halves, as trio's own operations do: cancellation is checked
        # now, and the yield comes after the load, so that the load starts at once (a yield
        # here would wait for every task that is ready, such as the rest of a stampede).
        await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled: abandoned, nothing loaded
        peeked = cache._peek(key)  # set meanwhile, or loaded by an event loop in another thread
        if peeked is _MISSING:
            result = await _run_load(cache, key, flight, load, options)
        else:
            result = peeked
            flight.succeed(result)
    finally:
        del flights[flight_key]
        flight.event.set()
    await anyio.lowlevel.cancel_shielded_checkpoint()  # the value is the caller's
    return result


async def _run_load(
    cache: Cache[K, V],
    key: K,
    flight: _AsyncFlight[V],
    load: Callable[[], Awaitable[V]],
    options: _LoadOptions[V],
) -> V:
    started = cache._clock()
    try:
        awaitable = load()
    except Exception as exc:
        return _failed(cache, key, flight, options, started, exc)
    if not _awaitable(awaitable):
        error = not_awaitable(options, awaitable)
        flight.fail(error)
        raise error
    try:
        value = await awaitable
    except Exception as exc:
        return _failed(cache, key, flight, options, started, exc)
    cache._record_load(cache._clock() - started, failed=False)
    try:
        store_loaded(cache, key, value, options, flight)
    except Exception as exc:
        flight.fail(exc)
        raise
    flight.succeed(value)
    return value


def _failed(
    cache: Cache[K, V],
    key: K,
    flight: _Flight[V],
    options: _LoadOptions[V],
    started: float,
    error: Exception,
) -> V:
    """A load raised ``error``: count it, hand it to the waiters, return a stale value or
    re-raise it."""
    cache._record_load(cache._clock() - started, failed=True)
    flight.fail(error)
    stale = stale_value(cache, key, options.stale_if_error)
    if stale is _MISSING:
        raise error
    return stale


# -- threads, one key -------------------------------------------------------------------------


def make_one(cache: Cache[K, V], key: K, make: Callable[[], V], options: _LoadOptions[V]) -> V:
    """The miss path of ``get_or_set`` and of decorated synchronous functions."""
    me = threading.get_ident()
    flights = cache._thread_flights
    while True:
        cache._lock.acquire()
        try:
            flight = flights.get(key)
            leading = flight is None
            if flight is None:
                flight = flights[key] = _ThreadFlight(me)
            elif flight.owner != me:
                flight.waiters += 1
                cache._joined += 1
        finally:
            cache._lock.release()
        if leading:
            break
        if flight.owner == me:
            raise RuntimeError(
                f"{options.name}({key!r}) was called by the function that is computing the "
                "same key; it would wait for itself forever"
            )
        flight.event.wait()
        try:
            value = flight.outcome()
        except Exception:
            stale = stale_value(cache, key, options.stale_if_error)
            if stale is not _MISSING:
                return stale
            raise
        if value is not _MISSING:
            return value
        # The thread that was making it gave up (KeyboardInterrupt...): try again.
    try:
        # Another thread may have stored it between our miss and our flight.
        value = cache._peek(key)
        if value is _MISSING:
            started = cache._clock()
            try:
                value = make()
            except Exception as exc:
                return _failed(cache, key, flight, options, started, exc)
            if isinstance(value, Coroutine):
                value.close()  # never awaited, never cached, and no "never awaited" warning
                error = coroutine_error(options)
                flight.fail(error)
                raise error
            cache._record_load(cache._clock() - started, failed=False)
            try:
                store_loaded(cache, key, value, options, flight)
            except Exception as exc:
                flight.fail(exc)
                raise
        flight.succeed(value)
        return value
    finally:
        cache._lock.acquire()
        try:
            del flights[key]
        finally:
            cache._lock.release()
        flight.event.set()


# -- async, many keys -------------------------------------------------------------------------


async def load_many(
    cache: Cache[K, V],
    missing: list[K],
    load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    options: _LoadOptions[V],
    found: dict[K, V],
) -> None:
    """The miss path of ``get_or_load_many``: add the values of ``missing`` to ``found``.

    As :func:`load_one` does, it registers its own flights before it yields.
    """
    token, me = current()
    flights = cache._async_flights
    pending = missing
    yielded = checked = False
    while pending:
        own: dict[K, _AsyncFlight[V]] = {}
        joined: list[tuple[K, _AsyncFlight[V]]] = []
        # No await from here until every flight of ours is registered.
        for key in pending:
            flight = flights.get((token, key))
            if flight is None:
                value = cache._peek(key)
                if value is not _MISSING:
                    found[key] = value
                else:
                    own[key] = _AsyncFlight(me)
            elif flight.owner is me:
                raise RuntimeError(
                    f"get_or_load_many: the loader asked for {key!r}, which it is loading "
                    "itself; it would wait for itself forever"
                )
            else:
                joined.append((key, flight))
        for key, flight in own.items():
            flights[(token, key)] = flight
        try:
            if joined:
                for _, flight in joined:
                    flight.waiters += 1
                cache._count_joined(len(joined))
            if own:
                # Cancellation is checked now, the yield comes at the end (as in load_one).
                await anyio.lowlevel.checkpoint_if_cancelled()  # cancelled: abandoned
                checked = True
                await _run_load_many(cache, own, load_many, options, found)
        finally:
            for key, flight in own.items():
                del flights[(token, key)]
                flight.event.set()
        retry: list[K] = []
        for key, flight in joined:
            await flight.event.wait()
            yielded = True
            try:
                value = flight.outcome()
            except Exception:
                stale = stale_value(cache, key, options.stale_if_error)
                if stale is _MISSING:
                    raise
                found[key] = stale
                continue
            if value is not _MISSING:
                found[key] = value
            elif not flight.absent:
                retry.append(key)  # its loader was cancelled: load it ourselves
        pending = retry
    if not yielded:  # a miss is a checkpoint, even when nothing had to wait
        if checked:
            await anyio.lowlevel.cancel_shielded_checkpoint()  # the values are the caller's
        else:
            await anyio.lowlevel.checkpoint()


async def _run_load_many(
    cache: Cache[K, V],
    own: dict[K, _AsyncFlight[V]],
    load_many: Callable[[list[K]], Awaitable[Mapping[K, V]]],
    options: _LoadOptions[V],
    found: dict[K, V],
) -> None:
    started = cache._clock()
    try:
        awaitable = load_many(list(own))
    except Exception as exc:
        found.update(_failed_many(cache, own, options, started, exc))
        return
    if not _awaitable(awaitable):
        _fail_all(own, not_awaitable(options, awaitable))
    try:
        loaded = await awaitable
    except Exception as exc:
        found.update(_failed_many(cache, own, options, started, exc))
        return
    if not isinstance(loaded, Mapping):
        _fail_all(
            own,
            TypeError(
                "get_or_load_many: load_many must return a mapping of key to value, "
                f"returned {type(loaded).__name__}"
            ),
        )
    cache._record_load(cache._clock() - started, failed=False)
    for key, flight in own.items():
        if key not in loaded:
            flight.absent = True
            continue
        value = loaded[key]
        try:
            store_loaded(cache, key, value, options, flight)
        except Exception as exc:
            _fail_all({k: f for k, f in own.items() if not (f.loaded or f.absent)}, exc)
        flight.succeed(value)
        found[key] = value


def _fail_all(flights: dict[K, _AsyncFlight[V]], error: Exception) -> NoReturn:
    for flight in flights.values():
        flight.fail(error)
    raise error


def _failed_many(
    cache: Cache[K, V],
    own: dict[K, _AsyncFlight[V]],
    options: _LoadOptions[V],
    started: float,
    error: Exception,
) -> dict[K, V]:
    """``load_many`` raised: the stale values of all its keys, or re-raise the error."""
    cache._record_load(cache._clock() - started, failed=True)
    for flight in own.values():
        flight.fail(error)
    found: dict[K, V] = {}
    expired = 0
    for key in own:
        lookup = _stale_lookup(cache, key, options.stale_if_error)
        value = lookup[0]
        if value is _MISSING:
            raise error
        found[key] = value
        expired += lookup[1]
    if expired:
        cache._count_stale(expired)
    return found
