"""The decoded-sample cache: one fixed-size uint8 record per sample, in one file.

A record holds a sample as the decoder writes it (uint8, height x width x channels, after the
resize, before any augmentation, dtype conversion or normalisation), so that a later epoch
copies it instead of reading and decoding the file. The file lives in a folder on a local disk
(``--cache DIR``, shared by every server and worker on the host that uses that folder, under
the trust rules of cache_files.py: a private folder and file of this user) or in anonymous
shared memory (``--cache memory``: a memfd that the server creates before it forks its
workers, sealed against any change of size).

Layout: a 4 KiB header (magic and a JSON description), then one 40-byte state per record
(``seq``, and the four integers of the source's version when it was decoded: for a file its
size, mtime in ns, inode and device; for a member of a tar shard or a Parquet row its offset and
the container's mtime, size and inode; see `version(i)` of each data set), then the records,
page-aligned, then an 8-byte trailer. The file is named after `cache_key`, a hash of the data
set's fingerprint and location and of `DecodeOptions`, the only settings the decode step that
makes a record reads: a setting that changes a record's pixels is in the key by construction.

Validity, write then publish (a seqlock per record):

* ``seq`` 0 is empty, odd is being written, even and non-zero is valid;
* a writer takes an fcntl byte-range lock on the record's state (non-blocking: if another
  process holds it, that process is filling the record and this one just serves its own
  decode), sets ``seq`` odd, writes the pixels, then the source's version, then the next even
  ``seq``; the lock dies with its process;
* a reader trusts a record only when ``seq`` is even and non-zero and the stored version equals
  the source's current ``version(i)``; it copies the pixels, checks the trailer and re-reads
  ``seq``: if it moved, the copy may be torn and the sample is decoded instead.

A process killed while writing leaves ``seq`` odd: the record is never served, and the next
writer (the lock is free again) rewrites it. A source changed after it was cached (another
version) is decoded again and its record rewritten. The version is taken before the bytes are
read, so a change during the read tags the record with the old version and it is redone.

Every access is a pread or pwrite of the descriptor, never a memory mapping: a file cut short
under a running server (``truncate``, a ``cp`` onto it) gives short reads, where a mapping
would kill the process that touches a page past the end (SIGBUS). A cut removes the trailer,
and nothing writes it again on that file: a process that finds it missing after copying
pixels knows they may be a hole (a later write past the cut grows the file back with zeros),
stops using the cache (every sample is decoded, with one warning), and the next start replaces
the file. Each of these calls is a full barrier, so the order of the stores above is the order
other processes see.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loader_client.contract.errors import ConfigError

from ..data.interface import byte_source
from ..options import AugmentOptions, CacheOptions, DecodeOptions, options_of
from .cache_files import create_file, open_file, open_folder, size_text

if TYPE_CHECKING:
    from ..data.datasets import ByteDataset, Dataset
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
FORMAT = 3
_MAGIC = b"LDRCACHE"
#: The file's last bytes: a file cut short (truncated) no longer ends with them.
_TRAILER = b"LDRCEND\0"
_HEADER_BYTES = 4096
_PAGE = 4096
_META = np.dtype([("seq", "<u8"), ("version", "<u8", (4,))])
_STATE = struct.Struct("<Q4Q")
_SEQ = struct.Struct("<Q")
_VERSION = struct.Struct("<4Q")
_U64 = (1 << 64) - 1
#: Seconds between two scans of the record states for the fill progress.
_FILL_SCAN_S = 2.0


def record_shape(options: DecodeOptions | Any) -> tuple[int, int, int]:
    """(height, width, channels) of a record (see `DecodeOptions.record_shape`)."""
    return options_of(options, DecodeOptions).record_shape


def record_decoder(options: DecodeOptions | Any) -> Decoder:
    """The decoder that makes a record: the server's, or with `cache_size` a centre crop at the record size."""
    from .decode import Decoder

    return Decoder(options_of(options, DecodeOptions).for_record())


def cache_key(options: DecodeOptions | Any, index: ByteDataset) -> str:
    """Hash of the data set (its fingerprint and its location) and of `DecodeOptions`: everything the
    decode step that makes a record reads, from where it reads it, and the versions of the decoders
    (OpenCV; simplejpeg, whose libjpeg-turbo decodes JPEGs; the region decoder of crops,
    `decode.REGION_DECODER`: its version, the libjpeg-turbo headers it was built against and the
    SHA-256 of the libjpeg this process loaded, or None).

    The location (``ByteDataset.location``: the resolved folder, the container files and their file
    systems, an object store's URLs) keeps two copies of a data set with the same names,
    labels, sizes and mtimes in two places from sharing records.
    """
    import cv2
    import simplejpeg

    from ..options import group_hash
    from .decode import REGION_DECODER

    decode = options_of(options, DecodeOptions)
    return group_hash(decode, extra={"index": index.fingerprint(), "location": index.location(), "format": FORMAT,
                                     "opencv": cv2.__version__, "simplejpeg": simplejpeg.__version__,
                                     "region_decoder": REGION_DECODER,
                                     "samples": len(index)})


#: A record's (seq, version stamp) as read from its metadata.
RecordState = tuple[int, tuple[int, ...]]


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
    def trailer_offset(self) -> int:
        return self.records_offset + self.records * self.record_bytes

    @property
    def total_bytes(self) -> int:
        return self.trailer_offset + len(_TRAILER)

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


class SampleCache:
    """A cache file: `lookup` copies a valid record out, `store` writes and publishes one.

    Records are read and written with pread/pwrite, never through a mapping: a file cut short
    under a running server gives short reads (misses), never a SIGBUS. Forked workers inherit
    the descriptor (fcntl locks are per process, so each worker locks for itself). Counters of
    hits and misses are the server's, fed from results.
    """

    def __init__(self, fd: int, layout: CacheLayout, *, where: str, kind: str, read_only: bool = False) -> None:
        self.fd = fd
        self.layout = layout
        self.where = where  # the file, or "memory"
        self.kind = kind  # "folder" or "memory"
        self.read_only = read_only
        #: This process found the file cut short: it never reads or writes it again.
        self.damaged = False
        self.hits = 0
        self.misses = 0
        self._filled = (0, -1e9)  # (count, when)
        self._scratch: np.ndarray | None = None  # a record-size buffer, for targets that are not one

    # ------------------------------------------------------------------ records
    def valid(self, i: int, version: Version | None) -> bool:
        """Whether record `i` is published and was made from the source of this `version`."""
        return self._checked(i, version) is not None and self._intact()

    def check(self, i: int, version: Version | None) -> RecordState | None:
        """Record `i`'s state when it is published for the source of this `version` (else None): one read of
        its metadata, which `lookup` then takes instead of reading it again. It only says whether to read
        the sample ahead: `lookup` still checks the pixels, the trailer and the seqlock."""
        try:
            return self._checked(i, version)
        except OSError:
            return None

    def _checked(self, i: int, version: Version | None) -> RecordState | None:
        """`check`, with the OSError of a failed metadata read raised (`lookup` warns of it)."""
        if version is None or self.damaged:
            return None
        state = self._state(i)
        return state if state is not None and _published(state[0]) and state[1] == _stamp(version) else None

    def lookup(self, i: int, version: Version | None, out: np.ndarray, state: RecordState | None = None) -> bool:
        """Copy record `i` into `out` if it is valid for `version`; False (and `out` undefined) if not.

        `state`: what `check` said of it for the same version (its seq is the seqlock's first read: a
        record rewritten since has another seq by the re-check after the copy)."""
        if version is None or self.damaged:
            return False
        try:
            if state is None:
                state = self._checked(i, version)
                if state is None:
                    return False
            if not self._read_record(i, out):
                self._intact()  # short: cut under us (and then never trusted again)
                return False
            # The trailer after the pixels: present now, so the file was never cut (nothing puts
            # it back on this inode) and the pixels were its own; then the seqlock's re-check.
            return self._intact() and self._seq(i) == state[0]
        except OSError as exc:  # an I/O error of the disk: decoded as without the cache
            _warn_once(f"could not read the sample cache {self.where} ({exc.strerror}); samples are decoded as "
                       "without it where their records cannot be read")
            return False

    def store(self, i: int, version: Version | None, img: np.ndarray) -> bool:
        """Write `img` as record `i` for the source of this `version`, then publish it.

        False when the cache is read-only or cut short, there is no version, or another process
        holds the record (it is filling it right now).
        """
        if self.read_only or version is None or self.damaged:
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
            if not self._intact():  # never write into a cut file: it would grow back with holes
                return False
            state = self._state(i)
            seq = 0 if state is None else state[0]
            writing = seq + 1 if seq % 2 == 0 else seq + 2  # odd: readers stop trusting it
            _write_all(self.fd, _SEQ.pack(writing), where)
            # Through the page cache: a write fault per page of a mapping (file system
            # bookkeeping included) cost about 5 times more than the copy itself.
            pixels = img if img.flags.c_contiguous and img.dtype == np.uint8 else np.ascontiguousarray(img, np.uint8)
            if pixels.nbytes != self.layout.record_bytes:
                raise ValueError(f"a record of {self.layout.shape} cannot hold an image of {img.shape}")
            _write_all(self.fd, _bytes_of(pixels), self.layout.records_offset + i * pixels.nbytes)
            _write_all(self.fd, _VERSION.pack(*_stamp(version)), where + _SEQ.size)
            _write_all(self.fd, _SEQ.pack(writing + 1), where)  # publish
        except OSError as exc:  # an I/O error or a full disk: the record stays unpublished (odd)
            _warn_once(f"could not write to the sample cache {self.where} ({exc.strerror}); samples are "
                       "decoded as without it where their records cannot be written")
            return False
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, where)
        return True

    def record(self, i: int) -> np.ndarray:
        """A copy of record `i`'s pixels as stored, valid or not (for checks and tools)."""
        out = np.zeros(self.layout.shape, np.uint8)
        self._read_record(i, out)
        return out

    def _state(self, i: int) -> tuple[int, tuple[int, ...]] | None:
        """(seq, version stamp) of record `i`; None when the file ends before it."""
        raw = os.pread(self.fd, _STATE.size, self.layout.meta_offset + i * _META.itemsize)
        if len(raw) < _STATE.size:
            return None
        seq, *stamp = _STATE.unpack(raw)
        return seq, tuple(stamp)

    def _seq(self, i: int) -> int | None:
        raw = os.pread(self.fd, _SEQ.size, self.layout.meta_offset + i * _META.itemsize)
        return _SEQ.unpack(raw)[0] if len(raw) == _SEQ.size else None

    def _read_record(self, i: int, out: np.ndarray) -> bool:
        offset = self.layout.records_offset + i * self.layout.record_bytes
        if out.flags.c_contiguous and out.dtype == np.uint8 and out.nbytes == self.layout.record_bytes:
            return _read_all(self.fd, _bytes_of(out), offset)
        if self._scratch is None:
            self._scratch = np.empty(self.layout.shape, np.uint8)
        if not _read_all(self.fd, _bytes_of(self._scratch), offset):
            return False
        np.copyto(out, self._scratch)
        return True

    def _intact(self) -> bool:
        """Whether the file still ends with its trailer; if not, it was cut short: warn once, use it no more."""
        if self.damaged:
            return False
        if os.pread(self.fd, len(_TRAILER), self.layout.trailer_offset) == _TRAILER:
            return True
        self.damaged = True
        try:
            size = f"{os.fstat(self.fd).st_size} bytes"
        except OSError:
            size = "size unknown"
        _warn_once(f"the sample cache {self.where} shrank under the running server (cut to {size} at some point; "
                   f"its layout has {self.layout.total_bytes}): another process truncated it. Its records are no "
                   "longer read or written (every sample is decoded); the next start replaces it")
        return False

    # ------------------------------------------------------------------ reporting
    def filled(self, max_age_s: float = _FILL_SCAN_S) -> int:
        """Published records (rescanned at most every `max_age_s`); 0 once the file was cut short."""
        now = time.monotonic()
        if now - self._filled[1] >= max_age_s:
            self._filled = (self._count_published(), now)
        return self._filled[0]

    def _count_published(self) -> int:
        if not self._intact():
            return 0
        raw = np.zeros(self.layout.records * _META.itemsize, np.uint8)
        if not _read_all(self.fd, _bytes_of(raw), self.layout.meta_offset):
            return 0
        seq = raw.view(_META)["seq"]
        return int(np.count_nonzero((seq != 0) & (seq % 2 == 0)))

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses

    def stats(self) -> dict[str, Any]:
        """The ``cache`` entry of the server's stats."""
        filled = self.filled() if self._intact() else 0
        looked = self.hits + self.misses
        return {"kind": self.kind, "where": self.where, "read_only": self.read_only, "damaged": self.damaged,
                "bytes": self.layout.total_bytes, "record_shape": list(self.layout.shape),
                "records": self.layout.records, "filled": filled,
                "fill_ratio": filled / self.layout.records if self.layout.records else 1.0,
                "hits": self.hits, "misses": self.misses, "hit_ratio": self.hits / looked if looked else 0.0}

    def close(self) -> None:
        os.close(self.fd)


class _SealedMemory(SampleCache):
    """``--cache memory``: a memfd sealed against any change of size, so its pages are read through a
    shared mapping (made before the workers fork): no truncation can ever reach it, and a copy
    out of the mapping costs half a pread of shared memory (0.02 against 0.05 ms per 224x224
    record here). Writes go through pwrite as for a file."""

    def __init__(self, fd: int, layout: CacheLayout, **kw: Any) -> None:
        super().__init__(fd, layout, **kw)
        self._mm = mmap.mmap(fd, layout.total_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        n = layout.records
        meta = np.ndarray((n,), dtype=_META, buffer=self._mm, offset=layout.meta_offset)
        self._seqs, self._versions = meta["seq"], meta["version"]
        self._records = np.ndarray((n, *layout.shape), dtype=np.uint8, buffer=self._mm, offset=layout.records_offset)

    def _state(self, i: int) -> tuple[int, tuple[int, ...]] | None:
        return int(self._seqs[i]), tuple(self._versions[i].tolist())

    def _seq(self, i: int) -> int | None:
        return int(self._seqs[i])

    def _read_record(self, i: int, out: np.ndarray) -> bool:
        np.copyto(out, self._records[i])
        return True

    def _intact(self) -> bool:
        return True  # sealed: its size never changes

    def _count_published(self) -> int:
        seq = self._seqs
        return int(np.count_nonzero((seq != 0) & (seq % 2 == 0)))

    def close(self) -> None:
        del self._seqs, self._versions, self._records
        self._mm.close()
        super().close()


def _published(seq: int) -> bool:
    return seq != 0 and not seq & 1


def _stamp(version: Version) -> tuple[int, ...]:
    """A version as stored: each integer modulo 2**64 (inodes of some file systems use all 64 bits)."""
    return tuple(int(v) & _U64 for v in version)


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, writable where it is."""
    return memoryview(array).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers


def _read_all(fd: int, view: memoryview, offset: int) -> bool:
    """Fill `view` from `offset`; False when the file ends first."""
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            return False
        done += got
    return True


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


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
    key = cache_key(decode, byte_source(index))
    if where == MEMORY:
        return _open_memory(layout)
    return _open_folder(where, layout, key)


def _open_memory(layout: CacheLayout) -> SampleCache:
    need, have = layout.total_bytes, mem_available()
    if need > have:
        raise ConfigError(f"--cache memory needs {size_text(need)} ({layout.records} samples of {layout.record_bytes} "
                          f"bytes) but only {size_text(have)} of memory is available (MemAvailable): use --cache DIR "
                          "on a local disk, or lower --size (or --cache-size)")
    fd = os.memfd_create("loader-sample-cache", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _reserve(fd, need, "memory")
        os.pwrite(fd, _TRAILER, layout.trailer_offset)
        # Its size can never change again, whoever opens it (/proc/PID/fd/N of the same user).
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return _SealedMemory(fd, layout, where=MEMORY, kind="memory")


def _reserve(fd: int, nbytes: int, where: str) -> None:
    """Allocate every block now, so that a full disk is an error here, never a failed store later."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
            raise ConfigError(f"--cache {where}: could not reserve {size_text(nbytes)} ({exc.strerror}): free space, "
                              "choose another --cache DIR, or lower --size (or --cache-size)") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise ConfigError(f"--cache {where}: could not reserve {size_text(nbytes)}: {exc.strerror}") from None
        os.ftruncate(fd, nbytes)  # a file system without fallocate: sparse, checked against statvfs only


def _open_folder(folder: str, layout: CacheLayout, key: str) -> SampleCache:
    """The cache file of `key` in `folder`, under the trust rules of cache_files.py (created if missing)."""
    path = os.path.join(folder, f"loader-cache-{key}.bin")
    folder_fd = open_folder(folder)
    try:
        replace = False
        opened = open_file(folder_fd, path)
        if opened is not None:
            cache = _use_existing(*opened, path, layout, key)
            if cache is not None:
                return cache
            replace = True  # cut short (truncated): replaced by a new one, atomically
        need, free = layout.total_bytes, _free_or_error(folder, folder_fd)
        if need > free:
            raise ConfigError(f"--cache {folder} needs {size_text(need)} ({layout.records} samples of "
                              f"{layout.record_bytes} bytes) but its disk has {size_text(free)} free: choose another "
                              "--cache DIR, free space, or lower --size (or --cache-size)")

        def prepare(fd: int) -> None:
            _reserve(fd, need, folder)
            os.pwrite(fd, layout.header(key), 0)
            os.pwrite(fd, _TRAILER, layout.trailer_offset)

        fd = create_file(folder_fd, path, prepare, replace=replace)
        if fd is None:  # another server created it first: use theirs
            opened = open_file(folder_fd, path)
            cache = None if opened is None else _use_existing(*opened, path, layout, key)
            if cache is None:
                raise ConfigError(f"--cache {folder}: {path} vanished or was cut short while opening it; try again")
            return cache
    finally:
        os.close(folder_fd)
    log.info("created the sample cache %s (%s, %d records of %s)", path, size_text(need), layout.records,
             "x".join(map(str, layout.shape)))
    return SampleCache(fd, layout, where=path, kind="folder")


def _free_or_error(folder: str, folder_fd: int) -> int:
    try:
        st = os.fstatvfs(folder_fd)
    except OSError as exc:
        raise ConfigError(f"--cache {folder}: cannot read its free space ({exc.strerror})") from None
    return st.f_bavail * st.f_frsize


def _use_existing(fd: int, read_only: bool, path: str, layout: CacheLayout, key: str) -> SampleCache | None:
    """The opened cache file `fd` as a SampleCache; None (and `fd` closed) when it was cut short."""
    try:
        size = os.fstat(fd).st_size
        if size < layout.total_bytes or os.pread(fd, len(_TRAILER), layout.trailer_offset) != _TRAILER:
            if read_only:
                raise ConfigError(f"--cache: {path} was cut short ({size_text(size)} of "
                                  f"{size_text(layout.total_bytes)}: truncated) and cannot be replaced here "
                                  "(read-only): delete it, or choose another --cache DIR")
            log.warning("the sample cache %s was cut short (%s of %s: truncated); replacing it with an empty one",
                        path, size_text(size), size_text(layout.total_bytes))
            os.close(fd)
            return None
        if os.pread(fd, _HEADER_BYTES, 0) != layout.header(key):
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
