"""What the manager records and hands out, and the checks on what it is given."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from ._subscription import OverflowPolicy

__all__ = [
    "Record",
    "ResourceUsage",
    "UsageStatistics",
    "as_bytes",
    "check_buffer_size",
    "check_overflow",
    "check_resource_type",
    "check_seconds",
    "check_usage",
]

_OVERFLOW_POLICIES: Final = ("drop_oldest", "wait")
Record = tuple[int, float, float, float, float, float]  # UsageStatistics' fields, in order


@attrs.frozen
class ResourceUsage:
    """One usage measurement, as subscribers receive it."""

    resource_type: str
    """What was measured, such as ``"cpu"``, ``"pool:db"`` or ``"disk:/"``."""
    usage_percent: float
    """The usage in percent: finite and not negative; it may exceed 100."""
    timestamp: float
    """When it was tracked, on the event loop's clock (:func:`anyio.current_time`)."""
    wall_time: float
    """When it was tracked, in seconds since the epoch (:func:`time.time`), for export."""
    source: str | None = None
    """Where it was tracked: ``None`` for this process's own usages; for a usage that
    :meth:`ResourceManager.relay` received from another process, that process's name
    (``"host/pid"`` unless it chose another). For a received usage, :attr:`timestamp` is
    when it arrived here, on this event loop's clock, and :attr:`wall_time` is the
    publisher's own."""


@attrs.frozen
class UsageStatistics:
    """What a :class:`ResourceManager` has recorded for one resource type."""

    count: int
    """How many usages were tracked."""
    last: float
    """The latest usage, in percent."""
    min: float
    """The lowest usage, in percent."""
    max: float
    """The highest usage (the peak), in percent."""
    mean: float
    """The mean of all tracked usages, in percent."""
    last_timestamp: float
    """When the latest usage was tracked, on the event loop's clock."""


# ---------------------------------------------------------------------- argument checks


def check_resource_type(value: object, name: str = "resource_type") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


def check_usage(value: object) -> float:
    if type(value) is float:
        number = value
    elif not isinstance(value, bool) and isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:
            raise ValueError(f"usage must be finite, got {value!r}") from None
    else:
        raise TypeError(f"usage must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"usage must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"usage must not be negative, got {value!r}")
    return number + 0.0  # turns -0.0 into 0.0


def check_seconds(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a number of seconds, got {type(value).__name__} {value!r}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        wanted = "finite and not negative" if allow_zero else "finite and positive"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return seconds


def check_buffer_size(value: object, overflow: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"buffer_size must be an int, got {type(value).__name__} {value!r}")
    minimum = 0 if overflow == "wait" else 1
    if value < minimum:
        hint = "" if minimum == 0 else ' (0 is allowed only with overflow="wait")'
        raise ValueError(f"buffer_size must be at least {minimum}{hint}, got {value!r}")
    return value


def check_overflow(value: object) -> OverflowPolicy:
    if not isinstance(value, str):
        raise TypeError(f"overflow must be a str, got {type(value).__name__} {value!r}")
    if value == "drop_oldest":
        return "drop_oldest"
    if value == "wait":
        return "wait"
    raise ValueError(f"overflow must be one of {_OVERFLOW_POLICIES}, got {value!r}")


def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value if type(value) is bytes else bytes(value)
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    hint = " (encode it first)" if isinstance(value, str) else ""
    raise TypeError(
        f"value must be bytes-like (bytes, bytearray or memoryview){hint}, "
        f"got {type(value).__name__}"
    )
