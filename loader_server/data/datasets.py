"""Data sets: the interface every kind implements, and `load_dataset`, the one way to open one.

Every command that reads data (``serve``, ``check``, ``bench``) calls `load_dataset(config)`
and so accepts every kind. **A new kind of data set is one entry in `KINDS`** below: how to
recognise its ``--data``, how to open it, and which kind-specific settings it takes; the object
it returns implements `Dataset` (defined in interface.py, re-exported here) and either `path(i)`
(files that workers decode) or `sample_shape`/`sample_dtype`/`gather` (rows that workers copy).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loader_client.contract.errors import ConfigError

from .file_access import check_exists, os_error
from .interface import ArrayDataset, Dataset, FileDataset

if TYPE_CHECKING:
    from ..config import ServerConfig

__all__ = ["KINDS", "ArrayDataset", "Dataset", "DatasetKind", "FileDataset", "load_dataset"]


@dataclass(frozen=True)
class DatasetKind:
    """One kind of data set: how ``--data`` is recognised and opened."""

    name: str
    matches: Callable[[str, os.stat_result], bool]  # (--data, its stat) -> is it this kind?
    open: Callable[[ServerConfig], Dataset]
    settings: tuple[str, ...] = ()  # the kind-specific settings it uses (others must stay unset)


def _arrays(config: ServerConfig) -> Dataset:
    from .arrays import load_arrays

    return load_arrays(config.data, config.labels, config.offsets, config.maxlen, config.pad, config.truncate)


def _is_arrays(data: str, st: os.stat_result) -> bool:
    from .arrays import is_array_data

    return is_array_data(data)


def _class_folders(config: ServerConfig) -> Dataset:
    from .index import load_class_folders

    return load_class_folders(config.data)


def _list_file(config: ServerConfig) -> Dataset:
    from .index import load_list_file

    return load_list_file(config.data)


#: Every kind of data set, tried in order; the first that matches ``--data`` opens it.
KINDS: tuple[DatasetKind, ...] = (
    DatasetKind("arrays", _is_arrays, _arrays, ("labels", "offsets", "maxlen", "pad", "truncate")),
    DatasetKind("class folders", lambda data, st: stat.S_ISDIR(st.st_mode), _class_folders),
    DatasetKind("list file", lambda data, st: not stat.S_ISDIR(st.st_mode), _list_file),
)

#: Settings that belong to one kind of data set: an error with any other kind.
_KIND_SETTINGS = ("labels", "offsets", "maxlen", "pad", "truncate")


def load_dataset(config: ServerConfig) -> Dataset:
    """Open ``config.data`` as whichever kind it is, then take ``config.subset`` of it.

    Every problem (a missing or unreadable path, a malformed file, a setting that does not
    apply to this kind) is a ConfigError naming the path, the setting or the line.
    """
    from .index import MISSING_HINT

    st = check_exists(config.data, "data set", MISSING_HINT)
    try:
        kind = next(k for k in KINDS if k.matches(config.data, st))
        _refuse_foreign_settings(config, kind)
        dataset = kind.open(config)
    except StopIteration:
        raise ConfigError(f"data set {config.data!r} is of no known kind ({', '.join(k.name for k in KINDS)})") \
            from None
    except OSError as exc:  # a kind that let one through: still a message, never a traceback
        raise os_error(exc, "data set", config.data) from None
    if len(dataset) == 0:
        raise ConfigError(f"data set {dataset.source} holds no samples")
    if config.subset != "all":
        from .subset import take_subset

        dataset = take_subset(dataset, config.subset, config.val_fraction, config.split_seed)
    return dataset


def _refuse_foreign_settings(config: ServerConfig, kind: DatasetKind) -> None:
    from ..config import ServerConfig

    defaults = ServerConfig.__dataclass_fields__
    given = [name for name in _KIND_SETTINGS
             if name not in kind.settings and getattr(config, name) != defaults[name].default]
    if given:
        flags = ", ".join(f"--{name}" for name in given)
        raise ConfigError(f"{flags} {'apply' if len(given) > 1 else 'applies'} to array data sets only; "
                          f"--data {config.data} is {kind.name}")
