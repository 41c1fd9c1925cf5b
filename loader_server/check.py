"""``loader-server check``: decode every sample once, in parallel, and report the bad files.

It uses the same reading and decoding as the workers (pixel limit, truncation check, the
configured colour mode), so a file it passes is a file the server can serve.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .config import ServerConfig, default_workers, parse_size
from .index import DatasetIndex, load_index

__all__ = ["add_check_arguments", "run_check"]

_CHUNK = 64
_state: tuple[DatasetIndex, ServerConfig] | None = None


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="list file or folder of class sub-folders to check")
    p.add_argument("--workers", type=int, default=default_workers() + 1, help="decoding processes")
    p.add_argument("--report", default="bad-files.tsv", help="where to write `path<TAB>reason` for every bad file")
    p.add_argument("--color", choices=("rgb", "bgr", "gray"), default="rgb", help="decode as the server will")
    p.add_argument("--max-pixels", type=int, default=ServerConfig.__dataclass_fields__["max_pixels"].default,
                   help="images larger than this are bad (decompression bombs)")


def _init(index: DatasetIndex, config: ServerConfig) -> None:
    import cv2

    cv2.setNumThreads(1)
    global _state
    _state = (index, config)


def _check_chunk(bounds: tuple[int, int]) -> tuple[int, list[tuple[str, str]]]:
    from .decode import DecodeError, Decoder, read_file

    assert _state is not None
    index, config = _state
    decoder = Decoder(config)
    bad = []
    for i in range(*bounds):
        path = index.path(i)
        try:
            decoder.decode(read_file(path), path)
        except DecodeError as exc:
            bad.append((path, exc.reason))
    return bounds[1] - bounds[0], bad


def run_check(args: argparse.Namespace) -> int:
    """Decode every sample; 0 when all are good, 1 when any is bad (2 for bad settings)."""
    index = load_index(args.data)
    config = ServerConfig(data=args.data, workers=max(1, args.workers), color=args.color,
                          max_pixels=args.max_pixels, size=parse_size("8x8"))
    chunks = [(lo, min(lo + _CHUNK, len(index))) for lo in range(0, len(index), _CHUNK)]
    bad: list[tuple[str, str]] = []
    started = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(config.workers, initializer=_init, initargs=(index, config)) as pool, \
            tqdm(total=len(index), desc="check", unit="samples") as progress:
        for count, found in pool.imap_unordered(_check_chunk, chunks):
            bad.extend(found)
            progress.update(count)
            progress.set_postfix_str(f"{len(bad)} bad", refresh=False)
    bad.sort()
    Path(args.report).write_text("".join(f"{p}\t{r}\n" for p, r in bad))
    elapsed = time.monotonic() - started
    print(f"checked {len(index)} samples of {index.source} in {elapsed:.1f} s: {len(bad)} bad")
    for reason, n in Counter(r.split(":")[0].split(" (")[0] for _, r in bad).most_common():
        print(f"  {n:8d}  {reason}")
    if bad:
        print(f"the bad files and their reasons are in {args.report}; fix or remove them, or serve with "
              "--on-error skip --max-bad N")
        return 1
    return 0
