"""The decoded-sample cache as an attack surface: who may own and write it, who may read it,
what its key names, and what a truncation under a running server does.

Real processes and real users: the attacker is user 65534 (nobody), a forked child of the test
that drops root before it touches anything (so it reads the modules already loaded here); the
file systems of the data sets and of a full disk are real tmpfs mounts made and removed here.
The tests that need another user or a mount are skipped when the suite does not run as root.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, server_stats
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.launch import ServerProcessError
from loader_server.options import DecodeOptions, options_of
from loader_server.pipeline.batch import BatchBuilder
from loader_server.pipeline.cache import CacheLayout, cache_key, open_cache

from .conftest import unique_label_list, wait_until, write_image

N = 24
BATCH = 8
SIZE = "24x20"
TIMEOUT_S = 60.0
NOBODY = 65534
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user (65534) and tmpfs mounts")


def _config(data: Path | str, cache: Path | str | None, **kw: Any) -> ServerConfig:
    kw.setdefault("size", (24, 20))
    return ServerConfig(data=str(data), batch_size=BATCH, cache=None if cache is None else str(cache), **kw)


def _cli(*args: str, timeout_s: float = TIMEOUT_S, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True, check=False,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, **kw)


def as_user(uid: int, fn: Callable[..., None], *args: Any) -> None:
    """Run `fn(*args)` in a forked child that becomes `uid` (group `uid`, no other groups) first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn(*args)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{fn.__name__} as uid {uid} failed"


def _opens(path: str) -> str:
    """What opening `path` for reading gives this process: "read N bytes" or the error's name."""
    try:
        with open(path, "rb") as f:
            return f"read {len(f.read())} bytes"
    except OSError as exc:
        return type(exc).__name__


def _check_opens_as_nobody(path: str, expected: str) -> None:
    got = _opens(path)
    assert got == expected, f"user {NOBODY} opening {path}: {got} (expected {expected})"


# ---------------------------------------------------------------------------- planting a cache
def _poisoned_cache(config: ServerConfig, value: int) -> bytes:
    """A complete cache file for `config` (format 2) in which every record is valid and all `value`.

    Everything it needs is public: the data set's names and labels, each file's size, mtime,
    inode and device (any user who can list the data can stat it), and the key (a hash of those
    and of the decode settings; `stats` names the file).
    """
    index = load_dataset(config)
    layout = CacheLayout(len(index), options_of(config, DecodeOptions).record_shape)
    key = cache_key(config, index)
    out = bytearray(layout.total_bytes)
    out[: len(layout.header(key))] = layout.header(key)
    for i in range(len(index)):
        version = index.version(i)  # type: ignore[attr-defined]
        struct.pack_into("<Q4q", out, layout.meta_offset + i * 40, 2, *version)
    out[layout.records_offset :] = bytes([value]) * (layout.total_bytes - layout.records_offset)
    return bytes(out)


def _cache_name(config: ServerConfig) -> str:
    index = load_dataset(config)
    return f"loader-cache-{cache_key(config, index)}.bin"


def _plant(folder: str, name: str, data: bytes, folder_mode: int | None) -> None:
    """The attacker: make `folder` (with `folder_mode`) unless it exists, and write `name` there."""
    if folder_mode is not None:
        os.mkdir(folder, folder_mode)
        os.chmod(folder, folder_mode)  # whatever the umask
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def _serve_or_refuse(start_server: Any, data: Path, folder: Path) -> tuple[Any, str]:
    """Start `serve --cache folder`: ("refused", its log) if it exits; else count the attacker's
    images (all 255) among the samples of one epoch, and fail with that count."""
    server = start_server(data, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1", "--cache",
                          str(folder), ready=False, expect_exit=None)
    try:
        server.wait_ready(TIMEOUT_S)
    except ServerProcessError:
        if server.proc.poll() is None:
            raise
        return server, server.log_text()
    poisoned = served = 0
    with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
        for x, _ in client.epoch():
            served += len(x)
            poisoned += sum(int((row == 255).all()) for row in x)
    raise AssertionError(f"the server used a cache another user could write: {poisoned} of {served} served "
                         "images were the attacker's")


@ROOT_ONLY
def test_a_cache_folder_another_user_created_first_is_refused(start_server: Any, shared_tree: Path) -> None:
    listfile = unique_label_list(shared_tree / "data", N, size=(48, 36))  # public: 0755 folders, 0644 files
    (shared_tree / "tmp").mkdir()
    (shared_tree / "tmp").chmod(0o1777)  # like /tmp
    folder = shared_tree / "tmp" / "cache"  # the attacker makes it first
    config = _config(listfile, folder)
    as_user(NOBODY, _plant, str(folder), _cache_name(config), _poisoned_cache(config, 255), 0o755)
    server, log = _serve_or_refuse(start_server, listfile, folder)
    assert server.proc.returncode == 2, log
    assert f"--cache {folder}" in log and "nobody (uid 65534)" in log and "mode 0755" in log, log
    assert "a folder only you can write" in log and "Traceback" not in log, log
    # `cache build` meets the same refusal before it reads anything.
    done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(folder))
    assert done.returncode == 2 and "nobody (uid 65534)" in done.stderr and "Traceback" not in done.stderr, done.stderr


@ROOT_ONLY
def test_a_cache_file_planted_in_a_shared_sticky_folder_is_refused(start_server: Any, shared_tree: Path) -> None:
    listfile = unique_label_list(shared_tree / "data", N, size=(48, 36))
    folder = shared_tree / "tmp"
    folder.mkdir()
    folder.chmod(0o1777)  # like /tmp: anyone may create files, only their owner may remove them
    config = _config(listfile, folder)
    name = _cache_name(config)
    as_user(NOBODY, _plant, str(folder), name, _poisoned_cache(config, 255), None)
    server, log = _serve_or_refuse(start_server, listfile, folder)
    assert server.proc.returncode == 2, log
    assert "other users may write it (mode 1777" in log and "a folder only you can write" in log, log
    # The folder tightened afterwards: the file in it still belongs to the attacker.
    folder.chmod(0o755)
    server, log = _serve_or_refuse(start_server, listfile, folder)
    assert server.proc.returncode == 2, log
    assert f"{folder / name}" in log and "belongs to nobody (uid 65534)" in log and "remove it" in log, log
    assert "Traceback" not in log


@ROOT_ONLY
def test_the_cache_of_private_data_is_private_from_the_first_byte(tmp_path: Path) -> None:
    data = tmp_path / "private"
    listfile = unique_label_list(data, N, size=(48, 36))
    for path in [data, *data.rglob("*")]:
        path.chmod(0o700 if path.is_dir() else 0o600)
    shared = Path(tempfile.mkdtemp(prefix="loader-cache-private-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        folder = shared / "made" / "cache"
        # umask 0: what the process would otherwise give every user is what the cache must not.
        done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(folder),
                    "--workers", "1", preexec_fn=lambda: os.umask(0))
        assert done.returncode == 0, done.stderr
        files = list(folder.iterdir())
        assert [f.name for f in files] == [_cache_name(_config(listfile, folder))]  # no temporary file left
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        as_user(NOBODY, _check_opens_as_nobody, str(files[0]), "PermissionError")
        folder.chmod(0o755)  # even with the folder opened to all, the file itself is not readable
        as_user(NOBODY, _check_opens_as_nobody, str(files[0]), "PermissionError")
        # A cache an earlier version left readable to all is made private when it is opened.
        files[0].chmod(0o644)
        config = _config(listfile, folder)
        open_cache(config, load_dataset(config)).close()
        assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
        as_user(NOBODY, _check_opens_as_nobody, str(files[0]), "PermissionError")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ---------------------------------------------------------------------------- the key
def test_the_same_data_set_in_two_places_has_two_cache_keys(tmp_path: Path) -> None:
    a = unique_label_list(tmp_path / "a", N, size=(48, 36))
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copy2)  # names, labels, mtimes
    b = tmp_path / "b" / "train.txt"
    keys = {}
    for name, listfile in (("a", a), ("b", b)):
        config = _config(listfile, tmp_path / "cache")
        index = load_dataset(config)
        keys[name] = cache_key(config, index)
        assert index.fingerprint() == load_dataset(_config(a, None)).fingerprint()  # a resume may move sets
    assert keys["a"] != keys["b"]
    split = [_config(listfile, tmp_path / "c", subset="val", val_fraction=0.25) for listfile in (a, b)]
    assert cache_key(split[0], load_dataset(split[0])) != cache_key(split[1], load_dataset(split[1]))


def _tar_shard(path: Path, images: list[np.ndarray]) -> None:
    import cv2

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, img in enumerate(images):
            for suffix, data in ((".png", cv2.imencode(".bmp", img)[1].tobytes()), (".cls", str(i).encode())):
                info = tarfile.TarInfo(f"{i:05d}{suffix}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def _write_set(root: Path, kind: str, value: int) -> Path:
    """The same names, sizes and (later) mtimes in every copy; the pixels differ by `value`."""
    images = [np.full((36, 48, 3), (value + 7 * i) % 256, np.uint8) for i in range(N)]
    if kind == "tar":
        _tar_shard(root / "train-000.tar", images)
        return root / "train-000.tar"
    for i, img in enumerate(images):
        write_image(root / "img" / f"{i:05d}.bmp", img)  # uncompressed: the same size in every copy
    (root / "train.txt").write_text("".join(f"img/{i:05d}.bmp {i}\n" for i in range(N)))
    return root / "train.txt"


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, mode: str = "0700") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "none", str(where)],
                          capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=30)


@ROOT_ONLY
@pytest.mark.parametrize("kind", ["files", "tar"])
def test_two_data_sets_with_the_same_names_on_two_file_systems_share_no_record(tmp_path: Path, kind: str) -> None:
    """Fresh tmpfs mounts number their inodes alike: the two copies have equal relative names,
    sizes, mtimes and inodes, and differ only by their place (folder and file system)."""
    with _tmpfs(tmp_path / "one", "16m") as one, _tmpfs(tmp_path / "two", "16m") as two:
        data = {name: _write_set(root, kind, value) for name, root, value in (("one", one, 10), ("two", two, 130))}
        for f in sorted(one.rglob("*")):  # copied mtimes
            st = f.stat()
            os.utime(two / f.relative_to(one), ns=(st.st_atime_ns, st.st_mtime_ns))
        if kind == "tar":
            assert (one / "train-000.tar").stat().st_ino == (two / "train-000.tar").stat().st_ino
        served = {}
        for name in ("one", "two"):
            packed = {"index_dir": str(tmp_path / f"index-{name}")} if kind == "tar" else {}
            config = _config(data[name], tmp_path / "cache", **packed)
            index = load_dataset(config)
            cached = BatchBuilder(config, index, cache=open_cache(config, index))
            plain = BatchBuilder(_config(data[name], None), index)
            indices = np.arange(BATCH)
            got = cached.build(indices, cached.allocate())["x"].copy()
            served[name] = (got, plain.build(indices, plain.allocate())["x"].copy(), cached.cache_hits)
        got, expected, hits = served["two"]
        assert hits == 0 and np.array_equal(got, expected), \
            f"{hits} of {BATCH} samples of the second data set were served from the first one's records"
        assert len(list((tmp_path / "cache").glob("loader-cache-*.bin"))) == 2


# ---------------------------------------------------------------------------- truncation
def _epoch_rows(server: Any) -> dict[int, np.ndarray]:
    rows = {}
    with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
        for x, _ in client.epoch():
            for row, i in zip(x, client.last.indices, strict=True):
                rows[int(i)] = row.copy()
    return rows


def _memfd_of(pid: int) -> str:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:loader-sample-cache"):
                return f"/proc/{pid}/fd/{fd}"
    raise AssertionError(f"no memfd of the sample cache in process {pid}")


@pytest.mark.parametrize("where", ["folder", "memory"])
def test_a_cache_truncated_under_a_running_server_kills_nothing(start_server: Any, tmp_path: Path,
                                                                where: str) -> None:
    listfile = unique_label_list(tmp_path / "data", N, size=(48, 36))
    folder = tmp_path / "cache"
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2", "--cache",
                          "memory" if where == "memory" else str(folder), "--log-interval-s", "0.2")
    workers = sorted(server.workers())
    expected = _epoch_rows(server)  # every record filled
    wait_until(lambda: server_stats(server.endpoint, timeout_s=10)["cache"]["filled"] == N, 10,
               "every record filled")  # rescanned every 2 s
    if where == "memory":
        path = _memfd_of(server.pid)  # the same uid can open it; the seals refuse any change of size
        with pytest.raises(PermissionError):
            os.truncate(path, 0)
        with pytest.raises(PermissionError):
            os.truncate(path, 4096 * 3)
        sizes = [0]
    else:
        (path,) = [str(p) for p in folder.glob("loader-cache-*.bin")]
        size = os.stat(path).st_size
        sizes = [0, size // 2, size - 1]  # everything, then half the records, then the last page
    for cut in sizes:
        if where == "folder":
            os.truncate(path, cut)  # by the owner: no other user may write it
        time.sleep(0.5)  # log lines and metrics of the server scan the states meanwhile
        got = _epoch_rows(server)
        assert sorted(got) == list(range(N))
        for i in range(N):
            assert np.array_equal(got[i], expected[i]), f"sample {i} after a truncation to {cut} bytes"
        stats = server_stats(server.endpoint, timeout_s=10)
        assert stats["cache"]["filled"] <= N
    assert server.proc.poll() is None and sorted(server.workers()) == workers  # no worker died or restarted
    if where == "folder":  # every process stopped using it, and said so
        assert stats["cache"]["damaged"] and stats["cache"]["filled"] == 0
        log = server.log_text()
        assert f"the sample cache {path} shrank under the running server" in log, log
    assert server.stop() == 0
    if where == "folder":  # the next start replaces it with a sound, empty one
        config = _config(listfile, folder)
        index = load_dataset(config)
        cache = open_cache(config, index)
        assert os.stat(path).st_size == size and cache.filled(0) == 0 and not cache.damaged
        builder = BatchBuilder(config, index, cache=cache)
        builder.build(np.arange(BATCH), builder.allocate())
        assert cache.filled(0) == BATCH
        cache.close()


# ---------------------------------------------------------------------------- small edges
@pytest.mark.parametrize("plant", ["fifo", "dangling link", "link to a file", "folder"])
def test_what_sits_under_the_cache_name_is_named_in_a_clear_error(tmp_path: Path, plant: str) -> None:
    listfile = unique_label_list(tmp_path / "data", N, size=(48, 36))
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    path = folder / _cache_name(_config(listfile, folder))
    if plant == "fifo":
        os.mkfifo(path, 0o600)
        expected = "not a regular file (a FIFO)"
    elif plant == "dangling link":
        path.symlink_to(tmp_path / "nowhere")
        expected = f"a symbolic link (to {tmp_path / 'nowhere'})"
    elif plant == "link to a file":
        (tmp_path / "elsewhere").write_bytes(b"x")
        path.symlink_to(tmp_path / "elsewhere")
        expected = "a symbolic link"
    else:
        path.mkdir()
        expected = "not a regular file (a folder)"
    done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(folder), timeout_s=30)
    assert done.returncode == 2, done.stderr
    assert str(path) in done.stderr and expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "vanished" not in done.stderr, done.stderr
    assert "remove it" in done.stderr


@ROOT_ONLY
def test_a_full_disk_is_refused_with_real_figures(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N, size=(48, 36))
    with _tmpfs(tmp_path / "disk", "256k") as disk:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        config = _config(listfile, disk / "cache")
        need = CacheLayout(N, options_of(config, DecodeOptions).record_shape).total_bytes
        done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(disk / "cache"))
        assert done.returncode == 2, done.stderr
        assert free == 0 and f"needs {need / 1024:.1f} KiB ({N} samples of 1440 bytes)" in done.stderr, done.stderr
        assert "its disk has 0 bytes free" in done.stderr and "0.00 GiB" not in done.stderr, done.stderr
        # Some free space, but not enough: the figures in the unit that reads best.
        filler.unlink()
        with open(filler, "wb") as f:
            f.write(b"\0" * (256 * 1024 - 16 * 1024))
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(disk / "cache"))
        assert done.returncode == 2, done.stderr
        assert f"its disk has {free / 1024:.1f} KiB free" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------- the member index
def _shifted_index(data: str, private: Path) -> tuple[str, bytes, np.ndarray]:
    """The attacker's index of `data`: computed as the server would (its name is a hash of the file list and
    settings, its versions the shards' stat), every label shifted by one. Returns (name, bytes, honest labels)."""
    honest = load_dataset(ServerConfig(data=data, index_dir=str(private)))
    (index,) = private.glob(".loader-index-*.npz")
    arrays = dict(np.load(index))
    arrays["labels"] = arrays["labels"] + 1
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return index.name, buf.getvalue(), np.asarray(honest.labels)


@ROOT_ONLY
@pytest.mark.parametrize("where", ["beside the shards", "--index-dir"])
def test_a_member_index_another_user_planted_is_never_read(start_server: Any, shared_tree: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The member index says which bytes and which label each sample of a tar shard has: one that user
    65534 planted under its computable name in a shared folder (1777, like a cluster's scratch) is not
    read, the shards are indexed again and every label served is the honest one (before: every label
    served was the attacker's, with no word in the log)."""
    from loader_server.sample_data import write_tar_shards

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the user's own index folder, for this test
    files = load_dataset(ServerConfig(data=str(unique_label_list(shared_tree / "files", N))))
    scratch = shared_tree / "scratch"
    scratch.mkdir()
    scratch.chmod(0o1777)
    shards = scratch if where == "beside the shards" else shared_tree / "data"
    data = write_tar_shards(files, shards, 6)
    name, planted, honest = _shifted_index(data, tmp_path / "attacker")
    as_user(NOBODY, _plant, str(scratch), name, planted, None)
    extra = () if where == "beside the shards" else ("--index-dir", str(scratch))
    server = start_server(Path(data), "--batch-size", "4", "--size", SIZE, "--workers", "1", *extra)
    served = 0
    with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S, shared_memory=False) as client:
        for _, y in client.epoch():
            assert client.last is not None
            np.testing.assert_array_equal(y, honest[client.last.indices])  # before: honest + 1, every one
            served += len(y)
    assert served == N
    log = server.log_text()
    if where == "beside the shards":  # a folder others may write is not where the index is kept
        assert (scratch / name).read_bytes() == planted and (scratch / name).stat().st_uid == NOBODY
        assert list((tmp_path / "xdg" / "loader-service" / "index").glob(".loader-index-tar-*.npz")), log
    else:  # read nowhere else, but named; then replaced by the server's own (root may, in a sticky folder)
        assert f"--index-dir {scratch}: other users may write it (mode 1777" in log, log
        assert f"the index {scratch / name} is not read: it belongs to nobody (uid 65534)" in log, log
        assert (scratch / name).stat().st_uid == 0
    assert "Traceback" not in log
