"""Wire format: headers, array frames, and refusal of everything malformed."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from loader_client.contract import messages, protocol, schema
from loader_client.contract.errors import ProtocolError, ProtocolVersionError


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


def test_messages_decode_and_refuse_what_their_schema_does_not_allow() -> None:
    hello = schema.decode({"v": 2, "t": "hello", "rank": 1, "seed": None}, messages.CLIENT_REQUESTS, "from a test")
    assert hello == messages.Hello(rank=1, seed=None)
    with pytest.raises(ProtocolError, match="'path' is not allowed"):
        schema.decode({"v": 2, "t": "hello", "path": "/etc/passwd"}, messages.CLIENT_REQUESTS, "from a test")
    with pytest.raises(ProtocolError, match="'rank' must be int, got str"):
        schema.decode({"v": 2, "t": "hello", "rank": "0"}, messages.CLIENT_REQUESTS, "from a test")
    with pytest.raises(ProtocolError, match="'n' must be int, got bool"):
        schema.decode({"v": 2, "t": "credit", "n": True}, messages.CLIENT_REQUESTS, "from a test")
    with pytest.raises(ProtocolError, match="'n' is required"):
        schema.decode({"v": 2, "t": "credit"}, messages.CLIENT_REQUESTS, "from a test")
    with pytest.raises(ProtocolError, match="'epoch' must be between 0 and 2147483647"):
        schema.decode({"v": 2, "t": "hello", "epoch": 2**64 - 1}, messages.CLIENT_REQUESTS, "from a test")
    with pytest.raises(ProtocolError, match="holds control characters"):
        schema.decode({"v": 2, "t": "hello", "client": "a\0b"}, messages.CLIENT_REQUESTS, "from a test")
    with pytest.raises(ProtocolError, match="unexpected message type 'batch'"):
        schema.decode({"v": 2, "t": "batch"}, messages.CLIENT_REQUESTS, "from a test")


def test_every_message_round_trips_through_encode_and_decode() -> None:
    for table in _TABLES:
        for cls in table.values():
            message = _EXAMPLES[cls]
            header = protocol.unpack(schema.encode(message))
            assert header["v"] == protocol.PROTOCOL_VERSION and header["t"] == cls.TYPE
            assert schema.decode(header, table, "from a test") == message


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
_TABLES = [messages.CLIENT_REQUESTS, messages.HANDSHAKE_REPLIES, messages.STREAM_MESSAGES,
           messages.HEALTH_REPLIES, messages.STATS_REPLIES]
_ARENA = messages.ArenaHandle(id=1, pid=10, fd=3, inode=99, slots=4, stride=4096)
_EXAMPLES: dict[type[schema.Message], schema.Message] = {
    messages.Hello: messages.Hello(rank=1, world_size=2, epoch=3, batch=4, seed=5, fingerprint="ab", credit=4,
                                   client="trainer", shm=True, augment=False),
    messages.Credit: messages.Credit(n=3),
    messages.Release: messages.Release(slots=[0, 3]),
    messages.Ping: messages.Ping(),
    messages.Bye: messages.Bye(),
    messages.HealthRequest: messages.HealthRequest(),
    messages.StatsRequest: messages.StatsRequest(),
    messages.Welcome: messages.Welcome(
        num_samples=10, num_classes=2, batch_size=2, steps_per_epoch=5, rank=0, world_size=1, seed=1, epoch=0, batch=0,
        mode="epoch", in_order=True, drop_last=True, x_shape=[4, 4, 3], x_dtype="|u1", layout="hwc", color="rgb",
        class_names=["a", "b"], fingerprint="f" * 16, heartbeat_s=0.5, max_message_bytes=1 << 20, shm=_ARENA),
    messages.Batch: messages.Batch(epoch=0, batch=1, steps=5, arrays=[["y", "<i8", [2]]],
                                   shm=messages.ShmRef(slot=1, arrays=[["x", "|u1", [2, 4, 4, 3]]])),
    messages.Heartbeat: messages.Heartbeat(),
    messages.Error: messages.Error(kind="bad_sample", message="bad", path="a.jpg", reason="corrupt", traceback="tb",
                                   exit_code=1),
    messages.Goodbye: messages.Goodbye(reason="SIGTERM"),
    messages.HealthReply: messages.HealthReply(ok=True, workers_ready=1, workers=2, clients=0, batches_sent=9),
    messages.StatsReply: messages.StatsReply(stats={"uptime_s": 1.5}),
}
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
def test_fuzz_random_maps_decode_or_raise_protocol_error(fields: dict[str, object]) -> None:
    for table in _TABLES:
        for t in table:
            raw = msgpack.packb({**fields, "v": protocol.PROTOCOL_VERSION, "t": t}, use_bin_type=True)
            try:
                message = schema.decode(protocol.unpack(raw), table, "from a fuzzer")
            except ProtocolError:
                continue
            _assert_valid(message)


@_fuzz
@given(st.data())
def test_fuzz_every_field_of_every_message(data: st.DataObject) -> None:
    """Replace, drop or add one field of a valid message: it decodes to a valid message or raises ProtocolError."""
    table = data.draw(st.sampled_from(_TABLES))
    cls = data.draw(st.sampled_from(sorted(table.values(), key=lambda c: c.TYPE)))
    fields = _EXAMPLES[cls].fields()
    action = data.draw(st.sampled_from(["replace", "drop", "add", "nested"]))
    if action == "replace" and fields:
        fields[data.draw(st.sampled_from(sorted(fields)))] = data.draw(_values)
    elif action == "drop" and fields:
        del fields[data.draw(st.sampled_from(sorted(fields)))]
    elif action == "nested" and isinstance(fields.get("shm"), dict):
        key = data.draw(st.sampled_from(sorted(fields["shm"])))
        fields["shm"][key] = data.draw(_values)
    else:
        fields[data.draw(st.text(max_size=8))] = data.draw(_values)
    raw = msgpack.packb({**fields, "v": protocol.PROTOCOL_VERSION, "t": cls.TYPE}, use_bin_type=True)
    try:
        message = schema.decode(protocol.unpack(raw), table, "from a fuzzer")
    except ProtocolError:
        return
    assert isinstance(message, cls)
    _assert_valid(message)


def _assert_valid(message: schema.Message) -> None:
    """Every field of a decoded message satisfies its spec (types, ranges, lengths, text)."""
    import dataclasses

    for f in dataclasses.fields(message):  # type: ignore[arg-type]
        _assert_fits(getattr(message, f.name), f.metadata["spec"])


def _assert_fits(value: object, spec: schema.Spec) -> None:
    if isinstance(value, schema.Message):
        assert spec.nested is type(value)
        _assert_valid(value)
        return
    assert isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert (spec.lo is None or value >= spec.lo) and (spec.hi is None or value <= spec.hi)
    if isinstance(value, (str, bytes, list)) and spec.max_len is not None:
        assert len(value) <= spec.max_len
    if isinstance(value, str) and spec.text:
        assert value.isprintable()
    if isinstance(value, list) and spec.items is not None:
        for v in value:
            _assert_fits(v, spec.items)


@_fuzz
@given(_values, st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_build_arrays(described: object, frames: list[bytes]) -> None:
    try:
        arrays = protocol.build_arrays(described, frames, max_bytes=1024)
    except ProtocolError:
        return
    for arr, frame in zip(arrays.values(), frames, strict=True):
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
