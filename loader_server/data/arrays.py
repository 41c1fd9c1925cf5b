"""Array data sets: memory-mapped numpy inputs, gathered by index in the workers.

Sources (never loaded whole; the pages a batch needs are read when it is gathered):

* ``--data x.npy --labels y.npy``: one row per sample;
* ``--data arrays.npz``: arrays ``x`` and ``y`` stored uncompressed (``np.savez``);
* ``--data DIR`` holding ``x_*.npy`` and ``y_*.npy`` shards, paired in sorted order;
* ragged sequences: ``--data values.npy --offsets offsets.npy --labels y.npy --maxlen N``,
  sample i being ``values[offsets[i]:offsets[i + 1]]``, padded or truncated to ``maxlen``
  like Keras ``pad_sequences`` (``--pad``/``--truncate`` pre or post, padding value 0).

Object arrays are refused, like every dtype off the wire's allow-list.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from loader_client.contract.errors import ConfigError
from loader_client.contract.protocol import ALLOWED_DTYPES

from .file_access import os_error

__all__ = ["ArrayIndex", "is_array_data", "load_arrays"]


def is_array_data(data: str | os.PathLike[str]) -> bool:
    """True for .npy/.npz files and folders of .npy shards."""
    p = Path(data)
    if p.suffix in (".npy", ".npz"):
        return not p.is_dir()
    if not p.is_dir():
        return False
    try:
        with os.scandir(p) as entries:
            return any(e.name.endswith(".npy") and not e.is_dir() for e in entries)
    except OSError as exc:
        raise os_error(exc, "data folder", p) from None


@dataclass
class ArrayIndex:
    """The array counterpart of DatasetIndex: what BatchBuilder and the server need."""

    shards: list[np.ndarray]  # dense inputs, or [values] for ragged
    starts: np.ndarray  # first sample of each shard, plus the total at the end
    labels: np.ndarray
    source: str
    offsets: np.ndarray | None = None  # ragged: len n + 1
    maxlen: int | None = None
    pad: str = "pre"
    truncate: str = "pre"
    class_names: tuple[str, ...] | None = None
    #: Workers copy rows into the batch, nothing is decoded (see datasets.Dataset).
    build: ClassVar[Literal["decode", "gather"]] = "gather"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.offsets is not None:
            assert self.maxlen is not None
            return (self.maxlen, *self.shards[0].shape[1:])
        return tuple(self.shards[0].shape[1:])

    @property
    def sample_dtype(self) -> str:
        return self.shards[0].dtype.str

    def describe(self, i: int) -> str:
        """What names sample `i` in messages: the source and the row."""
        return f"{self.source}[{i}]"

    def fingerprint(self) -> str:
        """Shapes, dtypes and a sample of the bytes of every array (hashing terabytes is not an option)."""
        h = hashlib.blake2b(digest_size=8)
        arrays = [*self.shards, self.labels] + ([self.offsets] if self.offsets is not None else [])
        for a in arrays:
            h.update(f"{a.shape}{a.dtype.str}".encode())
            flat = a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else np.ascontiguousarray(a).view(np.uint8)
            h.update(flat[: 1 << 16].tobytes())
            h.update(flat[-(1 << 16):].tobytes())
        h.update(f"{self.maxlen}{self.pad}{self.truncate}".encode())
        return h.hexdigest()

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Copy the samples at `indices` into `out` (len(indices) rows)."""
        if self.offsets is not None:
            self._gather_ragged(indices, out)
            return
        if len(self.shards) == 1:
            np.take(self.shards[0], indices, axis=0, out=out)
            return
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for slot, (i, s) in enumerate(zip(indices, shard_of, strict=True)):
            out[slot] = self.shards[s][i - self.starts[s]]

    def _gather_ragged(self, indices: np.ndarray, out: np.ndarray) -> None:
        assert self.offsets is not None and self.maxlen is not None
        values, maxlen = self.shards[0], self.maxlen
        out[...] = 0
        for slot, i in enumerate(indices):
            seq = values[self.offsets[i] : self.offsets[i + 1]]
            if len(seq) > maxlen:
                seq = seq[-maxlen:] if self.truncate == "pre" else seq[:maxlen]
            if self.pad == "pre":
                out[slot, maxlen - len(seq) :] = seq
            else:
                out[slot, : len(seq)] = seq


def _load(path: str, what: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: {exc} (object arrays are refused; store numbers)") from None
    except OSError as exc:
        raise os_error(exc, what, path) from None
    _check_dtype(arr, path)
    return arr  # type: ignore[no-any-return]


def _check_dtype(arr: np.ndarray, path: str) -> None:
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise ConfigError(f"{path}: dtype {arr.dtype} is not allowed (numbers and bool only; ragged sequences "
                          "go as a values array plus --offsets)")
    if arr.ndim == 0:
        raise ConfigError(f"{path}: a scalar is not a data set; need one row per sample")


def _npz_member(path: str, name: str) -> np.ndarray:
    """Memory-map one uncompressed member of an .npz file."""
    with zipfile.ZipFile(path) as z:
        try:
            info = z.getinfo(name + ".npy")
        except KeyError:
            raise ConfigError(f"{path} has no array {name!r} (has {', '.join(n[:-4] for n in z.namelist())})") from None
        if info.compress_type != zipfile.ZIP_STORED:
            raise ConfigError(f"{path}: {name!r} is compressed and cannot be memory-mapped; save it with np.savez, "
                              "not np.savez_compressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        data_start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
            local[28:30], "little")
        f.seek(data_start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ConfigError(f"{path}: {name!r} holds Python objects, which are refused")
    arr = np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)
    _check_dtype(arr, f"{path}:{name}")
    return arr


def load_arrays(data: str, labels: str | None, offsets: str | None, maxlen: int | None,
                pad: str = "pre", truncate: str = "pre") -> ArrayIndex:
    """Open an array data set memory-mapped, checking shapes and dtypes once at start-up."""
    p = Path(data)
    if p.is_dir():
        xs = sorted(str(f) for f in p.glob("x_*.npy"))
        ys = sorted(str(f) for f in p.glob("y_*.npy"))
        if not xs or len(xs) != len(ys):
            raise ConfigError(f"folder {data} must hold x_*.npy and y_*.npy shards in pairs "
                              f"(found {len(xs)} x and {len(ys)} y)")
        shards = [_load(x, "input shard") for x in xs]
        label_parts = [_load(y, "label shard") for y in ys]
        for x, y, xs_name in zip(shards, label_parts, xs, strict=True):
            if len(x) != len(y) or x.shape[1:] != shards[0].shape[1:] or x.dtype != shards[0].dtype:
                raise ConfigError(f"shard {xs_name}: {len(x)} rows of {x.shape[1:]} {x.dtype} against {len(y)} "
                                  f"labels; every shard needs the same sample shape and dtype, one label a row")
        label_arr = np.concatenate(label_parts)  # labels are small: one value per sample
    elif p.suffix == ".npz":
        try:
            shards, label_arr = [_npz_member(data, "x")], _npz_member(data, "y")
        except OSError as exc:
            raise os_error(exc, "arrays", data) from None
        except zipfile.BadZipFile as exc:
            raise ConfigError(f"{data} is not a valid .npz file ({exc}); save it with np.savez") from None
    else:
        if labels is None:
            raise ConfigError(f"{data} needs --labels y.npy (one label per sample)")
        shards, label_arr = [_load(data, "inputs")], _load(labels, "labels")
    if offsets is not None:
        if maxlen is None or maxlen < 1:
            raise ConfigError("ragged sequences need --maxlen N (the padded length)")
        off = np.asarray(_load(offsets, "offsets"), dtype=np.int64)
        if off.ndim != 1 or len(off) != len(label_arr) + 1 or off[0] != 0 or np.any(np.diff(off) < 0) \
                or off[-1] > len(shards[0]):
            raise ConfigError(f"--offsets {offsets} must be {len(label_arr) + 1} non-decreasing positions from 0 "
                              f"to at most {len(shards[0])}")
        starts = np.array([0, len(label_arr)], dtype=np.int64)
        name = os.path.basename(os.path.normpath(data))
        return ArrayIndex(shards, starts, label_arr, name, off, maxlen, pad, truncate)
    starts = np.cumsum([0] + [len(s) for s in shards]).astype(np.int64)
    if starts[-1] != len(label_arr):
        raise ConfigError(f"{data}: {starts[-1]} samples but {len(label_arr)} labels; need one label per sample")
    if starts[-1] == 0:
        raise ConfigError(f"{data} holds no samples")
    return ArrayIndex(shards, starts, label_arr, os.path.basename(os.path.normpath(data)))
