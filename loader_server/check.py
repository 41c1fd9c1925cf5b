"""``loader-server check``: read every sample once and report the bad ones.

Byte data sets (image files, tar members, Parquet rows): every sample goes through the same
steps as in the workers (pipeline/steps.py: read, then decode with the pixel limit, the
truncation check and the configured colour mode), in parallel, so a sample it passes is one the
server can serve. Array data sets: shapes, dtypes and the label count are checked when
the arrays are opened, then every row is read, and rows or labels holding NaN or infinity are
reported. Any kind of data set (see datasets.py), and any subset of one, can be checked.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tqdm import tqdm

from .arguments import add_setting_arguments, require_opencv
from .config import DATA_SETTINGS, ServerConfig, default_workers
from .data.datasets import Dataset, row_source

if TYPE_CHECKING:
    from .pipeline.steps import SamplePath

__all__ = ["CHECK_SETTINGS", "Bad", "add_check_arguments", "run_check"]

_CHUNK = 64
_ROWS_CHUNK_BYTES = 32 << 20
_state: tuple[Dataset, SamplePath, np.ndarray] | None = None
#: The settings `check` takes from the server's definitions: the data set, and how images decode.
CHECK_SETTINGS = (*DATA_SETTINGS, "color", "max_pixels", "max_file_bytes")
#: Images are decoded into a slot this small: libjpeg decodes at 1/8 where it can, as the workers would
#: for a small output; every byte is still read and every header and marker checked.
_CHECK_SIZE = "8x8"
#: Where the report goes when --report is not given (a temporary file if this folder cannot be written).
_DEFAULT_REPORT = "bad-files.tsv"
#: Bad files listed on stderr when no report can be written anywhere.
_SHOWN_WITHOUT_REPORT = 20


class Bad(NamedTuple):
    """A bad sample: what names it (a path, or the source and row), a stable code, the reason in words.

    The summary counts by `code` (DecodeError's codes for files; ``non_finite`` and
    ``non_finite_label`` for rows); the report lists `where` and `reason`.
    """

    where: str
    code: str
    reason: str


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_arguments(p, CHECK_SETTINGS)
    p.add_argument("--workers", type=int, default=default_workers() + 1, help="decoding processes")
    p.add_argument("--report", default=None,
                   help="where to write `path<TAB>reason` for every bad file (or row); when that cannot be "
                        "written, a temporary file, named in the summary (default: bad-files.tsv in the current "
                        "folder, or a temporary file when the current folder is not writable)")


def _init(index: Dataset, path: SamplePath, out: np.ndarray) -> None:
    import cv2

    cv2.setNumThreads(1)
    global _state
    _state = (index, path, out)


def _check_chunk(bounds: tuple[int, int]) -> tuple[int, list[Bad]]:
    from .pipeline.decode import DecodeError

    assert _state is not None
    index, path, out = _state
    bad = []
    for i in range(*bounds):
        name = index.describe(i)
        try:
            path.run(i, name, out)
        except DecodeError as exc:
            bad.append(Bad(name, exc.code, exc.reason))
    return bounds[1] - bounds[0], bad


def run_check(args: argparse.Namespace) -> int:
    """Read every sample; 0 when all are good, 1 when any is bad (2 for bad settings)."""
    from .data.datasets import load_dataset
    from .layered import resolve

    if getattr(args, "data", None) is None:
        from loader_client.contract.errors import ConfigError

        raise ConfigError("no data set: pass --data PATH")
    flags = {name: getattr(args, name) for name in CHECK_SETTINGS if getattr(args, name) is not None}
    config = resolve({**flags, "workers": max(1, args.workers), "size": _CHECK_SIZE}, None, {})[0]
    index = load_dataset(config)
    started = time.monotonic()
    progress = tqdm(total=len(index), desc="check", unit="samples")
    if index.build == "gather":
        bad = _check_rows(index, progress)
    else:
        require_opencv("check")
        bad = _check_files(index, config, progress)
    progress.close()
    bad.sort()
    elapsed = time.monotonic() - started
    print(f"checked {len(index)} samples of {index.source} in {elapsed:.1f} s: {len(bad)} bad")
    if index.build == "gather":
        labels = index.labels
        rows = row_source(index)
        print(f"  each sample {tuple(rows.sample_shape)} {np.dtype(rows.sample_dtype)}, "
              f"labels {labels.dtype} of shape {labels.shape[1:] or 'scalar'}")
    example = {b.code: b for b in reversed(bad)}  # the first bad sample of each code
    for code, n in Counter(b.code for b in bad).most_common():
        where = example[code].where if len(example[code].where) <= 200 else example[code].where[:200] + "..."
        print(f"  {n:8d}  {code} (e.g. {example[code].reason}: {where})")
    report = _write_report(bad, args.report)
    if bad:
        print(f"the bad files and their reasons are in {report}; fix or remove them, or serve with "
              "--on-error skip --max-bad N")
        return 1
    print("check: OK")
    return 0


def _write_report(bad: list[Bad], asked: str | None) -> str:
    """Write `path<TAB>reason` lines where asked (default: bad-files.tsv here), else to a temporary file;
    returns where they are. What could not be written is said on stderr; the summary is printed already."""
    text = "".join(f"{b.where}\t{b.reason}\n" for b in bad)
    target = asked or _DEFAULT_REPORT
    try:
        Path(target).write_text(text)
        return target
    except OSError as exc:
        why = f"{exc.strerror or exc} for user id {os.getuid()}"
    if not bad and asked is None:
        return "(no report: nothing is bad)"  # an empty report is not worth a temporary file
    try:
        fd, temporary = tempfile.mkstemp(prefix="loader-check-", suffix=".tsv")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as exc:
        print(f"loader-server check: cannot write the report to {target} ({why}) nor to a temporary file "
              f"({exc.strerror or exc}); pass --report PATH in a writable folder. The first bad files:",
              file=sys.stderr)
        for b in bad[:_SHOWN_WITHOUT_REPORT]:
            print(f"  {b.where}\t{b.reason}", file=sys.stderr)
        return "(no report could be written; see above)"
    print(f"loader-server check: cannot write {target} ({why}); the report is in {temporary} instead",
          file=sys.stderr)
    return temporary


def _check_files(index: Dataset, config: ServerConfig, progress: tqdm) -> list[Bad]:
    """Decode every file on `config.workers` processes."""
    from .pipeline.steps import plan_steps

    chunks = [(lo, min(lo + _CHUNK, len(index))) for lo in range(0, len(index), _CHUNK)]
    bad: list[Bad] = []
    ctx = multiprocessing.get_context("fork")
    w, h = config.size
    # read, decode: the serving steps of a stream without augmentations, into a small slot
    state = (index, plan_steps(config, index), np.empty((h, w, config.channels), np.uint8))
    with ctx.Pool(config.worker_bounds[1], initializer=_init, initargs=state) as pool:
        for count, found in pool.imap_unordered(_check_chunk, chunks):
            bad.extend(found)
            progress.update(count)
            progress.set_postfix_str(f"{len(bad)} bad", refresh=False)
    return bad


def _check_rows(index: Dataset, progress: tqdm) -> list[Bad]:
    """Gather every row as the workers would; rows or labels with NaN or infinity are bad."""
    source = row_source(index)
    shape = tuple(source.sample_shape)
    dtype = np.dtype(source.sample_dtype)
    rows = max(1, _ROWS_CHUNK_BYTES // max(1, int(np.prod(shape)) * dtype.itemsize))
    out = np.empty((min(rows, len(index)), *shape), dtype=dtype)
    floats = dtype.kind in "fc"
    labels = index.labels
    bad: list[Bad] = []
    for lo in range(0, len(index), rows):
        indices = np.arange(lo, min(lo + rows, len(index)), dtype=np.int64)
        x = out[: len(indices)]
        source.gather(indices, x)
        if floats:
            finite = np.isfinite(x.reshape(len(indices), -1)).all(axis=1)
            bad.extend(Bad(index.describe(int(i)), "non_finite", "non-finite values (NaN or infinity) in the sample")
                       for i in indices[~finite])
        if labels.dtype.kind in "fc":
            finite = np.isfinite(labels[indices].reshape(len(indices), -1)).all(axis=1)
            bad.extend(Bad(index.describe(int(i)), "non_finite_label", "non-finite label (NaN or infinity)")
                       for i in indices[~finite])
        progress.update(len(indices))
        progress.set_postfix_str(f"{len(bad)} bad", refresh=False)
    return bad
