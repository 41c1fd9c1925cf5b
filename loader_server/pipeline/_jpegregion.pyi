# The compiled region decoder (_jpegregion.c; built by setup.py, optional).
from typing import Any

import numpy as np

VERSION: int
# The versions of libjpeg's headers at build time; the library run may be another build: loaded_library().
JPEG_LIB_VERSION: int
LIBJPEG_TURBO_VERSION_NUMBER: int

# The shared libjpeg this process runs (dladdr of jpeg_CreateDecompress), None if linked statically.
def loaded_library() -> str | None: ...

def decode(data: bytes | bytearray | memoryview, out: bytearray | memoryview | np.ndarray[Any, Any], colorspace: int,
           scale: int, x: int, y: int, w: int, h: int, /) -> tuple[int, int, int, int]: ...
