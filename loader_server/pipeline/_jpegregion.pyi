# The compiled region decoder (_jpegregion.c; built by setup.py, optional).
from typing import Any

import numpy as np

VERSION: int
JPEG_LIB_VERSION: int
LIBJPEG_TURBO_VERSION_NUMBER: int

def decode(data: bytes | bytearray | memoryview, out: bytearray | memoryview | np.ndarray[Any, Any], colorspace: int,
           scale: int, x: int, y: int, w: int, h: int, /) -> tuple[int, int, int, int]: ...
