"""Parquet tables with an image column: ``--data 'train-*.parquet'`` (files, or a folder of them).

Defaults fit what Hugging Face ``datasets`` writes: ``--image-column image`` holds a struct of
``bytes`` and ``path`` (a plain binary column works too), ``--label-column label`` an integer,
and the class names come from the ``huggingface`` feature metadata of the schema where it has
them (a ``ClassLabel``).

Reads are row-group and page aware. pyarrow reads the metadata, the schema and the label
column; indexing then walks the data pages of the image column once (their Thrift headers,
their definition levels, PLAIN or dictionary values) and notes where each row's bytes are. A
worker reading row r then reads:

* the row's bytes alone, with one ``pread``, where its page is stored uncompressed (images
  do not compress: write image columns with ``compression="none"``);
* otherwise the one page that holds it, decompressed by pyarrow (snappy, zstd, gzip, brotli,
  lz4_raw), then sliced: never a whole row group for one image. A process keeps its last few
  pages, so reads in file order (``check``, ``cache build``) decompress each page once.

A file without the named column, a label that is not an integer or is missing, a row without
image bytes, or an encoding this reader does not know is a ConfigError naming the file, the
column and the row.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np

from loader_client.contract.errors import ConfigError

from ..options import DataOptions
from .packed import PackedIndex, Segment, expand_files, load_or_build
from .remote import RemoteStorage, is_remote, storage_of

__all__ = ["index_table", "open_parquet_tables"]

# Parquet's page types and encodings (parquet.thrift).
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _PLAIN_DICTIONARY, _RLE_DICTIONARY = 0, 2, 8
#: Parquet codec names -> pyarrow's.
_CODECS = {"UNCOMPRESSED": "", "SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd",
           "LZ4_RAW": "lz4_raw"}


def open_parquet_tables(options: DataOptions) -> PackedIndex:
    """Open the tables ``options.data`` names, from their index (built on first use)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"Parquet tables are read with pyarrow, which cannot be imported here ({exc}): install "
                          "it with the `parquet` extra: `python3 -m pip install \".[server,parquet]\"` (or "
                          "`pip install pyarrow`)") from None
    storage = storage_of(options)
    files = expand_files(options.data, ".parquet", "Parquet file", storage)
    columns = (options.image_column, options.label_column)
    first = os.path.basename(files[0])
    source = f"Parquet tables {first}" + (f" .. {os.path.basename(files[-1])} ({len(files)} files)"
                                          if len(files) > 1 else "")
    return load_or_build(files, kind="Parquet tables", options={"image": columns[0], "label": columns[1]},
                         index_dir=options.index_dir,
                         index_file=lambda path: index_table(path, *columns, storage=storage), source=source,
                         storage=storage)


def index_table(path: str, image_column: str = "image", label_column: str = "label",
                storage: RemoteStorage | None = None) -> Segment:
    """Where each row's image bytes are in one Parquet file, and its label.

    An object (`storage` given) is read where it lies (`RemoteStorage.open`): its footer, its label
    column and the image column's chunks through range reads, never a local copy."""
    with contextlib.ExitStack() as stack:
        source: Any = path
        if storage is not None and is_remote(path):
            source = stack.enter_context(storage.open(path))
        return _index_table(path, source, image_column, label_column)


def _index_table(path: str, source: Any, image_column: str, label_column: str) -> Segment:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from None
    with table:
        schema = table.schema_arrow
        leaf = _image_leaf(schema, image_column, path)
        labels = _labels(table, schema, label_column, path)
        names = _class_names(schema, label_column)
        meta = table.metadata
        column = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == leaf), None)
        if column is None:  # pragma: no cover - the arrow schema had it
            raise ConfigError(f"{path}: no Parquet column {leaf!r}")
        desc = meta.schema.column(column)
        if desc.max_repetition_level != 0:
            raise ConfigError(f"{path}: column {image_column!r} is a list; it needs one image per row")
        max_def = desc.max_definition_level
        parts: list[dict[str, np.ndarray]] = []
        codec_name = ""
        row0 = 0
        with open(path, "rb") if source is path else contextlib.nullcontext(source) as f:
            for g in range(meta.num_row_groups):
                chunk = meta.row_group(g).column(column)
                codec = _CODECS.get(chunk.compression)
                if codec is None:
                    raise ConfigError(f"{path}: row group {g} of column {image_column!r} is compressed with "
                                      f"{chunk.compression}, which this reader does not decompress; rewrite it "
                                      "with compression='none' (images do not compress) or 'snappy'")
                codec_name = codec_name or codec
                if codec and codec != codec_name:
                    raise ConfigError(f"{path}: column {image_column!r} mixes {codec_name} and {codec} row groups")
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                    start = min(start, chunk.dictionary_page_offset)
                f.seek(start)
                raw = f.read(chunk.total_compressed_size)
                where = f"{path}: row group {g} of column {image_column!r}"
                rows = meta.row_group(g).num_rows
                parts.append(_walk_pages(raw, start, codec, max_def, rows, row0, where, path))
                row0 += rows
    if row0 != len(labels):  # pragma: no cover - pyarrow counts the same rows
        raise ConfigError(f"{path}: {row0} rows of images against {len(labels)} labels")
    if not row0:
        raise ConfigError(f"Parquet file {path} holds no rows")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Segment(pos=cat["pos"], span=cat["span"], labels=labels, raw=cat["raw"], inner=cat["inner"],
                   length=cat["length"], codec=codec_name, class_names=names)


def _image_leaf(schema: Any, column: str, path: str) -> str:
    """The Parquet column path of the image bytes: ``image.bytes`` for a struct, ``image`` for binary."""
    import pyarrow as pa

    if column not in schema.names:
        raise ConfigError(f"{path} has no column {column!r} (--image-column); its columns: {', '.join(schema.names)}")
    kind = schema.field(column).type
    if pa.types.is_struct(kind):
        child = next((kind.field(k) for k in range(kind.num_fields) if kind.field(k).name == "bytes"), None)
        if child is None or not (pa.types.is_binary(child.type) or pa.types.is_large_binary(child.type)):
            raise ConfigError(f"{path}: column {column!r} is {kind}; an image column is binary, or a struct with a "
                              "binary `bytes` field as Hugging Face datasets writes it")
        return f"{column}.bytes"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column
    raise ConfigError(f"{path}: column {column!r} is {kind}, not image bytes (binary, or a struct of bytes and path); "
                      "name the image column with --image-column")


def _labels(table: Any, schema: Any, column: str, path: str) -> np.ndarray:
    import pyarrow as pa

    if column not in schema.names:
        raise ConfigError(f"{path} has no column {column!r} (--label-column); its columns: {', '.join(schema.names)}")
    values = table.read(columns=[column]).column(0)
    kind = values.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not pa.types.is_integer(kind):
        first = values[0].as_py() if len(values) else None
        raise ConfigError(f"{path}: label column {column!r} holds {kind} (row 0: {first!r}), not integers")
    if values.null_count:
        row = int(np.flatnonzero(np.asarray(values.is_null()))[0])
        raise ConfigError(f"{path}:{row}: the label ({column!r}) is missing")
    return np.asarray(values.cast(pa.int64())).astype(np.int64)


def _class_names(schema: Any, column: str) -> tuple[str, ...] | None:
    """A ClassLabel's names from the ``huggingface`` schema metadata, where the table has them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


# ---------------------------------------------------------------------------- pages
def _walk_pages(chunk: bytes, start: int, codec: str, max_def: int, rows: int, row0: int, where: str,
                path: str) -> dict[str, np.ndarray]:
    """Where each of `rows` rows of one column chunk (read from file offset `start`) has its bytes."""
    import pyarrow as pa

    pos = np.empty(rows, np.int64)
    span = np.empty(rows, np.int64)
    raw = np.full(rows, -1, np.int64)
    inner = np.zeros(rows, np.int64)
    length = np.empty(rows, np.int64)
    dictionary: tuple[int, int, int, list[tuple[int, int]]] | None = None  # (pos, span, raw or -1, entries)
    at, row = 0, 0
    while row < rows:
        if at >= len(chunk):
            raise ConfigError(f"{where}: the pages end after {row} of {rows} rows (a damaged file?)")
        header, body = _page_header(chunk, at, where)
        ptype, usize, csize = header.get(1), header.get(2), header.get(3)
        if not isinstance(ptype, int) or not isinstance(usize, int) or not isinstance(csize, int):
            raise ConfigError(f"{where}: a page header without its type or sizes (a damaged file?)")
        page_at = start + body
        data = chunk[body : body + csize]
        at = body + csize
        if ptype == _DICTIONARY_PAGE:
            plain = pa.decompress(data, usize, codec).to_pybytes() if codec else data
            dh = header.get(7) or {}
            entries = _plain_values(plain, 0, int(dh.get(1, 0)), where)
            dictionary = (page_at, csize, usize if codec else -1, entries)
            continue
        if ptype not in (_DATA_PAGE, _DATA_PAGE_V2):
            continue  # index pages: nothing to read
        v2 = ptype == _DATA_PAGE_V2
        ph = header.get(8 if v2 else 5) or {}
        count, encoding = int(ph.get(1, 0)), int(ph.get(4 if v2 else 2, -1))
        if v2:  # levels stay uncompressed in front; the values may be compressed
            rep_len, def_len = int(ph.get(6, 0)), int(ph.get(5, 0))
            levels = rep_len + def_len
            compressed = codec and ph.get(7, True) is not False
            values_at = page_at + levels
            values = pa.decompress(data[levels:], usize - levels, codec).to_pybytes() if compressed else data[levels:]
            present = _levels(data, rep_len, def_len, max_def, count, where) if max_def else [True] * count
            base, vspan, vraw = values_at, csize - levels, (usize - levels) if compressed else -1
            offset = 0
        else:
            body_bytes = pa.decompress(data, usize, codec).to_pybytes() if codec else data
            offset = 0
            present = [True] * count
            if max_def:
                n = int.from_bytes(body_bytes[0:4], "little")
                bits = max_def.bit_length()
                present = [lv == max_def for lv in _rle_hybrid(body_bytes, 4, 4 + n, bits, count, where)]
                offset = 4 + n
            values, base, vspan, vraw = body_bytes, page_at, csize, usize if codec else -1
        nonnull = sum(present)
        if encoding == _PLAIN:
            spots = _plain_values(values, offset, nonnull, where)
            page = (base, vspan, vraw, spots)
        elif encoding in (_PLAIN_DICTIONARY, _RLE_DICTIONARY):
            if dictionary is None:
                raise ConfigError(f"{where}: a dictionary-encoded page without its dictionary page")
            width = values[offset]
            ids = _rle_hybrid(values, offset + 1, len(values), width, nonnull, where)
            entries = dictionary[3]
            try:
                spots = [entries[k] for k in ids]
            except IndexError:
                raise ConfigError(f"{where}: a dictionary index past the dictionary (a damaged file?)") from None
            page = (dictionary[0], dictionary[1], dictionary[2], spots)
        else:
            raise ConfigError(f"{where}: values encoded with Parquet encoding {encoding}, which this reader does not "
                              "know; rewrite the file with pyarrow's defaults (PLAIN or dictionary)")
        if row + count > rows:
            raise ConfigError(f"{where}: pages hold more values than the row group's {rows} rows")
        k = 0
        for j in range(count):
            if not present[j]:
                raise ConfigError(f"{path}:{row0 + row + j}: no image bytes in this row (null)")
            off, size = spots[k]
            k += 1
            r = row + j
            base_at, base_span, base_raw = page[0], page[1], page[2]
            if base_raw < 0:  # stored as is: read exactly the value
                pos[r], span[r] = base_at + off, size
            else:
                pos[r], span[r], raw[r], inner[r] = base_at, base_span, base_raw, off
            length[r] = size
        row += count
    return {"pos": pos, "span": span, "raw": raw, "inner": inner, "length": length}


def _plain_values(buf: bytes, at: int, count: int, where: str) -> list[tuple[int, int]]:
    """(offset, length) of `count` PLAIN byte-array values from `at` (each a 4-byte length, then the bytes)."""
    out = []
    end = len(buf)
    for _ in range(count):
        if at + 4 > end:
            raise ConfigError(f"{where}: a page ends inside its values (a damaged file?)")
        size = int.from_bytes(buf[at : at + 4], "little")
        if at + 4 + size > end:
            raise ConfigError(f"{where}: a value runs past its page (a damaged file?)")
        out.append((at + 4, size))
        at += 4 + size
    return out


def _levels(data: bytes, rep_len: int, def_len: int, max_def: int, count: int, where: str) -> list[bool]:
    levels = _rle_hybrid(data, rep_len, rep_len + def_len, max_def.bit_length(), count, where)
    return [lv == max_def for lv in levels]


def _rle_hybrid(buf: bytes, at: int, end: int, width: int, count: int, where: str) -> list[int]:
    """`count` values of Parquet's RLE / bit-packed hybrid encoding at ``buf[at:end]``."""
    out: list[int] = []
    mask = (1 << width) - 1
    step = (width + 7) // 8
    while len(out) < count:
        if at >= end:
            if width == 0:
                out.extend([0] * (count - len(out)))
                break
            raise ConfigError(f"{where}: levels or dictionary indices end early (a damaged file?)")
        header, at = _varint(buf, at)
        if header & 1:  # bit-packed groups of 8
            groups = header >> 1
            nbytes = groups * width
            bits = int.from_bytes(buf[at : at + nbytes], "little")
            at += nbytes
            out.extend((bits >> (k * width)) & mask for k in range(groups * 8))
        else:  # a run of one value
            value = int.from_bytes(buf[at : at + step], "little")
            at += step
            out.extend([value] * (header >> 1))
    return out[:count]


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(buf):
            raise ConfigError("a Parquet varint runs past its data (a damaged file?)")
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7


def _page_header(buf: bytes, at: int, where: str) -> tuple[dict[int, Any], int]:
    """A Thrift compact-protocol PageHeader at `at`: (its fields by id, where the page body starts)."""
    try:
        return _struct(buf, at)
    except (IndexError, ConfigError) as exc:
        reason = exc or "cut short"
        raise ConfigError(f"{where}: a page header does not parse at chunk offset {at} ({reason})") from None


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _struct(buf: bytes, at: int) -> tuple[dict[int, Any], int]:
    fields: dict[int, Any] = {}
    last = 0
    while True:
        byte = buf[at]
        at += 1
        if byte == 0:
            return fields, at
        delta, kind = byte >> 4, byte & 0x0F
        if delta:
            fid = last + delta
        else:
            raw, at = _varint(buf, at)
            fid = _zigzag(raw)
        last = fid
        fields[fid], at = _value(buf, at, kind)


def _value(buf: bytes, at: int, kind: int) -> tuple[Any, int]:
    if kind in (1, 2):  # booleans carry their value in the type
        return kind == 1, at
    if kind == 3:
        return buf[at], at + 1
    if kind in (4, 5, 6):
        raw, at = _varint(buf, at)
        return _zigzag(raw), at
    if kind == 7:
        return None, at + 8
    if kind == 8:
        size, at = _varint(buf, at)
        return buf[at : at + size], at + size
    if kind in (9, 10):  # list, set
        head = buf[at]
        at += 1
        size, elem = head >> 4, head & 0x0F
        if size == 15:
            size, at = _varint(buf, at)
        items = []
        for _ in range(size):
            if elem in (1, 2):  # booleans in a list are one byte each
                items.append(buf[at] == 1)
                at += 1
            else:
                item, at = _value(buf, at, elem)
                items.append(item)
        return items, at
    if kind == 11:  # map
        size, at = _varint(buf, at)
        if size:
            types = buf[at]
            at += 1
            for _ in range(size):
                _, at = _value(buf, at, types >> 4)
                _, at = _value(buf, at, types & 0x0F)
        return None, at
    if kind == 12:
        return _struct(buf, at)
    raise ConfigError(f"unknown Thrift type {kind}")
