"""Data set index: list files, class folders, and every bad-input case with its message."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from loader_client.errors import ConfigError
from loader_server.cli import main
from loader_server.index import load_index


def test_list_file_formats_comments_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    listfile = tmp_path / "sub" / "list.txt"
    listfile.write_text(
        "# a comment\n"
        "\n"
        "a.jpg 3\n"
        "b.jpg,4\n"
        "c d.jpg 5\n"  # a path with a space, whitespace format
        "e.jpg, 6\n"
        "   f.jpg\t7   \n"
        "/abs/g.jpg 8\n"
    )
    index = load_index(listfile)
    assert len(index) == 6
    assert index.labels.tolist() == [3, 4, 5, 6, 7, 8]
    root = str((tmp_path / "sub").resolve())
    assert [index.path(i) for i in range(6)] == [
        f"{root}/a.jpg", f"{root}/b.jpg", f"{root}/c d.jpg", f"{root}/e.jpg", f"{root}/f.jpg", "/abs/g.jpg",
    ]
    assert index.class_names is None


def test_csv_header_is_skipped(tmp_path: Path) -> None:
    listfile = tmp_path / "list.csv"
    listfile.write_text("path,label\nx.png,1\n")
    index = load_index(listfile)
    assert index.labels.tolist() == [1]


def test_index_is_compact_numpy(tmp_path: Path) -> None:
    listfile = tmp_path / "list.txt"
    listfile.write_text("".join(f"dir/{i}.jpg {i % 7}\n" for i in range(1000)))
    index = load_index(listfile)
    assert index.labels.dtype == np.int64 and index.offsets.dtype == np.int64
    assert index.blob.dtype == np.uint8
    assert index.blob.nbytes == sum(len(f"dir/{i}.jpg") for i in range(1000))
    assert index.fingerprint() == load_index(listfile).fingerprint()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.jpg 1\nlonely\n", r"list.txt:2: malformed line 'lonely'"),
        ("a.jpg 1\n\nb.jpg one\n", r"list.txt:3: label 'one' is not an integer in line 'b.jpg one'"),
        ("a.jpg 1.5\n", r"list.txt:1: label '1.5' is not an integer"),
        ("a.jpg,\n", r"list.txt:1: malformed line"),
        ("# only comments\n\n", r"holds no samples"),
        ("", r"holds no samples"),
    ],
)
def test_bad_list_files_name_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    listfile = tmp_path / "list.txt"
    listfile.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_index(listfile)


def test_missing_data_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_index(tmp_path / "nope.txt")


def test_class_folders_sorted_with_extension_filter(tmp_path: Path) -> None:
    for cls, names in {"zebra": ["1.jpg", "2.PNG", "notes.txt"], "ant": ["b.webp", "a.jpeg"], "bee": ["x.bmp"]}.items():
        (tmp_path / cls).mkdir()
        for n in names:
            (tmp_path / cls / n).write_bytes(b"not opened at start-up")
    (tmp_path / ".hidden").mkdir()
    index = load_index(tmp_path)
    assert index.class_names == ("ant", "bee", "zebra")
    assert [os.path.relpath(index.path(i), tmp_path) for i in range(len(index))] == [
        "ant/a.jpeg", "ant/b.webp", "bee/x.bmp", "zebra/1.jpg", "zebra/2.PNG",
    ]
    assert index.labels.tolist() == [0, 0, 1, 2, 2]


def test_folder_without_classes_or_images(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no class sub-folders"):
        load_index(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds no images"):
        load_index(tmp_path)


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        (None, [], "does not exist"),
        ("a.jpg 1\nbad line here x\n", [], "list.txt:2: label 'x' is not an integer"),
        ("a.jpg 1\nb.jpg 2\n", ["--batch-size", "3"], "`batch_size` 3 is larger than the data set (2 samples"),
        ("a.jpg 1\n", ["--size", "224"], "`size` must look like WIDTHxHEIGHT"),
        ("a.jpg 1\n", ["--workers", "0"], "`workers` must be >= 1, got 0"),
        ("a.jpg 1\n", ["--mean", "0.5,0.5,0.5"], "`mean` needs --dtype float32"),
    ],
)
def test_serve_exits_2_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str | None, args: list[str], expected: str
) -> None:
    listfile = tmp_path / "list.txt"
    if setup is not None:
        listfile.write_text(setup)
    code = main(["serve", "--data", str(listfile), "--bind", f"ipc://{tmp_path}/s.sock", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("loader-server: error: ")
    assert expected in err


def test_fast_and_careful_parsers_agree(tmp_path: Path) -> None:
    from loader_server import index as index_module

    plain = "".join(f"d/{i}.jpg {i * 3}\n" for i in range(500))
    fast = index_module._parse_plain(plain.encode())
    assert fast is not None
    (tmp_path / "a.txt").write_text(plain)
    (tmp_path / "b.txt").write_text("# same samples, through the careful parser\n" + plain)
    a, b = load_index(tmp_path / "a.txt"), load_index(tmp_path / "b.txt")
    assert a.fingerprint() == b.fingerprint()
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("text", ["x 1 2\n3\n", "a 1\n\nb 2\n", " a 1\n", "a 1 \nb 2\n", "a\t1\r\nb 2\r\n"])
def test_fast_parser_defers_anything_unusual(text: str) -> None:
    from loader_server import index as index_module

    assert index_module._parse_plain(text.encode()) is None


def test_three_tokens_and_one_token_lines_are_caught(tmp_path: Path) -> None:
    listfile = tmp_path / "list.txt"
    listfile.write_text("x 1 2\n3\n")  # a path with a space, then a line without a label
    with pytest.raises(ConfigError, match=r"list.txt:2: malformed line '3'"):
        load_index(listfile)
