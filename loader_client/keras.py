"""Keras 3 helpers: exact per-epoch validation from a loader server.

Import this module only where keras is installed (``import loader_client.keras``).

Training needs no helper: ``model.fit(iter(client), steps_per_epoch=client.steps_per_epoch,
epochs=E, shuffle=False)`` consumes exactly the server's epoch k in Keras epoch k, because
Keras keeps one iterator across epochs when `steps_per_epoch` is given (it peeks 2 batches
when `fit` starts and puts them back in front).

Validation is different: a generator passed as ``validation_data`` is re-wrapped every epoch
and Keras replays the 2 batches it peeked first, so epochs after the first would validate on
a mix of batches. `EvaluateEachEpoch` avoids that: at the end of every epoch it opens a
fresh client at the start of the validation stream and runs ``model.evaluate`` on exactly
one epoch of it, so every epoch sees the same validation batches.
"""

from __future__ import annotations

from typing import Any

import keras

from .client import LoaderClient

__all__ = ["EvaluateEachEpoch"]


class EvaluateEachEpoch(keras.callbacks.Callback):  # type: ignore[misc]
    """Evaluate on one whole epoch of a validation server after every training epoch.

    Run the validation server with ``--no-shuffle --keep-last`` so that every validation
    sample counts once, in file order. Results are added to the epoch logs as ``val_<metric>``
    (so ``EarlyStopping(monitor="val_loss")`` and ``History`` see them).

    Example::

        model.fit(iter(train), steps_per_epoch=train.steps_per_epoch, epochs=10, shuffle=False,
                  callbacks=[EvaluateEachEpoch("tcp://127.0.0.1:5556")])
    """

    def __init__(self, endpoint: str, *, prefix: str = "val_", **client_kwargs: Any) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.prefix = prefix
        self.client_kwargs = {"augment": False, **client_kwargs}  # validation: no augmentation by default
        self.batches_seen: list[list[int]] = []  # sample indices evaluated, per epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        with LoaderClient(self.endpoint, **self.client_kwargs) as client:
            seen: list[int] = []

            def one_epoch() -> Any:
                for x, y in client.epoch():
                    assert client.last is not None
                    seen.extend(client.last.indices.tolist())
                    yield x, y

            results = self.model.evaluate(one_epoch(), steps=client.steps_per_epoch, verbose=0, return_dict=True)
        self.batches_seen.append(seen)
        if logs is not None:
            logs.update({f"{self.prefix}{name}": value for name, value in results.items()})
