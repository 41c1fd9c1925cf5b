"""Data set kinds side by side (``--extras kinds``) and the member index at scale (``--extras index``).

``kinds``: the benchmark's images written as WebDataset tar shards and as Parquet tables
(uncompressed, and snappy with 100-row groups as Hugging Face ``datasets`` writes them), every
file read once so that all sit in the page cache, then the service on each kind in alternated
rounds (the order rotates each round): the median images/s, each kind's ratio to files, and
the load average of the machine around every run. Then the CPU time per image of a worker's
batch for each kind in one process, and also for zstd tables (pages that can only be read
whole): with the default ``--page-cache-mb`` (which holds every page of a small data set) and
with a 4 MB one (a data set far larger than the cache: a row seldom finds its page kept).

``index``: 1,000,000 generated members (``--index-members``) in tar shards and in Parquet
files: the time to build each index, its size on disk, and the time to open it again.
"""

from __future__ import annotations

import io
import os
import statistics
import tarfile
import time
from pathlib import Path
from typing import Any

from .context import Bench
from .systems import measure_service

__all__ = ["INDEX_MEMBERS", "index_probe", "index_tables", "kinds_probe", "kinds_tables"]

Results = dict[str, Any]

#: Members of the generated index benchmark.
INDEX_MEMBERS = 1_000_000
_INDEX_SHARDS = 100
_KIND_ROUNDS = 5
#: The small page cache of the CPU table (MB): far below the corpus's pages decompressed.
_SMALL_CACHE_MB = 4


def _say(line: str) -> None:
    print(line, flush=True)


def _warm(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 22):
                    pass


def kinds_probe(b: Bench) -> Results:
    from loader_server.sample_data import write_parquet, write_tar_shards

    if not hasattr(b.index, "path"):
        _say("kinds: skipped (it writes the images of an image data set into shards and tables)")
        return {}
    root = Path(b.scratch) / "kinds"
    per = max(1, len(b.index) // 8)
    data = {"files": b.data,
            "tar": write_tar_shards(b.index, root / "tar", per),
            "parquet": write_parquet(b.index, root / "parquet", per, row_group_size=100),
            "parquet-snappy": write_parquet(b.index, root / "snappy", per, row_group_size=100, compression="snappy")}
    if os.path.isdir(b.data):
        _warm(Path(b.data))
    else:
        _warm(Path(b.data).parent)
    _warm(root)
    built: dict[str, float] = {}
    from loader_server.config import ServerConfig
    from loader_server.data.datasets import load_dataset

    for kind in ("tar", "parquet", "parquet-snappy"):  # the first start of each builds its index: not timed here
        started = time.perf_counter()
        load_dataset(ServerConfig(data=data[kind]))
        built[kind] = time.perf_counter() - started
    rounds = 1 if b.quick else max(_KIND_ROUNDS, b.rounds)
    names = list(data)
    runs: dict[str, list[float]] = {k: [] for k in names}
    loads: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for kind in order:
            res = measure_service(b, extra=b.serve_extra, data=data[kind])
            runs[kind].append(res["images_per_s"])
            loads[kind].append(os.getloadavg()[0])
            _say(f"kinds round {r + 1}/{rounds} {kind:15s} {res['images_per_s']:8.0f} images/s "
                 f"(load {loads[kind][-1]:.2f})")
    files = statistics.median(runs["files"])
    out = {kind: {"runs": v, "median": statistics.median(v), "ratio": statistics.median(v) / files,
                  "load": loads[kind], "index_s": built.get(kind)} for kind, v in runs.items()}
    _say("kinds: " + ", ".join(f"{k} {v['median']:.0f} images/s ({v['ratio']:.3f} of files)" for k, v in out.items()))
    zstd = write_parquet(b.index, root / "zstd", per, row_group_size=100, compression="zstd")
    _warm(root / "zstd")
    cpu, hits = _cpu_per_image(b, {**{k: (v, {}) for k, v in data.items()}, "parquet-zstd": (zstd, {}),
                                   f"parquet-zstd, {_SMALL_CACHE_MB} MB page cache": (
                                       zstd, {"page_cache_mb": _SMALL_CACHE_MB})}, rounds)
    for kind, ms in cpu.items():
        out.setdefault(kind, {"runs": [], "load": [], "index_s": None})
        out[kind]["cpu_ms"] = ms
        out[kind]["cpu_ratio"] = statistics.median(cpu["files"]) / statistics.median(ms)
        if kind in hits:
            out[kind]["page_hits"] = hits[kind]
    _say("kinds, CPU ms per image in one process: " + ", ".join(
        f"{k} {statistics.median(v):.3f} ({out[k]['cpu_ratio']:.3f}x files' speed)" for k, v in cpu.items()))
    return {"kinds": {"results": out, "rounds": rounds, "shard_size": per}}


def _cpu_per_image(b: Bench, data: dict[str, tuple[str, dict[str, Any]]],
                   rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """CPU ms per image of a worker's whole batch (read, decode, resize into the batch) in this process,
    the kinds alternated: the scheduler's share of a loaded machine does not enter CPU time. Also the
    share of reads that found their page kept, for the kinds that keep pages."""
    import cv2
    import numpy as np

    from loader_server.config import ServerConfig
    from loader_server.data.datasets import load_dataset
    from loader_server.pipeline.batch import BatchBuilder

    cv2.setNumThreads(1)
    builders = {}
    datasets = {}
    for kind, (d, extra) in data.items():
        config = ServerConfig(data=d, batch_size=b.batch_size, size=b.size, **extra)
        datasets[kind] = load_dataset(config)
        builders[kind] = BatchBuilder(config, datasets[kind])
    n = len(b.index)
    order = np.random.default_rng(0).permutation(n)  # random access, as the shuffle reads
    batches = [order[k : k + b.batch_size] for k in range(0, n - b.batch_size + 1, b.batch_size)]
    batches = batches[: max(2, min(len(batches), b.quick_n // b.batch_size))]
    out: dict[str, list[float]] = {k: [] for k in data}
    for r in range(rounds):
        names = list(data)
        for kind in names[r % len(names):] + names[: r % len(names)]:
            builder = builders[kind]
            x = builder.allocate()
            started = time.process_time()
            for idx in batches:
                builder.build(idx, x)
            out[kind].append((time.process_time() - started) * 1000 / (len(batches) * b.batch_size))
    hits = {}
    for kind, ds in datasets.items():
        pages = getattr(ds, "_pages", None)
        if pages is not None and pages.hits + pages.misses:
            hits[kind] = pages.hits / (pages.hits + pages.misses)
    return out, hits


def kinds_tables(results: Results) -> list[str]:
    if "kinds" not in results:
        return []
    k = results["kinds"]
    lines = ["", f"The same images from each kind of data set (alternated rounds, {k['rounds']} each; "
             f"{k['shard_size']} samples a shard or file; Parquet row groups of 100):", "",
             "| kind | images/s (median) | runs | ratio to files | load average (1 min) | CPU ms per image, one "
             "process (median; runs) | speed against files by CPU |", "|---|---|---|---|---|---|---|"]
    for kind, v in k["results"].items():
        cpu = v.get("cpu_ms", [])
        served = (f"{v['median']:.0f} | {', '.join(f'{x:.0f}' for x in v['runs'])} | {v['ratio']:.3f} | "
                  f"{min(v['load']):.2f}–{max(v['load']):.2f}") if v["runs"] else "– | – | – | –"
        hits = f" (pages kept: {v['page_hits']:.0%} of reads)" if "page_hits" in v else ""
        lines.append(f"| {kind} | {served} | "
                     + (f"{statistics.median(cpu):.3f}; {', '.join(f'{x:.3f}' for x in cpu)}" if cpu else "–")
                     + f" | {v.get('cpu_ratio', float('nan')):.3f}{hits} |")
    return lines


# ---------------------------------------------------------------------------- index at scale
def _write_tiny_shards(root: Path, members: int, shards: int) -> str:
    """`members` samples of a tiny .jpg and a .cls each (the index reads headers, not pixels).

    Parquet (below): a distinct value per row, so that pyarrow's dictionary encoding falls back
    to plain pages as it does for real images."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-members // shards)
    payload = b"\xff\xd8" + bytes(30) + b"\xff\xd9"
    for s in range(shards):
        with tarfile.open(root / f"gen-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per, min(members, (s + 1) * per)):
                for name, data in ((f"{i:09d}.jpg", payload), (f"{i:09d}.cls", str(i % 1000).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"gen-{{000000..{shards - 1:06d}}}.tar")


def _write_tiny_parquet(root: Path, members: int, files: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    per = -(-members // files)
    payload = b"\xff\xd8" + bytes(30) + b"\xff\xd9"
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for f in range(files):
        n = min(members, (f + 1) * per) - f * per
        image = pa.array([{"bytes": payload + i.to_bytes(4, "little"), "path": None} for i in range(n)], kind)
        pq.write_table(pa.table({"image": image, "label": pa.array(range(n), pa.int64())}),
                       root / f"gen-{f:05d}.parquet", row_group_size=1000)
    return str(root / "gen-*.parquet")


def index_probe(b: Bench) -> Results:
    from loader_server.config import ServerConfig
    from loader_server.data.datasets import load_dataset

    members = 20_000 if b.quick else INDEX_MEMBERS
    root = Path(b.scratch) / "index"
    out: Results = {"members": members, "cores": len(os.sched_getaffinity(0))}
    for kind, write in (("tar", _write_tiny_shards), ("parquet", _write_tiny_parquet)):
        started = time.perf_counter()
        data = write(root / kind, members, _INDEX_SHARDS)
        written = time.perf_counter() - started
        _warm(root / kind)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        ds = load_dataset(ServerConfig(data=data))
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        again = load_dataset(ServerConfig(data=data))
        reopen_s = time.perf_counter() - started
        assert len(again) == len(ds) == members
        (index_file,) = (root / kind).glob(".loader-index-*.npz")
        arrays = sum(getattr(ds, n).nbytes for n in ("pos", "span", "labels", "names_blob", "names_offsets", "raw",
                                                     "inner", "length", "starts") if getattr(ds, n, None) is not None)
        out[kind] = {"build_s": build_s, "reopen_s": reopen_s, "index_bytes": index_file.stat().st_size,
                     "memory_bytes": arrays, "write_s": written, "files": _INDEX_SHARDS, "load": load}
        _say(f"index of {members} {kind} members in {_INDEX_SHARDS} files: built in {build_s:.1f} s, "
             f"{index_file.stat().st_size / 1e6:.1f} MB on disk, {arrays / 1e6:.1f} MB in memory, opened again in "
             f"{reopen_s:.2f} s (load {load:.2f})")
    return {"index": out}


def index_tables(results: Results) -> list[str]:
    if "index" not in results:
        return []
    r = results["index"]
    lines = ["", f"The member index of {r['members']:,} generated members in {r['tar']['files']} files (indexed on "
             f"{r.get('cores', '?')} cores; tar: a .jpg and a .cls member per sample):",
             "", "| kind | build | on disk | in memory | open again | load average |", "|---|---|---|---|---|---|"]
    for kind in ("tar", "parquet"):
        v = r[kind]
        lines.append(f"| {kind} | {v['build_s']:.1f} s | {v['index_bytes'] / 1e6:.1f} MB | "
                     f"{v['memory_bytes'] / 1e6:.1f} MB | {v['reopen_s']:.2f} s | {v['load']:.2f} |")
    return lines
