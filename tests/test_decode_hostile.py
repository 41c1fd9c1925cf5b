"""Hostile JPEGs against the region decoder (`_jpegregion`, our C binding of libjpeg-turbo) and the
headers `jpeg_info` reads for ``--max-pixels``: crafted files, made here byte by byte.

`dc_jpeg` writes baseline JPEGs of any sampling factors, which no encoder at hand writes (OpenCV and
Pillow stop at 4:1:1, 4:2:0, 4:4:0): every block holds only its DC coefficient, so the entropy coder
is a few lines. The fuzzing campaign these cases come from (an ASan+UBSan build of the binding and of
libjpeg-turbo 2.1.5) is described in the report of branch jpegfuzz; `test_seeded_mutations_*` keeps a
small deterministic slice of it.
"""

from __future__ import annotations

import random
from io import BytesIO
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from loader_client import LoaderClient
from loader_server.options import DecodeOptions
from loader_server.pipeline import decode as decode_module
from loader_server.pipeline.decode import DecodeError, Decoder, jpeg_info

from .conftest import unique_label_list

needs_region = pytest.mark.skipif(decode_module._jpegregion is None, reason="_jpegregion is not built")


class _Bits:
    """An entropy-coded segment: bits MSB first, 0xFF bytes stuffed with 0x00, padded with 1s."""

    def __init__(self) -> None:
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, value: int, length: int) -> None:
        self.acc, self.n = (self.acc << length) | (value & ((1 << length) - 1)), self.n + length
        while self.n >= 8:
            self.n -= 8
            byte = (self.acc >> self.n) & 0xFF
            self.out += b"\xff\x00" if byte == 0xFF else bytes([byte])

    def done(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)
        return bytes(self.out)


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def dc_jpeg(width: int, height: int, sampling: list[tuple[int, int]], seed: int = 0) -> bytes:
    """A baseline JPEG whose components have the sampling factors `sampling` (one (h, v) each; one
    component: grayscale), each 8x8 block flat at a level drawn from `seed`, chroma far from neutral."""
    rng = np.random.default_rng(seed)
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    comps = len(sampling)
    if comps == 1:
        sampling, hmax, vmax = [(1, 1)], 1, 1
    mcux, mcuy = -(-width // (8 * hmax)), -(-height // (8 * vmax))
    levels = [rng.integers(0, 256, (mcuy * v, mcux * h)) if c == 0 else rng.integers(20, 90, (mcuy * v, mcux * h))
              + (150 if c == 2 else 0) for c, (h, v) in enumerate(sampling)]
    bits, pred = _Bits(), [0] * comps
    for my in range(mcuy):
        for mx in range(mcux):
            for c, (h, v) in enumerate(sampling):
                for by in range(v):
                    for bx in range(h):
                        coef = (int(levels[c][my * v + by, mx * h + bx]) - 128) * 8  # quantiser 1
                        diff, pred[c] = coef - pred[c], coef
                        size = abs(diff).bit_length()
                        bits.put(size, 4)  # DC table: category s has the 4-bit code s
                        bits.put(diff if diff >= 0 else diff - 1, size)
                        bits.put(0, 1)  # AC table: end of block has the 1-bit code 0
    frame = bytes([8, *height.to_bytes(2, "big"), *width.to_bytes(2, "big"), comps])
    frame += b"".join(bytes([c + 1, (h << 4) | v, 0]) for c, (h, v) in enumerate(sampling))
    scan = bytes([comps]) + b"".join(bytes([c + 1, 0x00]) for c in range(comps)) + b"\x00\x3f\x00"
    dc_counts, ac_counts = [0] * 16, [0] * 16
    dc_counts[3], ac_counts[0] = 12, 1
    return (b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)
            + _segment(0xC0, frame)
            + _segment(0xC4, b"\x00" + bytes(dc_counts) + bytes(range(12)))
            + _segment(0xC4, b"\x10" + bytes(ac_counts) + b"\x00")
            + _segment(0xDA, scan) + bits.done() + b"\xff\xd9")


def _decode(data: bytes, cs: int, m: int, x: int, y: int, w: int, h: int, row: int) -> tuple[np.ndarray, int]:
    """The binding's window, checked: nothing written past the pixels it says it wrote."""
    region = decode_module._jpegregion
    assert region is not None
    channels = 1 if cs == 0 else 3
    buf = np.full(h * row * channels + 64, 0xA5, np.uint8)
    start, cw, _, _ = region.decode(data, buf, cs, m, x, y, w, h)
    assert start <= x and x + w <= start + cw
    assert (buf[h * cw * channels :] == 0xA5).all(), "written past the window"
    return buf[: h * cw * channels].reshape(h, cw, channels), start


@needs_region
@pytest.mark.parametrize("sampling", [(4, 2), (2, 4), (4, 1), (2, 2), (1, 1)])
def test_every_sampling_gives_the_window_of_a_whole_decode_bitwise(sampling: tuple[int, int]) -> None:
    """4x2 and 2x4: libjpeg-turbo before 3.0 crops their chroma to half its width at any scale below 8/8
    (its issue #669) and colour-converts uninitialised heap memory into the window: the binding decodes
    them at the full width. Windows first, whole decodes after, so that no freed buffer of a whole decode
    can hold the right pixels by chance."""
    data = dc_jpeg(203, 157, [sampling, (1, 1), (1, 1)], seed=sampling[0] * 10 + sampling[1])
    rng = random.Random(7)
    for m in (1, 2, 4, 8, 3, 6):
        dw, dh = -(-203 * m // 8), -(-157 * m // 8)
        windows = []
        for _ in range(5):
            x, w = rng.randrange(0, dw - 4), 0
            w = rng.randint(4, dw - x)
            y = rng.randrange(0, dh - 1)
            h = rng.randint(1, dh - y)
            windows.append(((x, y, w, h), *_decode(data, 1, m, x, y, w, h, dw)))
        whole, _ = _decode(data, 1, m, 0, 0, dw, dh, dw)
        for (x, y, w, h), got, start in windows:
            inner = got[:, x - start + 1 : x - start + w - 1]
            assert np.array_equal(inner, whole[y : y + h, x + 1 : x + w - 1]), (sampling, m, (x, y, w, h))


@needs_region
def test_progressive_and_non_interleaved_jpegs_are_refused_by_the_binding() -> None:
    """A progressive file's block smoothing reads neighbouring blocks: a window is not the whole decode's
    pixels. Decoder never sends one there (`JpegInfo.single_scan`); the binding refuses them too."""
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), np.uint8))
    buf = BytesIO()
    img.save(buf, "JPEG", progressive=True)
    with pytest.raises(ValueError, match="multi-scan"):
        _decode(buf.getvalue(), 1, 4, 8, 8, 20, 20, 64)


def _hidden(frame_at: int, data: bytes, hide: bytes) -> bytes:
    return data[:frame_at] + hide + data[frame_at:]


@pytest.mark.parametrize("hide", [b"\x00", b"garbage", b"\xff\x00\x00\x04", b"\xff\xe0\x00\x00", b"\xfe\xff\xe1\x00\x01"],
                         ids=["a byte", "bytes", "ff00", "app0 of length 0", "app1 of length 1"])
def test_a_frame_header_behind_what_libjpeg_skips_is_read_for_max_pixels(hide: bytes) -> None:
    """libjpeg skips bytes that are not a marker (with a warning OpenCV ignores) and reads on after a
    length field under 2: `jpeg_info` must find the frame header libjpeg decodes, or a 30 KB file hides
    a 20000x20000 frame from --max-pixels and OpenCV decodes it (4 s, 2.3 GB a worker, before the fix)."""
    data = bytearray(dc_jpeg(48, 40, [(2, 2), (1, 1), (1, 1)], seed=4))
    info = jpeg_info(bytes(data))
    assert info is not None
    at = info.sof_offset
    data[at + 5 : at + 9] = (400).to_bytes(2, "big") * 2  # claims 400 x 400
    hostile = _hidden(at, bytes(data), hide)
    found = jpeg_info(hostile)
    assert found is not None and (found.width, found.height) == (400, 400)
    decoder = Decoder(DecodeOptions(size=(16, 16), max_pixels=100_000))
    with pytest.raises(DecodeError, match=r"400x400 pixels exceeds --max-pixels .*bomb") as caught:
        decoder.decode_into(hostile, "hidden.jpg", np.zeros((16, 16, 3), np.uint8))
    assert caught.value.code == "too_many_pixels" and caught.value.path == "hidden.jpg"


def test_valid_headers_are_read_as_before() -> None:
    data = dc_jpeg(48, 40, [(2, 1), (1, 1), (1, 1)])
    info = jpeg_info(data)
    assert info is not None and (info.width, info.height, info.components, info.mcu_rows) == (48, 40, 3, 8)
    assert info.single_scan and info.scalable


@needs_region
def test_hostile_arguments_are_refused() -> None:
    region = decode_module._jpegregion
    assert region is not None
    data = dc_jpeg(64, 48, [(2, 2), (1, 1), (1, 1)])
    out = np.empty(64 * 48 * 3, np.uint8)
    big = 2**31 - 1
    for args in [(1, 8, big, 0, big, 1), (1, 8, 0, big, 1, big), (1, 8, 63, 0, 2, 1), (1, 8, 0, 47, 1, 2),
                 (1, 8, 64, 0, 1, 1), (1, 0, 0, 0, 1, 1), (1, 9, 0, 0, 1, 1), (3, 8, 0, 0, 1, 1), (-1, 8, 0, 0, 1, 1),
                 (1, 8, -1, 0, 1, 1), (1, 8, 0, 0, 0, 1), (1, 8, 0, 0, 1, 0), (1, 8, 0, -5, 1, 1)]:
        with pytest.raises(ValueError):
            region.decode(data, out, *args)
    with pytest.raises(OverflowError):
        region.decode(data, out, 1, 8, 2**31, 0, 1, 1)
    with pytest.raises(ValueError, match="too small"):
        region.decode(data, out[: 64 * 3 * 2 - 1], 1, 8, 0, 0, 64, 2)
    with pytest.raises(TypeError):  # not contiguous
        region.decode(data, out.reshape(48, 64 * 3)[:, ::2], 1, 8, 0, 0, 1, 1)
    for bad in [b"", b"\xff\xd8", b"\xff\xd8\xff\xd9", data[:200], data.replace(b"\xff\xda", b"\xff\xdb", 1)]:
        with pytest.raises(ValueError):
            region.decode(bad, out, 1, 8, 0, 0, 1, 1)
    # frame headers libjpeg-turbo refuses: 2 components, 4 (CMYK), 0 lines, 0 columns, 12 and 16 bits
    two = dc_jpeg(32, 32, [(1, 1), (1, 1)])
    frame = jpeg_info(data)
    assert frame is not None
    at = frame.sof_offset
    for patched in [two, data[: at + 5] + b"\x00\x00" + data[at + 7 :], data[: at + 7] + b"\x00\x00" + data[at + 9 :],
                    data[: at + 4] + b"\x0c" + data[at + 5 :], data[: at + 4] + b"\x10" + data[at + 5 :],
                    dc_jpeg(32, 32, [(1, 1)] * 4)]:
        with pytest.raises(ValueError):
            region.decode(patched, out, 1, 8, 0, 0, 1, 1)


@needs_region
def test_seeded_mutations_of_crafted_jpegs_never_write_outside_the_window() -> None:
    """A deterministic slice of the fuzzing campaign: bit flips, cuts (with an end marker put back),
    frame fields (sizes 0/1/65535, component counts, sampling factors), damaged tables, restart
    intervals, on random windows and scales. Each call answers pixels or ValueError, never writes past
    the pixels it reports, and its window holds the one asked for."""
    region = decode_module._jpegregion
    assert region is not None
    seeds = [dc_jpeg(90, 70, [s, (1, 1), (1, 1)], seed=i) for i, s in enumerate([(4, 2), (2, 4), (2, 2), (1, 1)])]
    seeds.append(dc_jpeg(41, 23, [(1, 1)], seed=9))
    rng = random.Random(2026)
    answered = refused = 0
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        info = jpeg_info(bytes(data))
        assert info is not None
        at = info.sof_offset
        kind = rng.randrange(6)
        if kind == 0:
            for _ in range(rng.randint(1, 6)):
                p = rng.randrange(2, len(data))
                data[p] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data = data[: rng.randrange(2, len(data))] + b"\xff\xd9"
        elif kind == 2:
            field = rng.choice([5, 7])
            data[at + field : at + field + 2] = rng.choice([0, 1, 2, 9, 17, 255, 65535]).to_bytes(2, "big")
        elif kind == 3:
            for k in range(data[at + 9]):
                data[at + 11 + 3 * k] = rng.choice([0x00, 0x11, 0x12, 0x21, 0x22, 0x24, 0x42, 0x44, 0x41, 0x14, 0xFF])
        elif kind == 4:
            p = rng.randrange(at + 10, min(len(data), at + 200))
            data[p] = rng.randrange(256)
        else:
            sos = data.index(b"\xff\xda")
            data[sos:sos] = b"\xff\xdd\x00\x04" + rng.choice([0, 1, 2, 3, 65535]).to_bytes(2, "big")
        hostile = bytes(data)
        m, cs = rng.randint(1, 8), rng.randrange(3)
        dw, dh = -(-max(1, info.width) * m // 8), -(-max(1, info.height) * m // 8)
        w, h = rng.randint(1, dw), rng.randint(1, dh)
        x, y = rng.randint(0, dw - w), rng.randint(0, dh - h)
        try:
            _decode(hostile, cs, m, x, y, w, h, dw)
            answered += 1
        except ValueError:
            refused += 1
    assert answered > 100 and refused > 100, (answered, refused)


def test_a_server_survives_hostile_jpegs_names_them_and_serves_the_rest(start_server: Any, tmp_path: Path) -> None:
    """The crafted files through real workers (random resized crops, so the binding decodes windows):
    the bad ones are named once each with their reason, every other sample is served, the batches are
    whole."""
    listfile = unique_label_list(tmp_path / "data", 24, size=(64, 48))
    root = listfile.parent
    lines = listfile.read_text().splitlines()
    bomb = bytearray(dc_jpeg(48, 40, [(2, 2), (1, 1), (1, 1)], seed=4))
    frame = jpeg_info(bytes(bomb))
    assert frame is not None
    bomb[frame.sof_offset + 5 : frame.sof_offset + 9] = (20000).to_bytes(2, "big") * 2
    hostile = {
        2: ("bomb", _hidden(frame.sof_offset, bytes(bomb), b"\x00"), "exceeds --max-pixels 178956970 (a decompression bomb?)"),
        5: ("app0", _hidden(frame.sof_offset, bytes(bomb), b"\xff\xe0\x00\x00"), "exceeds --max-pixels 178956970 (a decompression bomb?)"),
        9: ("sub42", dc_jpeg(120, 90, [(4, 2), (1, 1), (1, 1)], seed=1), None),
        11: ("sub24", dc_jpeg(90, 120, [(2, 4), (1, 1), (1, 1)], seed=2), None),
        14: ("twocomp", dc_jpeg(64, 48, [(1, 1), (1, 1)]), "not a decodable image"),
        17: ("zerolines", bytes(bomb[: frame.sof_offset + 5]) + b"\x00\x00" + bytes(bomb[frame.sof_offset + 7 :]),
             "not a decodable image"),
    }
    names = {}
    for i, (name, data, _) in hostile.items():
        (root / f"{name}.jpg").write_bytes(data)
        lines[i] = f"{name}.jpg {i}"
        names[i] = str(root / f"{name}.jpg")
    listfile.write_text("\n".join(lines) + "\n")
    bad = {i for i, (_, _, reason) in hostile.items() if reason}
    server = start_server(listfile, "--batch-size", "4", "--size", "24x24", "--augment", "rrc", "--workers", "2",
                          "--on-error", "skip", "--max-bad", str(len(bad)), "--seed", "3", "--no-scan")
    seen: set[int] = set()
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        for _ in range(2):
            for x, y in client.epoch():
                assert x.shape == (4, 24, 24, 3) and len(y) == 4
                seen.update(int(v) for v in y)
    assert seen == set(range(24)) - bad
    log = server.log_text()
    for i in bad:
        assert log.count(f"bad file {names[i]}:") == 1, (names[i], log[-2000:])
        assert hostile[i][2] in log.split(f"bad file {names[i]}:")[1].splitlines()[0]
    assert server.proc.poll() is None
    for i in (9, 11):  # the valid crafted files are valid (TurboJPEG's API refuses 4x2 and 2x4; OpenCV reads them)
        img = cv2.imdecode(np.frombuffer(hostile[i][1], np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == ((90, 120, 3) if i == 9 else (120, 90, 3))
