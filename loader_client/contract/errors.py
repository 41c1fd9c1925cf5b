"""The exceptions of loader-service, shared by client and server.

Catch the level you need::

    LoaderError                  base of everything raised on purpose
    ├── LoaderTimeoutError       (also a TimeoutError) the server did not answer in time
    ├── ServerStoppedError       the server was stopped on purpose (SIGTERM, SIGINT) and said goodbye
    ├── AuthenticationError      the server refused the connection (CURVE keys)
    ├── ProtocolError            a message broke the wire format
    │   └── ProtocolVersionError client and server speak different protocol versions
    ├── ServerError              the server refused a request or failed while serving it
    │   ├── BadSampleError       a sample could not be read or decoded (names the file)
    │   └── WorkerCrashedError   a worker process died and the batch could not be rebuilt
    └── ConfigError              a setting or the data set index is invalid (names the setting/file)
        └── EndpointError        an endpoint is not tcp://HOST:PORT or ipc://PATH

An error that knows more than its message carries it as keyword-only fields, set by its
constructor: ``BadSampleError(message, path=..., reason=...)``, ``WorkerCrashedError(message,
exit_code=...)``, ``ServerStoppedError(message, reason=...)``, ``ProtocolVersionError(message,
ours=..., theirs=...)``. A server's ``error`` message names its class by `kind` (each class's
``KIND``); `from_wire` rebuilds the exception with its fields on the client.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERROR_KINDS",
    "AuthenticationError",
    "BadSampleError",
    "ConfigError",
    "EndpointError",
    "LoaderError",
    "LoaderTimeoutError",
    "ProtocolError",
    "ProtocolVersionError",
    "ServerError",
    "ServerStoppedError",
    "WorkerCrashedError",
    "from_wire",
]


class LoaderError(Exception):
    """Base class of every error loader-service raises on purpose."""

    #: The `kind` of a server's ``error`` message that stands for this class ("" if none does).
    KIND: ClassVar[str] = ""
    #: The fields of a server's ``error`` message this class carries (keyword arguments of its constructor).
    WIRE_FIELDS: ClassVar[tuple[str, ...]] = ()


class LoaderTimeoutError(LoaderError, TimeoutError):
    """The server did not answer within the client's `timeout_s`."""


class ServerStoppedError(LoaderError):
    """The server was stopped on purpose (SIGTERM, SIGINT) and said goodbye: no more batches will come.

    `reason` is the server's own words. Restart the server and resume from your last
    `state_dict()`.
    """

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationError(LoaderError):
    """The server refused the connection: missing, wrong or not allow-listed CURVE keys."""


class ProtocolError(LoaderError):
    """A message did not follow the wire format (bad header, dtype, shape or frame size)."""

    KIND = "protocol"


class ProtocolVersionError(ProtocolError):
    """Client and server speak incompatible protocol versions: `ours` and `theirs` (None where unknown)."""

    KIND = "version"

    def __init__(self, message: str, *, ours: int | None = None, theirs: int | None = None) -> None:
        super().__init__(message)
        self.ours = ours
        self.theirs = theirs


class ServerError(LoaderError):
    """The server refused a request or failed while building a batch."""

    KIND = "server"


class BadSampleError(ServerError):
    """A sample could not be read or decoded: `path` names the file, `reason` is a stable code
    (``not_found``, ``truncated``, ``undecodable``, ...; see `loader_server.pipeline.decode`)."""

    KIND = "bad_sample"
    WIRE_FIELDS = ("path", "reason")

    def __init__(self, message: str, *, path: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


class WorkerCrashedError(ServerError):
    """A worker process died and the server could not rebuild the batch it held; `exit_code` is
    the worker's (negative: the signal that killed it), None where unknown."""

    KIND = "worker_crashed"
    WIRE_FIELDS = ("exit_code",)

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(LoaderError, ValueError):
    """A setting or the data set index is invalid; the message names the setting, file or line."""

    KIND = "config"


class EndpointError(ConfigError):
    """An endpoint is not ``tcp://HOST:PORT`` or ``ipc://PATH``; the message shows a correct one."""


#: Error kinds carried on the wire, mapped to the exception the client raises.
ERROR_KINDS: dict[str, type[LoaderError]] = {
    cls.KIND: cls for cls in (ServerError, BadSampleError, WorkerCrashedError, ProtocolError, ProtocolVersionError,
                              ConfigError)
}


def from_wire(kind: str, message: str, fields: dict[str, Any] | None = None) -> LoaderError:
    """The exception a server's error of `kind` stands for, rebuilt with the fields its class carries.

    An unknown kind (a newer server) gives a plain `LoaderError` with the message; `fields`
    (the error message's optional fields) that the class does not carry are left out.
    """
    cls = ERROR_KINDS.get(kind, LoaderError)
    given = fields or {}
    return cls(message, **{name: given.get(name) for name in cls.WIRE_FIELDS})
