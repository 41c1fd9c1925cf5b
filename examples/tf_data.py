"""Feed tf.data (and so TensorFlow Keras) from a loader server.

    pip install tensorflow
    loader-server serve --data /tmp/demo-images --size 64x64 &
    python examples/tf_data.py

The output_signature leaves the batch dimension as None, so a short last batch
(--keep-last) fits too. Prefetch one or two batches on the TensorFlow side as well.
"""

from __future__ import annotations

import os

import tensorflow as tf

from loader_client import LoaderClient

endpoint = os.environ.get("LOADER_ENDPOINT", "tcp://127.0.0.1:5555")
client = LoaderClient(endpoint, timeout_s=60)
dataset = tf.data.Dataset.from_generator(
    lambda: iter(client),
    output_signature=(
        tf.TensorSpec(shape=(None, *client.x_shape), dtype=client.x_dtype.name),
        tf.TensorSpec(shape=(None,), dtype=tf.int64),
    ),
).prefetch(2)

for step, (x, y) in enumerate(dataset.take(client.steps_per_epoch)):
    print(step, x.shape, y.shape)
client.close()
