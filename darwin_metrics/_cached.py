"""``@cached``: a function's results in a :class:`Cache`, with single-flight calls per key.

The decorated function is a plain function (an ``async def`` for an async one), so it binds
as a method, keeps its signature for :mod:`inspect` and its coroutine-function-ness, and a
hit costs a key, a lock-free lookup and nothing else. For a function whose parameters are all
positional-or-keyword (the common case) with the default key, the wrapper is generated with
the function's own parameters (as attrs and dataclasses generate methods), so Python binds
the call and a hit packs no ``*args``/``**kwargs``. Otherwise the key is built from the
arguments without :meth:`inspect.Signature.bind` on the common paths: the tuple of positional
arguments as given when they are complete (the first argument alone for a one-parameter
function), else the same tuple with keyword arguments and defaults put in their places. Either
way ``f(1)``, ``f(x=1)`` and ``f(1, y=<default>)`` share one entry.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from datetime import timedelta
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, overload

from ._cache import Cache, CacheStatistics, _loading, _options, _refresh
from ._cache._entry import _MISSING
from ._cache._options import _LoadOptions

__all__ = ["BoundCachedFunction", "CachedFunction", "cached"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
S = TypeVar("S")
S_contra = TypeVar("S_contra", contravariant=True)
V = TypeVar("V")
F = TypeVar("F", bound="CachedFunction[Any, Any]")

_EMPTY = inspect.Parameter.empty
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

#: For each cache, the function whose default keys it holds: two functions sharing a cache
#: with default keys would read each other's entries (``f(1)`` and ``g(1)`` have one key).
_DEFAULT_KEYED: weakref.WeakKeyDictionary[Cache[Any, Any], Callable[[], Callable[..., Any] | None]]
_DEFAULT_KEYED = weakref.WeakKeyDictionary()


class CachedFunction(Protocol[P, R_co]):
    """What :func:`cached` returns: the function, plus its cache and ``invalidate``.

    For an async function ``R_co`` is its coroutine type: ``await f(...)`` as before.
    """

    @property
    def cache(self) -> Cache[Any, Any]:
        """The cache that holds the results."""
        ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call the function, or answer from the cache: single flight per key."""
        ...

    def cache_info(self) -> CacheStatistics:
        """The statistics of the cache (shared with whatever else uses that cache)."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the entry for these arguments (a method's ``self`` included); whether there
        was a live one."""
        ...

    @overload
    def __get__(self: F, instance: None, owner: type[Any] | None = None) -> F: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R],
        instance: S,
        owner: type[Any] | None = None,
    ) -> BoundCachedFunction[S, P2, R]: ...


class BoundCachedFunction(Protocol[S_contra, P, R_co]):
    """A decorated method bound to an instance: ``obj.method``.

    ``invalidate`` is the function's own, so it takes the instance first:
    ``obj.method.invalidate(obj, ...)``, or ``Class.method.invalidate(obj, ...)``.
    """

    @property
    def cache(self) -> Cache[Any, Any]:
        """The cache that holds the results."""
        ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call the method, or answer from the cache: single flight per key."""
        ...

    def cache_info(self) -> CacheStatistics:
        """The statistics of the cache."""
        ...

    def invalidate(self, instance: S_contra, /, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Remove the entry for these arguments; whether there was a live one."""
        ...


class _Decorator(Generic[V]):
    """The decorator that ``cached(cache, ...)`` returns."""

    __slots__ = ("_cache", "_exclude_self", "_key", "_options", "_refresh_after")

    def __init__(
        self,
        cache: Cache[Any, V],
        key: Callable[..., Hashable] | None,
        exclude_self: bool,
        refresh_after: float | None,
        options: _LoadOptions[V],
    ) -> None:
        self._cache = cache
        self._key = key
        self._exclude_self = exclude_self
        self._refresh_after = refresh_after
        self._options = options

    @overload
    def __call__(
        self, function: Callable[P, Coroutine[Any, Any, V]]
    ) -> CachedFunction[P, Coroutine[Any, Any, V]]: ...

    @overload
    def __call__(self, function: Callable[P, V]) -> CachedFunction[P, V]: ...

    def __call__(self, function: Callable[..., Any]) -> Any:
        if isinstance(function, (staticmethod, classmethod)):
            raise TypeError(
                f"@cached must be applied below @{type(function).__name__}: put "
                f"@{type(function).__name__} on top"
            )
        if not callable(function):
            raise TypeError(f"@cached decorates a function, not {type(function).__name__}")
        name = getattr(function, "__qualname__", None) or repr(function)
        options = self._options.named(name)
        make_key = _key_maker(function, self._key, self._exclude_self)
        if self._key is None:
            _claim_default_keys(self._cache, function)
        is_async = _is_async(function)
        if not is_async and self._refresh_after is not None:
            raise TypeError(
                f"refresh_after needs an async function: {name} is synchronous, and a "
                "background refresh runs in an event loop's task group"
            )
        wrapper: Callable[..., Any] | None = _generated_wrapper(
            function, self._cache, make_key, options, self._refresh_after, is_async
        )
        if wrapper is None and is_async:
            wrapper = _async_wrapper(function, self._cache, make_key, options, self._refresh_after)
        elif wrapper is None:
            wrapper = _sync_wrapper(function, self._cache, make_key, options)
        functools.update_wrapper(wrapper, function)
        cache = self._cache

        def invalidate(*args: Any, **kwargs: Any) -> bool:
            return cache.remove(make_key(args, kwargs))

        invalidate.__qualname__ = f"{name}.invalidate"
        vars(wrapper).update(cache=cache, cache_info=cache.statistics, invalidate=invalidate)
        return wrapper


def cached(
    cache: Cache[Any, V],
    *,
    key: Callable[..., Hashable] | None = None,
    ttl: float | timedelta | Callable[[V], float | timedelta] | None = None,
    exclude_self: bool = False,
    refresh_after: float | timedelta | None = None,
    stale_if_error: float | timedelta | None = None,
    cache_if: Callable[[V], object] | None = None,
) -> _Decorator[V]:
    """Cache a function's results in ``cache``: one call per key at a time, on asyncio and trio.

    ::

        users: Cache[int, User] = Cache(300, maxsize=10_000)

        @cached(users, refresh_after=240)
        async def load_user(user_id: int) -> User: ...

        await load_user(7)          # loads; callers of load_user(7) meanwhile share the call
        await load_user(7)          # a hit: no call, no await of anything else
        load_user.invalidate(7)     # the next call loads again

    An ``async def`` function (or a partial of one) gets :meth:`Cache.get_or_load`'s single
    flight: concurrent callers of the same key in one event loop share one call, and its
    cancellation and error rules (a hit is not a checkpoint; a miss is). Any other function
    gets :meth:`Cache.get_or_set`'s: concurrent threads share one call. Either way, an
    exception from the function reaches every caller that waited for that call, and nothing
    is cached.

    **Keys.** By default the key is made from the arguments, which must be hashable:
    positional and keyword arguments are put in the order of the function's parameters and
    missing ones filled with their defaults, so ``f(1)``, ``f(x=1)`` and ``f(1, y=2)`` (when
    2 is ``y``'s default) are one entry; a one-parameter function's key is its argument
    itself (``load_user(7)`` is stored under ``7``). Two functions cannot share a cache with
    default keys (``f(1)`` and ``g(1)`` would be one entry): give one of them a ``key=``, or
    each its own cache.

    **Methods.** A method's ``self`` is part of the default key (each instance has its own
    entries, and the cache keeps the instances alive); with ``exclude_self=True`` it is left
    out of the key (and ``key=`` is called without it), so every instance shares the entries.
    ``invalidate`` takes the arguments as the function itself receives them, ``self``
    included: ``Repo.find.invalidate(repo, 7)``.

    Args:
        cache: The cache that holds the results; its other users see them too.
        key: Makes the key from the call's arguments (called with the same arguments as the
            function, without ``self`` when ``exclude_self``); an exception it raises
            propagates to the caller.
        ttl: The entries' ttl: seconds, a timedelta, or a function of the result that returns
            one of those; the cache's ttl by default.
        exclude_self: Leave a method's first argument out of the key.
        refresh_after: Refresh ahead (async functions only): a hit on an entry stored longer
            ago than this returns it at once and reloads it in the background, in the task
            group of the cache's :meth:`~Cache.refreshing` block; see
            :meth:`Cache.get_or_load`.
        stale_if_error: If the call raises and the cache still holds a value for the key that
            expired less than this long ago, return that value instead.
        cache_if: Results for which ``cache_if(result)`` is false are returned but not cached.

    Returns:
        The decorator. The function it returns has the decorated one's signature and types,
        and ``.cache``, ``.cache_info()`` (the cache's :class:`CacheStatistics`) and
        ``.invalidate(*args, **kwargs)``.

    Raises:
        TypeError: ``cache`` is not a :class:`Cache`, an option has the wrong type,
            ``refresh_after`` is given for a synchronous function, ``exclude_self`` for a
            function without a first positional parameter, or the decorated object is not a
            function (or is a staticmethod or classmethod object: apply ``@cached`` below
            those).
        ValueError: A duration is zero, negative, NaN or infinite, ``refresh_after`` is not
            shorter than the ttl, or another function already uses ``cache`` with default
            keys.
    """
    if not isinstance(cache, Cache):
        raise TypeError(f"cached() needs a Cache, not {type(cache).__name__}")
    _options.callable_or_none(key, "key")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, not {type(exclude_self).__name__}")
    options: _LoadOptions[V] = _LoadOptions(
        "cached", ttl, stale_if_error, cache_if, refresh=refresh_after is not None
    )
    seconds = (
        None
        if refresh_after is None
        else _options.refresh_after(refresh_after, options.ttl, cache.ttl)
    )
    return _Decorator(cache, key, exclude_self, seconds, options)


def _is_async(function: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(function):
        return True
    if inspect.isfunction(function) or inspect.ismethod(function) or isinstance(function, type):
        return False
    return inspect.iscoroutinefunction(type(function).__call__)  # an object's async __call__


def _claim_default_keys(cache: Cache[Any, Any], function: Callable[..., Any]) -> None:
    claimed = _DEFAULT_KEYED.get(cache)
    owner = None if claimed is None else claimed()
    target = inspect.unwrap(function)
    if owner is not None and owner is not target:
        raise ValueError(
            f"this cache already holds the results of {owner.__qualname__} under default keys; "
            f"{getattr(function, '__qualname__', function)!r} would share its entries (f(1) and "
            "g(1) have the same key): give one of them key=..., or each its own cache"
        )
    try:
        _DEFAULT_KEYED[cache] = weakref.ref(target)
    except TypeError:  # a callable that cannot be weakly referenced (a builtin): keep it
        _DEFAULT_KEYED[cache] = lambda: target


# -- keys -------------------------------------------------------------------------------------

_MakeKey = Callable[[tuple[Any, ...], dict[str, Any]], Hashable]


def _key_maker(
    function: Callable[..., Any], key: Callable[..., Hashable] | None, exclude_self: bool
) -> _MakeKey:
    """``make_key(args, kwargs)`` for the function's calls."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        signature = None
    if exclude_self:
        parameters = [] if signature is None else list(signature.parameters.values())
        if not parameters or parameters[0].kind not in _POSITIONAL:
            raise TypeError(
                "exclude_self needs a function whose first parameter is positional (self), "
                f"and {getattr(function, '__qualname__', function)!r} has none"
            )
    if key is not None:
        if not exclude_self:
            return lambda args, kwargs: key(*args, **kwargs)
        self_name = next(iter(signature.parameters)) if signature is not None else ""

        def custom(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
            if args:
                return key(*args[1:], **kwargs)
            rest = dict(kwargs)
            rest.pop(self_name, None)
            return key(**rest)

        return custom
    if signature is None:
        return _fallback_key
    return _Binder(signature, exclude_self).key


def _fallback_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """The key of a function whose signature cannot be read: functools' shape."""
    if not kwargs:
        return args
    return (*args, _KWARGS, *sorted(kwargs.items()))


class _KwargsMark:
    """Separates positional from keyword arguments in a fallback key."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<keyword arguments>"


_KWARGS = _KwargsMark()


class _Binder:
    """Puts a call's arguments in the order of the function's parameters, defaults filled in.

    ``simple`` signatures (positional-or-keyword and positional-only parameters only) are
    bound here without :meth:`inspect.Signature.bind`; the others (``*args``, keyword-only
    parameters, ``**kwargs``) with it.
    """

    __slots__ = (
        "defaults",
        "fast_length",
        "names",
        "offset",
        "positional_only",
        "signature",
        "simple",
        "single",
    )

    def __init__(self, signature: inspect.Signature, exclude_self: bool) -> None:
        parameters = list(signature.parameters.values())
        self.signature = signature
        self.offset = 1 if exclude_self else 0
        self.simple = all(parameter.kind in _POSITIONAL for parameter in parameters)
        self.names = [parameter.name for parameter in parameters]
        self.defaults = [parameter.default for parameter in parameters]
        self.positional_only = sum(
            parameter.kind is inspect.Parameter.POSITIONAL_ONLY for parameter in parameters
        )
        #: The number of positional arguments of a complete call without keywords.
        self.fast_length = len(parameters)
        #: One parameter in the key: the key is that argument itself.
        self.single = self.simple and len(parameters) - self.offset == 1

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        if self.simple:
            if not kwargs and len(args) == self.fast_length:
                values = args
            else:
                values = self._bind_simple(args, kwargs)
            if self.single:
                key: Hashable = values[self.offset]
                return key
            return values[self.offset :] if self.offset else values
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        parts: list[Any] = []
        for index, (name, value) in enumerate(bound.arguments.items()):
            if index < self.offset:
                continue
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                parts.append(tuple(sorted(value.items())))
            else:
                parts.append(value)
        return tuple(parts)

    def _bind_simple(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        names = self.names
        count = len(args)
        if count > len(names):
            self.signature.bind(*args, **kwargs)  # raises the TypeError a call would
        values = list(args)
        used = 0
        for index in range(count, len(names)):
            name = names[index]
            if index >= self.positional_only and name in kwargs:
                values.append(kwargs[name])
                used += 1
            elif self.defaults[index] is not _EMPTY:
                values.append(self.defaults[index])
            else:
                self.signature.bind(*args, **kwargs)  # raises: a required argument is missing
        if used != len(kwargs):
            self.signature.bind(*args, **kwargs)  # raises: unexpected or repeated keyword
        return tuple(values)


# -- wrappers ---------------------------------------------------------------------------------


# Each wrapper makes the key of a complete positional call of a simple signature inline (the
# argument itself, or the tuple of arguments after ``self``): a call of make_key costs about as
# much as the rest of a hit. ``length`` is -1 when there is no such shortcut. Then it reads a
# plain live entry inline, as Cache.get does (the expiry, the value, the same expiry again; see
# _cache._core), and leaves everything else to Cache.get: a miss, an expired entry, one being
# written, one of a ttl_after_access cache (whose fast-path expiry is always in the past).


def _async_wrapper(
    function: Callable[..., Awaitable[V]],
    cache: Cache[Any, V],
    make_key: _MakeKey,
    options: _LoadOptions[V],
    refresh_after: float | None,
) -> Callable[..., Coroutine[Any, Any, V]]:
    get = cache.get
    lookup = cache._data.get
    clock = cache._clock
    load_one = _loading.load_one
    partial = functools.partial
    missing = _MISSING
    length, offset, single = _fast_path(make_key)

    if refresh_after is None:

        async def wrapper(*args: Any, **kwargs: Any) -> V:
            if not kwargs and len(args) == length:
                key = args[offset] if single else args[offset:]
            else:
                key = make_key(args, kwargs)
            entry = lookup(key)
            if entry is not None:
                expires = entry.expires
                value = entry.value
                if clock() < expires and entry.expires is expires:
                    entry.visited = True
                    cache._hits += 1
                    return value
            found = get(key, missing)
            if found is not missing:
                return found
            return await load_one(cache, key, partial(function, *args, **kwargs), options)

        return wrapper

    get_refreshing = _refresh.get_refreshing
    seconds = refresh_after

    async def refreshing_wrapper(*args: Any, **kwargs: Any) -> V:
        if not kwargs and len(args) == length:
            key = args[offset] if single else args[offset:]
        else:
            key = make_key(args, kwargs)
        load = partial(function, *args, **kwargs)
        value = get_refreshing(cache, key, seconds, load, options)
        if value is not missing:
            return value
        return await load_one(cache, key, load, options)

    return refreshing_wrapper


def _sync_wrapper(
    function: Callable[..., V],
    cache: Cache[Any, V],
    make_key: _MakeKey,
    options: _LoadOptions[V],
) -> Callable[..., V]:
    get = cache.get
    lookup = cache._data.get
    clock = cache._clock
    make_one = _loading.make_one
    partial = functools.partial
    missing = _MISSING
    length, offset, single = _fast_path(make_key)

    def wrapper(*args: Any, **kwargs: Any) -> V:
        if not kwargs and len(args) == length:
            key = args[offset] if single else args[offset:]
        else:
            key = make_key(args, kwargs)
        entry = lookup(key)
        if entry is not None:
            expires = entry.expires
            value = entry.value
            if clock() < expires and entry.expires is expires:
                entry.visited = True
                cache._hits += 1
                return value
        found = get(key, missing)
        if found is not missing:
            return found
        return make_one(cache, key, partial(function, *args, **kwargs), options)

    return wrapper


def _fast_path(make_key: _MakeKey) -> tuple[int, int, bool]:
    """``(length, offset, single)``: a call with ``length`` positional arguments and no keywords
    has the key ``args[offset]`` if ``single``, else ``args[offset:]``."""
    binder = getattr(make_key, "__self__", None)
    if isinstance(binder, _Binder) and binder.simple:
        return binder.fast_length, binder.offset, binder.single
    return -1, 0, False


# -- wrappers with the function's own parameters ---------------------------------------------

_TEMPLATE = """
def _dm_make(_dm_cache, _dm_function, _dm_options, _dm_load, _dm_missing, _dm_partial,
             _dm_refresh_after, {default_names}):
    _dm_get = _dm_cache.get
    _dm_lookup = _dm_cache._data.get
    _dm_clock = _dm_cache._clock

    {async_}def {name}({parameters}):
        _dm_key = {key}
{lookup}
        _dm_found = _dm_get(_dm_key, _dm_missing)
        if _dm_found is not _dm_missing:
            return _dm_found
        return {await_}_dm_load(
            _dm_cache, _dm_key, _dm_partial(_dm_function, {arguments}), _dm_options
        )

    return {name}
"""

_PLAIN_LOOKUP = """\
        _dm_entry = _dm_lookup(_dm_key)
        if _dm_entry is not None:
            _dm_expires = _dm_entry.expires
            _dm_value = _dm_entry.value
            if _dm_clock() < _dm_expires and _dm_entry.expires is _dm_expires:
                _dm_entry.visited = True
                _dm_cache._hits += 1
                return _dm_value"""

_REFRESHING_LOOKUP = """\
        _dm_found = _dm_refreshing(
            _dm_cache, _dm_key, _dm_refresh_after,
            _dm_partial(_dm_function, {arguments}), _dm_options,
        )
        if _dm_found is not _dm_missing:
            return _dm_found"""


def _usable(name: str) -> bool:
    """Whether ``name`` can be a name in the generated source, clear of its own names."""
    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_dm_")


def _generated_wrapper(
    function: Callable[..., Any],
    cache: Cache[Any, Any],
    make_key: _MakeKey,
    options: _LoadOptions[Any],
    refresh_after: float | None,
    is_async: bool,
) -> Callable[..., Any] | None:
    """A wrapper whose parameters are the function's own, or ``None`` if it cannot have them.

    For a simple signature with the default key: Python binds the call (keywords, defaults,
    errors) as it would for the function, and the wrapper neither packs ``*args`` and
    ``**kwargs`` nor calls make_key; a hit is about a quarter cheaper. The key it makes is
    ``make_key``'s for the same call.
    """
    binder = getattr(make_key, "__self__", None)
    if not isinstance(binder, _Binder) or not binder.simple:
        return None
    parameters = list(binder.signature.parameters.values())
    names = [parameter.name for parameter in parameters]
    if any(not _usable(name) for name in names):
        return None
    declared: list[str] = []
    defaults: dict[str, object] = {}
    for index, parameter in enumerate(parameters):
        text = parameter.name
        if parameter.default is not _EMPTY:
            default_name = f"_dm_default_{index}"
            defaults[default_name] = parameter.default
            text += f"={default_name}"
        declared.append(text)
        if index + 1 == binder.positional_only:
            declared.append("/")
    key_names = names[binder.offset :]
    key = key_names[0] if binder.single else "(" + "".join(f"{n}, " for n in key_names) + ")"
    arguments = ", ".join(names)
    name = getattr(function, "__name__", "")
    if not (isinstance(name, str) and _usable(name)):
        name = "cached_function"
    if refresh_after is None:
        lookup = _PLAIN_LOOKUP
    else:
        lookup = _REFRESHING_LOOKUP.format(arguments=arguments)
    source = _TEMPLATE.format(
        default_names=", ".join(defaults) or "_dm_unused=None",
        async_="async " if is_async else "",
        await_="await " if is_async else "",
        name=name,
        parameters=", ".join(declared),
        key=key,
        lookup=lookup,
        arguments=arguments,
    )
    namespace: dict[str, Any] = {"_dm_refreshing": _refresh.get_refreshing}
    try:
        code = compile(source, f"<@cached {name}>", "exec")
    except SyntaxError:  # pragma: no cover - names are checked above; never fail a decoration
        return None
    exec(code, namespace)
    load = _loading.load_one if is_async else _loading.make_one
    made: Callable[..., Any] = namespace["_dm_make"](
        cache, function, options, load, _MISSING, functools.partial, refresh_after, **defaults
    )
    return made
