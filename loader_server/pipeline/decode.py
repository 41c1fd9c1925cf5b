"""Decoding and resizing: pure functions from encoded bytes to pixels in a caller's buffer.

Behaviour, the same for every file type OpenCV reads:

* colour images decode straight to RGB (``IMREAD_COLOR_RGB``) or BGR; ``gray`` gives one channel;
* grayscale and palette images are expanded to three channels; an alpha channel is dropped
  (the stored colour of transparent pixels is kept, nothing is composited);
* 16-bit images are scaled to 8 bits (value // 256), as ``IMREAD_COLOR`` does;
* JPEG EXIF orientation is applied, so the image is upright as a viewer shows it.

Resize modes: ``stretch`` to WxH (the classic generator), ``letterbox`` (keep aspect, pad with
``pad_value``), ``crop`` (scale the shorter side to fit, cut the centre). The crop is fused:
only the centre region of the source is resized, straight into the output buffer.

Reduced-size decoding (on by default): a JPEG at least 2, 4 or 8 times larger than what the
resize needs, in both orientations, is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT
scaling (``IMREAD_REDUCED_*``), which is much cheaper; the size is read from the JPEG header
first. The resize never upsamples what the reduction removed, but pixels differ slightly from
a full-size decode followed by the same resize.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from ..data.reading import DEFAULT_MAX_FILE_BYTES, DecodeError, read_file
from ..options import DecodeOptions, options_of

__all__ = ["DEFAULT_MAX_FILE_BYTES", "DecodeError", "Decoder", "jpeg_size", "png_size", "read_file"]

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
# Some writers append padding or metadata after the end-of-image marker; look this far back.
_JPEG_EOI_SEARCH_BYTES = 4096


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if `data` is not a parsable JPEG."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6]
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if `data` is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def header_size(data: bytes) -> tuple[int, int] | None:
    """Image size from the header of a JPEG or PNG, without decoding."""
    return jpeg_size(data) or png_size(data)


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
        # A reduced flag is the colour choice plus a scale bit (IMREAD_REDUCED_COLOR_2 == COLOR | 16).
        self._reduced_flags = {f: self.flags | bits for f, bits in _REDUCE_BITS.items()}

    def reduction(self, width: int, height: int) -> int:
        """Largest JPEG scale-down (1, 2, 4 or 8) after which the resize still only shrinks.

        Checked for both orientations, since EXIF may rotate the image after decoding.
        """
        for f in (8, 4, 2):
            if self._fits(width, height, f) and self._fits(height, width, f):
                return f
        return 1

    def _fits(self, w: int, h: int, f: int) -> bool:
        W, H = self.width, self.height
        if self.mode == "crop":
            if w * H > h * W:
                w = round(h * W / H)
            else:
                h = round(w * H / W)
        elif self.mode == "letterbox":
            scale = min(W / w, H / h)
            W, H = round(w * scale), round(h * scale)
        return w // f >= W and h // f >= H

    def decode(self, data: bytes, path: str, *, reduce: bool = True) -> np.ndarray:
        """Decode bytes to an 8-bit image, raising DecodeError naming `path` on failure.

        `reduce=False` forbids reduced-size decoding (a random crop needs every pixel).
        """
        if not data:
            raise DecodeError(path, "empty file", "empty")
        if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-_JPEG_EOI_SEARCH_BYTES:]:
            # Older libjpeg builds pad a truncated file with grey and only warn: refuse it.
            raise DecodeError(path, "truncated JPEG (no end-of-image marker)", "truncated")
        flags = self.flags
        size = header_size(data)
        if size is not None:
            if size[0] * size[1] > self.max_pixels:
                raise DecodeError(path, f"image of {size[0]}x{size[1]} pixels exceeds --max-pixels "
                                        f"{self.max_pixels} (a decompression bomb?)", "too_many_pixels")
            if reduce and self.reduce and size[0] > 0 and size[1] > 0 and data[:2] == b"\xff\xd8":
                f = self.reduction(*size)
                if f > 1:
                    flags = self._reduced_flags[f]
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

    def decode_region_into(self, data: bytes, path: str, out: np.ndarray,
                           region: Callable[[int, int], tuple[int, int, int, int]]) -> None:
        """Decode, take the region (x, y, w, h) that ``region(width, height)`` draws of the full-size
        source, and resize only that into `out` (a SOURCE-stage augmentation: random resized crop).

        The region is drawn from the source as a viewer shows it (EXIF applied), with every pixel
        decoded. A decoder that decodes less (a scaled or windowed JPEG decode) replaces this method.
        """
        img = self.decode(data, path, reduce=False)
        x0, y0, w, h = region(img.shape[1], img.shape[0])
        self.resize_into(img[y0 : y0 + h, x0 : x0 + w], out)

    def decode_into(self, data: bytes, path: str, out: np.ndarray) -> None:
        """Decode and resize into `out`, an ``(H, W, C)`` uint8 view of the batch buffer."""
        self.resize_into(self.decode(data, path), out)

    def resize_into(self, img: np.ndarray, out: np.ndarray) -> None:
        """Resize a decoded image into `out` following the configured mode."""
        dst = out[..., 0] if out.shape[2] == 1 else out
        h, w = img.shape[:2]
        W, H = self.width, self.height
        if self.mode == "stretch":
            cv2.resize(img, (W, H), dst=dst, interpolation=self.interpolation)
        elif self.mode == "crop":
            if w * H > h * W:  # source wider than the target aspect: cut the sides
                cw, ch = max(1, round(h * W / H)), h
            else:
                cw, ch = w, max(1, round(w * H / W))
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            cv2.resize(img[y0 : y0 + ch, x0 : x0 + cw], (W, H), dst=dst, interpolation=self.interpolation)
        else:  # letterbox
            scale = min(W / w, H / h)
            nw, nh = max(1, min(W, round(w * scale))), max(1, min(H, round(h * scale)))
            x0, y0 = (W - nw) // 2, (H - nh) // 2
            dst[...] = self.pad_value
            cv2.resize(img, (nw, nh), dst=dst[y0 : y0 + nh, x0 : x0 + nw], interpolation=self.interpolation)
