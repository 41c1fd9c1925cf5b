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


# val holds round(n x F) samples, a half rounded up (README), written out: 10.1 -> 10, 6.3 -> 6, 2.5 -> 3,
# 3.7 -> 4, 4.5 -> 5, 0.5 -> 1 and 9.5 -> 10 (refused: train would be empty) tell the rounding rules apart.
@pytest.mark.parametrize(("n", "fraction", "val_size"), [
    (2, 0.5, 1), (10, 0.2, 2), (101, 0.1, 10), (1000, 0.25, 250), (7, 0.9, 6), (10, 0.25, 3), (10, 0.37, 4),
    (10, 0.33, 3), (30, 0.15, 5), (10, 0.05, 1), (90, 0.05, 5), (11, 0.5, 6), (11, 0.45, 5),
])
def test_split_is_disjoint_complete_sized_and_deterministic(n: int, fraction: float, val_size: int) -> None:
    train, val = split_indices(n, fraction, split_seed=3)
    assert len(val) == val_size and len(train) == n - val_size
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


@pytest.mark.parametrize(("n", "fraction", "message"), [
    (10, 0.0, "`val_fraction` must be between 0 and 1 (exclusive), got 0.0"),
    (10, 1.0, "`val_fraction` must be between 0 and 1 (exclusive), got 1.0"),
    (10, 1.5, "`val_fraction` must be between 0 and 1 (exclusive), got 1.5"),
    (10, 0.04, "`val_fraction` 0.04 of 10 samples gives 0 validation samples: each of train and val needs at least "
               "one; choose a fraction between 0.1 and 0.9"),
    (3, 0.9, "`val_fraction` 0.9 of 3 samples gives 3 validation samples: each of train and val needs at least one; "
             "choose a fraction between 0.333 and 0.667"),
    (2, 0.1, "`val_fraction` 0.1 of 2 samples gives 0 validation samples: each of train and val needs at least one; "
             "choose a fraction between 0.5 and 0.5"),
    (1, 0.5, "a data set of 1 sample cannot be split"),
])
def test_a_split_that_cannot_be_made_says_which_fractions_can(n: int, fraction: float, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        split_indices(n, fraction, split_seed=0)
    assert str(info.value) == message


def test_a_subset_name_other_than_train_or_val_is_refused_and_a_subset_fingerprint_is_16_hex_digits(
        tmp_path: Path) -> None:
    from loader_server.data.subset import take_subset

    whole = load_dataset(ServerConfig(data=str(unique_label_list(tmp_path, 10))))
    with pytest.raises(ConfigError) as info:
        take_subset(whole, "test", 0.5, 0)
    assert str(info.value) == "`subset` must be one of all, train, val; got 'test'"
    fingerprint = take_subset(whole, "val", 0.5, 0).fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0  # the form a saved state holds


def test_a_subset_reads_each_of_its_samples_from_its_own_place_in_the_data_set(tmp_path: Path) -> None:
    """Sample i of a subset is its parent's sample keep[i]: the bytes, the bound on them, the version, the name."""
    listfile = unique_label_list(tmp_path, 40)  # label i is sample i
    whole = load_dataset(ServerConfig(data=str(listfile)))
    val = load_dataset(ServerConfig(data=str(listfile), subset="val", val_fraction=0.25))
    assert len(val) == 10
    for i in (0, 5, 9):
        j = int(val.labels[i])  # its place in the whole data set
        assert val.read(i) == whole.read(j) and val.describe(i) == whole.describe(j)  # type: ignore[attr-defined]
        assert val.version(i) == whole.version(j) and val.version(i) is not None  # type: ignore[attr-defined]
    size = len(whole.read(int(val.labels[3])))  # type: ignore[attr-defined]
    assert val.read(3, size) == whole.read(int(val.labels[3]))  # type: ignore[attr-defined]
    with pytest.raises(Exception, match=f"{size - 1}"):
        val.read(3, size - 1)  # type: ignore[attr-defined]  # the bound reaches the parent's read
