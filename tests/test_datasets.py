"""The data set interface: `load_dataset` opens every kind, `check` accepts every kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pytest

from loader_server.config import ServerConfig
from loader_server.data import datasets
from loader_server.data.batch_spec import batch_spec
from loader_server.data.datasets import ArrayDataset, Dataset, DatasetKind, FileDataset, load_dataset
from loader_server.pipeline.batch import BatchBuilder

from .conftest import color_classes, unique_label_list


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True,
                          timeout=timeout)


def arrays(tmp_path: Path, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n * 6, dtype=np.float32).reshape(n, 3, 2)
    y = np.arange(n, dtype=np.int64) % 4
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    (tmp_path / "shards").mkdir()
    for k, (lo, hi) in enumerate([(0, 7), (7, n)]):
        np.save(tmp_path / "shards" / f"x_{k}.npy", x[lo:hi])
        np.save(tmp_path / "shards" / f"y_{k}.npy", y[lo:hi])
    return x, y


def test_every_kind_opens_through_load_dataset(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "list", 5)
    folders = color_classes(tmp_path / "folders", 2)
    x, y = arrays(tmp_path)
    opened = {
        "list": load_dataset(ServerConfig(data=str(listfile))),
        "folders": load_dataset(ServerConfig(data=str(folders))),
        "npy": load_dataset(ServerConfig(data=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"))),
        "npz": load_dataset(ServerConfig(data=str(tmp_path / "xy.npz"))),
        "shards": load_dataset(ServerConfig(data=str(tmp_path / "shards"))),
    }
    for name, ds in opened.items():
        assert isinstance(ds, Dataset), name
        assert len(ds) == len(ds.labels) and len(ds.fingerprint()) == 16 and ds.source, name
    assert opened["list"].build == "decode" and isinstance(opened["list"], FileDataset)
    assert opened["list"].describe(3) == str((tmp_path / "list" / "img" / "00003.jpg").resolve())
    assert opened["folders"].class_names == ("c0", "c1", "c2", "c3") and len(opened["folders"]) == 8
    for name in ("npy", "npz", "shards"):
        ds = opened[name]
        assert ds.build == "gather" and isinstance(ds, ArrayDataset), name
        out = np.empty((3, 3, 2), np.float32)
        ds.gather(np.array([19, 0, 8]), out)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(out, x[[19, 0, 8]])
        np.testing.assert_array_equal(ds.labels, y)
    assert opened["npy"].describe(4) == "x.npy[4]" and opened["shards"].describe(4) == "shards[4]"


@pytest.mark.parametrize("kind", ["npy", "npz", "shards"])
def test_check_accepts_arrays_and_reports_ok(tmp_path: Path, kind: str) -> None:
    arrays(tmp_path)
    data = {"npy": ["--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy")],
            "npz": ["--data", str(tmp_path / "xy.npz")], "shards": ["--data", str(tmp_path / "shards")]}[kind]
    report = tmp_path / "bad.tsv"
    result = run_cli("check", *data, "--report", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 20 samples" in result.stdout and ": 0 bad" in result.stdout
    assert "each sample (3, 2) float32, labels int64" in result.stdout
    assert result.stdout.rstrip().endswith("check: OK") and report.read_text() == ""


def test_check_on_arrays_names_rows_with_nan_and_refuses_bad_shapes(tmp_path: Path) -> None:
    x, y = arrays(tmp_path)
    x[5, 1, 0] = np.nan
    x[12, 0, 1] = np.inf
    np.save(tmp_path / "x.npy", x)
    report = tmp_path / "bad.tsv"
    result = run_cli("check", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                     "--report", str(report))
    assert result.returncode == 1, result.stdout + result.stderr
    assert report.read_text() == ("x.npy[12]\tnon-finite values (NaN or infinity) in the sample\n"
                                  "x.npy[5]\tnon-finite values (NaN or infinity) in the sample\n")
    # the summary names one bad sample of each kind, not only the reason (the report has them all)
    assert "       2  non_finite (e.g. non-finite values (NaN or infinity) in the sample: x.npy[12])" in result.stdout, \
        result.stdout
    np.save(tmp_path / "y.npy", y[:-1])
    result = run_cli("check", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"))
    assert result.returncode == 2 and "20 samples but 19 labels" in result.stderr, result.stderr
    result = run_cli("check", "--data", str(tmp_path / "x.npy"))
    assert result.returncode == 2 and "needs --labels y.npy" in result.stderr, result.stderr
    assert "malformed line" not in result.stderr


def test_check_of_a_class_folder_subset(tmp_path: Path) -> None:
    folders = color_classes(tmp_path / "folders", 5)
    result = run_cli("check", "--data", str(folders), "--subset", "val", "--val-fraction", "0.25", "--workers", "1",
                     "--report", str(tmp_path / "bad.tsv"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked 5 samples" in result.stdout and "subset val (5 of 20" in result.stdout


@dataclass(frozen=True)
class Squares:
    """A kind of data set that the code base does not know: sample i is a row of i*i."""

    n: int
    source: str = "squares"
    class_names: tuple[str, ...] | None = None
    labels: np.ndarray = field(init=False)
    build: ClassVar[Literal["decode", "gather"]] = "gather"
    sample_shape: ClassVar[tuple[int, ...]] = (2,)
    sample_dtype: ClassVar[str] = "<i8"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.arange(self.n) % 2)

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        return f"{self.n:016x}"

    def describe(self, i: int) -> str:
        return f"square {i}"

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        out[:] = (indices * indices)[:, None]


def test_a_new_kind_is_one_entry_in_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "100.squares"
    marker.write_text("")
    kind = DatasetKind("squares", lambda options: options.data.endswith(".squares"),
                       lambda config: Squares(int(os.path.basename(config.data).split(".")[0])))
    monkeypatch.setattr(datasets, "KINDS", (kind, *datasets.KINDS))
    config = ServerConfig(data=str(marker), batch_size=4, subset="train", val_fraction=0.1)
    ds = load_dataset(config)
    assert len(ds) == 90 and isinstance(ds, ArrayDataset)
    builder = BatchBuilder(config, ds, batch_spec(config, ds))
    batch = builder.build(np.array([0, 1, 2]), builder.allocate())
    keep = ds.keep  # type: ignore[attr-defined]
    np.testing.assert_array_equal(batch["x"][:, 0], keep[:3] ** 2)


# ---------------------------------------------------------------------------- a new kind of container file
def _index_concatenated(path: str) -> Any:
    """The whole of a new container kind's own code: where each sample of one ``.cat`` file is. A
    ``.cat`` file is a JSON line of [size, label] pairs, then the images' bytes one after another."""
    from loader_server.data.packed import Segment

    with open(path, "rb") as f:
        head = f.readline()
    sizes, labels = np.array(json.loads(head), dtype=np.int64).reshape(-1, 2).T
    pos = len(head) + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return Segment(pos=pos, span=sizes, labels=labels)


def _open_concatenated(options: Any) -> Any:
    from loader_server.data.packed import expand_files, load_or_build
    from loader_server.data.remote import storage_of

    storage = storage_of(options)
    files = expand_files(options.data, ".cat", "concatenated file", storage)
    return load_or_build(files, kind="concatenated files", options={}, index_dir=options.index_dir,
                         index_file=_index_concatenated, source=f"concatenated files {files[0]}", storage=storage)


def test_a_new_kind_of_container_file_is_its_indexing_and_one_entry_in_kinds(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's 2 files for a byte-source kind: its module only indexes one file (here the two functions
    above), and one entry in KINDS. Patterns, the kept index, reads, versions, subsets and the worker's steps
    come with it: its batches are bitwise those of the same images as files, with an augmentation and a cache."""
    from loader_server.data.packed import PackedIndex

    listfile = unique_label_list(tmp_path / "files", 12)
    files = load_dataset(ServerConfig(data=str(listfile)))
    folder = tmp_path / "cat"
    folder.mkdir()
    for k, rows in enumerate((range(0, 5), range(5, 12))):
        images = [files.read(i) for i in rows]  # type: ignore[attr-defined]
        head = json.dumps([[len(b), int(files.labels[i])] for b, i in zip(images, rows, strict=True)]).encode()
        (folder / f"part-{k}.cat").write_bytes(head + b"\n" + b"".join(images))
    kind = DatasetKind("concatenated files", lambda options: options.data.endswith(".cat"), _open_concatenated)
    monkeypatch.setattr(datasets, "KINDS", (kind, *datasets.KINDS))
    data = str(folder / "part-{0..1}.cat")
    ds = load_dataset(ServerConfig(data=data))
    assert isinstance(ds, PackedIndex) and len(ds) == 12 and list(folder.glob(".loader-index-*.npz"))
    assert ds.describe(6) == f"{folder / 'part-1.cat'}:1" and ds.version(6) is not None
    for extra in ({}, {"augment": "rrc,flip", "seed": 3}, {"cache": "memory"},
                  {"subset": "train", "val_fraction": 0.25}):
        built = []
        for d in (str(listfile), data):
            config = ServerConfig(data=d, batch_size=4, size=(16, 12), **extra)  # type: ignore[arg-type]
            dataset = load_dataset(config)
            builder = BatchBuilder(config, dataset, batch_spec(config, dataset))
            built.append([builder.build(np.arange(k, min(k + 4, len(dataset))), builder.allocate())["x"].copy()
                          for k in range(0, len(dataset), 4)])
        for a, b in zip(*built, strict=True):
            np.testing.assert_array_equal(a, b)
