"""Data sets: the interface every kind implements, and `load_dataset`, the one way to open one.

Every command that reads data (``serve``, ``check``, ``cache build``, ``bench``) calls
`load_dataset(config)` and so accepts every kind. **A new kind of data set is a module that
opens it plus one entry in `KINDS`** below (how to recognise its ``--data``, how to open it,
which kind-specific settings it takes). What it opens implements `Dataset` (interface.py,
re-exported here) and is, once and for all, one of two:

* a `ByteDataset` (``build == "decode"``): ``read(i) -> bytes`` and ``version(i)``, what the
  worker's steps read, decode and cache (files, tar members, Parquet rows); a kind whose samples
  are byte ranges of container files only writes the indexing of one file (see packed.py);
* an `ArrayDataset` (``build == "gather"``): rows that workers copy as stored.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loader_client.contract.errors import ConfigError

from ..options import DataOptions, options_of
from ..redaction import redact
from .file_access import check_exists, os_error
from .interface import ArrayDataset, ByteDataset, Dataset, FileDataset, byte_source, row_source
from .remote import is_remote, storage_of

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["KINDS", "ArrayDataset", "ByteDataset", "Dataset", "DatasetKind", "FileDataset", "byte_source",
           "load_dataset", "row_source"]


@dataclass(frozen=True)
class DatasetKind:
    """One kind of data set: how ``--data`` is recognised and opened."""

    name: str
    #: Is ``options.data`` (a path, a pattern or a list of paths) this kind? A kind that must look at objects
    #: to tell lists them with ``storage_of(options)``, as everything that reads the data set's objects does.
    matches: Callable[[DataOptions], bool]
    open: Callable[[DataOptions], Dataset]
    settings: tuple[str, ...] = ()  # the kind-specific settings it uses (others must stay unset)


def _arrays(options: DataOptions) -> Dataset:
    from .arrays import load_arrays

    return load_arrays(options.data, options.labels, options.offsets, options.maxlen, options.pad, options.truncate)


def _is_arrays(options: DataOptions) -> bool:
    from .arrays import is_array_data

    return os.path.exists(options.data) and is_array_data(options.data)


def _tar_shards(options: DataOptions) -> Dataset:
    from .tar_shards import open_tar_shards

    return open_tar_shards(options)


def _parquet_tables(options: DataOptions) -> Dataset:
    from .parquet_tables import open_parquet_tables

    return open_parquet_tables(options)


def _class_folders(options: DataOptions) -> Dataset:
    from .index import load_class_folders

    return load_class_folders(options.data, storage_of(options))


def _list_file(options: DataOptions) -> Dataset:
    from .index import load_list_file

    return load_list_file(options.data, storage_of(options))


def _is_folder(data: str) -> bool:
    """A local folder, or an object prefix (``s3://bucket/prefix/``)."""
    return data.endswith("/") if is_remote(data) else os.path.isdir(data)


def _holds(suffix: str) -> Callable[[DataOptions], bool]:
    def matches(options: DataOptions) -> bool:
        from .packed import looks_like

        return looks_like(options.data, suffix, storage_of(options))

    return matches


#: Every kind of data set, tried in order; the first that matches ``--data`` opens it.
KINDS: tuple[DatasetKind, ...] = (
    DatasetKind("arrays", _is_arrays, _arrays, ("labels", "offsets", "maxlen", "pad", "truncate")),
    DatasetKind("tar shards", _holds(".tar"), _tar_shards, ("json_label", "index_dir")),
    DatasetKind("Parquet tables", _holds(".parquet"), _parquet_tables,
                ("image_column", "label_column", "page_cache_mb", "index_dir")),
    DatasetKind("class folders", lambda options: _is_folder(options.data), _class_folders),
    DatasetKind("list file", lambda options: not _is_folder(options.data), _list_file),
)


def load_dataset(config: ServerConfig | DataOptions) -> Dataset:
    """Open ``config.data`` as whichever kind it is, then take ``config.subset`` of it.

    Every problem (a missing or unreadable path, a malformed file, a setting that does not
    apply to this kind) is a ConfigError naming the path, the setting or the line.
    """
    from .index import MISSING_HINT

    options = options_of(config, DataOptions)
    try:
        kind = next(k for k in KINDS if k.matches(options))
        if kind.name in ("class folders", "list file", "arrays") and not is_remote(options.data):
            check_exists(options.data, "data set", MISSING_HINT)
        _refuse_foreign_settings(options, kind)
        dataset = kind.open(options)
    except StopIteration:
        raise ConfigError(f"data set {redact(config.data)!r} is of no known kind "
                          f"({', '.join(k.name for k in KINDS)})") from None
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
                          f"--data {redact(options.data)} is {kind.name}")
