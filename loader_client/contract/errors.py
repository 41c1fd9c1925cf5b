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
"""

from __future__ import annotations

__all__ = [
    "LoaderError",
    "LoaderTimeoutError",
    "ServerStoppedError",
    "AuthenticationError",
    "ProtocolError",
    "ProtocolVersionError",
    "ServerError",
    "BadSampleError",
    "WorkerCrashedError",
    "ConfigError",
    "EndpointError",
]


class LoaderError(Exception):
    """Base class of every error loader-service raises on purpose."""


class LoaderTimeoutError(LoaderError, TimeoutError):
    """The server did not answer within the client's `timeout_s`."""


class ServerStoppedError(LoaderError):
    """The server was stopped on purpose (SIGTERM, SIGINT) and said goodbye: no more batches will come.

    `reason` is the server's own words. Restart the server and resume from your last
    `state_dict()`.
    """

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationError(LoaderError):
    """The server refused the connection: missing, wrong or not allow-listed CURVE keys."""


class ProtocolError(LoaderError):
    """A message did not follow the wire format (bad header, dtype, shape or frame size)."""


class ProtocolVersionError(ProtocolError):
    """Client and server speak incompatible protocol versions."""


class ServerError(LoaderError):
    """The server refused a request or failed while building a batch."""


class BadSampleError(ServerError):
    """A sample could not be read or decoded; the message names the file and the reason."""


class WorkerCrashedError(ServerError):
    """A worker process died and the server could not rebuild the batch it held."""


class ConfigError(LoaderError, ValueError):
    """A setting or the data set index is invalid; the message names the setting, file or line."""


class EndpointError(ConfigError):
    """An endpoint is not ``tcp://HOST:PORT`` or ``ipc://PATH``; the message shows a correct one."""


#: Error kinds carried on the wire, mapped to the exception the client raises.
ERROR_KINDS: dict[str, type[LoaderError]] = {
    "server": ServerError,
    "bad_sample": BadSampleError,
    "worker_crashed": WorkerCrashedError,
    "protocol": ProtocolError,
    "version": ProtocolVersionError,
    "config": ConfigError,
}
