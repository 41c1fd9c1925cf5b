"""What one batch looks like: derived once from (settings, data set), then read by everyone.

The batch builder, the workers, the shared-memory arena sizing and the welcome message all
read a `BatchSpec`; none of them derives shapes or dtypes from the settings on its own, and
nothing derived from the data is written back into the settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from loader_client.contract.errors import ConfigError

from ..config import ServerConfig
from .datasets import Dataset, row_source

__all__ = ["BatchSpec", "batch_spec"]

#: Settings that shape decoded images; a data set served as stored (arrays) refuses them.
_IMAGE_ONLY = ("augment", "transform", "dtype", "layout", "mean", "std")


@dataclass(frozen=True)
class BatchSpec:
    """The shape, dtype and construction of every batch a server sends."""

    batch_size: int
    x_shape: tuple[int, ...]  # one sample of x
    x_dtype: str  # numpy dtype string, e.g. "|u1", "<f4"
    build: Literal["decode", "gather"]  # files decoded into the batch, or rows gathered
    layout: str  # hwc or chw (images; arrays travel as stored and report the default)
    color: str
    channels: int | None  # of a decoded image; None for gathered rows

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.x_shape) * np.dtype(self.x_dtype).itemsize

    @property
    def batch_bytes(self) -> int:
        return self.batch_size * self.sample_bytes

    def allocate(self, batch_size: int | None = None) -> np.ndarray:
        """A fresh, uninitialised ``x`` buffer for `batch_size` samples (default: a full batch)."""
        n = self.batch_size if batch_size is None else batch_size
        return np.empty((n, *self.x_shape), dtype=self.x_dtype)


def batch_spec(config: ServerConfig | Any, dataset: Dataset) -> BatchSpec:
    """The one derivation of a BatchSpec; raises ConfigError naming the setting that does not fit the data."""
    if dataset.build == "gather":
        given = [f"--{name.replace('_', '-')}" for name in _IMAGE_ONLY
                 if getattr(config, name) != ServerConfig.__dataclass_fields__[name].default]
        if given:
            raise ConfigError(f"array data sets are served as stored: {', '.join(given)} apply to images only "
                              f"({dataset.source}); drop {'it' if len(given) == 1 else 'them'}")
        rows = row_source(dataset)
        shape, dtype = rows.sample_shape, rows.sample_dtype
        spec = BatchSpec(config.batch_size, tuple(shape), np.dtype(dtype).str, "gather", config.layout,
                         config.color, None)
    else:
        spec = BatchSpec(config.batch_size, config.image_shape, np.dtype(config.dtype).str, "decode",
                         config.layout, config.color, config.channels)
    if spec.batch_bytes > config.max_message_bytes:
        raise ConfigError(
            f"one batch would be {spec.batch_bytes} bytes, above `max_message_bytes` "
            f"({config.max_message_bytes}); lower --batch-size or --size"
        )
    if config.mode == "epoch" and config.drop_last and len(dataset) < config.batch_size:
        raise ConfigError(
            f"`batch_size` {config.batch_size} is larger than the data set ({len(dataset)} samples in "
            f"{dataset.source}) and the last batch is dropped: lower --batch-size or pass --keep-last"
        )
    return spec
