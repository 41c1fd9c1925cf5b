# The compiled region decoder (_jpegregion.c; built by setup.py, optional).
from collections.abc import Buffer

VERSION: int
JPEG_LIB_VERSION: int
LIBJPEG_TURBO_VERSION_NUMBER: int

def decode(data: Buffer, out: Buffer, colorspace: int, scale: int, x: int, y: int, w: int, h: int,
           /) -> tuple[int, int, int, int]: ...
