"""Array data sets: memory-mapped .npy/.npz/shards and ragged sequences, gathered in real workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient
from loader_server.cli import main

N = 50


def epochs(endpoint: str, count: int) -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    with LoaderClient(endpoint, timeout_s=20) as client:
        out = []
        for _ in range(count):
            batches = []
            for x, y in client.epoch():
                assert client.last is not None
                batches.append((x.copy(), y.copy(), client.last.indices.copy()))
            out.append(batches)
        return out


@pytest.fixture
def dense(tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4, 3)).astype(np.float32)
    y = np.arange(N, dtype=np.int32) * 10
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return x, y


def check(batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray) -> None:
    seen = []
    for xb, yb, idx in batches:
        np.testing.assert_array_equal(xb, x[idx])
        np.testing.assert_array_equal(yb, y[idx])
        seen.extend(idx.tolist())
    assert len(seen) == len(set(seen)) == (len(y) // 8) * 8


def test_npy_with_labels(start_server: Any, tmp_path: Path, dense: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = dense
    server = start_server(tmp_path / "x.npy", "--labels", str(tmp_path / "y.npy"), "--batch-size", "8",
                          "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert client.x_shape == (4, 3) and client.x_dtype == np.float32 and client.num_samples == N
    for epoch in epochs(server.endpoint, 2):
        check(epoch, x, y)


def test_uncompressed_npz_and_shards(start_server: Any, tmp_path: Path, dense: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = dense
    np.savez(tmp_path / "data.npz", x=x, y=y)
    server = start_server(tmp_path / "data.npz", "--batch-size", "8", "--workers", "1")
    check(epochs(server.endpoint, 1)[0], x, y)
    shards = tmp_path / "shards"
    shards.mkdir()
    for k, (lo, hi) in enumerate([(0, 20), (20, 33), (33, N)]):
        np.save(shards / f"x_{k}.npy", x[lo:hi])
        np.save(shards / f"y_{k}.npy", y[lo:hi])
    server = start_server(shards, "--batch-size", "8", "--workers", "2")
    check(epochs(server.endpoint, 1)[0], x, y)


def pad_sequences(seqs: list[np.ndarray], maxlen: int) -> np.ndarray:
    """Keras pad_sequences defaults: pad and truncate at the front, value 0."""
    out = np.zeros((len(seqs), maxlen), dtype=seqs[0].dtype)
    for i, s in enumerate(seqs):
        s = s[-maxlen:]
        out[i, maxlen - len(s):] = s
    return out


def ragged(tmp_path: Path, n: int = N, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=n)
    seqs = [rng.integers(1, 50, size=k).astype(np.int32) for k in lengths]
    labels = np.array([int(s.sum() % 2) for s in seqs], dtype=np.int64)
    np.save(tmp_path / "values.npy", np.concatenate(seqs))
    np.save(tmp_path / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(tmp_path / "labels.npy", labels)
    return pad_sequences(seqs, 8), labels


def test_ragged_sequences_padded_like_pad_sequences(start_server: Any, tmp_path: Path) -> None:
    x, y = ragged(tmp_path)
    server = start_server(tmp_path / "values.npy", "--offsets", str(tmp_path / "offsets.npy"), "--labels",
                          str(tmp_path / "labels.npy"), "--maxlen", "8", "--batch-size", "8", "--workers", "2")
    check(epochs(server.endpoint, 1)[0], x, y)


def test_random_mode_draws_rows_with_replacement(start_server: Any, tmp_path: Path,
                                                 dense: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = dense
    server = start_server(tmp_path / "x.npy", "--labels", str(tmp_path / "y.npy"), "--batch-size", "16",
                          "--workers", "1", "--mode", "random", "--steps-per-epoch", "5")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert client.steps_per_epoch == 5
        for _ in range(6):
            xb, yb = client.next()
            assert client.last is not None
            np.testing.assert_array_equal(xb, x[client.last.indices])


@pytest.mark.parametrize(("setup", "args", "expected"), [
    ("compressed", [], "cannot be memory-mapped; save it with np.savez"),
    ("objects", ["--labels", "y.npy"], "object arrays are refused"),
    ("nolabels", [], "needs --labels"),
    ("mismatch", ["--labels", "y.npy"], "50 samples but 49 labels"),
    ("ragged-nomaxlen", ["--offsets", "offsets.npy", "--labels", "labels.npy"], "need --maxlen"),
    ("augment", ["--labels", "y.npy", "--augment", "flip"], "apply to images only"),
])
def test_bad_array_inputs_exit_2(tmp_path: Path, dense: tuple[np.ndarray, np.ndarray],
                                 capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                 setup: str, args: list[str], expected: str) -> None:
    x, y = dense
    monkeypatch.chdir(tmp_path)  # restored afterwards: later tests start servers from the repository
    data = "x.npy"
    if setup == "compressed":
        np.savez_compressed("c.npz", x=x, y=y)
        data = "c.npz"
    elif setup == "objects":
        np.save("o.npy", np.array([[1], [2, 3]], dtype=object), allow_pickle=True)
        data = "o.npy"
    elif setup == "mismatch":
        np.save("y.npy", y[:-1])
    elif setup == "ragged-nomaxlen":
        ragged(tmp_path)
        data = "values.npy"
    code = main(["serve", "--data", data, "--bind", f"ipc://{tmp_path}/s.sock", "--batch-size", "8", *args])
    assert code == 2
    assert expected in capsys.readouterr().err
