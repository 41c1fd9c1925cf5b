"""CURVE on the client socket: the server's key pair, and the allow-list of client keys, kept private.

The allow-list decides who gets the data set, so it must be as private as the server's secret
key. DIR and DIR/clients (and every folder above them) must belong to the server's user or
root and be writable by no one else (a sticky folder such as /tmp is fine above them), and
each .key file must be a regular file (not a symbolic link) of those owners that no one else
can write. Otherwise any local user who can write there adds their key and is served. This is
checked at start (a ConfigError naming the folder or file, its owner and mode) and again at
every connection, since the folder is read again then: an allow-list that became unsafe
refuses every connection until it is fixed, and says why in the log (throttled).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import stat
from typing import Any

import zmq
import zmq.utils.z85

from loader_client.contract.errors import ConfigError

from ..logs import Throttle

__all__ = ["read_allow_list", "start_curve"]

log = logging.getLogger("loader_server")

_PUBLIC_KEY = re.compile(rb'^\s*public-key\s*=\s*["\']?([0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40})["\']?\s*$')
#: The largest .key file read (a certificate is a few hundred bytes).
_MAX_KEY_FILE_BYTES = 64 << 10
#: The most .key files an allow-list folder may hold.
_MAX_KEYS = 100_000


def _owners() -> tuple[int, ...]:
    return (os.geteuid(), 0)


def _folder_problem(path: str, *, sticky_ok: bool) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in _owners():
        return f"{path} belongs to uid {st.st_uid}, not to this server's uid {os.geteuid()} or root (mode {mode:04o})"
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return f"{path} (owner uid {st.st_uid}) has mode {mode:04o}: group or others can write it"
    return ""


def _path_problem(folder: str) -> str:
    """Why `folder` or a folder above it lets another user change what is in it ('' when none does)."""
    real = os.path.realpath(folder)
    problem = _folder_problem(real, sticky_ok=False)
    if problem:
        return problem
    parent = os.path.dirname(real)
    while True:
        problem = _folder_problem(parent, sticky_ok=True)  # a sticky parent: others cannot rename ours
        if problem:
            return problem
        if parent == os.path.dirname(parent):
            return ""
        parent = os.path.dirname(parent)


def read_allow_list(clients: str) -> set[bytes]:
    """The z85 public keys of DIR/clients/*.key; ConfigError naming any folder or file another user could change."""
    problem = _path_problem(clients)
    if problem:
        raise ConfigError(f"the CURVE allow-list {clients} is not private: {problem}. Anyone who can write there can "
                          f"add their key and be served: `chown` it to uid {os.geteuid()} and `chmod go-w` it")
    keys: set[bytes] = set()
    try:
        names = sorted(n for n in os.listdir(clients) if n.endswith(".key"))[:_MAX_KEYS]
    except OSError as exc:
        raise ConfigError(f"cannot list the CURVE allow-list {clients}: {exc.strerror}") from None
    for name in names:
        path = os.path.join(clients, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open allow-listed key {path} ({exc.strerror}; a symbolic link is refused)") \
                from None
        try:
            st = os.fstat(fd)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"allow-listed key {path} is not a regular file")
            if st.st_uid not in _owners() or st.st_mode & 0o022:
                raise ConfigError(f"allow-listed key {path} belongs to uid {st.st_uid} with mode {mode:04o}: only "
                                  f"uid {os.geteuid()} or root may own it, and no one else may write it")
            data = os.read(fd, _MAX_KEY_FILE_BYTES)
        finally:
            os.close(fd)
        found = [m.group(1) for line in data.splitlines() if (m := _PUBLIC_KEY.match(line))]
        if len(found) != 1:
            raise ConfigError(f"allow-listed key {path} holds no public key (a file written by `loader-server keygen`)")
        keys.add(found[0])
    return keys


def start_curve(ctx: zmq.Context[Any], sock: zmq.Socket[Any], curve_dir: str) -> Any:
    """Make `sock` a CURVE server with DIR/server.key_secret, admitting the keys in DIR/clients.

    The allow-list is read again on every connection attempt, so adding or removing a key file
    takes effect for the next connection without a restart (connections already admitted stay).
    """
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    secret_file = os.path.join(curve_dir, "server.key_secret")
    clients = os.path.join(curve_dir, "clients")
    if not os.path.isdir(curve_dir):  # a typo: a new key pair there would not be the one the trainers hold
        raise ConfigError(f"--curve-dir {curve_dir!r} is not a folder: pass the folder where `loader-server keygen "
                          "DIR` wrote server.key_secret (the trainers hold its server.key), or make a new one "
                          f"with `loader-server keygen {curve_dir}`")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--curve-dir: cannot load {secret_file} ({exc}); create it with "
                          f"`loader-server keygen {curve_dir}`") from None
    if not secret or not os.path.isdir(clients) or not any(f.endswith(".key") for f in os.listdir(clients)):
        raise ConfigError(f"--curve-dir: {clients} must hold the public .key file of every allowed client "
                          f"(`loader-server keygen {clients} --name TRAINER`, then keep the .key_secret "
                          "with the trainer)")
    first = read_allow_list(clients)  # refuses an allow-list another user could change, at start
    throttle = Throttle(log)

    class AllowListAuthenticator(ThreadAuthenticator):
        """Reads the allow-list folder (checked) for each handshake, and logs refusals (throttled)."""

        async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
            key = zmq.utils.z85.encode(client_key)
            try:
                allowed = key in read_allow_list(clients)
            except ConfigError as exc:
                throttle.warning("curve-allow-list", "refused a client with CURVE key %s: %s", key.decode(), exc)
                return False, b"the server's allow-list is not private"
            if not allowed:
                throttle.warning("curve-refused", "refused a client with CURVE key %s: not in the allow-list %s",
                                 key.decode(), clients)
                return False, b"Unknown key"
            return True, b"OK"

    if not inspect.iscoroutinefunction(ThreadAuthenticator._authenticate_curve):  # pragma: no cover - pyzmq < 25
        raise ConfigError("--curve-dir needs pyzmq >= 25")
    auth = AllowListAuthenticator(ctx, log=log)
    auth.start()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    log.info("CURVE on: encrypted, %d allowed client key(s) in %s (re-read on every connection)", len(first), clients)
    return auth
