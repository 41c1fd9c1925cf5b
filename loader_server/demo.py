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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loader_client import LoaderClient

from .index import load_index
from .progress import Progress
from .sample_data import write_sample_images

__all__ = ["run_demo"]

_SERVER_STOP_TIMEOUT_S = 15.0


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
        endpoint = f"ipc://{scratch}/demo.sock"
        cmd = [sys.executable, "-m", "loader_server", "serve", "--data", str(data), "--bind", endpoint,
               "--batch-size", str(args.batch_size), "--size", args.size, "--workers", str(args.workers),
               "--seed", "0", "--log-level", "WARNING"]
        print("demo: starting", " ".join(cmd[2:]))
        server = subprocess.Popen(cmd)
        try:
            ok = _consume(endpoint, index.labels, args)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(_SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
                print(f"demo: FAIL server did not stop within {_SERVER_STOP_TIMEOUT_S:g} s of SIGTERM")
                ok = False
        if code != 0:
            print(f"demo: FAIL server exited with code {code}")
            ok = False
        print("demo: OK" if ok else "demo: FAILED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _consume(endpoint: str, labels: np.ndarray, args: argparse.Namespace) -> bool:
    ok = True
    with LoaderClient(endpoint, timeout_s=args.timeout_s, name=f"demo-{os.getpid()}") as client:
        print(f"demo: connected: {client.num_samples} samples, {client.steps_per_epoch} batches of "
              f"{client.batch_size} per epoch, x {client.x_shape} {client.x_dtype}, classes {client.class_names}")
        for epoch in range(args.epochs):
            seen = np.zeros(client.num_samples, dtype=np.int64)
            started = time.perf_counter()
            images = 0
            progress = Progress(f"epoch {epoch}", client.steps_per_epoch * client.batch_size, " images")
            for x, y in client.epoch():
                info = client.last
                assert info is not None
                seen[info.indices] += 1
                if not np.array_equal(y, labels[info.indices]):
                    print(f"demo: FAIL epoch {epoch} batch {info.batch}: labels do not match the index")
                    ok = False
                images += len(x)
                progress.update(images)
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
        print(f"demo: the trainer waited {client.wait_s:.2f} s in next() in total")
    return ok
