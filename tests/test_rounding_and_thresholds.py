"""Rounding rules on cases where they matter, and thresholds on both sides of their exact multiples.

Every expected value is written out. The cases are chosen so that a different rule gives a
different answer: a fraction of .5 (half to even and half up disagree), below .5 (ceil
disagrees) and above .5 (floor and truncation disagree); a threshold at an exact multiple (a
JPEG exactly 2, 4 or 8 times the output, a record area ending exactly on a page, 2 x workers
exactly the prefetch floor) and one step on each side of it.

Most cases run through real servers and what a trainer or `stats` sees; the decode-size choice
and the cache layout are pure (`scale`, `reduction`, `layout_bytes` below are the one place that
names their functions).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from loader_client import BadSampleError, LoaderClient, protocol, server_stats

from .conftest import unique_label_list, wait_until, write_image


def scale(size: tuple[int, int], resize: str, width: int, height: int) -> int:
    """M of the M/8 scale libjpeg-turbo decodes an upright `width` x `height` JPEG (or crop) at."""
    from loader_server.pipeline.decode import decode_scale

    return decode_scale(width, height, size, resize)


def reduction(size: tuple[int, int], resize: str, width: int, height: int) -> int:
    """The JPEG scale-down (1, 2, 4 or 8) OpenCV decodes a `width` x `height` JPEG at (the JPEGs
    libjpeg-turbo refuses; EXIF is applied after decoding, so both orientations must cover)."""
    from loader_server.config import ServerConfig
    from loader_server.pipeline.decode import Decoder

    return Decoder(ServerConfig(data="unused", size=size, resize=resize)).reduction(width, height)  # type: ignore[arg-type]


def kept(width: int, height: int, size: tuple[int, int], resize: str) -> tuple[int, int, int, int]:
    """(kept width, kept height, target width, target height) of a source for the decode-size choice."""
    from loader_server.pipeline.decode import kept_size

    return kept_size(width, height, size, resize)


def layout_bytes(records: int, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(offset of the first record, total bytes) of a cache file of `records` records of `shape`."""
    from loader_server.pipeline.cache import CacheLayout

    layout = CacheLayout(records, shape)
    return layout.records_offset, layout.total_bytes


def record_shape_of(size: tuple[int, int], cache_size: int | None) -> list[int]:
    """[height, width, channels] of a cache record for output `size` and --cache-size (the pure rule)."""
    from loader_server.config import ServerConfig
    from loader_server.pipeline.cache import record_shape

    config = ServerConfig(data="unused", size=size, cache_size=cache_size, augment="rrc" if cache_size else None)
    return list(record_shape(config))


def gray_images(folder: Path, sizes: list[tuple[int, int]], columns: bool = False) -> Path:
    """One PNG per (width, height), in that order: solid 200, or each column's value 10 x its number."""
    lines = []
    for k, (w, h) in enumerate(sizes):
        img = np.full((h, w), 200, np.uint8) if not columns else np.tile((np.arange(w) * 10).astype(np.uint8), (h, 1))
        write_image(folder / f"{k}.png", img)
        lines.append(f"{k}.png {k}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def served(endpoint: str, count: int) -> list[np.ndarray]:
    with LoaderClient(endpoint, timeout_s=30) as client:
        return [client.next()[0][0, ..., 0].copy() for _ in range(count)]


# ---------------------------------------------------------------------------- resize geometry
def test_letterbox_rounds_the_scaled_side_half_to_even(start_server: Any, tmp_path: Path) -> None:
    """4x4 output: 8x5 -> 4 x 2.5 rows -> 2 (half to even: round(2.5) == 2), centred from row 1;
    10x7 -> 2.8 -> 3 rows from row 0; 10x6 -> 2.4 -> 2 rows from row 1. Columns are all content."""
    data = gray_images(tmp_path, [(8, 5), (10, 7), (10, 6)])
    server = start_server(data, "--batch-size", "1", "--size", "4x4", "--resize", "letterbox", "--color", "gray",
                          "--interpolation", "nearest", "--no-shuffle", "--workers", "1")
    rows = [img[:, 0].tolist() for img in served(server.endpoint, 3)]
    assert rows == [[0, 200, 200, 0], [200, 200, 200, 0], [0, 200, 200, 0]]


def test_center_crop_rounds_the_cut_width_half_to_even(start_server: Any, tmp_path: Path) -> None:
    """2x4 output (1:2) from 10-wide sources whose column c holds 10c: 10x5 cuts round(2.5) = 2 columns
    from column 4 (columns 40, 50); 10x7 cuts round(3.5) = 4 from column 3, nearest takes 3 and 5."""
    data = gray_images(tmp_path, [(10, 5), (10, 7)], columns=True)
    server = start_server(data, "--batch-size", "1", "--size", "2x4", "--resize", "crop", "--color", "gray",
                          "--interpolation", "nearest", "--no-shuffle", "--workers", "1")
    first_rows = [img[0].tolist() for img in served(server.endpoint, 2)]
    assert first_rows == [[40, 50], [30, 50]]


@pytest.mark.parametrize(("size", "cache_size", "record"), [
    ("7x2", 3, [3, 10, 3]),  # 7 x 3 / 2 = 10.5 -> 10 (half to even)
    ("5x3", 4, [4, 7, 3]),  # 5 x 4 / 3 = 6.67 -> 7
    ("4x6", 5, [8, 5, 3]),  # 6 x 5 / 4 = 7.5 -> 8 (half to even)
])
def test_cache_size_records_round_the_longer_side(start_server: Any, tmp_path: Path, size: str, cache_size: int,
                                                  record: list[int]) -> None:
    """--cache-size S keeps the output's aspect ratio at shorter side S; `stats` shows the record shape."""
    data = unique_label_list(tmp_path / "data", 4, size=(16, 12))
    server = start_server(data, "--batch-size", "2", "--size", size, "--augment", "rrc", "--cache", "memory",
                          "--cache-size", str(cache_size), "--workers", "1")
    assert server_stats(server.endpoint)["cache"]["record_shape"] == record


@pytest.mark.parametrize(("size", "cache_size", "record"), [
    ((7, 2), 3, [3, 10, 3]), ((5, 3), 4, [4, 7, 3]), ((4, 6), 5, [8, 5, 3]), ((3, 4), 5, [7, 5, 3]),
    ((4, 6), None, [6, 4, 3]), ((5, 5), 5, [5, 5, 3]),
])
def test_record_shapes_in_process(size: tuple[int, int], cache_size: int | None, record: list[int]) -> None:
    """The rule the servers above report, in process: 4 x 5 / 3 = 6.67 -> 7 rows; no --cache-size, the output."""
    assert record_shape_of(size, cache_size) == record


# ---------------------------------------------------------------------------- --max-bad, --max-file-bytes
@pytest.mark.parametrize(("bad", "tolerated"), [(2, True), (3, False)])
def test_a_max_bad_percentage_rounds_down(start_server: Any, tmp_path: Path, bad: int, tolerated: bool) -> None:
    """14% of 20 samples is 2.8: at most 2 bad files (more than 2.8 is 3), never 3."""
    data = unique_label_list(tmp_path / "data", 20, size=(16, 12))
    lines = data.read_text().splitlines()
    for i in (1, 2, 3)[:bad]:
        (data.parent / lines[i].split()[0]).write_bytes(b"")
    server = start_server(data, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--on-error", "skip", "--max-bad", "14%", "--no-scan")  # the workers count them
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        if tolerated:
            assert len([y for _, y in client.epoch()]) == 5
        else:
            with pytest.raises(BadSampleError, match=r"3 bad files exceed --max-bad \(2\)"):
                client.next()


def test_max_file_bytes_admits_a_file_of_exactly_that_size(start_server: Any, tmp_path: Path) -> None:
    data = unique_label_list(tmp_path / "data", 4, size=(16, 12))
    lines = data.read_text().splitlines()
    exact = data.parent / lines[1].split()[0]  # a JPEG
    limit = exact.stat().st_size
    over = data.parent / lines[2].split()[0]
    over.write_bytes(exact.read_bytes() + b"\0")  # the same JPEG and one byte after its end
    server = start_server(data, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--on-error", "skip", "--max-bad", "2", "--max-file-bytes", str(limit))
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        _, y = client.next()
    assert 1 in y.tolist() and 2 not in y.tolist()  # 2 was replaced by another sample of its batch
    assert f"file of {limit + 1} bytes exceeds --max-file-bytes {limit}" in server.log_text()


# ---------------------------------------------------------------------------- prefetch, arena slots, pages
def _raw_hello(endpoint: str, **fields: Any) -> tuple[zmq.Context[Any], zmq.Socket[Any], dict[str, Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "hello", "shm": False, **fields}))
    deadline = time.monotonic() + 20
    while sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        header = protocol.unpack(sock.recv_multipart()[0])
        if header["t"] != "heartbeat":
            return ctx, sock, header
    raise AssertionError("no welcome")


@pytest.mark.parametrize(("workers", "prefetch"), [(1, 8), (4, 8), (5, 10)])
def test_default_prefetch_is_eight_or_two_per_worker(start_server: Any, tmp_path: Path, workers: int,
                                                     prefetch: int) -> None:
    """max(8, 2 x workers) batches built ahead for a client that takes none (README, --prefetch)."""
    data = unique_label_list(tmp_path / "data", 8, size=(8, 8))
    server = start_server(data, "--batch-size", "2", "--size", "4x4", "--workers", str(workers))
    ctx, sock, welcome = _raw_hello(server.endpoint, credit=0)
    try:
        assert welcome["t"] == "welcome"
        wait_until(lambda: server_stats(server.endpoint)["batches_ready"] == prefetch, 30,
                   f"{prefetch} batches built ahead")
        time.sleep(0.5)
        assert server_stats(server.endpoint)["batches_ready"] == prefetch  # and no more
    finally:
        sock.close(linger=0)
        ctx.term()


def test_arena_slots_and_page_aligned_slots_at_the_bounds(start_server: Any, tmp_path: Path) -> None:
    """prefetch + min(client credit, 8) + 2 slots; each slot page-aligned: a 4096-byte batch takes one page."""
    data = unique_label_list(tmp_path / "data", 4, size=(80, 80))
    exact = start_server(data, "--batch-size", "1", "--size", "64x64", "--color", "gray", "--prefetch", "3",
                         "--workers", "1")  # 64 x 64 x 1 = 4096 bytes
    for credit, slots in ((7, 12), (8, 13), (9, 13), (0, 6)):
        ctx, sock, welcome = _raw_hello(exact.endpoint, credit=credit, shm=True, shm_key="ab" * 16)
        sock.close(linger=0)
        ctx.term()
        assert (welcome["shm"]["slots"], welcome["shm"]["stride"]) == (slots, 4096), (credit, welcome["shm"])
    over = start_server(data, "--batch-size", "1", "--size", "17x241", "--color", "gray", "--workers", "1")
    ctx, sock, welcome = _raw_hello(over.endpoint, credit=1, shm=True, shm_key="ab" * 16)  # 17 x 241 = 4097 bytes: two pages
    sock.close(linger=0)
    ctx.term()
    assert welcome["shm"]["stride"] == 8192


@pytest.mark.parametrize(("records", "offset", "total"), [
    # a 4 KiB header, 40 bytes of state per record, the records from the next page, an 8-byte end mark
    (102, 8192, 8192 + 102 + 8),  # states end at 8176: the next page
    (103, 12288, 12288 + 103 + 8),  # ... at 8216: one page later
    (511, 24576, 24576 + 511 + 8),  # ... at 24536
    (512, 24576, 24576 + 512 + 8),  # ... at exactly 24576: records start right there
    (513, 28672, 28672 + 513 + 8),
])
def test_cache_records_start_on_the_first_page_after_their_states(records: int, offset: int, total: int) -> None:
    assert layout_bytes(records, (1, 1, 1)) == (offset, total)


# ---------------------------------------------------------------------------- decode-size choice
@pytest.mark.parametrize(("size", "resize", "source", "factor"), [
    ((32, 32), "stretch", (64, 64), 2), ((32, 32), "stretch", (63, 64), 1), ((32, 32), "stretch", (64, 63), 1),
    ((32, 32), "stretch", (128, 128), 4), ((32, 32), "stretch", (127, 128), 2),
    ((32, 32), "stretch", (256, 256), 8), ((32, 32), "stretch", (255, 256), 4), ((32, 32), "stretch", (512, 512), 8),
    ((32, 20), "stretch", (64, 40), 1),  # 2x, but not once rotated by EXIF (40 / 2 < 32)
    ((32, 20), "stretch", (64, 64), 2),
    ((32, 32), "crop", (128, 64), 2), ((32, 32), "crop", (64, 128), 2), ((32, 32), "crop", (128, 63), 1),
    ((32, 32), "letterbox", (64, 48), 2), ((32, 32), "letterbox", (63, 48), 1),
    ((32, 32), "letterbox", (128, 96), 4),
    # Centre crops of sources much wider or taller than the output (cases where a wrong test of which
    # side is cut, or a wrong width or height of the cut region, picks another factor):
    ((27, 13), "crop", (1000, 59), 2), ((43, 55), "crop", (1040, 389), 4),
])
def test_jpegs_are_decoded_smaller_from_exactly_2_4_and_8_times_the_output(size: tuple[int, int], resize: str,
                                                                         source: tuple[int, int], factor: int) -> None:
    """OpenCV's path: a JPEG at least 2, 4 or 8 times what the resize needs, in both orientations."""
    assert reduction(size, resize, *source) == factor


@pytest.mark.parametrize(("size", "resize", "source", "m"), [
    ((32, 32), "stretch", (64, 64), 4), ((32, 32), "stretch", (63, 64), 8), ((32, 32), "stretch", (64, 63), 8),
    ((32, 32), "stretch", (128, 128), 2), ((32, 32), "stretch", (127, 128), 4),
    ((32, 32), "stretch", (256, 256), 1), ((32, 32), "stretch", (255, 256), 2), ((32, 32), "stretch", (512, 512), 1),
    ((32, 20), "stretch", (64, 40), 4),  # the orientation is known before decoding: exactly 2x covers
    ((32, 20), "stretch", (40, 64), 8),  # ... and upright portrait does not
    ((32, 32), "stretch", (86, 86), 4),  # 3/8 would cover (86 x 3 >= 256), 1/2 costs less
    ((32, 32), "stretch", (52, 60), 8),  # 5/8 would cover (52 x 5 >= 256), all of 5/8..7/8 cost more than 8/8
    ((32, 32), "stretch", (31, 64), 8),  # nothing covers: full size, the resize enlarges
    ((32, 32), "crop", (128, 64), 4), ((32, 32), "crop", (64, 128), 4), ((32, 32), "crop", (128, 63), 8),
    ((32, 32), "letterbox", (64, 48), 4), ((32, 32), "letterbox", (63, 48), 8),
    ((32, 32), "letterbox", (128, 96), 2),
    ((27, 13), "crop", (1000, 59), 2), ((43, 55), "crop", (1040, 389), 2),
])
def test_jpegs_are_decoded_at_the_cheapest_scale_from_exactly_the_multiple_that_covers(
        size: tuple[int, int], resize: str, source: tuple[int, int], m: int) -> None:
    """README: the cheapest M/8 (1/8, 1/4, 1/2 or 1) at which the kept part still covers the output."""
    assert scale(size, resize, *source) == m


# ---------------------------------------------------------------------------- log volume per peer
def test_log_lines_per_peer_are_ten_a_minute_and_the_window_restarts_at_60_s(
        caplog: pytest.LogCaptureFixture) -> None:
    from loader_server.runtime.transport import PeerLog, client_tag

    now = [1000.0]
    peer_log = PeerLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="loader_server"):
        for i in range(13):
            peer_log.warning(b"p", "line %d", i)
        now[0] += 59.999
        peer_log.warning(b"p", "line %d", 13)
        lines = [r.getMessage() for r in caplog.records]
        tag = client_tag(b"p")  # a client is named by its tag, never by its routing id
        assert lines == [f"line {i}" for i in range(10)] + [f"client {tag}: further messages this minute are not logged"]
        caplog.clear()
        now[0] += 0.001  # exactly 60 s after the window opened
        peer_log.warning(b"p", "line %d", 14)
        assert [r.getMessage() for r in caplog.records] == [f"4 more messages about client {tag} were not logged",
                                                            "line 14"]


def test_cache_file_header_is_the_documented_4_kib_of_magic_length_and_description() -> None:
    """The header of a cache file, byte for byte: a file written by `cache build` must be read by `serve`,
    and any other header (another layout, key or format) is refused and rebuilt."""
    from loader_server.pipeline.cache import CacheLayout

    # 2 states of 40 bytes after the 4 KiB header: records from the next page, 8192; 2 records of 12 bytes,
    # then the 8-byte end mark. Format 3: the end mark that tells a truncated file (issue 21).
    text = (b'{"format": 3, "key": "k1", "records": 2, "shape": [3, 4, 1], "records_offset": 8192, '
            b'"total_bytes": 8224}')
    header = CacheLayout(2, (3, 4, 1)).header("k1")
    assert header == (b"LDRCACHE" + len(text).to_bytes(4, "little") + text).ljust(4096, b"\0")
    assert len(header) == 4096


# (source, output, resize, kept width and height, target width and height): written out from the README's
# resize modes, with a case where the rounding of the cut side matters.
@pytest.mark.parametrize(("source", "size", "resize", "expected"), [
    ((400, 200), (100, 100), "crop", (200, 200, 100, 100)),  # wider: the width is cut to the output's aspect
    ((200, 400), (100, 100), "crop", (200, 200, 100, 100)),  # taller: the height is cut
    ((300, 200), (150, 100), "crop", (300, 200, 150, 100)),  # the same aspect: nothing cut
    ((301, 200), (150, 100), "crop", (300, 200, 150, 100)),  # 200 x 3/2 = 300
    ((200, 301), (100, 150), "crop", (200, 300, 100, 150)),
    ((333, 100), (64, 48), "crop", (133, 100, 64, 48)),  # 100 x 64/48 = 133.3: rounded to 133
    ((400, 100), (70, 48), "crop", (146, 100, 70, 48)),  # 100 x 70/48 = 145.8: rounded up, not cut to 145
    ((100, 333), (48, 64), "crop", (100, 133, 48, 64)),
    ((400, 200), (100, 100), "stretch", (400, 200, 100, 100)),  # everything kept, resized to the output
    ((400, 200), (100, 100), "letterbox", (400, 200, 100, 50)),  # kept whole, resized inside the output
    ((200, 400), (100, 100), "letterbox", (200, 400, 50, 100)),
    ((333, 100), (64, 48), "letterbox", (333, 100, 64, 19)),  # 100 x 64/333 = 19.2
    ((300, 130), (64, 48), "letterbox", (300, 130, 64, 28)),  # 130 x 64/300 = 27.7: rounded up
])
def test_the_part_of_a_source_each_resize_keeps_and_its_target(source: tuple[int, int], size: tuple[int, int],
                                                                resize: str, expected: tuple[int, int, int, int]) -> None:
    assert kept(*source, size, resize) == expected
