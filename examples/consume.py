"""A minimal trainer stand-in: consume epochs from a loader server and report throughput.

    LOADER_ENDPOINT=tcp://127.0.0.1:5555 python examples/consume.py --epochs 2

`--check` also checks that every epoch holds each sample of the stream exactly once (exit 1
if not), a smoke test of a deployment: `docker compose ... run --rm trainer python
/app/examples/consume.py --check`.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from loader_client import LoaderClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=os.environ.get("LOADER_ENDPOINT", "tcp://127.0.0.1:5555"))
    parser.add_argument("--epochs", type=int, default=int(os.environ.get("EPOCHS", "2")))
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--check", action="store_true", help="check each epoch holds every sample exactly once")
    args = parser.parse_args()
    with LoaderClient(args.endpoint, timeout_s=args.timeout_s) as client:
        print(f"connected to {args.endpoint}: {client.num_samples} samples, "
              f"{client.steps_per_epoch} steps of {client.batch_size}, "
              f"shared memory {client.shared_memory}", flush=True)
        for epoch in range(args.epochs):
            started, images, seen = time.perf_counter(), 0, []
            for x, _ in client.epoch():
                images += len(x)
                if args.check and client.last is not None:
                    seen.append(client.last.indices)
            elapsed = time.perf_counter() - started
            print(f"epoch {epoch}: {images} images, {images / elapsed:.0f} images/s, "
                  f"waited {client.wait_s:.2f} s in total", flush=True)
            if args.check:
                indices = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
                expected = client.steps_per_epoch * client.batch_size  # the short last batch may be dropped
                unique = np.unique(indices)
                if len(indices) != expected or len(unique) != len(indices) or not (
                        len(unique) == 0 or (unique[0] >= 0 and unique[-1] < client.num_samples)):
                    print(f"epoch {epoch}: FAILED: {len(indices)} samples, {len(unique)} distinct, "
                          f"expected {expected} distinct of 0..{client.num_samples - 1}", flush=True)
                    return 1
                print(f"epoch {epoch}: each of {expected} samples exactly once", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
