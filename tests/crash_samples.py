"""A user transform that kills its worker a set number of times, loaded into real workers.

`crash_on_marked` exits the worker process (as a segfaulting decoder would) when it sees the
marked sample, until it has done so ``$CRASH_SAMPLES_TIMES`` times; the count lives in the file
``$CRASH_SAMPLES_COUNTER``, shared by every worker, so a retried batch succeeds once the
count is reached. The marked sample is the PNG whose top-left 4x4 corner is all MARK (see
`tests.conftest.unique_label_list`: sample i has corner value i % 256, lossless for i % 5 == 0).
"""

from __future__ import annotations

import os

import numpy as np

MARK = 5


def crash_on_marked(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if image.shape[0] >= 4 and image.shape[1] >= 4 and bool((image[:4, :4] == MARK).all()):
        counter = os.environ["CRASH_SAMPLES_COUNTER"]
        with open(counter, "a+") as f:
            f.seek(0)
            crashes = len(f.read())
            if crashes < int(os.environ["CRASH_SAMPLES_TIMES"]):
                f.write("x")
                f.flush()
                os._exit(1)
    return image
