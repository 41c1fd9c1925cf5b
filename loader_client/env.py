"""Client settings from the environment, so that a manifest, not the code, names the loader hosts.

    LOADER_ENDPOINTS=tcp://loader-0.loader:5555,tcp://loader-1.loader:5555   # or LOADER_ENDPOINT=...
    LOADER_SERVER_PUBLIC_KEY=/keys/server.key                                # CURVE servers only
    LOADER_CLIENT_KEYS=/keys/trainer1.key_secret

``from_env(rank=..., world_size=...)`` returns the `LoaderClient` they describe (several
endpoints: the merged, fail-over stream of `loader_client.hosts`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .contract.errors import ConfigError

__all__ = ["client_options_from_env", "endpoints_from_env", "from_env"]

ENDPOINTS_VARIABLE = "LOADER_ENDPOINTS"
ENDPOINT_VARIABLE = "LOADER_ENDPOINT"


def endpoints_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The endpoints in ``LOADER_ENDPOINTS`` (comma-separated), else the one in ``LOADER_ENDPOINT``.

    Raises `ConfigError` naming the variable when neither is set, an item is empty, an endpoint
    is not tcp:// or ipc://, or one is listed twice.
    """
    env = os.environ if environ is None else environ
    name = ENDPOINTS_VARIABLE if env.get(ENDPOINTS_VARIABLE, "").strip() else ENDPOINT_VARIABLE
    text = env.get(name, "").strip()
    if not text:
        raise ConfigError(f"set {ENDPOINTS_VARIABLE} to the loader servers' endpoints, comma-separated "
                          "(e.g. tcp://loader-0.loader:5555,tcp://loader-1.loader:5555), or "
                          f"{ENDPOINT_VARIABLE} to one endpoint")
    endpoints = [item.strip() for item in text.split(",")]
    for item in endpoints:
        if not item.startswith(("tcp://", "ipc://")) or len(item) <= len("tcp://"):
            raise ConfigError(f"{name}={text!r}: {item!r} is not an endpoint: each must be tcp://HOST:PORT or "
                              "ipc://PATH, separated by commas")
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"{name}={text!r} lists an endpoint twice: each server once")
    return endpoints


def client_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``endpoint`` (a list when several) and the CURVE keys, as `LoaderClient` keyword arguments."""
    env = os.environ if environ is None else environ
    endpoints = endpoints_from_env(env)
    options: dict[str, Any] = {"endpoint": endpoints if len(endpoints) > 1 else endpoints[0]}
    server_key, client_keys = env.get("LOADER_SERVER_PUBLIC_KEY", ""), env.get("LOADER_CLIENT_KEYS", "")
    if bool(server_key) != bool(client_keys):
        raise ConfigError("LOADER_SERVER_PUBLIC_KEY and LOADER_CLIENT_KEYS go together: a CURVE server needs the "
                          "server's public key file and this trainer's .key_secret file")
    if server_key:
        options.update(server_public_key=server_key, client_keys=client_keys)
    return options


def from_env(**kwargs: Any) -> Any:
    """A `LoaderClient` on the endpoints and keys of the environment; `kwargs` add to or override them."""
    from .client import LoaderClient

    return LoaderClient(**{**client_options_from_env(), **kwargs})
