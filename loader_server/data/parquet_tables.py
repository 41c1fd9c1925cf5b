"""Parquet tables with an image column: ``--data 'train-*.parquet'`` (files, or a folder of them).

Defaults fit what Hugging Face ``datasets`` writes: ``--image-column image`` holds a struct of
``bytes`` and ``path`` (a plain binary column works too), ``--label-column label`` an integer,
and the class names come from the ``huggingface`` feature metadata of the schema where it has
them (a ``ClassLabel``).

Reads are row-group and page aware. pyarrow reads the schema and the label column; indexing
then reads the footer's row groups and walks the data pages of the image column once (their
Thrift headers, their definition levels, PLAIN or dictionary values) and notes where each row's
bytes are. A worker reading row r then reads:

* the row's bytes alone, with one ``pread``, where its page is stored uncompressed (images
  do not compress: write image columns with ``compression="none"``);
* in a snappy page (pyarrow's default), the piece of the page's snappy stream that decodes to
  the row and little more (`_snappy_pieces`), decompressed: about the row's own bytes, however
  large its page (a 100-row group of images is one dictionary page of megabytes);
* otherwise the one page that holds it, decompressed (zstd, gzip, brotli, lz4_raw) to exactly the
  size its header says (`packed.decompress_page`), then sliced: never a whole row group for one
  image. A process keeps the pages it decompressed, at most ``--page-cache-mb``
  (packed.PageCache), so reads in file order (``check``, ``cache build``) decompress each page once;
  a zstd, gzip or brotli page larger than that is read by its stream up to the row instead
  (`packed.PageStream`), never held whole.

Indexing walks a page's values from its stream too (`packed.PageStream`: a MiB at a time for gzip,
zstd and brotli, whose ratio is unbounded; snappy and lz4_raw pages whole, at most 22 and 256 times
their stored bytes), so a page costs what its stored bytes and the index's rows do, whatever size it
says or holds: a 16 KB zstd page holding 512 MB took an indexing process to a peak of 1,155 MB when
pages were decompressed whole, 112 MB read as a stream. The rows are bounded by the bytes: a row group
of more rows than its image column has bytes is refused before its labels are read (each index row
costs about 48 bytes), a dictionary of more entries than its row group's rows, and levels or
dictionary indices longer than their count can take, are damage. pyarrow reads the label column, and
decompresses each page to the size its header says: those headers are read here first, and a page
that says more than its integers can take is damaged (`_check_label_pages`).

A file without the named column, a label that is not an integer or is missing, a row without
image bytes, or an encoding this reader does not know is a ConfigError naming the file, the
column and the row. So is a damaged file: the Thrift reader here bounds nesting, fields and
every length by the bytes that hold it, and every size, count and offset a footer or a page
says by what encloses it (see "pages" below), before anything is allocated for it; a page whose
data decompresses to more or fewer bytes than its header says is damaged too.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from loader_client.contract.errors import ConfigError

from ..options import DataOptions
from .packed import PackedIndex, PageStream, Segment, expand_files, load_or_build, one_line, read_varint
from .remote import RemoteStorage, is_remote, storage_of

__all__ = ["index_table", "open_parquet_tables"]

# Parquet's page types and encodings (parquet.thrift).
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN, _PLAIN_DICTIONARY, _RLE_DICTIONARY = 0, 2, 8
#: Parquet codec names -> pyarrow's.
_CODECS = {"UNCOMPRESSED": "", "SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd",
           "LZ4_RAW": "lz4_raw"}
#: parquet.thrift's CompressionCodec values -> names.
_CODEC_NAMES = {0: "UNCOMPRESSED", 1: "SNAPPY", 2: "GZIP", 3: "LZO", 4: "BROTLI", 5: "LZ4", 6: "ZSTD", 7: "LZ4_RAW"}


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
                         storage=storage, page_cache_bytes=int(options.page_cache_mb * (1 << 20)))


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
    except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:
        raise ConfigError(f"{path}: not a readable Parquet file ({one_line(exc)})") from None
    with table:
        schema = table.schema_arrow
        leaf = _image_leaf(schema, image_column, path)
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
            size = os.fstat(f.fileno()).st_size if source is path else source.size
            label = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == label_column), None)
            chunks, *label_chunks = _footer_chunks(f, size, [(column, leaf)] + ([] if label is None else
                                                                                [(label, label_column)]), path)
            for g, chunk in enumerate(chunks):  # before the labels are read: pyarrow allocates what rows say
                where = f"{path}: row group {g} of column {image_column!r}"
                if not (chunk.start <= size and chunk.stored <= size - chunk.start):
                    raise ConfigError(f"{where}: its {chunk.stored} bytes at offset {chunk.start} lie outside the "
                                      f"file's {size} bytes (a damaged footer?)")
                if chunk.rows > max(chunk.stored, 1):  # an index row costs 48 bytes: at most 48 a byte of the file
                    raise ConfigError(f"{where}: its {chunk.rows} rows are held in {chunk.stored} bytes, under a byte "
                                      "a row: no table of images is (a damaged file, or one made to swell the index)")
            _label_type(schema, label_column, path)  # before its pages: a column of class names is said so
            if label_chunks:  # pyarrow decompresses a label page to the size its header says
                _check_label_pages(f, size, label_chunks[0], label_column, path)
            labels = _labels(table, label_column, path)
            if sum(c.rows for c in chunks) != len(labels):
                raise ConfigError(f"{path}: its row groups say {sum(c.rows for c in chunks)} rows, its label column "
                                  f"holds {len(labels)} (a damaged file?)")
            for g, chunk in enumerate(chunks):
                codec = _CODECS.get(chunk.codec)
                if codec is None:
                    raise ConfigError(f"{path}: row group {g} of column {image_column!r} is compressed with "
                                      f"{chunk.codec}, which this reader does not decompress; rewrite it "
                                      "with compression='none' (images do not compress) or 'snappy'")
                codec_name = codec_name or codec
                if codec and codec != codec_name:
                    raise ConfigError(f"{path}: column {image_column!r} mixes {codec_name} and {codec} row groups")
                where = f"{path}: row group {g} of column {image_column!r}"
                f.seek(chunk.start)
                raw = f.read(chunk.stored)
                parts.append(_walk_pages(raw, chunk.start, codec, max_def, chunk.rows, row0, where, path,
                                         chunk.unpacked))
                row0 += chunk.rows
    if not row0:
        raise ConfigError(f"Parquet file {path} holds no rows")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Segment(pos=cat["pos"], span=cat["span"], labels=labels, raw=cat["raw"], inner=cat["inner"],
                   length=cat["length"], codec=codec_name, class_names=names)


@dataclass(frozen=True)
class _Chunk:
    """One row group's rows, and where its image column chunk is (from the footer)."""

    rows: int
    codec: str  # Parquet's name (SNAPPY, ...), or "codec N" for a value it does not name
    start: int  # file offset of its first page
    stored: int  # its bytes in the file
    unpacked: int  # its bytes uncompressed, as the footer says


#: Integers of the footer (i64 in parquet.thrift; none of those read here may be negative).
_I64 = (1 << 63) - 1


def _footer_chunks(f: BinaryIO, size: int, columns: list[tuple[int, str]], path: str) -> list[list[_Chunk]]:
    """Each row group's rows and chunk of each of `columns` ((its index, its leaf's path)), read from the footer
    here with the bounded Thrift reader below. (pyarrow 26's accessors of column chunk metadata abort the
    process, uncatchably, on some damaged footers: an unknown codec value, a size histogram of the wrong
    length.)"""
    try:
        if size < 12:
            raise _Damaged(f"{size} bytes are too few for a Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or length > size - 12:
            raise _Damaged(f"its last 8 bytes say a footer of {length} bytes in {size}")
        f.seek(size - 8 - length)
        meta, _ = _struct(f.read(length), 0, 0)
        groups = meta.get(4, [])
        if not isinstance(groups, list):
            raise _Damaged("its row groups are not a list")
        return [[_chunk(group, column, [part.encode() for part in leaf.split(".")]) for group in groups]
                for column, leaf in columns]
    except _Damaged as exc:
        raise ConfigError(f"{path}: its footer is damaged: {exc}") from None
    except _Unsupported as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _chunk(group: Any, column: int, names: list[bytes]) -> _Chunk:
    """The image column chunk of one RowGroup struct (columns: field 1, num_rows: 3)."""
    columns = group.get(1) if isinstance(group, dict) else None
    if not isinstance(columns, list) or column >= len(columns) or not isinstance(columns[column], dict):
        raise _Damaged(f"a row group without column {column}")
    chunk = columns[column]
    if chunk.get(1):  # file_path
        raise _Unsupported(f"its column chunks lie in another file ({bytes(chunk[1])[:200]!r}), which this reader "
                           "does not read; write the table as one file")
    meta = _sub(chunk, 3)  # ColumnMetaData
    if meta.get(3) != names:
        raise _Damaged(f"its column {column} is {meta.get(3)!r}, not {names!r}")
    rows = _field(group, 3, -1, _I64, "row count")
    codec = _field(meta, 4, -1, _I64, "codec")
    unpacked = _field(meta, 6, -1, _I64, "uncompressed size")
    stored = _field(meta, 7, -1, _I64, "compressed size")
    start = _field(meta, 9, -1, _I64, "data page offset")
    dictionary = _field(meta, 11, 0, _I64, "dictionary page offset")
    if min(rows, codec, unpacked, stored, start) < 0:
        raise _Damaged("a column chunk without its row count, codec, sizes or offset")
    if dictionary:
        start = min(start, dictionary)
    return _Chunk(rows=rows, codec=_CODEC_NAMES.get(codec, f"codec {codec}"), start=start, stored=stored,
                  unpacked=unpacked)


#: What a label page may say it holds uncompressed, a value (an integer: at most 8 bytes, PLAIN or
#: DELTA_BINARY_PACKED, with its levels or a dictionary index) and a page.
_LABEL_BYTES_A_VALUE, _LABEL_PAGE_BYTES = 16, 1 << 10


def _check_label_pages(f: BinaryIO, size: int, chunks: list[_Chunk], column: str, path: str) -> None:
    """Each page header of the label column, read before pyarrow reads the column: pyarrow allocates the
    uncompressed size a page's header says (a 16 KB zstd page that says 512 MB took it to 640 MB). A page
    may say no more than its values can take (`_LABEL_BYTES_A_VALUE` each, and `_LABEL_PAGE_BYTES`), nor
    more values than its row group's rows, so the labels cost what the rows do."""
    for g, chunk in enumerate(chunks):
        where = f"{path}: row group {g} of label column {column!r}"
        if not (chunk.start <= size and chunk.stored <= size - chunk.start):
            raise ConfigError(f"{where}: its {chunk.stored} bytes at offset {chunk.start} lie outside the file's "
                              f"{size} bytes (a damaged footer?)")
        f.seek(chunk.start)
        raw = f.read(chunk.stored)
        at = seen = 0
        while seen < chunk.rows and at < len(raw):
            try:
                header, body = _page_header(raw, at)
                ptype, usize, csize = header.get(1), header.get(2), header.get(3)
                if not isinstance(usize, int) or not isinstance(csize, int) or not 0 <= csize <= len(raw) - body:
                    raise _Damaged("its header lacks its sizes, or says more bytes than its column chunk holds")
                sub = {_DICTIONARY_PAGE: 7, _DATA_PAGE: 5, _DATA_PAGE_V2: 8}.get(ptype if isinstance(ptype, int)
                                                                                  else -1)
                values = _field(_sub(header, sub), 1, 0, chunk.rows, "value count (its row group's rows)") if sub else 0
                if not 0 <= usize <= _LABEL_PAGE_BYTES + _LABEL_BYTES_A_VALUE * values:
                    raise _Damaged(f"its header says {usize} bytes uncompressed for {values} integers")
            except _Damaged as exc:
                raise ConfigError(f"{where}: the page at file offset {chunk.start + at} is damaged: {exc}") from None
            if ptype != _DICTIONARY_PAGE:
                seen += values
            at = body + csize


def _image_leaf(schema: Any, column: str, path: str) -> str:
    """The Parquet column path of the image bytes: ``image.bytes`` for a struct, ``image`` for binary."""
    import pyarrow as pa

    if column not in schema.names:
        raise ConfigError(f"{path} has no column {column!r} (--image-column); its columns: {_shown(schema.names)}")
    kind = schema.field(column).type
    if pa.types.is_struct(kind):
        child = next((kind.field(k) for k in range(kind.num_fields) if kind.field(k).name == "bytes"), None)
        if child is None or not (pa.types.is_binary(child.type) or pa.types.is_large_binary(child.type)):
            raise ConfigError(f"{path}: column {column!r} is {_shown([str(kind)])}; an image column is binary, or a "
                              "struct with a binary `bytes` field as Hugging Face datasets writes it")
        return f"{column}.bytes"
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column
    raise ConfigError(f"{path}: column {column!r} is {_shown([str(kind)])}, not image bytes (binary, or a struct of "
                      "bytes and path); name the image column with --image-column")


def _shown(names: list[str]) -> str:
    """Names a file gave, for a one-line message: as they are, or quoted where they hold a newline or such."""
    return ", ".join(n if n.isprintable() else repr(n) for n in names)


def _label_type(schema: Any, column: str, path: str) -> None:
    """A ConfigError unless the table has `column` and it holds integers (or a dictionary of them), read from
    the schema: before any page of it is read (a column of class names would otherwise be refused as a
    page too large for integers)."""
    import pyarrow as pa

    if column not in schema.names:
        raise ConfigError(f"{path} has no column {column!r} (--label-column); its columns: {_shown(schema.names)}")
    kind = schema.field(column).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not pa.types.is_integer(kind):
        raise ConfigError(f"{path}: label column {column!r} holds {_shown([str(kind)])}, not integers (class "
                          "names? write their indices, and the names as the huggingface ClassLabel metadata)")


def _labels(table: Any, column: str, path: str) -> np.ndarray:
    """The label column's integers (its type checked by `_label_type`)."""
    import pyarrow as pa

    try:
        values = table.read(columns=[column]).column(0)
    except MemoryError:  # before OSError: pyarrow's ArrowMemoryError is both
        raise ConfigError(f"{path}: its label column {column!r} does not fit in memory here (a damaged "
                          "file?)") from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: its label column {column!r} cannot be read ({one_line(exc)}; a damaged "
                          "file?)") from None
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
    except (ValueError, KeyError, TypeError, RecursionError):  # metadata only: a damaged one names no classes
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return tuple(names)
    return None


# ---------------------------------------------------------------------------- pages
#: Every size, count and offset read from a page is bounded by what holds it: a page's bytes by
#: what is left of its column chunk, its decompressed size by the chunk's own uncompressed size
#: (and Parquet's i32), its values by the rows the row group has left, a run of levels by the
#: values still wanted. A damaged or hostile file then costs at most what its own bytes say.
_MAX_PAGE = (1 << 31) - 1  # parquet.thrift: page sizes are i32
#: Thrift nesting (a list and its elements count one each): a PageHeader needs 3 (> DataPageHeader >
#: Statistics), a footer 8 (FileMetaData > row groups > RowGroup > columns > ColumnChunk > ColumnMetaData >
#: encoding stats > PageEncodingStats).
_MAX_DEPTH = 16
#: Fields in one Thrift struct: a PageHeader has 9, a ColumnMetaData 17.
_MAX_FIELDS = 64
_MAX_WIDTH = 32  # bit width of levels and dictionary indices


_Page = tuple[int, int, int, list[tuple[int, int]]]  # (file offset, bytes there, decompressed size or -1, values)


class _Damaged(Exception):
    """Something in a page that cannot be: said with the file, row group and offset where it is caught."""


class _Unsupported(Exception):
    """A page this reader does not read (an encoding it does not know): said with the file and row group."""


def _walk_pages(chunk: bytes, start: int, codec: str, max_def: int, rows: int, row0: int, where: str,
                path: str, unpacked: int) -> dict[str, np.ndarray]:
    """Where each of `rows` rows of one column chunk (read from file offset `start`; `unpacked`: its
    uncompressed size as the footer says) has its bytes."""
    pos = np.empty(rows, np.int64)
    span = np.empty(rows, np.int64)
    raw = np.full(rows, -1, np.int64)
    inner = np.zeros(rows, np.int64)
    length = np.empty(rows, np.int64)
    dictionary: _Page | None = None
    at, row = 0, 0
    while row < rows:
        if at >= len(chunk):
            raise ConfigError(f"{where}: the pages end after {row} of {rows} rows (a damaged file?)")
        try:
            at, page, count, present, dictionary = _page(chunk, at, start, codec, max_def, rows - row, unpacked,
                                                         rows, dictionary)
        except _Damaged as exc:
            raise ConfigError(f"{where}: the page at file offset {start + at} is damaged: {exc}") from None
        except _Unsupported as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except (IndexError, ValueError, OverflowError) as exc:  # a check missed above: still the file's fault
            raise ConfigError(f"{where}: the page at file offset {start + at} does not parse ({one_line(exc)}; "
                              "a damaged file?)") from None
        if page is None:
            continue
        base_at, base_span, base_raw, spots = page
        k = 0
        for j in range(count):
            if not present[j]:
                raise ConfigError(f"{path}:{row0 + row + j}: no image bytes in this row (null)")
            off, size = spots[k]
            k += 1
            r = row + j
            if base_raw < 0:  # stored as is: read exactly the value
                pos[r], span[r] = base_at + off, size
            else:
                pos[r], span[r], raw[r], inner[r] = base_at, base_span, base_raw, off
            length[r] = size
        row += count
    if codec == "snappy":
        _snappy_rows(chunk, start, pos, span, raw, inner, length, where)
    return {"pos": pos, "span": span, "raw": raw, "inner": inner, "length": length}


def _snappy_rows(chunk: bytes, start: int, pos: np.ndarray, span: np.ndarray, raw: np.ndarray, inner: np.ndarray,
                 length: np.ndarray, where: str) -> None:
    """Point each row of a snappy page at the piece of the page's tags that holds its bytes (in place).

    A row then costs the decompression of about its own bytes, not of its page (pyarrow writes
    a 100-row group of images as one dictionary page of megabytes): see `_snappy_pieces`."""
    paged = np.flatnonzero(raw >= 0)
    pages, which = np.unique(pos[paged], return_inverse=True)  # rows grouped by page: one pass, however many
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(len(pages) + 1))
    for k, page_at in enumerate(pages.tolist()):
        rows = paged[order[bounds[k] : bounds[k + 1]]]
        at = page_at - start
        stored = chunk[at : at + int(span[rows[0]])]
        try:
            piece_at, piece_span, piece_raw, piece_inner = _snappy_pieces(stored, int(raw[rows[0]]), inner[rows],
                                                                          length[rows])
        except _Damaged as exc:
            raise ConfigError(f"{where}: the page at file offset {page_at} is damaged: {exc}") from None
        pos[rows], span[rows], raw[rows], inner[rows] = page_at + piece_at, piece_span, piece_raw, piece_inner


def _snappy_pieces(stored: bytes, size: int, inner: np.ndarray,
                   length: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each value at ``[inner, inner + length)`` of a snappy page decompressed (`size` bytes, `stored`
    as written: the varint of its size, then its tags), the piece of tags that decodes to a stretch
    holding it: (its offset in `stored`, its bytes, the bytes it decodes to, the value's offset there).

    A piece starts at a *restart point*: a tag from which no later copy reaches back before it, so
    that the piece, behind the varint of its own size, is a snappy stream by itself (what
    `PackedIndex.read` decompresses). The snappy library compresses 64 KB blocks each on its own,
    so there is one at least every 64 KB; the page's first tag always is one. The piece ends with
    the tag that holds the value's last byte: a value costs its bytes and at most about 128 KB
    more, whatever its page's size."""
    starts, outs, sources = _snappy_tags(stored, size)
    tags = len(starts) - 1
    if tags == 0:  # an empty page: only empty values
        zero = np.zeros(len(inner), np.int64)
        return zero + len(stored), zero, zero, zero
    reach = np.minimum.accumulate(sources[::-1])[::-1]  # the earliest byte any tag from here on copies
    restart = np.maximum.accumulate(np.where(reach >= outs[:-1], np.arange(tags), 0))
    first = restart[np.clip(np.searchsorted(outs, inner, side="right") - 1, 0, tags - 1)]
    last = np.maximum(np.searchsorted(outs, inner + length, side="left"), first)
    return starts[first], starts[last] - starts[first], outs[last] - outs[first], inner - outs[first]


def _snappy_tags(stored: bytes, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tags of a snappy stream of `size` bytes decompressed: where each starts in `stored` and in the
    output (each with one more entry: the end), and the first output byte each reads (its own start for a
    literal, the source of a copy). Every length and offset is checked against the stream and `size`."""
    end = len(stored)
    said, at = _varint(stored, 0, min(end, 10))
    if said != size:
        raise _Damaged(f"its snappy data says {said} bytes, its header {size}")
    starts: list[int] = []
    outs: list[int] = []
    sources: list[int] = []
    out = 0
    while at < end:
        starts.append(at)
        outs.append(out)
        tag = stored[at]
        kind = tag & 3
        if kind == 0:  # a literal: its length (in the tag, or in 1 to 4 bytes after it), then its bytes
            n = tag >> 2
            if n >= 60:
                extra = n - 59
                if at + 1 + extra > end:
                    raise _Damaged("a snappy literal's length is cut short")
                n = int.from_bytes(stored[at + 1 : at + 1 + extra], "little")
                at += extra
            n += 1
            at += 1
            if n > end - at:
                raise _Damaged(f"a snappy literal of {n} bytes runs past its page")
            at += n
            sources.append(out)
        else:  # a copy of n bytes from `offset` bytes back
            wide = (0, 1, 2, 4)[kind]
            if at + 1 + wide > end:
                raise _Damaged("a snappy copy is cut short")
            if kind == 1:
                n, offset = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | stored[at + 1]
            else:
                n, offset = 1 + (tag >> 2), int.from_bytes(stored[at + 1 : at + 1 + wide], "little")
            at += 1 + wide
            if not 0 < offset <= out:
                raise _Damaged(f"a snappy copy from {offset} bytes back at byte {out}")
            sources.append(out - offset)
        out += n
        if out > size:
            raise _Damaged(f"its snappy data decodes to over its {size} bytes")
    if out != size:
        raise _Damaged(f"its snappy data decodes to {out} of its {size} bytes")
    starts.append(at)
    outs.append(out)
    return np.array(starts, np.int64), np.array(outs, np.int64), np.array(sources, np.int64)


def _page(chunk: bytes, at: int, start: int, codec: str, max_def: int, left: int, unpacked: int, rows: int,
          dictionary: _Page | None) -> tuple[int, _Page | None, int, list[bool], _Page | None]:
    """The page at chunk offset `at`: (where the next one starts, its values or None, its value count,
    which are present, the dictionary now). `left`: rows the row group has left of its `rows`.

    Its data is read as a stream (`_values`): a gzip, zstd or brotli page costs a piece of
    `packed.STREAM_CHUNK` bytes at a time, whatever size its header says, however much it holds."""
    header, body = _page_header(chunk, at)
    ptype, usize, csize = header.get(1), header.get(2), header.get(3)
    if not isinstance(ptype, int) or not isinstance(usize, int) or not isinstance(csize, int):
        raise _Damaged("its header lacks the page type or sizes")
    if not 0 <= csize <= len(chunk) - body:
        raise _Damaged(f"its header says {csize} bytes, {len(chunk) - body} are left of its column chunk")
    if not 0 <= usize <= min(_MAX_PAGE, unpacked):
        raise _Damaged(f"its header says {usize} bytes uncompressed, its column chunk holds {unpacked}")
    page_at = start + body
    data = memoryview(chunk)[body : body + csize]
    after = body + csize
    if ptype == _DICTIONARY_PAGE:
        stream = _values(data, usize, codec)
        size = _field(_sub(header, 7), 1, 0, min(stream.size // 4, rows), "dictionary size (its row group's rows)")
        entries = _plain_values(stream, size)
        _close(stream)
        return after, None, 0, [], (page_at, csize, usize if codec else -1, entries)
    if ptype not in (_DATA_PAGE, _DATA_PAGE_V2):
        return after, None, 0, [], dictionary  # index pages: nothing to read
    v2 = ptype == _DATA_PAGE_V2
    ph = _sub(header, 8 if v2 else 5)
    count = _field(ph, 1, 0, left, "value count (the row group's rows left)")
    encoding = _field(ph, 4 if v2 else 2, -1, 1 << 31, "encoding")
    if v2:  # levels stay uncompressed in front; the values may be compressed
        rep_len = _field(ph, 6, 0, csize, "repetition levels' size")
        def_len = _field(ph, 5, 0, csize - rep_len, "definition levels' size")
        levels = rep_len + def_len
        compressed = codec and ph.get(7, True) is not False
        if compressed and usize < levels:
            raise _Damaged(f"its levels take {levels} bytes of {usize} uncompressed")
        present = _levels(data, rep_len, levels, max_def, count) if max_def else [True] * count
        stream = _values(data[levels:], usize - levels, codec) if compressed else _values(data[levels:], 0, "")
        base, vspan, vraw = page_at + levels, csize - levels, (usize - levels) if compressed else -1
    else:
        stream = _values(data, usize, codec)
        present = [True] * count
        if max_def:
            if stream.size < 4:
                raise _Damaged("it ends before its definition levels")
            n = int.from_bytes(_read(stream, 4), "little")
            if n > stream.size - 4:
                raise _Damaged(f"its definition levels say {n} bytes, {stream.size - 4} are left")
            if n > _coded_bytes(count):
                raise _Damaged(f"its definition levels say {n} bytes for {count} values")
            present = _levels(_read(stream, n), 0, n, max_def, count)
        base, vspan, vraw = page_at, csize, usize if codec else -1
    nonnull = sum(present)
    if encoding == _PLAIN:
        spots = _plain_values(stream, nonnull)
        _close(stream)
        return after, (base, vspan, vraw, spots), count, present, dictionary
    if encoding in (_PLAIN_DICTIONARY, _RLE_DICTIONARY):
        if dictionary is None:
            raise _Damaged("dictionary-encoded values without their dictionary page")
        if stream.at >= stream.size:
            raise _Damaged("it ends before its dictionary indices")
        width = _read(stream, 1)[0]
        held = min(stream.size - stream.at, _coded_bytes(nonnull))  # what `nonnull` indices can take; the rest is read
        ids = _rle_hybrid(_read(stream, held), 0, held, width, nonnull)  # and dropped, to check the page's size
        _close(stream)
        entries = dictionary[3]
        if ids and max(ids) >= len(entries):
            raise _Damaged(f"a dictionary index {max(ids)} past the dictionary's {len(entries)} values")
        spots = [entries[k] for k in ids]
        return after, (dictionary[0], dictionary[1], dictionary[2], spots), count, present, dictionary
    raise _Unsupported(f"values encoded with Parquet encoding {encoding}, which this reader does not know; rewrite "
                       "the file with pyarrow's defaults (PLAIN or dictionary)")


def _sub(header: dict[int, Any], fid: int) -> dict[int, Any]:
    """The struct in field `fid` ({} where it is absent)."""
    value = header.get(fid, {})
    if not isinstance(value, dict):
        raise _Damaged(f"its header's field {fid} is not a struct")
    return value


def _field(fields: dict[int, Any], fid: int, default: int, high: int, what: str) -> int:
    """An integer field in ``[0, high]`` (or its default where it is absent)."""
    value = fields.get(fid, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Damaged(f"its {what} is not an integer")
    if value != default and not 0 <= value <= high:
        raise _Damaged(f"its {what} is {value}, outside 0..{high}")
    return value


def _values(data: memoryview, size: int, codec: str) -> PageStream:
    """A page's bytes as stored (no codec: `size` is ignored) or decompressed, as a stream that holds exactly
    the `size` its header says (already bounded), or the page is damaged (`packed.PageStream`)."""
    try:
        return PageStream(data, size if codec else len(data), codec)
    except MemoryError:
        raise _Damaged(f"its {size} bytes uncompressed do not fit in memory here") from None
    except ValueError as exc:  # it holds another length, or does not decompress
        raise _Damaged(str(exc)) from None


def _read(stream: PageStream, n: int) -> bytes:
    try:
        return stream.read(n)
    except ValueError as exc:
        raise _Damaged(str(exc)) from None


def _close(stream: PageStream) -> None:
    """The rest of the page read and dropped: it holds exactly its header's size, or it is damaged."""
    try:
        stream.close()
    except ValueError as exc:
        raise _Damaged(str(exc)) from None


def _coded_bytes(count: int) -> int:
    """The most bytes `count` levels or dictionary indices can take in the RLE / bit-packed hybrid: a run of
    one value each, a 10-byte varint and a 4-byte value (an encoder writes about width / 8 bytes a value)."""
    return 16 + 14 * count


def _plain_values(stream: PageStream, count: int) -> list[tuple[int, int]]:
    """(offset in the page, length) of the next `count` PLAIN byte-array values of `stream` (each a 4-byte
    length, then the bytes: read past, a piece at a time)."""
    end = stream.size
    if count * 4 > end - stream.at:
        raise _Damaged(f"{count} values cannot fit in its {end - stream.at} bytes")
    out = []
    try:
        for _ in range(count):
            size = int.from_bytes(stream.read(4), "little")
            at = stream.at
            if size > end - at:
                raise _Damaged(f"a value of {size} bytes runs past the page")
            out.append((at, size))
            stream.skip(size)
    except ValueError as exc:
        raise _Damaged(str(exc)) from None
    return out


def _levels(data: bytes | memoryview, at: int, end: int, max_def: int, count: int) -> list[bool]:
    levels = _rle_hybrid(data, at, end, max_def.bit_length(), count)
    return [lv == max_def for lv in levels]


def _rle_hybrid(buf: bytes | memoryview, at: int, end: int, width: int, count: int) -> list[int]:
    """`count` values of Parquet's RLE / bit-packed hybrid encoding at ``buf[at:end]``.

    A run says how many values it holds; only those still wanted are made (a run of 20 million
    for 4 values makes 4), and bit-packed groups are unpacked from their bytes, never beyond."""
    if width > _MAX_WIDTH:
        raise _Damaged(f"a bit width of {width} (at most {_MAX_WIDTH})")
    end = min(end, len(buf))
    out: list[int] = []
    step = (width + 7) // 8
    while len(out) < count:
        if at >= end:
            if width == 0:
                out.extend([0] * (count - len(out)))
                break
            raise _Damaged("its levels or dictionary indices end early")
        header, at = _varint(buf, at, end)
        wanted = count - len(out)
        if header & 1:  # bit-packed groups of 8
            nbytes = (header >> 1) * width
            if nbytes > end - at:
                raise _Damaged(f"a bit-packed run of {nbytes} bytes, {end - at} are left")
            take = min((header >> 1) * 8, wanted)
            out.extend(_unpack(buf[at : at + (take * width + 7) // 8], width, take))
            at += nbytes
        else:  # a run of one value
            if step > end - at:
                raise _Damaged("a run's value is cut short")
            value = int.from_bytes(buf[at : at + step], "little")
            at += step
            out.extend([value] * min(header >> 1, wanted))
    return out


def _unpack(packed: bytes | memoryview, width: int, count: int) -> list[int]:
    """`count` little-endian `width`-bit values packed in `packed`."""
    if width == 0:
        return [0] * count
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")[: count * width]
    values: list[int] = (bits.reshape(count, width).astype(np.int64) @ (1 << np.arange(width, dtype=np.int64))).tolist()
    return values


def _varint(buf: bytes | memoryview, at: int, end: int | None = None) -> tuple[int, int]:
    """An unsigned LEB128 varint of at most 64 bits (10 bytes) ending before `end` (`packed.read_varint`)."""
    try:
        return read_varint(buf, at, end)
    except ValueError as exc:
        raise _Damaged(str(exc)) from None


def _page_header(buf: bytes, at: int) -> tuple[dict[int, Any], int]:
    """A Thrift compact-protocol PageHeader at `at`: (its fields by id, where the page body starts)."""
    try:
        return _struct(buf, at, 0)
    except _Damaged as exc:
        raise _Damaged(f"its header does not parse ({exc})") from None


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _byte(buf: bytes, at: int) -> int:
    if at >= len(buf):
        raise _Damaged("cut short")
    return buf[at]


def _struct(buf: bytes, at: int, depth: int) -> tuple[dict[int, Any], int]:
    if depth >= _MAX_DEPTH:
        raise _Damaged(f"structs nested over {_MAX_DEPTH} deep")
    fields: dict[int, Any] = {}
    last = 0
    for _ in range(_MAX_FIELDS + 1):
        byte = _byte(buf, at)
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
        fields[fid], at = _value(buf, at, kind, depth)
    raise _Damaged(f"a struct of over {_MAX_FIELDS} fields")


def _value(buf: bytes, at: int, kind: int, depth: int, in_collection: bool = False) -> tuple[Any, int]:
    """One value of Thrift compact type `kind`; every value takes at least a byte (a boolean field
    carries its value in its type, a boolean in a list, set or map takes a byte of its own)."""
    if kind in (1, 2):
        if in_collection:
            return _byte(buf, at) == 1, at + 1
        return kind == 1, at
    if kind == 3:
        return _byte(buf, at), at + 1
    if kind in (4, 5, 6):
        raw, at = _varint(buf, at)
        return _zigzag(raw), at
    if kind == 7:
        if at + 8 > len(buf):
            raise _Damaged("a double cut short")
        return None, at + 8
    if kind == 8:
        size, at = _varint(buf, at)
        if size > len(buf) - at:
            raise _Damaged(f"a binary field of {size} bytes, {len(buf) - at} are left")
        return buf[at : at + size], at + size
    if kind in (9, 10, 11) and depth >= _MAX_DEPTH:
        raise _Damaged(f"collections nested over {_MAX_DEPTH} deep")
    if kind in (9, 10):  # list, set
        head = _byte(buf, at)
        at += 1
        size, elem = head >> 4, head & 0x0F
        if size == 15:
            size, at = _varint(buf, at)
        if size > len(buf) - at:  # each element takes a byte at least
            raise _Damaged(f"a list of {size} elements, {len(buf) - at} bytes are left")
        items = []
        for _ in range(size):
            item, at = _value(buf, at, elem, depth + 1, in_collection=True)
            items.append(item)
        return items, at
    if kind == 11:  # map
        size, at = _varint(buf, at)
        if size:
            if 2 * size > len(buf) - at - 1:
                raise _Damaged(f"a map of {size} entries, {len(buf) - at} bytes are left")
            types = _byte(buf, at)
            at += 1
            for _ in range(size):
                _, at = _value(buf, at, types >> 4, depth + 1, in_collection=True)
                _, at = _value(buf, at, types & 0x0F, depth + 1, in_collection=True)
        return None, at
    if kind == 12:
        return _struct(buf, at, depth + 1)
    raise _Damaged(f"an unknown Thrift type {kind}")
