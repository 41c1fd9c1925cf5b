"""CurveZMQ keys for the client side: encryption and authentication of a remote loader server.

Keys are Z85 text (40 characters) or key files written by ``loader-server keygen``
(ZeroMQ certificate files: ``NAME.key`` holds the public key, ``NAME.key_secret`` both).
"""

from __future__ import annotations

import os
from typing import Any

import zmq
import zmq.auth

__all__ = ["apply_curve", "load_key_pair", "load_public_key"]


def load_public_key(value: str | bytes | os.PathLike[str]) -> bytes:
    """A Z85 public key, from the key itself or from a key file."""
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        public, _ = zmq.auth.load_certificate(os.fspath(value))
        return public
    key = value.encode() if isinstance(value, str) else bytes(value)  # type: ignore[arg-type]
    if len(key) != 40:
        raise ValueError(f"a CURVE key is 40 characters of Z85 text or a key file, got {len(key)} bytes")
    return key


def load_key_pair(value: Any) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file or a (public, secret) pair of Z85 keys."""
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        public, secret = zmq.auth.load_certificate(os.fspath(value))
        if not secret:
            raise ValueError(f"{value} holds no secret key: pass the .key_secret file")
        return public, secret
    public, secret = value
    return load_public_key(public), load_public_key(secret)


def apply_curve(sock: zmq.Socket[Any], server_public_key: Any, client_keys: Any) -> None:
    """Make `sock` a CURVE client of the server with that public key (no-op without one)."""
    if not server_public_key:
        if client_keys:
            raise ValueError("client_keys need server_public_key too (the server's .key file)")
        return
    if not client_keys:
        raise ValueError("a CURVE server needs the client's own keys too: client_keys=(public, secret) "
                         "or a .key_secret file; create them with `loader-server keygen DIR --name NAME`")
    public, secret = load_key_pair(client_keys)
    sock.curve_serverkey = load_public_key(server_public_key)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
