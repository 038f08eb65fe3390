"""Argument checks for the pool: a clear TypeError or ValueError that says what was expected."""

from __future__ import annotations

import enum
import math

__all__ = ["DEFAULT", "Default", "check_hook", "check_seconds", "check_size"]


def check_size(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}")
    return value


def check_seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            f"{name} must be a number of seconds or None, got {type(value).__name__} {value!r}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and non-negative, got {value!r}")
    return float(value)


def check_hook(name: str, value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")


class Default(enum.Enum):
    """The type of :data:`DEFAULT`."""

    DEFAULT = "the pool's default"

    def __repr__(self) -> str:
        return "<the pool's default>"


DEFAULT = Default.DEFAULT
"""A ``timeout`` argument left out: the pool's own ``timeout`` applies."""
