"""The systems compared side by side, each a function of the `Bench` returning images/s (and more).

* ``percore``: one process reading, decoding and resizing, no batching (the per-core limit);
* ``service``: ``loader-server serve`` with N workers, consumed by a client in this process
  that touches every batch (also: ``next()`` latency, time to first batch, peak PSS);
* ``classic``: the classic single-process generator (imread, resize, /255 as float64, np.array);
* ``torch``: torch DataLoader with the same decode function and worker count (if installed);
* ``torchvision``: torch DataLoader with the usual torchvision-style decode: Pillow opens the
  file and converts it to RGB at full size (``datasets.folder.pil_loader``), then Resize or, when
  the served ``--augment`` has ``rrc``, RandomResizedCrop (the same draw as the service's,
  Pillow's antialiased bilinear resize of the box), and a horizontal flip for ``flip``; skipped
  without Pillow. Not in the default ``--systems``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from loader_client import LoaderClient
from loader_client.contract.errors import LoaderError
from loader_server.launch import ServerProcess, ServerProcessError, children_of

from .context import Bench

__all__ = [
    "DEFAULT_SYSTEMS",
    "STEP_MODELS",
    "SYSTEMS",
    "PssSampler",
    "cpu_s",
    "curve_keys",
    "decode_fn",
    "measure_service",
    "pil_decode_fn",
    "served",
    "served_augment",
    "simulate_step",
    "torch_loader",
]

#: Seconds a benchmark client waits for a batch before it gives up.
CLIENT_TIMEOUT_S = 120.0

#: How a simulated training step spends its time (`simulate_step`):
#: ``sleep``: the trainer's thread waits, as a GPU trainer's does in the device sync, leaving the
#: CPU (and the GIL) to the loader; ``cpu``: it computes in native code that releases the GIL
#: (hashing, like a CPU trainer's tensor ops), so the step takes a core from the loader.
STEP_MODELS = ("sleep", "cpu")
_CPU_STEP_CHUNK = bytes(16 << 10)  # hashed per call: about 10-20 us, with the GIL released (over 2 KiB)


def simulate_step(step_s: float, model: str = "sleep") -> None:
    """A training step of `step_s` seconds, as `model` of STEP_MODELS spends it."""
    if model == "sleep":
        time.sleep(step_s)
        return
    if model != "cpu":
        raise ValueError(f"unknown step model {model!r}; choose from {', '.join(STEP_MODELS)}")
    import hashlib

    end = time.perf_counter() + step_s
    while time.perf_counter() < end:
        hashlib.blake2b(_CPU_STEP_CHUNK)


def decode_fn(size: tuple[int, int]) -> Callable[[str], np.ndarray]:
    """The shared per-image work: read bytes, imdecode to RGB, resize (INTER_LINEAR)."""
    import cv2

    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)

    def decode(path: str) -> np.ndarray:
        with open(path, "rb") as f:
            img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), flag)
        if img is None:
            raise ValueError(f"{path}: not a decodable image (run `loader-server check` on the data set)")
        return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)

    return decode


def measure_percore(bench: Bench) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)
    n = bench.n
    decode = decode_fn(bench.size)
    paths = bench.paths(n + 16)
    for p in paths[:16]:
        decode(p)
    started, cpu = time.perf_counter(), time.process_time()
    for p in paths[16:]:
        decode(p)
    wall = time.perf_counter() - started
    return {"images_per_s": n / wall, "cpu_ms_per_image": (time.process_time() - cpu) * 1000 / n}


def measure_classic(bench: Bench) -> dict[str, Any]:
    import cv2

    cv2.setNumThreads(1)
    batch_size, size = bench.batch_size, bench.size

    def train_data(paths: list[str], labels: np.ndarray) -> Any:  # the classic write-up's generator
        for i in range(0, len(paths) - batch_size + 1, batch_size):
            imgs = [cv2.resize(cv2.imread(p), size) / 255 for p in paths[i : i + batch_size]]  # type: ignore[arg-type]
            yield np.array(imgs), np.array(labels[i : i + batch_size])

    paths = bench.paths(bench.n + 2 * batch_size)
    labels = bench.index.labels[np.arange(len(paths)) % len(bench.index)]
    gen = train_data(paths, labels)
    next(gen), next(gen)
    started, cpu, got = time.perf_counter(), time.process_time(), 0
    for x, _ in gen:
        got += len(x)
    wall = time.perf_counter() - started
    return {"images_per_s": got / wall, "cpu_ms_per_image": (time.process_time() - cpu) * 1000 / got}


def torch_loader(bench: Bench, paths: list[str], labels: np.ndarray, **options: Any) -> Any:
    """torch DataLoader over `paths` with the shared decode function, the run's batch size and
    worker count (one OpenCV thread each), persistent workers, drop_last; `options` adds to those."""
    from torch.utils.data import DataLoader, Dataset

    decode = decode_fn(bench.size)

    class Images(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return decode(paths[i]), int(labels[i])

    def init(_: int) -> None:
        import cv2

        cv2.setNumThreads(1)

    return DataLoader(Images(), batch_size=bench.batch_size, num_workers=bench.workers, persistent_workers=True,
                      worker_init_fn=init, drop_last=True, **options)


def pil_decode_fn(size: tuple[int, int], augment: str | None) -> Callable[[str, int], np.ndarray]:
    """torchvision-style per-image work with Pillow: open, convert to RGB, (random resized crop,) resize
    bilinear with antialias, (flip); the crop and the flip drawn as the service draws them for `augment`."""
    from PIL import Image

    from loader_server.pipeline.augment import Augmenter, parse_augment, sample_rng

    ops = Augmenter(parse_augment(augment)) if augment else None
    crop = ops is not None and ops.source is not None
    flip = [op for op in ops.post if op.name == "flip"] if ops is not None else []

    def decode(path: str, index: int) -> np.ndarray:
        with Image.open(path) as im:
            img = im.convert("RGB")
        box = None
        rng = sample_rng(0, 0, index)
        if crop and ops is not None:
            x, y, w, h = ops.crop_box(img.width, img.height, rng)
            box = (x, y, x + w, y + h)
        img = img.resize(size, Image.Resampling.BILINEAR, box=box)
        if flip and rng.random() < flip[0].params["p"]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(img)

    return decode


def served_augment(extra: list[str]) -> str | None:
    """The ``--augment`` value among serve flags, or None."""
    for k, arg in enumerate(extra):
        if arg == "--augment" and k + 1 < len(extra):
            return extra[k + 1]
        if arg.startswith("--augment="):
            return arg.split("=", 1)[1]
    return None


def measure_torchvision(bench: Bench) -> dict[str, Any] | None:
    try:
        import PIL  # noqa: F401
        import torch
        from torch.utils.data import DataLoader, Dataset
    except ImportError:
        return None
    augment = served_augment(bench.serve_extra)
    if augment and any(op.strip().split("(")[0] not in ("rrc", "flip") for op in augment.split(",") if op.strip()):
        print(f"torchvision: skipped (it does rrc and flip only, not all of {augment!r})", flush=True)
        return None
    torch.set_num_threads(1)
    paths = bench.paths(bench.n + 2 * bench.batch_size)
    labels = bench.index.labels[np.arange(len(paths)) % len(bench.index)]
    decode = pil_decode_fn(bench.size, augment)

    class Images(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return decode(paths[i], i), int(labels[i])

    return _timed_loader(DataLoader(Images(), batch_size=bench.batch_size, num_workers=bench.workers,
                                     persistent_workers=True, drop_last=True, prefetch_factor=2))


def measure_torch(bench: Bench) -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    paths = bench.paths(bench.n + 2 * bench.batch_size)
    labels = bench.index.labels[np.arange(len(paths)) % len(bench.index)]
    return _timed_loader(torch_loader(bench, paths, labels, prefetch_factor=2))


def _timed_loader(loader: Any) -> dict[str, Any]:
    """Images per second a torch DataLoader delivers, after two warm-up batches (each batch touched)."""
    it = iter(loader)
    next(it), next(it)
    started, got, touched = time.perf_counter(), 0, 0
    for x, _ in it:
        touched += int(x[0, 0, 0, 0])
        got += len(x)
    wall = time.perf_counter() - started
    del it, loader
    return {"images_per_s": got / wall}


class PssSampler:
    """Samples the proportional set size of a process and its children until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.pid and not self._stop.wait(0.1):
            self.peak_mb = max(self.peak_mb, sum(_pss_kb(p) for p in [self.pid, *children_of(self.pid)]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's unit of CPU time


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and its children (the server and its workers)."""
    return sum(cpu_s(p) for p in [pid, *children_of(pid)])


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def curve_keys(scratch: str) -> tuple[str, dict[str, Any]]:
    """A server key folder under `scratch` with one allowed client (made once); returns (folder, client kwargs)."""
    import zmq.auth

    keys = os.path.join(scratch, "curve")
    clients = os.path.join(keys, "clients")
    if not os.path.exists(os.path.join(clients, "bench.key_secret")):
        os.makedirs(clients, exist_ok=True)
        zmq.auth.create_certificates(keys, "server")
        zmq.auth.create_certificates(clients, "bench")
    return keys, {"server_public_key": os.path.join(keys, "server.key"),
                  "client_keys": os.path.join(clients, "bench.key_secret")}


@contextmanager
def served(bench: Bench, data: str, extra: list[str], *, workers: int | None = None, endpoint: str | None = None,
           size: str | None = None, ready: bool = False) -> Iterator[ServerProcess]:
    """``loader-server serve`` on `data` with the run's batch size, size and workers, stopped at the end.

    `ready`: wait until it answers health first (not where the time to first batch is measured,
    which counts from the start of the process). A client error of a server that died says so,
    with the server's log.
    """
    server = ServerProcess(data, "--batch-size", str(bench.batch_size), "--size", size or bench.size_text,
                           "--workers", str(workers or bench.workers), "--log-level", "WARNING", *extra,
                           endpoint=endpoint)
    try:
        if ready:
            server.wait_ready(CLIENT_TIMEOUT_S)
        yield server
    except ServerProcessError:
        raise
    except LoaderError as exc:
        if not server.running():
            raise server.failure(f"exited with code {server.proc.returncode} while measured ({exc})") from exc
        raise
    finally:
        code = server.stop()
        if code != 0:
            print(f"loader-server bench: warning: {server.failure(f'exited with code {code} at SIGTERM')}",
                  file=sys.stderr)


def measure_service(bench: Bench, *, n: int | None = None, workers: int | None = None, extra: list[str] | None = None,
                    step_fraction: float | None = None, client_kwargs: dict[str, Any] | None = None,
                    warmup: int = 2, endpoint: str | None = None, sample_pss: bool = True,
                    step_model: str = "sleep", min_wall_s: float = 0.0, data: str | None = None,
                    cpu: bool = False) -> dict[str, Any]:
    """Serve the data, consume `n` images after `warmup` batches, touching one byte per batch.

    `extra`: the serve flags (default: --serve-args); `data`: another data set (default: the run's);
    `cpu`: also the CPU ms per timed image of the server and its workers (``loader_cpu_ms_per_image``).
    With `step_fraction`, a simulated training
    step (`simulate_step` of `step_model`) follows every batch, long enough that the trainer
    consumes that fraction of the loader's capacity (`bench.capacity` images/s), and the data
    stall (time waiting in next() over wall time) is measured; then `n` grows so that the paced
    run lasts at least `min_wall_s` (a fast loader's few hundred ms are a handful of hiccups).
    """
    n = bench.n if n is None else n
    batch_size, capacity = bench.batch_size, bench.capacity
    if step_fraction is not None and capacity:
        n = max(n, int(min_wall_s * capacity * step_fraction))
    with served(bench, bench.data if data is None else data, bench.serve_extra if extra is None else extra,
                workers=workers, endpoint=endpoint) as server:
        pss = PssSampler(server.pid if sample_pss else 0)
        try:
            with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S,
                              **{"prefetch": 4, **(client_kwargs or {})}) as client:
                it = iter(client)
                next(it)
                ttfb = time.perf_counter() - server.started
                for _ in range(warmup - 1):
                    next(it)
                step_s = 0.0 if step_fraction is None or not capacity else batch_size / (capacity * step_fraction)
                latencies: list[float] = []
                got = touched = 0
                waited = 0.0
                cpu_before = tree_cpu_s(server.pid) if cpu else 0.0
                started = time.perf_counter()
                while got < n:
                    t0 = time.perf_counter()
                    x, _ = next(it)[:2]
                    dt = time.perf_counter() - t0
                    latencies.append(dt)
                    waited += dt
                    touched += int(x.reshape(-1)[0])
                    got += len(x)
                    if step_s:
                        simulate_step(step_s, step_model)
                wall = time.perf_counter() - started
                cpu_used = tree_cpu_s(server.pid) - cpu_before if cpu else 0.0
        finally:
            server.stop()
            peak = pss.stop()
    ms = np.array(latencies) * 1000
    out: dict[str, Any] = {"images_per_s": got / wall, "next_p50_ms": float(np.percentile(ms, 50)),
                           "next_p99_ms": float(np.percentile(ms, 99)), "stall_pct": 100 * waited / wall,
                           "time_to_first_batch_s": ttfb, "peak_pss_mb": peak, "step_ms": step_s * 1000}
    if cpu:
        out["loader_cpu_ms_per_image"] = cpu_used / got * 1000
    if step_s:
        # What the paced run really consumed, against the capacity it was paced at: above the
        # fraction when the step overshoots less than the loader slowed down meanwhile.
        out.update(step_model=step_model, wall_s=wall, load=got / wall / capacity if capacity else None,
                   next_mean_ms=float(ms.mean()), wait_over_1ms_share=float(ms[ms > 1].sum() / max(ms.sum(), 1e-9)))
    return out


def _service(bench: Bench) -> dict[str, Any]:
    return measure_service(bench)


#: name -> measurement; the order of the report's table.
SYSTEMS: dict[str, Callable[[Bench], dict[str, Any] | None]] = {
    "percore": measure_percore,
    "service": _service,
    "classic": measure_classic,
    "torch": measure_torch,
    "torchvision": measure_torchvision,
}
#: The systems a plain ``loader-server bench`` runs.
DEFAULT_SYSTEMS = ("percore", "service", "classic", "torch")
