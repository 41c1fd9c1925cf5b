"""The ``train`` probe: does the GPU wait? A real training step on a CUDA device, fed three ways.

For each model of ``--train-models`` (torchvision ResNets, bf16 autocast, channels-last, SGD):

* **model only**: the same step on one batch that stays on the GPU: what the GPU can do when
  data costs nothing (the ceiling);
* **service**: batches from ``loader-server serve`` (the run's workers, shared memory), copied
  to the GPU by `loader_client.torch.LoaderDataset` by DMA from the shared-memory arena
  registered with CUDA (HWC uint8 viewed as NCHW is already channels-last: no copy on the CPU);
* **service, copied into pinned memory**: the same, with ``register_arenas=False`` (one copy on
  the trainer's thread into pinned memory, then the DMA);
* **torch**: torch DataLoader with the same decode function, the same worker count,
  ``pin_memory=True``;
* **service, cached**: the service with ``--cache memory``, timed after one epoch filled it.

Reported per feed: images/s trained, the share of the ceiling (1.00 = the GPU never waits), and
the data stall (time the training loop waited in ``next()`` over wall time). The CPU thread is
never synchronised inside the loop (as in a real trainer): a loader that keeps up shows its
wait as time inside CUDA calls, not in ``next()``. Skipped without CUDA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .context import Bench
from .systems import CLIENT_TIMEOUT_S, served, torch_loader

__all__ = ["train_probe", "train_tables"]

Results = dict[str, Any]

#: Training steps before any timing: cuDNN picks its algorithms, the pipelines fill.
_WARMUP_STEPS = 15
#: Steps timed for the model-only ceiling.
_CEILING_STEPS = 60


def _say(line: str) -> None:
    print(line, flush=True)


def _model(torch: Any, name: str, classes: int) -> Any:
    """A torchvision model by name, or ``tiny`` (two convolutions: checks the probe itself on a CPU)."""
    if name == "tiny":
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(8, classes))
    import torchvision

    return getattr(torchvision.models, name)(num_classes=classes)


def _sync(torch: Any, device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fn(torch: Any, model: Any, device: Any) -> Callable[[Any, Any], Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: Any, y: Any) -> Any:  # x: uint8 NCHW (channels-last strides) on the device
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x.float().div_(255)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _timed(torch: Any, device: Any, batches: Iterator[tuple[Any, Any]], step: Callable[[Any, Any], Any], n: int,
           batch_size: int) -> Results:
    """Train on `batches` (warm-up first), then time `n` images: images/s and the time spent in next()."""
    for _ in range(_WARMUP_STEPS):
        x, y = next(batches)
        step(x, y)
    _sync(torch, device)
    waited, got = 0.0, 0
    started = time.perf_counter()
    while got < n:
        t0 = time.perf_counter()
        x, y = next(batches)
        waited += time.perf_counter() - t0
        step(x, y)
        got += batch_size
    _sync(torch, device)
    wall = time.perf_counter() - started
    return {"images_per_s": got / wall, "stall_pct": 100 * waited / wall, "wall_s": wall}


def _service_batches(endpoint: str, device: Any, register: bool) -> tuple[Any, Iterator[tuple[Any, Any]]]:
    from loader_client.torch import LoaderDataset

    dataset = LoaderDataset(endpoint, timeout_s=CLIENT_TIMEOUT_S, device=device, register_arenas=register)

    def batches() -> Iterator[tuple[Any, Any]]:
        while True:
            for x, y in dataset:
                yield x.permute(0, 3, 1, 2), y  # HWC as NCHW: channels-last strides, no copy

    return dataset, batches()


def _torch_batches(b: Bench, device: Any) -> tuple[Any, Iterator[tuple[Any, Any]]]:
    paths = [b.index.path(i) for i in range(len(b.index))]
    loader = torch_loader(b, paths, b.index.labels, shuffle=True, pin_memory=device.type == "cuda", prefetch_factor=4)

    def batches() -> Iterator[tuple[Any, Any]]:
        while True:
            for x, y in loader:
                yield (x.to(device, non_blocking=True).permute(0, 3, 1, 2), y.to(device, non_blocking=True))

    return loader, batches()


def train_probe(b: Bench) -> Results:
    try:
        import torch
    except ImportError:
        _say("train: skipped (needs torch)")
        return {}
    device = torch.device(b.train_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        _say("train: skipped (no CUDA device; --train-device cpu trains on the CPU)")
        return {}
    torch.backends.cudnn.benchmark = True
    classes = int(np.max(b.index.labels)) + 1 if len(b.index.labels) else 1000
    n = max(b.n, 4 * b.batch_size)
    w, h = b.size
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "the CPU"
    out: Results = {"device": where, "torch": torch.__version__, "models": {}}
    for name in b.train_models:
        model = _model(torch, name, classes).to(device, memory_format=torch.channels_last)
        step = _step_fn(torch, model, device)
        r: Results = {}
        x = torch.randint(0, 256, (b.batch_size, h, w, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
        y = torch.randint(0, classes, (b.batch_size,), device=device)

        def fixed(x: Any = x, y: Any = y) -> Iterator[tuple[Any, Any]]:
            while True:
                yield x, y

        r["model_only"] = _timed(torch, device, fixed(), step, _CEILING_STEPS * b.batch_size, b.batch_size)
        ceiling = r["model_only"]["images_per_s"]
        _say(f"train {name}: model only (batch already on the device) {ceiling:.0f} images/s")
        feeds: list[tuple[str, list[str] | None, int, bool]] = [
            ("service", [*b.serve_extra], 0, True), ("service_pinned_copy", [*b.serve_extra], 0, False),
            ("torch", None, 0, False), ("service_cached", [*b.serve_extra, "--cache", "memory"], len(b.index), True)]
        for feed, extra, fill, register in feeds:
            if extra is None:
                holder, batches = _torch_batches(b, device)
                try:
                    res = _timed(torch, device, batches, step, n, b.batch_size)
                finally:
                    del batches, holder
            else:
                with served(b, b.data, extra, ready=True) as server:
                    dataset, batches = _service_batches(server.endpoint, device, register)
                    try:
                        for _ in range(-(-fill // b.batch_size)):  # one epoch fills the cache
                            next(batches)
                        res = _timed(torch, device, batches, step, n, b.batch_size)
                    finally:
                        dataset.close()
            res["of_ceiling"] = res["images_per_s"] / ceiling
            r[feed] = res
            _say(f"train {name}: {feed} {res['images_per_s']:.0f} images/s = {res['of_ceiling']:.2f} of the ceiling, "
                 f"data stall {res['stall_pct']:.2f}%")
        out["models"][name] = r
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"train": out}


def train_tables(results: Results) -> list[str]:
    if "train" not in results or not results["train"].get("models"):
        return []
    t = results["train"]
    lines = ["", f"Training on {t['device']} (torch {t['torch']}, bf16 autocast, channels-last, SGD):", "",
             "| model | model only (batch already on the device) | service | service, copied into pinned memory "
             "| torch DataLoader | service, --cache memory |",
             "|---|---|---|---|---|---|"]
    for name, r in t["models"].items():
        cells = [f"{r['model_only']['images_per_s']:.0f} images/s"]
        for feed in ("service", "service_pinned_copy", "torch", "service_cached"):
            f = r[feed]
            cells.append(f"{f['images_per_s']:.0f} ({f['of_ceiling']:.2f}; stall {f['stall_pct']:.1f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Each feed: images/s trained (share of the model-only ceiling; data stall = time in next() over "
              "wall time)."]
    return lines
