"""Typed message schemas: each message is a frozen dataclass whose fields say what they accept.

A message class declares its wire type (``TYPE``) and its fields with `spec`: the types a
value may have, its integer range, its length, and whether it is text a person will read
(printable, no control characters). `decode` builds a message from a received header and
checks every field at the boundary, so a value that passes here also fits everything it later
reaches (a system call, a 64-bit key, a log line). `encode` is the inverse. Both ends of a
socket use the same class, so a field is defined once.

Nested maps are messages too (`spec(nested=...)`), and lists declare the spec of their items
(`spec(items=...)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from .errors import ProtocolError
from .protocol import PROTOCOL_VERSION

__all__ = [
    "INT32_MAX",
    "INT63_MAX",
    "Message",
    "Spec",
    "decode",
    "decode_fields",
    "encode",
    "is_printable",
    "item",
    "spec",
]

INT32_MAX = 2**31 - 1
INT63_MAX = 2**63 - 1
_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Spec:
    """What one field accepts."""

    types: tuple[type, ...]
    lo: int | float | None = None
    hi: int | float | None = None
    max_len: int | None = None  # str, bytes and list lengths
    text: bool = False  # a str shown to people: printable, no control characters
    items: Spec | None = None  # a list's items
    nested: type[Message] | None = None  # a map that is itself a message


def spec(*types: type, default: Any = _MISSING, default_factory: Any = _MISSING, lo: int | float | None = None,
         hi: int | float | None = None,
         max_len: int | None = None, text: bool = False, items: Spec | None = None,
         nested: type[Message] | None = None) -> Any:
    """A dataclass field with its wire spec (and an optional default)."""
    s = Spec(tuple(types), lo, hi, max_len, text, items, nested)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"spec": s})
    if default is _MISSING:
        return dataclasses.field(metadata={"spec": s})
    return dataclasses.field(default=default, metadata={"spec": s})


def item(*types: type, lo: int | float | None = None, hi: int | float | None = None, max_len: int | None = None,
         text: bool = False, nested: type[Message] | None = None) -> Spec:
    """The spec of a list's items."""
    return Spec(tuple(types), lo, hi, max_len, text, None, nested)


def is_printable(text: str) -> bool:
    """No control characters (newlines, NUL, escapes): safe in a log line and in a system call."""
    return text.isprintable()


M = TypeVar("M", bound="Message")


class Message:
    """Base of every message class (each is a frozen dataclass with a ``TYPE``)."""

    TYPE: ClassVar[str] = ""

    def fields(self) -> dict[str, Any]:
        """The wire map of this message (nested messages become maps)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _to_wire(getattr(self, f.name))
        return out


def _to_wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.fields()
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


def encode(message: Message) -> bytes:
    """The msgpack header of `message`, with the protocol version and type."""
    data: bytes = msgpack.packb({"v": PROTOCOL_VERSION, "t": message.TYPE, **message.fields()}, use_bin_type=True)
    return data


_SPECS: dict[type, tuple[tuple[str, Spec, bool], ...]] = {}


def _specs(cls: type[Message]) -> tuple[tuple[str, Spec, bool], ...]:
    cached = _SPECS.get(cls)
    if cached is None:
        cached = tuple(
            (f.name, f.metadata["spec"], f.default is _MISSING and f.default_factory is _MISSING)
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        )
        _SPECS[cls] = cached
    return cached


def decode_fields(cls: type[M], header: Mapping[str, Any], where: str) -> M:
    """Build `cls` from a map, refusing unknown keys, missing required keys and bad values."""
    specs = _specs(cls)
    known = {name for name, _, _ in specs}
    for key in header:
        if key not in known and key not in ("v", "t"):
            raise ProtocolError(f"field {_show(key)} is not allowed in {where}")
    values: dict[str, Any] = {}
    for name, s, required in specs:
        if name not in header:
            if required:
                raise ProtocolError(f"field {name!r} is required in {where}")
            continue
        values[name] = _check(header[name], s, f"{where} field {name!r}")
    return cls(**values)


def decode(header: Mapping[str, Any], table: Mapping[str, type[Message]], where: str) -> Message:
    """The message of `header`'s type in `table` (a dispatch table of the types expected here)."""
    cls = table.get(header["t"])
    if cls is None:
        raise ProtocolError(f"unexpected message type {_show(header['t'])} {where}; expected one of "
                            f"{', '.join(sorted(table))}")
    return decode_fields(cls, header, f"a {cls.TYPE!r} message {where}")


def _check(value: Any, s: Spec, where: str) -> Any:
    if isinstance(value, bool) and bool not in s.types:
        raise ProtocolError(f"{where} must be {_names(s.types)}, got bool")
    if not isinstance(value, s.types):
        if s.nested is not None and isinstance(value, dict) and dict in s.types:
            pass
        elif float in s.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        else:
            raise ProtocolError(f"{where} must be {_names(s.types)}, got {type(value).__name__}")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (s.lo is not None and value < s.lo) or (s.hi is not None and value > s.hi):
            raise ProtocolError(f"{where} must be between {s.lo} and {s.hi}, got {_show(value)}")
    if isinstance(value, (str, bytes, list)) and s.max_len is not None and len(value) > s.max_len:
        raise ProtocolError(f"{where} is longer than {s.max_len}")
    if isinstance(value, str) and s.text and not is_printable(value):
        raise ProtocolError(f"{where} holds control characters: {_show(value)}")
    if isinstance(value, dict) and s.nested is not None:
        return decode_fields(s.nested, value, where)
    if isinstance(value, list) and s.items is not None:
        return [_check(v, s.items, f"{where} item") for v in value]
    return value


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("None" if t is type(None) else "a map" if t is dict else t.__name__ for t in types)


def _show(value: Any, limit: int = 60) -> str:
    """A value for an error message: repr, escaped, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
