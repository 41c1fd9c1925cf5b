"""Train a small Keras 3 CNN from a loader server, with optional validation and resume.

    loader-server demo --out demo-images                 # keeps the generated images
    loader-server serve --data demo-images --size 64x64 &
    python examples/keras_fit.py --epochs 2             # KERAS_BACKEND defaults to torch here

`--val-endpoint` (a second server, started with --no-shuffle --keep-last) scores every
validation sample after every epoch. `--state-file` saves the model and the stream position
after every epoch and resumes from them when the files exist.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras

from loader_client import LoaderClient
from loader_client.keras import KerasStream, fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default=os.environ.get("LOADER_ENDPOINT", "tcp://127.0.0.1:5555"))
    parser.add_argument("--val-endpoint", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--state-file", type=Path, default=None,
                        help="JSON file of the stream position; the model goes beside it as .keras")
    args = parser.parse_args()
    state_file: Path | None = args.state_file
    model_file = state_file.with_suffix(".keras") if state_file else None
    state = json.loads(state_file.read_text()) if state_file and state_file.exists() else None
    client = LoaderClient(args.endpoint, timeout_s=60, state=state)
    train = KerasStream(client)  # fit knows the epoch's length: no steps_per_epoch, no peeked batch lost
    if state is not None and model_file is not None and model_file.exists():
        model = keras.models.load_model(model_file)
        print(f"resuming at epoch {state['epoch']} batch {state['batch']}", flush=True)
    else:
        model = keras.Sequential([
            keras.Input(client.x_shape),
            keras.layers.Rescaling(1 / 255),  # uint8 on the wire, scaled on the trainer
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(client.num_classes, activation="softmax"),  # from the server's handshake
        ])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    class SaveState(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if state_file is not None and model_file is not None:
                self.model.save(model_file)
                state_file.write_text(json.dumps(train.state_dict()))

    val = KerasStream(args.val_endpoint, validation=True, timeout_s=60) if args.val_endpoint else None
    try:
        fit(model, train, epochs=args.epochs, validation_data=val, callbacks=[SaveState()], verbose=2)
    finally:
        train.close()
        if val is not None:
            val.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
