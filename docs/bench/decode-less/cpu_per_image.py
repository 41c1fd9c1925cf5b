"""CPU ms per image of a worker's batches in this process, and wall images/s with the load average.

    PYTHONPATH=TREE python cpu_per_image.py DATA AUGMENT N

Builds batches of 64 at 224x224 uint8 with `BatchBuilder` (read, decode, crop and resize into the
batch, augment: exactly a worker's work per batch, without the sockets) over a random order of
the data set, N images in all, with `--augment AUGMENT` ("" for none). CPU time is what the code
spends: far less sensitive than wall time to a machine that other jobs keep busy. Run with the
tree under test first on PYTHONPATH (ab.sh does). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import cv2
import numpy as np

from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.pipeline.batch import BatchBuilder


def main(data: str, augment: str | None, n: int) -> None:
    cv2.setNumThreads(1)
    config = ServerConfig(data=data, batch_size=64, size=(224, 224), augment=augment)
    dataset = load_dataset(config)
    builder = BatchBuilder(config, dataset)
    x = builder.allocate()
    order = np.random.default_rng(0).permutation(len(dataset))
    batches = [order[k : k + 64] for k in range(0, len(dataset) - 63, 64)]
    for idx in batches:  # warm-up: every file read once (page cache), the decoder's buffers grown
        builder.build(idx, x, key=(0, 0), augment=augment is not None)
    done, epoch = 0, 1
    load0 = os.getloadavg()[0]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    while done < n:
        for idx in batches:
            builder.build(idx, x, key=(0, epoch), augment=augment is not None)
            done += len(idx)
            if done >= n:
                break
        epoch += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    print(json.dumps({"cpu_ms": round(cpu * 1000 / done, 4), "images_per_s": round(done / wall, 1),
                      "load": round((load0 + os.getloadavg()[0]) / 2, 2)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] or None, int(sys.argv[3]))
