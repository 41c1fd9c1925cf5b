"""``loader-server demo``: the main job on built-in sample data, end to end, with checks.

It writes a labelled image set, starts ``loader-server serve`` on it as a real subprocess
(over a private ipc socket), consumes epochs with the client, checks that every sample
arrives exactly once per epoch with its label, prints images per second, and stops the
server with SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loader_client import LoaderClient
from loader_client.contract.errors import LoaderError

from .data.index import load_index
from .launch import ServerProcess, ServerProcessError
from .sample_data import write_sample_images

__all__ = ["run_demo"]


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns 0 when every check passed."""
    scratch = tempfile.mkdtemp(prefix="loader-demo-")
    data = Path(args.out) if args.out else Path(scratch) / "images"
    try:
        t0 = time.perf_counter()
        if not (data.is_dir() and any(data.iterdir())):
            write_sample_images(data, args.images)
        index = load_index(data)
        print(f"demo: {len(index)} sample images in {data} ({time.perf_counter() - t0:.1f} s to prepare)")
        server = ServerProcess(data, "--batch-size", str(args.batch_size), "--size", args.size, "--workers",
                               str(args.workers), "--seed", "0", "--log-level", "WARNING",
                               endpoint=f"ipc://{scratch}/demo.sock", log=Path(scratch) / "server.log")
        print(f"demo: starting {server.command()}")
        ok = False
        try:
            server.wait_ready(args.timeout_s)
            ok = _consume(server.endpoint, index.labels, args)
        except LoaderError as exc:  # the server did not start, or failed while serving
            why = exc if isinstance(exc, ServerProcessError) or server.running() else server.failure(f"died ({exc})")
            print(f"demo: FAIL {why}")
        finally:
            ok = _stop(server) and ok
        print("demo: OK" if ok else "demo: FAILED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _stop(server: ServerProcess) -> bool:
    """SIGTERM; True if the server drained and exited 0 in time."""
    try:
        code = server.stop()
    except ServerProcessError as exc:
        print(f"demo: FAIL {exc}")
        return False
    if code != 0:
        print(f"demo: FAIL {server.failure(f'exited with code {code}')}")
    return code == 0


def _consume(endpoint: str, labels: np.ndarray, args: argparse.Namespace) -> bool:
    ok = True
    with LoaderClient(endpoint, timeout_s=args.timeout_s, name=f"demo-{os.getpid()}") as client:
        print(f"demo: connected: {client.num_samples} samples, {client.steps_per_epoch} batches of "
              f"{client.batch_size} per epoch, x {client.x_shape} {client.x_dtype}, classes {client.class_names}")
        for epoch in range(args.epochs):
            seen = np.zeros(client.num_samples, dtype=np.int64)
            started = time.perf_counter()
            images = 0
            progress = tqdm(total=client.steps_per_epoch * client.batch_size, desc=f"epoch {epoch}", unit="images")
            for x, y in client.epoch():
                info = client.last
                assert info is not None
                seen[info.indices] += 1
                if not np.array_equal(y, labels[info.indices]):
                    print(f"demo: FAIL epoch {epoch} batch {info.batch}: labels do not match the index")
                    ok = False
                images += len(x)
                progress.update(len(x))
            progress.close()
            elapsed = time.perf_counter() - started
            expected = client.steps_per_epoch * client.batch_size
            once = int((seen == 1).sum())
            repeated = int((seen > 1).sum())
            status = "ok" if once == expected and repeated == 0 else "FAIL"
            if status == "FAIL":
                ok = False
            print(f"demo: epoch {epoch}: {images} images in {elapsed:.2f} s = {images / elapsed:.0f} images/s; "
                  f"{once} samples exactly once, {repeated} repeated, "
                  f"{client.num_samples - once - repeated} left out by drop-last [{status}]")
        print(f"demo: the trainer waited {client.wait_s:.2f} s in next() in total (this one does no work between "
              "batches, so it waits for nearly every one: the images/s above are the loader's; a trainer that "
              "computes waits only when the loader falls behind)")
    return ok
