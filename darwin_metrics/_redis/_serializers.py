"""How values become the bytes stored in Valkey/Redis, and back."""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol, TypeVar, final, runtime_checkable

__all__ = ["JSONSerializer", "PickleSerializer", "Serializer"]

V = TypeVar("V")


@runtime_checkable
class Serializer(Protocol[V]):
    """Turns values into bytes for the shared tier and back.

    Any object with these two methods works; it must be safe to call from any task, and
    ``loads(dumps(value))`` must give a value equal to ``value``.
    """

    def dumps(self, value: V) -> bytes:
        """Return the bytes that represent ``value``; raise if it cannot be represented."""
        ...

    def loads(self, data: bytes) -> V:
        """Return the value that ``data`` represents; raise if ``data`` is not valid."""
        ...


@final
class JSONSerializer:
    """Values as compact UTF-8 JSON: ``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``,
    ``None`` (tuples come back as lists). The default: safe with any server.

    NaN and infinities are refused (JSON has no spelling for them), as is any other type.

    Args:
        sort_keys: Write object keys sorted, so that equal dicts give equal bytes.
    """

    __slots__ = ("_encoder",)

    def __init__(self, *, sort_keys: bool = False) -> None:
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":"), sort_keys=sort_keys
        )

    def dumps(self, value: Any) -> bytes:
        return self._encoder.encode(value).encode("utf-8")

    def loads(self, data: bytes) -> Any:
        return json.loads(data)

    def __repr__(self) -> str:
        return "JSONSerializer()"


@final
class PickleSerializer:
    """Any picklable value, with :mod:`pickle`.

    .. warning::
        Unpickling runs code chosen by whoever wrote the bytes. Use it only with a server that
        no untrusted party can write to: anyone who can ``SET`` a key under the tier's prefix
        can then run code in every process that reads it.

    Args:
        protocol: The pickle protocol; the highest this Python supports by default. Processes
            on older Pythons that share the tier need a protocol they can read.
    """

    __slots__ = ("_protocol",)

    def __init__(self, *, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
        if isinstance(protocol, bool) or not isinstance(protocol, int):
            raise TypeError(f"protocol must be an int, not {type(protocol).__name__}")
        if not 0 <= protocol <= pickle.HIGHEST_PROTOCOL:
            raise ValueError(
                f"protocol must be between 0 and {pickle.HIGHEST_PROTOCOL}, got {protocol}"
            )
        self._protocol = protocol

    def dumps(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=self._protocol)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # documented: trusted servers only

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self._protocol})"
