"""The interface every kind of data set implements: what the sampling plan, the server and `check` need.

`datasets.py` opens a data set (`load_dataset`, the list of kinds) and re-exports these names;
a view such as `subset.Subset` implements them over another data set without importing
`datasets.py`.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

__all__ = ["ArrayDataset", "Dataset", "FileDataset"]


@runtime_checkable
class Dataset(Protocol):
    """Samples ``0..len-1`` with their labels: what the sampling plan, the server and `check` need."""

    @property
    def build(self) -> Literal["decode", "gather"]:
        """How a batch is built: "decode" (read and decode files) or "gather" (copy rows)."""

    @property
    def labels(self) -> np.ndarray:
        """One label per sample (any numeric dtype; image data sets use int64)."""

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of the labels 0..k-1 where the data set has them (class folders), else None."""

    @property
    def source(self) -> str:
        """Where the samples come from, for log lines and messages."""

    def __len__(self) -> int: ...

    def fingerprint(self) -> str:
        """A short hash that changes when the samples or labels change (a resumed run checks it)."""

    def describe(self, i: int) -> str:
        """What names sample `i` in a message: a path, or the source and row."""


@runtime_checkable
class FileDataset(Dataset, Protocol):
    """A data set of files that the workers read and decode (build == "decode")."""

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
