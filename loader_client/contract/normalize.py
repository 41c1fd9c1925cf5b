"""uint8 pixels to float32 ``(x / 255 - mean) / std``: one place for the arithmetic.

The server uses it for ``--dtype float32``; the client uses it for ``normalize=True``, which
keeps uint8 on the wire (four times fewer bytes) and converts on the trainer's host, on the
client's background thread.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import numpy as np

__all__ = ["BufferPool", "Normalization"]


class Normalization:
    """Per-channel ``x * scale - offset`` with ``scale = 1 / (255 std)``, ``offset = mean / std``."""

    def __init__(self, channels: int, layout: str = "hwc", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        for name, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != channels:
                raise ValueError(f"`{name}` needs {channels} values, one per channel; got {list(values)}")
        if std is not None and any(v <= 0 for v in std):
            raise ValueError(f"`std` values must be > 0, got {list(std)}")
        std_arr = np.asarray(std if std is not None else (1.0,) * channels, dtype=np.float64)
        self.layout = layout
        self.scale = (1.0 / (255.0 * std_arr)).astype(np.float32)
        self.offset = None
        if mean is not None:
            self.offset = (np.asarray(mean, dtype=np.float64) / std_arr).astype(np.float32)
        self._rows: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def apply(self, src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Convert uint8 `src` (``(..., H, W, C)`` or ``(..., C, H, W)``) into float32 `out`.

        Broadcasting a 3-value scale along the last axis would make numpy loop over 3 elements
        at a time; instead the per-channel values are tiled along a whole image row (HWC) or
        applied per plane (CHW), so every inner loop runs over hundreds of elements.
        """
        if out is None:
            out = np.empty(src.shape, dtype=np.float32)
        if self.layout == "chw":
            scale, offset = self.scale.reshape(-1, 1, 1), self.offset
            offset = None if offset is None else offset.reshape(-1, 1, 1)
            a, o = src, out
        else:
            row = src.shape[-2] * src.shape[-1]
            if row not in self._rows:
                tile = row // len(self.scale)
                self._rows[row] = (np.tile(self.scale, tile),
                                   None if self.offset is None else np.tile(self.offset, tile))
            scale, offset = self._rows[row]
            a, o = src.reshape(-1, row), out.reshape(-1, row)
        np.multiply(a, scale, out=o)
        if offset is not None:
            np.subtract(o, offset, out=o)
        return out


class BufferPool:
    """Recycles output arrays once the trainer has dropped every reference to them.

    A fresh 38 MB float32 batch costs thousands of page faults each time (tens of ms on some
    machines); a pooled one is already mapped. An array handed out is a view of a pooled base;
    a finalizer returns the base when the view (and anything made from it) is gone. At most
    `keep` idle buffers are kept; a trainer that holds many batches just allocates more.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        dtype = np.dtype(dtype)
        with self._lock:
            base = self._idle.pop() if self._idle else None
        if base is None or base.shape != shape or base.dtype != dtype:
            base = np.empty(shape, dtype=dtype)
        view = base[...]
        weakref.finalize(view, self._give_back, base)
        return view

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(base)
