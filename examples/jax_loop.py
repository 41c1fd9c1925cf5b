"""Feed JAX from a loader server with a two-batch device prefetch.

    pip install jax
    loader-server serve --data /tmp/demo-images --size 64x64 &
    python examples/jax_loop.py
"""

from __future__ import annotations

import collections
import itertools
import os

import jax
import jax.numpy as jnp

from loader_client import LoaderClient


def device_prefetch(batches, size: int = 2):
    """Keep `size` batches already transferred to the device while the step runs."""
    queue: collections.deque = collections.deque()
    for x, y in batches:
        queue.append((jax.device_put(x), jax.device_put(y)))
        if len(queue) == size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


endpoint = os.environ.get("LOADER_ENDPOINT", "tcp://127.0.0.1:5555")
with LoaderClient(endpoint, timeout_s=60) as client:
    for step, (x, _y) in enumerate(device_prefetch(itertools.islice(iter(client), client.steps_per_epoch))):
        mean = jnp.mean(x.astype(jnp.float32) / 255)
        print(step, x.shape, float(mean))
