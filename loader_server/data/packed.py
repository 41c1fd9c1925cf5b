"""Samples packed inside container files (tar shards, Parquet tables): a byte range per sample.

A kind of container (tar_shards.py, parquet_tables.py) only says how to index one file: for
each sample, where its bytes are (`Segment`). This module does the rest, the same for every
such kind:

* `expand_files`: ``--data`` as brace ranges (``train-{000000..000099}.tar``, ``{a,b}``), globs
  (``train-*.parquet``), a folder, or paths joined by ``::``;
* `load_or_build`: the member index, built once (in parallel with a progress bar for large
  sets) and kept in a file beside the data, or in ``--index-dir``, or in the user's cache
  folder, so that a restart does not rebuild it. It is checked against every file's version
  (size, mtime, inode): a changed file is indexed again, the others are reused;
* `PackedIndex`: the data set the workers read. ``read(i)`` is one ``pread`` of the sample's
  range (or of the compressed bytes that hold it, decompressed, then a slice), ``version(i)``
  what a cached record is checked against: the sample's offset and its file's mtime, size and
  inode.

Compressed Parquet pages. A snappy page (pyarrow's default codec) is read a row at a time: its
index points each row at the piece of the page's snappy tags that holds its bytes (see
parquet_tables._snappy_pieces), a snappy stream by itself of about the row's size, so a row
costs what it holds whatever its page's size and however the rows are shuffled. Pages of the
other codecs (zstd, gzip, brotli, lz4_raw) cannot be entered in the middle: a row costs the
decompression of its whole page, and each process keeps the pages it decompressed in an LRU
of at most ``--page-cache-mb`` (`PackedIndex.page_cache_bytes`), so the rows of a page read
while it is kept cost nothing more. A zstd, gzip or brotli page larger than that bound (a few KB
of them may hold gigabytes) is never held whole: the row is read from the page's stream
(`PageStream`, a MiB at a time), the bytes before it dropped. Under a global shuffle a row finds its page kept with a
probability of about the cache's size over the data set's decompressed size.

Memory: every per-sample field is a numpy array (offsets, lengths, labels) and member names
live in one uint8 blob with offsets, as the file index does: a million members cost tens of
megabytes and no Python object each.
"""

from __future__ import annotations

import bisect
import errno
import functools
import glob
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from loader_client.contract.errors import ConfigError

from ..options import DataOptions
from .file_access import check_exists, os_error, owner_text, trusted_owner
from .reading import DecodeError, LocalStorage, Version, storage_for
from .remote import RemoteStorage, is_remote, redact, storage_of

__all__ = ["INDEX_FORMAT", "STREAMED", "PackedIndex", "PageCache", "PageStream", "Segment", "decompress_page",
           "expand_files", "load_or_build", "looks_like", "one_line", "read_varint"]

log = logging.getLogger("loader_server")

#: Version of the index file layout; part of its name, so an old file is never misread. 2: snappy
#: rows point at a piece of their page's tags (read without the stream's size varint), not at the page.
INDEX_FORMAT = 2
_BRACE = re.compile(r"\{([^{}]*)\}")
#: The most names one ``--data`` part may expand to (brace ranges multiply: a typo such as
#: ``{0..99999999999}`` is an error, not a list that fills memory), and the most braces in it.
_MAX_NAMES = 10_000_000
_MAX_BRACES = 64
#: The largest decompressed page an index may name (Parquet page sizes are i32).
_MAX_PAGE = (1 << 31) - 1
#: Codecs whose pages are read as a stream, a bounded piece at a time (`PageStream`), wherever a whole page
#: is not wanted: their ratio has no useful bound (16 KB of zstd frames decompress to 512 MB, gzip reaches
#: 1032:1), so a page's header may claim, and its data hold, far more than its stored bytes.
STREAMED = frozenset({"gzip", "zstd", "brotli"})
#: The most bytes one stored byte of the other codecs decompresses to, which bounds what a whole page of them
#: costs by the bytes that hold it: a snappy copy of 64 bytes takes 3 (21.3:1 measured on zeros), an lz4
#: match grows by 255 bytes a length byte (254.99:1 measured).
MAX_RATIO = {"snappy": 22, "lz4_raw": 256}
#: The piece a `PageStream` decompresses at a time.
STREAM_CHUNK = 1 << 20


@dataclass
class Segment:
    """One container file's samples, as its kind indexed them (arrays of equal length)."""

    pos: np.ndarray  # int64: where to read in the file
    span: np.ndarray  # int64: how many bytes to read there
    labels: np.ndarray  # int64
    names_blob: np.ndarray | None = None  # uint8: member names (tar); None: samples are named by row (Parquet)
    names_offsets: np.ndarray | None = None  # int64, samples + 1, from 0
    raw: np.ndarray | None = None  # int64: decompressed size of the bytes read, -1 when they are the sample
    inner: np.ndarray | None = None  # int64: the sample's offset in the decompressed bytes
    length: np.ndarray | None = None  # int64: the sample's length there
    codec: str = ""  # how `raw` bytes are compressed (a pyarrow codec name; snappy: tags without the size varint)
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.pos)

    @staticmethod
    def blob(names: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """Names as one uint8 blob and int64 offsets (what `names_blob`, `names_offsets` hold)."""
        lengths = np.fromiter(map(len, names), dtype=np.int64, count=len(names))
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return np.frombuffer(b"".join(names), dtype=np.uint8), offsets


def one_line(exc: BaseException) -> str:
    """What a library's exception says, on one line (pyarrow's messages may span several), or its type."""
    return " ".join(str(exc).split()) or type(exc).__name__


def looks_like(data: str, suffix: str, storage: RemoteStorage | None = None) -> bool:
    """Whether ``--data`` names files ending in `suffix`: a pattern or path with that suffix, or a folder of them
    (a prefix of objects listed with `storage`, the data set's: None, the default ``--remote-*`` settings)."""
    parts = [p for p in data.split("::") if p]
    if not parts:
        return False
    if len(parts) > 1 or _is_pattern(parts[0]):
        return all(_brace_expand(p)[0].rstrip("*?]").endswith(suffix) or p.endswith(suffix) for p in parts)
    if is_remote(parts[0]) and parts[0].endswith("/"):  # a prefix: what it holds
        return any(url.endswith(suffix) for url in _remote_listing(parts[0], storage or storage_of()))
    if os.path.isdir(parts[0]):
        try:
            with os.scandir(parts[0]) as entries:
                return any(e.name.endswith(suffix) and e.is_file() for e in entries)
        except OSError as exc:
            raise os_error(exc, "data folder", parts[0]) from None
    return parts[0].endswith(suffix)


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "{*?[")


_RANGE = re.compile(r"(-?\d{1,18})\.\.(-?\d{1,18})")


def _brace_expand(text: str) -> list[str]:
    """``a{0..2}b`` → a0b a1b a2b (zero-padded as written: {000..099}), ``{x,y}`` → x y; nested braces expand.

    At most `_MAX_NAMES` names: more is a ConfigError, said before any is made."""
    if text.count("{") > _MAX_BRACES:
        raise ConfigError(f"--data {text[:200]!r} has over {_MAX_BRACES} braces")
    if _brace_count(text) > _MAX_NAMES:
        raise ConfigError(f"--data {text[:200]!r} names over {_MAX_NAMES:,} files (its brace ranges multiply); name "
                          "a folder of them, or fewer")
    return _expand_braces(text)


def _brace_items(body: str) -> list[str]:
    rng = _RANGE.fullmatch(body)
    if rng is None:
        return body.split(",")
    lo, hi = rng.group(1), rng.group(2)
    width = len(lo) if lo.startswith("0") or hi.startswith("0") else 0
    step = 1 if int(hi) >= int(lo) else -1
    return [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]


def _brace_count(text: str) -> int:
    """How many names `text` expands to, counted without making them (each brace as its first item
    stands in for the others)."""
    count = 1
    while (m := _BRACE.search(text)) is not None and count <= _MAX_NAMES:
        body = m.group(1)
        rng = _RANGE.fullmatch(body)
        n = abs(int(rng.group(2)) - int(rng.group(1))) + 1 if rng else body.count(",") + 1
        first = rng.group(1) if rng else body.split(",", 1)[0]
        count *= n
        text = text[: m.start()] + first + text[m.end() :]
    return count


def _expand_braces(text: str) -> list[str]:
    m = _BRACE.search(text)
    if m is None:
        return [text]
    head, tail = text[: m.start()], text[m.end() :]
    return [s for item in _brace_items(m.group(1)) for s in _expand_braces(head + item + tail)]


def _remote_listing(prefix: str, storage: RemoteStorage) -> list[str]:
    """The objects under an ``s3://`` prefix (ConfigError when it cannot be listed)."""
    try:
        return list(storage.list(prefix))
    except DecodeError as exc:
        raise ConfigError(str(exc)) from None


def _expand_remote(item: str, suffix: str, what: str, storage: RemoteStorage) -> list[str]:
    """The objects one remote ``--data`` item names: itself, the objects its pattern matches, or a prefix's."""
    import fnmatch

    if any(c in item for c in "*?["):
        head = re.split(r"[*?\[]", item, maxsplit=1)[0]
        found = [u for u in _remote_listing(head.rsplit("/", 1)[0] + "/", storage) if fnmatch.fnmatchcase(u, item)]
        if not found:
            raise ConfigError(f"{what} pattern {item!r} matches no object")
        return sorted(found)
    if item.endswith("/"):
        found = [u for u in _remote_listing(item, storage) if u.endswith(suffix)]
        if not found:
            raise ConfigError(f"prefix {item!r} holds no {suffix} objects")
        return sorted(found)
    return [item]


def _missing_of_range(part: str, items: list[str], what: str) -> str:
    """``: 6 of the 26 tar shards that '...{000000..000025}.tar' names are missing (...)`` when a brace range
    names several files that are not there (a range past the last shard), else nothing."""
    missing = [i for i in items if not any(c in i for c in "*?[") and not os.path.exists(i)]
    if len(items) < 2 or len(missing) < 2:
        return ""
    return (f": {len(missing)} of the {len(items)} {what}s that {part!r} names are missing "
            f"({os.path.basename(missing[0])} .. {os.path.basename(missing[-1])}), {len(items) - len(missing)} "
            "exist: check its range")


def expand_files(data: str, suffix: str, what: str, storage: RemoteStorage | None = None) -> list[str]:
    """The absolute paths (or object URLs, listed with `storage`: None, the default ``--remote-*`` settings) that
    ``--data`` names, in order; ConfigError naming what is missing."""
    storage = storage or storage_of()
    files: list[str] = []
    for part in (p for p in data.split("::") if p):
        items = _brace_expand(part)
        for item in items:
            if is_remote(item):
                files.extend(_expand_remote(item, suffix, what, storage))
            elif any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise ConfigError(f"{what} pattern {item!r} matches no file")
                files.extend(found)
            elif os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(glob.escape(item), "**", f"*{suffix}"), recursive=True))
                if not found:
                    raise ConfigError(f"folder {item!r} holds no {suffix} files")
                files.extend(found)
            else:
                try:
                    check_exists(item, what)
                except ConfigError as exc:
                    raise ConfigError(f"{exc}{_missing_of_range(part, items, what)}") from None
                files.append(item)
    if not files:
        raise ConfigError(f"--data {data!r} names no {what}")
    resolved = [f if is_remote(f) else os.path.abspath(f) for f in files]
    if len({is_remote(f) for f in resolved}) > 1:
        local = next(f for f in resolved if not is_remote(f))
        remote = next(f for f in resolved if is_remote(f))
        raise ConfigError(f"--data {data!r} names both local {what}s ({local}) and objects ({remote}): one data set "
                          "reads from one place; copy the local files to the store, or the objects to local disk")
    seen: set[str] = set()
    twice = [f for f in resolved if f in seen or seen.add(f)]  # type: ignore[func-returns-value]
    if twice:
        raise ConfigError(f"{what} {twice[0]!r} is named twice by --data {data!r}: each sample would be served twice")
    return resolved


# ---------------------------------------------------------------------------- the data set
#: ``--page-cache-mb``'s default, in bytes.
_PAGE_CACHE_BYTES = int(DataOptions.page_cache_mb * (1 << 20))


@dataclass(frozen=True, eq=False)
class PackedIndex:
    """Samples at byte ranges of container files; a data set whose workers decode bytes (`read`)."""

    kind: str  # "tar shards", "Parquet tables"
    files: tuple[str, ...]  # absolute paths
    file_versions: np.ndarray  # int64 (files, 3): mtime ns, size, inode when indexed
    starts: np.ndarray  # int64, files + 1: the first sample of each file
    pos: np.ndarray
    span: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] | None
    source: str
    names_blob: np.ndarray | None = None  # uint8: member names, concatenated
    names_offsets: np.ndarray | None = None  # int64, samples + 1
    raw: np.ndarray | None = None
    inner: np.ndarray | None = None
    length: np.ndarray | None = None
    codecs: tuple[str, ...] = ()  # per file, when `raw` is set
    storage: LocalStorage | RemoteStorage = field(default_factory=LocalStorage, repr=False)
    #: Bytes of decompressed pages this process keeps (pages of codecs other than snappy; 0: none).
    page_cache_bytes: int = _PAGE_CACHE_BYTES
    _pages: PageCache = field(init=False, repr=False)  # made in __post_init__, never copied by replace()
    #: Workers read and decode each sample's bytes (see datasets.Dataset).
    build: ClassVar[Literal["decode", "gather"]] = "decode"

    def __len__(self) -> int:
        return len(self.labels)

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [int(s) for s in self.starts]  # bisect on a list: 0.1 us a sample, np.searchsorted on a scalar 1.7 us

    def _file(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i) - 1

    def describe(self, i: int) -> str:
        """``shard.tar:member`` or ``file.parquet:row``."""
        f = self._file(i)
        if self.names_blob is not None and self.names_offsets is not None:
            name = self.names_blob[self.names_offsets[i] : self.names_offsets[i + 1]].tobytes()
            return f"{self._shown(f)}:{name.decode('utf-8', 'replace')}"
        return f"{self._shown(f)}:{i - int(self.starts[f])}"

    def _shown(self, f: int) -> str:
        """File `f` as messages name it (an object's URL without its userinfo or presigned signature)."""
        return redact(self.files[f]) if isinstance(self.storage, RemoteStorage) else self.files[f]

    def version(self, i: int) -> Version | None:
        """The sample's offset and its file's mtime, size and inode now (None if it cannot be stat'ed); of an
        object, its ETag's hash and size as the store last said (None once it changed since indexing)."""
        if isinstance(self.storage, RemoteStorage):
            now = self.storage.version(self.files[self._file(i)])
            return None if now is None else (int(self.pos[i]), now[0], now[1], 0)
        try:
            st = os.stat(self.files[self._file(i)])
        except OSError:
            return None
        return int(self.pos[i]), st.st_mtime_ns, st.st_size, st.st_ino

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pages", PageCache(self.page_cache_bytes))

    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        """The sample's bytes: one range read (and, for a compressed page, a decompression and a slice)."""
        f = self._file(i)
        path = self.files[f]
        if isinstance(self.storage, RemoteStorage):  # each range read carries If-Match: the indexed ETag
            return self._read(i, f, max_bytes, tuple(self.file_versions[f].tolist()))
        try:
            st = os.stat(path)
        except OSError:
            st = self.storage.stat(path, self.describe(i))  # raises, naming the sample
        mtime, size, ino = self.file_versions[f].tolist()
        if (st.st_mtime_ns, st.st_size, st.st_ino) != (mtime, size, ino):
            self.storage.forget(path)
            raise DecodeError(self.describe(i), f"{path} changed since it was indexed (size {size} -> {st.st_size}, "
                                                "or its mtime or inode): restart the server to index it again",
                              "changed")
        return self._read(i, f, max_bytes, (st.st_mtime_ns, st.st_size, st.st_ino))

    def remote_range(self, i: int, max_bytes: int | None = None) -> tuple[RemoteStorage, str, int, int] | None:
        """(storage, url, offset, size) of sample `i` when its bytes are one plain range of an object (a tar
        member, an uncompressed Parquet value), which a worker may pipeline with others (steps.Reader); None
        when they are not (a local file, a compressed Parquet page or piece): then `read` reads them."""
        if not isinstance(self.storage, RemoteStorage) or (self.raw is not None and self.raw[i] >= 0):
            return None
        span = int(self.span[i])
        if max_bytes is not None and span > max_bytes:
            raise DecodeError(self.describe(i), f"sample of {span} bytes exceeds --max-file-bytes {max_bytes}",
                              "too_large")
        return self.storage, self.files[self._file(i)], int(self.pos[i]), span

    def _read(self, i: int, f: int, max_bytes: int | None, version: tuple[int, ...]) -> bytes:
        """`version`: the file's (mtime, size, inode) now, the indexed version of an object (its range reads
        ask for that version alone, If-Match)."""
        span = int(self.span[i])
        paged = self.raw is not None and self.raw[i] >= 0
        size = int(self.length[i]) if paged and self.length is not None else span  # the sample's, not its page's
        if max_bytes is not None and size > max_bytes:
            raise DecodeError(self.describe(i), f"sample of {size} bytes exceeds --max-file-bytes {max_bytes}",
                              "too_large")
        if not paged:
            return self.storage.read_range(self.files[f], int(self.pos[i]), span, self.describe, i)
        assert self.raw is not None and self.inner is not None and self.length is not None
        inner, length = int(self.inner[i]), int(self.length[i])
        if self.codecs[f] == "snappy":  # a piece of its page, about its own size: never kept
            piece: bytes = self._decompress(f, i, piece=True)[inner : inner + length].to_pybytes()
            return piece
        if self.codecs[f] in STREAMED and int(self.raw[i]) > self._pages.limit:
            return self._stream_to(f, i, inner, length)
        key = (f, int(self.pos[i]), span, version)  # the file as it is now: a changed file never meets its old pages
        page = self._pages.get(key)
        if page is not None and isinstance(self.storage, RemoteStorage) and self.storage.version(self.files[f]) is None:
            page = None  # the object changed since: read it again, which says so (If-Match)
        if page is None:
            page = self._decompress(f, i, piece=False)
            self._pages.put(key, page)
        data: bytes = page[inner : inner + length].to_pybytes()
        return data

    def _stream_to(self, f: int, i: int, inner: int, length: int) -> bytes:
        """The sample's bytes from a page larger than the page cache keeps: its stream decompressed a piece at a
        time (`PageStream`) up to the sample's end, the bytes before it dropped. A worker then holds the page's
        stored bytes, a piece and the sample, never the page decompressed (a 16 KB zstd page may hold 512 MB);
        its size was checked to the byte when the file was indexed, and the bytes handed out are those its
        stream holds."""
        assert self.raw is not None
        size = int(self.raw[i])
        packed = self.storage.read_range(self.files[f], int(self.pos[i]), int(self.span[i]), self.describe, i)
        try:
            stream = PageStream(packed, size, self.codecs[f])
            stream.skip(inner)
            return stream.read(length)
        except MemoryError:
            raise DecodeError(self.describe(i), f"its value of {length} bytes does not fit in memory here",
                              "undecodable") from None
        except ValueError as exc:
            raise DecodeError(self.describe(i), str(exc), "undecodable") from None

    def _decompress(self, f: int, i: int, *, piece: bool) -> Any:
        """The compressed bytes of sample `i` decompressed (a pyarrow Buffer); a snappy `piece` behind the
        varint of its size, which makes it a snappy stream by itself."""
        assert self.raw is not None
        size = int(self.raw[i])
        packed = self.storage.read_range(self.files[f], int(self.pos[i]), int(self.span[i]), self.describe, i)
        try:
            return decompress_page(_varint(size) + packed if piece else packed, size, self.codecs[f])
        except MemoryError:
            raise DecodeError(self.describe(i), f"its page of {size} bytes does not fit in memory here",
                              "undecodable") from None
        except ValueError as exc:
            raise DecodeError(self.describe(i), str(exc), "undecodable") from None

    def location(self) -> str:
        """The container files, resolved, each with the file system it lies on (a member's version has
        no device); a URL as it is."""
        h = hashlib.blake2b(digest_size=16)
        for name in self.files:
            where, device = name, -1
            if "://" not in name:
                try:
                    where = os.path.realpath(name)
                    device = os.stat(where).st_dev
                except OSError:
                    pass
            h.update(f"{where}\0{device}\n".encode())
        return f"{self.kind}: {len(self.files)} files, {h.hexdigest()}"

    def fingerprint(self) -> str:
        """Hash of the files' names, each sample's place and length, and the labels."""
        h = hashlib.blake2b(digest_size=8)
        h.update("\0".join(os.path.basename(f) for f in self.files).encode())
        arrays = [self.starts, self.pos, self.span, self.labels]
        arrays += [a for a in (self.names_blob, self.inner, self.length) if a is not None]
        for arr in arrays:
            h.update(np.ascontiguousarray(arr).data)
        return h.hexdigest()


def decompress_page(data: bytes | memoryview, size: int, codec: str) -> Any:
    """`data`, compressed with pyarrow's `codec`, decompressed to exactly `size` bytes (the size its Parquet page
    header says), as a pyarrow Buffer; a ValueError that says so where it holds another length or does not
    decompress, a MemoryError where `size` does not fit.

    pyarrow's one-shot ``decompress`` (26) does not check the length it gets for gzip, brotli, lz4_raw and
    snappy: data that holds fewer bytes comes back padded to `size` with whatever that memory held. Each codec is
    therefore read in a way that knows the length it holds (CPU per 1 MiB page of JPEG bytes against the
    one-shot call, pyarrow 26, interleaved runs): gzip with stdlib zlib asked for at most `size` + 1 bytes
    (0-3% more; pyarrow's stream read to `size` + 1: 2-8% more; a page of several gzip members, RFC 1952 2.2,
    is read by that stream, as pyarrow reads it), brotli through pyarrow's stream read to `size` + 1 (1-5%
    more; there is no stdlib brotli), lz4_raw (no stream form) once more to `size` - 1, which fails where the
    data holds `size` (0.04-0.07 ms more a MiB), snappy by the size its first varint says (the library then
    checks that its tags fill it); zstd checks the size itself.

    A snappy or lz4_raw `size` beyond what `data` can hold (`MAX_RATIO`) is refused before anything is
    allocated for it; gzip, zstd and brotli pages have no such bound: read them with `PageStream` where
    a whole page is not wanted."""
    import pyarrow as pa

    ratio = MAX_RATIO.get(codec)
    if ratio is not None and size > ratio * len(data):
        raise ValueError(f"its {codec} page does not decompress to the {size} bytes its header says ({len(data)} "
                         f"bytes of {codec} hold at most {ratio * len(data)})")
    try:
        if codec == "gzip":
            inflate = zlib.decompressobj(wbits=32 + 15)  # a gzip or zlib header, as pyarrow reads them
            out = pa.py_buffer(inflate.decompress(data, size + 1))
            if out.size <= size and not inflate.eof:
                raise ValueError(f"its stream is cut short after {out.size} bytes")
            if inflate.unused_data[:2] == b"\x1f\x8b" == data[:2] and out.size <= size:
                # More members (RFC 1952 2.2: a gzip file is a series of them): read as pyarrow reads them, by its
                # stream, which takes member after member in one pass (zlib's unused_data copies what is left)
                out = pa.CompressedInputStream(pa.BufferReader(data), codec).read_buffer(size + 1)
            elif inflate.unused_data:
                raise ValueError(f"{len(inflate.unused_data)} bytes follow its stream")
        elif codec == "brotli":
            out = pa.CompressedInputStream(pa.BufferReader(data), codec).read_buffer(size + 1)
        else:
            if codec == "snappy":
                said, _ = read_varint(data, 0)
                if said != size:
                    raise ValueError(f"its snappy stream says {said}")
            out = pa.decompress(data, size, codec)
            if codec == "lz4_raw" and size:
                try:
                    pa.decompress(data, size - 1, codec)
                except (pa.ArrowException, OSError, ValueError):
                    pass  # it needs all `size` bytes: it holds exactly them
                else:
                    raise ValueError("it holds fewer")
        if out.size != size:
            raise ValueError("it holds more" if out.size > size else f"it holds {out.size}")
    except MemoryError:  # before OSError: pyarrow's ArrowMemoryError is both
        raise
    except (pa.ArrowException, OSError, ValueError, zlib.error) as exc:
        raise ValueError(f"its {codec} page does not decompress to the {size} bytes its header says "
                         f"({one_line(exc)})") from None
    return out


class PageStream:
    """A page's bytes decompressed, read in order a bounded piece at a time: what it costs is `chunk` bytes,
    whatever its size (a gzip, zstd or brotli page, through pyarrow's CompressedInputStream), or the page
    decompressed whole where its codec's ratio bounds it by its stored bytes (snappy, lz4_raw:
    `decompress_page`), or `data` itself (no codec).

    It holds exactly the `size` bytes its header says or it is damaged, as `decompress_page` checks: `read`
    and `skip` raise a ValueError where the page ends before what they want, and `close` reads what is
    left (dropped a piece at a time) and raises where the stream does not end exactly there. A stream is
    never read past `size` + 1 bytes, whatever it holds. Errors read as decompress_page's."""

    def __init__(self, data: bytes | memoryview, size: int, codec: str, chunk: int = STREAM_CHUNK) -> None:
        self.size, self.codec, self.at = size, codec, 0  # `at`: bytes of the page read or skipped so far
        self._chunk = chunk
        self._stream: Any = None
        self._out = 0  # bytes the stream gave
        if codec == "gzip":  # stdlib zlib, as decompress_page: 10-15% less CPU than pyarrow's stream
            self._buf = memoryview(b"")
            self._stream = zlib.decompressobj(wbits=32 + 15)
            self._input, self._fed = memoryview(data), 0
        elif codec in STREAMED:
            import pyarrow as pa

            self._buf = memoryview(b"")
            self._stream = pa.CompressedInputStream(pa.BufferReader(data), codec)
        else:
            self._buf = memoryview(decompress_page(data, size, codec) if codec else data)
            self._out = len(self._buf)
        self._k = 0  # where `at` is in `_buf`

    def _damaged(self, why: str) -> ValueError:
        return ValueError(f"its {self.codec} page does not decompress to the {self.size} bytes its header says "
                          f"({why})")

    def _fill(self) -> None:
        """The next piece of the stream in `_buf`; a ValueError where the page ends before `size`."""
        if self._stream is None:
            raise self._damaged(f"it holds {self._out}") if self.codec else ValueError(
                f"its {self.size} bytes end early")
        piece = self._piece(min(self._chunk, self.size + 1 - self._out))
        if not len(piece):
            self._stream = None
            raise self._damaged(f"it holds {self._out}")
        self._out += len(piece)
        if self._out > self.size:
            raise self._damaged("it holds more")
        self._buf, self._k = memoryview(piece), 0

    def _piece(self, want: int) -> Any:
        """At most `want` more bytes of the stream (none at its end: a bytes object or a pyarrow Buffer)."""
        import pyarrow as pa

        if self.codec != "gzip":
            try:
                return self._stream.read_buffer(want)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise self._damaged(one_line(exc)) from None
        inflate, data = self._stream, self._input
        try:
            while True:  # the input fed 64 KB at a time: zlib copies what it has not used (unconsumed_tail)
                if inflate.eof:  # a member ends (RFC 1952 2.2: a gzip file is a series of them); what follows it is
                    start = self._fed - len(inflate.unused_data)  # in unused_data (and unconsumed_tail: not read)
                    if start == len(data):
                        return b""
                    if bytes(data[start : start + 2]) != b"\x1f\x8b" or bytes(data[:2]) != b"\x1f\x8b":
                        raise ValueError(f"{len(data) - start} bytes follow its stream")
                    inflate = self._stream = zlib.decompressobj(wbits=32 + 15)
                    self._fed = start
                    continue
                if inflate.unconsumed_tail:
                    out: bytes = inflate.decompress(inflate.unconsumed_tail, want)
                elif self._fed < len(data):
                    fed = data[self._fed : self._fed + (64 << 10)]
                    self._fed += len(fed)
                    out = inflate.decompress(fed, want)
                else:
                    raise ValueError(f"its stream is cut short after {self._out} bytes")
                if out:
                    return out
        except (zlib.error, ValueError) as exc:
            raise self._damaged(one_line(exc)) from None

    def read(self, n: int) -> bytes:
        """The next `n` bytes (the caller bounds `n`)."""
        if n <= len(self._buf) - self._k:
            out = bytes(self._buf[self._k : self._k + n])
            self._k += n
            self.at += n
            return out
        parts = []
        while n:
            if self._k == len(self._buf):
                self._fill()
            take = min(n, len(self._buf) - self._k)
            parts.append(self._buf[self._k : self._k + take])
            self._k += take
            self.at += take
            n -= take
        return b"".join(parts)

    def skip(self, n: int) -> None:
        """Pass over the next `n` bytes (a piece at a time)."""
        while n:
            if self._k == len(self._buf):
                self._fill()
            take = min(n, len(self._buf) - self._k)
            self._k += take
            self.at += take
            n -= take

    def close(self) -> None:
        """Read to the end: a ValueError unless the page holds exactly `size` bytes."""
        self.skip(self.size - self.at)
        if self._stream is not None:
            self._k = len(self._buf)
            if len(self._piece(1)):
                raise self._damaged("it holds more")
            self._stream = None


def read_varint(buf: bytes | memoryview, at: int, end: int | None = None) -> tuple[int, int]:
    """The unsigned LEB128 varint of at most 64 bits (10 bytes) at `at`, ending before `end`, and where it ends;
    a ValueError where it runs past `end` or is longer."""
    end = len(buf) if end is None else end
    value = shift = 0
    while True:
        if at >= end:
            raise ValueError("a varint runs past its data")
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7


def _varint(value: int) -> bytes:
    """`value` as an unsigned LEB128 varint (how a snappy stream begins: its size decompressed)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class PageCache:
    """Decompressed pages a process keeps, least recently used dropped first, at most `limit` bytes in all
    (a page larger than that is not kept). Shared by the read-ahead threads of a worker."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # bytes kept now
        self.hits = self.misses = 0
        self._pages: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            page = self._pages.get(key)
            if page is None:
                self.misses += 1
                return None
            self.hits += 1
            self._pages.move_to_end(key)
            return page

    def put(self, key: Any, page: Any) -> None:
        if page.size > self.limit:
            return
        with self._lock:
            old = self._pages.pop(key, None)
            self.held -= 0 if old is None else old.size
            self._pages[key] = page
            self.held += page.size
            while self.held > self.limit:
                _, dropped = self._pages.popitem(last=False)
                self.held -= dropped.size

    def __len__(self) -> int:
        return len(self._pages)


# ---------------------------------------------------------------------------- the index file
def _index_path(files: Sequence[str], kind: str, options: dict[str, object], index_dir: str | None) -> str:
    """Where the index of these files lives: `index_dir`, else beside the first file if that folder
    is writable, else the user's cache folder."""
    key = hashlib.blake2b(json.dumps({"files": list(files), "kind": kind, "options": options,
                                      "format": INDEX_FORMAT}, sort_keys=True).encode(), digest_size=10).hexdigest()
    name = f".loader-index-{kind.split()[0].lower()}-{key}.npz"
    if index_dir is not None:
        return os.path.join(index_dir, name)
    beside = os.path.dirname(files[0])
    if not is_remote(files[0]) and os.access(beside, os.W_OK | os.X_OK) and _open_to_others(beside) is None:
        return os.path.join(beside, name)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "loader-service", "index", name)


def _open_to_others(folder: str) -> str | None:
    """Why a user other than this one (or root) could replace or plant a file in `folder`; None if none can
    (or the folder is still to be created: it is created 0700)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    if not trusted_owner(st.st_uid):
        return f"it belongs to {owner_text(st.st_uid)} (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users may write it (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner_text(st.st_uid)})"
    return None


def _untrusted_index(st: os.stat_result) -> str | None:
    """Why the opened index file may not be read: the labels and byte ranges it holds are served as they
    are, so it must be a regular file that only this user (or root) wrote and can write."""
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if not trusted_owner(st.st_uid):
        trusted = owner_text(os.geteuid()) + (" or root" if os.geteuid() else "")
        return f"it belongs to {owner_text(st.st_uid)}, not to {trusted}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"other users may write it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _stat_versions(files: Sequence[str], what: str, storage: RemoteStorage) -> np.ndarray:
    """Each file's (mtime, size, inode); each object's (ETag hash, size, 0), from the listing or a HEAD."""
    out = np.zeros((len(files), 3), dtype=np.int64)
    folders = sorted({f.rsplit("/", 1)[0] + "/" for f in files if f.startswith("s3://")})
    for folder in folders:  # one listing per folder, not a request per object (a thousand shards at 100 ms)
        try:
            storage.list(folder, shallow=True)
        except DecodeError as exc:
            raise ConfigError(f"{what} {exc}") from None
    for k, f in enumerate(files):
        if is_remote(f):
            try:
                info = storage.info(f)
            except DecodeError as exc:
                raise ConfigError(f"{what} {exc}") from None
            if info is None:
                raise ConfigError(f"{what} {f} does not exist")
            out[k] = (*info.version, 0)
            continue
        try:
            st = os.stat(f)
        except OSError as exc:
            raise os_error(exc, what, f) from None
        out[k] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


def _read_index(path: str, files: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The arrays of the index file at `path`, if it is the index of `files` and sound; None to index again.

    The file is read as data, never trusted: each array's size is checked against the file before it
    is allocated, zip's CRCs against its bytes, and every offset, size and count against the files it
    indexes (`_index_problem`), so a damaged index is indexed again rather than read out of bounds."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a link (ELOOP), or unreadable
        log.warning("the index %s is not read (%s): indexing again", path,
                    "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror)
        return None
    st = os.fstat(fd)  # what was opened, not what the path names a moment later
    untrusted = _untrusted_index(st)
    if untrusted is not None:
        os.close(fd)
        log.warning("the index %s is not read: %s, and whoever can write it chooses the labels and the bytes "
                    "served for every sample; indexing again (remove it, or pass --index-dir with a folder only "
                    "you can write)", path, untrusted)
        return None
    with open(fd, "rb") as f:
        try:
            arrays = _load_npz(f, st.st_size)
            meta = json.loads(arrays.pop("meta").tobytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, EOFError, RecursionError, NotImplementedError,
                zipfile.BadZipFile) as exc:
            log.warning("the index %s cannot be read (%s): indexing again", path, exc)
            return None
    if not isinstance(meta, dict) or meta.get("files") != list(files) or meta.get("format") != INDEX_FORMAT:
        return None
    if "arrays" not in meta:
        log.info("the index %s was written by an older version, without the list of its arrays: indexing again", path)
        return None
    problem = _index_problem(arrays, meta, len(files))
    if problem is not None:
        log.warning("the index %s is damaged (%s): indexing again", path, problem)
        return None
    arrays["_meta"] = meta  # type: ignore[assignment]
    return arrays


#: What an index file may hold: each array's dtype.
_INDEX_ARRAYS: dict[str, np.dtype[Any]] = {
    **dict.fromkeys(("meta", "names_blob"), np.dtype(np.uint8)),
    **dict.fromkeys(("versions", "starts", "pos", "span", "labels", "names_offsets", "raw", "inner", "length"),
                    np.dtype(np.int64))}


#: The zip flags `np.savez` may set: a data descriptor after the data, UTF-8 names (not encryption, ...).
_ZIP_FLAGS = 0x08 | 0x800


def _load_npz(file: Any, size: int) -> dict[str, np.ndarray]:
    """The arrays `np.savez` wrote to the opened `file` of `size` bytes, read without allocating what a
    damaged header says."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(file) as z:
        for info in z.infolist():
            name = info.filename.removesuffix(".npy")
            dtype = _INDEX_ARRAYS.get(name)
            if (dtype is None or info.compress_type != zipfile.ZIP_STORED or info.flag_bits & ~_ZIP_FLAGS
                    or info.file_size > size):
                raise ValueError(f"an unexpected member {info.filename!r}")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, stored = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, stored = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"{name}: .npy format {version}")
                if stored != dtype or fortran or len(shape) > 2:
                    raise ValueError(f"{name}: a {stored} array of shape {shape}")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes > info.file_size:
                    raise ValueError(f"{name}: shape {shape} in {info.file_size} bytes")
                data = f.read(nbytes + 1)  # to the end: zipfile checks the CRC there
            if len(data) != nbytes:
                raise ValueError(f"{name}: {len(data)} bytes for shape {shape}")
            out[name] = np.frombuffer(data, dtype).reshape(shape)
    return out


def _index_problem(arrays: dict[str, np.ndarray], meta: dict[str, object], files: int) -> str | None:
    """What is wrong with the arrays of an index of `files` files (None: nothing)."""
    if meta.get("arrays") != sorted(arrays):  # a member lost (a zip's entry count is not checked by a CRC)
        return f"its arrays: {sorted(arrays)} of {meta.get('arrays')}"
    codecs, classes = meta.get("codecs"), meta.get("class_names")
    if not (isinstance(codecs, list) and len(codecs) == files and all(isinstance(c, str) for c in codecs)):
        return "its codecs"
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "its class names"
    missing = [k for k in ("versions", "starts", "pos", "span", "labels") if k not in arrays]
    if missing:
        return f"no {missing[0]}"
    versions, starts = arrays["versions"], arrays["starts"]
    n = len(arrays["pos"])
    if versions.shape != (files, 3) or starts.shape != (files + 1,):
        return "its file table"
    if starts[0] != 0 or starts[-1] != n or (np.diff(starts) < 0).any():
        return "its file starts"
    per_sample = ["pos", "span", "labels"] + [k for k in ("raw", "inner", "length") if k in arrays]
    if any(arrays[k].shape != (n,) for k in per_sample):
        return "its sample count"
    if ("names_blob" in arrays) != ("names_offsets" in arrays) or len({k in arrays for k in ("raw", "inner",
                                                                                         "length")}) > 1:
        return "a missing array"
    if "names_offsets" in arrays:
        blob, offsets = arrays["names_blob"], arrays["names_offsets"]
        if (blob.ndim != 1 or offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != len(blob)
                or (np.diff(offsets) < 0).any()):
            return "its member names"
    sizes = np.repeat(versions[:, 1], np.diff(starts))  # each sample's file size
    pos, span = arrays["pos"], arrays["span"]
    if (pos < 0).any() or (span < 0).any() or (pos > sizes).any() or (span > sizes - pos).any():
        return "a sample's range outside its file"
    if "raw" in arrays:
        raw, inner, length = arrays["raw"], arrays["inner"], arrays["length"]
        paged = raw >= 0
        if (raw < -1).any() or (raw > _MAX_PAGE).any():
            return "a page size"
        if paged.any():
            r, i, k = raw[paged], inner[paged], length[paged]
            if (i < 0).any() or (k < 0).any() or (i > r).any() or (k > r - i).any():
                return "a sample's range outside its page"
    return None


def _segments_of(stored: dict[str, np.ndarray]) -> list[Segment]:
    meta: dict[str, object] = stored["_meta"]  # type: ignore[assignment]
    starts = stored["starts"]
    segments = []
    codecs: list[str] = meta["codecs"]  # type: ignore[assignment]
    classes = meta.get("class_names")
    for k in range(len(starts) - 1):
        lo, hi = int(starts[k]), int(starts[k + 1])
        blob = off = None
        if "names_blob" in stored:
            off = stored["names_offsets"][lo : hi + 1]
            blob, off = stored["names_blob"][off[0] : off[-1]], off - off[0]
        segments.append(Segment(
            pos=stored["pos"][lo:hi], span=stored["span"][lo:hi], labels=stored["labels"][lo:hi], names_blob=blob,
            names_offsets=off,
            raw=stored["raw"][lo:hi] if "raw" in stored else None,
            inner=stored["inner"][lo:hi] if "inner" in stored else None,
            length=stored["length"][lo:hi] if "length" in stored else None, codec=codecs[k],
            class_names=tuple(classes) if isinstance(classes, list) else None))
    return segments


def _write_index(path: str, files: Sequence[str], versions: np.ndarray, arrays: dict[str, np.ndarray],
                 codecs: list[str], class_names: tuple[str, ...] | None) -> bool:
    """Write atomically (a temporary file renamed over); False (and a log line) if it cannot be."""
    meta = json.dumps({"files": list(files), "format": INDEX_FORMAT, "codecs": codecs,
                       "class_names": list(class_names) if class_names else None,
                       "arrays": sorted(["versions", *arrays])}).encode()
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)  # a new folder: only this user can plant a file there
        fd, tmp = tempfile.mkstemp(prefix=".loader-index-", suffix=".tmp", dir=folder)
    except OSError as exc:
        log.warning("cannot keep the member index in %s (%s): it is built again at the next start; pass "
                    "--index-dir DIR to keep it elsewhere", folder, exc.strerror)
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{"meta": np.frombuffer(meta, dtype=np.uint8), "versions": versions, **arrays})  # type: ignore[arg-type]
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the member index %s (%s)", path, exc.strerror)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
    return True


def load_or_build(files: list[str], *, kind: str, options: dict[str, object], index_dir: str | None,
                  index_file: Callable[[str], Segment], source: str, storage: RemoteStorage,
                  page_cache_bytes: int = _PAGE_CACHE_BYTES) -> PackedIndex:
    """The index of `files`: read from its index file where every file is unchanged, the others
    indexed with `index_file` (a progress bar when it takes a while), then kept for the next start.
    `page_cache_bytes`: what each process keeps of the pages it decompressed (`PackedIndex.page_cache_bytes`).

    Objects (``s3://``, ``https://``) are indexed where they lie, through `storage` (`index_file` opens them
    with ``storage.open``: range reads, nothing copied to local disk); their index is kept in `index_dir`
    or the user's cache folder."""
    from tqdm import tqdm

    remote = is_remote(files[0])
    if remote:
        index_file = _naming_objects(index_file)
    path = _index_path(files, kind, options, index_dir)
    if index_dir is not None and (open_to := _open_to_others(index_dir)) is not None:
        log.warning("--index-dir %s: %s; an index file there that is not yours alone is not read but indexed again "
                    "(use a folder only you can write)", index_dir, open_to)
    versions = _stat_versions(files, kind, storage)
    stored = _read_index(path, files)
    segments: list[Segment | None] = [None] * len(files)
    if stored is not None:
        old = stored["versions"]
        for k, seg in enumerate(_segments_of(stored)):
            if (old[k] == versions[k]).all():
                segments[k] = seg
    todo = [k for k, s in enumerate(segments) if s is None]
    if todo:
        started = time.monotonic()
        if stored is not None:
            log.info("re-indexing %d of %d %s that changed since %s was written", len(todo), len(files), kind, path)
        total = int(versions[todo, 1].sum())
        with tqdm(total=total, desc=f"indexing {kind}", unit="B", unit_scale=True, delay=2.0) as bar:
            for k, segment in _index_files(index_file, [files[k] for k in todo], todo, kind):
                segments[k] = segment
                bar.update(int(versions[k, 1]))
        versions = _stat_versions(files, kind, storage)  # as indexed (a file changed meanwhile: indexed next time)
    done = [s for s in segments if s is not None]
    index = _assemble(files, versions, done, kind, source, storage if remote else None, page_cache_bytes)
    if todo:
        arrays = _arrays_of(index)
        kept = _write_index(path, files, versions, arrays, [s.codec for s in done], index.class_names)
        size = os.path.getsize(path) if kept else 0
        log.info("indexed %d samples of %d %s in %.1f s%s", len(index), len(files), kind,
                 time.monotonic() - started, f" (index {path}, {size / 1e6:.1f} MB)" if kept else "")
    return index


#: Files indexed in parallel processes from this many on (a fork costs more than a small file).
_PARALLEL_FILES = 4
_indexer: Callable[[str], Segment] | None = None


def _index_one(job: tuple[int, str]) -> tuple[int, Segment | Exception]:
    assert _indexer is not None
    try:
        return job[0], _indexer(job[1])
    except (ConfigError, OSError) as exc:
        return job[0], exc


def _index_files(index_file: Callable[[str], Segment], paths: list[str], ids: list[int],
                 kind: str) -> Iterator[tuple[int, Segment]]:
    """(id, segment) of every file, on every core when there are several files; errors name the file."""
    global _indexer
    jobs = list(zip(ids, paths, strict=True))
    cores = min(len(jobs), len(os.sched_getaffinity(0)))
    if len(jobs) < _PARALLEL_FILES or cores < 2:
        results: Iterator[tuple[int, Segment | Exception]] = ((k, _safe(index_file, p)) for k, p in jobs)
        pool = None
    else:
        import multiprocessing

        _indexer = index_file  # inherited by the forked processes: a closure needs no pickling
        pool = multiprocessing.get_context("fork").Pool(cores)
        results = pool.imap(_index_one, jobs)
    try:
        for k, result in results:
            if isinstance(result, OSError):
                raise os_error(result, kind, paths[ids.index(k)]) from None
            if isinstance(result, Exception):
                raise result
            yield k, result
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _indexer = None


def _safe(index_file: Callable[[str], Segment], path: str) -> Segment | Exception:
    try:
        return index_file(path)
    except (ConfigError, OSError) as exc:
        return exc


def _naming_objects(index_file: Callable[[str], Segment]) -> Callable[[str], Segment]:
    """`index_file` for an object: a read that fails after its retries is a ConfigError naming the object."""

    def index_object(url: str) -> Segment:
        try:
            return index_file(url)
        except DecodeError as exc:
            raise ConfigError(f"cannot index {exc}") from None

    return index_object


def _arrays_of(index: PackedIndex) -> dict[str, np.ndarray]:
    arrays = {"starts": index.starts, "pos": index.pos, "span": index.span, "labels": index.labels}
    for name in ("names_blob", "names_offsets", "raw", "inner", "length"):
        value = getattr(index, name)
        if value is not None:
            arrays[name] = value
    return arrays


def _assemble(files: list[str], versions: np.ndarray, segments: list[Segment], kind: str, source: str,
              remote: RemoteStorage | None = None, page_cache_bytes: int = _PAGE_CACHE_BYTES) -> PackedIndex:
    counts = [len(s) for s in segments]
    starts = np.zeros(len(segments) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(s, name) for s in segments]
        if all(p is None for p in parts):
            return None
        fill = {"raw": -1}.get(name, 0)
        return np.concatenate([p if p is not None else np.full(len(s), fill, np.int64)
                               for p, s in zip(parts, segments, strict=True)]).astype(np.int64)

    names_blob = names_offsets = None
    if segments and all(s.names_blob is not None and s.names_offsets is not None for s in segments):
        names_blob = np.concatenate([s.names_blob for s in segments if s.names_blob is not None]).astype(np.uint8)
        sizes = np.concatenate([np.diff(s.names_offsets) for s in segments if s.names_offsets is not None])
        names_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=names_offsets[1:])
    classes = next((s.class_names for s in segments if s.class_names), None)
    pos, span, labels = cat("pos"), cat("span"), cat("labels")
    assert pos is not None and span is not None and labels is not None
    raw = cat("raw")
    packed = raw is not None and bool((raw >= 0).any())  # some samples sit in compressed pages
    return PackedIndex(kind=kind, files=tuple(files), file_versions=versions, starts=starts, pos=pos, span=span,
                       labels=labels, class_names=classes, source=redact(source), names_blob=names_blob,
                       names_offsets=names_offsets, raw=raw if packed else None,
                       inner=cat("inner") if packed else None, length=cat("length") if packed else None,
                       codecs=tuple(s.codec for s in segments),
                       storage=remote if remote is not None else storage_for(files[0]),
                       page_cache_bytes=page_cache_bytes)
