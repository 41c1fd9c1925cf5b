"""Wire format: headers, array frames, and refusal of everything malformed."""

from __future__ import annotations

import msgpack

from loader_client.messages import CLIENT_REQUESTS, Hello
from loader_client.schema import decode
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
    where = "from client c"
    ok = decode({"v": 2, "t": "hello", "rank": 1, "world_size": 2, "seed": None}, CLIENT_REQUESTS, where)
    assert isinstance(ok, Hello) and ok.rank == 1 and ok.seed is None
    with pytest.raises(ProtocolError, match="'path' is not allowed"):
        decode({"v": 2, "t": "hello", "path": "/etc/passwd"}, CLIENT_REQUESTS, where)
    with pytest.raises(ProtocolError, match="'rank' must be int"):
        decode({"v": 2, "t": "hello", "rank": "0"}, CLIENT_REQUESTS, where)
    with pytest.raises(ProtocolError, match="'n' must be int"):
        decode({"v": 2, "t": "credit", "n": True}, CLIENT_REQUESTS, where)
    with pytest.raises(ProtocolError, match="'n' is required"):
        decode({"v": 2, "t": "credit"}, CLIENT_REQUESTS, where)
    with pytest.raises(ProtocolError, match="control characters"):
        decode({"v": 2, "t": "hello", "client": "a\x00b"}, CLIENT_REQUESTS, where)
    with pytest.raises(ProtocolError, match="'epoch' must be between"):
        decode({"v": 2, "t": "hello", "epoch": 2**64 - 1}, CLIENT_REQUESTS, where)


def test_describe_refuses_object_and_non_contiguous_arrays() -> None:
    with pytest.raises(ProtocolError, match="may not travel"):
        protocol.describe_arrays({"x": np.array([object()])})
    with pytest.raises(ProtocolError, match="C-contiguous"):
        protocol.describe_arrays({"x": np.zeros((4, 4), np.uint8)[:, ::2]})


# ---------------------------------------------------------------------------- fuzzing
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(st.binary(max_size=2048))
def test_fuzz_unpack_random_bytes(data: bytes) -> None:
    try:
        header = protocol.unpack(data)
    except ProtocolError:
        return
    assert isinstance(header, dict) and isinstance(header["v"], int) and isinstance(header["t"], str)


@_fuzz
@given(st.dictionaries(st.text(max_size=12), _values, max_size=8))
def test_fuzz_unpack_and_validate_structured_messages(fields: dict[str, object]) -> None:
    for t in CLIENT_REQUESTS:
        raw = msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": t, **fields}, use_bin_type=True)
        try:
            message = decode(protocol.unpack(raw), CLIENT_REQUESTS, "from a fuzzer")
        except ProtocolError:
            continue
        assert isinstance(message, CLIENT_REQUESTS[t])  # whatever passes is a well-typed message


@_fuzz
@given(_values, st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_build_arrays(described: object, frames: list[bytes]) -> None:
    try:
        arrays = protocol.build_arrays(described, frames, max_bytes=1024)
    except ProtocolError:
        return
    for arr, frame in zip(arrays.values(), frames):
        assert arr.nbytes == len(frame) and arr.dtype.str in protocol.ALLOWED_DTYPES


@_fuzz
@given(st.sampled_from(sorted(protocol.ALLOWED_DTYPES)), st.lists(st.integers(0, 6), max_size=3),
       st.integers(-3, 3))
def test_fuzz_frame_sizes_must_match_exactly(dtype: str, shape: list[int], delta: int) -> None:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    frame = b"\x00" * max(0, size + delta)
    if len(frame) == size:
        assert protocol.build_arrays([["x", dtype, shape]], [frame])["x"].shape == tuple(shape)
    else:
        with pytest.raises(ProtocolError):
            protocol.build_arrays([["x", dtype, shape]], [frame])
