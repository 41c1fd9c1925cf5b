"""Data sets: the interface every kind implements, and `load_dataset`, the one way to open one.

Every command that reads data (``serve``, ``check``, ``cache build``, ``bench``) calls
`load_dataset(config)` and so accepts every kind. **A new kind of data set is a module that
opens it plus one entry in `KINDS`** below (how to recognise its ``--data``, how to open it,
which kind-specific settings it takes). What it opens is, once and for all, one of two:

* a `ByteDataset` (``build == "decode"``): ``read(i) -> bytes`` and ``version(i)``, what the
  worker's steps read, decode and cache (files, tar members, Parquet rows); a kind whose samples
  are byte ranges of container files only writes the indexing of one file (see packed.py);
* an `ArrayDataset` (``build == "gather"``): rows that workers copy as stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from loader_client.errors import ConfigError

from ..options import DataOptions, options_of
from .file_access import check_exists, os_error
from .reading import Version
from .remote import is_remote

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["Dataset", "ByteDataset", "FileDataset", "ArrayDataset", "DatasetKind", "KINDS", "load_dataset",
           "byte_source", "row_source"]


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
class ByteDataset(Dataset, Protocol):
    """A data set whose samples are encoded bytes that the workers read and decode (build == "decode")."""

    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        """The bytes of sample `i`; DecodeError naming it (`describe`) when they cannot be read."""

    def version(self, i: int) -> Version | None:
        """What a cached record of sample `i` is checked against (None: unknown now, never valid).

        A file: size, mtime, inode, device; a member of a container file: its offset there and the
        file's mtime, size and inode.
        """


#: The data sets of image files (list files, class folders): byte data sets that also have paths.
FileDataset = ByteDataset


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


@dataclass(frozen=True)
class DatasetKind:
    """One kind of data set: how ``--data`` is recognised and opened."""

    name: str
    matches: Callable[[str], bool]  # --data -> is it this kind? (a path, a pattern or a list of paths)
    open: Callable[[DataOptions], Dataset]
    settings: tuple[str, ...] = ()  # the kind-specific settings it uses (others must stay unset)


def _arrays(options: DataOptions) -> Dataset:
    from .arrays import load_arrays

    return load_arrays(options.data, options.labels, options.offsets, options.maxlen, options.pad, options.truncate)


def _is_arrays(data: str) -> bool:
    from .arrays import is_array_data

    return os.path.exists(data) and is_array_data(data)


def _tar_shards(options: DataOptions) -> Dataset:
    from .tar_shards import open_tar_shards

    return open_tar_shards(options)


def _parquet_tables(options: DataOptions) -> Dataset:
    from .parquet_tables import open_parquet_tables

    return open_parquet_tables(options)


def _class_folders(options: DataOptions) -> Dataset:
    from .index import load_class_folders

    return load_class_folders(options.data, options.remote() if is_remote(options.data) else None)


def _list_file(options: DataOptions) -> Dataset:
    from .index import load_list_file

    return load_list_file(options.data, options.remote() if is_remote(options.data) else None)


def _is_folder(data: str) -> bool:
    """A local folder, or an object prefix (``s3://bucket/prefix/``)."""
    return data.endswith("/") if is_remote(data) else os.path.isdir(data)


def _holds(suffix: str) -> Callable[[str], bool]:
    def matches(data: str) -> bool:
        from .packed import looks_like

        return looks_like(data, suffix)

    return matches


#: Every kind of data set, tried in order; the first that matches ``--data`` opens it.
KINDS: tuple[DatasetKind, ...] = (
    DatasetKind("arrays", _is_arrays, _arrays, ("labels", "offsets", "maxlen", "pad", "truncate")),
    DatasetKind("tar shards", _holds(".tar"), _tar_shards, ("json_label", "index_dir")),
    DatasetKind("Parquet tables", _holds(".parquet"), _parquet_tables, ("image_column", "label_column", "index_dir")),
    DatasetKind("class folders", _is_folder, _class_folders),
    DatasetKind("list file", lambda data: not _is_folder(data), _list_file),
)


def load_dataset(config: ServerConfig | DataOptions) -> Dataset:
    """Open ``config.data`` as whichever kind it is, then take ``config.subset`` of it.

    Every problem (a missing or unreadable path, a malformed file, a setting that does not
    apply to this kind) is a ConfigError naming the path, the setting or the line.
    """
    from .index import MISSING_HINT

    options = options_of(config, DataOptions)
    try:
        kind = next(k for k in KINDS if k.matches(options.data))
        if kind.name in ("class folders", "list file", "arrays") and not is_remote(options.data):
            check_exists(options.data, "data set", MISSING_HINT)
        _refuse_foreign_settings(options, kind)
        dataset = kind.open(options)
    except StopIteration:
        raise ConfigError(f"data set {config.data!r} is of no known kind ({', '.join(k.name for k in KINDS)})") \
            from None
    except OSError as exc:  # a kind that let one through: still a message, never a traceback
        raise os_error(exc, "data set", options.data) from None
    if len(dataset) == 0:
        raise ConfigError(f"data set {dataset.source} holds no samples")
    if options.subset != "all":
        from .subset import take_subset

        dataset = take_subset(dataset, options.subset, options.val_fraction, options.split_seed)
    return dataset


def _refuse_foreign_settings(options: DataOptions, kind: DatasetKind) -> None:
    defaults = DataOptions.__dataclass_fields__
    owners = {name: k.name for k in KINDS for name in k.settings}
    given = [name for name in owners
             if name not in kind.settings and getattr(options, name) != defaults[name].default]
    if given:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        whose = sorted({"array data sets" if k.name == "arrays" else k.name
                        for k in KINDS if set(given) & set(k.settings)})
        raise ConfigError(f"{flags} {'apply' if len(given) > 1 else 'applies'} to {' and '.join(whose)} only; "
                          f"--data {options.data} is {kind.name}")
