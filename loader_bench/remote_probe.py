"""Data on an object store against local disk (``--extras s3``), latency added in the network path.

The benchmark's images are written as WebDataset tar shards (8 shards); the service reads them
from local disk (every shard read once first, so all sit in the page cache), and from a real
S3 store (SeaweedFS, started here on free loopback ports, loader_bench/object_store.py)
through the delaying TCP proxy (latency_proxy.py: a separate process that releases every chunk
half the delay after it arrived, each way, so that each request's round trip gains the delay;
the kernel's netem is not available here). The server finds the store through the standard
AWS variables (``AWS_ENDPOINT_URL`` = the proxy). Runs:

* ``local``: the shards on local disk, default settings;
* ``s3 +0 ms``: through the proxy without delay (the store's own cost on this machine);
* ``s3 +20 ms``: default settings;
* ``s3 +100 ms``: default settings (what the README recommends for tar shards, which are
  pipelined), then more read-ahead (`RECOMMENDED_100MS`: what the README recommends at 100 ms
  for data it does not pipeline);
* ``local, cache`` and ``s3 +100 ms, cache`` with ``--cache DIR``: timed after one full epoch, so
  every timed batch comes from the cache.

The store is remote in a real deployment: its CPU is not the loader host's. Here it shares the
machine, and SeaweedFS spends 0.4-1.1 ms of CPU per range GET (with its in-memory chunk cache,
``-s3.cacheCapacityMB``, on), about what decoding an image costs. So the store and the proxy
run on the last core, and the loader (the server, its workers and
the client: this process and its children) on the others, in every run, local ones included.

Each round runs every configuration once, in an order that rotates each round (a noisy
machine's slow minute falls on each in turn); the table gives the median images/s, the ratio to
local disk (each round's run over the same round's local run, the median of those: the load
drifts less within a round), the CPU the server and its workers spent per timed image (which
the machine's load changes much less), the proxy's requests per second and bytes on the link
(mean and max of samples every 5 ms), the CPU the store and the proxy used over each run's
whole wall time, start-up included, in cores (1.00: their core was never idle), and the load
average around each run. The member index is built once and kept.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .context import Bench
from .systems import cpu_s, measure_service

__all__ = ["RECOMMENDED_100MS", "s3_probe", "s3_tables"]

Results = dict[str, Any]

#: The serve flags the README recommends for an object store 100 ms away when its data is not pipelined
#: (list files, class folders, compressed Parquet pages; tar shards keep the defaults): each worker holds 6
#: tasks beyond the one it builds (their reads run ahead), the client's batches in flight cover
#: them (workers x 7 <= 16), and 256 read threads per worker keep enough requests in flight
#: (a 64-image task every ~100 ms of decoding is 640 requests/s: 64 threads at 110 ms manage 580).
RECOMMENDED_100MS: list[str] = ["--read-threads", "256", "--read-ahead-tasks", "6", "--prefetch", "16"]
_ROUNDS = 5
_BUCKET = "bench"


def _say(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(values)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)


def s3_probe(b: Bench) -> Results:
    from loader_server.sample_data import write_tar_shards

    from .latency_proxy import start_proxy
    from .object_store import NoStore, start_store

    if not hasattr(b.index, "path"):
        _say("s3: skipped (it writes the images of an image data set into tar shards)")
        return {}
    root = Path(b.scratch) / "s3"
    local = write_tar_shards(b.index, root / "tar", max(1, len(b.index) // 8))
    shards = sorted((root / "tar").glob("*.tar"))
    for shard in shards:  # into the page cache: local disk at its best
        shard.read_bytes()
    try:
        store = start_store((_BUCKET,), root=root / "store", options=("-s3.cacheCapacityMB=256",))
    except NoStore as exc:
        _say(f"s3: skipped ({exc})")
        return {}
    cores = sorted(os.sched_getaffinity(0))
    loader_cores, store_cores = (set(cores[:-1]), {cores[-1]}) if len(cores) > 1 else (set(cores), set(cores))
    assert store.proc is not None
    _pin(store.proc.pid, store_cores)
    os.sched_setaffinity(0, loader_cores)
    try:
        for shard in shards:
            store.put(_BUCKET, f"tar/{shard.name}", shard.read_bytes())
        remote = f"s3://{_BUCKET}/tar/"
        epoch_batches = len(b.index) // b.batch_size
        common = [*b.serve_extra, "--index-dir", str(root / "index")]
        runs: dict[str, tuple[str, float | None, list[str], int]] = {
            "local": (local, None, common, 2),
            "s3 +0 ms": (remote, 0.0, common, 2),
            "s3 +20 ms": (remote, 20.0, common, 2),
            "s3 +100 ms": (remote, 100.0, common, 2),
            "s3 +100 ms, recommended": (remote, 100.0, [*common, *RECOMMENDED_100MS], 2),
            "local, cache": (local, None, [*common, "--cache", str(root / "cache-local")], epoch_batches + 1),
            "s3 +100 ms, cache": (remote, 100.0, [*common, *RECOMMENDED_100MS, "--cache", str(root / "cache-s3")],
                                  epoch_batches + 1),
        }
        rounds = 1 if b.quick else _ROUNDS
        got: dict[str, list[Results]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                data, delay, extra, warmup = runs[name]
                load_before = os.getloadavg()[0]
                proxy = start_proxy(store.address, delay) if delay is not None else None
                if proxy is not None:
                    _pin(proxy.proc.pid, store_cores)
                side = [store.proc.pid] + ([proxy.proc.pid] if proxy is not None else [])
                side_cpu, started = sum(cpu_s(pid) for pid in side), time.monotonic()
                try:
                    env = store.env(proxy.endpoint if proxy else None)
                    with _environment(env):
                        n = max(b.n, 4 * len(b.index)) if name.endswith("cache") else b.n  # cached: ~10k images/s
                        result = measure_service(b, data=data, extra=extra, warmup=warmup, sample_pss=False, n=n,
                                                 cpu=True)
                    busy = (sum(cpu_s(pid) for pid in side) - side_cpu) / (time.monotonic() - started)
                finally:
                    carried = proxy.stop() if proxy is not None else {}
                result.update(load=(load_before + os.getloadavg()[0]) / 2, proxy=carried, store_core_busy=busy)
                got[name].append(result)
                rate = f"{carried.get('requests_per_s', 0):.0f} req/s, " if carried else ""
                _say(f"s3: round {r + 1} {name}: {result['images_per_s']:.0f} images/s ({rate}load "
                     f"{result['load']:.1f})")
    finally:
        os.sched_setaffinity(0, set(cores))
        store.stop()
    table = {}
    for name, results in got.items():
        rate = statistics.median(x["images_per_s"] for x in results)
        reference = got["local, cache"] if name.endswith("cache") else got["local"]
        # Each round's run against the same round's local run (the load drifts less within a round).
        ratios = [x["images_per_s"] / y["images_per_s"] for x, y in zip(results, reference, strict=True)]
        carried_all = [x["proxy"] for x in results if x["proxy"]]
        table[name] = {
            "images_per_s": rate, "ratio": statistics.median(ratios), "ratios": [round(r, 2) for r in ratios],
            "cpu_ms_per_image": statistics.median(x["loader_cpu_ms_per_image"] for x in results),
            "runs": [round(x["images_per_s"], 1) for x in results],
            "load": statistics.median(x["load"] for x in results),
            "store_core_busy": statistics.median(x["store_core_busy"] for x in results),
            "requests_per_s": statistics.median(p["requests_per_s"] for p in carried_all) if carried_all else None,
            "link_bytes_mean": statistics.median(p["link_bytes_mean"] for p in carried_all) if carried_all else None,
            "link_bytes_max": max(p["link_bytes_max"] for p in carried_all) if carried_all else None,
            "settings": " ".join("DIR" if a.startswith(str(root)) else a for a in runs[name][2][len(common):])
            or "defaults",
        }
    _say("s3: " + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in table.items()))
    return {"s3": table, "s3_images": len(b.index), "s3_shards": len(shards),
            "s3_cores": {"loader": sorted(loader_cores), "store and proxy": sorted(store_cores)}}


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process `pid` on `cpus` (threads it starts later inherit it)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cpus)


def s3_tables(results: Results) -> list[str]:
    table = results.get("s3")
    if not table:
        return []
    lines = ["", f"### Data on an object store ({results['s3_images']} images in {results['s3_shards']} tar shards; "
             "latency added by a delaying TCP proxy)", "",
             f"Cores: the loader {results['s3_cores']['loader']}, the store and the proxy "
             f"{results['s3_cores']['store and proxy']}.", "",
             "| run | settings | images/s (median) | vs local (median of rounds) | each round | loader CPU ms/image "
             "| requests/s | bytes on the link, mean / max | store + proxy CPU, cores | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        link = (f"{row['link_bytes_mean'] / 1e6:.2f} MB / {row['link_bytes_max'] / 1e6:.2f} MB"
                if row["link_bytes_mean"] is not None else "-")
        rps = f"{row['requests_per_s']:.0f}" if row["requests_per_s"] is not None else "-"
        lines.append(f"| {name} | {row['settings']} | {row['images_per_s']:.0f} | {row['ratio']:.2f}x | "
                     f"{', '.join(f'{r:.2f}' for r in row['ratios'])} | {row['cpu_ms_per_image']:.2f} | {rps} | {link} "
                     f"| {row.get('store_core_busy', float('nan')):.2f} | {row['load']:.1f} |")
    return lines
