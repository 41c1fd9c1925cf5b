"""Shared-memory arenas: the same-host fast path for batch pixels.

For a client on the same host, the server creates one anonymous arena per session
(``memfd_create``: no name in /dev/shm, nothing to leak when a process is killed) split into
fixed-size slots. Workers decode straight into a slot; only the slot number travels over
ZeroMQ; the client copies the pixels out (one memcpy, so the arrays it returns stay valid
forever) and gives the slot back. That replaces four kernel copies of every batch (worker to
server to client over sockets) with one.

Processes reach the arena through ``/proc/<server pid>/fd/<fd>``, which Linux allows only to
the same user (or a process allowed to ptrace the server); a client that cannot open it
falls back to frames over the socket.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any

import numpy as np

from .errors import ProtocolError
from .protocol import ALLOWED_DTYPES

__all__ = ["Arena", "create_arena", "shm_available"]

_PAGE = mmap.PAGESIZE


def shm_available() -> bool:
    """True where anonymous shared memory can be created and shared (Linux)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def create_arena(name: str, slots: int, slot_bytes: int) -> tuple[int, int]:
    """Create an arena of `slots` page-aligned slots; returns (fd, slot stride in bytes)."""
    stride = math.ceil(max(slot_bytes, 1) / _PAGE) * _PAGE
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, stride * slots)
    except OSError:
        os.close(fd)
        raise
    return fd, stride


class Arena:
    """A mapping of an arena created by the server, opened through its /proc path."""

    def __init__(self, path: str, slots: int, stride: int, *, writable: bool) -> None:
        if not path.startswith("/proc/") or "/fd/" not in path:
            raise ProtocolError(f"shared-memory path {path!r} is not a /proc/PID/fd/N path")
        self.path, self.slots, self.stride = path, slots, stride
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags)
        try:
            size = os.fstat(fd).st_size
            if size < slots * stride:
                raise ProtocolError(f"shared-memory arena {path} holds {size} bytes, expected {slots * stride}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            self._map: mmap.mmap | None = mmap.mmap(fd, slots * stride, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)

    def view(self, slot: int, dtype: Any, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The array of `shape` and `dtype` at the start of `slot`, validated against the slot size."""
        if not (isinstance(slot, int) and 0 <= slot < self.slots):
            raise ProtocolError(f"shared-memory slot {slot!r} is outside 0..{self.slots - 1}")
        if not isinstance(dtype, np.dtype):
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise ProtocolError(f"shared-memory dtype {dtype!r} is not allowed")
            dtype = np.dtype(dtype)
        if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ProtocolError(f"shared-memory shape {shape!r} is not a list of non-negative ints")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.stride:
            raise ProtocolError(f"array of {nbytes} bytes does not fit a {self.stride}-byte slot")
        if self._map is None:
            raise ProtocolError("the shared-memory arena is closed")
        return np.ndarray(tuple(shape), dtype=dtype, buffer=self._map, offset=slot * self.stride)

    def close(self) -> None:
        """Drop this reference to the mapping.

        Never unmap explicitly: numpy arrays made by `view` keep the mmap object as their base
        without holding a buffer export, so an explicit close would leave them dangling. The
        mapping goes away with the last array that uses it.
        """
        self._map = None
