"""Tar shards in the WebDataset layout: ``--data 'shards/train-{000000..000099}.tar'``.

A sample is the group of members that share a key: the member's path up to the first dot of
its file name (``a/b/000123.jpg`` and ``a/b/000123.cls`` are sample ``a/b/000123``). Its image
is the ``.jpg``, ``.jpeg``, ``.png`` or ``.webp`` member; its label the integer text of the
``.cls`` member, or with ``--json-label FIELD`` that field of the ``.json`` member. Other
members (captions, ...) are ignored. Samples are numbered in shard order, then in the order of
their first member in the shard.

Indexing reads the tar headers (and the small label members) once, an object's through range reads
of a window at a time (no local copy, remote.RemoteFile); packed.py keeps the index
and serves every sample as one range read of its image member. A shard that is cut short, a
header that does not parse, a sample without its image or its label, or a label that is not an
integer is a ConfigError naming the shard and the member.
"""

from __future__ import annotations

import json
import mmap
import os
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from loader_client.contract.errors import ConfigError

from ..options import DataOptions
from .packed import PackedIndex, Segment, expand_files, load_or_build
from .remote import RemoteStorage, is_remote, storage_of

__all__ = ["IMAGE_MEMBERS", "index_shard", "open_tar_shards"]

#: Member extensions that hold a sample's image.
IMAGE_MEMBERS = frozenset({"jpg", "jpeg", "png", "webp"})
_BLOCK = 512
_TAIL_CHUNK = 1 << 20


def open_tar_shards(options: DataOptions) -> PackedIndex:
    """Open the shards ``options.data`` names, from their index (built on first use)."""
    storage = storage_of(options)
    files = expand_files(options.data, ".tar", "tar shard", storage)
    json_label = options.json_label
    first = os.path.basename(files[0])
    source = f"tar shards {first}" + (f" .. {os.path.basename(files[-1])} ({len(files)} shards)" if len(files) > 1
                                      else "")
    return load_or_build(files, kind="tar shards", options={"json_label": json_label}, index_dir=options.index_dir,
                         index_file=lambda path: index_shard(path, json_label, storage=storage), source=source,
                         storage=storage)


def index_shard(path: str, json_label: str | None = None, storage: RemoteStorage | None = None) -> Segment:
    """The samples of one shard: each image member's offset and size, and the label beside it.

    A local shard is mapped; an object (`storage` given) is read where it lies, a window of range
    reads at a time (`RemoteStorage.open`): its headers and label members, never a local copy."""
    if storage is not None and is_remote(path):
        with storage.open(path) as remote:
            if remote.size == 0:
                raise ConfigError(f"tar shard {path} is empty")
            return _index_members(remote, remote, remote.size, path, json_label)
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        if end == 0:
            raise ConfigError(f"tar shard {path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _index_members(mm, f, end, path, json_label)


def _index_members(mm: Any, f: Any, end: int, path: str, json_label: str | None) -> Segment:
    """`index_shard` on the shard's bytes: `mm` sliced (``mm[a:b]``), `f` the same as a file (for tarfile)."""
    try:
        keys = _samples(_headers(mm, end, path), mm, path, json_label)
    except _Unusual:  # GNU sparse files, global pax headers, base-256 sizes: tarfile knows them
        keys = _samples(_tarfile_members(f, end, path), mm, path, json_label)
    n = len(keys)
    pos = np.empty(n, np.int64)
    span = np.empty(n, np.int64)
    labels = np.empty(n, np.int64)
    names: list[bytes] = []
    want = f".json field {json_label!r}" if json_label else ".cls member"
    for k, (key, (name, off, size, label)) in enumerate(keys.items()):
        if name is None:
            raise ConfigError(f"tar shard {path}: sample {key!r} has no image member "
                              f"({', '.join('.' + e for e in sorted(IMAGE_MEMBERS))})")
        if label is None:
            raise ConfigError(f"tar shard {path}: member {name!r} has no label: its sample {key!r} lacks a {want}"
                              + ("" if json_label else " (or name a field of its .json with --json-label)"))
        pos[k], span[k], labels[k] = off, size, label
        names.append(name.encode("utf-8", "surrogateescape"))
    if not n:
        raise ConfigError(f"tar shard {path} holds no samples")
    blob, offsets = Segment.blob(names)
    return Segment(pos=pos, span=span, labels=labels, names_blob=blob, names_offsets=offsets)


def _samples(members: Iterator[tuple[str, int, int]], mm: Any, path: str,
             json_label: str | None) -> dict[str, list[Any]]:
    """key -> [image name, offset, size, label] of the members, each label read as its header is walked (an
    object is read once, front to back)."""
    keys: dict[str, list[Any]] = {}
    for name, offset, size in members:
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            continue
        key = f"{folder}/{stem}" if folder else stem
        ext = ext.lower()
        entry = keys.setdefault(key, [None, 0, 0, None])
        if ext in IMAGE_MEMBERS:
            if entry[0] is not None:
                raise ConfigError(f"tar shard {path}: sample {key!r} has two images ({entry[0]!r} and "
                                  f"{name!r}); keep one image per sample")
            entry[0], entry[1], entry[2] = name, offset, size
        elif (ext == "cls" and json_label is None) or (ext == "json" and json_label is not None):
            entry[3] = _label(mm[offset : offset + size], ext, json_label, f"{path}:{name}")
    return keys


class _Unusual(Exception):
    """A header kind the fast walker leaves to tarfile."""


_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_SKIPPED = (b"1", b"2", b"3", b"4", b"5", b"6", b"K")  # links, devices, folders, FIFOs, GNU long link names


def _headers(mm: Any, end: int, path: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular member, read straight from the 512-byte headers
    (ustar, GNU long names, pax path and size), each checked against its checksum."""
    offset = 0
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    last = ""
    while offset < end:
        if offset + _BLOCK > end:
            raise ConfigError(f"tar shard {path} is truncated: a header cut short at offset {offset} of {end} bytes")
        header = mm[offset : offset + _BLOCK]
        if header == _ZERO_BLOCK:
            _check_tail(mm, offset, end, path)
            return
        try:
            stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            stored = -1
        if stored != sum(header) - sum(header[148:156]) + 256:
            if offset == 0:
                raise ConfigError(f"tar shard {path}: not a tar file (no valid header at its start)")
            raise ConfigError(f"tar shard {path} is truncated or damaged: an unreadable header at offset {offset} "
                              f"of {end} bytes" + (f", after member {last!r}" if last else ""))
        if header[124] & 0x80:
            raise _Unusual  # a base-256 size (a member over 8 GB)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        data = offset + _BLOCK
        if kind in _REGULAR:
            if b"size" in pax:
                size = int(pax[b"size"])
            if long_name is not None:
                raw = long_name
            elif b"path" in pax:
                raw = pax[b"path"]
            else:
                raw = header[0:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    raw = prefix + b"/" + raw
            last = raw.decode("utf-8", "surrogateescape")
            if data + size > end:
                raise ConfigError(f"tar shard {path} is truncated: member {last!r} needs bytes up to {data + size}, "
                                  f"the file ends at {end}")
            yield last, data, size
            long_name, pax = None, {}
        elif kind == b"L":
            long_name = mm[data : data + size].split(b"\0", 1)[0]
        elif kind == b"x":
            pax = _pax(mm[data : data + size])
        elif kind not in _SKIPPED:
            raise _Unusual
        offset = data + -(-size // _BLOCK) * _BLOCK


def _pax(buf: bytes) -> dict[bytes, bytes]:
    """The records of a pax extended header: ``LEN key=value\\n`` each."""
    out: dict[bytes, bytes] = {}
    at = 0
    while at < len(buf) and buf[at : at + 1] != b"\0":
        space = buf.index(b" ", at)
        length = int(buf[at:space])
        if length <= 0:
            raise _Unusual
        key, _, value = buf[space + 1 : at + length - 1].partition(b"=")
        out[key] = value
        at += length
    return out


def _tarfile_members(f: BinaryIO, end: int, path: str) -> Iterator[tuple[str, int, int]]:
    """The same as `_headers`, through the standard library's tarfile (slower; every header kind)."""
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as exc:
        raise ConfigError(f"tar shard {path}: not a readable tar file ({exc})") from None
    offset, last = 0, ""
    while True:
        try:
            info = tar.next()
        except tarfile.TarError as exc:
            if offset > end:
                raise ConfigError(f"tar shard {path} is truncated: member {last!r} needs bytes up to {offset}, "
                                  f"the file ends at {end}") from None
            raise ConfigError(f"tar shard {path} is damaged after offset {offset} ({exc})") from None
        if info is None:
            break
        tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header; a shard's million need not
        offset, last = info.offset_data + info.size, info.name
        if not info.isfile():
            continue
        if offset > end:
            raise ConfigError(f"tar shard {path} is truncated: member {info.name!r} needs bytes up to {offset}, "
                              f"the file ends at {end}")
        yield info.name, info.offset_data, info.size
    f.seek(tar.offset)
    _check_tail(f.read(), 0, end - tar.offset, path, base=tar.offset)


def _label(raw: bytes, ext: str, json_label: str | None, where: str) -> int:
    text = raw.decode("utf-8", "replace").strip()
    if ext == "json":
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(value, dict) or json_label not in value:
            raise ConfigError(f"{where}: has no field {json_label!r} (--json-label)")
        value = value[json_label]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: label {value!r} (field {json_label!r}) is not an integer")
        return value
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{where}: label {text[:80]!r} is not an integer") from None


def _check_tail(buf: Any, at: int, end: int, path: str, base: int = 0) -> None:
    """After the last member only zero blocks may follow: anything else is a header that could not be read."""
    while at < end:
        chunk = bytes(buf[at : min(end, at + _TAIL_CHUNK)])
        nonzero = len(chunk) - len(chunk.lstrip(b"\0"))
        if nonzero < len(chunk):
            raise ConfigError(f"tar shard {path} is truncated or damaged: an unreadable header at offset "
                              f"{base + at + nonzero} of {base + end} bytes")
        at += len(chunk)
