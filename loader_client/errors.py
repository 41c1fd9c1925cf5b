"""The exception hierarchy's public module path; the classes live in `loader_client.contract.errors`.

``from loader_client.errors import ConfigError`` keeps working for users; the package's own
code imports `loader_client.contract.errors` (tests/test_imports.py checks that).
"""

from __future__ import annotations

from .contract.errors import (
    AuthenticationError,
    BadSampleError,
    ConfigError,
    EndpointError,
    LoaderError,
    LoaderTimeoutError,
    ProtocolError,
    ProtocolVersionError,
    ServerError,
    ServerStoppedError,
    WorkerCrashedError,
)

__all__ = [
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
]
