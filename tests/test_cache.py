"""The decoded-sample cache: bitwise identity, validity, crashes, sharing, refusals, build ahead.

Real files, real processes: records are filled by worker processes of real servers, by
``loader-server cache build`` subprocesses, and by forked writers killed with SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, server_stats
from loader_client.contract.errors import ConfigError
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.data.reading import Version, file_version
from loader_server.metrics import prometheus_text
from loader_server.pipeline.batch import BatchBuilder
from loader_server.pipeline.cache import SampleCache, open_cache, record_decoder
from loader_server.pipeline.decode import read_file

from .conftest import unique_label_list, wait_until, write_image

N = 48
BATCH = 8
SIZE = "24x20"
TIMEOUT_S = 60.0


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", N, size=(48, 36))


def _config(listfile: Path, cache: str | None, **kw: Any) -> ServerConfig:
    kw.setdefault("size", (24, 20))
    return ServerConfig(data=str(listfile), batch_size=BATCH, cache=cache, **kw)


def _builders(listfile: Path, cache_dir: Path, **kw: Any) -> tuple[BatchBuilder, BatchBuilder, SampleCache]:
    """An uncached builder and a cached one with the same settings."""
    config = _config(listfile, str(cache_dir), **kw)
    index = load_dataset(config)
    cache = open_cache(config, index)
    plain = BatchBuilder(_config(listfile, None, **{k: v for k, v in kw.items() if k != "cache_size"}), index)
    return plain, BatchBuilder(config, index, cache=cache), cache


def _batch(builder: BatchBuilder, indices: np.ndarray, key: tuple[int, int] = (0, 0),
           augment: bool = False) -> np.ndarray:
    return builder.build(indices, builder.allocate(), key=key, augment=augment)["x"].copy()


def _record_of(cache: SampleCache, config: ServerConfig, path: str) -> np.ndarray:
    out = np.empty(cache.layout.shape, np.uint8)
    record_decoder(config).decode_into(read_file(path), path, out)
    return out


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("settings", [
    {}, {"color": "gray", "dtype": "float32", "layout": "chw"}, {"resize": "letterbox", "pad_value": 7},
    {"resize": "crop", "augment": "flip,jitter(0.4),rotate(10),cutout(0.25)"}, {"color": "bgr", "dtype": "float32",
                                                                                 "mean": (0.5,) * 3, "std": (0.2,) * 3},
    {"read_threads": 4},  # reads run ahead on threads, and are skipped for valid records
])
def test_cached_samples_are_bitwise_identical_to_decoded_ones(listfile: Path, tmp_path: Path,
                                                              settings: dict[str, Any]) -> None:
    plain, cached, cache = _builders(listfile, tmp_path / "cache", **settings)
    augment = "augment" in settings
    for epoch in range(2):
        for lo in range(0, N, BATCH):
            indices = np.arange(lo, lo + BATCH)[::-1].copy()
            expected = _batch(plain, indices, (3, epoch), augment)
            got = _batch(cached, indices, (3, epoch), augment)
            assert (cached.cache_hits, cached.cache_misses) == ((BATCH, 0) if epoch else (0, BATCH))
            assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert cache.filled(0) == N


def test_served_batches_with_a_memory_cache_equal_uncached_ones(start_server: Any, listfile: Path) -> None:
    args = ("--batch-size", str(BATCH), "--size", SIZE, "--workers", "2", "--seed", "5", "--augment", "flip")
    uncached = start_server(listfile, *args)
    cached = start_server(listfile, *args, "--cache", "memory")
    got = {}
    for name, server in (("plain", uncached), ("cached", cached)):
        with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
            got[name] = [np.concatenate([x.copy() for x, _ in client.epoch()]) for _ in range(3)]
    for epoch in range(3):
        assert np.array_equal(got["plain"][epoch], got["cached"][epoch])
    stats = server_stats(cached.endpoint, timeout_s=10)["cache"]
    steps = N // BATCH
    assert stats["kind"] == "memory" and stats["records"] == N and stats["filled"] == N
    # Epoch 0 decodes every sample once (a few more when the next epoch's first batches overlap its last).
    assert N <= stats["misses"] <= N + 2 * BATCH and stats["hits"] >= 2 * steps * BATCH - 2 * BATCH
    assert stats["hit_ratio"] > 0.5 and stats["bytes"] >= N * 20 * 24 * 3
    text = prometheus_text(server_stats(cached.endpoint, timeout_s=10))
    assert f'loader_cache_lookups_total{{result="miss"}} {float(stats["misses"])}' in text
    assert "loader_cache_fill_ratio 1.0" in text and "loader_cache_size_bytes" in text
    assert "cache" not in server_stats(uncached.endpoint, timeout_s=10)


# ---------------------------------------------------------------------------- validity
def test_a_changed_file_is_decoded_again_and_its_record_updated(listfile: Path, tmp_path: Path) -> None:
    plain, cached, cache = _builders(listfile, tmp_path / "cache")
    indices = np.arange(BATCH)
    _batch(cached, indices)
    path = Path(plain.index.path(3))  # type: ignore[attr-defined]
    before = os.stat(path)
    new = np.full((36, 48, 3), 200, np.uint8)
    write_image(path, new)  # another size (and inode content)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    got = _batch(cached, indices)
    assert (cached.cache_hits, cached.cache_misses) == (BATCH - 1, 1)
    assert np.array_equal(got, _batch(plain, indices))
    assert cache.valid(3, file_version(os.stat(path)))
    # Same size, new mtime only: still decoded again.
    data = path.read_bytes()
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2 * 10**9))
    _batch(cached, indices)
    assert cached.cache_misses == 1
    _batch(cached, indices)
    assert (cached.cache_hits, cached.cache_misses) == (BATCH, 0)


def test_a_cache_made_with_another_region_decoder_is_not_read(listfile: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Another libjpeg loaded at run time (decode.REGION_DECODER: its digest; or another binding build)
    gives another cache file, decoded afresh; the first one is read again by the decoder that made it."""
    from loader_server.pipeline import decode

    folder = tmp_path / "cache"
    _, cached, _ = _builders(listfile, folder)
    indices = np.arange(BATCH)
    first = _batch(cached, indices)
    assert cached.cache_misses == BATCH and len(list(folder.glob("loader-cache-*.bin"))) == 1
    made_by = decode.REGION_DECODER
    monkeypatch.setattr(decode, "REGION_DECODER", f"{made_by} (another libjpeg)" if made_by else "jpegregion 1 other")
    _, other, other_cache = _builders(listfile, folder)
    assert np.array_equal(_batch(other, indices), first)
    assert (other.cache_hits, other.cache_misses) == (0, BATCH)  # nothing read from the first file
    assert len(list(folder.glob("loader-cache-*.bin"))) == 2 and other_cache.filled(0) == BATCH
    monkeypatch.setattr(decode, "REGION_DECODER", made_by)
    _, again, _ = _builders(listfile, folder)
    _batch(again, indices)
    assert (again.cache_hits, again.cache_misses) == (BATCH, 0)


def test_bad_files_under_skip_are_never_cached(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 16, size=(48, 36))
    bad = tmp_path / "data" / "img" / "00003.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg at all")
    config = _config(listfile, str(tmp_path / "cache"), on_error="skip", max_bad=2)
    index = load_dataset(config)
    cache = open_cache(config, index)
    builder = BatchBuilder(config, index, cache=cache)
    for misses in (8, 1):
        builder.build(np.arange(8), builder.allocate())
        assert [p for p, _, _ in builder.last_bad] == [str(bad)]  # reported every time
        assert builder.cache_misses == misses
    assert not cache.valid(3, file_version(os.stat(bad)))
    assert cache.filled(0) == 7


# ---------------------------------------------------------------------------- crashes and sharing
def _killed_mid_write(cache: SampleCache, i: int, st: Version) -> None:
    """What a process SIGKILLed halfway through `store` leaves: the state odd, half the pixels."""
    import fcntl

    state = cache.layout.meta_offset + i * 40  # a record's state: seq and a version of four int64
    fcntl.lockf(cache.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, state)
    seq = int.from_bytes(os.pread(cache.fd, 8, state), "little")
    os.pwrite(cache.fd, (seq + 1).to_bytes(8, "little"), state)  # writing
    os.pwrite(cache.fd, b"\xff" * (cache.layout.record_bytes // 2), cache.layout.records_offset + i * cache.layout.record_bytes)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_record_half_written_by_a_killed_process_is_never_served(listfile: Path, tmp_path: Path) -> None:
    plain, cached, cache = _builders(listfile, tmp_path / "cache")
    indices = np.arange(BATCH)
    expected = _batch(cached, indices)  # every record valid
    st = file_version(os.stat(plain.index.path(2)))  # type: ignore[attr-defined]
    proc = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(cache, 2, st))
    proc.start()
    proc.join(TIMEOUT_S)
    assert proc.exitcode == -signal.SIGKILL
    assert not cache.valid(2, st)
    got = _batch(cached, indices)  # decoded again (its lock died with the process), then stored
    assert (cached.cache_hits, cached.cache_misses) == (BATCH - 1, 1)
    assert np.array_equal(got, expected)
    _batch(cached, indices)
    assert cached.cache_hits == BATCH


def _writer(cache: SampleCache, st: Version, value: int, until: float) -> None:
    img = np.full(cache.layout.shape, value, np.uint8)
    while time.monotonic() < until:
        cache.store(0, st, img)
        time.sleep(0.0005)  # leaves the readers windows in which the record is valid


def test_concurrent_writers_never_publish_a_torn_record(listfile: Path, tmp_path: Path) -> None:
    _, _, cache = _builders(listfile, tmp_path / "cache", size=(256, 256))  # large records: slow copies
    st = file_version(os.stat(listfile))
    until = time.monotonic() + 1.5
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(cache, st, v, until)) for v in (0, 255)]
    for w in writers:
        w.start()
    out = np.empty(cache.layout.shape, np.uint8)
    hits = torn = 0
    while time.monotonic() < until:
        if cache.lookup(0, st, out):
            hits += 1
            torn += int(out.min() != out.max())
    for w in writers:
        w.join(TIMEOUT_S)
        assert w.exitcode == 0
    assert hits > 0 and torn == 0


def test_two_servers_fill_one_cache_folder_concurrently(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shared-cache"
    args = ("--batch-size", str(BATCH), "--size", SIZE, "--workers", "2", "--cache", str(folder))
    servers = [start_server(listfile, *args, "--seed", str(s)) for s in (1, 2)]  # different orders
    results: dict[int, list[np.ndarray]] = {}

    def consume(k: int) -> None:
        with LoaderClient(servers[k].endpoint, timeout_s=TIMEOUT_S) as client:
            results[k] = [x.copy() for x, _ in client.epoch()]

    threads = [threading.Thread(target=consume, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert sorted(results) == [0, 1]
    files = list(folder.glob("loader-cache-*.bin"))
    assert len(files) == 1  # one file for the same settings, whoever created it first
    config = _config(listfile, str(folder))
    index = load_dataset(config)
    cache = open_cache(config, index)
    assert cache.filled(0) == N
    for i in range(N):
        path = index.path(i)  # type: ignore[attr-defined]
        assert cache.valid(i, file_version(os.stat(path)))
        assert np.array_equal(cache.record(i), _record_of(cache, config, path))
    stats = [server_stats(s.endpoint, timeout_s=10)["cache"] for s in servers]
    assert sum(s["misses"] for s in stats) >= N  # every sample decoded by one of them at least


# ---------------------------------------------------------------------------- rrc
def test_random_resized_crop_from_a_larger_cache_is_deterministic(listfile: Path, tmp_path: Path) -> None:
    kw = {"augment": "rrc(scale=0.2-1),flip", "cache_size": 32}
    _, cached, cache = _builders(listfile, tmp_path / "cache", **kw)
    assert cache.layout.shape == (32, 38, 3)  # shorter side 32, the output's aspect (24x20)
    other = BatchBuilder(_config(listfile, str(tmp_path / "cache"), **kw), cached.index, cache=cache)
    indices = np.arange(BATCH)
    cold = _batch(cached, indices, (7, 0), augment=True)
    assert cached.cache_misses == BATCH
    warm = _batch(other, indices, (7, 0), augment=True)
    assert other.cache_hits == BATCH
    assert np.array_equal(cold, warm)
    assert not np.array_equal(warm, _batch(other, indices, (7, 1), augment=True))  # another epoch, other crops
    assert np.array_equal(_batch(other, indices[::-1].copy(), (7, 0), augment=True), warm[::-1])
    # Clients without augmentations never see the larger records: plain decoding, no lookups.
    plain = _batch(other, indices, (7, 0), augment=False)
    assert (other.cache_hits, other.cache_misses) == (0, 0) and plain.shape == warm.shape


def test_cache_size_without_a_cache_gives_the_pixels_the_cache_gives(listfile: Path, tmp_path: Path) -> None:
    """--cache-size is a pixel setting, --cache a speed setting: turning the cache on or off (cold
    or warm) never changes a sample, so its fill costs only the store against the same settings."""
    kw = {"augment": "rrc(scale=0.2-1),flip", "cache_size": 32}
    _, cached, cache = _builders(listfile, tmp_path / "cache", **kw)
    alone = BatchBuilder(_config(listfile, None, **kw), cached.index)
    indices = np.arange(BATCH)
    for key in ((7, 0), (7, 3)):
        without = _batch(alone, indices, key, augment=True)
        assert (alone.cache_hits, alone.cache_misses) == (0, 0)
        assert np.array_equal(_batch(cached, indices, key, augment=True), without)  # cold, then warm
    assert cached.cache_hits == BATCH
    full = BatchBuilder(_config(listfile, None, augment=kw["augment"]), cached.index)  # crops of the original
    assert not np.array_equal(_batch(full, indices, (7, 3), augment=True), without)
    # a resume can never mix the two
    assert _config(listfile, None, **kw).fingerprint() != _config(listfile, None, augment=kw["augment"]).fingerprint()


# ---------------------------------------------------------------------------- build ahead
def _cli(*args: str, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True, check=False,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)


def test_after_cache_build_serve_reads_no_image_file(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(folder), "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert f"{N} of {N} records valid" in done.stdout
    config = _config(listfile, str(folder))
    index = load_dataset(config)
    expected = {}
    plain = BatchBuilder(_config(listfile, None), index)
    for i in range(N):
        expected[i] = _batch(plain, np.array([i]))[0]
    for i in range(N):  # garbage of the same length, same inode and mtime: a decode would fail
        path = Path(index.path(i))  # type: ignore[attr-defined]
        st = path.stat()
        path.write_bytes(b"\0" * st.st_size)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2",
                          "--cache", str(folder))
    with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
        for x, _ in client.epoch():
            for row, i in zip(x, client.last.indices, strict=True):
                assert np.array_equal(row, expected[int(i)])
    stats = server_stats(server.endpoint, timeout_s=10)["cache"]
    assert stats["misses"] == 0 and stats["hits"] >= N and stats["fill_ratio"] == 1.0


def test_a_killed_cache_build_leaves_no_record_that_is_served_half_written(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 300, size=(640, 480))
    folder = tmp_path / "cache"
    args = ("cache", "build", "--data", str(listfile), "--size", "320x240", "--cache", str(folder), "--workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "loader_server", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    config = ServerConfig(data=str(listfile), size=(320, 240), cache=str(folder))
    index = load_dataset(config)
    try:
        wait_until(lambda: any(folder.glob("loader-cache-*.bin")), TIMEOUT_S, "the cache file")
        cache = open_cache(config, index)
        wait_until(lambda: cache.filled(0) >= 20, TIMEOUT_S, "some records")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its decoding processes, mid-fill
        proc.wait(TIMEOUT_S)
    filled = cache.filled(0)
    assert filled < len(index), "the build finished before it was killed: nothing was tested"
    for i in range(len(index)):
        path = index.path(i)  # type: ignore[attr-defined]
        if cache.valid(i, file_version(os.stat(path))):
            assert np.array_equal(cache.record(i), _record_of(cache, config, path))
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    assert cache.filled(0) == len(index)


# ---------------------------------------------------------------------------- refusals
def _too_large(tmp_path: Path, limit: int) -> Path:
    """A list file of enough tiny images that 16384x16384 records exceed `limit` bytes."""
    record = 16384 * 16384 * 3
    return unique_label_list(tmp_path / "big", limit // record + 2, size=(8, 8))


def test_a_cache_that_does_not_fit_is_refused_with_the_numbers(tmp_path: Path) -> None:
    from loader_server.pipeline.cache import disk_free, mem_available

    folder = tmp_path / "cache"
    folder.mkdir()
    listfile = _too_large(tmp_path, disk_free(str(folder)))
    done = _cli("cache", "build", "--data", str(listfile), "--size", "16384x16384", "--cache", str(folder))
    assert done.returncode == 2, done.stderr
    assert "GiB free" in done.stderr and "--cache DIR" in done.stderr and "Traceback" not in done.stderr
    assert not list(folder.iterdir())  # nothing left behind
    listfile = _too_large(tmp_path / "m", mem_available())
    done = _cli("serve", "--data", str(listfile), "--size", "16384x16384", "--batch-size", "1", "--keep-last",
                "--cache", "memory", "--bind", f"ipc://{tmp_path}/s.sock")
    assert done.returncode == 2, done.stderr
    assert "of memory is available (MemAvailable)" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--augment", "rrc,flip"], "--cache-size"),
    (["--transform", "loader_server.sample_data:example_transform"], "--transform"),
    (["--cache-size", "16"], "between the output's shorter side"),
])
def test_settings_that_cannot_use_the_cache_are_refused(listfile: Path, tmp_path: Path, flags: list[str],
                                                        message: str) -> None:
    done = _cli("serve", "--data", str(listfile), "--size", SIZE, "--cache", str(tmp_path / "c"), *flags,
                "--bind", f"ipc://{tmp_path}/s.sock")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(ConfigError, match="is the resolution a random resized crop is taken from"):
        ServerConfig(data="x", cache_size=256)  # neither a cache nor a crop: nothing would use it
    with pytest.raises(ConfigError, match="--transform runs on the full decoded image"):
        ServerConfig(data="x", cache_size=256, augment="rrc", transform="loader_server.sample_data:example_transform")


def test_cache_build_takes_every_setting_that_shapes_a_record() -> None:
    """A setting in the cache's key that `cache build` lacks would make its cache one that serve never finds."""
    import dataclasses

    from loader_server.cache_build import BUILD_SETTINGS
    from loader_server.options import DataOptions, DecodeOptions

    keyed = {f.name for f in dataclasses.fields(DecodeOptions)}
    assert keyed == {"size", "resize", "interpolation", "pad_value", "color", "reduced_decode", "max_pixels",
                     "cache_size"}
    assert keyed | {f.name for f in dataclasses.fields(DataOptions)} <= set(BUILD_SETTINGS)


def test_array_data_sets_refuse_the_cache(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((16, 4), np.float32))
    np.save(tmp_path / "y.npy", np.zeros(16, np.int64))
    done = _cli("serve", "--data", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "--batch-size", "4",
                "--cache", "memory", "--bind", f"ipc://{tmp_path}/s.sock")
    assert done.returncode == 2 and "array data set" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A folder and a function that makes it read-only: permissions, or a remounted tmpfs as root
    (mode 0700: a tmpfs is 1777 by default, a folder the cache refuses, as other users may write it)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        def seal() -> None:
            for p in folder.iterdir():
                p.chmod(0o444)
            folder.chmod(0o555)

        yield folder, seal
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "none", str(folder)], check=False,
                      capture_output=True, timeout=30).returncode != 0:
        pytest.skip("running as root without the right to mount a read-only file system")
    try:
        yield folder, lambda: subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, timeout=30)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True, timeout=30)


def test_a_read_only_cache_folder(start_server: Any, listfile: Path, read_only_folder: tuple[Path, Any]) -> None:
    folder, seal = read_only_folder
    done = _cli("cache", "build", "--data", str(listfile), "--size", SIZE, "--cache", str(folder))
    assert done.returncode == 0, done.stderr
    seal()
    # A complete cache there is served read-only, with a warning.
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1",
                          "--cache", str(folder))
    with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
        assert sum(len(x) for x, _ in client.epoch()) == N
    stats = server_stats(server.endpoint, timeout_s=10)["cache"]
    assert stats["read_only"] and stats["misses"] == 0 and stats["hits"] >= N
    assert "cannot be written" in server.log_text()
    # No cache for other settings there: a clear error at start-up, exit 2.
    done = _cli("serve", "--data", str(listfile), "--size", "16x16", "--cache", str(folder),
                "--bind", f"ipc://{folder.parent}/s.sock")
    assert done.returncode == 2 and "cannot write there" in done.stderr and "Traceback" not in done.stderr
