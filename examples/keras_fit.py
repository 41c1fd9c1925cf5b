"""Train a small Keras 3 CNN from a loader server.

    loader-server demo --out /tmp/demo-images            # keeps the generated images
    loader-server serve --data /tmp/demo-images --size 64x64 &
    KERAS_BACKEND=torch python examples/keras_fit.py --epochs 2

Add `--val-endpoint` (a second server, started with --no-shuffle --keep-last) to validate on
exactly the same batches after every epoch.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

from loader_client import LoaderClient  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=os.environ.get("LOADER_ENDPOINT", "tcp://127.0.0.1:5555"))
    parser.add_argument("--val-endpoint", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with LoaderClient(args.endpoint, timeout_s=60) as client:
        classes = len(client.class_names or []) or 1 + int(max(y.max() for _, y in [client.next()]))
        model = keras.Sequential([
            keras.Input(client.x_shape),
            keras.layers.Rescaling(1 / 255),  # uint8 on the wire, scaled on the trainer
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(classes, activation="softmax"),
        ])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        callbacks = []
        if args.val_endpoint:
            from loader_client.keras import EvaluateEachEpoch

            callbacks.append(EvaluateEachEpoch(args.val_endpoint, timeout_s=60))
        model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=args.epochs, shuffle=False,
                  callbacks=callbacks, verbose=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
