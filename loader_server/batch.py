"""Collating a batch: read, decode and resize each sample straight into the batch buffer.

Pure work over files and arrays, no sockets: the worker process calls `BatchBuilder.build`
and sends what it returns.
"""

from __future__ import annotations

import numpy as np

from .config import ServerConfig
from .decode import Decoder, read_file
from .index import DatasetIndex

__all__ = ["BatchBuilder"]


class BatchBuilder:
    """Builds the arrays of one batch (``x``, ``y``, ``index``) from sample indices."""

    def __init__(self, config: ServerConfig, index: DatasetIndex) -> None:
        self.config = config
        self.index = index
        self.decoder = Decoder(config)
        w, h = config.size
        self._hwc_shape = (h, w, config.channels)
        self._scratch: np.ndarray | None = None  # uint8 HWC staging for float32 or CHW output
        self._scale: np.ndarray | None = None
        self._offset: np.ndarray | None = None
        if config.dtype == "float32":
            mean = np.asarray(config.mean or (0.0,) * config.channels, dtype=np.float64)
            std = np.asarray(config.std or (1.0,) * config.channels, dtype=np.float64)
            # (x / 255 - mean) / std  ==  x * scale - offset, one multiply and one subtract.
            self._scale = (1.0 / (255.0 * std)).astype(np.float32)
            self._offset = (mean / std).astype(np.float32)
            if config.layout == "chw":
                self._scale = self._scale.reshape(-1, 1, 1)
                self._offset = self._offset.reshape(-1, 1, 1)

    def allocate(self, batch_size: int | None = None) -> np.ndarray:
        """A fresh output buffer ``x`` for `batch_size` samples in the configured dtype and layout."""
        n = self.config.batch_size if batch_size is None else batch_size
        return np.empty((n, *self.config.image_shape), dtype=self.config.dtype)

    def build(self, indices: np.ndarray, x: np.ndarray) -> dict[str, np.ndarray]:
        """Fill `x` (from `allocate`, at least ``len(indices)`` long) and return the batch arrays.

        Raises DecodeError naming the file of the first sample that fails.
        """
        n = len(indices)
        x = x[:n]
        direct = self.config.dtype == "uint8" and self.config.layout == "hwc"
        staging = x if direct else self._staging(n)
        index = self.index
        for slot, i in enumerate(indices):
            path = index.path(int(i))
            self.decoder.decode_into(read_file(path), path, staging[slot])
        if not direct:
            self._finish(staging, x)
        labels = index.labels[indices]
        return {"x": x, "y": labels, "index": np.ascontiguousarray(indices, dtype=np.int64)}

    def _staging(self, n: int) -> np.ndarray:
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = np.empty((max(n, self.config.batch_size), *self._hwc_shape), dtype=np.uint8)
        return self._scratch[:n]

    def _finish(self, hwc: np.ndarray, x: np.ndarray) -> None:
        """Convert the uint8 HWC staging batch to the output dtype and layout in one pass each."""
        src = hwc.transpose(0, 3, 1, 2) if self.config.layout == "chw" else hwc
        if self._scale is None:
            np.copyto(x, src)
            return
        np.multiply(src, self._scale, out=x, casting="unsafe")
        np.subtract(x, self._offset, out=x)
