"""Real trainers: Keras 3 (torch backend) and PyTorch train from the client; exact epochs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")

from loader_client import LoaderClient  # noqa: E402

from .conftest import color_classes, unique_label_list  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def reference_epochs(endpoint: str, epochs: int) -> list[list[np.ndarray]]:
    """The labels of every batch of the first `epochs` epochs, from a fresh client."""
    with LoaderClient(endpoint, timeout_s=30) as client:
        return [[y.copy() for _, y in client.epoch()] for _ in range(epochs)]


def test_keras_fit_epochs_consume_exactly_the_server_epochs(start_server: Any, tmp_path: Path) -> None:
    n = 48
    listfile = unique_label_list(tmp_path / "data", n, size=(16, 16))  # label = sample index
    server = start_server(listfile, "--batch-size", "8", "--size", "16x16", "--workers", "2", "--seed", "4")
    seen: list[np.ndarray] = []
    epoch_starts: list[int] = []

    class Recorder(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.body = [keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3, activation="relu"),
                         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(n, activation="softmax")]

        def call(self, x: Any) -> Any:
            for layer in self.body:
                x = layer(x)
            return x

        def train_step(self, data: Any) -> Any:
            seen.append(data[1].detach().cpu().numpy().copy())  # torch backend: a torch tensor
            return super().train_step(data)

    class Boundaries(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            epoch_starts.append(len(seen))

    with LoaderClient(server.endpoint, timeout_s=30) as client:
        model = Recorder()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
        history = model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=3, shuffle=False,
                            callbacks=[Boundaries()], verbose=0)
        steps = client.steps_per_epoch
    assert len(history.history["loss"]) == 3 and all(np.isfinite(history.history["loss"]))
    assert epoch_starts == [0, steps, 2 * steps] and len(seen) == 3 * steps
    expected = reference_epochs(server.endpoint, 3)
    for k in range(3):
        got = seen[k * steps : (k + 1) * steps]
        for a, b in zip(got, expected[k]):
            np.testing.assert_array_equal(a, b)


def test_keras_validation_callback_sees_the_same_batches_every_epoch(start_server: Any, tmp_path: Path) -> None:
    from loader_client.keras import EvaluateEachEpoch

    data = color_classes(tmp_path / "colors", 12)
    train = start_server(data, "--batch-size", "8", "--size", "16x16", "--workers", "1")
    val = start_server(data, "--batch-size", "5", "--size", "16x16", "--workers", "1", "--no-shuffle", "--keep-last")
    callback = EvaluateEachEpoch(val.endpoint, timeout_s=30)
    with LoaderClient(train.endpoint, timeout_s=30) as client:
        model = keras.Sequential([keras.Input(client.x_shape), keras.layers.Rescaling(1 / 255),
                                  keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        history = model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=3, shuffle=False,
                            callbacks=[callback], verbose=0)
    assert len(history.history["val_loss"]) == 3 and "val_accuracy" in history.history
    assert callback.batches_seen[0] == list(range(48))  # every validation sample, once, in file order
    assert callback.batches_seen[0] == callback.batches_seen[1] == callback.batches_seen[2]


def test_torch_training_loss_goes_down(start_server: Any, tmp_path: Path) -> None:
    from loader_client.torch import LoaderDataset

    data = color_classes(tmp_path / "colors", 16)
    server = start_server(data, "--batch-size", "8", "--size", "16x16", "--workers", "2")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    dataset = LoaderDataset(server.endpoint, channels_first=True, timeout_s=30)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None)
    epoch_losses = []
    try:
        assert len(dataset) == 8
        for _ in range(2):
            losses = []
            for x, y in loader:
                assert x.shape == (8, 3, 16, 16) and x.dtype == torch.uint8 and y.dtype == torch.int64
                loss = torch.nn.functional.cross_entropy(model(x.float() / 255), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            assert len(losses) == 8
            epoch_losses.append(float(np.mean(losses)))
    finally:
        dataset.close()
    assert epoch_losses[1] < epoch_losses[0] * 0.9, epoch_losses


def test_torch_dataset_refuses_dataloader_workers(start_server: Any, tmp_path: Path) -> None:
    from loader_client.torch import LoaderDataset

    listfile = unique_label_list(tmp_path / "data", 16)
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    dataset = LoaderDataset(server.endpoint, timeout_s=30)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match="must not run in a DataLoader worker"):
        next(iter(loader))


def test_torch_tensors_from_writable_arrays_do_not_warn(start_server: Any, tmp_path: Path) -> None:
    from loader_client.torch import tensors

    listfile = unique_label_list(tmp_path / "data", 16)
    server = start_server(listfile, "--batch-size", "4", "--size", "8x6", "--workers", "1")
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        batches = list(tensors(client, epochs=1, channels_first=True))  # warnings are errors in this suite
    assert len(batches) == 4 and batches[0][0].shape == (4, 3, 6, 8)


@pytest.mark.parametrize("example", ["keras_fit.py", "torch_loop.py"])
def test_examples_run_against_a_server(start_server: Any, tmp_path: Path, example: str) -> None:
    data = color_classes(tmp_path / "colors", 8)
    server = start_server(data, "--batch-size", "8", "--size", "32x32", "--workers", "1")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--endpoint", server.endpoint,
                             "--epochs", "2"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 2" in result.stdout.lower() or "Epoch 2/2" in result.stdout


def test_keras_embedding_gru_trains_on_an_array_data_set(start_server: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n, vocab, maxlen = 256, 30, 12
    lengths = rng.integers(3, 16, size=n)
    seqs = [rng.integers(1, vocab, size=k).astype(np.int32) for k in lengths]
    labels = np.array([int((s > vocab // 2).mean() > 0.5) for s in seqs], dtype=np.int64)  # learnable
    np.save(tmp_path / "values.npy", np.concatenate(seqs))
    np.save(tmp_path / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(tmp_path / "labels.npy", labels)
    server = start_server(tmp_path / "values.npy", "--offsets", str(tmp_path / "offsets.npy"), "--labels",
                          str(tmp_path / "labels.npy"), "--maxlen", str(maxlen), "--batch-size", "32",
                          "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        assert client.x_shape == (maxlen,) and client.x_dtype == np.int32
        model = keras.Sequential([keras.Input((maxlen,), dtype="int32"), keras.layers.Embedding(vocab, 16),
                                  keras.layers.GRU(16), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="sparse_categorical_crossentropy")
        history = model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=4, shuffle=False,
                            verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 4 and all(np.isfinite(losses)) and losses[-1] < losses[0], losses
