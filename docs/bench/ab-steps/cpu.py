"""CPU ms per image of a worker's whole batch (BatchBuilder.build) in one process, on ../shared/corpus."""
import time

import cv2
import numpy as np

from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.pipeline.batch import BatchBuilder

cv2.setNumThreads(1)
out = []
for spec in (None, "rrc,flip"):
    cfg = ServerConfig(data="/work/shared/corpus/train.txt", batch_size=64, augment=spec)
    ds = load_dataset(cfg)
    b = BatchBuilder(cfg, ds)
    x = b.allocate()
    order = np.random.default_rng(0).permutation(len(ds))
    batches = [order[k:k + 64] for k in range(0, len(ds) - 63, 64)]
    for idx in batches[:2]:
        b.build(idx, x, key=(0, 0), augment=spec is not None)
    t = time.process_time()
    for idx in batches:
        b.build(idx, x, key=(0, 1), augment=spec is not None)
    out.append((time.process_time() - t) * 1000 / (len(batches) * 64))
print(" ".join(f"{v:.4f}" for v in out))
