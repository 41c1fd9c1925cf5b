"""The start-up scan: every file of a data set stat'ed before the first batch, the missing or unreadable named.

Without it a bad file surfaces when a worker reads it, mid-epoch. ``--scan`` (on by default
for data sets of at most `AUTO_SCAN_LIMIT` files, ``--no-scan`` to skip it) stats each file of
a list file or class folders, on threads (network storage answers in parallel), and checks
that this user may read it; it does not decode anything (that is ``loader-server check``).
What it finds goes by the bad-file policy: ``--on-error raise`` exits 2 naming the files,
``--on-error skip`` counts them against ``--max-bad`` (exit 2 beyond it) and logs them, and
they are then replaced as when a worker meets them. Tar shards and Parquet tables are opened
when they are indexed, so there is nothing more to stat; arrays are memory-mapped when opened.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from loader_client.contract.errors import ConfigError

from .interface import Dataset, FileDataset
from .subset import root_of

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["scan_files", "startup_scan"]

log = logging.getLogger("loader_server")
#: Threads that stat files at once (network storage answers many requests in parallel).
_THREADS = 16
_CHUNK = 1024
#: Bad files a message names (each with its reason); the count says how many there are.
_NAMED = 10
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _check(path: str) -> tuple[str, str, str] | None:
    """(path, code, reason) when the file cannot be read as a sample, with DecodeError's codes; else None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path, "not_found", "file not found"
    except PermissionError:
        return path, "permission_denied", "permission denied (a folder on its path)"
    except OSError as exc:
        return path, "read_failed", f"cannot be stat'ed: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return path, "is_directory", "is a directory"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return path, "not_a_file", "not a regular file (a device or socket)"
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return path, "empty", "empty file"
    if not os.access(path, os.R_OK, effective_ids=os.access in os.supports_effective_ids):
        return path, "permission_denied", "permission denied"
    return None


def scan_files(dataset: Dataset) -> list[tuple[str, str, str]] | None:
    """Every bad file of `dataset` as (path, code, reason), in index order; None when it is not a data set of
    files (nothing to scan)."""
    root = root_of(dataset)  # a subset (a view) has paths when its data set has
    if not isinstance(root, FileDataset) or not isinstance(dataset, FileDataset):
        return None
    n = len(dataset)
    if n and _URL.match(dataset.path(0)):  # objects of a store, not files here: their reads say what is wrong
        return None

    def chunk(lo: int) -> list[tuple[str, str, str]]:
        return [bad for i in range(lo, min(lo + _CHUNK, n)) if (bad := _check(dataset.path(i))) is not None]

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="loader-scan") as pool:
        return [bad for found in pool.map(chunk, range(0, n, _CHUNK)) for bad in found]


def _relative_paths_hint(dataset: Dataset, found: list[tuple[str, str, str]]) -> str:
    """When no file of a list file is found: relative paths are read from the list file's folder, not from the
    current one (said, with the current folder's path when the files lie there)."""
    source = root_of(dataset).source
    if not source.startswith("list file ") or len(found) < len(dataset) or any(c != "not_found" for _, c, _ in found):
        return ""
    folder = os.path.dirname(os.path.abspath(source.removeprefix("list file ")))
    first = found[0][0]
    if not first.startswith(folder + os.sep):
        return ""
    relative = first[len(folder) + 1:]
    hint = f" (relative paths in a list file are read from its folder, {folder}"
    if os.path.exists(relative):
        return (f"{hint}, not from the current folder, where {relative} is: write the paths relative to the list "
                "file, or absolute)")
    return hint + ")"


def startup_scan(config: ServerConfig, dataset: Dataset) -> list[tuple[str, str, str]]:
    """Scan when `config.scan` says so (None: up to `AUTO_SCAN_LIMIT` files) and apply the bad-file policy.

    Returns the bad files a server in skip mode tolerates (to count and replace); raises
    ConfigError (exit 2) naming them in raise mode, or in skip mode beyond ``--max-bad``.
    """
    from ..config import AUTO_SCAN_LIMIT

    if config.scan is False or (config.scan is None and len(dataset) > AUTO_SCAN_LIMIT):
        return []
    found = scan_files(dataset)
    if found is None:
        if config.scan:
            log.info("--scan: %s holds no files of its own to stat (its containers were opened when indexed)",
                     dataset.source)
        return []
    if not found:
        return []
    named = "; ".join(f"{path} ({reason})" for path, _, reason in found[:_NAMED])
    more = f"; and {len(found) - _NAMED} more" if len(found) > _NAMED else ""
    what = (f"the start-up scan found {len(found)} of the {len(dataset)} files of {dataset.source} missing or "
            f"unreadable: {named}{more}{_relative_paths_hint(dataset, found)}")
    if config.on_error == "raise":
        raise ConfigError(f"{what}. Fix or remove them (`loader-server check` lists every bad file), serve with "
                          "--on-error skip to replace them, or --no-scan to meet them when a worker reads them")
    limit = config.max_bad_files(len(dataset))
    if len(found) > limit:
        raise ConfigError(f"{what}: {len(found)} exceed --max-bad ({limit}). Fix or remove them, or raise --max-bad")
    log.warning("%s: they will be replaced by other samples of their batches (--on-error skip, --max-bad %d)",
                what, limit)
    return found
