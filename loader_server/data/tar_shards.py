"""Tar shards in the WebDataset layout: ``--data 'shards/train-{000000..000099}.tar'``.

A sample is the group of members that share a key: the member's path up to the first dot of
its file name (``a/b/000123.jpg`` and ``a/b/000123.cls`` are sample ``a/b/000123``). Its image
is the ``.jpg``, ``.jpeg``, ``.png`` or ``.webp`` member; its label the integer text of the
``.cls`` member, or with ``--json-label FIELD`` that field of the ``.json`` member. Other
members (captions, ...) are ignored. Samples are numbered in shard order, then in the order of
their first member in the shard.

Indexing reads the tar headers (and the small label members) once; packed.py keeps the index
and serves every sample as one range read of its image member. A shard that is cut short, a
header that does not parse, a sample without its image or its label, or a label that is not an
integer is a ConfigError naming the shard and the member.
"""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np

from loader_client.errors import ConfigError

from ..options import DataOptions
from .packed import PackedIndex, Segment, expand_files, load_or_build

__all__ = ["open_tar_shards", "index_shard", "IMAGE_MEMBERS"]

#: Member extensions that hold a sample's image.
IMAGE_MEMBERS = frozenset({"jpg", "jpeg", "png", "webp"})
_BLOCK = 512
_TAIL_CHUNK = 1 << 20


def open_tar_shards(options: DataOptions) -> PackedIndex:
    """Open the shards ``options.data`` names, from their index (built on first use)."""
    files = expand_files(options.data, ".tar", "tar shard")
    json_label = options.json_label
    first = os.path.basename(files[0])
    source = f"tar shards {first}" + (f" .. {os.path.basename(files[-1])} ({len(files)} shards)" if len(files) > 1
                                      else "")
    return load_or_build(files, kind="tar shards", options={"json_label": json_label}, index_dir=options.index_dir,
                         index_file=lambda path: index_shard(path, json_label), source=source)


def index_shard(path: str, json_label: str | None = None) -> Segment:
    """The samples of one shard: each image member's offset and size, and the label beside it."""
    keys: dict[str, list[object]] = {}  # key -> [image name, offset, size, label, label member]
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
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
            folder, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            ext = ext.lower()
            entry = keys.setdefault(key, [None, 0, 0, None, None])
            if ext in IMAGE_MEMBERS:
                if entry[0] is not None:
                    raise ConfigError(f"tar shard {path}: sample {key!r} has two images ({entry[0]!r} and "
                                      f"{info.name!r}); keep one image per sample")
                entry[0], entry[1], entry[2] = info.name, info.offset_data, info.size
            elif (ext == "cls" and json_label is None) or (ext == "json" and json_label is not None):
                f.seek(info.offset_data)
                entry[3], entry[4] = _label(f.read(info.size), ext, json_label, f"{path}:{info.name}"), info.name
        _check_tail(f, tar.offset, end, path)
    n = len(keys)
    pos = np.empty(n, np.int64)
    span = np.empty(n, np.int64)
    labels = np.empty(n, np.int64)
    names: list[bytes] = []
    want = f".json field {json_label!r}" if json_label else ".cls member"
    for k, (key, (name, off, size, label, _)) in enumerate(keys.items()):
        if name is None:
            raise ConfigError(f"tar shard {path}: sample {key!r} has no image member "
                              f"({', '.join('.' + e for e in sorted(IMAGE_MEMBERS))})")
        if label is None:
            raise ConfigError(f"tar shard {path}: member {name!r} has no label: its sample {key!r} lacks a {want}"
                              + ("" if json_label else " (or name a field of its .json with --json-label)"))
        pos[k], span[k], labels[k] = int(off), int(size), int(label)  # type: ignore[call-overload]
        names.append(str(name).encode("utf-8", "surrogateescape"))
    if not n:
        raise ConfigError(f"tar shard {path} holds no samples")
    blob, offsets = Segment.blob(names)
    return Segment(pos=pos, span=span, labels=labels, names_blob=blob, names_offsets=offsets)


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


def _check_tail(f: object, offset: int, end: int, path: str) -> None:
    """After the last member only zero blocks may follow: anything else is a header tarfile could not read."""
    import io

    assert isinstance(f, io.BufferedReader)
    f.seek(offset)
    at = offset
    while at < end:
        chunk = f.read(min(_TAIL_CHUNK, end - at))
        if not chunk:
            break
        nonzero = len(chunk) - len(chunk.lstrip(b"\0"))
        if nonzero < len(chunk):
            raise ConfigError(f"tar shard {path} is truncated or damaged: an unreadable header at offset "
                              f"{at + nonzero} of {end} bytes")
        at += len(chunk)
