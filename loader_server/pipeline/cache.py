"""The decoded-sample cache: one fixed-size uint8 record per sample, in a memory-mapped file.

A record holds a sample as the decoder writes it (uint8, height x width x channels, after the
resize, before any augmentation, dtype conversion or normalisation), so that a later epoch
copies it instead of reading and decoding the file. The file lives in a folder on a local disk
(``--cache DIR``, shared by every server and worker on the host that uses that folder) or in
anonymous shared memory (``--cache memory``: a memfd that the server creates before it forks
its workers, so they all map the same pages).

Layout: a 4 KiB header (magic and a JSON description), then one 40-byte state per record
(``seq``, and the four integers of the source's version when it was decoded: for a file its
size, mtime in ns, inode and device; for a member of a tar shard or a Parquet row its offset and
the container's mtime, size and inode; see `version(i)` of each data set), then the records,
page-aligned. The file is named after `cache_key`, a hash of the data set's fingerprint and of
`DecodeOptions`, the only settings the decode step that makes a record reads: a setting that
changes a record's pixels is in the key by construction.

Validity, write then publish (a seqlock per record):

* ``seq`` 0 is empty, odd is being written, even and non-zero is valid;
* a writer takes an fcntl byte-range lock on the record's state (non-blocking: if another
  process holds it, that process is filling the record and this one just serves its own
  decode), sets ``seq`` odd, writes the pixels, then the source's size/mtime/inode, then the
  next even ``seq``; the lock dies with its process;
* a reader trusts a record only when ``seq`` is even and non-zero and the stored version equals
  the source's current ``version(i)``; it copies the pixels and re-reads ``seq``: if it moved,
  the copy may be torn and the sample is decoded instead.

A process killed while writing leaves ``seq`` odd: the record is never served, and the next
writer (the lock is free again) rewrites it. A source changed after it was cached (another
version) is decoded again and its record rewritten. The version is taken before the bytes are
read, so a change during the read tags the record with the old version and it is redone.

The ordering argument assumes stores become visible in program order (x86-64 TSO); the
pixels and the publishing store are separate numpy calls, never reordered by a compiler.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loader_client.contract.errors import ConfigError

from ..options import AugmentOptions, CacheOptions, DecodeOptions, options_of

if TYPE_CHECKING:
    from ..data.datasets import Dataset
    from ..data.reading import Version
    from .decode import Decoder

__all__ = [
    "FORMAT",
    "MEMORY",
    "CacheLayout",
    "SampleCache",
    "cache_key",
    "disk_free",
    "mem_available",
    "open_cache",
    "record_decoder",
    "record_shape",
]

log = logging.getLogger("loader_server")

#: ``--cache memory``: anonymous shared memory instead of a folder.
MEMORY = "memory"
#: Version of the file layout; part of the key, so an old file is never misread.
FORMAT = 2
_MAGIC = b"LDRCACHE"
_HEADER_BYTES = 4096
_PAGE = 4096
_META = np.dtype([("seq", "<u8"), ("version", "<i8", (4,))])
#: Seconds between two scans of the record states for the fill progress.
_FILL_SCAN_S = 2.0


def record_shape(options: DecodeOptions | Any) -> tuple[int, int, int]:
    """(height, width, channels) of a record (see `DecodeOptions.record_shape`)."""
    return options_of(options, DecodeOptions).record_shape


def record_decoder(options: DecodeOptions | Any) -> Decoder:
    """The decoder that makes a record: the server's, or with `cache_size` a centre crop at the record size."""
    from .decode import Decoder

    return Decoder(options_of(options, DecodeOptions).for_record())


def cache_key(options: DecodeOptions | Any, index: Dataset) -> str:
    """Hash of the data set and of `DecodeOptions`: everything the decode step that makes a record reads."""
    import cv2

    from ..options import group_hash

    decode = options_of(options, DecodeOptions)
    return group_hash(decode, extra={"index": index.fingerprint(), "format": FORMAT, "opencv": cv2.__version__,
                                     "samples": len(index)})


@dataclass(frozen=True)
class CacheLayout:
    """Where everything is in a cache file of `records` records of `shape`."""

    records: int
    shape: tuple[int, int, int]

    @property
    def record_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.shape[2]

    @property
    def meta_offset(self) -> int:
        return _HEADER_BYTES

    @property
    def records_offset(self) -> int:
        end = self.meta_offset + self.records * _META.itemsize
        return -(-end // _PAGE) * _PAGE

    @property
    def total_bytes(self) -> int:
        return self.records_offset + self.records * self.record_bytes

    def header(self, key: str) -> bytes:
        text = json.dumps({"format": FORMAT, "key": key, "records": self.records, "shape": list(self.shape),
                           "records_offset": self.records_offset, "total_bytes": self.total_bytes}).encode()
        return (_MAGIC + len(text).to_bytes(4, "little") + text).ljust(_HEADER_BYTES, b"\0")


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (the memory a new allocation can take without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def disk_free(folder: str) -> int:
    """Bytes an unprivileged user may still write in `folder`'s file system."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


class SampleCache:
    """A mapped cache file: `lookup` copies a valid record out, `store` writes and publishes one.

    Forked workers inherit the mapping and the descriptor (fcntl locks are per process, so each
    worker locks for itself). Counters of hits and misses are the server's, fed from results.
    """

    def __init__(self, fd: int, layout: CacheLayout, *, where: str, kind: str, read_only: bool = False) -> None:
        self.fd = fd
        self.layout = layout
        self.where = where  # the file, or "memory"
        self.kind = kind  # "folder" or "memory"
        self.read_only = read_only
        prot = mmap.PROT_READ | (0 if read_only else mmap.PROT_WRITE)
        self._mm = mmap.mmap(fd, layout.total_bytes, mmap.MAP_SHARED, prot)
        n = layout.records
        meta = np.ndarray((n,), dtype=_META, buffer=self._mm, offset=layout.meta_offset)
        self._seq, self._version = meta["seq"], meta["version"]
        self.records = np.ndarray((n, *layout.shape), dtype=np.uint8, buffer=self._mm,
                                  offset=layout.records_offset)
        self.hits = 0
        self.misses = 0
        self._filled = (0, -1e9)  # (count, when)

    # ------------------------------------------------------------------ records
    def valid(self, i: int, version: Version | None) -> bool:
        """Whether record `i` is published and was made from the source of this `version`."""
        if version is None:
            return False
        seq = int(self._seq[i])
        return seq != 0 and not seq & 1 and tuple(self._version[i].tolist()) == version

    def lookup(self, i: int, version: Version | None, out: np.ndarray) -> bool:
        """Copy record `i` into `out` if it is valid for `version`; False (and `out` undefined) if not."""
        if version is None:
            return False
        seq = int(self._seq[i])
        if seq == 0 or seq & 1 or tuple(self._version[i].tolist()) != version:
            return False
        np.copyto(out, self.records[i])  # from the mapping: after its first touch, a plain memory copy
        return int(self._seq[i]) == seq  # moved: a writer overwrote it while we copied

    def store(self, i: int, version: Version | None, img: np.ndarray) -> bool:
        """Write `img` as record `i` for the source of this `version`, then publish it.

        False when the cache is read-only, there is no version, or another process holds the
        record (it is filling it right now).
        """
        if self.read_only or version is None:
            return False
        where = self.layout.meta_offset + i * _META.itemsize
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, where)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # held by another process: it is filling it
                _warn_once(f"cannot lock records of the sample cache {self.where} ({exc.strerror}); samples are "
                           "decoded as without it where their records cannot be written")
            return False
        try:
            seq = int(self._seq[i])
            writing = seq + 1 if seq % 2 == 0 else seq + 2  # odd: readers stop trusting it
            self._seq[i] = writing
            if img.flags.c_contiguous and img.nbytes == self.layout.record_bytes:
                # Through the page cache: a write fault per page of the mapping (file system
                # bookkeeping included) cost about 5 times more than the copy itself.
                offset = self.layout.records_offset + i * self.layout.record_bytes
                try:
                    written = os.pwrite(self.fd, memoryview(img).cast("B"), offset)  # type: ignore[arg-type]
                except OSError as exc:  # an I/O error of the disk: the record stays unpublished
                    _warn_once(f"could not write to the sample cache {self.where} ({exc.strerror}); samples are "
                               "decoded as without it where their records cannot be written")
                    return False
                if written != self.layout.record_bytes:
                    return False  # stays odd: never served, rewritten next time
            else:
                np.copyto(self.records[i], img)
            self._version[i] = version
            self._seq[i] = writing + 1  # publish
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, where)
        return True

    # ------------------------------------------------------------------ reporting
    def filled(self, max_age_s: float = _FILL_SCAN_S) -> int:
        """Published records (rescanned at most every `max_age_s`)."""
        now = time.monotonic()
        if now - self._filled[1] >= max_age_s:
            seq = self._seq
            self._filled = (int(np.count_nonzero((seq != 0) & (seq % 2 == 0))), now)
        return self._filled[0]

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def stats(self) -> dict[str, Any]:
        """The ``cache`` entry of the server's stats."""
        filled = self.filled()
        looked = self.hits + self.misses
        return {"kind": self.kind, "where": self.where, "read_only": self.read_only,
                "bytes": self.layout.total_bytes, "record_shape": list(self.layout.shape),
                "records": self.layout.records, "filled": filled,
                "fill_ratio": filled / self.layout.records if self.layout.records else 1.0,
                "hits": self.hits, "misses": self.misses, "hit_ratio": self.hits / looked if looked else 0.0}

    def close(self) -> None:
        del self._seq, self._version, self.records
        self._mm.close()
        os.close(self.fd)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


# ---------------------------------------------------------------------------- opening
def open_cache(config: Any, index: Dataset, *, serving: bool = True) -> SampleCache:
    """Open (or create) the cache that ``--cache`` names for `index`; ConfigError if it cannot be.

    `config`: a ServerConfig (its CacheOptions and DecodeOptions are what count). Refused with
    the numbers: a cache larger than the folder's free space or than the memory available. A
    folder that cannot be written: an existing complete cache file is used read-only (misses
    are decoded and not stored, with a warning); with no file yet it is an error.
    `serving=False` (``cache build``) skips the check that concerns augmentations.
    """
    where = options_of(config, CacheOptions).cache
    decode = options_of(config, DecodeOptions)
    assert where is not None
    if index.build != "decode":
        raise ConfigError(f"--cache keeps decoded images; {index.source} is an array data set, whose rows are "
                          "copied as stored already: drop --cache")
    if serving and decode.cache_size is not None:
        from .augment import Augmenter, parse_augment

        spec = options_of(config, AugmentOptions).augment
        if not (spec and Augmenter(parse_augment(spec)).source is not None):
            raise ConfigError(f"--cache-size {decode.cache_size} caches images larger than the output for a random "
                              "resized crop, but --augment has no rrc: drop --cache-size (the cache then holds the "
                              "output size)")
    layout = CacheLayout(len(index), decode.record_shape)
    key = cache_key(decode, index)
    if where == MEMORY:
        return _open_memory(layout)
    return _open_folder(where, layout, key)


def _open_memory(layout: CacheLayout) -> SampleCache:
    need, have = layout.total_bytes, mem_available()
    if need > have:
        raise ConfigError(f"--cache memory needs {_gib(need)} ({layout.records} samples of {layout.record_bytes} "
                          f"bytes) but only {_gib(have)} of memory is available (MemAvailable): use --cache DIR on "
                          "a local disk, or lower --size (or --cache-size)")
    fd = os.memfd_create("loader-sample-cache", os.MFD_CLOEXEC)
    try:
        _reserve(fd, need, "memory")
    except BaseException:
        os.close(fd)
        raise
    return SampleCache(fd, layout, where=MEMORY, kind="memory")


def _reserve(fd: int, nbytes: int, where: str) -> None:
    """Allocate every block now, so that a full disk is an error here, never a SIGBUS in a worker."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
            raise ConfigError(f"--cache {where}: could not reserve {_gib(nbytes)} ({exc.strerror}): free space, "
                              "choose another --cache DIR, or lower --size (or --cache-size)") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise ConfigError(f"--cache {where}: could not reserve {_gib(nbytes)}: {exc.strerror}") from None
        os.ftruncate(fd, nbytes)  # a file system without fallocate: sparse, checked against statvfs only


def _open_folder(folder: str, layout: CacheLayout, key: str) -> SampleCache:
    path = os.path.join(folder, f"loader-cache-{key}.bin")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot create the folder ({exc.strerror}); choose a writable "
                          "folder on a local disk, --cache memory, or drop --cache") from None
    existing = _open_existing(path, layout, key)
    if existing is not None:
        return existing
    need, free = layout.total_bytes, _free_or_error(folder)
    if need > free:
        raise ConfigError(f"--cache {folder} needs {_gib(need)} ({layout.records} samples of {layout.record_bytes} "
                          f"bytes) but its disk has {_gib(free)} free: choose another --cache DIR, free space, or "
                          "lower --size (or --cache-size)")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".loader-cache-", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot write there ({exc.strerror}) and it holds no cache for these "
                          "settings yet: choose a writable folder, --cache memory, or drop --cache") from None
    try:
        _reserve(fd, need, folder)
        os.pwrite(fd, layout.header(key), 0)
        os.fchmod(fd, 0o644)
        try:
            os.link(tmp, path)  # atomic: another server creating the same cache wins or loses whole
        except FileExistsError:
            os.close(fd)
            fd = -1
            existing = _open_existing(path, layout, key)
            if existing is None:  # pragma: no cover - removed between link and open
                raise ConfigError(f"--cache {folder}: {path} vanished while opening it; try again") from None
            return existing
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    log.info("created the sample cache %s (%s, %d records of %s)", path, _gib(need), layout.records,
             "x".join(map(str, layout.shape)))
    return SampleCache(fd, layout, where=path, kind="folder")


def _free_or_error(folder: str) -> int:
    try:
        return disk_free(folder)
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot read its free space ({exc.strerror})") from None


def _open_existing(path: str, layout: CacheLayout, key: str) -> SampleCache | None:
    """The cache file at `path` if there is one (read-only when it cannot be written); None if none."""
    read_only = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise ConfigError(f"--cache: cannot open {path}: {exc.strerror}") from None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc2:
            raise ConfigError(f"--cache: cannot open {path}: {exc2.strerror}; make it readable or choose another "
                              "--cache DIR") from None
        read_only = True
    try:
        head = os.pread(fd, _HEADER_BYTES, 0)
        if head != layout.header(key) or os.fstat(fd).st_size < layout.total_bytes:
            raise ConfigError(f"--cache: {path} is not a cache of these settings (damaged, or written by another "
                              "version): delete it and it is rebuilt")
    except BaseException:
        os.close(fd)
        raise
    cache = SampleCache(fd, layout, where=path, kind="folder", read_only=read_only)
    log.info("using the sample cache %s: %d of %d records valid", path, cache.filled(), layout.records)
    if read_only:
        log.warning("the sample cache %s cannot be written (read-only folder or file): valid records are served, "
                    "the others are decoded each time and not stored", path)
    return cache
