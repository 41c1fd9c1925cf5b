"""Real trainers: Keras 3 (torch backend) and PyTorch train from the client; exact epochs."""

from __future__ import annotations

import importlib.util
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


def test_keras_adapter_imports_without_keras_backend(tmp_path: Path) -> None:
    """No KERAS_BACKEND and no keras.json: an installed backend is chosen (not a missing tensorflow)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "KERAS_HOME")}
    env["HOME"] = str(tmp_path)  # no ~/.keras/keras.json
    script = "import loader_client.keras, keras; print(keras.backend.backend())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = "tensorflow" if importlib.util.find_spec("tensorflow") else "torch"
    assert result.stdout.split()[-1] == expected


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

    class Boundaries(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            epoch_starts.append(len(seen))

    with LoaderClient(server.endpoint, timeout_s=30) as client:
        model = recorder_model(n, seen)
        history = model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=3, shuffle=False,
                            callbacks=[Boundaries()], verbose=0)
        steps = client.steps_per_epoch
    assert len(history.history["loss"]) == 3 and all(np.isfinite(history.history["loss"]))
    assert epoch_starts == [0, steps, 2 * steps] and len(seen) == 3 * steps
    expected = reference_epochs(server.endpoint, 3)
    for k in range(3):
        got = seen[k * steps : (k + 1) * steps]
        for a, b in zip(got, expected[k], strict=True):
            np.testing.assert_array_equal(a, b)


def test_handshake_carries_num_classes(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "list", 12, size=(8, 8))  # labels 0..11
    folders = color_classes(tmp_path / "colors", 2)  # 4 class folders
    np.save(tmp_path / "x.npy", np.zeros((10, 3), np.float32))
    np.save(tmp_path / "y.npy", np.array([0, 6, 2, 2, 1, 0, 6, 3, 3, 1], np.int64))  # 7 classes, 4 and 5 unused
    np.save(tmp_path / "t.npy", np.linspace(0, 1, 10, dtype=np.float32))  # regression targets: no classes
    servers = [start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1"),
               start_server(folders, "--batch-size", "4", "--size", "8x8", "--workers", "1"),
               start_server(tmp_path / "x.npy", "--labels", str(tmp_path / "y.npy"), "--batch-size", "2",
                            "--workers", "1"),
               start_server(tmp_path / "x.npy", "--labels", str(tmp_path / "t.npy"), "--batch-size", "2",
                            "--workers", "1")]
    got = []
    for server in servers:
        with LoaderClient(server.endpoint, timeout_s=30) as client:
            got.append((client.num_classes, client.class_names))
    assert got == [(12, None), (4, ["c0", "c1", "c2", "c3"]), (7, None), (None, None)]
    with LoaderClient([servers[0].endpoint, servers[0].endpoint], timeout_s=30) as merged:
        assert merged.num_classes == 12


def test_count_classes_counts_the_whole_data_set_of_a_subset() -> None:
    from types import SimpleNamespace

    from loader_server.data.classes import count_classes

    whole = SimpleNamespace(class_names=None, labels=np.array([0, 3, 9, 2]), parent=None)
    val = SimpleNamespace(class_names=None, labels=np.array([0, 3]), parent=whole)  # as --subset val serves
    assert count_classes(whole) == count_classes(val) == 10
    assert count_classes(SimpleNamespace(class_names=("a", "b"), labels=np.array([0, 0]))) == 2
    assert count_classes(SimpleNamespace(class_names=None, labels=np.array([-1, 2]))) is None
    assert count_classes(SimpleNamespace(class_names=None, labels=np.zeros((3, 2), np.int64))) is None


def recorder_model(n: int, seen: list[np.ndarray], evaluated: list[np.ndarray] | None = None) -> Any:
    """A tiny Keras model that records the labels of every batch it trains on (and evaluates on)."""

    class Recorder(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.body = [keras.layers.Rescaling(1 / 255), keras.layers.GlobalAveragePooling2D(),
                         keras.layers.Dense(n, activation="softmax")]

        def call(self, x: Any) -> Any:
            for layer in self.body:
                x = layer(x)
            return x

        def train_step(self, data: Any) -> Any:
            seen.append(data[1].detach().cpu().numpy().copy())  # torch backend: a torch tensor
            return super().train_step(data)

        def test_step(self, data: Any) -> Any:
            if evaluated is not None:
                evaluated.append(data[1].detach().cpu().numpy().copy())
            return super().test_step(data)

    model = Recorder()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", run_eagerly=True)
    return model


class EpochMarks(keras.callbacks.Callback):  # type: ignore[misc]
    """Where each Keras epoch starts in the recorded batches, and the stream's state after each step."""

    def __init__(self, seen: list[np.ndarray], stream: Any) -> None:
        super().__init__()
        self.seen, self.stream = seen, stream
        self.starts: list[int] = []
        self.states: list[tuple[int, tuple[int, int]]] = []  # (batches trained, stream position)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.starts.append(len(self.seen))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        state = self.stream.state_dict()
        self.states.append((len(self.seen), (state["epoch"], state["batch"])))


def flat(batches: list[np.ndarray]) -> list[list[int]]:
    return [b.tolist() for b in batches]


def test_keras_stream_fit_needs_no_steps_and_trains_exact_epochs(start_server: Any, tmp_path: Path) -> None:
    from loader_client.keras import KerasStream

    n = 40
    listfile = unique_label_list(tmp_path / "data", n, size=(8, 8))  # label = sample index
    server = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--seed", "4")
    seen: list[np.ndarray] = []
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        assert client.num_classes == n
        stream = KerasStream(client)
        marks = EpochMarks(seen, stream)
        # fit's defaults (shuffle=True, no steps_per_epoch): Keras takes the length from the stream
        history = recorder_model(n, seen).fit(stream, epochs=3, callbacks=[marks], verbose=0)
        steps = client.steps_per_epoch
    assert len(history.history["loss"]) == 3
    expected = reference_epochs(server.endpoint, 3)
    assert marks.starts == [0, steps, 2 * steps] and len(seen) == 3 * steps  # the build peek trained once
    assert flat(seen) == flat([b for epoch in expected for b in epoch])
    # inside a callback the state names the next batch to train, despite Keras's peek at the start
    assert [pos for _, pos in marks.states] == [divmod(k, steps) for k, _ in marks.states]


def test_keras_streams_in_one_share_each_train_exact_epochs_built_once(start_server: Any, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Keras trials of a sweep in one share: one by `KerasStream(endpoint, share=...)`, one by
    LOADER_SHARE through `from_env`. Each `fit` trains every server epoch exactly, the same batches
    as a trainer alone, and the second one's batches are the ones built for the first (the share's
    window covers the whole run, so nothing is built twice)."""
    from loader_client import server_stats
    from loader_client.env import from_env
    from loader_client.keras import KerasStream

    n, epochs = 40, 3
    listfile = unique_label_list(tmp_path / "data", n, size=(8, 8))  # label = sample index
    server = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--seed", "4",
                          "--share-window", "64")
    expected = reference_epochs(server.endpoint, epochs)
    steps = len(expected[0])
    monkeypatch.setenv("LOADER_ENDPOINT", server.endpoint)
    monkeypatch.setenv("LOADER_SHARE", "sweep")
    first = KerasStream(server.endpoint, share="sweep", name="trial-0", timeout_s=30)
    second = KerasStream(from_env(name="trial-1", timeout_s=30))
    try:
        assert first.client.info["share"] == second.client.info["share"] == "sweep"
        assert first.client.options.share == second.client.options.share == "sweep"
        seen: list[list[np.ndarray]] = [[], []]
        for stream, got in zip((first, second), seen, strict=True):  # the second trial starts when the first ends
            marks = EpochMarks(got, stream)
            history = recorder_model(n, got).fit(stream, epochs=epochs, callbacks=[marks], verbose=0)
            assert len(history.history["loss"]) == epochs
            assert marks.starts == [0, steps, 2 * steps] and len(got) == epochs * steps
            assert flat(got) == flat([b for epoch in expected for b in epoch])  # every server epoch, exactly
        (share,) = server_stats(server.endpoint, timeout_s=10)["shares"]
        assert share["name"] == "sweep" and share["members"] == 2
        assert share["reused"] >= epochs * steps  # every batch of the second trial was the first's
        assert share["built"] < 2 * epochs * steps
    finally:
        first.close()
        second.close()


def test_keras_state_taken_in_a_callback_resumes_at_the_next_batch(start_server: Any, tmp_path: Path) -> None:
    from loader_client.keras import KerasStream

    n = 32
    listfile = unique_label_list(tmp_path / "data", n, size=(8, 8))
    server = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--seed", "2")
    saved: list[dict[str, Any]] = []

    class SaveAfterFirstStep(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if not saved:
                saved.append(stream.state_dict())

    seen: list[np.ndarray] = []
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        stream = KerasStream(client)
        recorder_model(n, seen).fit(stream, epochs=1, callbacks=[SaveAfterFirstStep()], verbose=0)
    assert (saved[0]["epoch"], saved[0]["batch"]) == (0, 1)
    with LoaderClient(server.endpoint, timeout_s=30, state=saved[0]) as resumed:
        _, y = resumed.next()
    np.testing.assert_array_equal(y, seen[1])  # the batch trained right after the checkpoint


def test_keras_resume_mid_epoch_keeps_keras_epochs_on_server_epochs(start_server: Any, tmp_path: Path) -> None:
    from loader_client.contract.errors import LoaderError
    from loader_client.keras import KerasStream, fit

    n = 40
    listfile = unique_label_list(tmp_path / "data", n, size=(8, 8))
    server = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--seed", "9")
    expected = reference_epochs(server.endpoint, 3)
    steps = len(expected[0])
    state = {"epoch": 0, "batch": 2, "seed": 9}  # as a checkpoint after 2 batches would hold
    seen: list[np.ndarray] = []
    with LoaderClient(server.endpoint, timeout_s=30, state=state) as client:
        stream = KerasStream(client)
        marks = EpochMarks(seen, stream)
        history = fit(recorder_model(n, seen), stream, epochs=3, callbacks=[marks], verbose=0)
    assert history.epoch == [0, 1, 2] and len(history.history["loss"]) == 3
    first = steps - 2
    assert marks.starts == [0, first, first + steps] and len(seen) == first + 2 * steps
    assert flat(seen) == flat(expected[0][2:] + expected[1] + expected[2])
    assert [pos for _, pos in marks.states] == [divmod(k + 2, steps) for k, _ in marks.states]

    # the same with a plain model.fit over several epochs: refused at the second epoch, not misaligned
    with LoaderClient(server.endpoint, timeout_s=30, state=state) as client:
        with pytest.raises(LoaderError, match="loader_client.keras.fit"):
            recorder_model(n, []).fit(KerasStream(client), epochs=3, verbose=0)


# Keras's progress bar turns the torch loss into numpy with np.array(tensor), which numpy 2 warns about
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_keras_resumed_fit_counts_epochs_of_the_whole_run(start_server: Any, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A run resumed in epoch 2 of 3 shows `Epoch 2/3`, `Epoch 3/3` (not `Epoch 2/2`, `Epoch 3/3`)."""
    from loader_client.keras import KerasStream, fit

    n = 24
    listfile = unique_label_list(tmp_path / "data", n, size=(8, 8))
    server = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--seed", "3")
    capsys.readouterr()
    with LoaderClient(server.endpoint, timeout_s=30, state={"epoch": 1, "batch": 1, "seed": 3}) as client:
        model = keras.Sequential([keras.Input(client.x_shape), keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(n, activation="softmax")])
        model.compile("adam", "sparse_categorical_crossentropy")
        history = fit(model, KerasStream(client), epochs=3, verbose=2)
    shown = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("Epoch ")]
    assert shown == ["Epoch 2/3", "Epoch 3/3"], shown
    assert history.epoch == [1, 2]


def test_keras_validation_stream_scores_every_sample_every_epoch(start_server: Any, tmp_path: Path) -> None:
    from loader_client import server_stats
    from loader_client.keras import KerasStream

    n = 36
    listfile = unique_label_list(tmp_path / "data", n, size=(8, 8))
    train = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1")
    val = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--no-shuffle",
                       "--keep-last")
    seen: list[np.ndarray] = []
    evaluated: list[np.ndarray] = []
    with LoaderClient(train.endpoint, timeout_s=30) as client:
        validation = KerasStream(val.endpoint, validation=True, timeout_s=30)
        history = recorder_model(n, seen, evaluated).fit(KerasStream(client), validation_data=validation,
                                                         epochs=3, verbose=0)
        validation.close()
    assert len(history.history["val_loss"]) == 3
    per_epoch = len(evaluated) // 3
    assert per_epoch == 5 and len(evaluated) == 15
    for k in range(3):
        assert sorted(np.concatenate(evaluated[k * per_epoch : (k + 1) * per_epoch]).tolist()) == list(range(n))
    # one validation client for all evaluations: built = evaluated + at most its prefetch (4)
    assert 15 <= server_stats(val.endpoint, timeout_s=10)["batches_sent"] <= 15 + 4


def test_keras_validation_warns_when_the_server_drops_samples(start_server: Any, tmp_path: Path) -> None:
    from loader_client.keras import KerasStream, validation_problem

    listfile = unique_label_list(tmp_path / "data", 20, size=(8, 8))
    val = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1")  # shuffled, drop-last
    with pytest.warns(UserWarning, match=r"drops 4 of its 20 samples.*--drop-last.*--keep-last"):
        stream = KerasStream(val.endpoint, validation=True, timeout_s=30)
    stream.close()
    kept = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--keep-last")
    with LoaderClient(kept.endpoint, timeout_s=30) as client:
        assert validation_problem(client) is None


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
    # one client for all three evaluations: built = evaluated (3 x 10) + at most its prefetch (4)
    from loader_client import server_stats

    assert 30 <= server_stats(val.endpoint, timeout_s=10)["batches_sent"] <= 30 + 4


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


def test_torch_pinning_is_skipped_without_an_accelerator_and_used_with_one(start_server: Any, tmp_path: Path) -> None:
    from loader_client.torch import accelerator_present, pins, tensors

    listfile = unique_label_list(tmp_path / "data", 8)
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        # what the README's PyTorch snippet does, plus an explicit pin_memory=True
        batches = list(tensors(client, epochs=1, pin_memory=True, device=device))
        assert len(batches) == 2 and batches[0][0].device.type == device
    assert pins(False, "cuda") is False and pins(None, "cpu") is False
    if accelerator_present():
        assert pins(None, "cuda") and pins(True, "cpu")
        with LoaderClient(server.endpoint, timeout_s=30) as client:
            x, _ = next(iter(tensors(client, epochs=1, pin_memory=True)))
            assert x.is_pinned()
    else:  # torch would raise "Cannot access accelerator device" if pinned here
        assert not pins(True, "cuda") and not pins(None, "cuda")


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

