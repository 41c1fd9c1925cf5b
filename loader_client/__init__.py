"""loader_client: the light client of loader-service (numpy, pyzmq and msgpack; no OpenCV).

    from loader_client import LoaderClient
    with LoaderClient("tcp://127.0.0.1:5555") as client:
        for x, y in client.epoch():
            ...
"""

from .client import BatchInfo, BatchTuple, LoaderClient, batches, health, server_stats
from .env import client_options_from_env, endpoints_from_env, from_env
from .errors import (
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
from .options import ClientOptions
from .protocol import PROTOCOL_VERSION

__all__ = [
    "LoaderClient",
    "ClientOptions",
    "BatchInfo",
    "BatchTuple",
    "batches",
    "health",
    "server_stats",
    "endpoints_from_env",
    "client_options_from_env",
    "from_env",
    "PROTOCOL_VERSION",
    "LoaderError",
    "LoaderTimeoutError",
    "AuthenticationError",
    "ProtocolError",
    "ProtocolVersionError",
    "ServerError",
    "BadSampleError",
    "WorkerCrashedError",
    "ConfigError",
    "EndpointError",
    "ServerStoppedError",
]
__version__ = "0.1.0"
