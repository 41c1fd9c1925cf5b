"""The wire framing, shared by server, workers and client.

A message is a list of ZeroMQ frames: a small msgpack header, then one raw frame per array.
The header is a map with at least ``v`` (protocol version) and ``t`` (message type). Arrays
are described in the header as ``[name, dtype, shape]`` and travel as raw bytes, never pickled.
Every header and frame is validated before an array is built: dtype on an allow-list, shape a
list of non-negative ints, and ``prod(shape) * itemsize == len(frame)``.

The messages themselves (their fields, types and ranges) are defined once in
`messages` of this package (client <-> server) and `loader_server.runtime.worker_messages`
(server <-> worker), with the checks of `schema`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from .errors import ProtocolError, ProtocolVersionError

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "build_arrays",
    "check_version",
    "describe_arrays",
    "pack",
    "unpack",
]

#: Bumped on any incompatible change of the messages below.
PROTOCOL_VERSION = 2
#: A header larger than this is refused before it is parsed.
MAX_HEADER_BYTES = 1 << 20
#: Default bound on one whole message (header plus array frames), set as ZMQ_MAXMSGSIZE too.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30

#: Dtypes that may travel. Object, string and void dtypes never do.
ALLOWED_DTYPES = frozenset(
    np.dtype(name).str
    for name in (
        "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32",
        "uint64", "int64", "float16", "float32", "float64",
    )
)

def pack(t: str, **fields: Any) -> bytes:
    """Encode a header of type `t` with the current protocol version."""
    data: bytes = msgpack.packb({"v": PROTOCOL_VERSION, "t": t, **fields}, use_bin_type=True)
    return data


def unpack(frame: bytes | memoryview | Any) -> dict[str, Any]:
    """Decode and sanity-check a header frame; raise ProtocolError on anything malformed.

    Only plain msgpack types are accepted (no ext types), so nothing is ever unpickled.
    """
    data = frame.buffer if hasattr(frame, "buffer") else frame
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(data)} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            data, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    version = header.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError("header has no integer protocol version 'v'")
    if not isinstance(header.get("t"), str):
        raise ProtocolError("header has no string message type 't'")
    return header


def _refuse_ext(code: int, data: bytes) -> None:
    raise ProtocolError(f"msgpack ext type {code} is not allowed on the wire")


def check_version(header: Mapping[str, Any], *, peer: str) -> None:
    """Raise ProtocolVersionError naming both versions if `header` is from another version."""
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"protocol version mismatch: this side speaks version {PROTOCOL_VERSION}, "
            f"{peer} speaks version {header['v']}; install the same loader-service release on both",
            ours=PROTOCOL_VERSION, theirs=header["v"],
        )


def describe_arrays(arrays: Mapping[str, np.ndarray]) -> list[list[Any]]:
    """Header description ``[[name, dtype, shape], ...]`` of C-contiguous arrays about to be sent."""
    out = []
    for name, arr in arrays.items():
        if arr.dtype.str not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {arr.dtype} which may not travel")
        if not arr.flags.c_contiguous:
            raise ProtocolError(f"array {name!r} must be C-contiguous to be sent without a copy")
        out.append([name, arr.dtype.str, list(arr.shape)])
    return out


def build_arrays(
    described: Any, frames: Sequence[Any], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, np.ndarray]:
    """Validate array descriptions against the raw frames and wrap them without copying.

    The arrays share memory with the received frames and are writable.
    """
    if not isinstance(described, list):
        raise ProtocolError("'arrays' must be a list of [name, dtype, shape]")
    if len(described) != len(frames):
        raise ProtocolError(f"header describes {len(described)} arrays but {len(frames)} frames followed")
    out: dict[str, np.ndarray] = {}
    total = 0
    for item, frame in zip(described, frames, strict=True):
        if not (isinstance(item, list) and len(item) == 3):
            raise ProtocolError(f"array description {item!r} is not [name, dtype, shape]")
        name, dtype_str, shape = item
        if not isinstance(name, str) or name in out:
            raise ProtocolError(f"array name {name!r} is not a new string")
        if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r}: dtype {dtype_str!r} is not allowed")
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
        ):
            raise ProtocolError(f"array {name!r}: shape {shape!r} is not a list of non-negative ints")
        dtype = np.dtype(dtype_str)
        expected = math.prod(shape) * dtype.itemsize
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        if expected != buf.nbytes:
            raise ProtocolError(
                f"array {name!r}: shape {shape} of {dtype} needs {expected} bytes, frame has {buf.nbytes}"
            )
        total += expected
        if total > max_bytes:
            raise ProtocolError(f"message exceeds {max_bytes} bytes")
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return out
