"""Errors of the file system while indexing, said so that the reader can fix them.

A permission error names the path, the user id that lacks access and, where it can be found,
the folder that stops it (a container's non-root user meets a 0700 data folder this way).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from loader_client.contract.errors import ConfigError

__all__ = ["check_exists", "os_error", "owner_text", "trusted_owner"]


def trusted_owner(uid: int) -> bool:
    """Whether a file or folder of `uid` may decide what this process serves: this user's, or root's."""
    return uid in (os.geteuid(), 0)


def owner_text(uid: int) -> str:
    """``alice (uid 1000)``, or ``uid 1234`` for a uid without a name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def os_error(exc: OSError, what: str, path: str | os.PathLike[str] | None = None) -> ConfigError:
    """A ConfigError for `exc`, raised while reading `what` (e.g. "list file") at `path`."""
    where = str(exc.filename if exc.filename is not None else path)
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"cannot read {what} {where!r}: permission denied for user id {os.getuid()}"
            f"{_blocker(where)}; make it readable by that user (for example chmod -R a+rX, or a group the user "
            "is in), or run as a user that can read it"
        )
    if isinstance(exc, FileNotFoundError):
        return ConfigError(f"{what} {where!r} does not exist")
    return ConfigError(f"cannot read {what} {where!r}: {exc.strerror or exc} (user id {os.getuid()})")


def check_exists(path: str | os.PathLike[str], what: str, hint: str = "") -> os.stat_result:
    """stat `path`; a missing path or one this user may not reach is a ConfigError saying which."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {str(path)!r} does not exist{hint}") from None
    except OSError as exc:
        raise os_error(exc, what, path) from None


def _blocker(where: str) -> str:
    """`: FOLDER (mode 0700, owner uid 0) does not let this user in`, for the first folder that blocks."""
    path = Path(os.path.abspath(where))
    for p in [*reversed(path.parents), path]:
        is_last = p == path
        try:
            st = os.stat(p)
        except OSError:
            return ""
        need = os.R_OK if is_last and not stat.S_ISDIR(st.st_mode) else os.R_OK | os.X_OK if is_last else os.X_OK
        if not os.access(p, need):
            verb = "cannot be read by this user" if is_last else "does not let this user in"
            return f": {str(p)!r} (mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}) {verb}"
    return ""
