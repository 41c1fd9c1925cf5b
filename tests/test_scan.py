"""Failing early: the start-up scan stats every file of the data set and names the missing or unreadable ones
before the first batch (exit 2, or the bad-file policy), instead of mid-epoch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import loader_client
from loader_client import ConfigError, LoaderClient, server_stats
from loader_server.config import ServerConfig
from loader_server.data.scan import startup_scan

from .conftest import unique_label_list

#: README: "`--scan` / `--no-scan` | auto: on up to 100,000 files" (written out: never the code's constant).
AUTO_SCAN_FILES = 100_000


def broken_list(root: Path, n: int = 16) -> tuple[Path, list[str]]:
    """A list file whose samples 1, 6 and 11 are missing, empty and a folder."""
    listfile = unique_label_list(root, n)
    lines = listfile.read_text().splitlines()
    bad = [str(root / lines[i].split()[0]) for i in (1, 6, 11)]
    Path(bad[0]).unlink()
    Path(bad[1]).write_bytes(b"")
    Path(bad[2]).unlink()
    Path(bad[2]).mkdir()
    return listfile, bad


def test_raise_mode_exits_2_naming_every_missing_or_unreadable_file(tmp_path: Path) -> None:
    listfile, bad = broken_list(tmp_path / "data")
    result = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--data", str(listfile), "--batch-size",
                             "4", "--size", "8x8", "--workers", "1", "--bind", f"ipc://{tmp_path}/s.sock"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr
    assert "the start-up scan found 3 of the 16 files" in err and "Traceback" not in err
    for path, reason in zip(bad, ("file not found", "empty file", "is a directory"), strict=True):
        assert f"{path} ({reason})" in err, err
    assert "--no-scan" in err and "--on-error skip" in err
    assert not (tmp_path / "s.sock").exists()  # it never bound


@pytest.mark.parametrize("files_in_cwd", [True, False])
def test_a_list_file_whose_relative_paths_are_read_from_the_wrong_folder_says_so(tmp_path: Path,
                                                                                 files_in_cwd: bool) -> None:
    """A list file written beside the images' parent, moved elsewhere: every file is missing, and the error says
    from which folder relative paths are read (and, where they lie, that the current folder holds them)."""
    listfile = unique_label_list(tmp_path / "data", 6)
    moved = tmp_path / "lists" / "train.txt"
    moved.parent.mkdir()
    listfile.rename(moved)
    result = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--data", str(moved), "--batch-size",
                             "2", "--size", "8x8", "--workers", "1", "--bind", f"ipc://{tmp_path}/s.sock"],
                            capture_output=True, text=True, timeout=120,
                            cwd=tmp_path / "data" if files_in_cwd else tmp_path, env={**os.environ, "PYTHONPATH": str(
                                Path(__file__).resolve().parent.parent)})
    assert result.returncode == 2, result.stdout + result.stderr
    hint = f"(relative paths in a list file are read from its folder, {moved.parent}"
    if files_in_cwd:
        hint += ", not from the current folder, where img/00000.png is: write the paths relative to the list file"
    else:
        hint += ")"
    assert "found 6 of the 6 files" in result.stderr and hint in result.stderr, result.stderr


def test_local_server_fails_at_once_naming_the_files(tmp_path: Path) -> None:
    listfile, bad = broken_list(tmp_path / "data")
    with pytest.raises(ConfigError, match="the start-up scan found 3 of the 16 files") as info:
        loader_client.local_server(data=listfile, batch_size=4, size="8x8", workers=1)
    assert all(path in str(info.value) for path in bad)


def test_skip_mode_counts_them_logs_them_once_and_never_delivers_them(start_server: Any, tmp_path: Path) -> None:
    listfile, bad = broken_list(tmp_path / "data")
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--on-error", "skip",
                          "--max-bad", "3")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        labels = np.concatenate([y for _ in range(2) for _, y in client.epoch()])
        assert not set(labels.tolist()) & {1, 6, 11}
        stats = server_stats(server.endpoint)
    assert stats["bad_files"] == 3 and stats["errors_by_reason"] == {"not_found": 1, "empty": 1, "is_directory": 1}
    log = server.log_text()
    assert log.count("the start-up scan found 3 of the 16 files") == 1
    assert not any(f"bad file {path}:" in log for path in bad)  # named once, by the scan


def test_skip_mode_beyond_max_bad_exits_2(start_server: Any, tmp_path: Path) -> None:
    listfile, _ = broken_list(tmp_path / "data")
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--on-error", "skip",
                          "--max-bad", "2", ready=False, expect_exit=2)
    assert server.proc.wait(60) == 2
    assert re.search(r"3 exceed --max-bad \(2\)", server.log_text()), server.log_text()


def test_no_scan_meets_them_mid_epoch(start_server: Any, tmp_path: Path) -> None:
    listfile, bad = broken_list(tmp_path / "data")
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--no-scan")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(loader_client.BadSampleError) as info:
            client.next()
    assert info.value.path == bad[0]


class _ManyFiles:
    """A data set of `n` files that do not exist (a FileDataset, as the scan sees one)."""

    build = "decode"
    class_names = None
    source = "many.txt"

    def __init__(self, n: int) -> None:
        self.n = n
        self.labels = np.zeros(n, np.int64)

    def __len__(self) -> int:
        return self.n

    def path(self, i: int) -> str:
        return f"/nonexistent/loader-scan-test/{i}.jpg"

    def describe(self, i: int) -> str:
        return self.path(i)

    def read(self, i: int, max_bytes: int | None = None) -> bytes:
        raise AssertionError("the scan reads nothing")

    def version(self, i: int) -> None:
        return None

    def fingerprint(self) -> str:
        return "0" * 16

    def location(self) -> str:
        return "/nonexistent/loader-scan-test"


def test_the_default_scans_data_sets_up_to_the_limit_only() -> None:
    small, large = _ManyFiles(10), _ManyFiles(AUTO_SCAN_FILES + 1)
    with pytest.raises(ConfigError, match="found 10 of the 10 files of many.txt"):
        startup_scan(ServerConfig(data="x"), small)  # auto: scanned
    with pytest.raises(ConfigError, match=f"found {AUTO_SCAN_FILES} of the {AUTO_SCAN_FILES} files"):
        startup_scan(ServerConfig(data="x"), _ManyFiles(AUTO_SCAN_FILES))  # auto, at the limit: scanned
    assert startup_scan(ServerConfig(data="x"), large) == []  # auto: too many to stat at every start
    assert startup_scan(ServerConfig(data="x", scan=False), small) == []
    with pytest.raises(ConfigError, match=f"found {AUTO_SCAN_FILES + 1} of the"):
        startup_scan(ServerConfig(data="x", scan=True), large)  # asked for: scanned whatever the size


def test_help_says_what_the_default_is() -> None:
    result = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "300"})
    text = " ".join(result.stdout.split())
    assert f"(default: auto: on up to {AUTO_SCAN_FILES:,} files)" in text, text
