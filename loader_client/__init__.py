"""loader_client: the light client of loader-service (numpy, pyzmq and msgpack; no OpenCV).

    from loader_client import LoaderClient
    with LoaderClient("tcp://127.0.0.1:5555") as client:
        for x, y in client.epoch():
            ...

The public names below are loaded on first use (PEP 562): ``import loader_client.contract.errors``
(as the server does) runs this file without loading pyzmq or any module of the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import BatchInfo, BatchTuple, LoaderClient, batches
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
    from .contract.protocol import PROTOCOL_VERSION
    from .env import client_options_from_env, endpoints_from_env, from_env
    from .options import ClientOptions
    from .queries import health, server_stats

__all__ = [
    "PROTOCOL_VERSION",
    "AuthenticationError",
    "BadSampleError",
    "BatchInfo",
    "BatchTuple",
    "ClientOptions",
    "ConfigError",
    "EndpointError",
    "LoaderClient",
    "LoaderError",
    "LoaderTimeoutError",
    "ProtocolError",
    "ProtocolVersionError",
    "ServerError",
    "ServerStoppedError",
    "WorkerCrashedError",
    "batches",
    "client_options_from_env",
    "endpoints_from_env",
    "from_env",
    "health",
    "server_stats",
]
__version__ = "0.1.0"

#: The module each public name comes from, imported when the name is first asked for.
_HOMES = {
    **dict.fromkeys(("BatchInfo", "BatchTuple", "LoaderClient", "batches"), ".client"),
    **dict.fromkeys(("AuthenticationError", "BadSampleError", "ConfigError", "EndpointError", "LoaderError",
                     "LoaderTimeoutError", "ProtocolError", "ProtocolVersionError", "ServerError",
                     "ServerStoppedError", "WorkerCrashedError"), ".contract.errors"),
    "PROTOCOL_VERSION": ".contract.protocol",
    **dict.fromkeys(("client_options_from_env", "endpoints_from_env", "from_env"), ".env"),
    "ClientOptions": ".options",
    **dict.fromkeys(("health", "server_stats"), ".queries"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
