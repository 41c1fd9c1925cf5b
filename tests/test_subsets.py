"""Named subsets: one data set split into train and val, disjoint, complete and deterministic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient
from loader_client.contract.errors import ConfigError
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.data.subset import split_indices

from .conftest import color_classes, unique_label_list


@pytest.mark.parametrize(("n", "fraction"), [(2, 0.5), (10, 0.2), (101, 0.1), (1000, 0.25), (7, 0.9)])
def test_split_is_disjoint_complete_sized_and_deterministic(n: int, fraction: float) -> None:
    train, val = split_indices(n, fraction, split_seed=3)
    assert len(val) == int(n * fraction + 0.5) and len(train) == n - len(val)
    assert not set(train.tolist()) & set(val.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()  # sorted: reads keep the file order
    again = split_indices(n, fraction, split_seed=3)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], val)


def test_split_seed_chooses_the_split_and_the_shuffle_seed_does_not(tmp_path: Path) -> None:
    a = split_indices(1000, 0.2, split_seed=0)[1]
    b = split_indices(1000, 0.2, split_seed=1)[1]
    assert not np.array_equal(a, b)
    listfile = unique_label_list(tmp_path, 40)
    subsets = [load_dataset(ServerConfig(data=str(listfile), subset="val", val_fraction=0.25, seed=seed))
               for seed in (0, 99)]
    np.testing.assert_array_equal(subsets[0].labels, subsets[1].labels)


@pytest.mark.parametrize("kind", ["list file", "class folders", "arrays"])
def test_subsets_of_every_kind(tmp_path: Path, kind: str) -> None:
    if kind == "list file":
        settings: dict[str, Any] = {"data": str(unique_label_list(tmp_path, 40))}  # label i is sample i
        key = "labels"
    elif kind == "class folders":
        settings = {"data": str(color_classes(tmp_path / "folders", 10))}
        key = "paths"
    else:
        np.save(tmp_path / "x.npy", np.arange(40 * 2, dtype=np.int32).reshape(40, 2))
        np.save(tmp_path / "y.npy", np.arange(40))
        settings = {"data": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}
        key = "rows"
    whole = load_dataset(ServerConfig(**settings))
    train = load_dataset(ServerConfig(**settings, subset="train", val_fraction=0.3, split_seed=5))
    val = load_dataset(ServerConfig(**settings, subset="val", val_fraction=0.3, split_seed=5))
    assert (len(train), len(val), len(whole)) == (28, 12, 40)
    assert train.build == val.build == whole.build and train.class_names == whole.class_names

    def samples(ds: Any) -> list[Any]:
        if key == "labels":
            return ds.labels.tolist()  # type: ignore[no-any-return]
        if key == "paths":
            return [ds.path(i) for i in range(len(ds))]
        out = np.empty((len(ds), 2), np.int32)
        ds.gather(np.arange(len(ds)), out)
        return [tuple(r) for r in out.tolist()]

    t, v, w = samples(train), samples(val), samples(whole)
    assert not set(t) & set(v) and sorted(t + v) == sorted(w)
    assert [val.describe(i) for i in range(len(val))] == [whole.describe(int(i)) for i in val.keep]  # type: ignore[attr-defined]
    # The split is part of the fingerprint: a state saved on one subset is refused by another.
    prints = {whole.fingerprint(), train.fingerprint(), val.fingerprint(),
              load_dataset(ServerConfig(**settings, subset="val", val_fraction=0.3, split_seed=6)).fingerprint(),
              load_dataset(ServerConfig(**settings, subset="val", val_fraction=0.2, split_seed=5)).fingerprint()}
    assert len(prints) == 5
    assert val.fingerprint() == load_dataset(ServerConfig(**settings, subset="val", val_fraction=0.3,
                                                          split_seed=5)).fingerprint()


def test_a_split_that_leaves_a_subset_empty_is_refused(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path, 10)
    with pytest.raises(ConfigError, match=r"`val_fraction` 0.01 of 10 samples gives 0 validation samples"):
        load_dataset(ServerConfig(data=str(listfile), subset="train", val_fraction=0.01))
    with pytest.raises(ConfigError, match="`subset` train needs `val_fraction` between 0 and 1"):
        ServerConfig(data=str(listfile), subset="train")


def _epoch_labels(endpoint: str) -> tuple[list[int], list[int]]:
    with LoaderClient(endpoint, timeout_s=30) as client:
        labels, indices = [], []
        for _, y in client.epoch():
            assert client.last is not None
            labels.extend(y.tolist())
            indices.extend(client.last.indices.tolist())
        return labels, indices


@pytest.mark.parametrize("kind", ["list file", "arrays"])
def test_a_training_and_a_validation_server_share_nothing_and_miss_nothing(start_server: Any, tmp_path: Path,
                                                                          kind: str) -> None:
    if kind == "list file":
        data, extra = unique_label_list(tmp_path / "data", 30, size=(16, 12)), ["--size", "8x8"]
    else:
        np.save(tmp_path / "x.npy", np.arange(30, dtype=np.float32)[:, None])
        np.save(tmp_path / "y.npy", np.arange(30))
        data, extra = tmp_path / "x.npy", ["--labels", str(tmp_path / "y.npy")]
    split = ["--val-fraction", "0.2", "--split-seed", "11", "--batch-size", "4", "--keep-last", "--workers", "1"]
    train = start_server(data, "--subset", "train", *split, *extra)
    val = start_server(data, "--subset", "val", *split, *extra, "--no-shuffle")
    train_labels, train_indices = _epoch_labels(train.endpoint)
    val_labels, val_indices = _epoch_labels(val.endpoint)
    assert len(train_labels) == 24 and len(val_labels) == 6  # every sample once: 30 * 0.2 = 6 for validation
    assert not set(train_labels) & set(val_labels) and sorted(train_labels + val_labels) == list(range(30))
    assert sorted(train_indices) == list(range(24)) and val_indices == list(range(6))  # numbered in the subset
    assert val_labels == sorted(val_labels)  # --no-shuffle keeps the file order within the subset
    _, expected_val = split_indices(30, 0.2, 11)
    assert val_labels == expected_val.tolist()
    assert "subset val (6 of 30" in val.log_text()
