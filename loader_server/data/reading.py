"""Reading a sample's bytes from local storage: whole files and byte ranges of container files.

Every byte source of a data set reads through a `LocalStorage`; errors become `DecodeError`
(a bad sample, named and reported like a file that does not decode). An object store (S3,
HTTP range reads) is another storage with the same four methods, chosen by the URL's scheme in
`storage_for`: the data set kinds above it stay the same.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "BadSamples",
    "DecodeError",
    "LocalStorage",
    "Version",
    "file_version",
    "read_file",
    "storage_for",
]

#: What a record of the decoded-sample cache is validated against: four integers whose meaning
#: each byte source states (a file: size, mtime in ns, inode, device).
Version = tuple[int, int, int, int]


class DecodeError(Exception):
    """A sample could not be read or decoded.

    `path` names the sample (a file, ``shard.tar:member`` or ``file.parquet:row``); `reason` is a
    short phrase for logs and reports; `code` a stable label for metrics (not_found,
    permission_denied, is_directory, not_a_file, too_large, read_failed, empty, truncated,
    too_many_pixels, opencv_error, undecodable, changed, all_bad; for objects also unavailable: the
    store did not answer within the retries, which skip mode does not replace).
    """

    def __init__(self, path: str, reason: str, code: str = "undecodable") -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.code = code


class BadSamples(DecodeError):
    """Samples of one batch that could not be read or decoded: `bad` holds the DecodeError of each, in
    batch order; the first also gives this error its `path`, `reason` and `code`. Its message names
    the first `_NAMED_IN_MESSAGE` of them and says how many there are (the list travels apart)."""

    def __init__(self, bad: list[DecodeError], batch_size: int) -> None:
        first = bad[0]
        super().__init__(first.path, first.reason, first.code)
        self.bad = bad
        named = "; ".join(str(e) for e in bad[:_NAMED_IN_MESSAGE])
        more = f"; and {len(bad) - _NAMED_IN_MESSAGE} more" if len(bad) > _NAMED_IN_MESSAGE else ""
        self.args = (f"{len(bad)} of the {batch_size} samples of this batch are bad: {named}{more}",)


#: Bad samples a BadSamples message names (each its path and reason); its `bad` list has them all.
_NAMED_IN_MESSAGE = 5
#: Default bound on the bytes read from one file (``--max-file-bytes``).
DEFAULT_MAX_FILE_BYTES = 256 << 20


def read_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """Read a whole file of at most `max_bytes`, turning OS errors into DecodeError with the reason.

    Devices and sockets are refused, and a regular file larger than `max_bytes` is refused
    before anything is read; other streams (a FIFO) are read up to the bound.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                raise DecodeError(path, "not a regular file (a device or socket)", "not_a_file")
            if stat.S_ISREG(st.st_mode):
                if st.st_size > max_bytes:
                    raise DecodeError(path, f"file of {st.st_size} bytes exceeds --max-file-bytes {max_bytes}",
                                      "too_large")
                data = f.read()  # sized from fstat: read(max_bytes + 1) would allocate the bound per file
            else:  # a stream (FIFO): read up to the bound, a chunk at a time
                chunks, total = [], 0
                while total <= max_bytes and (chunk := f.read(min(1 << 20, max_bytes + 1 - total))):
                    chunks.append(chunk)
                    total += len(chunk)
                data = b"".join(chunks)
    except FileNotFoundError:
        raise DecodeError(path, "file not found", "not_found") from None
    except PermissionError:
        raise DecodeError(path, "permission denied", "permission_denied") from None
    except IsADirectoryError:
        raise DecodeError(path, "is a directory", "is_directory") from None
    except OSError as exc:
        raise DecodeError(path, f"read failed: {exc.strerror or exc}", "read_failed") from None
    if len(data) > max_bytes:
        raise DecodeError(path, f"more than --max-file-bytes {max_bytes} bytes", "too_large")
    return data




def file_version(st: os.stat_result) -> Version:
    """A file's version: size, mtime in ns, inode, device."""
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _os_reason(exc: OSError) -> tuple[str, str]:
    if isinstance(exc, FileNotFoundError):
        return "file not found", "not_found"
    if isinstance(exc, PermissionError):
        return "permission denied", "permission_denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory", "is_directory"
    return f"read failed: {exc.strerror or exc}", "read_failed"


#: Container files a process keeps open for range reads (least recently used closed first).
_OPEN_FILES = 128


class LocalStorage:
    """Files on a local (or mounted) file system.

    Range reads keep their descriptors open per process (opened after a fork, never shared with
    the parent), shared by the read-ahead threads: a descriptor is closed once it is both out of
    the most recently used `_OPEN_FILES` and no longer in use by a read.
    """

    def __init__(self) -> None:
        self._fds: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, reads in flight]
        self._retired: dict[int, int] = {}  # evicted fd -> reads in flight
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def read(self, path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
        """A whole file (see `read_file`)."""
        return read_file(path, max_bytes)

    def version(self, path: str) -> Version | None:
        """The file's version, None if it cannot be stat'ed (the read that follows says why)."""
        try:
            return file_version(os.stat(path))
        except OSError:
            return None

    def stat(self, path: str, name: str) -> os.stat_result:
        """stat, with an error that names the sample `name`."""
        try:
            return os.stat(path)
        except OSError as exc:
            raise DecodeError(name, *_os_reason(exc)) from None

    def read_range(self, path: str, offset: int, size: int, describe: Callable[[int], str], i: int) -> bytes:
        """`size` bytes at `offset` of `path`; a short read (the file shrank) is a truncated sample.

        Errors name the sample ``describe(i)`` (computed only then)."""
        try:
            fd = self._acquire(path)
        except OSError as exc:
            raise DecodeError(describe(i), *_os_reason(exc)) from None
        try:
            data = os.pread(fd, size, offset)
        except OSError as exc:
            raise DecodeError(describe(i), *_os_reason(exc)) from None
        finally:
            self._release(path, fd)
        if len(data) != size:
            raise DecodeError(describe(i), f"truncated: {len(data)} of {size} bytes at offset {offset} of {path}",
                              "truncated")
        return data

    def _acquire(self, path: str) -> int:
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's descriptors share its file offsets; start afresh
                self._fds, self._retired, self._pid = OrderedDict(), {}, os.getpid()
            entry = self._fds.get(path)
            if entry is None:
                entry = [os.open(path, os.O_RDONLY | os.O_CLOEXEC), 0]
                self._fds[path] = entry
                if len(self._fds) > _OPEN_FILES:
                    _, (old, users) = self._fds.popitem(last=False)
                    if users:
                        self._retired[old] = users
                    else:
                        os.close(old)
            else:
                self._fds.move_to_end(path)
            entry[1] += 1
            return entry[0]

    def _release(self, path: str, fd: int) -> None:
        with self._lock:
            entry = self._fds.get(path)
            if entry is not None and entry[0] == fd:
                entry[1] -= 1
            elif fd in self._retired:
                self._retired[fd] -= 1
                if not self._retired[fd]:
                    del self._retired[fd]
                    os.close(fd)

    def close(self) -> None:
        """Close every descriptor this storage holds (also when it is collected)."""
        with self._lock:
            if self._pid == os.getpid():
                for fd in [entry[0] for entry in self._fds.values()] + list(self._retired):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._fds, self._retired = OrderedDict(), {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def forget(self, path: str) -> None:
        """Stop using the descriptor of `path` (it changed: the next read opens the new file)."""
        with self._lock:
            entry = self._fds.pop(path, None)
            if entry is None:
                return
            if entry[1]:
                self._retired[entry[0]] = entry[1]
            else:
                os.close(entry[0])


def storage_for(location: str) -> LocalStorage:
    """The storage that reads `location`: local files (an object store's scheme lands here)."""
    return LocalStorage()
