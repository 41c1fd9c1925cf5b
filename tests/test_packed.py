"""Tar shards and Parquet tables as data set kinds: the same images as files, tar members and
Parquet rows give bitwise the same batches; exactly once, ranks, resume after SIGKILL and
`check` hold for each kind; bad containers are one-line errors naming the shard, member or row."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, server_stats
from loader_client.contract.errors import ConfigError
from loader_client.contract.sampling import SamplingPlan
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.data.packed import _brace_expand, expand_files
from loader_server.pipeline.batch import BatchBuilder
from loader_server.pipeline.cache import open_cache
from loader_server.sample_data import write_parquet, write_tar_shards

from .conftest import unique_label_list, wait_until

ROOT = Path(__file__).resolve().parent.parent
N = 24  # images: 0, 5, 10, ... are PNG, the others JPEG
BATCH = 4
SIZE = (24, 16)
TIMEOUT_S = 30.0
KINDS = ("files", "tar", "parquet", "parquet-snappy")


@pytest.fixture(autouse=True)
def _descriptors_closed_by_the_end_of_each_test() -> Iterator[None]:
    """Data sets read here keep descriptors open: collect them before the next test counts its own."""
    yield
    import gc

    gc.collect()


@pytest.fixture
def kinds(tmp_path: Path) -> dict[str, str]:
    """The same N images as a list file, as tar shards of 5, and as Parquet (files of 10 rows, row groups of 4)."""
    listfile = unique_label_list(tmp_path / "files", N)
    files = load_dataset(ServerConfig(data=str(listfile)))
    return {
        "files": str(listfile),
        "tar": write_tar_shards(files, tmp_path / "tar", 5),
        "parquet": write_parquet(files, tmp_path / "parquet", 10, row_group_size=4),
        "parquet-snappy": write_parquet(files, tmp_path / "snappy", 10, row_group_size=4, compression="snappy"),
    }


def _cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True, check=False,
                          timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=ROOT)


# ---------------------------------------------------------------------------- bitwise equality
SETTINGS = {
    "plain": ({}, False),
    "rrc,flip": ({"augment": "rrc(scale=0.2-1),flip"}, True),
    "cache": ({"cache": "memory"}, False),
    "cache, rrc,flip from records": ({"cache": "memory", "augment": "rrc(scale=0.2-1),flip", "cache_size": 20}, True),
    "subset train": ({"subset": "train", "val_fraction": 0.25, "split_seed": 3}, False),
    "subset val, gray, letterbox": ({"subset": "val", "val_fraction": 0.25, "color": "gray", "resize": "letterbox"},
                                    False),
    "float32 chw, jitter": ({"dtype": "float32", "layout": "chw", "augment": "jitter(0.3),cutout(0.3)"}, True),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_same_images_give_bitwise_the_same_batches_in_every_kind(kinds: dict[str, str], name: str) -> None:
    settings, augment = SETTINGS[name]
    batches: dict[str, list[np.ndarray]] = {}
    for kind, data in kinds.items():
        config = ServerConfig(data=data, batch_size=BATCH, size=SIZE, seed=5, drop_last=False, **settings)
        ds = load_dataset(config)
        cache = open_cache(config, ds) if config.cache else None
        builder = BatchBuilder(config, ds, cache=cache)
        plan = SamplingPlan(len(ds), BATCH, drop_last=False)
        out = []
        for rank in (0, 1):  # two ranks of one epoch, and a second epoch (warm when cached)
            for epoch in (0, 1):
                for b in range(plan.steps_per_epoch(world_size=2)):
                    idx = plan.batch(epoch, b, seed=5, rank=rank, world_size=2)
                    arrays = builder.build(idx, builder.allocate(), key=(5, epoch), augment=augment)
                    out += [arrays["x"].copy(), arrays["y"].copy(), arrays["index"].copy()]
        if cache is not None:
            assert cache.filled(0) == len(ds)
            del builder
            cache.close()  # its mapping holds a descriptor: closed now, not whenever the collector runs
        batches[kind] = out
    for kind in KINDS[1:]:
        assert len(batches[kind]) == len(batches["files"]) > 0
        for a, b in zip(batches["files"], batches[kind], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{kind} differs from files under {name}")


def _epoch_digests(endpoint: str, rank: int, world: int) -> list[tuple[list[int], str]]:
    import hashlib

    with LoaderClient(endpoint, timeout_s=TIMEOUT_S, rank=rank, world_size=world) as client:
        return [(i.tolist(), hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest())
                for x, y in client.epoch() for i in [client.last.indices]]  # type: ignore[union-attr]


def test_served_batches_are_bitwise_equal_and_exactly_once_for_every_kind(start_server: Any,
                                                                          kinds: dict[str, str]) -> None:
    """Real servers, 2 ranks each, a subset, a cache and rrc,flip: the same bytes from every kind,
    and within each kind the two ranks' shares are disjoint and together the whole subset."""
    args = ("--batch-size", "3", "--size", "24x16", "--workers", "2", "--seed", "4", "--subset", "train",
            "--val-fraction", "0.25", "--augment", "rrc(scale=0.3-1),flip", "--cache", "memory", "--cache-size", "20",
            "--keep-last")
    seen: dict[str, list[list[tuple[list[int], str]]]] = {}
    for kind in KINDS:
        server = start_server(kinds[kind], *args)
        seen[kind] = [_epoch_digests(server.endpoint, rank, 2) for rank in (0, 1)]
        shares = [[i for idx, _ in ranks for i in idx] for ranks in seen[kind]]
        assert not set(shares[0]) & set(shares[1]), kind
        assert sorted(shares[0] + shares[1]) == list(range(18)), kind  # train: 24 - round(24 * 0.25)
        server.stop()
    for kind in KINDS[1:]:
        assert seen[kind] == seen["files"], kind


# ---------------------------------------------------------------------------- resume after SIGKILL
@pytest.mark.parametrize("kind", ["tar", "parquet-snappy"])
def test_resume_after_sigkill_of_server_and_trainer(start_server: Any, kinds: dict[str, str], tmp_path: Path,
                                                    kind: str) -> None:
    data = kinds[kind]
    args = ("--batch-size", "4", "--size", "16x12", "--workers", "2", "--seed", "8", "--augment", "flip")
    endpoint = f"ipc://{tmp_path}/resume.sock"
    server = start_server(data, *args, endpoint=endpoint)
    assert "indexed 24 samples of" in server.log_text()  # built at the first start
    (index_file,) = Path(data).parent.glob(".loader-index-*.npz")
    built = index_file.stat().st_mtime_ns
    state, first = tmp_path / "state.json", tmp_path / "first.jsonl"
    done = subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(first), "--state", str(state),
                           "--die-after", "9"], cwd=ROOT, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL  # the trainer died after 9 batches (1.5 epochs), state saved
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    restarted = start_server(data, *args, endpoint=endpoint)
    assert "indexed" not in restarted.log_text()  # the member index was read back, not built again
    assert index_file.stat().st_mtime_ns == built
    second = tmp_path / "second.jsonl"
    subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(second), "--state", str(state),
                    "--batches", "9"], cwd=ROOT, check=True, timeout=60)
    reference = tmp_path / "reference.jsonl"
    subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(reference), "--batches", "18"],
                   cwd=ROOT, check=True, timeout=60)
    combined = [json.loads(line) for f in (first, second) for line in f.read_text().splitlines()]
    expected = [json.loads(line) for line in reference.read_text().splitlines()]
    assert [(r["epoch"], r["batch"]) for r in combined] == [divmod(k, 6) for k in range(18)]
    assert [r["digest"] for r in combined] == [r["digest"] for r in expected]
    for epoch in range(3):  # exactly once in each epoch, across the kill
        indices = sorted(i for r in combined if r["epoch"] == epoch for i in r["indices"])
        assert indices == list(range(N))


# ---------------------------------------------------------------------------- check
@pytest.mark.parametrize("kind", KINDS)
def test_check_reads_every_sample_of_each_kind(kinds: dict[str, str], tmp_path: Path, kind: str) -> None:
    report = tmp_path / f"{kind}.tsv"
    done = _cli("check", "--data", kinds[kind], "--workers", "2", "--report", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checked {N} samples" in done.stdout and "check: OK" in done.stdout


def _tar(path: Path, members: list[tuple[str, bytes]], *, cut_in: str | None = None) -> Path:
    """A tar of `members`; `cut_in`: cut the file 100 bytes into that member's data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if cut_in is not None:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            raw = raw[: tar.getmember(cut_in).offset_data + 100]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return path


def _jpeg(kinds: dict[str, str], i: int) -> bytes:
    """A JPEG of the sample images (every fifth of them is a PNG: the next one then)."""
    return (Path(kinds["files"]).parent / "img" / f"{i + (i % 5 == 0):05d}.jpg").read_bytes()


def test_check_names_a_corrupt_member_and_skip_mode_replaces_it(start_server: Any, kinds: dict[str, str],
                                                                tmp_path: Path) -> None:
    members = []
    for i in range(1, 9):
        members += [(f"s{i}.jpg", b"\xff\xd8 not a jpeg at all" if i == 4 else _jpeg(kinds, i)),
                    (f"s{i}.cls", str(i).encode())]
    shard = _tar(tmp_path / "bad" / "a.tar", members)
    report = tmp_path / "bad.tsv"
    done = _cli("check", "--data", str(shard), "--workers", "1", "--report", str(report))
    assert done.returncode == 1 and "1 bad" in done.stdout, done.stdout + done.stderr
    assert report.read_text().startswith(f"{shard}:s4.jpg\t")
    server = start_server(str(shard), "--batch-size", "4", "--size", "16x12", "--workers", "1", "--on-error", "skip",
                          "--max-bad", "1", "--no-shuffle")
    with LoaderClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
        labels = [int(v) for _, y in client.epoch() for v in y]
    assert labels == [1, 2, 3, 1, 5, 6, 7, 8]  # s4, last of its batch, replaced by the next good one: the first
    wait_until(lambda: f"{shard}:s4.jpg" in server.log_text(), 10, "the bad member in the log")
    assert server_stats(server.endpoint, timeout_s=10)["bad_files"] == 1


# ---------------------------------------------------------------------------- bad input
def _bad_tars(root: Path, kinds: dict[str, str]) -> list[tuple[str, list[str], str]]:
    jpg = _jpeg(kinds, 1)
    good = [("a.jpg", jpg), ("a.cls", b"1"), ("b.jpg", jpg), ("b.cls", b"2")]
    return [
        (str(_tar(root / "cut" / "x.tar", good, cut_in="b.jpg")), [],
         "is truncated: member 'b.jpg' needs bytes up to"),
        (str(_tar(root / "nolabel" / "x.tar", [*good, ("c.jpg", jpg)])), [],
         "x.tar: member 'c.jpg' has no label: its sample 'c' lacks a .cls member"),
        (str(_tar(root / "cat" / "x.tar", [*good, ("c.jpg", jpg), ("c.cls", b"cat")])), [],
         "x.tar:c.cls: label 'cat' is not an integer"),
        (str(_tar(root / "json" / "x.tar", [("a.jpg", jpg), ("a.json", b'{"cls": 3}')])), ["--json-label", "label"],
         "x.tar:a.json: has no field 'label' (--json-label)"),
        (str(_tar(root / "noimage" / "x.tar", [*good, ("c.txt", b"caption"), ("c.cls", b"3")])), [],
         "sample 'c' has no image member"),
    ]


def test_bad_tar_shards_are_one_line_errors_naming_shard_and_member(kinds: dict[str, str], tmp_path: Path) -> None:
    for data, flags, message in _bad_tars(tmp_path, kinds):
        done = _cli("serve", "--data", data, *flags, "--print-config")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (message, done.stderr)
        assert lines[0].startswith("loader-server: error: tar shard ") or "x.tar:" in lines[0], lines[0]


def test_json_labels(kinds: dict[str, str], tmp_path: Path) -> None:
    jpg = _jpeg(kinds, 1)
    shard = _tar(tmp_path / "j" / "x.tar", [("a.jpg", jpg), ("a.json", b'{"label": 3}'), ("b.jpg", jpg),
                                            ("b.json", b'{"label": 5, "caption": "x"}')])
    ds = load_dataset(ServerConfig(data=str(shard), json_label="label"))
    assert ds.labels.tolist() == [3, 5] and ds.describe(1) == f"{shard}:b.jpg"


def _parquet(path: Path, columns: dict[str, Any]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_bad_parquet_tables_are_one_line_errors_naming_file_column_and_row(kinds: dict[str, str],
                                                                            tmp_path: Path) -> None:
    import pyarrow as pa

    jpg = _jpeg(kinds, 1)
    image = pa.array([{"bytes": jpg, "path": "a.jpg"}] * 3, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    cases = [
        (_parquet(tmp_path / "a" / "x.parquet", {"img": image, "label": [1, 2, 3]}), [],
         "x.parquet has no column 'image' (--image-column); its columns: img, label"),
        (_parquet(tmp_path / "b" / "x.parquet", {"image": image, "target": [1, 2, 3]}), [],
         "x.parquet has no column 'label' (--label-column)"),
        (_parquet(tmp_path / "c" / "x.parquet", {"image": image, "label": ["cat", "dog", "cat"]}), [],
         "x.parquet: label column 'label' holds string, not integers (class names?"),
        (_parquet(tmp_path / "g" / "x.parquet", {"image": pa.array([{"bytes": jpg, "path": "a.jpg"}] * 1000, image.type),
                                                   "label": [f"n{i:08d} a class name of some length" for i in
                                                             range(1000)]}), [],
         "x.parquet: label column 'label' holds string, not integers"),  # not its pages' sizes: said from the schema
        (_parquet(tmp_path / "d" / "x.parquet", {"image": image, "label": pa.array([1, None, 3], pa.int64())}), [],
         "x.parquet:1: the label ('label') is missing"),
        (_parquet(tmp_path / "e" / "x.parquet", {"image": pa.array([{"bytes": jpg, "path": "a"}, None,
                                                                     {"bytes": jpg, "path": "c"}], image.type),
                                                   "label": [1, 2, 3]}), [],
         "x.parquet:1: no image bytes in this row (null)"),
        (_parquet(tmp_path / "f" / "x.parquet", {"image": [1, 2, 3], "label": [1, 2, 3]}), [],
         "column 'image' is int64, not image bytes"),
    ]
    for data, flags, message in cases:
        done = _cli("serve", "--data", data, *flags, "--print-config")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (message, done.stderr)


def test_parquet_columns_by_name_and_class_names_from_the_metadata(kinds: dict[str, str], tmp_path: Path) -> None:
    import pyarrow as pa

    jpgs = [_jpeg(kinds, i) for i in (1, 2, 3)]
    data = _parquet(tmp_path / "p" / "x.parquet", {"pixels": pa.array(jpgs, pa.binary()), "y": [2, 0, 1]})
    ds = load_dataset(ServerConfig(data=data, image_column="pixels", label_column="y"))
    assert ds.labels.tolist() == [2, 0, 1] and [ds.read(i) for i in range(3)] == jpgs  # type: ignore[attr-defined]
    folders = load_dataset(ServerConfig(data=str(Path(kinds["files"]).parent)))  # class folders? no: img/ only
    assert folders.class_names == ("img",)
    written = write_parquet(folders, tmp_path / "named", 100)
    named = load_dataset(ServerConfig(data=written))
    assert named.class_names == ("img",)
    with pytest.raises(ConfigError, match="--image-column applies to Parquet tables only"):
        load_dataset(ServerConfig(data=kinds["tar"], image_column="pixels"))
    with pytest.raises(ConfigError, match="--json-label applies to tar shards only"):
        load_dataset(ServerConfig(data=kinds["files"], json_label="label"))


@pytest.mark.parametrize("options", [
    {"compression": "snappy"},  # pyarrow's default: a dictionary page, then indices
    {"compression": "none", "use_dictionary": False},  # every value read exactly, no page
    {"compression": "zstd", "data_page_version": "2.0", "use_dictionary": False, "data_page_size": 3000},
    {"compression": "none", "data_page_version": "2.0", "use_dictionary": False, "data_page_size": 3000},
    {"compression": "gzip", "use_dictionary": False, "data_page_size": 3000},
    {"compression": "zstd"},
    {"compression": "brotli", "use_dictionary": False},
    {"compression": "lz4"},  # LZ4_RAW
    {"compression": "snappy", "use_dictionary": False, "data_page_size": 3000},  # plain pages of a few rows
    {"compression": "snappy", "data_page_version": "2.0", "use_dictionary": False, "data_page_size": 3000},
])
def test_parquet_rows_read_alone_equal_what_pyarrow_reads(kinds: dict[str, str], tmp_path: Path,
                                                          options: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [(Path(kinds["files"]).parent / "img" / f"{i:05d}.{'png' if i % 5 == 0 else 'jpg'}").read_bytes()
              for i in range(N)]
    table = pa.table({"image": pa.array([{"bytes": b, "path": str(i)} for i, b in enumerate(images)],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": list(range(N))})
    path = tmp_path / "t" / "x.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=7, **options)
    ds = load_dataset(ServerConfig(data=str(path)))
    expected = [v["bytes"] for v in pq.read_table(path).column("image").to_pylist()]
    for i in [*range(N), 3, 22, 0]:  # every row, then again out of order
        assert ds.read(i) == expected[i] == images[i]  # type: ignore[attr-defined]
    assert ds.labels.tolist() == list(range(N))


# ---------------------------------------------------------------------------- the member index
def test_the_index_is_kept_and_a_changed_shard_is_indexed_again(kinds: dict[str, str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from loader_server.data import packed, tar_shards

    monkeypatch.setattr(packed, "_PARALLEL_FILES", 1000)  # in this process, where the calls are counted

    calls: list[str] = []
    real = tar_shards.index_shard

    def counting(path: str, json_label: str | None = None, **more: Any) -> Any:
        calls.append(os.path.basename(path))
        return real(path, json_label, **more)

    data = kinds["tar"]
    folder = Path(data).parent
    for f in folder.glob(".loader-index-*"):
        f.unlink()
    tar_shards.index_shard = counting  # type: ignore[assignment]
    try:
        first = load_dataset(ServerConfig(data=data))
        assert len(calls) == 5 and len(list(folder.glob(".loader-index-tar-*.npz"))) == 1
        again = load_dataset(ServerConfig(data=data))
        assert len(calls) == 5 and again.fingerprint() == first.fingerprint()  # read back, not rebuilt
        shard = folder / "train-000002.tar"
        members = [(f"{k:08d}.jpg", _jpeg(kinds, 1)) for k in (90, 91)] + [("00000090.cls", b"7"),
                                                                            ("00000091.cls", b"8")]
        _tar(shard, members)
        changed = load_dataset(ServerConfig(data=data))
        assert calls[5:] == ["train-000002.tar"]  # only the changed shard
        assert len(changed) == N - 5 + 2 and changed.labels[10:12].tolist() == [7, 8]
        assert changed.describe(10) == f"{shard}:00000090.jpg"
        elsewhere = tmp_path / "index-here"
        load_dataset(ServerConfig(data=data, index_dir=str(elsewhere)))
        assert len(list(elsewhere.glob(".loader-index-tar-*.npz"))) == 1
    finally:
        tar_shards.index_shard = real  # type: ignore[assignment]


def test_a_shard_changed_under_a_running_server_is_a_bad_sample_never_stale_pixels(kinds: dict[str, str]) -> None:
    ds = load_dataset(ServerConfig(data=kinds["tar"]))
    before = ds.read(0)  # type: ignore[attr-defined]
    shard = Path(ds.describe(0).split(":")[0])
    raw = shard.read_bytes()
    shard.write_bytes(raw + b"\0" * 512)  # another size: its offsets can no longer be trusted
    from loader_server.data.reading import DecodeError

    with pytest.raises(DecodeError, match="changed since it was indexed") as info:
        ds.read(0)  # type: ignore[attr-defined]
    assert info.value.code == "changed" and info.value.path == ds.describe(0)
    assert ds.version(0) != (0, 0, 0, 0) and before  # type: ignore[attr-defined]


def test_shards_indexed_in_parallel_give_the_index_of_one_process(kinds: dict[str, str], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from loader_server.data import packed

    parallel = load_dataset(ServerConfig(data=kinds["tar"], index_dir=str(tmp_path / "a")))  # 5 shards: forked
    monkeypatch.setattr(packed, "_PARALLEL_FILES", 1000)
    serial = load_dataset(ServerConfig(data=kinds["tar"], index_dir=str(tmp_path / "b")))
    assert parallel.fingerprint() == serial.fingerprint() and len(parallel) == N
    jpg = (Path(kinds["files"]).parent / "img" / "00001.jpg").read_bytes()
    bad = tmp_path / "bad"
    for k in range(6):  # an error in a forked indexer reaches the user as in one process
        _tar(bad / f"s{k}.tar", [("a.jpg", jpg), ("a.cls", b"x" if k == 4 else b"1")])
    monkeypatch.setattr(packed, "_PARALLEL_FILES", 4)
    with pytest.raises(ConfigError, match="s4.tar:a.cls: label 'x' is not an integer"):
        load_dataset(ServerConfig(data=str(bad)))


def test_data_patterns(tmp_path: Path) -> None:
    assert _brace_expand("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert _brace_expand("{a,b}/x{1..2}.tar") == ["a/x1.tar", "a/x2.tar", "b/x1.tar", "b/x2.tar"]
    for name in ("a/s-0.tar", "a/s-1.tar", "b/t.tar"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files = [str(tmp_path / n) for n in ("a/s-0.tar", "a/s-1.tar", "b/t.tar")]
    assert expand_files(f"{tmp_path}/a/s-{{0..1}}.tar::{tmp_path}/b/t.tar", ".tar", "tar shard") == files
    assert expand_files(f"{tmp_path}/a", ".tar", "tar shard") == files[:2]
    assert expand_files(f"{tmp_path}/*/*.tar", ".tar", "tar shard") == files
    with pytest.raises(ConfigError, match="does not exist"):
        expand_files(f"{tmp_path}/a/s-{{0..2}}.tar", ".tar", "tar shard")
    with pytest.raises(ConfigError, match="named twice"):
        expand_files(f"{tmp_path}/a/s-0.tar::{tmp_path}/a", ".tar", "tar shard")
    with pytest.raises(ConfigError, match="names both local tar shards .* and objects"):  # read from one place
        expand_files(f"{tmp_path}/a/s-0.tar::s3://bucket/s-1.tar", ".tar", "tar shard")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_walker_reads_what_tarfile_reads(tmp_path: Path, fmt: int) -> None:
    """Long names (ustar prefix, GNU 'L', pax path), folders and links: the same members, offsets and sizes."""
    import mmap

    from loader_server.data import tar_shards

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i in range(12):
            name = "deep/" * (i % 5) + "n" * (i * (3 if fmt == tarfile.USTAR_FORMAT else 11)) + f"{i}.jpg"
            for member, data in ((name, bytes([i]) * (i * 37)), (name[:-4] + ".cls", str(i).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alias.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "0.jpg"
        tar.addfile(link)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        end = os.fstat(f.fileno()).st_size
        fast = list(tar_shards._headers(mm, end, str(path)))
        slow = list(tar_shards._tarfile_members(mm, end, str(path)))
    assert fast == slow and len(fast) == 24
    segment = tar_shards.index_shard(str(path))
    assert segment.labels.tolist() == list(range(12))


@pytest.mark.parametrize("kind", ["tar", "parquet-snappy", "parquet-zstd"])
def test_read_ahead_threads_share_descriptors_and_pages_safely(kinds: dict[str, str], kind: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """64 threads reading at once while descriptors and pages are evicted under them: every read is right."""
    from concurrent.futures import ThreadPoolExecutor

    from loader_server.data import reading

    monkeypatch.setattr(reading, "_OPEN_FILES", 2)  # 5 shards (3 tables): evictions all the time
    files = load_dataset(ServerConfig(data=kinds["files"]))
    if kind == "parquet-zstd":
        kinds[kind] = write_parquet(files, Path(kinds["files"]).parent.parent / "zstd", 10, row_group_size=4,
                                    compression="zstd")
    ds = load_dataset(ServerConfig(data=kinds[kind]))
    if kind == "parquet-zstd":  # room for one page and a half: pages are evicted all the time
        ds = load_dataset(ServerConfig(data=kinds[kind], page_cache_mb=1.5 * ds.raw.max() / (1 << 20)))  # type: ignore[attr-defined]
    order = np.random.default_rng(1).integers(0, N, 3000)
    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(ds.read, order.tolist()))  # type: ignore[attr-defined]
    assert all(g == files.read(int(i)) for g, i in zip(got, order, strict=True))  # type: ignore[attr-defined]
    storage = ds.storage  # type: ignore[attr-defined]
    assert len(storage._fds) <= 2 and not storage._retired  # every evicted descriptor closed once unused
    if kind == "parquet-zstd":
        cache = ds._pages  # type: ignore[attr-defined]
        assert 0 < cache.held <= cache.limit and cache.hits and cache.misses > 9  # kept, bounded, evicted


# ---------------------------------------------------------------------------- compressed pages
def _snappy_corpus(rng: np.random.Generator) -> list[bytes]:
    """Values of every kind snappy meets: incompressible (JPEG-like), runs, words repeated within and across
    values (copies reaching back over a value's start), and empty ones."""
    words = [rng.bytes(int(n)) for n in rng.integers(4, 40, 30)]
    values = []
    for k in range(120):
        kind = k % 4
        if kind == 0:
            values.append(rng.bytes(int(rng.integers(1, 30_000))))
        elif kind == 1:
            values.append(bytes([k]) * int(rng.integers(1, 5_000)) + rng.bytes(100))
        elif kind == 2:
            values.append(b"".join(words[int(w)] for w in rng.integers(0, len(words), int(rng.integers(1, 600)))))
        else:
            values.append(b"" if k % 8 == 3 else rng.bytes(7))
    return values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_snappy_piece_decodes_to_its_range_whatever_the_stream(seed: int) -> None:
    """Any range of a snappy stream (pyarrow's compressor: 64 KB blocks) is decoded by its piece alone, a
    piece that starts where no later copy reaches back before it; and it is at most 128 KB more than the range."""
    import pyarrow as pa

    from loader_server.data.packed import _varint
    from loader_server.data.parquet_tables import _snappy_pieces

    rng = np.random.default_rng(seed)
    data = b"".join(_snappy_corpus(rng))
    stored = pa.compress(data, "snappy", asbytes=True)
    starts = rng.integers(0, len(data), 300)
    lengths = np.minimum(rng.integers(0, 40_000, 300), len(data) - starts)
    edges = np.array([0, len(data), len(data) - 1, 65535, 65536, 65537])
    starts = np.concatenate([starts, edges, [0]])
    lengths = np.concatenate([lengths, [1, 0, 1, 1, 1, 1], [len(data)]])
    at, span, raw, inner = _snappy_pieces(stored, len(data), starts, lengths)
    assert ((raw - lengths) < 2 * 65536).all() and (inner >= 0).all()
    for k in range(len(starts)):
        piece = _varint(int(raw[k])) + stored[int(at[k]) : int(at[k] + span[k])]
        out = pa.decompress(piece, int(raw[k]), "snappy", asbytes=True)
        assert out[int(inner[k]) : int(inner[k] + lengths[k])] == data[int(starts[k]) : int(starts[k] + lengths[k])]


def test_a_damaged_snappy_stream_is_named_not_walked_past_its_end() -> None:
    import pyarrow as pa

    from loader_server.data.packed import _varint
    from loader_server.data.parquet_tables import _Damaged, _snappy_pieces

    data = bytes(range(256)) * 400
    stored = pa.compress(data, "snappy", asbytes=True)
    head = len(_varint(len(data)))
    one = np.zeros(1, np.int64)
    for bad, match in ((stored[:-3], "decodes to"), (stored, "says"), (stored[:head] + b"\xfc", "cut short"),
                       (stored[:head] + b"\x01\x00", "copy from 0 bytes back"), (stored[:head - 1], "varint")):
        size = len(data) + (1 if bad is stored else 0)
        with pytest.raises(_Damaged, match=match):
            _snappy_pieces(bad, size, one, one)


def _table(path: Path, values: list[bytes], **options: Any) -> list[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    image = pa.array([{"bytes": v, "path": str(i)} for i, v in enumerate(values)],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": image, "label": list(range(len(values)))}), path, **options)
    return [v["bytes"] for v in pq.read_table(path).column("image").to_pylist()]


def test_a_snappy_row_costs_its_own_bytes_not_its_page_and_keeps_no_page(tmp_path: Path) -> None:
    """As Hugging Face datasets writes images (snappy, 100-row groups: one dictionary page of megabytes),
    each row is read through a piece of about its size, and nothing is kept."""
    rng = np.random.default_rng(5)
    values = [rng.bytes(int(n)) for n in rng.integers(15_000, 30_000, 100)] + _snappy_corpus(rng)
    path = tmp_path / "t" / "hf.parquet"
    expected = _table(path, values, row_group_size=100, compression="snappy")
    ds = load_dataset(ServerConfig(data=str(path)))
    assert ds.codecs == ("snappy",) and ds.raw is not None and ds.length is not None  # type: ignore[attr-defined]
    assert ((ds.raw - ds.length) < 2 * 65536).all()  # type: ignore[attr-defined]
    import pyarrow.parquet as pq

    assert pq.ParquetFile(path).metadata.row_group(0).column(0).total_uncompressed_size > 1_500_000  # one page
    for i in np.random.default_rng(0).permutation(len(values)).tolist() + [0, len(values) - 1]:
        assert ds.read(i) == expected[i] == values[i]  # type: ignore[attr-defined]
    assert len(ds._pages) == 0 and ds._pages.held == 0  # type: ignore[attr-defined]


def _zstd_rows(tmp_path: Path, seed: int = 7, **config: Any) -> tuple[Any, list[bytes], Path]:
    rng = np.random.default_rng(seed)
    values = [rng.bytes(int(n)) for n in np.random.default_rng(7).integers(1_000, 3_000, 40)]
    path = tmp_path / "z" / "z.parquet"
    expected = _table(path, values, row_group_size=10, compression="zstd", use_dictionary=False)
    return load_dataset(ServerConfig(data=str(path), **config)), expected, path


def test_pages_of_other_codecs_are_kept_once_decompressed_and_within_page_cache_mb(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loader_server.data import packed

    made: list[int] = []

    class Counted(packed.PageCache):
        def __init__(self, limit: int) -> None:
            made.append(limit)
            super().__init__(limit)

    monkeypatch.setattr(packed, "PageCache", Counted)
    ds, expected, _ = _zstd_rows(tmp_path)
    assert made == [64 << 20]  # one cache a data set, made with its bound (not a default one replaced)
    pages = len(np.unique(ds.pos))  # 4 row groups of 10 rows: a page each
    assert pages == 4 and ds.page_cache_bytes == 64 << 20
    assert [ds.read(i) for i in range(40)] == expected  # in file order: each page decompressed once
    assert (ds._pages.misses, ds._pages.hits, len(ds._pages)) == (4, 36, 4)
    assert ds._pages.held == int(ds.raw[::10].sum())

    one_page = int(ds.raw.max()) + 1  # room for one page, never two
    small, _, _ = _zstd_rows(tmp_path / "small", page_cache_mb=one_page / (1 << 20))
    assert small.page_cache_bytes == small._pages.limit == one_page and made[1:] == [one_page]
    for i in np.random.default_rng(3).integers(0, 40, 200).tolist():
        assert small.read(i) == expected[i]
        assert len(small._pages) <= 1 and small._pages.held <= one_page
    assert small._pages.hits and small._pages.misses > 4

    none, _, _ = _zstd_rows(tmp_path / "none", page_cache_mb=0)  # the lower end: nothing kept, still right
    assert [none.read(i) for i in range(40)] == expected
    # every page is over the bound: each row is read by its page's stream, never a page decompressed whole
    assert (len(none._pages), none._pages.held, none._pages.misses) == (0, 0, 0)
    top = ServerConfig(data=str(tmp_path / "z" / "z.parquet"), page_cache_mb=1048576)  # the upper end
    assert load_dataset(top).page_cache_bytes == 1 << 40  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="--page-cache-mb applies to Parquet tables only"):
        load_dataset(ServerConfig(data=str(tmp_path / "z" / "z.parquet").replace(".parquet", ".tar"),
                                  page_cache_mb=1))


def test_a_changed_table_is_never_served_from_a_kept_page(tmp_path: Path) -> None:
    """A page kept, then its file rewritten with other rows: the read says the file changed, never the kept
    page's bytes; indexed again, the new rows are read."""
    from loader_server.data.reading import DecodeError

    ds, expected, path = _zstd_rows(tmp_path)
    assert ds.read(3) == expected[3] and len(ds._pages) == 1
    _, rewritten, _ = _zstd_rows(tmp_path, seed=8)
    assert rewritten[4] != expected[4]
    with pytest.raises(DecodeError, match="changed since it was indexed") as info:
        ds.read(4)  # its page is kept, from the file as it was
    assert info.value.code == "changed" and len(ds._pages) == 1
    again = load_dataset(ServerConfig(data=str(path)))
    assert again.read(4) == rewritten[4]  # type: ignore[attr-defined]
