"""``loader-server bench``: side-by-side throughput of this service and the usual alternatives.

One run measures, interleaved and repeated in rounds so that drift hits every system alike:

* ``percore``: one process reading, decoding and resizing, no batching (the per-core limit);
* ``service``: ``loader-server serve`` with N workers, consumed by a client in this process
  that touches every batch (also: ``next()`` latency, time to first batch, peak PSS);
* ``classic``: the classic single-process generator (imread, resize, /255 as float64, np.array);
* ``torch``: torch DataLoader with the same decode function and worker count (if installed).

Then, once each: data stall under a simulated training step, float32 against uint8, slow
storage, worker scaling, time to first batch with a 1,000,000-line list file, and the CPU cost
of each stage. Results go to JSON, a markdown table and (with matplotlib) a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loader_client import LoaderClient

from .index import DatasetIndex, load_index
from .progress import Progress

__all__ = ["run_bench", "add_bench_arguments"]

_SYSTEMS = ("percore", "service", "classic", "torch")
_SERVER_STOP_TIMEOUT_S = 20.0
#: Batches consumed before the stall is measured: the pipeline fills up first.
_STALL_WARMUP_BATCHES = 16
#: Batches per server consumed before a multi-server run is timed (more than the server prefetch).
_MULTI_WARMUP_BATCHES = 10
#: Batches consumed before float32 is timed: every shared-memory slot has been used once.
_FLOAT32_WARMUP_BATCHES = 32


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="image folder or list file (default: generated sample data); try ../shared/corpus")
    p.add_argument("--images", type=int, default=8192, help="images timed per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the side-by-side systems")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--size", default="224x224", help="output WIDTHxHEIGHT")
    p.add_argument("--workers", type=int, default=2, help="workers of the service and of torch DataLoader")
    p.add_argument("--systems", default=",".join(_SYSTEMS), help="comma-separated subset of " + ",".join(_SYSTEMS))
    p.add_argument("--extras",
                   default="stall,float32,slow,augment,transform,arrays,curve,multiserver,scaling,ttfb,stages",
                   help="one-off measurements to add: stall,float32,slow,augment,transform,arrays,curve,"
                        "multiserver,scaling,ttfb,stages,strict (or none)")
    p.add_argument("--scaling", default="1,2,4,8", help="worker counts for the scaling table")
    p.add_argument("--read-latency-ms", type=float, default=20.0, help="simulated storage latency (slow extra)")
    p.add_argument("--serve-args", default="", help="extra `serve` flags for every service run, quoted")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md, results.png")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: tiny data, 1 round, few images")


# ---------------------------------------------------------------------------- measurements
def _decode_fn(size: tuple[int, int]) -> Callable[[str], np.ndarray]:
    """The shared per-image work: read bytes, imdecode to RGB, resize (INTER_LINEAR)."""
    import cv2

    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)

    def decode(path: str) -> np.ndarray:
        with open(path, "rb") as f:
            img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), flag)
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    return decode


def _paths(index: DatasetIndex, n: int) -> list[str]:
    return [index.path(i % len(index)) for i in range(n)]


def measure_percore(index: DatasetIndex, n: int, size: tuple[int, int], **_: Any) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)
    decode = _decode_fn(size)
    paths = _paths(index, n + 16)
    for p in paths[:16]:
        decode(p)
    started, cpu = time.perf_counter(), time.process_time()
    for p in paths[16:]:
        decode(p)
    wall = time.perf_counter() - started
    return {"images_per_s": n / wall, "cpu_ms_per_image": (time.process_time() - cpu) * 1000 / n}


def measure_classic(index: DatasetIndex, n: int, size: tuple[int, int], batch_size: int, **_: Any) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)

    def train_data(paths: list[str], labels: np.ndarray) -> Any:  # the classic write-up's generator
        for i in range(0, len(paths) - batch_size + 1, batch_size):
            imgs = [cv2.resize(cv2.imread(p), size) / 255 for p in paths[i : i + batch_size]]
            yield np.array(imgs), np.array(labels[i : i + batch_size])

    paths = _paths(index, n + 2 * batch_size)
    labels = index.labels[np.arange(len(paths)) % len(index)]
    gen = train_data(paths, labels)
    next(gen), next(gen)
    started, cpu, got = time.perf_counter(), time.process_time(), 0
    for x, _ in gen:
        got += len(x)
    wall = time.perf_counter() - started
    return {"images_per_s": got / wall, "cpu_ms_per_image": (time.process_time() - cpu) * 1000 / got}


def measure_torch(index: DatasetIndex, n: int, size: tuple[int, int], batch_size: int, workers: int,
                  **_: Any) -> dict[str, Any] | None:
    try:
        import torch
        from torch.utils.data import DataLoader, Dataset
    except ImportError:
        return None
    torch.set_num_threads(1)
    decode = _decode_fn(size)
    paths = _paths(index, n + 2 * batch_size)
    labels = index.labels[np.arange(len(paths)) % len(index)]

    class Images(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return decode(paths[i]), int(labels[i])

    def init(_: int) -> None:
        import cv2

        cv2.setNumThreads(1)

    loader = DataLoader(Images(), batch_size=batch_size, num_workers=workers, persistent_workers=True,
                        prefetch_factor=2, worker_init_fn=init, drop_last=True)
    it = iter(loader)
    next(it), next(it)
    started, got, touched = time.perf_counter(), 0, 0
    for x, _ in it:
        touched += int(x[0, 0, 0, 0])
        got += len(x)
    wall = time.perf_counter() - started
    del it, loader
    return {"images_per_s": got / wall}


class _PssSampler:
    """Samples the proportional set size of a process and its children until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.pid and not self._stop.wait(0.1):
            self.peak_mb = max(self.peak_mb, sum(_pss_kb(p) for p in [self.pid, *_children(self.pid)]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


class _Server:
    """`loader-server serve` as a subprocess on a private ipc endpoint."""

    def __init__(self, data: str, scratch: str, batch_size: int, size: str, workers: int, extra: list[str],
                 endpoint: str | None = None) -> None:
        self.endpoint = endpoint or f"ipc://{scratch}/bench-{time.monotonic_ns()}.sock"
        cmd = [sys.executable, "-m", "loader_server", "serve", "--data", data, "--bind", self.endpoint,
               "--batch-size", str(batch_size), "--size", size, "--workers", str(workers),
               "--log-level", "WARNING", *extra]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(_SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure_service(index: DatasetIndex, n: int, size: tuple[int, int], batch_size: int, workers: int,
                    data: str, scratch: str, extra: list[str] | None = None, step_fraction: float | None = None,
                    capacity: float | None = None, client_kwargs: dict[str, Any] | None = None,
                    warmup: int = 2, endpoint: str | None = None, sample_pss: bool = True,
                    **_: Any) -> dict[str, Any]:
    """Serve `data`, consume `n` images after `warmup` batches, touching one byte per batch.

    With `step_fraction`, a simulated training step follows every batch, long enough that the
    trainer consumes that fraction of the loader's capacity (`capacity` images/s), and the
    data stall (time waiting in next() over wall time) is measured.
    """
    server = _Server(data, scratch, batch_size, f"{size[0]}x{size[1]}", workers, extra or [], endpoint)
    pss = _PssSampler(server.proc.pid if sample_pss else 0)
    try:
        with LoaderClient(server.endpoint, timeout_s=120, **{"prefetch": 4, **(client_kwargs or {})}) as client:
            it = iter(client)
            next(it)
            ttfb = time.perf_counter() - server.started
            for _ in range(warmup - 1):
                next(it)
            step_s = 0.0 if step_fraction is None or not capacity else batch_size / (capacity * step_fraction)
            latencies: list[float] = []
            got = touched = 0
            waited = 0.0
            started = time.perf_counter()
            while got < n:
                t0 = time.perf_counter()
                x, _ = next(it)
                dt = time.perf_counter() - t0
                latencies.append(dt)
                waited += dt
                touched += int(x.reshape(-1)[0])
                got += len(x)
                if step_s:
                    time.sleep(step_s)
            wall = time.perf_counter() - started
    finally:
        server.stop()
        peak = pss.stop()
    ms = np.array(latencies) * 1000
    return {"images_per_s": got / wall, "next_p50_ms": float(np.percentile(ms, 50)),
            "next_p99_ms": float(np.percentile(ms, 99)), "stall_pct": 100 * waited / wall,
            "time_to_first_batch_s": ttfb, "peak_pss_mb": peak, "step_ms": step_s * 1000}


def measure_multiserver(index: DatasetIndex, n: int, size: tuple[int, int], batch_size: int, workers: int,
                        data: str, scratch: str, servers: int, extra: list[str], **_: Any) -> dict[str, Any]:
    """Images/s from `servers` servers on separate loopback addresses, merged by one client."""
    procs = [_Server(data, scratch, batch_size, f"{size[0]}x{size[1]}", workers, extra,
                     f"tcp://127.0.0.{2 + i}:{_free_port()}") for i in range(servers)]
    try:
        with LoaderClient([p.endpoint for p in procs], timeout_s=120, prefetch=4) as client:
            it = iter(client)
            for _ in range(_MULTI_WARMUP_BATCHES * servers):  # drain what was built while starting
                next(it)
            got, started = 0, time.perf_counter()
            while got < n:
                got += len(next(it)[0])
            return {"images_per_s": got / (time.perf_counter() - started), "servers": servers}
    finally:
        for p in procs:
            p.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _curve_keys(scratch: str) -> tuple[str, dict[str, Any]]:
    """A server key directory with one allowed client; returns (dir, client kwargs)."""
    import zmq.auth

    keys = Path(scratch) / "curve"
    (keys / "clients").mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(keys), "server")
    public, _ = zmq.auth.create_certificates(str(keys / "clients"), "bench")
    return str(keys), {"server_public_key": str(keys / "server.key"), "client_keys": str(keys / "clients" /
                                                                                          "bench.key_secret")}


def measure_arrays(scratch: str, batch_size: int, n: int, workers: int) -> dict[str, Any]:
    """Rows per second from a memory-mapped dense .npy and from ragged sequences."""
    rng = np.random.default_rng(0)
    root = Path(scratch) / "arrays"
    root.mkdir(exist_ok=True)
    rows, shape, maxlen = 20_000, (32, 32), 200
    np.save(root / "x.npy", rng.normal(size=(rows, *shape)).astype(np.float32))
    np.save(root / "y.npy", rng.integers(0, 10, rows))
    lengths = rng.integers(10, 400, rows)
    np.save(root / "values.npy", rng.integers(1, 30_000, int(lengths.sum())).astype(np.int32))
    np.save(root / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    out: dict[str, Any] = {"row_shape": list(shape), "maxlen": maxlen}
    for name, data, extra in (
        ("dense", root / "x.npy", ["--labels", str(root / "y.npy")]),
        ("ragged", root / "values.npy", ["--offsets", str(root / "offsets.npy"), "--labels", str(root / "y.npy"),
                                         "--maxlen", str(maxlen)]),
    ):
        server = _Server(str(data), scratch, batch_size, "8x8", workers, extra)
        try:
            with LoaderClient(server.endpoint, timeout_s=120) as client:
                it = iter(client)
                for _ in range(4):
                    next(it)
                got, started = 0, time.perf_counter()
                while got < n:
                    got += len(next(it)[0])
                out[f"{name}_rows_per_s"] = got / (time.perf_counter() - started)
        finally:
            server.stop()
    return out


def measure_ttfb_million(index: DatasetIndex, size: tuple[int, int], batch_size: int, workers: int,
                         scratch: str, lines: int = 1_000_000) -> dict[str, Any]:
    """Time from starting the server to the first batch, with a list file of `lines` lines."""
    listfile = Path(scratch) / "million.txt"
    with open(listfile, "wb") as f:
        rel = [os.fsencode(index.path(i)) for i in range(len(index))]
        for i in range(lines):
            f.write(rel[i % len(rel)] + b" %d\n" % index.labels[i % len(rel)])
    server = _Server(str(listfile), scratch, batch_size, f"{size[0]}x{size[1]}", workers, [])
    pss = _PssSampler(server.proc.pid)
    try:
        with LoaderClient(server.endpoint, timeout_s=120) as client:
            next(iter(client))
            ttfb = time.perf_counter() - server.started
            for _ in range(20):
                client.next()
    finally:
        server.stop()
        peak = pss.stop()
    return {"lines": lines, "time_to_first_batch_s": ttfb, "peak_pss_mb": peak}


def measure_stages(index: DatasetIndex, size: tuple[int, int], batch_size: int, scratch: str,
                   n: int = 512) -> dict[str, float]:
    """CPU milliseconds per image of each stage, measured on its own in this process."""
    import cv2
    import zmq

    from loader_client import protocol

    cv2.setNumThreads(1)
    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
    paths = _paths(index, n)

    def cpu_ms(fn: Callable[[], Any], count: int) -> float:
        fn()
        t = time.process_time()
        fn()
        return (time.process_time() - t) * 1000 / count

    blobs = [open(p, "rb").read() for p in paths]
    imgs = [cv2.imdecode(np.frombuffer(b, np.uint8), flag) for b in blobs]
    batch = np.empty((batch_size, size[1], size[0], 3), np.uint8)
    out: dict[str, float] = {}
    out["read"] = cpu_ms(lambda: [open(p, "rb").read() for p in paths], n)
    out["decode"] = cpu_ms(lambda: [cv2.imdecode(np.frombuffer(b, np.uint8), flag) for b in blobs], n)
    out["resize"] = cpu_ms(lambda: [cv2.resize(im, size, dst=batch[i % batch_size]) for i, im in enumerate(imgs)], n)
    labels = index.labels
    idx = np.arange(batch_size) % len(index)
    out["collate"] = cpu_ms(lambda: [labels[idx] for _ in range(n // batch_size)], n)
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    endpoint = f"ipc://{scratch}/stages.sock"
    pull.bind(endpoint)
    push.connect(endpoint)
    head = protocol.pack("batch", arrays=protocol.describe_arrays({"x": batch}))
    batches = max(4, n // batch_size)
    done = threading.Event()
    recv_cpu: list[float] = []

    def receiver() -> None:
        t = time.thread_time()
        for _ in range(batches):
            frames = pull.recv_multipart(copy=False)
            protocol.build_arrays(protocol.unpack(frames[0])["arrays"], frames[1:])
        recv_cpu.append(time.thread_time() - t)
        done.set()

    thread = threading.Thread(target=receiver)
    thread.start()
    t, wall = time.thread_time(), time.perf_counter()
    for _ in range(batches):
        push.send_multipart([head, batch], copy=False)
    send_cpu = time.thread_time() - t
    done.wait(60)
    wall = time.perf_counter() - wall
    thread.join(60)
    push.close(0)
    pull.close(0)
    ctx.term()
    images = batches * batch_size
    out["send (Python side)"] = send_cpu * 1000 / images
    out["receive (Python side)"] = (recv_cpu[0] if recv_cpu else float("nan")) * 1000 / images
    # ZeroMQ's I/O threads copy the bytes through the kernel: the wall time of a transfer shows
    # what the shared-memory path (no copy at all) saves per image.
    out["socket transfer over ipc (wall, frames path only)"] = wall * 1000 / images
    return out


# ---------------------------------------------------------------------------- the run
def run_bench(args: argparse.Namespace) -> int:
    from .config import parse_size

    size = parse_size(args.size)
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in _SYSTEMS:
            print(f"loader-server bench: unknown system {s!r}; choose from {', '.join(_SYSTEMS)}", file=sys.stderr)
            return 2
    extras = set() if args.extras in ("", "none") else set(args.extras.split(","))
    n, rounds = args.images, args.rounds
    if args.quick:
        n, rounds = min(n, 256), 1
    scratch = tempfile.mkdtemp(prefix="loader-bench-")
    try:
        data = args.data
        if data is None:
            from .sample_data import write_sample_images

            count = 128 if args.quick else 1024
            data = str(write_sample_images(Path(scratch) / "images", count, min_side=96 if args.quick else 300,
                                           max_side=160 if args.quick else 560))
        index = load_index(data)
        serve_extra = args.serve_args.split()
        common = {"index": index, "n": n, "size": size, "batch_size": args.batch_size, "workers": args.workers,
                  "data": data, "scratch": scratch}
        results: dict[str, Any] = {"rounds": {s: [] for s in systems}}
        measure = {"percore": measure_percore, "service": measure_service, "classic": measure_classic,
                   "torch": measure_torch}
        progress = Progress("bench", rounds * len(systems), " runs")
        for r in range(rounds):
            for k, s in enumerate(systems):
                extra = {"extra": serve_extra} if s == "service" else {}
                res = measure[s](**common, **extra)
                progress.update(r * len(systems) + k + 1)
                if res is not None:
                    results["rounds"][s].append(res)
                    print(f"round {r + 1}/{rounds} {s:8s} {res['images_per_s']:8.0f} images/s", flush=True)
        progress.close()
        summary = {s: _summary(v) for s, v in results["rounds"].items() if v}
        results["summary"] = summary
        capacity = summary.get("service", {}).get("median")
        quick_n = max(args.batch_size * 8, n // 4)
        if "strict" in extras:
            res = measure_service(**{**common, "n": n}, extra=[*serve_extra, "--no-reduced-decode"])
            results["service_no_reduced_decode"] = res
            print(f"service, reduced decoding off: {res['images_per_s']:.0f} images/s", flush=True)
        if "stall" in extras and capacity:
            # No PSS sampling here: that thread would take the GIL from the trainer loop it measures.
            res = measure_service(**{**common, "n": n}, extra=serve_extra, step_fraction=0.8, capacity=capacity,
                                  warmup=_STALL_WARMUP_BATCHES, sample_pss=False)
            results["stall"] = res
            print(f"stall at 80% load: {res['stall_pct']:.2f}% of wall time, next() p50 {res['next_p50_ms']:.3f} ms",
                  flush=True)
        if "float32" in extras and capacity:
            # Warm up past the first use of every shared-memory slot: a fresh page costs a fault.
            warm = {"n": quick_n, "warmup": _FLOAT32_WARMUP_BATCHES}
            res = measure_service(**{**common, **warm}, extra=[*serve_extra, "--dtype", "float32"])
            results["float32"] = {**res, "ratio_to_uint8": res["images_per_s"] / capacity}
            print(f"float32 on the server: {res['images_per_s']:.0f} images/s "
                  f"({res['images_per_s'] / capacity:.2f}x uint8)", flush=True)
            res = measure_service(**{**common, **warm}, extra=serve_extra, client_kwargs={"normalize": True})
            results["float32_client"] = {**res, "ratio_to_uint8": res["images_per_s"] / capacity}
            print(f"float32 on the client (uint8 on the wire): {res['images_per_s']:.0f} images/s "
                  f"({res['images_per_s'] / capacity:.2f}x uint8)", flush=True)
        if "slow" in extras and capacity:
            slow_args = ["--simulate-read-latency-ms", str(args.read_latency_ms), "--read-threads", "64"]
            res = measure_service(**{**common, "n": quick_n}, extra=[*serve_extra, *slow_args])
            results["slow_storage"] = {**res, "read_latency_ms": args.read_latency_ms,
                                       "ratio_to_no_latency": res["images_per_s"] / capacity}
            print(f"slow storage (+{args.read_latency_ms:g} ms per read): {res['images_per_s']:.0f} images/s "
                  f"({res['images_per_s'] / capacity:.2f}x)", flush=True)
        for key, flag, spec, label in (
            ("augment", "--augment", "rrc(scale=0.08-1),flip,jitter(0.4),rotate(10),cutout(0.25)", "augmented"),
            ("transform", "--transform", "loader_server.sample_data:example_transform", "user transform"),
        ):
            if key in extras and capacity:
                res = measure_service(**{**common, "n": quick_n}, extra=[*serve_extra, flag, spec])
                results[key] = {**res, "spec": spec, "ratio_to_plain": res["images_per_s"] / capacity}
                print(f"{label} {spec}: {res['images_per_s']:.0f} images/s "
                      f"({res['images_per_s'] / capacity:.2f}x plain)", flush=True)
        if "arrays" in extras:
            results["arrays"] = measure_arrays(scratch, args.batch_size, quick_n * 8, args.workers)
            print(f"array data sets: {results['arrays']['dense_rows_per_s']:.0f} rows/s dense float32 "
                  f"{results['arrays']['row_shape']}, {results['arrays']['ragged_rows_per_s']:.0f} rows/s ragged "
                  f"int32 padded to {results['arrays']['maxlen']}", flush=True)
        if "curve" in extras:
            # Over TCP without shared memory, so that every byte crosses the socket: with and without CURVE.
            curve_dir, curve_client = _curve_keys(scratch)
            tcp = {**common, "n": quick_n}
            plain = measure_service(**tcp, extra=[*serve_extra, "--no-shm"],
                                    endpoint=f"tcp://127.0.0.1:{_free_port()}")
            secured = measure_service(**tcp, extra=[*serve_extra, "--no-shm", "--curve-dir", curve_dir],
                                      endpoint=f"tcp://127.0.0.1:{_free_port()}", client_kwargs=curve_client)
            results["curve"] = {"tcp_images_per_s": plain["images_per_s"], "curve_images_per_s":
                                secured["images_per_s"], "ratio": secured["images_per_s"] / plain["images_per_s"]}
            print(f"tcp without shm: {plain['images_per_s']:.0f} images/s; with CURVE: "
                  f"{secured['images_per_s']:.0f} ({results['curve']['ratio']:.2f}x)", flush=True)
        if "multiserver" in extras:
            # Latency-bound workers (slow storage, reads inline): one host's CPUs are not the limit.
            slow = [*serve_extra, "--simulate-read-latency-ms", str(args.read_latency_ms), "--read-threads", "0"]
            timed = {**common, "n": 4 * args.batch_size if args.quick else 16 * args.batch_size}
            one = measure_multiserver(**timed, servers=1, extra=slow)
            two = measure_multiserver(**timed, servers=2, extra=slow)
            results["multiserver"] = {"one": one["images_per_s"], "two": two["images_per_s"],
                                      "ratio": two["images_per_s"] / one["images_per_s"],
                                      "read_latency_ms": args.read_latency_ms}
            print(f"latency-bound: 1 server {one['images_per_s']:.0f} images/s, 2 servers "
                  f"{two['images_per_s']:.0f} ({results['multiserver']['ratio']:.2f}x)", flush=True)
        if "scaling" in extras:
            results["scaling"] = {}
            for w in [int(v) for v in args.scaling.split(",") if v]:
                res = measure_service(**{**common, "n": quick_n, "workers": w}, extra=serve_extra)
                results["scaling"][w] = res
                print(f"scaling: {w} workers {res['images_per_s']:.0f} images/s", flush=True)
        if "ttfb" in extras:
            lines = 20_000 if args.quick else 1_000_000
            results["ttfb_million"] = measure_ttfb_million(index, size, args.batch_size, args.workers, scratch, lines)
            print(f"time to first batch with {lines} lines: {results['ttfb_million']['time_to_first_batch_s']:.2f} s",
                  flush=True)
        if "stages" in extras:
            results["stages_cpu_ms_per_image"] = measure_stages(index, size, args.batch_size, scratch,
                                                                n=128 if args.quick else 512)
        results["machine"] = _machine()
        results["command"] = "loader-server bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
        results["settings"] = {"data": data if args.data else "generated sample data", "images": len(index),
                               "batch_size": args.batch_size, "size": args.size, "workers": args.workers,
                               "timed_images": n, "rounds": rounds, "serve_args": args.serve_args}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        table = markdown(results)
        (out / "results.md").write_text(table)
        print(table)
        if _plot(results, out / "results.png"):
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
        else:
            print(f"wrote {out / 'results.json'}, {out / 'results.md'} (install matplotlib for the plot)")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [r["images_per_s"] for r in runs]
    out: dict[str, Any] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    for key in ("next_p50_ms", "next_p99_ms", "time_to_first_batch_s", "peak_pss_mb", "cpu_ms_per_image"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def _machine() -> dict[str, Any]:
    import cv2

    return {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "opencv": cv2.__version__,
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def markdown(results: dict[str, Any]) -> str:
    """The markdown report of a result dict."""
    s = results["summary"]
    percore = s.get("percore", {}).get("median")
    lines = [f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}, "
             f"Python {results['machine']['python']}, OpenCV {results['machine']['opencv']}, "
             f"{results['machine']['date']}.  ",
             f"Command: `{results['command'] or 'loader-server bench'}`  ",
             f"Settings: {json.dumps(results['settings'])}", "",
             "| system | images/s (median) | min–max | ratio to 2 x per-core | service ratio to it |",
             "|---|---|---|---|---|"]
    service = s.get("service", {}).get("median")
    for name in _SYSTEMS:
        if name not in s:
            continue
        v = s[name]
        vs_core = f"{v['median'] / (2 * percore):.2f}" if percore else "–"
        ratio = f"{service / v['median']:.2f}x" if service and name != "service" else "–"
        lines.append(f"| {name} | {v['median']:.0f} | {v['min']:.0f}–{v['max']:.0f} | {vs_core} | {ratio} |")
    lines.append("")
    if "service" in s:
        v = s["service"]
        lines.append(f"Service: next() p50 {v['next_p50_ms']:.3f} ms, p99 {v['next_p99_ms']:.3f} ms (consumer "
                     f"never pauses, so it waits on the loader); time to first batch "
                     f"{v['time_to_first_batch_s']:.2f} s; peak PSS of server + workers {v['peak_pss_mb']:.0f} MB.")
    extra_rows = []
    if "service_no_reduced_decode" in results:
        r = results["service_no_reduced_decode"]
        extra_rows.append(("service, --no-reduced-decode", f"{r['images_per_s']:.0f} images/s"
                           + (f" ({r['images_per_s'] / (2 * percore):.2f} of 2 x per-core)" if percore else "")))
    if "stall" in results:
        r = results["stall"]
        extra_rows.append((f"data stall, training step {r['step_ms']:.1f} ms (80% of loader capacity)",
                           f"{r['stall_pct']:.2f}% of wall time; next() p50 {r['next_p50_ms']:.3f} ms, "
                           f"p99 {r['next_p99_ms']:.3f} ms"))
    if "float32" in results:
        r = results["float32"]
        extra_rows.append(("float32 made by the workers (--dtype float32)",
                           f"{r['images_per_s']:.0f} images/s = {r['ratio_to_uint8']:.2f}x uint8"))
    if "float32_client" in results:
        r = results["float32_client"]
        extra_rows.append(("float32 made by the client (normalize=True, uint8 on the wire)",
                           f"{r['images_per_s']:.0f} images/s = {r['ratio_to_uint8']:.2f}x uint8"))
    if "slow_storage" in results:
        r = results["slow_storage"]
        extra_rows.append((f"slow storage, +{r['read_latency_ms']:g} ms per read, 64 read threads",
                           f"{r['images_per_s']:.0f} images/s = {r['ratio_to_no_latency']:.2f}x no latency"))
    if "augment" in results:
        r = results["augment"]
        extra_rows.append((f"augmentations `{r['spec']}`", f"{r['images_per_s']:.0f} images/s = "
                           f"{r['ratio_to_plain']:.2f}x plain"))
    if "transform" in results:
        r = results["transform"]
        extra_rows.append((f"user transform `{r['spec']}`", f"{r['images_per_s']:.0f} images/s = "
                           f"{r['ratio_to_plain']:.2f}x plain"))
    if "arrays" in results:
        r = results["arrays"]
        extra_rows.append((f"array data set, dense float32 rows of {r['row_shape']} (memory-mapped .npy)",
                           f"{r['dense_rows_per_s']:.0f} rows/s"))
        extra_rows.append((f"array data set, ragged int32 sequences padded to {r['maxlen']}",
                           f"{r['ragged_rows_per_s']:.0f} rows/s"))
    if "curve" in results:
        r = results["curve"]
        extra_rows.append(("CurveZMQ encryption (tcp loopback, no shared memory)",
                           f"{r['curve_images_per_s']:.0f} against {r['tcp_images_per_s']:.0f} images/s = "
                           f"{r['ratio']:.2f}x"))
    if "multiserver" in results:
        r = results["multiserver"]
        extra_rows.append((f"two servers (127.0.0.2, 127.0.0.3), latency-bound (+{r['read_latency_ms']:g} ms "
                           "per read, inline)", f"{r['two']:.0f} against {r['one']:.0f} images/s from one = "
                           f"{r['ratio']:.2f}x"))
    if "ttfb_million" in results:
        r = results["ttfb_million"]
        extra_rows.append((f"time to first batch, {r['lines']:,}-line list file",
                           f"{r['time_to_first_batch_s']:.2f} s; peak PSS {r['peak_pss_mb']:.0f} MB"))
    if extra_rows:
        lines += ["", "| measurement | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in extra_rows]
    if "scaling" in results:
        lines += ["", "| workers | images/s | peak PSS MB |", "|---|---|---|"]
        for w, r in results["scaling"].items():
            lines.append(f"| {w} | {r['images_per_s']:.0f} | {r['peak_pss_mb']:.0f} |")
    if "stages_cpu_ms_per_image" in results:
        st = results["stages_cpu_ms_per_image"]
        lines += ["", "| stage | CPU ms per image |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in st.items()]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = results["summary"]
    names = [n for n in _SYSTEMS if n in s]
    fig, axes = plt.subplots(1, 2 if "scaling" in results else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    med = [s[n]["median"] for n in names]
    err = [[s[n]["median"] - s[n]["min"] for n in names], [s[n]["max"] - s[n]["median"] for n in names]]
    ax.bar(names, med, yerr=err, capsize=4, color=["#999", "#2a7", "#c66", "#68c"][: len(names)])
    if "percore" in s:
        ax.axhline(2 * s["percore"]["median"], ls="--", color="k", lw=1, label="2 x per-core limit")
        ax.legend()
    ax.set_ylabel("images/s")
    ax.set_title(f"{results['settings']['workers']} workers, batch {results['settings']['batch_size']}, "
                 f"{results['settings']['size']}")
    if "scaling" in results:
        ax2 = axes[0][1]
        ws = list(results["scaling"])
        ax2.plot([int(w) for w in ws], [results["scaling"][w]["images_per_s"] for w in ws], "o-")
        ax2.set_xlabel("workers")
        ax2.set_ylabel("images/s")
        ax2.set_title(f"scaling on {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
