"""CurveZMQ keys for the client side: encryption and authentication of a remote loader server.

Keys are Z85 text (40 characters) or key files written by ``loader-server keygen``
(ZeroMQ certificate files: ``NAME.key`` holds the public key, ``NAME.key_secret`` both).
"""

from __future__ import annotations

import os
from typing import Any

import zmq
import zmq.auth

from .contract.errors import ConfigError

__all__ = ["apply_curve", "load_key_pair", "load_public_key"]


def _key_file(value: str | os.PathLike[str], setting: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a key file; ConfigError naming `setting` and the file when it cannot be read."""
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(value))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"`{setting}` {os.fspath(value)!r} is not a key file of `loader-server keygen`: {exc}") \
            from None
    return public, secret


def _looks_like_path(value: object) -> bool:
    return isinstance(value, os.PathLike) or (isinstance(value, str) and (
        os.sep in value or value.endswith((".key", ".key_secret"))))


def load_public_key(value: str | bytes | os.PathLike[str], setting: str = "server_public_key") -> bytes:
    """A Z85 public key, from the key itself or from a key file (`setting` names it in errors)."""
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        return _key_file(value, setting)[0]
    if _looks_like_path(value):
        raise ConfigError(f"`{setting}` {os.fspath(value)!r}: no such file (the server's .key file from "
                          "`loader-server keygen`, or its 40-character Z85 text)")
    if not isinstance(value, (str, bytes)):
        raise ConfigError(f"`{setting}` must be a key file or 40 characters of Z85 text, got {type(value).__name__}")
    key = value.encode() if isinstance(value, str) else bytes(value)
    if len(key) != 40:
        raise ConfigError(f"`{setting}`: a CURVE key is 40 characters of Z85 text or a key file, got {len(key)} "
                          "bytes")
    return key


def load_key_pair(value: Any, setting: str = "client_keys") -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file or a (public, secret) pair of Z85 keys."""
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        public, secret = _key_file(value, setting)
        if not secret:
            raise ConfigError(f"`{setting}` {os.fspath(value)!r} holds no secret key: pass the .key_secret file")
        return public, secret
    if isinstance(value, (str, bytes, os.PathLike)):
        raise ConfigError(f"`{setting}` {os.fspath(value)!r}: no such file (this client's .key_secret file from "
                          "`loader-server keygen DIR --name NAME`, or a (public, secret) pair of Z85 keys)")
    try:
        public, secret = value
    except (TypeError, ValueError):
        raise ConfigError(f"`{setting}` must be a .key_secret file or a (public, secret) pair of Z85 keys, got "
                          f"{type(value).__name__}") from None
    return load_public_key(public, setting), load_public_key(secret, setting)


def apply_curve(sock: zmq.Socket[Any], server_public_key: Any, client_keys: Any) -> None:
    """Make `sock` a CURVE client of the server with that public key (no-op without one)."""
    if not server_public_key:
        if client_keys:
            raise ConfigError("`client_keys` need `server_public_key` too (the server's .key file)")
        return
    if not client_keys:
        raise ConfigError("a CURVE server needs the client's own keys too: client_keys=(public, secret) "
                          "or a .key_secret file; create them with `loader-server keygen DIR --name NAME`")
    public, secret = load_key_pair(client_keys)
    sock.curve_serverkey = load_public_key(server_public_key)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
