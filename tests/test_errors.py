"""The exceptions carry their fields (keyword-only, set by their constructors), and `from_wire`
rebuilds the one a server's error message stands for, with those fields."""

from __future__ import annotations

import pytest

from loader_client.contract import errors, protocol
from loader_client.contract.errors import (
    ERROR_KINDS,
    BadSampleError,
    ConfigError,
    LoaderError,
    ProtocolError,
    ProtocolVersionError,
    ServerError,
    ServerStoppedError,
    WorkerCrashedError,
    from_wire,
)
from loader_client.contract.messages import Error
from loader_client.wire import remote_error


def test_fields_are_keyword_only_and_set_by_the_constructor() -> None:
    bad = BadSampleError("cannot decode a.jpg", path="a.jpg", reason="truncated")
    assert (str(bad), bad.path, bad.reason) == ("cannot decode a.jpg", "a.jpg", "truncated")
    crashed = WorkerCrashedError("worker died", exit_code=-9)
    assert crashed.exit_code == -9 and isinstance(crashed, ServerError)
    assert ServerStoppedError("stopped", reason="SIGTERM").reason == "SIGTERM"
    version = ProtocolVersionError("mismatch", ours=2, theirs=3)
    assert (version.ours, version.theirs) == (2, 3)
    assert (BadSampleError("x").path, WorkerCrashedError("x").exit_code) == (None, None)  # fields default to None
    with pytest.raises(TypeError):
        BadSampleError("x", "a.jpg")  # type: ignore[misc]
    with pytest.raises(TypeError):
        WorkerCrashedError("x", -9)  # type: ignore[misc]


@pytest.mark.parametrize(("kind", "cls", "fields"), [
    ("bad_sample", BadSampleError, {"path": "img/3.jpg", "reason": "undecodable"}),
    ("worker_crashed", WorkerCrashedError, {"exit_code": -11}),
    ("server", ServerError, {}),
    ("protocol", ProtocolError, {}),
    ("version", ProtocolVersionError, {}),
    ("config", ConfigError, {}),
])
def test_from_wire_rebuilds_each_kind_with_its_fields(kind: str, cls: type[LoaderError],
                                                      fields: dict[str, object]) -> None:
    wire = {"path": None, "reason": None, "exit_code": None, "traceback": None, **fields}
    err = from_wire(kind, "what happened", wire)
    assert type(err) is cls and str(err) == "what happened"
    for name, value in fields.items():
        assert getattr(err, name) == value
    assert cls.KIND == kind and ERROR_KINDS[kind] is cls


def test_a_bad_sample_error_names_every_bad_file_of_its_batch_within_a_bound() -> None:
    """The error message carries up to MAX_BAD_NAMED (path, reason) pairs and the count; the schema refuses more."""
    from loader_client.contract.errors import ProtocolError
    from loader_client.contract.messages import MAX_BAD_NAMED, STREAM_MESSAGES, BadFile
    from loader_client.contract.protocol import unpack
    from loader_client.contract.schema import decode, encode

    files = [BadFile(path=f"img/{i}.jpg", reason="truncated" if i % 2 else "not_found") for i in range(3)]
    sent = Error(kind="bad_sample", message="3 bad files", path="img/0.jpg", reason="not_found", bad=files,
                 bad_count=3)
    received = decode(unpack(encode(sent)), STREAM_MESSAGES, "in a test")
    assert isinstance(received, Error)
    err = remote_error(received)
    assert isinstance(err, BadSampleError) and err.path == "img/0.jpg" and err.bad_count == 3
    assert err.bad == [("img/0.jpg", "not_found"), ("img/1.jpg", "truncated"), ("img/2.jpg", "not_found")]
    assert BadSampleError("one", path="a.jpg", reason="empty").bad == [("a.jpg", "empty")]  # an older server
    too_many = Error(kind="bad_sample", message="x", bad=[BadFile(path="a", reason="empty")] * (MAX_BAD_NAMED + 1))
    with pytest.raises(ProtocolError, match="longer than"):
        decode(unpack(encode(too_many)), STREAM_MESSAGES, "in a test")
    odd = unpack(encode(sent))
    odd["bad"] = [{"path": "a.jpg", "reason": "x\n"}]  # a reason is a code: printable text
    with pytest.raises(ProtocolError, match="control characters"):
        decode(odd, STREAM_MESSAGES, "in a test")


def test_an_unknown_kind_is_a_plain_loader_error_and_unknown_fields_are_left_out() -> None:
    err = from_wire("from_a_newer_server", "something new", {"path": "a.jpg"})
    assert type(err) is LoaderError and str(err) == "something new" and not hasattr(err, "path")
    assert type(from_wire("server", "no fields")) is ServerError


def test_the_client_rebuilds_a_server_error_message_with_its_traceback() -> None:
    message = Error(kind="worker_crashed", message="epoch 0 batch 3: its worker died", exit_code=-9,
                    traceback="Traceback (most recent call last): ...")
    err = remote_error(message)
    assert isinstance(err, WorkerCrashedError) and err.exit_code == -9
    assert str(err).startswith("epoch 0 batch 3: its worker died\n--- worker traceback ---\nTraceback")
    bad = remote_error(Error(kind="bad_sample", message="cannot decode", path="a.jpg", reason="empty"))
    assert isinstance(bad, BadSampleError) and (bad.path, bad.reason) == ("a.jpg", "empty")


def test_a_version_mismatch_carries_both_versions() -> None:
    with pytest.raises(ProtocolVersionError) as info:
        protocol.check_version({"v": protocol.PROTOCOL_VERSION + 1, "t": "hello"}, peer="the peer")
    assert (info.value.ours, info.value.theirs) == (protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION + 1)
    assert "the peer speaks version" in str(info.value)


def test_the_hierarchy_in_the_docstring_is_the_real_one() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if name[0].isupper() and name != "ERROR_KINDS":
            assert name in doc, name
            cls = getattr(errors, name)
            assert issubclass(cls, LoaderError)


def test_the_documented_public_paths_are_the_contract_itself() -> None:
    import loader_client
    import loader_client.errors
    import loader_client.protocol

    assert loader_client.errors.BadSampleError is BadSampleError is loader_client.BadSampleError
    assert set(loader_client.errors.__all__) <= set(errors.__all__)
    assert loader_client.protocol.build_arrays is protocol.build_arrays
    assert set(loader_client.protocol.__all__) == set(protocol.__all__)
