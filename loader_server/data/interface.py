"""The interface every kind of data set implements: what the sampling plan, the server and `check` need.

`datasets.py` opens a data set (`load_dataset`, the list of kinds) and re-exports these names;
a view such as `subset.Subset` implements them over another data set without importing
`datasets.py`. What a data set is, is decided once, when it opens:

* a `ByteDataset` (``build == "decode"``): ``read(i) -> bytes`` and ``version(i)``, what the
  worker's steps read, decode and cache (files, tar members, Parquet rows);
* an `ArrayDataset` (``build == "gather"``): rows that workers copy as stored.

Its users take it as one or the other once, with `byte_source` or `row_source`.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

from .reading import Version

__all__ = ["ArrayDataset", "ByteDataset", "Dataset", "FileDataset", "byte_source", "row_source"]


@runtime_checkable
class Dataset(Protocol):
    """Samples ``0..len-1`` with their labels: what the sampling plan, the server and `check` need."""

    @property
    def build(self) -> Literal["decode", "gather"]:
        """How a batch is built: "decode" (read and decode encoded samples) or "gather" (copy rows)."""

    @property
    def labels(self) -> np.ndarray:
        """One label per sample (any numeric dtype; image data sets use int64)."""

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of the labels 0..k-1 where the data set has them (class folders, Parquet), else None."""

    @property
    def source(self) -> str:
        """Where the samples come from, for log lines and messages."""

    def __len__(self) -> int: ...

    def fingerprint(self) -> str:
        """A short hash that changes when the samples or labels change (a resumed run checks it)."""

    def describe(self, i: int) -> str:
        """What names sample `i` in a message: a path, ``shard.tar:member``, ``file.parquet:row``, or the
        source and row."""


@runtime_checkable
class ByteDataset(Dataset, Protocol):
    """A data set whose samples are encoded bytes that the workers read and decode (build == "decode")."""

    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        """The bytes of sample `i`; DecodeError naming it (`describe`) when they cannot be read."""

    def version(self, i: int) -> Version | None:
        """What a cached record of sample `i` is checked against (None: unknown now, never valid).

        A file: size, mtime, inode, device; a member of a container file: its offset there and the
        file's mtime, size and inode.
        """


@runtime_checkable
class FileDataset(ByteDataset, Protocol):
    """A byte data set of image files (list files, class folders): each sample also has a path."""

    def path(self, i: int) -> str: ...


@runtime_checkable
class ArrayDataset(Dataset, Protocol):
    """A data set of rows that the workers copy as stored (build == "gather")."""

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    @property
    def sample_dtype(self) -> str: ...

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Copy the samples at `indices` into `out` (``len(indices)`` rows)."""


def byte_source(dataset: Dataset) -> ByteDataset:
    """`dataset` as the byte source it is (``build == "decode"``): the one check, made once by its user."""
    if dataset.build != "decode" or not isinstance(dataset, ByteDataset):
        raise TypeError(f"{dataset.source} is not a data set of encoded samples (build {dataset.build!r})")
    return dataset


def row_source(dataset: Dataset) -> ArrayDataset:
    """`dataset` as the rows it is (``build == "gather"``): the one check, made once by its user."""
    if dataset.build != "gather" or not isinstance(dataset, ArrayDataset):
        raise TypeError(f"{dataset.source} is not a data set of rows (build {dataset.build!r})")
    return dataset
