"""``loader-server keygen``: CurveZMQ key pairs whose secret half is private from its first byte.

The folder is created mode 0700 and the files are written under a umask of 077, so no other
user can read a secret key even while it is being written; the public half is then opened up
to 0644 (it is meant to be copied). An existing secret key is never overwritten.
"""

from __future__ import annotations

import os

import zmq.auth

from loader_client.contract.errors import ConfigError

__all__ = ["create_key_pair"]


def create_key_pair(folder: str, name: str) -> tuple[str, str]:
    """Write FOLDER/NAME.key (public) and FOLDER/NAME.key_secret (private); returns both paths."""
    if not name or os.sep in name or name.startswith(".") or not name.isprintable():
        raise ConfigError(f"--name {name!r} must be a plain file name stem, such as server or trainer1")
    secret_path = os.path.join(folder, f"{name}.key_secret")
    if os.path.exists(secret_path):
        raise ConfigError(f"{secret_path} exists already: keygen never overwrites a secret key; remove it or "
                          "choose another --name")
    old = os.umask(0o077)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        public, secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret
