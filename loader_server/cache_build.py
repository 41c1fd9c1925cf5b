"""``loader-server cache build``: fill a decoded-sample cache ahead of training, in parallel.

Takes the data settings and every setting that shapes a record (`DecodeOptions`: size, resize,
colour, ..., ``--cache-size``), exactly as ``serve`` does, and runs every sample through the
serving steps of a cached sample (pipeline/steps.py: cache lookup, read, decode, cache store),
so a later ``serve`` with the same settings finds every record valid and starts at cache speed.
Records already valid are kept; bad samples are reported and get no record (``serve`` decodes,
and reports, them each time).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from loader_client.contract.errors import ConfigError

from .arguments import add_setting_arguments, require_opencv
from .config import DATA_SETTINGS, default_workers
from .data.datasets import Dataset
from .options import DecodeOptions
from .pipeline.cache import MEMORY, SampleCache, open_cache

__all__ = ["BUILD_SETTINGS", "add_cache_build_arguments", "run_cache_build"]

#: The settings of `serve` that choose the samples and their records' pixels (the cache's key: DecodeOptions).
BUILD_SETTINGS = (*DATA_SETTINGS, *(f.name for f in dataclasses.fields(DecodeOptions)), "max_file_bytes", "cache")
_CHUNK = 64
_state: tuple[Dataset, SampleCache, Any] | None = None


def add_cache_build_arguments(p: argparse.ArgumentParser) -> None:
    action = p.add_argument("--config", default=None, metavar="FILE",
                            help="TOML file of settings, as `serve --config` reads it (LOADER_<NAME> variables "
                                 "and flags override it)")
    action.shown_default = ""  # type: ignore[attr-defined]
    add_setting_arguments(p, BUILD_SETTINGS)
    p.add_argument("--workers", type=int, default=default_workers(), help="decoding processes")


def _init(index: Dataset, cache: SampleCache, path: Any) -> None:
    import cv2

    cv2.setNumThreads(1)
    global _state
    _state = (index, cache, path)


def _fill(bounds: tuple[int, int]) -> tuple[int, int, list[tuple[str, str]]]:
    """Decode and store every record of `bounds` not valid yet: (samples, stored, bad samples)."""
    from .pipeline.decode import DecodeError

    assert _state is not None
    index, cache, path = _state
    record = np.empty(cache.layout.shape, dtype=np.uint8)
    stored, bad = 0, []
    for i in range(*bounds):
        name = index.describe(i)
        try:
            path.run(i, name, record)  # lookup (a valid record is kept, not read), read, decode, store
        except DecodeError as exc:
            bad.append((name, exc.reason))
            continue
        stored += not path.sample.hit
    return bounds[1] - bounds[0], stored, bad


def run_cache_build(args: argparse.Namespace) -> int:
    """Fill the cache; 0 when done (bad files are listed, not cached), 2 for bad settings."""
    from .data.datasets import load_dataset
    from .layered import resolve

    require_opencv("cache build")
    flags = {name: getattr(args, name) for name in BUILD_SETTINGS if getattr(args, name, None) is not None}
    if "data" not in flags and args.config is None and "LOADER_DATA" not in os.environ:
        raise ConfigError("no data set: pass --data PATH")
    config = resolve({**flags, "workers": max(1, args.workers)}, args.config)[0]
    if config.cache is None:
        raise ConfigError("no cache: pass --cache DIR (the folder that `serve --cache DIR` will use)")
    if config.cache == MEMORY:
        raise ConfigError("--cache memory lives as long as its server: build a cache in a folder (--cache DIR), "
                          "or let `serve --cache memory` fill it during the first epoch")
    index = load_dataset(config)
    cache = open_cache(config, index, serving=False)
    if cache.read_only:
        raise ConfigError(f"the cache {cache.where} cannot be written: choose a writable --cache DIR")
    before = cache.filled(0)
    started = time.monotonic()
    chunks = [(lo, min(lo + _CHUNK, len(index))) for lo in range(0, len(index), _CHUNK)]
    stored, bad = 0, []
    progress = tqdm(total=len(index), desc="cache build", unit="samples")
    ctx = multiprocessing.get_context("fork")
    from .pipeline.steps import cached_decode_steps  # OpenCV: only where a cache is built

    steps = cached_decode_steps(config, index, cache)  # made before the fork: a bad setting fails here, once
    with ctx.Pool(config.workers, initializer=_init, initargs=(index, cache, steps)) as pool:
        for count, done, found in pool.imap_unordered(_fill, chunks):
            stored += done
            bad.extend(found)
            progress.update(count)
            progress.set_postfix_str(f"{stored} stored, {len(bad)} bad", refresh=False)
    progress.close()
    elapsed = time.monotonic() - started
    filled = cache.filled(0)
    print(f"cache {cache.where}: {filled} of {len(index)} records valid ({before} before, {stored} stored now) "
          f"in {elapsed:.1f} s; {cache.layout.total_bytes / (1 << 30):.2f} GiB, records "
          f"{'x'.join(map(str, cache.layout.shape))} uint8")
    if bad:
        print(f"{len(bad)} bad samples have no record (serve decodes and reports them each time), for example:")
        for path, reason in sorted(bad)[:5]:
            print(f"  {path}: {reason}")
    return 0
