"""Argument checks for the cache: a clear TypeError or ValueError that says what was expected.

Also :class:`_LoadOptions`, the per-load rules (ttl, stale-if-error, negative caching) that
``get_or_load``, ``get_or_set``, ``get_or_load_many`` and ``@cached`` share, checked once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Generic, TypeVar, cast

V = TypeVar("V")


def seconds(value: object, name: str) -> float:
    """Validate a positive, finite duration given in seconds or as a timedelta."""
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number of seconds or a datetime.timedelta, "
            f"not {type(value).__name__}"
        )
    else:
        try:
            result = float(value)
        except OverflowError:
            result = math.inf
    if not 0.0 < result < math.inf:  # also rejects NaN
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return result


def optional_seconds(value: object, name: str) -> float | None:
    return None if value is None else seconds(value, name)


def ttl_rule(value: object, name: str = "ttl") -> float | Callable[[Any], object] | None:
    """Validate a ttl that may also be a function of the value: seconds, a callable or None."""
    if value is None:
        return None
    if callable(value) and not isinstance(value, timedelta):
        return value
    return seconds(value, name)


def resolve_ttl(rule: float | Callable[[Any], object], value: object) -> float:
    """The ttl for ``value``: the rule itself, or what the rule's function returns for it."""
    if isinstance(rule, float):
        return rule
    result = rule(value)
    try:
        return seconds(result, "ttl")
    except (TypeError, ValueError) as exc:
        raise type(exc)(
            f"the ttl function returned {result!r} for a value of type {type(value).__name__}: "
            "it must return a positive, finite number of seconds or a timedelta (use cache_if "
            "to leave a value out of the cache)"
        ) from None


def callable_or_none(value: object, name: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, not {type(value).__name__}")


def positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def weight(value: object, key: object) -> int:
    """Validate what a weigher returned for ``key``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"the weigher must return an int, returned {type(value).__name__} {value!r} "
            f"for key {key!r}"
        )
    if value < 0:
        raise ValueError(f"the weigher returned a negative weight, {value}, for key {key!r}")
    return value


class _LoadOptions(Generic[V]):
    """The rules a load applies to its result, validated once.

    ``name`` names the operation in error messages (``get_or_load``, a decorated function).
    ``rich``: the entries it stores must know their ttl and stale window (a
    :class:`~._entry._RichEntry`), for refresh ahead and stale-if-error.
    """

    __slots__ = ("cache_if", "name", "rich", "stale_if_error", "ttl")

    def __init__(
        self,
        name: str,
        ttl: object = None,
        stale_if_error: object = None,
        cache_if: object = None,
        *,
        refresh: bool = False,
    ) -> None:
        self.name = name
        self.ttl = ttl_rule(ttl)
        self.stale_if_error = optional_seconds(stale_if_error, "stale_if_error")
        callable_or_none(cache_if, "cache_if")
        self.cache_if = cast("Callable[[V], object] | None", cache_if)
        self.rich = refresh or self.stale_if_error is not None

    @property
    def assumed_ttl(self) -> float | None:
        """The ttl its entries have, if it does not depend on the value."""
        return self.ttl if isinstance(self.ttl, float) else None

    def named(self, name: str) -> _LoadOptions[V]:
        """The same options, naming another operation in error messages."""
        copy: _LoadOptions[V] = _LoadOptions(name)
        copy.ttl = self.ttl
        copy.stale_if_error = self.stale_if_error
        copy.cache_if = self.cache_if
        copy.rich = self.rich
        return copy


def refresh_after(
    value: object, ttl: float | Callable[[Any], object] | None, default: float
) -> float:
    """Validate ``refresh_after`` against the ttl it must be shorter than (when it is known)."""
    result = seconds(value, "refresh_after")
    limit = default if ttl is None else ttl
    if isinstance(limit, float) and result >= limit:
        raise ValueError(
            f"refresh_after must be shorter than the ttl ({limit} s), got {value!r}: an entry "
            "would expire before it is refreshed"
        )
    return result
