"""Messages the server produces, checked against their own schema before they leave.

The receiving end checks every field (`loader_client.schema`), so a value out of range would be
refused there, by a worker (which then could not build, and whose death would be charged to
whichever batch it held) or by a trainer (as a protocol error that names the wrong culprit).
Every value is checked here instead, where it is produced: a message that does not fit is
never sent (`OutOfRange`, which the caller turns into that one session's error). Text fields of
an error reply are cut to their limit rather than refused: the error must reach its client.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from loader_client.contract.errors import ProtocolError
from loader_client.contract.messages import Error
from loader_client.contract.schema import Message, decode_fields, encode

from ..redaction import redact

__all__ = ["OutOfRange", "checked", "checked_encode", "error_message"]

M = TypeVar("M", bound=Message)


class OutOfRange(Exception):
    """A message the server built has a field its schema refuses (a server bug, or a limit reached)."""


def checked(message: M) -> M:
    """`message`, after checking every field against its schema (OutOfRange if one does not fit)."""
    try:
        decode_fields(type(message), message.fields(), f"the server's own {message.TYPE!r} message")
    except ProtocolError as exc:
        raise OutOfRange(str(exc)) from None
    return message


def checked_encode(message: Message) -> bytes:
    return encode(checked(message))


def error_message(kind: str, message: str, **extra: Any) -> Error:
    """An `Error` whose text fields are cut to their schema's lengths (no URL's password or presigned signature:
    `redaction.redact`) and whose exit code is in range."""
    limits = {f.name: f.metadata["spec"].max_len for f in dataclasses.fields(Error)}
    values: dict[str, Any] = {"kind": kind[:limits["kind"]], "message": _cut(redact(message), limits["message"])}
    for name, value in extra.items():
        if isinstance(value, str):
            value = _cut(redact(value), limits[name])
        elif name == "exit_code" and isinstance(value, int) and not -256 <= value <= 256:
            value = None
        values[name] = value
    return Error(**values)


def _cut(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return text[:max(0, limit - 20)] + " ... (cut)"
