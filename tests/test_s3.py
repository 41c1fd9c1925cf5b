"""Data on a real S3 store (SeaweedFS, tests/s3_support.py): every kind stored in files, from s3:// and http://.

The store is started once for this module and stopped after it (one test restarts it). Under
CI=true a missing store is a failure; elsewhere a skip with the reason. The server and the
tests take credentials and the endpoint from the standard AWS variables (`ObjectStore.env`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient
from loader_client.contract.sampling import SamplingPlan
from loader_client.errors import BadSampleError
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.data.reading import DecodeError
from loader_server.data.remote import RemoteStorage, RetryPolicy
from loader_server.pipeline.batch import BatchBuilder
from loader_server.pipeline.cache import open_cache
from loader_server.sample_data import write_parquet, write_tar_shards

from . import s3_support
from .conftest import unique_label_list, wait_until
from .test_remote import piped_ranges

pytestmark = pytest.mark.s3

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "loader-data"
N = 24
BATCH = 4
SIZE = (24, 16)


def unavailable(exc: s3_support.NoStore) -> None:
    """Under CI=true a missing store is a failure; elsewhere a skip with the reason."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs the S3 store: {exc}")
    pytest.skip(str(exc))


@pytest.fixture(scope="module")
def store() -> Iterator[s3_support.ObjectStore]:
    try:
        started = s3_support.start_store((BUCKET,))
    except s3_support.NoStore as exc:
        unavailable(exc)
    try:
        yield started
    finally:
        from loader_server.data import remote

        for storage in remote._STORAGES.values():
            storage.close()
        started.stop()


@pytest.fixture(autouse=True)
def aws_env(store: s3_support.ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process and the servers it starts at the store, through the standard variables only."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in store.env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def data(store: s3_support.ObjectStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """The same N images in each kind, locally and on the store: kind -> (local --data, remote --data)."""
    root = tmp_path_factory.mktemp("s3-data")
    listfile = unique_label_list(root / "files", N)
    files = load_dataset(ServerConfig(data=str(listfile)))
    local = {
        "tar": write_tar_shards(files, root / "tar", 5),
        "parquet": write_parquet(files, root / "parquet", 10, row_group_size=4),
        "parquet-snappy": write_parquet(files, root / "snappy", 10, row_group_size=4, compression="snappy"),
    }
    for sub in ("files", "tar", "parquet", "snappy"):
        for path in sorted((root / sub).rglob("*")):
            if path.is_file() and not path.name.startswith(".loader-index"):
                store.put(BUCKET, f"d/{path.relative_to(root).as_posix()}", path.read_bytes())
    # A list file of objects, by absolute URL, and class folders under a prefix.
    names = [files.path(i) for i in range(N)]  # type: ignore[attr-defined]
    labels = [int(v) for v in files.labels]
    objects = "".join(f"s3://{BUCKET}/d/files/img/{os.path.basename(p)} {y}\n" for p, y in zip(names, labels,
                                                                                              strict=True))
    (root / "objects.txt").write_text(objects)
    store.put(BUCKET, "lists/objects.txt", objects.encode())
    classes = root / "classes"
    for p, y in zip(names, labels, strict=True):
        (classes / f"c{y % 3}").mkdir(parents=True, exist_ok=True)
        (classes / f"c{y % 3}" / os.path.basename(p)).write_bytes(Path(p).read_bytes())
        store.put(BUCKET, f"classes/c{y % 3}/{os.path.basename(p)}", Path(p).read_bytes())
    # Over plain HTTP (no signature): the list file and its images in the anonymous-read bucket.
    for p in names:
        store.put(s3_support.PUBLIC, f"img/{os.path.basename(p)}", Path(p).read_bytes())
    public = "".join(f"img/{os.path.basename(p)} {y}\n" for p, y in zip(names, labels, strict=True))
    store.put(s3_support.PUBLIC, "train.txt", public.encode())
    for shard in sorted(Path(local["tar"]).parent.glob("train-*.tar")):
        store.put(s3_support.PUBLIC, f"tar/{shard.name}", shard.read_bytes())
    return {
        "files": (str(listfile), f"s3://{BUCKET}/d/files/train.txt"),
        "objects-local": (str(listfile), str(root / "objects.txt")),  # a local list file naming objects
        "objects": (str(listfile), f"s3://{BUCKET}/lists/objects.txt"),
        "tar": (local["tar"], f"s3://{BUCKET}/d/tar/train-{{000000..000004}}.tar"),
        "tar-prefix": (local["tar"], f"s3://{BUCKET}/d/tar/"),
        "parquet": (local["parquet"], f"s3://{BUCKET}/d/parquet/train-*.parquet"),
        "parquet-snappy": (local["parquet-snappy"], f"s3://{BUCKET}/d/snappy/"),
        "class-folders": (str(classes), f"s3://{BUCKET}/classes/"),
        "http-list": (str(listfile), f"{store.endpoint}/{s3_support.PUBLIC}/train.txt"),
        "http-tar": (local["tar"], f"{store.endpoint}/{s3_support.PUBLIC}/tar/train-{{000000..000004}}.tar"),
    }


def _batches(data: str, pipelined: list[int] | None = None, **settings: Any) -> list[np.ndarray]:
    """Two epochs of batches built from `data` (`pipelined`: gets how many reads were pipelined)."""
    config = ServerConfig(data=data, batch_size=BATCH, size=SIZE, seed=5, drop_last=False, **settings)
    ds = load_dataset(config)
    cache = open_cache(config, ds) if config.cache else None
    builder = BatchBuilder(config, ds, cache=cache)
    plan = SamplingPlan(len(ds), BATCH, drop_last=False)
    out = []
    for epoch in (0, 1):
        for b in range(plan.steps_per_epoch(world_size=1)):
            idx = plan.batch(epoch, b, seed=5, rank=0, world_size=1)
            arrays = builder.build(idx, builder.allocate(), key=(5, epoch), augment=bool(settings.get("augment")))
            out += [arrays["x"].copy(), arrays["y"].copy(), arrays["index"].copy()]
    builder.close()
    if pipelined is not None:
        assert builder.reader is not None
        pipelined.append(builder.reader.pipelined)
    return out


@pytest.mark.parametrize("kind", ["files", "objects", "tar", "tar-prefix", "parquet", "parquet-snappy",
                                  "class-folders", "http-list", "http-tar"])
def test_every_kind_from_the_store_gives_bitwise_the_batches_of_local_disk(data: dict[str, tuple[str, str]],
                                                                            tmp_path: Path, kind: str) -> None:
    local, remote = data[kind]
    extra: dict[str, Any] = {"augment": "rrc(scale=0.3-1),flip"}
    if kind.startswith(("tar", "parquet", "http-tar")):
        extra["index_dir"] = str(tmp_path / "index")
    expected = _batches(local, **extra)
    got = _batches(remote, **extra)
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{remote} differs from {local}")


@pytest.mark.parametrize("connections", [0, 1, 3])
@pytest.mark.parametrize("kind", ["tar", "parquet", "parquet-snappy", "http-tar"])
def test_pipelined_reads_give_bitwise_the_batches_of_local_disk(data: dict[str, tuple[str, str]], tmp_path: Path,
                                                                kind: str, connections: int) -> None:
    """--read-connections K: the ranges of tar members and uncompressed Parquet values pipelined on K connections
    to the real store (HTTP/1.1); snappy pieces take the read pool; 0 reads one range per read thread."""
    local, remote = data[kind]
    extra: dict[str, Any] = {"augment": "rrc(scale=0.3-1),flip", "index_dir": str(tmp_path / "index")}
    expected = _batches(local, **extra)
    pipelined: list[int] = []
    got = _batches(remote, pipelined, read_connections=connections, **extra)
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"{remote} pipelined on {connections} differs from {local}")
    assert pipelined == [0 if kind == "parquet-snappy" or not connections else 2 * N], pipelined


def test_pipelined_ranges_on_the_store_are_answered_in_order(store: s3_support.ObjectStore) -> None:
    body = os.urandom(1 << 20)
    store.put(BUCKET, "pipelined", body)
    storage = RemoteStorage()
    url = f"s3://{BUCKET}/pipelined"
    spans = [((k * 7919) % 1000 * 1000, 1000 + k * 37) for k in range(50)]  # 50: two pipelines of 32 and 18
    assert piped_ranges(storage, url, spans) == {k: body[lo : lo + n] for k, (lo, n) in enumerate(spans)}
    assert storage.stats()["requests"] == 50  # nothing was read again
    storage.close()


def test_a_pipelined_read_never_holds_more_bytes_in_flight_than_the_bound(store: s3_support.ObjectStore) -> None:
    """--remote-inflight-mb bounds a pipeline too: 32 ranges of 40 KB under a bound of 100 KB are pipelines of
    two, never one of 1.3 MB."""
    body = os.urandom(2 << 20)
    store.put(BUCKET, "inflight", body)
    storage = RemoteStorage(inflight_bytes=100_000)
    url = f"s3://{BUCKET}/inflight"
    spans = [(k * 50_000, 40_000) for k in range(32)]
    assert piped_ranges(storage, url, spans) == {k: body[lo : lo + n] for k, (lo, n) in enumerate(spans)}
    assert 0 < storage.stats()["peak_inflight_bytes"] <= 100_000
    storage.close()


def test_readers_closed_leave_no_threads(data: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    """A Reader's pipelining threads and read pool stop at close(): made and closed ten times, the process's
    thread count comes back to where it was (no daemon thread left per Reader)."""
    from loader_server.options import ReadOptions
    from loader_server.pipeline.steps import Reader

    ds = load_dataset(ServerConfig(data=data["http-tar"][1], index_dir=str(tmp_path / "index")))
    first = Reader(ReadOptions(read_connections=3), ds)  # the storage's own threads (re-check), started once
    assert [f.result(timeout=60) for f in first.submit_many(list(range(4)))]
    first.close()
    before = threading.active_count()
    for _ in range(10):
        reader = Reader(ReadOptions(read_connections=3), ds)
        assert reader.connections == 3
        assert all(f.result(timeout=60) for f in reader.submit_many(list(range(N))))
        reader.close()
        with pytest.raises(RuntimeError):
            reader.submit_many([0])
    local = load_dataset(ServerConfig(data=data["http-tar"][0], index_dir=str(tmp_path / "index-local")))
    # Pipelining is off with --simulate-read-latency-ms (its sleep is in the read it would skip), and for local data.
    for off in (Reader(ReadOptions(read_connections=3, simulate_read_latency_ms=1.0), ds),
                Reader(ReadOptions(read_connections=3, read_threads=4), local)):
        assert off.connections == 0
        assert [len(f.result(timeout=60)) for f in off.submit_many([0, 1])] == [len(local.read(0)), len(local.read(1))]
        off.close()
    wait_until(lambda: threading.active_count() <= before, 30,
               f"the thread count back to {before} (now: {[t.name for t in threading.enumerate()]})")


def test_the_decoded_cache_in_front_of_the_store(data: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    local, remote = data["tar"]
    cached = _batches(remote, cache=str(tmp_path / "cache"), index_dir=str(tmp_path / "index"))
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in cached]),
                                  np.concatenate([a.ravel() for a in _batches(local)]))


def test_every_path_to_the_objects_takes_the_data_sets_remote_settings(data: dict[str, tuple[str, str]],
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--remote-* reach every way a data set opens its objects: a local list file naming s3:// objects, class
    folders, a prefix whose kind is told by listing it, shards and tables; no storage of other settings is made."""
    from loader_server.data import remote

    monkeypatch.setattr(remote, "_STORAGES", {})
    settings: dict[str, Any] = {"remote_attempts": 2, "remote_timeout_s": 1.5, "remote_inflight_mb": 3.0,
                                "remote_recheck_s": 7.0}
    try:
        for kind in ("objects-local", "objects", "class-folders", "tar-prefix", "parquet-snappy"):
            where = data[kind][1]
            extra = {"index_dir": str(tmp_path / kind)} if kind.startswith(("tar", "parquet")) else {}
            ds = load_dataset(ServerConfig(data=where, **settings, **extra))
            storage = getattr(ds, "remote", None) or getattr(ds, "storage", None)
            assert isinstance(storage, RemoteStorage), kind
            assert storage.policy == RetryPolicy(attempts=2, timeout_s=1.5), (kind, storage.policy)
            assert storage.inflight_bytes == 3 << 20 and storage.recheck_s == 7.0, kind
            assert len(ds.read(0)) > 0  # type: ignore[attr-defined]
            assert [s.policy for s in remote._STORAGES.values()] == [RetryPolicy(attempts=2, timeout_s=1.5)], kind
    finally:
        for storage in remote._STORAGES.values():
            storage.close()


def test_objects_are_indexed_where_they_lie_without_a_local_copy(store: s3_support.ObjectStore,
                                                                  tmp_path: Path) -> None:
    """A tar shard and a Parquet table of several MB are indexed by range reads: the indexing process may
    not write a file over 1 MB (RLIMIT_FSIZE), so a copy of either object anywhere (/tmp, the index
    folder) fails it; a pod's small /tmp (deploy/kubernetes/statefulset.yaml) is never filled."""
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    members = [("a.jpg", rng.bytes(9 << 20)), ("a.cls", b"4"), ("b.jpg", rng.bytes(3 << 20)), ("b.cls", b"5")]
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    store.put(BUCKET, "big/shard-0.tar", shard.getvalue())
    table = io.BytesIO()
    pq.write_table(pa.table({"image": [rng.bytes(2 << 20), rng.bytes(2 << 20)], "label": [1, 2]}), table,
                   compression="none", row_group_size=1)
    store.put(BUCKET, "big/table-0.parquet", table.getvalue())
    probe = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from loader_server import ServerConfig, load_dataset\n"
        "for data in sys.argv[2:]:\n"
        "    ds = load_dataset(ServerConfig(data=data, index_dir=sys.argv[1]))\n"
        "    print(len(ds), [len(ds.read(i)) for i in range(len(ds))], ds.labels.tolist())\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "index"), f"s3://{BUCKET}/big/shard-0.tar",
                           f"s3://{BUCKET}/big/table-0.parquet"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"2 [{9 << 20}, {3 << 20}] [4, 5]", f"2 [{2 << 20}, {2 << 20}] [1, 2]"]
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_damaged_objects_are_one_line_errors_naming_the_object(store: s3_support.ObjectStore,
                                                             tmp_path: Path) -> None:
    """Issue 23's bounds hold for objects read where they lie (RemoteFile): each damaged shard or table is a
    ConfigError naming its URL, and what a damaged size says is never allocated (a global pax header of 8 GB
    read by tarfile: io's read made a buffer of that size)."""
    import tracemalloc

    from loader_client.contract.errors import ConfigError

    from .test_container_fuzz import damaged_examples

    for name, raw, wrong in damaged_examples(tmp_path / "made"):
        store.put(BUCKET, f"bad/{name}", raw)
        url = f"s3://{BUCKET}/bad/{name}"
        tracemalloc.start()
        try:
            with pytest.raises(ConfigError) as info:
                load_dataset(ServerConfig(data=url, index_dir=str(tmp_path / "index")))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        message = str(info.value)
        assert url in message and wrong in message and "\n" not in message, message
        assert peak < 16 << 20, (name, peak)


def _digests(endpoint: str, **kwargs: Any) -> list[tuple[list[int], str]]:
    with LoaderClient(endpoint, timeout_s=60, **kwargs) as client:
        return [(i.tolist(), hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())
                for x, y in client.epoch() for i in [client.last.indices]]  # type: ignore[union-attr]


def test_a_served_epoch_from_s3_tar_shards_equals_local_disk_exactly_once(start_server: Any, tmp_path: Path,
                                                                          data: dict[str, tuple[str, str]]) -> None:
    args = ("--batch-size", "4", "--size", "24x16", "--workers", "2", "--seed", "3", "--augment", "flip",
            "--keep-last", "--cache", "memory")
    local, remote = data["tar"]
    seen = {}
    for name, where in (("local", local), ("s3", remote)):
        server = start_server(where, *args, "--index-dir", str(tmp_path / name))
        seen[name] = [_digests(server.endpoint), _digests(server.endpoint)]  # the second epoch from the cache
        server.stop()
    assert seen["s3"] == seen["local"]
    assert sorted(i for idx, _ in seen["s3"][0] for i in idx) == list(range(N))


def test_credentials_come_from_the_environment_and_never_show(start_server: Any, tmp_path: Path,
                                                              data: dict[str, tuple[str, str]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _, remote = data["tar"]
    shown = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--data", remote, "--print-config",
                            "--batch-size", "4", "--index-dir", str(tmp_path / "index")],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    server = start_server(remote, "--batch-size", "4", "--size", "24x16", "--workers", "1", "--log-level", "DEBUG",
                          "--index-dir", str(tmp_path / "index"))
    _digests(server.endpoint)
    server.stop()
    for text in (shown.stdout + shown.stderr, server.log_text()):
        assert s3_support.SECRET_KEY not in text
        assert "Signature=" not in text and "Credential=" not in text
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    refused = subprocess.run([sys.executable, "-m", "loader_server", "check", "--data", remote, "--index-dir",
                              str(tmp_path / "other")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0
    assert "wrong-secret" not in refused.stdout + refused.stderr
    assert f"s3://{BUCKET}/d/tar/" in refused.stderr and "HTTP 403" in refused.stderr, refused.stderr


def test_resume_after_sigkill_of_server_and_trainer_from_s3(start_server: Any, tmp_path: Path,
                                                            data: dict[str, tuple[str, str]]) -> None:
    _, remote = data["parquet-snappy"]
    args = ("--batch-size", "4", "--size", "16x12", "--workers", "2", "--seed", "8", "--augment", "flip",
            "--index-dir", str(tmp_path / "index"))
    endpoint = f"ipc://{tmp_path}/resume.sock"
    server = start_server(remote, *args, endpoint=endpoint)
    assert "indexed 24 samples of" in server.log_text()
    (index_file,) = (tmp_path / "index").glob(".loader-index-*.npz")
    built = index_file.stat().st_mtime_ns
    state, first = tmp_path / "state.json", tmp_path / "first.jsonl"
    done = subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(first), "--state", str(state),
                           "--die-after", "9"], cwd=ROOT, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    restarted = start_server(remote, *args, endpoint=endpoint)
    assert "indexed" not in restarted.log_text()  # the index was read back: the objects' ETags matched
    assert index_file.stat().st_mtime_ns == built
    second, reference = tmp_path / "second.jsonl", tmp_path / "reference.jsonl"
    subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(second), "--state", str(state),
                    "--batches", "9"], cwd=ROOT, check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(reference), "--batches", "18"],
                   cwd=ROOT, check=True, timeout=120)
    combined = [json.loads(line) for f in (first, second) for line in f.read_text().splitlines()]
    expected = [json.loads(line) for line in reference.read_text().splitlines()]
    assert [r["digest"] for r in combined] == [r["digest"] for r in expected]
    for epoch in range(3):
        assert sorted(i for r in combined if r["epoch"] == epoch for i in r["indices"]) == list(range(N))


@pytest.mark.parametrize("kind", ["objects", "tar"])  # whole objects on the read pool; tar members pipelined
def test_store_killed_mid_epoch_is_an_error_in_bounded_time_then_a_resumed_trainer_completes_it(
        start_server: Any, tmp_path: Path, store: s3_support.ObjectStore, data: dict[str, tuple[str, str]],
        kind: str) -> None:
    _, remote = data[kind]
    server = start_server(remote, "--batch-size", "2", "--size", "16x12", "--workers", "1", "--seed", "2",
                          "--prefetch", "1", "--remote-attempts", "3", "--remote-timeout-s", "2",
                          *(("--index-dir", str(tmp_path / "index")) if kind == "tar" else ()))
    got: list[list[int]] = []
    state = None
    with LoaderClient(server.endpoint, timeout_s=60) as client:
        stream = iter(client.epoch())
        for _ in range(3):
            next(stream)
            got.append(client.last.indices.tolist())  # type: ignore[union-attr]
            state = client.state_dict()
        store.kill()
        started = time.monotonic()
        with pytest.raises(BadSampleError) as caught:
            for _ in stream:
                got.append(client.last.indices.tolist())  # type: ignore[union-attr]
                state = client.state_dict()
        took = time.monotonic() - started
    message = str(caught.value)
    assert f"s3://{BUCKET}/d/{'files/img' if kind == 'objects' else 'tar'}/" in message, message
    assert "after 3 attempts" in message, message
    assert took < 60  # 3 attempts of at most 2 s, with backoff below 0.2 + 0.4 s, plus prefetched batches
    store.restart()
    with LoaderClient(server.endpoint, timeout_s=60, state=state) as resumed:
        got += [resumed.last.indices.tolist() for _ in resumed.epoch()]  # type: ignore[union-attr]
    assert sorted(i for batch in got for i in batch) == list(range(N))  # exactly once across the outage


def test_an_object_overwritten_during_a_run_is_detected_never_served_stale(
        start_server: Any, tmp_path: Path, store: s3_support.ObjectStore, data: dict[str, tuple[str, str]]) -> None:
    local, _ = data["tar"]
    shards = sorted(Path(local).parent.glob("train-*.tar"))
    for shard in shards:
        store.put(BUCKET, f"over/{shard.name}", shard.read_bytes())
    remote = f"s3://{BUCKET}/over/"
    # In a worker's sample path, with the cache: the overwritten shard's samples are neither read nor served
    # from their records (version None), and a read is refused by the store (If-Match: the indexed ETag).
    config = ServerConfig(data=remote, batch_size=BATCH, size=SIZE, cache="memory", remote_recheck_s=0,
                          index_dir=str(tmp_path / "index"))
    ds = load_dataset(config)
    cache = open_cache(config, ds)
    builder = BatchBuilder(config, ds, cache=cache)
    first, other = np.arange(4), np.arange(5, 9)  # samples of shard 0, and of shard 1
    builder.build(first, builder.allocate())  # decoded and cached
    kept = builder.build(other, builder.allocate())["x"].copy()
    assert cache.filled(0) == 8
    store.put(BUCKET, f"over/{shards[0].name}", shards[1].read_bytes())  # other pixels under the same name
    assert all(ds.version(int(i)) is None for i in first)  # type: ignore[attr-defined]
    with pytest.raises(DecodeError) as caught:
        builder.build(first, builder.allocate())
    assert caught.value.code == "changed" and f"{remote}{shards[0].name}" in str(caught.value)
    np.testing.assert_array_equal(builder.build(other, builder.allocate())["x"], kept)  # the others: unchanged
    # A served run: the trainer gets the error naming the object, never the new pixels.
    store.put(BUCKET, f"over/{shards[0].name}", shards[0].read_bytes())
    server = start_server(remote, "--batch-size", "4", "--size", "24x16", "--workers", "1", "--no-shuffle",
                          "--keep-last", "--index-dir", str(tmp_path / "index2"))
    store.put(BUCKET, f"over/{shards[0].name}", shards[1].read_bytes())
    with LoaderClient(server.endpoint, timeout_s=60) as client, pytest.raises(BadSampleError) as served:
        for _ in client.epoch():
            pass
    assert shards[0].name in str(served.value) and "changed since it was indexed" in str(served.value)


class _SlowDown(http.server.BaseHTTPRequestHandler):
    """Answers `fail` requests with 503 SlowDown, then forwards to the store (a throttling front)."""

    fail = 0
    target = ""
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        if type(self).fail > 0:
            type(self).fail -= 1
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        request = urllib.request.Request(self.target + self.path, headers={"Range": self.headers["Range"] or ""})
        with urllib.request.urlopen(request, timeout=10) as upstream:
            body = upstream.read()
            self.send_response(upstream.status)
            for name in ("Content-Range", "ETag"):
                if upstream.headers[name]:
                    self.send_header(name, upstream.headers[name])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_503_slowdown_is_retried_with_backoff_then_named_with_status_and_attempts(
        store: s3_support.ObjectStore) -> None:
    store.put(s3_support.PUBLIC, "blob", bytes(range(256)) * 100)
    _SlowDown.target = store.endpoint
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowDown)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{front.server_address[1]}/{s3_support.PUBLIC}/blob"
    try:
        storage = RemoteStorage(RetryPolicy(attempts=4, base_s=0.05, max_backoff_s=0.2))
        storage.remember({url: s3_support_info(store)})
        _SlowDown.fail, _SlowDown.seen = 3, 0
        assert storage.read_range(url, 256, 10, str, 0) == bytes(range(10))  # the 4th attempt
        assert _SlowDown.seen == 4
        _SlowDown.fail, _SlowDown.seen = 10, 0
        with pytest.raises(DecodeError) as caught:
            storage.read_range(url, 0, 10, lambda i: "blob:0", 0)
        assert _SlowDown.seen == 4
        message = str(caught.value)
        assert url in message and "HTTP 503 SlowDown" in message and "after 4 attempts" in message, message
        assert caught.value.code == "unavailable"
        storage.close()
    finally:
        front.shutdown()
        front.server_close()


class _SlowDownPipelined(_SlowDown):
    """The throttling front over HTTP/1.1 (persistent connections, so pipelined requests are answered in turn):
    the requests numbered in `fail_at` (from 1) are answered 503 SlowDown."""

    protocol_version = "HTTP/1.1"
    fail_at: set[int] = set()

    def do_GET(self) -> None:
        type(self).fail = 1 if type(self).seen + 1 in type(self).fail_at else 0
        super().do_GET()


@contextlib.contextmanager
def _fronted(handler: type[_SlowDown], store: s3_support.ObjectStore) -> Iterator[tuple[str, RemoteStorage, bytes]]:
    """A throttling front of `handler` before the real store: (the URL of a blob through it, a storage that reads
    it as indexed, the blob's bytes); both stopped after."""
    body = bytes(range(256)) * 100
    store.put(s3_support.PUBLIC, "blob", body)
    handler.target = store.endpoint
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{front.server_address[1]}/{s3_support.PUBLIC}/blob"
    storage = RemoteStorage(RetryPolicy(attempts=4, base_s=0.05, max_backoff_s=0.2))
    try:
        storage.remember({url: s3_support_info(store)})
        yield url, storage, body
    finally:
        storage.close()
        front.shutdown()
        front.server_close()


def test_503_slowdown_mid_pipeline_is_retried_and_every_range_delivered_once(store: s3_support.ObjectStore) -> None:
    """Requests 3 and 7 of a pipeline of 10 are answered 503 SlowDown by a throttling front of the real store:
    the others are served from the pipeline, those two retried (after a backoff, on the retry pool) once each."""
    with _fronted(_SlowDownPipelined, store) as (url, storage, body):
        _SlowDownPipelined.fail_at, _SlowDownPipelined.seen = {3, 7}, 0
        spans = [(k * 1000, 500 + k) for k in range(10)]
        assert piped_ranges(storage, url, spans) == {k: body[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert _SlowDownPipelined.seen == 12 and storage.stats()["requests"] == 12  # 10, and the two again


def test_a_front_that_closes_after_each_answer_is_read_one_request_per_connection(
        store: s3_support.ObjectStore, caplog: pytest.LogCaptureFixture) -> None:
    """An HTTP/1.0 front (it closes the connection after each answer) before the real store: the pipeline's
    first answer stands, the rest are read again, the host is remembered (one log line) and read one request
    per connection after that."""
    with _fronted(_SlowDown, store) as (url, storage, body):
        _SlowDown.fail, _SlowDown.seen = 0, 0
        spans = [(k * 1000, 500 + k) for k in range(6)]
        with caplog.at_level("WARNING", logger="loader_server"):
            for _ in range(2):
                assert piped_ranges(storage, url, spans) == {k: body[lo : lo + n] for k, (lo, n) in enumerate(spans)}
        assert _SlowDown.seen == 12  # each range answered once
        assert storage.stats()["requests"] == 6 + 5 + 6  # the pipeline, its 5 unanswered again, then one by one
        assert len([r for r in caplog.records if "answered only the first" in r.getMessage()]) == 1


def s3_support_info(store: s3_support.ObjectStore) -> Any:
    from loader_server.data.remote import ObjectInfo

    head = store.client().head_object(Bucket=s3_support.PUBLIC, Key="blob")
    return ObjectInfo(int(head["ContentLength"]), head["ETag"])


def test_the_version_recheck_runs_in_the_background_serving_the_last_known_state(
        store: s3_support.ObjectStore) -> None:
    """A worker's `version` never lists a folder itself once it knows its state: past --remote-recheck-s it
    answers the last known state and a background thread lists the folder; the change shows after that."""
    store.put(BUCKET, "recheck/a.bin", b"one")
    store.put(BUCKET, "recheck/b.bin", b"other")
    url = f"s3://{BUCKET}/recheck/a.bin"
    storage = RemoteStorage(recheck_s=0.5)
    storage.list(f"s3://{BUCKET}/recheck/", shallow=True)  # as opening a data set does: the folder's state now
    indexed = storage.version(url)
    assert indexed is not None and indexed[1] == 3
    store.put(BUCKET, "recheck/a.bin", b"two!")  # overwritten: another ETag and size
    time.sleep(0.6)  # the known state is now older than --remote-recheck-s
    assert storage.version(url) == indexed  # the last known state; the listing runs in the background
    wait_until(lambda: storage.version(url) is None, 30, "the background re-check to see the change")
    assert storage.version(f"s3://{BUCKET}/recheck/b.bin") is not None  # the folder's other object: unchanged
    storage.close()


def test_bytes_in_flight_stay_under_the_bound(store: s3_support.ObjectStore) -> None:
    store.put(BUCKET, "big", os.urandom(4 << 20))
    storage = RemoteStorage(inflight_bytes=1 << 20)
    url = f"s3://{BUCKET}/big"
    with ThreadPoolExecutor(16) as pool:
        parts = list(pool.map(lambda k: storage.read_range(url, k * (300 << 10), 300 << 10, str, k), range(12)))
    assert all(len(p) == 300 << 10 for p in parts)
    stats = storage.stats()
    assert 600 << 10 <= stats["peak_inflight_bytes"] <= 1 << 20  # at most three 300 KB ranges at once
    assert stats["requests"] >= 12
    storage.close()


def test_a_named_profile_from_the_aws_config_files(store: s3_support.ObjectStore, tmp_path: Path,
                                                   data: dict[str, tuple[str, str]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_PROFILE with its keys in the credentials file and its endpoint_url in the config file: no other variable."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text(f"[training]\naws_access_key_id = {s3_support.ACCESS_KEY}\n"
                                          f"aws_secret_access_key = {s3_support.SECRET_KEY}\n")
    (tmp_path / "config").write_text(f"[profile training]\nregion = {s3_support.REGION}\n"
                                     f"endpoint_url = {store.endpoint}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "training")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    remote = f"s3://{BUCKET}/d/parquet/"
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from loader_server import ServerConfig, load_dataset; "
         f"ds = load_dataset(ServerConfig(data={remote!r}, index_dir={str(tmp_path / 'index')!r})); "
         "print(len(ds), len(ds.read(0)))"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[0] == str(N) and int(probe.stdout.split()[1]) > 0


def _store_processes(s3_port: int) -> list[int]:
    """Pids of `weed server` processes whose S3 gateway has this port."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if f"-s3.port={s3_port}".encode() in argv:
                found.append(int(pid))
    return found


def test_a_store_started_by_hand_has_its_buckets_and_stops_with_sigterm() -> None:
    """README, "Data on an object store": `python3 -m loader_bench.object_store up my-datasets` in another shell.
    The bucket named is there, and `kill` (SIGTERM) stops SeaweedFS too: it used to be left running, with its
    ports and folder, when only Ctrl-C stopped it."""
    import select

    import botocore.session

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "loader_bench.object_store", "up", "my-datasets"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 100
        assert proc.stdout is not None and proc.stderr is not None
        while b"# Ctrl-C stops the store" not in out:
            if proc.poll() is not None:
                if proc.returncode == 1:  # NoStore: weed or botocore missing, the reason on stderr
                    unavailable(s3_support.NoStore(proc.stderr.read().decode()))
                raise AssertionError(f"the store stopped: {proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, f"no export lines within 100 s: {out!r}"
            if select.select([proc.stdout], [], [], 1.0)[0]:
                out += os.read(proc.stdout.fileno(), 65536)
        exports = dict(line.removeprefix("export ").split("=", 1) for line in out.decode().splitlines()
                       if line.startswith("export "))
        port = int(exports["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        s3 = botocore.session.get_session().create_client(
            "s3", endpoint_url=exports["AWS_ENDPOINT_URL"], aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"], region_name=exports["AWS_DEFAULT_REGION"])
        s3.put_object(Bucket="my-datasets", Key="x", Body=b"hello")
        assert s3.get_object(Bucket="my-datasets", Key="x")["Body"].read() == b"hello"
        assert _store_processes(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert _store_processes(port) == []  # stopped before `up` exits, not orphaned
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_a_prefix_named_without_its_slash_is_answered_with_the_prefix(data: dict[str, tuple[str, str]]) -> None:
    """`--data s3://bucket/shards` (no `/`) reads as a list file object, which is not there: the error says
    that objects lie under that prefix and what to pass; a name with nothing under it gets no such hint."""
    from loader_client.contract.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_dataset(ServerConfig(data=f"s3://{BUCKET}/d/tar"))
    assert str(err.value) == (f"list file s3://{BUCKET}/d/tar: object not found; objects lie under "
                              f"s3://{BUCKET}/d/tar/: did you mean the prefix --data s3://{BUCKET}/d/tar/ (a prefix "
                              "ends with /)?")
    with pytest.raises(ConfigError) as err:
        load_dataset(ServerConfig(data=f"s3://{BUCKET}/d/nothing-here"))
    assert str(err.value) == f"list file s3://{BUCKET}/d/nothing-here: object not found"
