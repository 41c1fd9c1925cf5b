"""Damaged tar shards, Parquet tables and member indexes (issue 23, "bad input is answered").

Every integer a container file holds and the reader uses as a size, an offset or a count is
bounded by what holds it, so a damaged or hostile file is answered with the project's errors:
a ConfigError naming the file and the offset, member or row group when it is indexed (exit
code 2 and one line from the command), a DecodeError (a bad sample under ``--on-error``) when a
member read at serve time is bad. Never a traceback, and never memory that the file's own bytes
do not justify. The cases an audit reproduced are explicit tests; the rest is a bounded fuzz
of byte flips and truncations of a small valid shard, table and index, fresh and kept.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader_client.contract.errors import ConfigError
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.data.packed import PageStream, _brace_expand, decompress_page
from loader_server.data.parquet_tables import _page_header, _rle_hybrid, index_table
from loader_server.data.reading import DecodeError
from loader_server.data.tar_shards import index_shard

ROOT = Path(__file__).resolve().parent.parent
ROWS = 6
#: What one example of the fuzz may allocate (Python, numpy and pyarrow alike): the files are a few KB.
FUZZ_PEAK_BYTES = 32 << 20


def _jpegs(n: int = ROWS) -> list[bytes]:
    rng = np.random.default_rng(23)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img[:2, :2] = i
        ok, buf = cv2.imencode(".jpg", img)
        assert ok
        out.append(buf.tobytes())
    return out


def _tar_bytes(images: list[bytes], fmt: int = tarfile.PAX_FORMAT, *, folder: str = "",
               global_pax: dict[str, str] | None = None) -> bytes:
    """A WebDataset shard of `images`, labels 0.. (pax headers on the images in the pax format; `folder`: the
    members in it, its own entry first; `global_pax`: a global pax header first)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_pax) as tar:
        if folder:
            entry = tarfile.TarInfo(folder)
            entry.type = tarfile.DIRTYPE
            tar.addfile(entry)
        for i, data in enumerate(images):
            for name, blob in ((f"s{i}.jpg", data), (f"s{i}.cls", str(i).encode())):
                info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
                info.size = len(blob)
                if fmt == tarfile.PAX_FORMAT and name.endswith(".jpg") and not global_pax:
                    info.pax_headers = {"comment": f"sample {i}"}
                tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _shard(path: Path, images: list[bytes], fmt: int = tarfile.PAX_FORMAT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tar_bytes(images, fmt))
    return path


def _table(path: Path, images: list[bytes], **options: Any) -> Path:
    """A Parquet table as Hugging Face datasets writes it (image struct, label), row groups of 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": pa.array([{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(images)],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": list(range(len(images)))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=3, **options)
    return path


def _cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True, check=False,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=ROOT)


def _one_line_error(data: Path, *fragments: str) -> str:
    """`serve --print-config` (which indexes) on `data`: exit code 2 and one line naming it and `fragments`."""
    done = _cli("serve", "--data", str(data), "--print-config")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("loader-server: error: ") and str(data) in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------- Thrift, by hand
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _compact(fields: dict[int, Any]) -> bytes:
    """A Thrift compact-protocol struct of i32/i64 (int), binary (bytes) and struct (dict) fields, ids ascending."""
    out, last = bytearray(), 0
    for fid in sorted(fields):
        value = fields[fid]
        kind = 12 if isinstance(value, dict) else 8 if isinstance(value, bytes) else 6
        out.append(((fid - last) << 4) | kind)
        last = fid
        if kind == 12:
            out += _compact(value)
        elif kind == 8:
            out += _varint(len(value)) + value
        else:
            out += _varint((value << 1) ^ (value >> 63))
    return bytes(out) + b"\0"


def _padded(fields: dict[int, Any], length: int) -> bytes:
    """`fields` (a data page header) encoded in exactly `length` bytes: statistics carry the padding."""
    for pad in range(length):
        inner = {**fields[5], 5: {1: b"p" * pad}}
        raw = _compact({**fields, 5: inner})
        if len(raw) == length:
            return raw
    raise AssertionError(f"cannot encode {fields} in {length} bytes")


def _pages(path: Path, group: int = 0) -> list[tuple[int, int, dict[int, Any]]]:
    """(file offset, header length, header fields) of each page of the image column in one row group."""
    import pyarrow.parquet as pq

    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = min(o for o in (chunk.data_page_offset, chunk.dictionary_page_offset) if o)
    raw = path.read_bytes()[start : start + chunk.total_compressed_size]
    out, at = [], 0
    while at < len(raw):
        header, body = _page_header(raw, at)
        out.append((start + at, body - at, header))
        at = body + header[3]
    return out


def _patch(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


# ---------------------------------------------------------------------------- the cases an audit reproduced
def test_a_page_header_of_deeply_nested_structs_is_a_one_line_error(tmp_path: Path) -> None:
    """It was a RecursionError traceback (rc 1) from the Thrift reader."""
    path = _table(tmp_path / "t" / "nested.parquet", _jpegs(), compression="none", use_dictionary=False)
    at, length, _ = _pages(path)[0]
    _patch(path, at, b"\x1c" * 1500)  # field 1, a struct: field 1, a struct: ...
    line = _one_line_error(path, "row group 0 of column 'image'", f"the page at file offset {at} is damaged",
                           "nested over 16 deep")
    assert "Traceback" not in line
    with pytest.raises(ConfigError, match="structs nested over 16 deep"):
        index_table(str(path))


def test_an_oversized_page_size_is_a_one_line_error_not_an_allocation(tmp_path: Path) -> None:
    """pyarrow.decompress was handed the size a header says (a MemoryError, or what it allocates)."""
    path = _table(tmp_path / "t" / "huge.parquet", _jpegs(), compression="snappy", use_dictionary=False)
    at, length, header = _pages(path)[0]
    _patch(path, at, _padded({**header, 2: 1 << 40}, length))
    _one_line_error(path, "row group 0 of column 'image'", f"the page at file offset {at} is damaged",
                    f"its header says {1 << 40} bytes uncompressed")
    path = _table(tmp_path / "t2" / "past.parquet", _jpegs(), compression="snappy", use_dictionary=False)
    at, length, header = _pages(path, 1)[0]  # a page whose stored size runs past its column chunk
    _patch(path, at, _padded({**header, 3: header[3] + 10}, length))
    with pytest.raises(ConfigError, match=f"row group 1 of column 'image': the page at file offset {at} is damaged: "
                                          "its header says .* bytes, .* are left of its column chunk"):
        index_table(str(path))


def _long_run(path: Path, run: int) -> None:
    """Rewrite the first page of an uncompressed table: its definition levels one run of `run` values (the
    page holds 3), the same bytes in all (its header gives up what the longer run takes)."""
    at, length, header = _pages(path)[0]
    raw = path.read_bytes()
    body = raw[at + length : at + length + header[3]]
    n = int.from_bytes(body[:4], "little")
    levels = _varint(run << 1) + bytes([2])  # a run of the level 2 (image.bytes present)
    grown = len(levels) - n
    new_body = len(levels).to_bytes(4, "little") + levels + body[4 + n :]
    new_header = _padded({**header, 2: header[2] + grown, 3: header[3] + grown}, length - grown)
    _patch(path, at, new_header + new_body)


def test_a_run_of_levels_longer_than_its_page_costs_only_the_values_wanted(tmp_path: Path) -> None:
    """A run of 20 million levels for a page of 3 allocated the 20 million (320 MB): a 5-byte varint
    could take the server's memory. The run is cut to the values wanted, and the rows read."""
    images = _jpegs()
    path = _table(tmp_path / "t" / "run.parquet", images, compression="none", use_dictionary=False)
    _long_run(path, 20_000_000)
    tracemalloc.start()
    try:
        segment = index_table(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    ds = load_dataset(ServerConfig(data=str(path), index_dir=str(tmp_path / "index")))
    assert len(segment) == ROWS and [ds.read(i) for i in range(ROWS)] == images  # type: ignore[attr-defined]


#: Runs its arguments and prints their exit code and peak resident KB (wait4). A child's peak counts what it held
#: before its exec too, a copy of its parent's pages: this small process's, not the test process's (hundreds of
#: MB late in a whole suite, which hid the peak under test).
_PEAK_OF = ("import os, subprocess, sys\n"
            "with subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL) as p:\n"
            "    _, status, usage = os.wait4(p.pid, 0)\n"
            "    p.returncode = os.waitstatus_to_exitcode(status)\n"
            "print(p.returncode, usage.ru_maxrss)\n")


def _maxrss_kb(*args: str) -> tuple[int, int, str]:
    """(exit code, peak resident KB, stderr) of `loader-server ARGS` (its own peak, not its children's, nor the
    test process's: `_PEAK_OF`)."""
    done = subprocess.run([sys.executable, "-c", _PEAK_OF, sys.executable, "-m", "loader_server", *args],
                          capture_output=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=300)
    rc, rss = (int(word) for word in done.stdout.split())
    return rc, rss, done.stderr.decode(errors="replace")


def test_a_five_byte_run_length_does_not_swell_the_command(tmp_path: Path) -> None:
    """The audit's worst case: a run of 2**28 levels (5 bytes) was 2 GiB of Python ints. `check` indexes and
    reads the table in its own process: its peak stays that of the same table undamaged."""
    images = _jpegs()
    good = _table(tmp_path / "good" / "t.parquet", images, compression="none", use_dictionary=False)
    bad = _table(tmp_path / "bad" / "t.parquet", images, compression="none", use_dictionary=False)
    _long_run(bad, 1 << 28)
    report = str(tmp_path / "bad-files.tsv")
    rc_good, rss_good, err = _maxrss_kb("check", "--data", str(good), "--workers", "1", "--report", report)
    assert rc_good == 0, err
    rc_bad, rss_bad, err = _maxrss_kb("check", "--data", str(bad), "--workers", "1", "--report", report)
    assert rc_bad == 0, err
    assert rss_bad < rss_good + 64 * 1024, (rss_good, rss_bad)  # KB: was about 2 GiB more


def test_rle_runs_and_bit_packed_groups_make_only_the_values_wanted() -> None:
    tracemalloc.start()
    try:
        assert _rle_hybrid(_varint(1 << 40) + b"\x02", 0, 16, 2, 4) == [2, 2, 2, 2]  # a run of 2**40
        wide = _varint(((1 << 20) << 1) | 1)  # 2**20 bit-packed groups of 8, in 4 bytes
        with pytest.raises(Exception, match="a bit-packed run of 1048576 bytes, 1 are left"):
            _rle_hybrid(wide + b"\xff", 0, len(wide) + 1, 1, 4)
        assert _rle_hybrid(_varint((2 << 1) | 1) + bytes([0b10110001, 0b11]), 0, 3, 1, 10) == \
            [1, 0, 0, 0, 1, 1, 0, 1, 1, 1]  # two groups of 8 one-bit values, 10 wanted
        assert _rle_hybrid(_varint((1 << 40 << 1) | 1), 0, 6, 0, 5) == [0] * 5  # width 0: no bytes, values wanted
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


@pytest.mark.parametrize(("record", "wrong"), [
    (b"1x comment=sample 0\n", "a record without its length at byte 0"),  # was int(): a ValueError traceback
    (b"99 comment=sample 0\n", "a record of length 99 at byte 0, in a header of"),  # past the pax header
    (b"20comment=sample 0\n", "a record without its length at byte 0"),  # no space: was buf.index's ValueError
    (b"0 comment=sample 0\n", "a record of length 0 at byte 0"),
    (b"20 comment sample 0\n", "a record without `key=` at byte 0"),
    (b"19 comment=sample 0\n", "does not end in a newline"),
    (b"15 size=-00002\n", "a size that is not a number"),  # a negative size walked the shard backwards
    (b"15 size=0x7fff\n", "a size that is not a number"),
])
def test_a_bad_pax_record_is_a_one_line_error_naming_the_shard_and_offset(tmp_path: Path, record: bytes,
                                                                        wrong: str) -> None:
    shard = _shard(tmp_path / "s" / "x.tar", _jpegs())
    raw = bytearray(shard.read_bytes())
    start = raw.index(b"20 comment=sample 0\n")
    assert len(record) <= 20 and raw[start + 20] == 0
    raw[start : start + 20] = record.ljust(20, b"\0")
    shard.write_bytes(bytes(raw))
    _one_line_error(shard, "is damaged: the pax header", "at offset 1024" if b"size" in record else "at offset 0",
                    wrong)


def _rewrite(raw: bytearray, at: int, field: slice, value: bytes) -> None:
    """Set a field of the tar header at `at`, and its checksum right again."""
    raw[at + field.start : at + field.stop] = value.ljust(field.stop - field.start, b"\0")
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


def test_bad_sizes_in_tar_headers_are_one_line_errors(tmp_path: Path) -> None:
    images = _jpegs()
    shard = _shard(tmp_path / "a" / "x.tar", images, fmt=tarfile.GNU_FORMAT)
    rewrite = _rewrite
    raw = bytearray(shard.read_bytes())
    rewrite(raw, 0, slice(124, 136), b"+0001")  # int(..., 8) took a sign; the checksum is right
    damaged = tmp_path / "b" / "x.tar"
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(raw))
    _one_line_error(damaged, "the header at offset 0 has a size that is not a number")
    raw = bytearray(shard.read_bytes())
    rewrite(raw, 0, slice(156, 157), b"L")  # a GNU long name of 777 GB
    rewrite(raw, 0, slice(124, 136), b"77777777777")
    damaged.write_bytes(bytes(raw))
    _one_line_error(damaged, "is truncated: the header at offset 0 needs bytes up to")


def test_a_folder_with_a_size_has_no_data_as_tarfile_reads_it(tmp_path: Path) -> None:
    """A folder's (or link's) size field is no data size: the walker skipped that many bytes, and lost members."""
    raw = bytearray(_tar_bytes(_jpegs(), tarfile.USTAR_FORMAT, folder="d"))
    _rewrite(raw, 0, slice(124, 136), b"%011o" % 4096)
    shard = tmp_path / "f" / "x.tar"
    shard.parent.mkdir()
    shard.write_bytes(bytes(raw))
    with tarfile.open(shard) as tar:
        assert tar.getmembers()[0].size == 4096 and sum(m.isfile() for m in tar.getmembers()) == 2 * ROWS
    segment = index_shard(str(shard))
    assert len(segment) == ROWS and segment.labels.tolist() == list(range(ROWS))


@pytest.mark.parametrize(("label", "wrong"), [
    (b"99999999999999999999999", "does not fit in 64 bits"),  # was an OverflowError into the int64 labels
    (b"[" * 100_000, "JSON nested too deep"),  # json.loads' RecursionError
])
def test_labels_that_do_not_fit_are_one_line_errors(tmp_path: Path, label: bytes, wrong: str) -> None:
    images = _jpegs(2)
    ext = "json" if label.startswith(b"[") else "cls"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in (("a.jpg", images[0]), (f"a.{ext}", label)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    shard = tmp_path / "l" / "x.tar"
    shard.parent.mkdir()
    shard.write_bytes(buf.getvalue())
    done = _cli("serve", "--data", str(shard), "--print-config", *(["--json-label", "y"] if ext == "json" else []))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and f"{shard}:a.{ext}: " in lines[0] and wrong in lines[0], \
        done.stderr[-2000:]


def test_thrift_collections_cost_what_their_bytes_hold() -> None:
    """A map of booleans took no byte per entry: 2**60 entries looped for ever. Lists and maps are bounded by
    the bytes left, nesting by depth, structs by field count."""
    cases = {
        "a map of": bytes([0x1B]) + _varint(1 << 60) + bytes([0x11]) + b"\0" * 8,  # map<bool,bool>, 2**60 entries
        "a list of": bytes([0x19, 0xF1]) + _varint(1 << 60) + b"\0" * 8,
        "collections nested over": bytes([0x19]) + bytes([0x19]) * 50 + b"\0" * 8,  # list<list<list<...>>>
        "a struct of over 64 fields": bytes([0x15, 0x00]) * 100 + b"\0",
        "a varint longer than 10 bytes": bytes([0x15]) + b"\xff" * 20,
        "a binary field of": bytes([0x18]) + _varint(1 << 40) + b"x",
    }
    for wrong, raw in cases.items():
        with pytest.raises(Exception, match=wrong) as info:
            _page_header(raw, 0)
        assert type(info.value).__name__ == "_Damaged", info.value


def test_a_damaged_index_file_is_built_again_not_trusted(tmp_path: Path) -> None:
    """The kept index is a file too: its arrays' sizes, offsets and counts are checked before use."""
    images = _jpegs()
    shard = _shard(tmp_path / "s" / "x.tar", images)
    index_dir = tmp_path / "index"
    first = load_dataset(ServerConfig(data=str(shard), index_dir=str(index_dir)))
    (kept,) = index_dir.glob("*.npz")
    pristine = kept.read_bytes()
    with np.load(kept) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["span"] = arrays["span"].copy()
    arrays["span"][2] = 1 << 40  # consistent (the zip's CRCs are right), and out of the file
    with open(kept, "wb") as f:
        np.savez(f, **arrays)
    again = load_dataset(ServerConfig(data=str(shard), index_dir=str(index_dir)))
    assert again.fingerprint() == first.fingerprint() and again.read(2) == images[2]  # type: ignore[attr-defined]
    with np.load(kept) as z:
        assert z["span"][2] == len(images[2])  # indexed again, and kept again
    with zipfile.ZipFile(kept, "w") as z:  # a header that says 10**11 rows, CRCs right: np.load allocated them
        for name, arr in arrays.items():
            out = io.BytesIO()
            if name == "pos":
                np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False,
                                                           "shape": (10**11,)})
                out.write(arr.tobytes())
            else:
                np.lib.format.write_array(out, arr)
            z.writestr(f"{name}.npy", out.getvalue())
    third = load_dataset(ServerConfig(data=str(shard), index_dir=str(index_dir)))
    assert third.fingerprint() == first.fingerprint() and pristine


def test_a_page_damaged_under_a_kept_index_is_a_bad_sample_at_read_time(tmp_path: Path) -> None:
    """The index is trusted while the file keeps its size, mtime and inode: a page damaged in place is then found
    when a worker reads it, and is a bad sample (`check` lists it; `serve --on-error skip` replaces it)."""
    path = _table(tmp_path / "t" / "x.parquet", _jpegs(), compression="snappy", use_dictionary=False)
    report = tmp_path / "bad.tsv"
    first = _cli("check", "--data", str(path), "--workers", "1", "--report", str(report))
    assert first.returncode == 0, first.stdout + first.stderr
    at, length, header = _pages(path)[0]
    before = os.stat(path)
    _patch(path, at + length, b"\xff" * header[3])  # the compressed values of rows 0-2
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    again = _cli("check", "--data", str(path), "--workers", "1", "--report", str(report))
    assert again.returncode == 1 and "3 bad" in again.stdout, again.stdout + again.stderr
    lines = report.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [f"{path}:{row}" for row in range(3)], lines
    assert all("snappy page does not decompress" in line for line in lines), lines


#: Parquet codecs whose pages are decompressed whole, as pyarrow's write_table names them ("lz4": LZ4_RAW).
WHOLE_PAGE_CODECS = ["gzip", "brotli", "lz4", "zstd"]


@pytest.mark.parametrize("claim", [+1, -1], ids=["more", "fewer"])
@pytest.mark.parametrize("codec", [*WHOLE_PAGE_CODECS, "snappy"])
def test_a_page_header_that_says_another_size_than_its_data_holds_is_refused(tmp_path: Path, codec: str,
                                                                             claim: int) -> None:
    """pyarrow 26's one-shot decompress pads gzip, brotli and lz4_raw data that holds fewer bytes than asked
    for with whatever the memory held: a header that claims more than its page holds was indexed, and its
    garbage served as image bytes. Each page now decompresses to exactly its header's size, or the file is
    refused, naming it, its row group and page (a snappy page: by the size its stream says)."""
    path = _table(tmp_path / "t" / f"{codec}.parquet", _jpegs(), compression=codec, use_dictionary=False)
    at, length, header = _pages(path, 1)[0]
    said = header[2] + claim
    _patch(path, at, _padded({**header, 2: said}, length))
    with pytest.raises(ConfigError) as info:
        load_dataset(ServerConfig(data=str(path), index_dir=str(tmp_path / "index")))
    message = str(info.value)
    assert message.startswith(f"{path}: row group 1 of column 'image': the page at file offset {at} is damaged: "
                              f"its {'lz4_raw' if codec == 'lz4' else codec} page does not decompress to the "
                              f"{said} bytes its header says ("), message
    if codec in ("gzip", "brotli"):  # they say what the page holds; lz4 and zstd say their data is corrupt
        assert ("it holds more" if claim < 0 else f"it holds {header[2]}") in message, message
    elif codec == "lz4" and claim > 0:
        assert "it holds fewer" in message, message
    elif codec == "snappy":
        assert f"its snappy stream says {header[2]}" in message, message


def test_a_gzip_page_of_several_members_reads_as_pyarrow_reads_it() -> None:
    """Parquet's GZIP is RFC 1952, where a gzip file is a series of members; pyarrow's reader (and parquet-mr's
    GZIPInputStream) read every member. A page of two members was refused ('21 bytes follow its stream'). What
    follows the last member that is not a member, a size other than the members' together, stay refused."""
    import gzip

    import pyarrow as pa

    first, second = os.urandom(3000) + b"a" * 5000, b"tail" * 7
    page = gzip.compress(first) + gzip.compress(second) + gzip.compress(b"")
    said = len(first) + len(second)
    assert pa.decompress(page, said, "gzip").to_pybytes() == first + second
    assert decompress_page(page, said, "gzip").to_pybytes() == first + second
    for size, data, why in [(said - 1, page, "it holds more"), (said + 1, page, f"it holds {said}"),
                            (said, page + b"\0", "Truncated compressed stream"),  # (pyarrow's words)
                            (said, gzip.compress(first) + b"\0", "1 bytes follow its stream"),
                            (said, page[:-1], "Truncated compressed stream")]:
        with pytest.raises(ValueError, match=f"its gzip page does not decompress to the {size} bytes its header says "
                                             f"\\({why}"):
            decompress_page(data, size, "gzip")


def test_a_page_that_holds_fewer_bytes_is_a_one_line_error(tmp_path: Path) -> None:
    path = _table(tmp_path / "t" / "gzip.parquet", _jpegs(), compression="gzip", use_dictionary=False)
    at, length, header = _pages(path)[0]
    _patch(path, at, _padded({**header, 2: header[2] + 2}, length))
    _one_line_error(path, "row group 0 of column 'image'", f"page at file offset {at} is damaged",
                    f"its gzip page does not decompress to the {header[2] + 2} bytes its header says "
                    f"(it holds {header[2]})")


@pytest.mark.parametrize("codec", [*WHOLE_PAGE_CODECS, "snappy"])
def test_a_page_read_at_serve_time_is_exactly_its_size_or_a_bad_sample(tmp_path: Path, codec: str) -> None:
    """At serve time a page (a snappy piece) is decompressed to the size the kept index says: an index that
    says 4 bytes more than the page holds (its rows' lengths too, so a padded page would hand out 4 bytes of
    heap) makes each of its rows a bad sample, never bytes the file does not hold."""
    images = _jpegs()
    path = _table(tmp_path / "t" / f"{codec}.parquet", images, compression=codec, use_dictionary=False)
    index_dir = tmp_path / "index"
    good = load_dataset(ServerConfig(data=str(path), index_dir=str(index_dir)))
    assert [good.read(i) for i in range(ROWS)] == images  # type: ignore[attr-defined]
    (kept,) = index_dir.glob("*.npz")
    with np.load(kept) as z:
        arrays = {k: z[k].copy() for k in z.files}
    assert (arrays["raw"] >= 0).all()
    first = arrays["pos"] == arrays["pos"][0]  # the rows of the first page (of its first piece: snappy)
    arrays["raw"][first] += 4
    arrays["length"][first] += 4
    with open(kept, "wb") as f:
        np.savez(f, **arrays)
    ds = load_dataset(ServerConfig(data=str(path), index_dir=str(index_dir)))
    assert (ds.raw == arrays["raw"]).all()  # type: ignore[attr-defined]  # the index was kept, not rebuilt
    name = "lz4_raw" if codec == "lz4" else codec
    for i in range(ROWS):
        if not first[i]:
            assert ds.read(i) == images[i]  # type: ignore[attr-defined]
            continue
        with pytest.raises(DecodeError) as info:
            ds.read(i)  # type: ignore[attr-defined]
        assert info.value.path == f"{path}:{i}" and info.value.code == "undecodable"
        assert info.value.reason.startswith(f"its {name} page does not decompress to the {int(arrays['raw'][i])} "
                                            "bytes its header says ("), info.value.reason


def _bad_codec(path: Path) -> None:
    """Set the image column chunk's codec in the footer to 24, a value Parquet does not name."""
    raw = bytearray(path.read_bytes())
    marker = b"\x05image\x05bytes\x15\x02"  # path_in_schema, then codec: SNAPPY (1, zigzag 2)
    at = raw.index(marker) + len(marker) - 1  # the first row group's
    raw[at] = 24 << 1
    path.write_bytes(bytes(raw))


def test_a_footer_that_aborts_pyarrow_is_a_one_line_error(tmp_path: Path) -> None:
    """pyarrow 26's ColumnChunkMetaData.compression aborts the process (an uncaught C++ exception: exit code
    134, no message) on a codec value it does not know; the footer is read here instead."""
    path = _table(tmp_path / "t" / "codec.parquet", _jpegs(), compression="snappy")
    _bad_codec(path)
    _one_line_error(path, "row group 0 of column 'image' is compressed with codec 24, which this reader does not "
                          "decompress")


def damaged_examples(root: Path) -> list[tuple[str, bytes, str]]:
    """(name, bytes, what its error says) of damaged shards and tables: the audit's cases and the footer above,
    and a global pax header of 8 GB (left to tarfile)."""
    images = _jpegs()
    out = []
    nested = _table(root / "nested.parquet", images, compression="none", use_dictionary=False)
    _patch(nested, _pages(nested)[0][0], b"\x1c" * 1500)
    out.append(("nested.parquet", nested.read_bytes(), "structs nested over 16 deep"))
    huge = _table(root / "huge.parquet", images, compression="snappy", use_dictionary=False)
    at, length, header = _pages(huge)[0]
    _patch(huge, at, _padded({**header, 2: 1 << 40}, length))
    out.append(("huge.parquet", huge.read_bytes(), f"its header says {1 << 40} bytes uncompressed"))
    codec = _table(root / "codec.parquet", images, compression="snappy")
    _bad_codec(codec)
    out.append(("codec.parquet", codec.read_bytes(), "is compressed with codec 24"))
    pax = bytearray(_shard(root / "pax.tar", images).read_bytes())
    start = pax.index(b"20 comment=sample 0\n")
    pax[start : start + 20] = b"1x comment=sample 0\n"
    out.append(("pax.tar", bytes(pax), "the pax header at offset 0 has a record without its length"))
    glob = bytearray(_tar_bytes(images, global_pax={"comment": "all"}))
    assert glob[156:157] == b"g"
    _rewrite(glob, 0, slice(124, 136), b"77777777777")
    out.append(("global.tar", bytes(glob), "not a readable tar file"))
    return out


def test_damaged_examples_are_one_line_errors_and_cost_their_bytes(tmp_path: Path) -> None:
    for name, raw, wrong in damaged_examples(tmp_path / "made"):
        path = tmp_path / name.split(".")[0] / name
        path.parent.mkdir()
        path.write_bytes(raw)
        tracemalloc.start()
        try:
            with pytest.raises(ConfigError) as info:
                load_dataset(ServerConfig(data=str(path), index_dir=str(tmp_path / "index")))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        message = str(info.value)
        assert str(path) in message and wrong in message and "\n" not in message, message
        assert peak < 16 << 20, (name, peak)


def test_a_brace_range_of_ten_billion_files_is_an_error_before_it_is_a_list() -> None:
    tracemalloc.start()
    try:
        for data in ("s-{0..9999999999}.tar", "s-{0..9999}-{0..9999}.tar", "{a,b}/s-{0..99}-{0..99}-{0..999}.tar"):
            with pytest.raises(ConfigError, match="names over 10,000,000 files .its brace ranges multiply"):
                _brace_expand(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # counted, not made
    assert len(_brace_expand("s-{0..999}-{0..99}.tar")) == 100_000
    with pytest.raises(ConfigError, match="over 64 braces"):
        _brace_expand("{a,b}" * 65)


# ---------------------------------------------------------------------------- the fuzz
@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small valid containers of every layout the readers take apart."""
    root = tmp_path_factory.mktemp("pristine")
    images = _jpegs()
    made = {
        "tar-pax": _shard(root / "pax.tar", images),
        "tar-gnu": _shard(root / "gnu.tar", images, fmt=tarfile.GNU_FORMAT),
        "parquet-snappy-dictionary": _table(root / "a.parquet", images, compression="snappy"),
        "parquet-plain": _table(root / "b.parquet", images, compression="none", use_dictionary=False),
        "parquet-v2-zstd": _table(root / "c.parquet", images, compression="zstd", use_dictionary=False,
                                  data_page_version="2.0", data_page_size=1500),
        "parquet-gzip": _table(root / "d.parquet", images, compression="gzip", use_dictionary=False),
    }
    return made


_POOLS: list[Any] = []  # the pool that keeps pyarrow's peak: alive as long as buffers it gave may be


@contextlib.contextmanager
def _bounded_memory() -> Iterator[list[int]]:
    """Yields [peak bytes Python and numpy allocated, peak bytes pyarrow allocated] (set on leaving): numpy and
    Python objects traced, pyarrow's allocations through a pool that keeps its peak (one for the process: a
    buffer it gave may outlive this block; its peak is then that of every fuzzed case so far). An address
    space limit in this process is no help: a library that fails an allocation under it may crash later, far
    away; and the MemoryError the audit saw is caught, but must never be what bounds a size: `_check_peaks`."""
    import pyarrow as pa

    if not _POOLS:
        _POOLS.append(pa.proxy_memory_pool(pa.default_memory_pool()))
    before = pa.default_memory_pool()
    peaks = [0, 0]
    pa.set_memory_pool(_POOLS[0])
    tracemalloc.start()
    try:
        yield peaks
    finally:
        peaks[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        pa.set_memory_pool(before)
        peaks[1] = _POOLS[0].max_memory()


def _damage(data: bytes, mutations: list[tuple[str, int, int]], cut: int | None = None) -> bytes:
    """Bytes flipped or set (and where a byte of a tar header is set, its checksum made right again, so that
    the walker reads what the header says), then the file cut at `cut` (of its length, in 1/1000)."""
    raw = bytearray(data)
    for how, where, value in mutations:
        at = where % len(raw)
        raw[at] = raw[at] ^ (value or 1) if how == "flip" else value
        block = at - at % 512
        if how == "set-in-tar-header" and raw[block + 257 : block + 262] == b"ustar":
            raw[block + 148 : block + 156] = b" " * 8
            raw[block + 148 : block + 156] = b"%06o\0 " % sum(raw[block : block + 512])
    return bytes(raw if cut is None else raw[: len(raw) * cut // 1000])


_mutations = st.lists(st.tuples(st.sampled_from(["flip", "set", "set-in-tar-header"]), st.integers(0, 1 << 20),
                                st.sampled_from([0, 1, 0x0A, 0x20, 0x30, 0x7F, 0x80, 0xFF])), min_size=1, max_size=4)
#: LOADER_FUZZ_EXAMPLES=5000 for a longer hunt; the default keeps both fuzz tests to a few seconds here.
_fuzz = settings(max_examples=int(os.environ.get("LOADER_FUZZ_EXAMPLES", "600")), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_KINDS = ["tar-pax", "tar-gnu", "parquet-snappy-dictionary", "parquet-plain", "parquet-v2-zstd", "parquet-gzip"]


def _read_all(ds: Any) -> None:
    for i in range(len(ds)):
        try:
            ds.read(i)
        except DecodeError:
            pass  # a bad sample, said and named: --on-error decides


def _only_project_errors(data: Path, index_dir: Path) -> str:
    """Index `data` (or reuse its kept index) and read every sample: "ok", or the ConfigError's message."""
    try:
        ds = load_dataset(ServerConfig(data=str(data), index_dir=str(index_dir)))
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and str(data) in message, message
        return message
    _read_all(ds)
    return "ok"


def _check_peaks(peaks: list[int], outcome: str) -> None:
    assert peaks[0] < FUZZ_PEAK_BYTES and peaks[1] < FUZZ_PEAK_BYTES, (peaks, outcome)
    assert "memory" not in outcome, outcome  # bounds stop a size before anything is allocated for it


def _case(root: Path, kind: str, data: bytes) -> Path:
    path = root / f"case-{os.urandom(6).hex()}" / ("x.tar" if kind.startswith("tar") else "x.parquet")
    path.parent.mkdir()
    path.write_bytes(data)
    return path


@_fuzz
@given(kind=st.sampled_from(_KINDS), mutations=_mutations, cut=st.none() | st.none() | st.none() | st.integers(0, 999))
def test_damaged_containers_indexed_afresh_give_only_project_errors(pristine: dict[str, Path], tmp_path: Path,
                                                                    kind: str, mutations: list[tuple[str, int, int]],
                                                                    cut: int | None) -> None:
    path = _case(tmp_path, kind, _damage(pristine[kind].read_bytes(), mutations, cut))
    with _bounded_memory() as peaks:
        outcome = _only_project_errors(path, path.parent / "index")
    _check_peaks(peaks, outcome)


@_fuzz
@given(kind=st.sampled_from(_KINDS), mutations=_mutations, damage_index=st.booleans())
def test_damaged_containers_or_indexes_kept_give_only_project_errors(pristine: dict[str, Path], tmp_path: Path,
                                                                     kind: str, mutations: list[tuple[str, int, int]],
                                                                     damage_index: bool) -> None:
    """The index is kept from the undamaged file. Then either the file is damaged in place with its size, mtime
    and inode kept (the index is trusted: reads of its members are bad samples, never anything else), or the
    index file is (it is read again or rebuilt, and gives the same samples)."""
    path = _case(tmp_path, kind, pristine[kind].read_bytes())
    index_dir = path.parent / "index"
    reference = load_dataset(ServerConfig(data=str(path), index_dir=str(index_dir)))
    (kept,) = index_dir.glob("*.npz")
    target = kept if damage_index else path
    before = os.stat(target)
    damaged = _damage(target.read_bytes(), mutations)
    with open(target, "r+b") as f:
        f.write(damaged)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    with _bounded_memory() as peaks:
        ds = load_dataset(ServerConfig(data=str(path), index_dir=str(index_dir)))
        _read_all(ds)
    _check_peaks(peaks, "ok")
    assert ds.fingerprint() == reference.fingerprint()  # a damaged index is rebuilt; a kept one names the same
    if damage_index:
        assert [ds.read(i) for i in range(len(ds))] == [reference.read(i) for i in range(len(ds))]  # type: ignore


# ---------------------------------------------------------------------------- compression bombs
#: Codecs whose pages are read as a stream (packed.STREAMED), as write_table names them, and what a bomb page of
#: each claims: gzip's 1032:1 needs 250 KB of stored bytes for 256 MB, zstd and brotli 8 KB and 1 KB for 512 MB.
BOMB_CLAIMS = {"zstd": 512 << 20, "brotli": 512 << 20, "gzip": 256 << 20}
#: What a bomb may add to a process's peak over the same table undamaged (KB): far below any claim.
BOMB_SLACK_KB = 64 << 10


def _compressed(codec: str, head: bytes, zeros: int) -> bytes:
    """`head` then `zeros` zero bytes, compressed with `codec` a MiB at a time (never all in memory)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, codec) as out:
        out.write(head)
        block = bytes(1 << 20)
        for k in range(0, zeros, len(block)):
            out.write(block[: min(len(block), zeros - k)])
    return bytes(sink.getvalue())


def _footer_unpacked(path: Path, more: int, column: bytes = b"\x05image\x05bytes") -> None:
    """Raise a column chunk's total_uncompressed_size (ColumnMetaData field 6) in the footer by `more` (a page
    header's size is bounded by it), the footer's length after it made right. `column`: the end of its
    path_in_schema as the footer spells it (``\\x19\\x18\\x05label``: a list of one string, not the schema's name)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[-8:-4], "little")
    body, footer = raw[: -8 - n], bytearray(raw[-8 - n : -8])
    at = footer.index(column) + len(column)
    for _ in range(3):  # codec, num_values, total_uncompressed_size: each a 1-byte field header, then a varint
        assert footer[at] >> 4 == 1 and footer[at] & 0x0F in (5, 6), footer[at : at + 4]
        start = at = at + 1
        while footer[at] & 0x80:
            at += 1
        at += 1
    value = 0
    for k, b in enumerate(footer[start:at]):
        value |= (b & 0x7F) << (7 * k)
    footer[start:at] = _varint(((value >> 1) + more) << 1)  # zigzag
    path.write_bytes(body + bytes(footer) + len(footer).to_bytes(4, "little") + b"PAR1")


def _bomb(path: Path, codec: str, claim: int, images: list[bytes], *, holds: bool = True) -> int:
    """A table of 3 rows whose one data page (V1, PLAIN) says `claim` bytes uncompressed, in a few KB: the 3
    images, then zeros up to `claim` where it `holds` them (a valid page: the values need not fill it), or
    nothing more (a damaged one). Written by pyarrow with incompressible filler, then its page rewritten in
    place (what follows the new page in the chunk is never read: the row group's rows are all in it) and its
    footer's uncompressed size raised. Returns the page's file offset."""
    rng = np.random.default_rng(29)
    filler = [rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() for _ in images]
    _table(path, filler, compression=codec, use_dictionary=False)  # one row group: 3 rows
    (at, length, header), = _pages(path)
    levels = _varint(len(images) << 1) + bytes([2])  # one run of the level 2: image.bytes present
    head = len(levels).to_bytes(4, "little") + levels + b"".join(len(b).to_bytes(4, "little") + b for b in images)
    data = _compressed(codec, head, claim - len(head) if holds else 0)
    new = _compact({**header, 2: claim, 3: len(data)})
    assert len(new) + len(data) <= length + header[3], (len(data), header[3])
    _patch(path, at, new + data)
    _footer_unpacked(path, claim)
    return at


@pytest.mark.parametrize("codec", sorted(BOMB_CLAIMS))
def test_a_page_that_decompresses_to_hundreds_of_megabytes_costs_a_piece_at_a_time(tmp_path: Path,
                                                                                   codec: str) -> None:
    """The outsider's case: a page of a few KB that says (and holds) 512 MB uncompressed took the indexing
    process from 63 MB to 1,090 MB (zstd: the page decompressed whole, then copied); every process of the
    indexing pool can meet one. Its values are now walked from a stream a piece at a time, the page's size
    still checked to the byte, and a worker reads a row of it (a page over --page-cache-mb) by a stream too:
    `serve` (which indexes) and `check` (which reads every row) stay within a few MB of the same table
    undamaged, and the rows are the images the page holds."""
    images = _jpegs(3)
    claim = BOMB_CLAIMS[codec]
    good = _table(tmp_path / "good" / "t.parquet", images, compression=codec, use_dictionary=False)
    bad = tmp_path / "bad" / "t.parquet"
    _bomb(bad, codec, claim, images)
    assert bad.stat().st_size < 400_000
    peaks = {}
    for name, path in (("good", good), ("bad", bad)):
        for command in ("serve", "check"):
            args = (["serve", "--print-config", "--batch-size", "1"] if command == "serve" else
                    ["check", "--workers", "1", "--report", str(tmp_path / f"{name}.tsv")])
            rc, peaks[name, command], err = _maxrss_kb(*args, "--data", str(path), "--index-dir",
                                                       str(tmp_path / f"index-{name}"))
            assert rc == 0, err[-3000:]
    for command in ("serve", "check"):
        assert peaks["bad", command] < peaks["good", command] + BOMB_SLACK_KB, peaks  # was +1 GB (zstd, serve)
    ds = load_dataset(ServerConfig(data=str(bad), index_dir=str(tmp_path / "index-bad")))
    assert [ds.read(i) for i in range(3)] == images  # type: ignore[attr-defined]
    assert (ds.raw == claim).all()  # type: ignore[attr-defined]  # the page, read by its stream


@pytest.mark.parametrize("codec", sorted(BOMB_CLAIMS))
def test_a_page_that_claims_hundreds_of_megabytes_it_does_not_hold_is_a_cheap_one_line_error(
        tmp_path: Path, codec: str) -> None:
    """A page of a few KB whose header says 512 MB: the old reader allocated the claim before it found the data
    short. Its stream now ends early, said in one line naming the file, row group and page, at a peak the same
    as the table undamaged."""
    images = _jpegs(3)
    claim = BOMB_CLAIMS[codec]
    good = _table(tmp_path / "good" / "t.parquet", images, compression=codec, use_dictionary=False)
    bad = tmp_path / "bad" / "t.parquet"
    at = _bomb(bad, codec, claim, images, holds=False)
    held = 4 + 2 + sum(4 + len(b) for b in images)
    _one_line_error(bad, "row group 0 of column 'image'", f"the page at file offset {at} is damaged",
                    f"its {codec} page does not decompress to the {claim} bytes its header says (it holds {held})")
    rc_good, rss_good, err = _maxrss_kb("serve", "--print-config", "--batch-size", "1", "--data", str(good),
                                        "--index-dir", str(tmp_path / "index"))
    assert rc_good == 0, err
    rc_bad, rss_bad, err = _maxrss_kb("serve", "--print-config", "--data", str(bad), "--index-dir",
                                      str(tmp_path / "index"))
    assert rc_bad == 2 and f"it holds {held}" in err, err
    assert rss_bad < rss_good + BOMB_SLACK_KB, (rss_good, rss_bad)


@pytest.mark.parametrize("dictionary", [False, True], ids=["plain", "dictionary"])
def test_a_small_file_of_a_million_empty_rows_is_refused_before_it_is_indexed(tmp_path: Path,
                                                                              dictionary: bool) -> None:
    """A million empty values compress to a few KB (zstd; as dictionary indices, to a few bytes): the index
    and the label column cost about 50 bytes a row whatever the file's size, so a 40 KB file cost 620 MB and
    10 s to index (5 million rows). A row group of more rows than its image column has bytes holds no images:
    it is refused, in one line, before its labels are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t" / "empty.parquet"
    path.parent.mkdir()
    rows = 1 << 20
    pq.write_table(pa.table({"image": pa.array([b""] * rows, pa.binary()), "label": pa.array([0] * rows)}), path,
                   compression="zstd", use_dictionary=dictionary)
    line = _one_line_error(path, "row group 0 of column 'image'", f"its {rows} rows are held in ")
    assert "under a byte a row" in line, line
    rc, rss, err = _maxrss_kb("serve", "--print-config", "--data", str(path))
    assert rc == 2 and rss < 400 << 10, (rss, err)  # KB; the index of a million rows alone is 48 MB


def test_a_dictionary_page_of_more_entries_than_rows_is_damaged(tmp_path: Path) -> None:
    """A dictionary page's entry count is bounded by its row group's rows (a column chunk's dictionary holds
    the values it uses), not only by its bytes: an entry costs a Python tuple of the index being built."""
    path = _table(tmp_path / "t" / "dict.parquet", _jpegs(), compression="none")
    at, length, header = _pages(path)[0]
    assert header[1] == 2  # the dictionary page
    raw = path.read_bytes()[at : at + length]
    field = raw.index(b"\x4c\x15\x06")  # field 7 (a struct) after field 3: its field 1 (an i32), 3 (zigzag 6)
    _patch(path, at + field + 2, b"\x08")  # 4 entries
    _one_line_error(path, "row group 0 of column 'image'", f"the page at file offset {at} is damaged",
                    "its dictionary size (its row group's rows) is 4, outside 0..3")


@pytest.mark.parametrize("layout", ["v1", "v2", "dictionary"])
@pytest.mark.parametrize("codec", ["none", "snappy", *WHOLE_PAGE_CODECS])
def test_pages_of_megabytes_read_the_same_rows_by_stream_or_whole(tmp_path: Path, codec: str, layout: str) -> None:
    """Pages legitimately hold megabytes (pyarrow checks its 1 MB page size every 1024 rows): a page of 40
    values of 100 KB, of every codec, as V1 or V2 data pages or a dictionary (8 of them). Indexed by its stream, it reads
    the rows pyarrow reads, bitwise: with the page kept whole (--page-cache-mb 64) and read by its stream to
    each row (--page-cache-mb 0.5: gzip, zstd, brotli); --max-file-bytes bounds the row, not its page."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(21)
    distinct = 8 if layout == "dictionary" else 40  # the dictionary: 8 values of 100 KB, under its 1 MB limit
    values = [rng.integers(0, 256, 50_000, dtype=np.uint8).tobytes() + bytes(50_000 + k) for k in range(distinct)]
    images = [values[k % distinct] for k in range(40)]
    path = tmp_path / "t" / f"{codec}.parquet"
    path.parent.mkdir()
    table = pa.table({"image": pa.array(images, pa.binary()), "label": list(range(40))})
    pq.write_table(table, path, compression=codec, row_group_size=40, use_dictionary=layout == "dictionary",
                   data_page_version="2.0" if layout == "v2" else "1.0")
    pages = _pages(path)
    biggest = max(header[2] for _, _, header in pages)  # a data page of 4 MB, or a dictionary page of 800 KB
    assert biggest > (600_000 if layout == "dictionary" else 3 << 20), pages
    assert pq.read_table(path).column("image").to_pylist() == images
    for cache_mb in (64.0, 0.5):
        ds = load_dataset(ServerConfig(data=str(path), index_dir=str(tmp_path / f"index-{cache_mb}"),
                                       page_cache_mb=cache_mb))
        order = [int(k) for k in rng.permutation(40)]
        assert [ds.read(i, max_bytes=200_000) for i in order] == [images[i] for i in order]  # type: ignore[attr-defined]


@pytest.mark.parametrize("codec", ["gzip", "zstd", "brotli", "snappy", "lz4_raw"])
def test_a_page_stream_holds_what_decompress_page_holds_or_says_why_not(codec: str) -> None:
    """`PageStream` (a piece at a time) reads what `decompress_page` (the page whole) reads, across its pieces'
    edges, and refuses what it refuses: a page that holds more or fewer bytes than its size, bytes after its
    stream; a gzip page of several members is read whole. A snappy or lz4_raw size its data cannot hold is
    refused before it is allocated."""
    import gzip

    import pyarrow as pa

    page = os.urandom(3000) + bytes(5000) + b"tail" * 7
    data = pa.compress(page, codec, asbytes=True)
    assert decompress_page(data, len(page), codec).to_pybytes() == page
    for chunk in (7, 4096, 1 << 20):
        stream = PageStream(data, len(page), codec, chunk)
        assert stream.read(10) == page[:10]
        stream.skip(2990)
        assert stream.read(5020) == page[3000:8020]
        stream.close()
        assert stream.at == len(page)
        for size, why in [(len(page) - 1, "it holds more"), (len(page) + 1, f"it holds {len(page)}")]:
            if codec in ("snappy", "lz4_raw"):
                why = ""  # their data says their size, or fails: decompress_page says so (as it did)
            with pytest.raises(ValueError, match=f"its {codec} page does not decompress to the {size} bytes its "
                                                 f"header says \\({why}"):
                PageStream(data, size, codec, chunk).close()
    if codec in ("gzip", "zstd"):  # a stream may not be followed by bytes that are not one
        with pytest.raises(ValueError, match=f"its {codec} page does not decompress to the {len(page)} bytes"):
            PageStream(data + b"\0", len(page), codec, 7).close()
    if codec == "gzip":
        three = gzip.compress(page[:100]) + gzip.compress(b"") + gzip.compress(page[100:])
        for chunk in (7, 1 << 20):
            stream = PageStream(three, len(page), codec, chunk)
            assert stream.read(len(page)) == page
            stream.close()
        with pytest.raises(ValueError, match="its gzip page does not decompress to the 8028 bytes its header says "
                                             "\\(it holds more"):
            PageStream(three + gzip.compress(b"x"), len(page), codec).close()
    ratio = {"snappy": 22, "lz4_raw": 256}.get(codec)
    if ratio:
        with pytest.raises(ValueError, match=f"{len(data)} bytes of {codec} hold at most {ratio * len(data)}"):
            PageStream(data, ratio * len(data) + 1, codec)


def _compact_i32(fields: dict[int, Any]) -> bytes:
    """A Thrift compact struct of i32 (int) and struct (dict) fields, as pyarrow's reader wants a page header."""
    out, last = bytearray(), 0
    for fid in sorted(fields):
        value = fields[fid]
        kind = 12 if isinstance(value, dict) else 5
        out.append(((fid - last) << 4) | kind)
        last = fid
        out += _compact_i32(value) if kind == 12 else _varint((value << 1) ^ (value >> 31))
    return bytes(out) + b"\0"


def test_a_label_page_that_says_hundreds_of_megabytes_is_refused_before_pyarrow_reads_it(tmp_path: Path) -> None:
    """pyarrow reads the label column, and decompresses a page to the size its header says: a label page of
    16 KB of zstd that says (and holds) 512 MB took indexing to 640 MB. The label column's page headers are
    read first: a page may say what its integers can take, no more; said in one line, at an undamaged peak."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, claim = 3000, 512 << 20
    image = _jpegs(1)[0]
    labels = np.random.default_rng(29).integers(0, 1 << 62, rows)  # incompressible: room for the new page
    path = tmp_path / "t" / "labels.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([image] * rows, pa.binary()), "label": pa.array(labels)}), path,
                   compression="zstd", use_dictionary=False)
    good = load_dataset(ServerConfig(data=str(path), index_dir=str(tmp_path / "index-good")))
    assert len(good) == rows
    at = pq.ParquetFile(path).metadata.row_group(0).column(1).data_page_offset
    header, body = _page_header(path.read_bytes(), at)
    levels = _varint(rows << 1) + bytes([1])  # one run of the level 1: present
    head = len(levels).to_bytes(4, "little") + levels + (labels % 10).astype("<i8").tobytes()
    data = _compressed("zstd", head, claim - len(head))
    new = _compact_i32({**header, 2: claim, 3: len(data), 5: {k: v for k, v in header[5].items() if k != 5}})
    assert len(new) + len(data) <= body - at + header[3]
    _patch(path, at, new + data)
    _footer_unpacked(path, claim, b"\x19\x18\x05label")
    read = subprocess.run([sys.executable, "-c", "import sys, pyarrow.parquet as pq; print(sum(pq.read_table("
                           "sys.argv[1], columns=['label']).column(0).to_pylist()))", str(path)],
                          capture_output=True, text=True, timeout=120, check=True)  # not here: a child's peak
    assert int(read.stdout) == int((labels % 10).sum())  # pyarrow reads it   # counts its parent's at fork
    _one_line_error(path, "row group 0 of label column 'label'", f"the page at file offset {at} is damaged",
                    f"its header says {claim} bytes uncompressed for {rows} integers")
    rc, rss, err = _maxrss_kb("serve", "--print-config", "--data", str(path), "--index-dir", str(tmp_path / "i"))
    assert rc == 2 and rss < 400 << 10, (rss, err)  # KB: was 640 MB
