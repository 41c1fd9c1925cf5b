"""The cache's folder and file, opened under the trust rules of ``--cache DIR``.

A record is served as the sample it names, so whoever can write the cache file chooses what a
trainer sees, and whoever can read it reads the (decoded) data set. The rules:

* the folder is created 0700 (parents as the umask makes them); an existing one must belong
  to this user (or root) and must not be writable by other users, sticky or not: in a folder
  like /tmp another user could pre-create the file under its computable name;
* the file is opened without following a link (``O_NOFOLLOW``), relative to the folder that
  was checked (no path is looked up twice), and what was opened is checked with ``fstat``: a
  regular file of this user (or root) that no other user may write; a cache that an earlier
  version left readable to all is made 0600;
* a new file is created 0600 under a random name (``O_CREAT | O_EXCL``, so private from its
  first byte, whatever the umask), allocated and given its header, then linked to its name
  atomically: another server creating the same cache at the same moment wins or loses whole.

Anything else is a `ConfigError` naming the folder or file, its owner and mode, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
from collections.abc import Callable

from loader_client.contract.errors import ConfigError

from ..data.file_access import owner_text, trusted_owner

__all__ = ["create_file", "open_file", "open_folder", "owner_text", "size_text"]

_NO_FOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link"))


def size_text(n: int) -> str:
    """A byte count in the unit that reads best: ``0 bytes``, ``512 bytes``, ``41.8 KiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _kind(st: os.stat_result) -> str:
    return next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")


# ---------------------------------------------------------------------------- the folder
def open_folder(folder: str) -> int:
    """A descriptor of `folder` (created 0700 when missing) once it passes the rules; ConfigError if not."""
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)  # mode: the folder itself; umask only narrows it
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot create the folder ({exc.strerror}); choose a writable "
                          "folder on a local disk, --cache memory, or drop --cache") from None
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot open the folder ({exc.strerror}); choose a folder you can "
                          "read and write, --cache memory, or drop --cache") from None
    try:
        st = os.fstat(fd)  # what was opened, not what the path names a moment later
        you = owner_text(os.geteuid())
        hint = ("Use a folder only you can write: a new path (it is created 0700), for example --cache "
                f"{os.path.join(folder, 'loader-cache-' + _user_tag())}")
        if not trusted_owner(st.st_uid):
            raise ConfigError(f"--cache {folder}: the folder belongs to {owner_text(st.st_uid)}, not to {you} "
                              f"(mode {_mode(st)}): its owner could replace the cache file and have any pixels "
                              f"served as your samples. {hint}")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"--cache {folder}: other users may write it (mode {_mode(st)}, owner "
                              f"{owner_text(st.st_uid)}): they could plant or replace the cache file (its name is a "
                              f"hash anyone can compute) and have any pixels served as your samples. {hint}, or "
                              f"`chmod go-w {folder}` if it is yours")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _user_tag() -> str:
    """This user's name (or uid), for a folder name of its own."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# ---------------------------------------------------------------------------- the file
def open_file(folder_fd: int, path: str) -> tuple[int, bool] | None:
    """(descriptor, read-only) of the existing cache file `path` in the checked folder; None if there is none.

    Read-only when it cannot be opened for writing (a read-only folder, file system, or a cache
    of root's that this user may only read). ConfigError for anything the rules refuse.
    """
    name = os.path.basename(path)
    read_only = False
    try:
        fd = os.open(name, os.O_RDWR | os.O_NONBLOCK | _NO_FOLLOW, dir_fd=folder_fd)  # NONBLOCK: a FIFO
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _not_a_file(folder_fd, path, exc) from None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NO_FOLLOW, dir_fd=folder_fd)
        except OSError as exc2:
            if exc2.errno not in (errno.EACCES, errno.EPERM):
                raise _not_a_file(folder_fd, path, exc2) from None
            raise ConfigError(f"--cache: cannot open {path}: {exc2.strerror}; make it readable or choose another "
                              "--cache DIR") from None
        read_only = True
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"--cache: {path} is not a regular file ({_kind(st)}): a cache file is one that this "
                              f"server creates; remove it (rm {path}) and it is created there")
        if not trusted_owner(st.st_uid):
            raise ConfigError(f"--cache: {path} belongs to {owner_text(st.st_uid)}, not to "
                              f"{owner_text(os.geteuid())} (mode {_mode(st)}): another user put it there, and its "
                              f"records would be served as your samples; find out who did, remove it (rm {path}) "
                              "and it is rebuilt")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"--cache: {path} may be written by other users (mode {_mode(st)}): its records cannot "
                              f"be trusted; remove it (rm {path}) and it is rebuilt, private")
        os.set_blocking(fd, True)
        if st.st_mode & 0o077 and not read_only and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # an earlier version made caches readable to all
    except BaseException:
        os.close(fd)
        raise
    return fd, read_only


def _not_a_file(folder_fd: int, path: str, exc: OSError) -> ConfigError:
    """The error for an entry at the cache's name that cannot be opened as a file: what it is."""
    name = os.path.basename(path)
    try:
        st = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except OSError:
        return ConfigError(f"--cache: cannot open {path}: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(OSError):
            target = os.readlink(name, dir_fd=folder_fd)
            return ConfigError(f"--cache: {path} is a symbolic link (to {target}): the cache must be a regular file "
                               "in the folder itself, never followed to another place (another user's file "
                               f"included); remove it (rm {path}) and it is created there")
    return ConfigError(f"--cache: {path} is not a regular file ({_kind(st)}): a cache file is one that this server "
                       f"creates; remove it (rm {path}) and it is created there")


def create_file(folder_fd: int, path: str, prepare: Callable[[int], None], *, replace: bool = False) -> int | None:
    """Create the cache file `path`: 0600 from its first byte, `prepare(fd)` (allocate, header), then linked
    to its name. None when another process linked one there first (open that one instead).

    `replace`: atomically put it in place of the (damaged) file there now.
    """
    folder = os.path.dirname(path)
    tmp = f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NO_FOLLOW, 0o600, dir_fd=folder_fd)
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot write there ({exc.strerror}) and it holds no cache for these "
                          "settings yet: choose a writable folder, --cache memory, or drop --cache") from None
    try:
        prepare(fd)
        name = os.path.basename(path)
        if replace:
            os.replace(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
            return fd
        try:
            os.link(tmp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd, follow_symlinks=False)
        except FileExistsError:
            os.close(fd)
            return None
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder_fd)
    return fd
