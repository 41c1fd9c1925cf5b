"""Decoding and resizing: pure functions from encoded bytes to pixels in a caller's buffer.

Behaviour, the same for every file type:

* colour images decode straight to RGB (``IMREAD_COLOR_RGB``) or BGR; ``gray`` gives one channel;
* grayscale and palette images are expanded to three channels; an alpha channel is dropped
  (the stored colour of transparent pixels is kept, nothing is composited);
* 16-bit images are scaled to 8 bits (value // 256), as ``IMREAD_COLOR`` does;
* JPEG EXIF orientation is applied, so the image is upright as a viewer shows it.

Resize modes: ``stretch`` to WxH (the classic generator), ``letterbox`` (keep aspect, pad with
``pad_value``), ``crop`` (scale the shorter side to fit, cut the centre). The crop is fused:
only the centre region of the source is resized, straight into the output buffer.

**Decoding less** (``reduced_decode``, on by default). JPEGs are decoded by libjpeg-turbo
through simplejpeg; everything else, and every JPEG that libjpeg-turbo refuses (CMYK, 12-bit,
lossless, corrupt data that it will not decode strictly), by OpenCV, as before.

* *Scale.* libjpeg-turbo decodes at any M/8 scale by dropping DCT coefficients. The decode
  scale is `decode_scale`: the cheapest M/8 at which the part of the source that reaches the
  output still covers the output size (the resize then only shrinks). Cheapest, not smallest:
  1/8, 1/4, 1/2 and 1 have SIMD inverse DCTs, while 3/8 costs more than 1/2 and 5/8-7/8
  cost 1.4-2.6 times a full decode (`SCALE_COST`, measured), so a region that 3/8 would
  cover is decoded at 1/2, and one that 5/8 would cover at full size.
* *Window.* For a crop (``--augment rrc``, drawn from the header's size before anything is
  decoded) only the region's scale counts, and only the region is decoded. A baseline JPEG goes
  to `_jpegregion`, our binding of the system's libjpeg-turbo (setup.py builds it): rows above
  the region are only entropy-decoded (``jpeg_skip_scanlines``: no inverse DCT, no upsampling,
  no colour conversion), the iMCU columns beside it are not decoded (``jpeg_crop_scanline``; they
  are for 4x2 and 2x4 subsampling, which libjpeg-turbo < 3.0 crops wrongly: ``crop_is_exact`` in
  `_jpegregion.c`), and nothing below its last row is read. Every pixel inside the crop is bitwise what a whole
  decode at that scale gives (`Decoder._region`). No Python binding of libjpeg-turbo exposes
  the column cropping (``tj3SetCroppingRegion`` is TurboJPEG 3's; Debian 12 ships 2.1). Where the
  binding is not built, and for what it refuses (corrupt data inside the window: libjpeg's
  warnings are errors), simplejpeg decodes the crop as before: only down to one MCU row below
  it (the frame header's height is lowered in a copy of the bytes), the columns beside it
  decoded too. Progressive JPEGs are decoded whole, at the crop's scale, by simplejpeg.
  ``--resize crop`` alone decodes only the centre it keeps, by the binding (`Decoder._centre_into`):
  the same rows and columns of the whole decode at that scale, so bitwise the same output.

At 1/8, 1/4, 1/2 and 1 libjpeg-turbo gives bitwise what OpenCV's ``IMREAD_REDUCED_*`` gives, so a
plain resize keeps the pixels of earlier releases; a crop now decodes at the crop's scale,
within the tolerance README.md states of a full decode followed by the same crop and resize.
``reduced_decode=False`` decodes every JPEG whole and at full size.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import simplejpeg

try:  # region decoding (setup.py builds it where libjpeg's headers and a C compiler are found)
    from . import _jpegregion
except ImportError:  # pragma: no cover - not built, or libjpeg.so.62 missing: simplejpeg decodes crops
    _jpegregion = None  # type: ignore[assignment]

from ..data.reading import DEFAULT_MAX_FILE_BYTES, DecodeError, read_file
from ..options import DecodeOptions, options_of

__all__ = ["DEFAULT_MAX_FILE_BYTES", "LOADED_LIBJPEG", "REGION_DECODER", "SCALE_COST", "DecodeError", "Decoder",
           "JpegInfo", "LoadedLibrary", "decode_scale", "decoders_line", "jpeg_info", "jpeg_size", "kept_size",
           "loaded_libjpeg", "png_size", "read_file", "region_decoder_note", "region_decoder_of", "scale_covers",
           "stored_box"]

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
_RGB_FLAG = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10
# libjpeg scale bits of the IMREAD_REDUCED_* flags (IMREAD_REDUCED_GRAYSCALE_2 == 16, ...).
_REDUCE_BITS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MARKER = re.compile(rb"\xff[^\x00\xff]")  # where libjpeg's next_marker() stops: 0xFF, then not 0 or a fill byte
# Frames libjpeg-turbo decodes with DCT scaling: baseline, extended and progressive, Huffman or arithmetic.
_SCALABLE_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
# Some writers append padding or metadata after the end-of-image marker; look this far back.
_JPEG_EOI_SEARCH_BYTES = 4096
#: Relative CPU time of a libjpeg-turbo decode at M/8 (index M), against a full-size decode, measured
#: here (docs/bench/decode-less/bindings.py, one core): ../shared/corpus-large, 1295x987 4:2:0
#: photos, 0.47, 0.55, 0.88, 0.66, 1.52, 1.87, 2.55 for M = 1..7; ../shared/corpus, about 430 px,
#: 0.51, 0.55, 0.81, 0.68, 1.41, 1.79, 2.33. The scales with SIMD inverse DCTs (1/8, 1/4, 1/2, 1)
#: are the cheap ones; 3/8 is never worth it (1/2 covers whatever it covers, for less).
SCALE_COST = (math.inf, 0.5, 0.55, 0.85, 0.67, 1.5, 1.85, 2.45, 1.0)
_BY_COST = sorted(range(1, 9), key=SCALE_COST.__getitem__)  # the scales, cheapest first
#: Largest decode buffer a decoder keeps between images (larger ones are allocated per image).
_KEEP_SCRATCH_BYTES = 64 << 20


@dataclass(frozen=True)
class LoadedLibrary:
    """The shared libjpeg that the region decoder runs in this process (`loaded_libjpeg`)."""

    path: str  # the file, symbolic links resolved (as /proc/self/maps names it)
    sha256: str  # the hex SHA-256 of its content


def loaded_libjpeg(region: Any) -> LoadedLibrary | str:
    """The libjpeg that `region` (the `_jpegregion` module) runs, or why it cannot be told (a fixed sentence).

    The dynamic linker decides it at run time (a Debian update of libjpeg62-turbo, LD_LIBRARY_PATH,
    another image's build), not the headers `_jpegregion` was compiled against: dladdr() of
    ``jpeg_CreateDecompress`` names the file (`_jpegregion.loaded_library`), and its content's
    digest tells two builds apart where their names and versions are the same (a security update
    keeps ``libjpeg.so.62.3.0``). Hashing reads the file (about 0.6 MB) once per process, at import,
    right after the library was loaded: the file hashed is then the one mapped, unless it is
    replaced within those milliseconds.
    """
    find = getattr(region, "loaded_library", None)
    if find is None:
        return ("unidentified: this build of _jpegregion has no loaded_library(); rebuild it "
                "(`python3 setup.py build_ext --inplace`, or reinstall the package)")
    name = find()
    if name is None:
        return "unidentified: dladdr() names no shared library providing jpeg_CreateDecompress (linked statically?)"
    path = os.path.realpath(name)
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        return f"unidentified: {path} cannot be read ({e.strerror})"
    return LoadedLibrary(path, digest)


def region_decoder_of(region: Any, loaded: LoadedLibrary | str) -> str:
    """`REGION_DECODER` for the `_jpegregion` module `region` running the libjpeg `loaded`."""
    runs = f"sha256 {loaded.sha256}" if isinstance(loaded, LoadedLibrary) else loaded
    return (f"jpegregion {region.VERSION} libjpeg {region.JPEG_LIB_VERSION} "
            f"libjpeg-turbo {region.LIBJPEG_TURBO_VERSION_NUMBER} loaded {runs}")


#: The libjpeg the region decoder runs (`loaded_libjpeg`), or None where `_jpegregion` is not built.
LOADED_LIBJPEG: LoadedLibrary | str | None = None if _jpegregion is None else loaded_libjpeg(_jpegregion)
#: What decodes the window of a crop, or None where `_jpegregion` is not built (simplejpeg decodes
#: crops): our binding's version, the libjpeg(-turbo) versions of the headers it was built against,
#: and the libjpeg this process loaded, by its content's SHA-256 (`LOADED_LIBJPEG`; where it cannot
#: be told, ``unidentified: `` and the reason, so the build-time versions alone tell decoders apart).
#: In the cache key, as simplejpeg's version is: a record made by one decoder is never read by a
#: server that decodes with another.
REGION_DECODER: str | None = (
    None if _jpegregion is None or LOADED_LIBJPEG is None else region_decoder_of(_jpegregion, LOADED_LIBJPEG))
_REGION_COLORSPACE = {"GRAY": 0, "RGB": 1, "BGR": 2}
# cv2 orientation operations for EXIF orientations 2..8 (1 is upright), as OpenCV applies them.
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.flip(a, -1),
    4: lambda a: cv2.flip(a, 0),
    5: lambda a: cv2.transpose(a),
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.flip(cv2.transpose(a), -1),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


@dataclass(frozen=True)
class JpegInfo:
    """What the headers of a JPEG say, read without decoding (`jpeg_info`)."""

    width: int  # as stored (before EXIF orientation)
    height: int
    components: int
    precision: int
    sof: int  # the frame marker: 0xC0 baseline, 0xC2 progressive, ...
    sof_offset: int  # where the frame header's 0xFF is in the bytes
    mcu_rows: int  # the height of an MCU row, in pixels
    single_scan: bool  # one sequential scan holding every component (the window decode needs it)
    orientation: int = 1  # EXIF orientation, 1..8

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as a viewer shows the image (EXIF orientation applied)."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)

    @property
    def scalable(self) -> bool:
        """Whether libjpeg-turbo decodes it here: 8-bit gray or YCbCr/RGB, a DCT frame it can scale."""
        return (self.sof in _SCALABLE_SOF and self.precision == 8 and self.components in (1, 3)
                and self.width > 0 and self.height > 0)


def region_decoder_note(augment: str | None, reduced_decode: bool) -> str | None:
    """What the server logs at start when its random crops will be decoded without the region decoder
    (`_jpegregion` not built), or None."""
    if _jpegregion is not None or not reduced_decode or not augment:
        return None
    from .augment import Stage, parse_augment

    if not any(op.stage is Stage.SOURCE for op in parse_augment(augment)):
        return None
    return ("random crops are decoded by simplejpeg, at about 1.2x the CPU per image: the region decoder "
            "(loader_server.pipeline._jpegregion) was not built when this package was installed; install gcc "
            "and libjpeg's headers (`bash .ci/build-deps` from the repository, or `apt-get install gcc "
            "libjpeg-dev`) and reinstall the package")


def decoders_line() -> str:
    """Which decoders this process runs, as the server logs it once at start: the region decoder with the
    identity of the libjpeg it loaded (`REGION_DECODER`, and the file), or that it is not built and what that
    costs; simplejpeg's and OpenCV's versions."""
    if REGION_DECODER is None:
        region = ("region decoder not built (a crop's window is decoded by simplejpeg instead, with the columns "
                  "beside it: random crops cost about 1.2x the CPU per image)")
    else:
        where = f" ({LOADED_LIBJPEG.path})" if isinstance(LOADED_LIBJPEG, LoadedLibrary) else ""
        region = f"region decoder {REGION_DECODER}{where}"
    return (f"decoders: {region}; simplejpeg {simplejpeg.__version__} (JPEG); OpenCV {cv2.__version__} (other "
            "images, and JPEGs libjpeg-turbo refuses)")


def jpeg_info(data: bytes) -> JpegInfo | None:
    """The frame header, the first scan header and the EXIF orientation of a JPEG, or None if
    `data` is not a parsable JPEG (no frame header before the first scan).

    Markers are found as libjpeg finds them (``next_marker``, ``skip_variable`` in jdmarker.c), so
    that the size read here is the size every libjpeg decoder (simplejpeg's, OpenCV's) decodes:
    bytes between segments that are not a marker are skipped (libjpeg warns, and decodes on), and
    a segment whose length field is under 2 ends after that field. Otherwise a hostile file could
    hide its frame header from this parser (and from ``--max-pixels``) while OpenCV decodes it.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i, orientation, frame, scan_components = 2, 0, None, -1
    while i + 4 < n:
        if data[i] != 0xFF or data[i + 1] == 0x00:  # not a marker: libjpeg skips to the next one
            found = _MARKER.search(data, i + 1)
            if found is None:
                break
            i = found.start()
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = max(2, (data[i + 2] << 8) | data[i + 3])  # libjpeg reads no further than a length under 2
        if marker == 0xE1 and not orientation and data[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[i + 10 : i + 2 + length])
        elif marker in _SOF_MARKERS and frame is None:
            if i + 10 > n:
                return None
            count = data[i + 9]
            sampling = data[i + 11 : i + 10 + 3 * count : 3]
            vmax = max((s & 0x0F for s in sampling), default=1) if count > 1 else 1
            frame = (data[i + 4], (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8], count,
                     marker, i, 8 * max(1, vmax))
        elif marker == 0xDA:  # start of scan: the headers end here
            scan_components = data[i + 4]
            break
        i += 2 + length
    if frame is None:
        return None
    precision, height, width, count, sof, at, mcu = frame
    return JpegInfo(width, height, count, precision, sof, at, mcu,
                    single_scan=sof in (0xC0, 0xC1) and scan_components == count, orientation=orientation or 1)


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF TIFF block; 1 when absent or malformed."""
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return 1
    order: Any = "little" if tiff[0] == 0x49 else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header (as stored), or None if `data` is not a parsable JPEG."""
    info = jpeg_info(data)
    return None if info is None else (info.width, info.height)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def header_size(data: bytes) -> tuple[int, int] | None:
    """Image size from the header of a JPEG or PNG, without decoding."""
    return jpeg_size(data) or png_size(data)


def kept_size(width: int, height: int, size: tuple[int, int], mode: str) -> tuple[int, int, int, int]:
    """(kept width, kept height, target width, target height): the part of a `width` x `height`
    region that the resize `mode` keeps, and the size it is resized to (`size` is the output's)."""
    w, h = width, height
    W, H = size
    if mode == "crop":
        if w * H > h * W:
            w = round(h * W / H)
        else:
            h = round(w * H / W)
    elif mode == "letterbox":
        scale = min(W / w, H / h)
        W, H = round(w * scale), round(h * scale)
    return w, h, W, H


def scale_covers(width: int, height: int, size: tuple[int, int], mode: str, m: int) -> bool:
    """Whether a `width` x `height` region decoded at M/8 (`m`) still covers an output of `size` in
    resize `mode` (the kept part at least as large as the target in both directions)."""
    kw, kh, tw, th = kept_size(width, height, size, mode)
    return kw * m >= 8 * tw and kh * m >= 8 * th


def decode_scale(width: int, height: int, size: tuple[int, int], mode: str = "stretch") -> int:
    """M of the M/8 scale at which to decode a `width` x `height` region for an output of `size` in
    resize `mode`: the cheapest scale (`SCALE_COST`) that still covers the output, so that the
    resize only shrinks; 8 (full size) when none does."""
    return next((m for m in _BY_COST if scale_covers(width, height, size, mode, m)), 8)


def stored_box(box: tuple[int, int, int, int], orientation: int, width: int,
               height: int) -> tuple[int, int, int, int]:
    """The region (x, y, w, h) of the stored `width` x `height` pixels that shows, after EXIF
    `orientation`, as `box` of the upright image."""
    x, y, w, h = box
    if orientation == 2:
        return width - x - w, y, w, h
    if orientation == 3:
        return width - x - w, height - y - h, w, h
    if orientation == 4:
        return x, height - y - h, w, h
    if orientation == 5:
        return y, x, h, w
    if orientation == 6:
        return y, height - x - w, h, w
    if orientation == 7:
        return width - y - h, height - x - w, h, w
    if orientation == 8:
        return width - y - h, x, h, w
    return box


def _centre(w: int, h: int, W: int, H: int) -> tuple[int, int]:
    """The size of the centre of a `w` x `h` image that ``--resize crop`` keeps for a `W` x `H` output."""
    if w * H > h * W:  # wider than the output's aspect: the sides are cut
        return max(1, round(h * W / H)), h
    return w, max(1, round(w * H / W))


def _span(start: int, length: int, scale: float, limit: int) -> tuple[int, int]:
    """[a, b) of a scaled image of `limit` pixels that holds source pixels [start, start + length)."""
    a = min(max(0, round(start * scale)), limit - 1)
    return a, min(limit, max(a + 1, round((start + length) * scale)))


class Decoder:
    """Decodes one encoded image and resizes it into a preallocated ``(H, W, C)`` uint8 slot.

    Built from `DecodeOptions` alone (a ServerConfig is cut down to them): whatever decides the
    pixels is there, and so in the cache key.
    """

    def __init__(self, options: DecodeOptions | Any) -> None:
        config = options_of(options, DecodeOptions)
        self.options = config
        self.width, self.height = config.size
        self.mode = config.resize
        self.interpolation = _INTERPOLATION[config.interpolation]
        self.pad_value = config.pad_value
        self.reduce = config.reduced_decode
        self.max_pixels = config.max_pixels
        self.swap_to_rgb = False
        if config.color == "gray":
            self.flags = cv2.IMREAD_GRAYSCALE
        elif config.color == "bgr":
            self.flags = cv2.IMREAD_COLOR
        elif _RGB_FLAG is not None:
            self.flags = _RGB_FLAG
        else:  # pragma: no cover - older OpenCV
            self.flags = cv2.IMREAD_COLOR
            self.swap_to_rgb = True
        # The same channel order from libjpeg-turbo (the RGB flag is the only other choice).
        self.colorspace = {cv2.IMREAD_GRAYSCALE: "GRAY", cv2.IMREAD_COLOR: "BGR"}.get(self.flags, "RGB")
        if self.swap_to_rgb:  # pragma: no cover
            self.colorspace = "RGB"
        # A reduced flag is the colour choice plus a scale bit (IMREAD_REDUCED_COLOR_2 == COLOR | 16).
        self._reduced_flags = {f: self.flags | bits for f, bits in _REDUCE_BITS.items()}
        self._scratch = np.empty(0, np.uint8)

    def reduction(self, width: int, height: int) -> int:
        """OpenCV's path: the largest JPEG scale-down (1, 2, 4 or 8) after which the resize still only
        shrinks, checked for both orientations (OpenCV applies EXIF after decoding)."""
        size, mode = self.options.size, self.mode
        for f in (8, 4, 2):
            if scale_covers(width, height, size, mode, 8 // f) and scale_covers(height, width, size, mode, 8 // f):
                return f
        return 1

    def check(self, data: bytes, path: str) -> tuple[tuple[int, int] | None, JpegInfo | None]:
        """Refuse what is not decoded at all (empty, truncated, too many pixels); the size as stored
        (from a JPEG's or PNG's header, else None) and what a JPEG's headers say."""
        if not data:
            raise DecodeError(path, "empty file", "empty")
        info = None
        if data[:2] == b"\xff\xd8":
            if b"\xff\xd9" not in data[-_JPEG_EOI_SEARCH_BYTES:]:
                # Older libjpeg builds pad a truncated file with grey and only warn: refuse it.
                raise DecodeError(path, "truncated JPEG (no end-of-image marker)", "truncated")
            info = jpeg_info(data)
        size = (info.width, info.height) if info is not None else png_size(data)
        if size is not None:
            if size[0] * size[1] > self.max_pixels:
                raise DecodeError(path, f"image of {size[0]}x{size[1]} pixels exceeds --max-pixels "
                                        f"{self.max_pixels} (a decompression bomb?)", "too_many_pixels")
        return size, info

    def decode(self, data: bytes, path: str, *, reduce: bool = True) -> np.ndarray:
        """Decode bytes to an upright 8-bit image (its own array), raising DecodeError naming `path` on failure.

        A JPEG is decoded at the scale a plain resize would decode it at; `reduce=False` forbids
        that (a user transform before a crop sees the whole image at full size).
        """
        img = self._image(data, path, None, None, reduce)
        assert img is not None
        return img.copy() if np.shares_memory(img, self._scratch) else img

    def _imdecode(self, data: bytes, path: str, f: int) -> np.ndarray:
        flags = self._reduced_flags[f] if f > 1 else self.flags
        try:
            img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
        except cv2.error as exc:
            raise DecodeError(path, f"OpenCV error: {str(exc).strip().splitlines()[-1]}", "opencv_error") from None
        if img is None:
            raise DecodeError(path, "not a decodable image (corrupt, truncated or unsupported format)")
        if img.shape[0] * img.shape[1] > self.max_pixels:  # formats whose header we do not read
            raise DecodeError(path, f"image of {img.shape[1]}x{img.shape[0]} pixels exceeds --max-pixels "
                                    f"{self.max_pixels}", "too_many_pixels")
        if img.dtype != np.uint8:  # pragma: no cover - IMREAD_COLOR/GRAYSCALE already give 8 bits
            img = (img.astype(np.uint16) >> 8).astype(np.uint8) if img.dtype == np.uint16 else img.astype(np.uint8)
        if self.swap_to_rgb:  # pragma: no cover
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        return img

    def decode_into(self, data: bytes, path: str, out: np.ndarray) -> None:
        """Decode and resize into `out`, an ``(H, W, C)`` uint8 view of the batch buffer."""
        self._decode_into(data, path, out, None)

    def decode_region_into(self, data: bytes, path: str, out: np.ndarray,
                           region: Callable[[int, int], tuple[int, int, int, int]]) -> None:
        """Decode only what the region (x, y, w, h) that ``region(width, height)`` draws needs, and resize
        that region into `out` (a SOURCE-stage augmentation: random resized crop).

        The region is drawn from the image's size as a viewer shows it (EXIF applied), read from the
        header before anything is decoded (after decoding only for formats whose header is not read).
        """
        self._decode_into(data, path, out, region)

    def _decode_into(self, data: bytes, path: str, out: np.ndarray,
                     draw: Callable[[int, int], tuple[int, int, int, int]] | None) -> None:
        img = self._image(data, path, draw, out, True)
        if img is not None:
            self.resize_into(img, out)

    def _image(self, data: bytes, path: str, draw: Callable[[int, int], tuple[int, int, int, int]] | None,
               out: np.ndarray | None, reduce: bool) -> np.ndarray | None:
        """The upright pixels of the region `draw` draws (or of the whole image) at the scale the output
        needs; None when they were decoded straight into `out`."""
        size, info = self.check(data, path)
        reduce = reduce and self.reduce
        upright = info.size if info is not None else size
        box = draw(*upright) if draw is not None and upright is not None and min(upright) > 0 else None
        if info is not None and info.scalable:
            try:
                return self._turbo(data, info, box, out, reduce)
            except ValueError:  # refused by libjpeg-turbo: OpenCV decides, as it always did
                pass
        return self._opencv(data, path, box, upright, draw, reduce)

    def _turbo(self, data: bytes, info: JpegInfo, box: tuple[int, int, int, int] | None, out: np.ndarray | None,
               reduce: bool) -> np.ndarray | None:
        """libjpeg-turbo: the region's pixels, upright, at the decode scale; None when decoded straight into `out`."""
        width, height, orientation = info.width, info.height, info.orientation
        region = box or (0, 0, *info.size)
        m = decode_scale(region[2], region[3], self.options.size, self.mode) if reduce else 8
        x, y, w, h = stored_box(region, orientation, width, height)
        channels = 1 if self.colorspace == "GRAY" else 3
        window = box is not None and reduce and info.single_scan  # a baseline crop: only its window decoded
        if (box is None and self.mode == "crop" and out is not None and reduce and info.single_scan
                and _jpegregion is not None):
            try:
                if self._centre_into(data, info, m, channels, out):
                    return None
            except ValueError:  # refused (corrupt data in the window, ...): decoded whole, below
                pass
        if window and _jpegregion is not None:
            try:
                img = self._region(data, info, m, (x, y, w, h), channels)
            except ValueError:  # refused (corrupt data in the window, ...): decoded as before, below
                pass
            else:
                return img if orientation == 1 else _ORIENT[orientation](img)
        rows = height
        if window:  # simplejpeg: stop one MCU row below the crop
            rows = min(height, -(-(y + h) // info.mcu_rows) * info.mcu_rows + info.mcu_rows)
        dw, dh = -(-width * m // 8), -(-rows * m // 8)
        direct = (out is not None and box is None and orientation == 1 and out.shape == (dh, dw, channels)
                  and out.flags.c_contiguous)
        if direct:  # the scaled image is the output: decode straight into the batch slot
            target: np.ndarray | None = out
        elif dw * dh * channels <= _KEEP_SCRATCH_BYTES:
            if self._scratch.size < dw * dh * channels:
                self._scratch = np.empty(dw * dh * channels, np.uint8)
            target = self._scratch
        else:
            target = None
        src: bytes | bytearray = data
        if rows < height:  # the frame header says `rows` lines: libjpeg-turbo decodes no further
            src = bytearray(data)
            src[info.sof_offset + 5 : info.sof_offset + 7] = rows.to_bytes(2, "big")
        img = simplejpeg.decode_jpeg(src, self.colorspace, min_width=dw, min_height=dh, buffer=target,
                                     strict=rows == height)  # a shortened frame leaves data after it
        if img.shape[:2] != (dh, dw):
            raise ValueError(f"decoded {img.shape[1]}x{img.shape[0]}, expected {dw}x{dh}")
        if direct:
            return None
        if box is not None:
            s = m / 8
            y0, y1 = _span(y, h, s, dh)
            x0, x1 = _span(x, w, s, dw)
            img = img[y0:y1, x0:x1]
        if channels == 1:
            img = img[..., 0]
        return img if orientation == 1 else _ORIENT[orientation](img)

    def _centre_into(self, data: bytes, info: JpegInfo, m: int, channels: int, out: np.ndarray) -> bool:
        """``--resize crop`` without a random crop: decode only the centre that `resize_into` keeps of the
        whole image decoded at M/8 (the same rows and columns, so bitwise the same output), and resize it
        into `out`. False, with nothing decoded, when the centre is the whole image."""
        orientation = info.orientation
        dw, dh = -(-info.width * m // 8), -(-info.height * m // 8)
        uw, uh = (dh, dw) if orientation >= 5 else (dw, dh)  # the upright image at M/8
        cw, ch = _centre(uw, uh, self.width, self.height)
        if (cw, ch) == (uw, uh):
            return False
        x, y, w, h = stored_box(((uw - cw) // 2, (uh - ch) // 2, cw, ch), orientation, dw, dh)
        img = self._window(data, m, (dw, dh), (x, y, x + w, y + h), channels)
        if orientation != 1:
            img = _ORIENT[orientation](img)
        cv2.resize(img, (self.width, self.height), dst=out[..., 0] if out.shape[2] == 1 else out,
                   interpolation=self.interpolation)
        return True

    def _region(self, data: bytes, info: JpegInfo, m: int, box: tuple[int, int, int, int],
                channels: int) -> np.ndarray:
        """The stored region `box` (x, y, w, h) at M/8, decoded by `_jpegregion`: the rows above the window
        are only entropy-decoded (jpeg_skip_scanlines), the iMCU columns beside it not decoded
        (jpeg_crop_scanline), nothing below it read. Bitwise the same region of a whole decode at M/8:
        the window asked for is one pixel wider on each side than the region, so that libjpeg's fancy
        upsampling, which treats a window's edge as the image's, never reaches a pixel that is kept.
        ValueError when libjpeg reports any error or warning in what it decoded."""
        assert _jpegregion is not None
        x, y, w, h = box
        dw, dh = -(-info.width * m // 8), -(-info.height * m // 8)
        s = m / 8
        y0, y1 = _span(y, h, s, dh)
        x0, x1 = _span(x, w, s, dw)
        return self._window(data, m, (dw, dh), (x0, y0, x1, y1), channels)

    def _window(self, data: bytes, m: int, scaled: tuple[int, int], span: tuple[int, int, int, int],
                channels: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1) (`span` = (x0, y0, x1, y1)) of the stored image decoded at M/8 (`scaled`:
        its size then), by `_jpegregion`, bitwise those of a whole decode at M/8 (see `_region`)."""
        assert _jpegregion is not None
        dw, dh = scaled
        x0, y0, x1, y1 = span
        a0, a1 = max(0, x0 - 1), min(dw, x1 + 1)
        need = (y1 - y0) * dw * channels  # crop_scanline widens the window leftwards, never past the image
        if need <= _KEEP_SCRATCH_BYTES:
            if self._scratch.size < need:
                self._scratch = np.empty(need, np.uint8)
            target = self._scratch
        else:
            target = np.empty(need, np.uint8)
        start, cw, iw, ih = _jpegregion.decode(data, target, _REGION_COLORSPACE[self.colorspace], m, a0, y0,
                                               a1 - a0, y1 - y0)
        if (iw, ih) != (dw, dh):
            raise ValueError(f"libjpeg scaled to {iw}x{ih}, expected {dw}x{dh}")
        img = target[: (y1 - y0) * cw * channels].reshape(y1 - y0, cw, channels)[:, x0 - start : x1 - start]
        return img[..., 0] if channels == 1 else img

    def _opencv(self, data: bytes, path: str, box: tuple[int, int, int, int] | None,
                upright: tuple[int, int] | None, draw: Callable[[int, int], tuple[int, int, int, int]] | None,
                reduce: bool) -> np.ndarray:
        """OpenCV: the region's pixels, upright (as before, at 1/2, 1/4 or 1/8 where that still covers)."""
        f = 1
        if reduce and upright is not None and min(upright) > 0 and data[:2] == b"\xff\xd8":
            if box is None:
                f = self.reduction(*upright)
            else:  # OpenCV scales by 1/2, 1/4 and 1/8 only
                m = decode_scale(box[2], box[3], self.options.size, self.mode)
                f = 8 // next(p for p in (1, 2, 4, 8) if p >= m)
        img = self._imdecode(data, path, f)
        if draw is None:
            return img
        if box is None or upright is None:  # a format whose size the header did not give
            box, upright = draw(img.shape[1], img.shape[0]), (img.shape[1], img.shape[0])
        x, y, w, h = box
        y0, y1 = _span(y, h, img.shape[0] / upright[1], img.shape[0])
        x0, x1 = _span(x, w, img.shape[1] / upright[0], img.shape[1])
        return img[y0:y1, x0:x1]

    def resize_into(self, img: np.ndarray, out: np.ndarray) -> None:
        """Resize a decoded image into `out` following the configured mode."""
        dst = out[..., 0] if out.shape[2] == 1 else out
        h, w = img.shape[:2]
        W, H = self.width, self.height
        if self.mode == "stretch":
            cv2.resize(img, (W, H), dst=dst, interpolation=self.interpolation)
        elif self.mode == "crop":
            cw, ch = _centre(w, h, W, H)
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            cv2.resize(img[y0 : y0 + ch, x0 : x0 + cw], (W, H), dst=dst, interpolation=self.interpolation)
        else:  # letterbox
            scale = min(W / w, H / h)
            nw, nh = max(1, min(W, round(w * scale))), max(1, min(H, round(h * scale)))
            x0, y0 = (W - nw) // 2, (H - nh) // 2
            dst[...] = self.pad_value
            cv2.resize(img, (nw, nh), dst=dst[y0 : y0 + nh, x0 : x0 + nw], interpolation=self.interpolation)
