"""User functions loaded by name: ``--transform module:function`` and ``--collate module:function``.

A transform receives one decoded image (uint8, H x W x C, or H x W for gray) and a
`numpy.random.Generator` seeded by (seed, epoch, sample index), and returns an image of the
same kind (any size: the configured resize follows). A collate hook receives the batch's
arrays (``x``, ``y``, ``index``) and a generator seeded by (seed, epoch, first sample), and
returns a dict of extra arrays, one row per sample, which travel as extra frames and reach the
trainer as extra tuple elements. Errors in user code reach the trainer with the user's traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from loader_client.contract.errors import ConfigError
from loader_client.contract.protocol import ALLOWED_DTYPES

__all__ = ["check_extras", "check_image", "load_function"]


def load_function(spec: str, setting: str) -> Callable[..., Any]:
    """Import ``module:function``; a ConfigError names the setting and what went wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"`{setting}` must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code
        raise ConfigError(f"`{setting}` {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}; "
                          "is it on PYTHONPATH where the server runs?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"`{setting}` {spec!r}: {module_name} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


def check_image(result: Any, spec: str, channels: int) -> np.ndarray:
    """The transform's result, or a TypeError that says what was expected."""
    ok = isinstance(result, np.ndarray) and result.dtype == np.uint8 and (
        (result.ndim == 3 and result.shape[2] == channels) or (result.ndim == 2 and channels == 1))
    if not ok or 0 in result.shape:
        got = (f"{type(result).__name__}" if not isinstance(result, np.ndarray)
               else f"an array of {result.dtype} with shape {result.shape}")
        raise TypeError(f"--transform {spec} returned {got}; expected a uint8 image of shape (H, W, {channels})")
    return result  # type: ignore[no-any-return]


def check_extras(result: Any, spec: str, batch: int) -> dict[str, np.ndarray]:
    """The collate hook's extra arrays, validated to travel as frames."""
    if not isinstance(result, dict):
        raise TypeError(f"--collate {spec} returned {type(result).__name__}; expected a dict of arrays")
    out = {}
    for name, arr in result.items():
        if not isinstance(name, str) or name in ("x", "y", "index"):
            raise TypeError(f"--collate {spec}: extra array name {name!r} must be a new string")
        if not isinstance(arr, np.ndarray) or arr.dtype.str not in ALLOWED_DTYPES:
            raise TypeError(f"--collate {spec}: {name!r} must be a numeric numpy array, got "
                            f"{getattr(arr, 'dtype', type(arr).__name__)}")
        if arr.ndim == 0 or arr.shape[0] != batch:
            raise TypeError(f"--collate {spec}: {name!r} has shape {arr.shape}; it needs one row per sample ({batch})")
        out[name] = np.ascontiguousarray(arr)
    return out
