"""The resume guard: any change to the data set's samples or labels refuses a saved state.

A state saved on a server is resumed on a second server started on a changed copy of the same
data set: every change of a path, a label, the order, a sample's bytes, the shape or dtype of
an array, or the ragged offsets must be refused ("cannot resume: the data set index ...
differ"); a copy that indexes the same samples (comments, blank lines, the CSV form) must be
accepted and continue the saved stream. Array data sets are hashed on their first and last
64 KiB (65,536 bytes) of every array, so the arrays here are larger than that and the changes
sit in both windows.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from loader_client import ConfigError, LoaderClient

from .conftest import SERVER_READY_TIMEOUT_S, RunningServer, color_classes, unique_label_list

ROWS_OF_X = 4096  # x.npy of 4096 x 16 float32: 256 KiB, four times the 64 KiB window at each end


def _lines(folder: Path) -> list[str]:
    return (folder / "train.txt").read_text().splitlines()


def _write(folder: Path, lines: list[str]) -> None:
    (folder / "train.txt").write_text("\n".join(lines) + "\n")


def _relabel(folder: Path) -> None:
    lines = _lines(folder)
    path, label = lines[3].rsplit(" ", 1)
    lines[3] = f"{path} {int(label) + 100}"
    _write(folder, lines)


def _repath(folder: Path) -> None:
    lines = _lines(folder)
    shutil.copy(folder / lines[3].split()[0], folder / "img" / "copy.jpg")
    lines[3] = f"img/copy.jpg {lines[3].split()[1]}"  # the same pixels and label, under another name
    _write(folder, lines)


def _swap(folder: Path) -> None:
    lines = _lines(folder)
    lines[2], lines[7] = lines[7], lines[2]
    _write(folder, lines)


def _add_line(folder: Path) -> None:
    _write(folder, [*_lines(folder), _lines(folder)[0]])


def _comment_and_blank(folder: Path) -> None:
    lines = _lines(folder)
    _write(folder, ["# a comment", *lines[:5], "", *lines[5:]])


def _as_csv(folder: Path) -> None:
    _write(folder, [line.replace(" ", ",") for line in _lines(folder)])


def _add_file(folder: Path) -> None:
    shutil.copy(folder / "c1" / "0000.png", folder / "c1" / "0100.png")


def _rename_file(folder: Path) -> None:
    (folder / "c2" / "0003.png").rename(folder / "c2" / "0003b.png")


def _rename_class(folder: Path) -> None:
    (folder / "c3").rename(folder / "d3")


def _array_change(name: str, where: int, how: Callable[[np.ndarray], np.ndarray] | None = None) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        a = np.load(folder / name)
        if how is not None:
            a = how(a)
        else:
            a = a.copy()
            flat = a.reshape(-1)
            flat[where] = flat[where] + 1
        np.save(folder / name, a)
    return change


class Row(NamedTuple):
    name: str
    kind: str
    change: Callable[[Path], None]
    refused: bool


ROWS = [
    Row("list file: a label", "list", _relabel, True),
    Row("list file: a path", "list", _repath, True),
    Row("list file: two lines swapped", "list", _swap, True),
    Row("list file: a line added", "list", _add_line, True),
    Row("list file: comments and blank lines", "list", _comment_and_blank, False),
    Row("list file: the same lines as CSV", "list", _as_csv, False),
    Row("class folders: a file added", "folders", _add_file, True),
    Row("class folders: a file renamed", "folders", _rename_file, True),
    Row("class folders: a class renamed", "folders", _rename_class, True),
    Row("arrays: x in its first 64 KiB", "arrays", _array_change("x.npy", 5), True),
    Row("arrays: x in its last 64 KiB", "arrays", _array_change("x.npy", -5), True),
    Row("arrays: a label", "arrays", _array_change("y.npy", 7), True),
    Row("arrays: x as float64", "arrays", _array_change("x.npy", 0, lambda a: a.astype(np.float64)), True),
    Row("arrays: x reshaped", "arrays", _array_change("x.npy", 0, lambda a: a.reshape(ROWS_OF_X, 4, 4)), True),
    Row("ragged: the offsets", "ragged", _array_change("offsets.npy", 0,
                                                       lambda o: np.concatenate([[0], o[1:-1] + 1, o[-1:]])), True),
    Row("ragged: values in the last 64 KiB", "ragged", _array_change("values.npy", -3), True),
    # The same samples in another folder (every row's copy is): the state resumes.
    Row("arrays: the same files moved", "arrays", lambda folder: None, False),
    Row("ragged: the same files moved", "ragged", lambda folder: None, False),
    Row("class folders: the same files moved", "folders", lambda folder: None, False),
]


def _make(kind: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """The data set of `kind` in `folder`: (what --data names, the other flags it needs)."""
    if kind == "list":
        return unique_label_list(folder, 12, size=(16, 12)), ("--size", "8x8")
    if kind == "folders":
        return color_classes(folder, 4, size=8), ("--size", "8x8")
    if kind == "arrays":
        folder.mkdir(parents=True)
        np.save(folder / "x.npy", np.arange(ROWS_OF_X * 16, dtype=np.float32).reshape(ROWS_OF_X, 16))
        np.save(folder / "y.npy", np.arange(ROWS_OF_X, dtype=np.int64) % 10)
        return folder / "x.npy", ("--labels", str(folder / "y.npy"))
    folder.mkdir(parents=True)
    offsets = np.arange(0, 4 * 20_000 + 1, 4, dtype=np.int64)  # 20,000 sequences of 4: 320 KiB of values
    np.save(folder / "values.npy", np.arange(offsets[-1], dtype=np.int32))
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "y.npy", np.zeros(len(offsets) - 1, dtype=np.int64))
    return folder / "values.npy", ("--offsets", str(folder / "offsets.npy"), "--labels", str(folder / "y.npy"),
                                   "--maxlen", "4")


ARGS = ("--batch-size", "4", "--workers", "1")


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Path, dict[str, Any]]]]:
    """Per kind: the original data folder and the state a client saved on it after one batch."""
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    servers = []
    try:
        for kind in ("list", "folders", "arrays", "ragged"):
            folder = tmp_path_factory.mktemp(kind) / "data"
            data, flags = _make(kind, folder)
            server = RunningServer(data, "--heartbeat-s", "0.2", *ARGS, *flags,
                                   endpoint=f"ipc://{folder.parent}/s.sock", log=folder.parent / "server.log")
            servers.append(server)
            server.wait_ready(SERVER_READY_TIMEOUT_S)
            with LoaderClient(server.endpoint, timeout_s=30) as client:
                client.next()
                state = client.state_dict()
                rest = [y.copy() for _, y in client.epoch()]
            out[kind] = (folder, {"state": state, "rest": rest})
        yield out
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_changed_data_set_refuses_a_saved_state_and_an_equal_one_resumes_it(
        start_server: Any, originals: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path, row: Row) -> None:
    original, saved = originals[row.kind]
    copy = tmp_path / "data"
    shutil.copytree(original, copy)
    data, flags = _relocate(row.kind, copy)
    row.change(copy)
    server = start_server(data, *ARGS, *flags)
    if row.refused:
        with pytest.raises(ConfigError, match="cannot resume: the data set index") as info:
            LoaderClient(server.endpoint, timeout_s=30, state=saved["state"])
        assert "batch settings" not in str(info.value)
    else:
        with LoaderClient(server.endpoint, timeout_s=30, state=saved["state"]) as client:
            rest = [y.copy() for _, y in client.epoch()]
        assert len(rest) == len(saved["rest"]) and all(np.array_equal(a, b) for a, b in zip(rest, saved["rest"],
                                                                                              strict=True))


def _relocate(kind: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """What --data names and the other flags for the copy of a `kind` data set in `folder`."""
    if kind == "list":
        return folder / "train.txt", ("--size", "8x8")
    if kind == "folders":
        return folder, ("--size", "8x8")
    if kind == "arrays":
        return folder / "x.npy", ("--labels", str(folder / "y.npy"))
    return folder / "values.npy", ("--offsets", str(folder / "offsets.npy"), "--labels", str(folder / "y.npy"),
                                   "--maxlen", "4")
