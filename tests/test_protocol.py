"""Wire format: headers, array frames, and refusal of everything malformed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from loader_client import protocol
from loader_client.errors import ProtocolError, ProtocolVersionError


def test_arrays_round_trip_without_copy_and_writable() -> None:
    arrays = {"x": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "y": np.array([5, 6], np.int64)}
    described = protocol.describe_arrays(arrays)
    frames = [bytearray(a.tobytes()) for a in arrays.values()]
    header = protocol.unpack(protocol.pack("batch", arrays=described))
    assert header["v"] == protocol.PROTOCOL_VERSION and header["t"] == "batch"
    out = protocol.build_arrays(header["arrays"], frames)
    np.testing.assert_array_equal(out["x"], arrays["x"])
    np.testing.assert_array_equal(out["y"], arrays["y"])
    assert out["x"].flags.writeable
    out["x"][0, 0, 0] = 99
    assert frames[0][0] == 99  # shares memory with the frame


@pytest.mark.parametrize(
    ("described", "frames", "match"),
    [
        ([["x", "|O", [1]]], [b"12345678"], "dtype '|O' is not allowed"),
        ([["x", "<U4", [1]]], [b"1234" * 4], "is not allowed"),
        ([["x", "|u1", [2, 2]]], [b"123"], "needs 4 bytes, frame has 3"),
        ([["x", "|u1", [2, -2]]], [b""], "not a list of non-negative ints"),
        ([["x", "|u1", [2, True]]], [b"12"], "not a list of non-negative ints"),
        ([["x", "|u1", [4]]], [b"1234", b"extra"], "describes 1 arrays but 2 frames"),
        ([["x", "|u1"]], [b"1"], "is not \\[name, dtype, shape\\]"),
        ([["x", "|u1", [1]], ["x", "|u1", [1]]], [b"1", b"2"], "is not a new string"),
        ("nope", [], "must be a list"),
    ],
)
def test_bad_array_descriptions_are_refused(described: object, frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.build_arrays(described, frames)


def test_message_size_bound() -> None:
    with pytest.raises(ProtocolError, match="exceeds 10 bytes"):
        protocol.build_arrays([["x", "|u1", [16]]], [b"a" * 16], max_bytes=10)


@pytest.mark.parametrize(
    "raw",
    [b"\xc1garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"t": "hello"}), msgpack.packb({"v": 1}),
     msgpack.packb({"v": "1", "t": "x"}), b"", msgpack.packb({"v": 1, "t": "x", "z": msgpack.ExtType(1, b"p")})],
)
def test_garbage_headers_raise_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        protocol.unpack(raw)


def test_oversized_header_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        protocol.unpack(b"\x00" * (protocol.MAX_HEADER_BYTES + 1))


def test_version_mismatch_names_both_versions() -> None:
    header = {"v": protocol.PROTOCOL_VERSION + 1, "t": "hello"}
    with pytest.raises(ProtocolVersionError) as info:
        protocol.check_version(header, peer="the client")
    text = str(info.value)
    assert f"version {protocol.PROTOCOL_VERSION}" in text and f"version {protocol.PROTOCOL_VERSION + 1}" in text


def test_request_fields_are_allow_listed() -> None:
    ok = protocol.validate_fields({"v": 1, "t": "hello", "rank": 1, "seed": None}, protocol.HELLO_FIELDS)
    assert ok == {"rank": 1, "seed": None}
    with pytest.raises(ProtocolError, match="'path' is not allowed"):
        protocol.validate_fields({"v": 1, "t": "hello", "path": "/etc/passwd"}, protocol.HELLO_FIELDS)
    with pytest.raises(ProtocolError, match="'rank' must be int"):
        protocol.validate_fields({"v": 1, "t": "hello", "rank": "0"}, protocol.HELLO_FIELDS)
    with pytest.raises(ProtocolError, match="'n' must be int"):
        protocol.validate_fields({"v": 1, "t": "credit", "n": True}, protocol.CREDIT_FIELDS)
    with pytest.raises(ProtocolError, match="'n' is required"):
        protocol.validate_fields({"v": 1, "t": "credit"}, protocol.CREDIT_FIELDS, required=("n",))


def test_describe_refuses_object_and_non_contiguous_arrays() -> None:
    with pytest.raises(ProtocolError, match="may not travel"):
        protocol.describe_arrays({"x": np.array([object()])})
    with pytest.raises(ProtocolError, match="C-contiguous"):
        protocol.describe_arrays({"x": np.zeros((4, 4), np.uint8)[:, ::2]})
