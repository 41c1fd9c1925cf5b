"""A minimal trainer stand-in: consume epochs from a loader server and report throughput.

    LOADER_ENDPOINT=tcp://127.0.0.1:5555 python examples/consume.py --epochs 2
"""

from __future__ import annotations

import argparse
import os
import time

from loader_client import LoaderClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=os.environ.get("LOADER_ENDPOINT", "tcp://127.0.0.1:5555"))
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", "2")))
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    with LoaderClient(args.endpoint, timeout_s=args.timeout_s) as client:
        print(f"connected to {args.endpoint}: {client.num_samples} samples, "
              f"{client.steps_per_epoch} steps of {client.batch_size}", flush=True)
        for epoch in range(args.epochs):
            started, images = time.perf_counter(), 0
            for x, _ in client.epoch():
                images += len(x)
            elapsed = time.perf_counter() - started
            print(f"epoch {epoch}: {images} images, {images / elapsed:.0f} images/s, "
                  f"waited {client.wait_s:.2f} s in total", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
