"""Named subsets of one data set: a deterministic train/validation split.

``--subset val --val-fraction F --split-seed S`` serves ``round(n * F)`` samples chosen by a
permutation keyed by S alone (not by the shuffle ``--seed``); ``--subset train`` serves the
other ones. Two servers started on the same data with the same F and S therefore never share a
sample, and together they serve all of them. The split depends on the number of samples and
their order: adding a line to a list file gives a new split (and a new fingerprint).

A subset is a view: it keeps the positions of its samples in the parent (int64, sorted, so
reads keep the parent's order) and delegates to the parent, so it is a data set of the same
kind. Sample indices reported to clients count within the subset.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from loader_client.contract.errors import ConfigError

from .interface import ArrayDataset, ByteDataset, Dataset, FileDataset, byte_source, row_source
from .reading import Version

__all__ = ["Subset", "root_of", "split_indices", "take_subset"]

#: Keeps the split's random stream apart from every other use of a seed.
_SPLIT_STREAM = 0x5B17


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions of a data set of `n` samples: disjoint, sorted, together all of ``range(n)``."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"`val_fraction` must be between 0 and 1 (exclusive), got {val_fraction}")
    n_val = int(n * val_fraction + 0.5)
    if not 1 <= n_val <= n - 1:
        raise ConfigError(f"`val_fraction` {val_fraction} of {n} samples gives {n_val} validation samples: "
                          f"each of train and val needs at least one; choose a fraction between {1 / n:.3g} and "
                          f"{1 - 1 / n:.3g}" if n > 1 else f"a data set of {n} sample cannot be split")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([split_seed, _SPLIT_STREAM])))
    order = rng.permutation(n).astype(np.int64)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def root_of(dataset: Dataset) -> Dataset:
    """The data set a subset (or a subset of one) is taken from; `dataset` itself when it is none."""
    while isinstance(dataset, Subset):
        dataset = dataset.parent
    return dataset


def take_subset(dataset: Dataset, name: str, val_fraction: float, split_seed: int) -> Subset:
    """The `name` ("train" or "val") subset of `dataset`."""
    if name not in ("train", "val"):
        raise ConfigError(f"`subset` must be one of all, train, val; got {name!r}")
    train, val = split_indices(len(dataset), val_fraction, split_seed)
    return Subset(dataset, train if name == "train" else val, name, val_fraction, split_seed)


@dataclass(frozen=True, eq=False)
class Subset:
    """The samples `keep` of `parent`, renumbered 0..len-1; a data set of the parent's kind."""

    parent: Dataset
    keep: np.ndarray  # int64 positions in parent, sorted
    name: str
    val_fraction: float
    split_seed: int
    labels: np.ndarray = field(init=False)
    _bytes: ByteDataset | None = field(init=False, repr=False)  # the parent, when it is a byte source
    _rows: ArrayDataset | None = field(init=False, repr=False)  # the parent, when it holds rows
    _files: FileDataset | None = field(init=False, repr=False)  # the parent, when its samples are files

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.ascontiguousarray(self.parent.labels[self.keep]))
        decode = self.parent.build == "decode"
        object.__setattr__(self, "_bytes", byte_source(self.parent) if decode else None)
        object.__setattr__(self, "_rows", None if decode else row_source(self.parent))
        object.__setattr__(self, "_files", self.parent if isinstance(self.parent, FileDataset) else None)

    @property
    def build(self) -> Literal["decode", "gather"]:
        return self.parent.build

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return self.parent.class_names

    @property
    def source(self) -> str:
        return (f"{self.parent.source}, subset {self.name} ({len(self)} of {len(self.parent)}, val_fraction "
                f"{self.val_fraction:g}, split_seed {self.split_seed})")

    def __len__(self) -> int:
        return len(self.keep)

    def fingerprint(self) -> str:
        """The parent's, with the split: a state saved on `train` is refused by a `val` server."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{self.parent.fingerprint()}|{self.name}|{self.val_fraction!r}|{self.split_seed}".encode())
        return h.hexdigest()

    def describe(self, i: int) -> str:
        return self.parent.describe(int(self.keep[i]))

    # Bytes (build == "decode")
    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        assert self._bytes is not None
        return self._bytes.read(int(self.keep[i]), max_bytes)

    def version(self, i: int) -> Version | None:
        assert self._bytes is not None
        return self._bytes.version(int(self.keep[i]))

    def remote_range(self, i: int, max_bytes: int | None = None) -> Any:
        """The parent's plain range of sample `i` (packed.PackedIndex.remote_range), None when it has none."""
        whole = getattr(self._bytes, "remote_range", None)
        return None if whole is None else whole(int(self.keep[i]), max_bytes)

    def location(self) -> str:
        assert self._bytes is not None
        return self._bytes.location()

    def path(self, i: int) -> str:
        if self._files is None:  # as the parent would answer: it has no paths
            raise AttributeError(f"{self.parent.source} has no file paths (its samples are not files)")
        return self._files.path(int(self.keep[i]))

    # Rows (build == "gather")
    @property
    def sample_shape(self) -> tuple[int, ...]:
        assert self._rows is not None
        return self._rows.sample_shape

    @property
    def sample_dtype(self) -> str:
        assert self._rows is not None
        return self._rows.sample_dtype

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        assert self._rows is not None
        self._rows.gather(self.keep[indices], out)
