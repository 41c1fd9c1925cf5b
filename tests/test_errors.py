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
