"""``loader-server keygen``: CurveZMQ key pairs whose secret half is private from its first byte.

The folder is created mode 0700 and must belong to the user running keygen, writable by no
one else: in a folder that another user owns or can write, they could plant a symbolic link
under a key's name and have keygen overwrite (and open up) any file the caller can write.
Each file is created new (O_CREAT | O_EXCL | O_NOFOLLOW, relative to the opened folder):
nothing existing is ever followed, overwritten or re-moded. The secret half is 0600 from its
first byte; the public half is 0644 (it is meant to be copied). The files are in pyzmq's
certificate format (`zmq.auth.load_certificate` reads them).
"""

from __future__ import annotations

import datetime
import os
import stat

import zmq

from loader_client.contract.errors import ConfigError

__all__ = ["create_key_pair", "folder_problem"]

_PUBLIC_BANNER = ("#   ****  Generated on {0} by loader-server keygen  ****\n"
                  "#   ZeroMQ CURVE Public Certificate\n"
                  "#   Exchange securely, or use a secure mechanism to verify the contents\n"
                  "#   of this file after exchange.\n\n")
_SECRET_BANNER = ("#   ****  Generated on {0} by loader-server keygen  ****\n"
                  "#   ZeroMQ CURVE **Secret** Certificate\n"
                  "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n")


def folder_problem(st: os.stat_result, path: str, *, owners: tuple[int, ...]) -> str:
    """Why a folder with this stat is not private enough for keys ('' when it is)."""
    if st.st_uid not in owners:
        return f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & 0o022:
        return (f"{path} (owner uid {st.st_uid}) has mode {stat.S_IMODE(st.st_mode):04o}: group or others can write "
                "it")
    return ""


def create_key_pair(folder: str, name: str) -> tuple[str, str]:
    """Write FOLDER/NAME.key (public) and FOLDER/NAME.key_secret (private); returns both paths."""
    if not name or os.sep in name or name.startswith(".") or not name.isprintable():
        raise ConfigError(f"--name {name!r} must be a plain file name stem, such as server or trainer1")
    secret_path = os.path.join(folder, f"{name}.key_secret")
    public_path = os.path.join(folder, f"{name}.key")
    old = os.umask(0o077)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    finally:
        os.umask(old)
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open the key folder {folder}: {exc.strerror}") from None
    try:
        problem = folder_problem(os.fstat(dir_fd), folder, owners=(os.geteuid(),))
        if problem:
            raise ConfigError(f"keygen writes keys only into a folder of your own that no one else can write: "
                              f"{problem}; another user could plant links there. Use a new folder (keygen creates "
                              "it mode 0700)")
        for path in (secret_path, public_path):
            if os.path.lexists(path):
                raise ConfigError(f"{path} exists already: keygen never overwrites a secret key or its public half; "
                                  "remove it or choose another --name")
        public, secret = zmq.curve_keypair()
        now = datetime.datetime.now()
        _write_new(dir_fd, secret_path, 0o600, _SECRET_BANNER.format(now) + _sections(public, secret))
        _write_new(dir_fd, public_path, 0o644, _PUBLIC_BANNER.format(now) + _sections(public, None))
    finally:
        os.close(dir_fd)
    return public_path, secret_path


def _sections(public: bytes, secret: bytes | None) -> str:
    text = f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    return text + (f'    secret-key = "{secret.decode()}"\n' if secret is not None else "")


def _write_new(dir_fd: int, path: str, mode: int, text: str) -> None:
    """Create `path` (its name, inside the opened folder) new, of `mode`, holding `text`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(os.path.basename(path), flags, 0o600, dir_fd=dir_fd)
    except FileExistsError:
        raise ConfigError(f"{path} exists already: keygen never overwrites a secret key or its public half; "
                          "remove it or choose another --name") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
