"""Data set index: list files, class folders, and every bad-input case with its message."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client.contract.errors import ConfigError
from loader_server.cli import main
from loader_server.data.index import load_index


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


@pytest.mark.parametrize("text", ["a.jpg 1\nb.jpg 2\n", "path,label\na.jpg,1\nb.jpg,2\n", "a b.jpg 1\nb.jpg, 2\n"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_path(tmp_path: Path, text: str) -> None:
    """Notepad and Excel's "CSV UTF-8" start a list file with a BOM: the first path must not begin with U+FEFF
    (it was then reported missing under a name that looked right), and the index is that of the same file without."""
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text)
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    a, b = load_index(plain), load_index(marked)
    assert [a.path(i) for i in range(len(a))] == [b.path(i) for i in range(len(b))]
    assert not b.path(0).rsplit("/", 1)[1].startswith("\ufeff") and b.labels.tolist() == [1, 2]
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_utf16_list_file_is_refused_by_name(tmp_path: Path, encoding: str) -> None:
    listfile = tmp_path / "list.txt"
    listfile.write_bytes(("\ufeff" if encoding.endswith("-be") else "").encode(encoding) + "a.jpg 1\n".encode(encoding))
    with pytest.raises(ConfigError, match=rf"list file {re.escape(str(listfile))} is UTF-16 or UTF-32 text .*save it "
                                          r"as UTF-8, for example with `iconv -f UTF-16 -t UTF-8"):
        load_index(listfile)


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
        ("a.jpg 0\nb.jpg 9223372036854775808\n", r"list.txt:2: label '9223372036854775808' does not fit a 64-bit "
                                                   r"integer"),
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
    with pytest.raises(ConfigError, match=r"holds no images .* in its class sub-folders \(expected .*/<class>/<image "
                                          r"files>\)$"):  # a readme is no list file to suggest
        load_index(tmp_path)


def test_a_parent_folder_of_list_files_is_answered_with_them(tmp_path: Path) -> None:
    """`--data /data` where the data set is /data/corpus/train.txt (with images in its class folders)."""
    for name in ("corpus", "large"):
        (tmp_path / name / "class_0").mkdir(parents=True)
        (tmp_path / name / "class_0" / "0.jpg").write_bytes(b"x")
        (tmp_path / name / "train.txt").write_text("# images\nclass_0/0.jpg 0\n")
    (tmp_path / "large" / "notes.txt").write_text("not a list\n")
    with pytest.raises(ConfigError) as err:
        load_index(tmp_path)
    assert str(err.value).endswith(f"; for a list file pass it: --data {tmp_path}/corpus/train.txt or --data "
                                   f"{tmp_path}/large/train.txt")


def test_class_folders_beside_a_list_file_are_served_with_a_warning_naming_it(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A data set's folder that holds its class folders and its splits' list files (shared/corpus with train.txt):
    --data FOLDER serves every class folder, so a warning names the list files not read (a train split's
    list would otherwise be mixed silently with the rest)."""
    (tmp_path / "class_0").mkdir()
    for n in range(3):
        (tmp_path / "class_0" / f"{n}.jpg").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="loader_server"):
        assert len(load_index(tmp_path)) == 3
    assert not caplog.records  # no list file: nothing to say
    (tmp_path / "train.txt").write_text("class_0/0.jpg 0\nclass_0/1.jpg 0\n")
    (tmp_path / "val.csv").write_text("path,label\nclass_0/2.jpg,0\n")
    (tmp_path / "notes.txt").write_text("not a list\n")
    with caplog.at_level("WARNING", logger="loader_server"):
        assert len(load_index(tmp_path)) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path} is served as class folders (3 images in 1 class); the list files {tmp_path}/train.txt, "
        f"{tmp_path}/val.csv beside them are not read: to serve only what one lists, pass it as --data"]


@pytest.mark.parametrize(
    ("setup", "args", "expected"),
    [
        (None, [], "does not exist: give a list file of `path label` lines, a folder of class sub-folders, tar "
                   "shards ('shards/train-{000000..000099}.tar'), Parquet tables ('train-*.parquet') or numpy arrays"),
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
    from loader_server.data import index as index_module

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
    from loader_server.data import index as index_module

    assert index_module._parse_plain(text.encode()) is None


def test_three_tokens_and_one_token_lines_are_caught(tmp_path: Path) -> None:
    listfile = tmp_path / "list.txt"
    listfile.write_text("x 1 2\n3\n")  # a path with a space, then a line without a label
    with pytest.raises(ConfigError, match=r"list.txt:2: malformed line '3'"):
        load_index(listfile)


# Indexing errors of the file system, permissions first: a container's non-root user meets a
# data folder of mode 0700 that belongs to another user. As root chmod stops nobody, so the
# CLI runs as user 65534 (nobody); as another user, modes 000 stop that user itself.
OTHER_UID = 65534


@pytest.fixture
def shared_tree() -> Iterator[Path]:
    """A folder every user can enter (tmp_path lies under a 0700 folder of the test's user)."""
    root = Path(tempfile.mkdtemp(prefix="loader-perm-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


def _open_to_all(path: str) -> bool:
    """True when every user may reach `path` (each folder above it searchable, the path itself readable)."""
    real = Path(path).resolve()
    try:
        return all(os.stat(d).st_mode & 0o001 for d in real.parents) and bool(os.stat(real).st_mode & 0o004)
    except OSError:
        return False


def run_as_another_user(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI as OTHER_UID (as root), or as this user; returns the result and the uid it ran as."""
    kw: dict[str, Any] = {}
    uid = os.getuid()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADER_", "PYTHON"))}
    env.update(HOME=str(cwd), PYTHONDONTWRITEBYTECODE="1")
    python = sys.executable
    if uid == 0:
        kw = {"user": OTHER_UID, "group": OTHER_UID, "extra_groups": []}
        uid = OTHER_UID
        # The test's interpreter may live where only root goes (a pyenv under /root): then the same
        # Python version from /usr/bin runs the same code and packages, found through PYTHONPATH.
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        python = next((exe for exe in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}")
                       if os.path.exists(exe) and _open_to_all(exe)), "")
        if not python:
            pytest.skip(f"no {version} interpreter that user {OTHER_UID} may run")
        paths = [str(Path(__file__).resolve().parent.parent)] + [p for p in sys.path if p.endswith("-packages")]
        if not all(_open_to_all(p) for p in paths):
            # The packages live where only root goes (CI: a pyenv under /root): run the CLI in a
            # forked child of this process that becomes that user, with every module loaded here.
            return _run_forked_as(OTHER_UID, cwd, list(args)), uid
        env["PYTHONPATH"] = os.pathsep.join(paths)
    result = subprocess.run([python, "-m", "loader_server", *args], capture_output=True, text=True,
                            timeout=60, cwd=cwd, env=env, **kw)
    return result, uid


_AS_ANOTHER_USER = """
import importlib, os, pkgutil, sys
uid, cwd, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
import loader_client, loader_server
for package in (loader_server, loader_client):  # every module, and what they import, while root may read it
    for found in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not found.name.endswith(("__main__", ".keras", ".torch")):
            importlib.import_module(found.name)
import cv2, encodings.idna, glob, multiprocessing.pool, multiprocessing.popen_fork, multiprocessing.queues
import multiprocessing.synchronize, simplejpeg, tqdm
loader_server.cli.build_parser()  # imports what every command's flags need
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
os.chdir(cwd)
sys.exit(loader_server.cli.main(args))
"""


def _run_forked_as(uid: int, cwd: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    """`loader-server ARGS` run by `main()` in a fresh interpreter of root's that loads every module it
    needs, then drops root for `uid` (a fork of this test process could inherit a lock that one of its
    threads held, such as tqdm's monitor's, and hang)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-c", _AS_ANOTHER_USER, str(uid), str(cwd), *args], capture_output=True,
                          text=True, timeout=60, env=env)


def lock(path: Path) -> None:
    """Mode 0700 (root's, as another user meets it) or, when the tests do not run as root, 000."""
    path.chmod(0o700 if os.getuid() == 0 else 0)


def _images(root: Path) -> Path:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(b"not opened at start-up")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


@pytest.mark.parametrize(("case", "command"), [
    ("folder inside a locked folder", "serve"), ("folder inside a locked folder", "check"),
    ("locked data folder", "serve"), ("locked class sub-folder", "serve"), ("unreadable list file", "check"),
    ("unreadable arrays", "serve"),
])
def test_unreadable_data_exits_2_naming_path_and_user(shared_tree: Path, case: str, command: str) -> None:
    if case == "folder inside a locked folder":
        data = _images(shared_tree / "private" / "images")
        (shared_tree / "private").chmod(0o755)
        lock(shared_tree / "private")
        blocker = shared_tree / "private"
        what, verb = "data set", "does not let this user in"
        named = data
    elif case == "locked data folder":
        data = blocker = _images(shared_tree / "images")
        lock(data)
        what, verb, named = "data folder", "cannot be read by this user", data
    elif case == "locked class sub-folder":
        data = _images(shared_tree / "images")
        named = blocker = data / "dog"
        lock(named)
        what, verb = "data folder", "cannot be read by this user"
    elif case == "unreadable list file":
        data = named = blocker = shared_tree / "train.txt"
        data.write_text("a.jpg 0\n")
        data.chmod(0o600 if os.getuid() == 0 else 0)
        what, verb = "list file", "cannot be read by this user"
    else:
        np.save(shared_tree / "x.npy", np.zeros((4, 2), np.float32))
        np.save(shared_tree / "y.npy", np.arange(4))
        data = named = blocker = shared_tree / "x.npy"
        (shared_tree / "y.npy").chmod(0o644)
        data.chmod(0o600 if os.getuid() == 0 else 0)
        what, verb = "inputs", "cannot be read by this user"
    extra = ["--labels", str(shared_tree / "y.npy")] if data.suffix == ".npy" else []
    args = ["serve", "--print-config", "--batch-size", "2"] if command == "serve" else ["check", "--workers", "1"]
    result, uid = run_as_another_user(shared_tree, *args, "--data", str(data), *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "Traceback" not in err
    assert f"cannot read {what} {str(named)!r}: permission denied for user id {uid}" in err, err
    mode = "0700" if os.getuid() == 0 and blocker.is_dir() else "0600" if os.getuid() == 0 else "0000"
    assert f"{str(blocker)!r} (mode {mode}, owner uid {os.getuid()}) {verb}" in err, err


@pytest.mark.parametrize("report", [None, "given"])
def test_check_in_a_folder_it_cannot_write_keeps_the_summary_and_names_its_report(shared_tree: Path,
                                                                                  report: str | None) -> None:
    """`check` as a user who cannot write the current folder (as uid 10001 in the image's /app): the summary
    is printed, and the report goes to a temporary file that the summary names."""
    data = _images(shared_tree / "images")
    for path in (data / "cat").iterdir():
        path.write_bytes(b"")  # three bad files: empty
    listed = sorted(str(p) for p in (data / "cat").iterdir())
    args = ["check", "--workers", "1", "--data", str(data)]
    if report:
        args += ["--report", str(shared_tree / "bad.tsv")]  # a folder this user may not write either
    result, uid = run_as_another_user(shared_tree, *args)
    if uid == os.getuid():
        pytest.skip("needs root: as root the check runs as another user in a folder it cannot write")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "checked 6 samples" in result.stdout and ": 6 bad" in result.stdout  # the summary
    shown = re.search(r"the bad files and their reasons are in (\S+);", result.stdout)
    assert shown, result.stdout
    where = Path(shown.group(1))
    try:
        assert where.parent != shared_tree and where.is_file()
        assert sorted(line.split("\t")[0] for line in where.read_text().splitlines())[:3] == listed
        target = shared_tree / "bad.tsv" if report else "bad-files.tsv"
        assert f"cannot write {target} (Permission denied for user id {uid})" in result.stderr, result.stderr
    finally:
        where.unlink(missing_ok=True)
