"""Keras 3: a loader stream that ``model.fit`` takes directly, with exact epochs, validation and resume.

Import this module only where keras is installed (``import loader_client.keras``).

`KerasStream` is a ``keras.utils.PyDataset`` around a `LoaderClient`: Keras knows its length,
so no ``steps_per_epoch`` is needed and none can be forgotten, and Keras epoch k trains on
exactly the server's epoch k::

    client = LoaderClient("tcp://127.0.0.1:5555")
    val = KerasStream("tcp://127.0.0.1:5556", validation=True)   # every sample, every epoch
    model.fit(KerasStream(client), validation_data=val, epochs=10)

How the epochs stay exact:

* Keras reads one batch to build the model when ``fit`` starts (a "peek"), outside the
  training loop. A call session (``on_epoch_begin`` .. ``on_epoch_end``) that takes at most
  `_PEEK_LIMIT` batches and ends before the epoch is complete is such a peek: its batches
  are handed out again, first, in the next session, so they are trained exactly once.
* The order in which Keras asks for indices is ignored (``fit``'s default ``shuffle=True``
  shuffles them): batches are handed out in stream order, which the server already shuffled.
* `state_dict()` and `position` count only the batches handed to the training loop, not the
  ones peeked at and held back, so a checkpoint taken in any callback resumes at the next
  batch to be trained (exact for the torch backend, which reads no batch ahead; the
  tensorflow and jax backends prefetch and are not covered).
* Keras fixes an epoch's length when ``fit`` starts. A stream resumed mid-epoch
  (``LoaderClient(endpoint, state=state)``) has a short first epoch (the rest of that server
  epoch) and whole epochs after it, which one ``model.fit`` cannot express: use
  `fit(model, stream, epochs=...)` from this module, which runs the rest of the epoch and then
  whole epochs with the right ``initial_epoch``. A plain ``model.fit`` of a resumed stream over
  several epochs raises `LoaderError` at its second epoch instead of training misaligned.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from typing import Any

import keras

from .client import LoaderClient
from .contract.errors import LoaderError

__all__ = ["EvaluateEachEpoch", "KerasStream", "fit", "validation_problem"]

_log = logging.getLogger("loader_client")
_PEEK_LIMIT = 2  # Keras reads 1 batch to build the model (2 for a tf.data signature)


def validation_problem(client: LoaderClient) -> str | None:
    """Why one epoch of `client`'s stream does not score every sample once, or None if it does."""
    info = client.info
    if info.get("mode") == "random":
        return (f"the validation server at {client.endpoint} runs --mode random (draws with replacement): "
                "some samples are scored twice and others never; serve validation with --mode epoch "
                "--no-shuffle --keep-last")
    per_epoch = client.batch_size * client.world_size
    dropped = client.num_samples % per_epoch if info.get("drop_last", True) else 0
    if dropped:
        return (f"the validation server at {client.endpoint} drops {dropped} of its {client.num_samples} "
                f"samples every epoch (a different {dropped} each epoch when it shuffles) because it runs "
                "with --drop-last (the default) and "
                f"{client.num_samples} is not a multiple of batch size {client.batch_size}"
                f"{f' x world size {client.world_size}' if client.world_size > 1 else ''}: "
                "start the validation server with --keep-last (and --no-shuffle for the same order every epoch)")
    return None


def _warn_validation(client: LoaderClient) -> None:
    problem = validation_problem(client)
    if problem:
        _log.warning("validation does not score every sample: %s", problem)
        warnings.warn(f"validation does not score every sample: {problem}", UserWarning, stacklevel=3)


class KerasStream(keras.utils.PyDataset):  # type: ignore[misc]
    """A loader stream as a ``keras.utils.PyDataset``: ``model.fit(stream, epochs=E)``.

    `source` is a `LoaderClient` or an endpoint (then `client_kwargs` go to `LoaderClient`;
    ``state=...`` resumes). The stream's length is the number of batches left in the current
    server epoch: `steps_per_epoch` at an epoch start.

    ``validation=True`` makes a validation stream for ``validation_data=``: augmentation off
    (unless ``augment=True`` is passed) and a loud
    warning, naming the server setting, when one epoch cannot score every sample
    (``--drop-last`` with a remainder, or ``--mode random``). One client serves every
    evaluation: nothing is built that is not evaluated, except at most `prefetch` batches
    after the last one.
    """

    def __init__(self, source: LoaderClient | str | list[str], *, validation: bool = False,
                 **client_kwargs: Any) -> None:
        super().__init__(workers=1, use_multiprocessing=False)  # one caller, batches in stream order
        if isinstance(source, LoaderClient):
            if client_kwargs:
                raise TypeError(f"client options {sorted(client_kwargs)} need an endpoint, not a LoaderClient")
            self.client = source
        else:
            if validation:
                client_kwargs.setdefault("augment", False)
            self.client = LoaderClient(source, **client_kwargs)
        self.validation = validation
        spe = self.client.steps_per_epoch
        self._pushback: deque[tuple[Any, ...]] = deque()  # handed out, not trained: hand out again first
        self._in_session = False
        self._session: list[tuple[Any, ...]] = []  # the first _PEEK_LIMIT batches of this session
        self._session_count = 0
        self._session_len = spe
        self._started_mid_epoch = False  # the last full session began inside a server epoch
        self._len_read_between = True  # a new fit reads the length before its first session
        if validation:
            _warn_validation(self.client)

    # ------------------------------------------------------------------ what Keras calls
    def __len__(self) -> int:
        if self._in_session:  # fixed while Keras iterates (it reads the length again mid-way)
            return self._session_len
        self._len_read_between = True
        return self.client.steps_per_epoch - self.position[1]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        """The next batch of the stream (the index is ignored: the server's order is the order)."""
        batch = self._pushback.popleft() if self._pushback else self.client.next()
        if self._in_session and len(self._session) < _PEEK_LIMIT:
            self._session.append(batch)
        self._session_count += 1
        return batch

    def on_epoch_begin(self) -> None:
        length = self.client.steps_per_epoch - self.position[1]
        if self._started_mid_epoch and self.position[1] == 0 and not self._len_read_between:
            self._started_mid_epoch = False
            raise LoaderError(
                "this stream was resumed in the middle of a server epoch, so its first Keras epoch was "
                "shorter, and Keras keeps that length for every epoch of one fit: the epochs would no longer "
                "match the server's. Use loader_client.keras.fit(model, stream, epochs=...), which trains "
                "the rest of the epoch and then whole epochs"
            )
        self._in_session, self._session, self._session_count = True, [], 0
        self._session_len = length
        self._len_read_between = False

    def on_epoch_end(self) -> None:
        if not self._in_session:  # Keras resets its iterator once before training: nothing to do
            return
        self._in_session = False
        if self._session_count < self._session_len and self._session_count <= _PEEK_LIMIT:
            # A peek (Keras building the model): nothing was trained, hand these out again.
            # A longer short session was a fit stopped early (stop_training): those were trained.
            self._pushback.extendleft(reversed(self._session))
        elif self._session_count >= self._session_len:
            self._started_mid_epoch = self._session_len < self.client.steps_per_epoch
        self._session = []

    # ------------------------------------------------------------------ position and resume
    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch)`` of the next batch the training loop gets (peeked batches not counted)."""
        epoch, batch = self.client.position
        spe = self.client.steps_per_epoch
        absolute = epoch * spe + batch - len(self._pushback)
        return divmod(absolute, spe) if absolute >= 0 else (0, 0)

    def state_dict(self) -> dict[str, Any]:
        """`LoaderClient.state_dict()` at `position`: ``LoaderClient(endpoint, state=...)`` resumes there."""
        epoch, batch = self.position
        return {**self.client.state_dict(), "epoch": epoch, "batch": batch}

    @property
    def steps_per_epoch(self) -> int:
        return self.client.steps_per_epoch

    @property
    def num_classes(self) -> int | None:
        return self.client.num_classes

    @property
    def x_shape(self) -> tuple[int, ...]:
        return self.client.x_shape

    def close(self) -> None:
        self._pushback.clear()
        self._session = []
        self.client.close()


def fit(model: Any, stream: KerasStream, *, epochs: int, initial_epoch: int | None = None,
        **fit_kwargs: Any) -> Any:
    """``model.fit(stream, epochs=epochs, ...)`` whose Keras epoch k is the server's epoch k, resumed or not.

    `initial_epoch` defaults to the stream's server epoch (``state["epoch"]`` after a resume).
    A stream resumed in the middle of an epoch first trains the rest of that epoch as one Keras
    epoch, then whole epochs, in two ``model.fit`` calls whose histories are merged into the
    returned ``History`` (callbacks see ``on_train_begin``/``on_train_end`` twice).
    """
    if not isinstance(stream, KerasStream):
        raise TypeError(f"fit() takes a KerasStream, got {type(stream).__name__}: wrap the client, "
                        "KerasStream(client)")
    start = stream.position[0] if initial_epoch is None else initial_epoch
    if stream.position[1] == 0 or start >= epochs:
        return model.fit(stream, epochs=epochs, initial_epoch=start, **fit_kwargs)
    first = model.fit(stream, epochs=start + 1, initial_epoch=start, **fit_kwargs)
    if getattr(model, "stop_training", False) or start + 1 >= epochs:
        return first
    stream._len_read_between = True  # a new fit: Keras reads the whole-epoch length again
    rest = model.fit(stream, epochs=epochs, initial_epoch=start + 1, **fit_kwargs)
    rest.epoch = list(first.epoch) + list(rest.epoch)
    rest.history = {k: list(first.history.get(k, [])) + list(v) for k, v in rest.history.items()}
    return rest


class EvaluateEachEpoch(keras.callbacks.Callback):  # type: ignore[misc]
    """Evaluate on one whole epoch of a validation server after every training epoch.

    Prefer ``validation_data=KerasStream(endpoint, validation=True)``, which does the same
    inside Keras. Results are added to the epoch logs as ``val_<metric>``. One client (opened
    at the first evaluation, closed when training ends) serves every evaluation, and the same
    warning as `KerasStream` names the server setting when an epoch cannot score every sample.
    Run the validation server with ``--no-shuffle --keep-last``.
    """

    def __init__(self, endpoint: str, *, prefix: str = "val_", **client_kwargs: Any) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.prefix = prefix
        self.client_kwargs = {"augment": False, **client_kwargs}  # validation: no augmentation by default
        self.batches_seen: list[list[int]] = []  # sample indices evaluated, per epoch
        self._client: LoaderClient | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._client is None:
            self._client = LoaderClient(self.endpoint, **self.client_kwargs)
            _warn_validation(self._client)
        client = self._client
        seen: list[int] = []

        def one_epoch() -> Any:
            for x, y in client.epoch():
                assert client.last is not None
                seen.extend(client.last.indices.tolist())
                yield x, y

        results = self.model.evaluate(one_epoch(), steps=client.steps_per_epoch - client.position[1], verbose=0,
                                      return_dict=True)
        self.batches_seen.append(seen)
        if logs is not None:
            logs.update({f"{self.prefix}{name}": value for name, value in results.items()})

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
