"""Settings x what a trainer receives: one table, every setting, through real servers.

For every setting that changes what a trainer receives (pixels, order, shares, labels, extra
arrays) a row starts a server with it beside one without it, and checks, through public
surfaces only:

* **the batch**: the first epoch differs where the row says (x, y, sample indices, extras, or
  the number of batches);
* **the resume guard**: a state saved on one server is refused by the other, naming what
  differs (the batch settings, or the data set index); for the seed, the state carries it, so
  the resume is accepted and continues the saved stream;
* **the cache key**: both servers use the same ``--cache`` folder; a setting that changes a
  record's pixels must get a cache file of its own, a setting applied after the cache
  (dtype, layout, normalisation, augmentations, order) must share the file.

Settings that change nothing the trainer receives (workers, prefetch, read threads, shared
memory, the cache itself) are rows too: identical batches, the resume accepted, one cache file.
`test_every_serve_flag_is_in_the_table` keeps the table complete: a new flag must be placed.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loader_client import ConfigError, LoaderClient
from loader_server.cli import build_parser, subparser

from .conftest import SERVER_READY_TIMEOUT_S, RunningServer, unique_label_list

N = 14  # with batches of 4: 3 batches with drop-last, 4 with keep-last
BASE = ("--batch-size", "4", "--size", "8x8", "--workers", "1")


class Row(NamedTuple):
    name: str
    base: tuple[str, ...]  # flags of both servers (after BASE)
    change: tuple[str, ...]  # the setting under test, added to the second server
    differs: str  # what the trainer sees differ: x, y, index, extras, steps, or "" (nothing)
    resume: str  # "settings" / "index" / "both": refused naming it; "" accepted (continues the saved stream)
    cache: str  # "own": a cache file of its own; "shared": the base's file; "": no cache with this row
    data: str = "images"


ROWS = [
    # pixels, before the cache: a record of their own
    Row("size", (), ("--size", "10x8"), "x", "settings", "own"),
    Row("resize letterbox", (), ("--resize", "letterbox"), "x", "settings", "own"),
    Row("resize crop", (), ("--resize", "crop"), "x", "settings", "own"),
    Row("interpolation nearest", (), ("--interpolation", "nearest"), "x", "settings", "own"),
    Row("interpolation area", (), ("--interpolation", "area"), "x", "settings", "own"),
    Row("interpolation cubic", (), ("--interpolation", "cubic"), "x", "settings", "own"),
    Row("interpolation lanczos", (), ("--interpolation", "lanczos"), "x", "settings", "own"),
    Row("pad-value", ("--resize", "letterbox"), ("--pad-value", "9"), "x", "settings", "own"),
    Row("color bgr", (), ("--color", "bgr"), "x", "settings", "own"),
    Row("color gray", (), ("--color", "gray"), "x", "settings", "own"),
    Row("no-reduced-decode", (), ("--no-reduced-decode",), "x", "settings", "own"),  # JPEGs 6x the output
    Row("cache-size", ("--augment", "rrc", "--cache-size", "16"), ("--cache-size", "24"), "x", "settings", "own"),
    # pixels, after the cache: the same records
    Row("dtype float32", (), ("--dtype", "float32"), "x", "settings", "shared"),
    Row("layout chw", (), ("--layout", "chw"), "x", "settings", "shared"),
    Row("mean and std", ("--dtype", "float32"), ("--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2"), "x",
        "settings", "shared"),
    Row("augment flip", (), ("--augment", "flip(1)"), "x", "settings", "shared"),
    Row("augment jitter", (), ("--augment", "jitter(0.8)"), "x", "settings", "shared"),
    Row("transform", (), ("--transform", "tests.user_code_samples:invert"), "x", "settings", ""),
    # order and batches
    Row("seed", (), ("--seed", "9"), "index", "", "shared"),  # the state carries the seed
    Row("no-shuffle", (), ("--no-shuffle",), "index", "settings", "shared"),
    Row("mode random", (), ("--mode", "random"), "index", "settings", "shared"),
    Row("steps-per-epoch", ("--mode", "random"), ("--steps-per-epoch", "2"), "steps", "settings", "shared"),
    Row("keep-last", (), ("--keep-last",), "steps", "settings", "shared"),
    Row("batch-size", (), ("--batch-size", "3"), "index", "settings", "shared"),
    # labels and extra arrays
    Row("collate", (), ("--collate", "tests.user_code_samples:weights"), "extras", "settings", "shared"),
    # shares of the data set: part of the index's fingerprint, and records numbered within the subset
    Row("subset", ("--subset", "train", "--val-fraction", "0.5", "--keep-last"), ("--subset", "val"), "y", "index",
        "own"),
    Row("split-seed", ("--subset", "val", "--val-fraction", "0.5", "--keep-last"), ("--split-seed", "1"), "y",
        "index", "own"),
    Row("val-fraction", ("--subset", "val", "--val-fraction", "0.5", "--keep-last"), ("--val-fraction", "0.25"),
        "y", "index", "own"),
    # ragged arrays: padded length, where padding goes, which end is cut
    Row("maxlen", ("--maxlen", "4"), ("--maxlen", "3"), "x", "index", "", "ragged"),
    Row("pad", ("--maxlen", "4"), ("--pad", "post"), "x", "index", "", "ragged"),
    Row("truncate", ("--maxlen", "4"), ("--truncate", "post"), "x", "index", "", "ragged"),
    # which part of a tar sample or a Parquet row is the label or the image: the index (labels, places) is
    # part of the cache key, as for list files
    Row("json-label", ("--json-label", "a"), ("--json-label", "b"), "y", "index", "own", "tar"),
    Row("label-column", (), ("--label-column", "label2"), "y", "index", "own", "parquet"),
    Row("image-column", (), ("--image-column", "image2"), "x", "index", "own", "parquet"),
    # nothing the trainer receives: same batches, the resume accepted, the same records
    Row("workers", (), ("--workers", "2"), "", "", "shared"),
    Row("prefetch", (), ("--prefetch", "3"), "", "", "shared"),
    Row("read-threads", (), ("--read-threads", "2"), "", "", "shared"),
    Row("read-ahead-tasks", (), ("--read-ahead-tasks", "0"), "", "", "shared"),
    # (no effect on local data; pipelined reads from a store are bitwise those of local disk: tests/test_s3.py)
    Row("read-connections", (), ("--read-connections", "0"), "", "", "shared"),
    Row("no-shm", (), ("--no-shm",), "", "", "shared"),
    Row("drop-last (the default)", (), ("--drop-last",), "", "", "shared"),
    Row("log settings", (), ("--log-level", "DEBUG", "--log-interval-s", "1"), "", "", "shared"),
    Row("limits", (), ("--max-clients", "5", "--batch-timeout-s", "60", "--max-file-bytes", "1000000"), "", "",
        "shared"),
]

#: Serve flags that change nothing the table can show here, each with the reason.
NOT_IN_TABLE = {
    "--data": "another data set: tests/test_resume_guard.py", "--labels": "arrays: tests/test_resume_guard.py",
    "--offsets": "ragged arrays: tests/test_resume_guard.py",
    "--bind": "where it listens", "--curve-dir": "encryption", "--insecure": "who may connect",
    "--ipc-mode": "who may connect",
    "--unordered": "order follows timing (documented not reproducible)",
    "--on-error": "only with bad files: tests/test_guards.py", "--max-bad": "only with bad files",
    "--max-pixels": "only with images over it: tests/test_guards.py", "--simulate-read-latency-ms": "speed only",
    "--heartbeat-s": "liveness: tests/test_liveness.py", "--client-timeout-s": "liveness: tests/test_liveness.py",
    "--max-message-bytes": "a bound", "--max-connections-per-host": "a bound",
    "--max-clients-per-peer": "a bound: tests/test_fairness.py", "--log-format": "logs only",
    "--metrics-port": "metrics only", "--metrics-host": "metrics only", "--cache": "the cache rows below",
    "--index-dir": "where the tar or Parquet index is kept: tests/test_packed.py",
    "--page-cache-mb": "memory for decompressed Parquet pages, never which bytes: the test below, tests/test_packed.py",
    "--config": "a file of the same settings", "--print-config": "prints them", "--help": "help",
    "--workers-min": "the worker count: tests/test_sharing.py", "--workers-max": "the worker count",
    "--target-stall": "the worker count", "--scale-interval-s": "when the worker count changes",
    "--share-window": "which batches a share keeps: tests/test_sharing.py",
    "--scan": "only with missing or unreadable files: tests/test_scan.py", "--no-scan": "the same",
    "--watch-stdin": "when the server stops: tests/test_local_server.py",
    # how bytes are fetched from a store, never which: REMOTE_ROWS below (in process, over http://), tests/test_s3.py
    "--remote-attempts": "REMOTE_ROWS", "--remote-timeout-s": "REMOTE_ROWS", "--remote-inflight-mb": "REMOTE_ROWS",
    "--remote-recheck-s": "REMOTE_ROWS",
}


def _flags_of(row: Row) -> set[str]:
    return {a for a in (*row.base, *row.change) if a.startswith("--")}


def test_every_serve_flag_is_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new setting must be placed: a row of what it changes, or a reason it changes nothing here."""
    monkeypatch.setenv("COLUMNS", "300")
    flags = set(re.findall(r"^\s+(--[a-z][a-z-]*)", subparser(build_parser(), "serve").format_help(), re.M))
    covered = set().union(*(_flags_of(r) for r in ROWS), NOT_IN_TABLE, {"--batch-size", "--workers"})
    assert flags - covered == set(), f"serve flags in no row of the settings table: {sorted(flags - covered)}"


# ---------------------------------------------------------------------------- servers
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    root = tmp_path_factory.mktemp("effects")
    images = unique_label_list(root / "images", N, size=(48, 36))  # JPEGs (and some PNGs) 6x the output
    lengths = np.array([1, 5, 3, 6, 2, 4] * 3)[:N]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.save(root / "values.npy", np.arange(1, offsets[-1] + 1, dtype=np.int32))
    np.save(root / "offsets.npy", offsets)
    np.save(root / "y.npy", np.arange(N, dtype=np.int64))
    ragged = ("--offsets", str(root / "offsets.npy"), "--labels", str(root / "y.npy"))
    # The same JPEGs as a tar shard (two JSON label fields) and a Parquet table (two label and image columns)
    jpegs = [(images.parent / line.split()[0]).read_bytes() for line in images.read_text().splitlines()]
    shard = root / "shards" / "train-0.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, jpeg in enumerate(jpegs):
            for name, body in ((f"{i:05d}.jpg", jpeg), (f"{i:05d}.json", json.dumps({"a": i, "b": N - i}).encode())):
                member = tarfile.TarInfo(name)
                member.size = len(body)
                tar.addfile(member, io.BytesIO(body))
    table = root / "table" / "train.parquet"
    table.parent.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b in jpegs],
                             "image2": [{"bytes": b, "path": None} for b in jpegs[::-1]],
                             "label": list(range(N)), "label2": [N - i for i in range(N)]}), table)
    return {"images": (images, ("--size", "8x8")), "ragged": (root / "values.npy", ragged),
            "tar": (shard, ("--size", "8x8")), "parquet": (table, ("--size", "8x8"))}


@pytest.fixture(scope="module")
def base_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[Any, ...], RunningServer]]:
    """Base servers, started once per distinct base and shared by the rows that use it."""
    servers: dict[tuple[Any, ...], RunningServer] = {}
    yield servers
    for server in servers.values():
        server.stop()


def _serve(row: Row, data: dict[str, Any], cache: Path, *flags: str) -> tuple[Path, list[str]]:
    path, kind_flags = data[row.data]
    base = [a for a in BASE if row.data != "ragged" or a not in ("--size", "8x8")]
    return path, [*base, *kind_flags, *flags, *(("--cache", str(cache)) if row.cache else ())]


def _epoch(endpoint: str, state: dict[str, Any] | None = None) -> list[tuple[np.ndarray, ...]]:
    with LoaderClient(endpoint, timeout_s=30, state=state) as client:
        return [tuple(a.copy() for a in (*batch, client.last.indices)) for batch in client.epoch()]  # type: ignore[union-attr]


def _component(epoch: list[tuple[np.ndarray, ...]], what: str) -> Any:
    if what == "steps":
        return len(epoch)
    if what == "extras":
        return [len(b) for b in epoch]
    k = {"x": 0, "y": 1, "index": -1}[what]
    return [b[k] for b in epoch]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)  # type: ignore[union-attr]
    return bool(a == b)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_setting_changes_the_batch_the_resume_guard_and_the_cache_key_together(
        start_server: Any, base_servers: dict[tuple[Any, ...], RunningServer], data: dict[str, Any],
        tmp_path_factory: pytest.TempPathFactory, row: Row) -> None:
    cache = Path(str(tmp_path_factory.getbasetemp())) / "shared-cache"  # every row's servers use this folder
    path, base_args = _serve(row, data, cache, *row.base)
    key = (row.data, tuple(base_args))
    if key not in base_servers:
        folder = tmp_path_factory.mktemp("base")
        server = RunningServer(path, "--heartbeat-s", "0.2", *base_args, endpoint=f"ipc://{folder}/s.sock",
                               log=folder / "server.log")
        base_servers[key] = server
        server.wait_ready(SERVER_READY_TIMEOUT_S)
    base = base_servers[key]
    before = _epoch(base.endpoint)  # fills the base's records, if it has a cache
    files_before = set(cache.glob("loader-cache-*.bin"))
    _, variant_args = _serve(row, data, cache, *row.base, *row.change)
    variant = start_server(path, *variant_args)
    after = _epoch(variant.endpoint)

    # The batch
    if row.differs:
        assert not _equal(_component(before, row.differs), _component(after, row.differs)), \
            f"{row.change} did not change the {row.differs} a trainer receives"
    else:
        assert _equal(before, after), f"{row.change} changed the batches"
    # The resume guard: a state saved on the base after one batch, resumed on the variant
    with LoaderClient(base.endpoint, timeout_s=30) as client:
        client.next()
        state = client.state_dict()
    if row.resume:
        what = {"settings": r"the batch settings \([^)]*\) differ", "index": "the data set index",
                "both": r"the batch settings \([^)]*\) and the data set index"}[row.resume]
        with pytest.raises(ConfigError, match=f"cannot resume: {what}"):
            LoaderClient(variant.endpoint, timeout_s=30, state=state)
    else:
        assert _equal(_epoch(variant.endpoint, state), before[1:]), "the resume did not continue the saved stream"
    # The cache key
    new = set(cache.glob("loader-cache-*.bin")) - files_before
    if row.cache == "own":
        assert len(new) == 1, f"{row.change} changes the records' pixels but shares the cache file of {row.base}"
    elif row.cache == "shared":
        assert not new, f"{row.change} is applied after the cache but got a cache file of its own: {new}"


# ---------------------------------------------------------------------------- the same table, in process
def _fingerprints(row: Row, data: dict[str, Any], flags: tuple[str, ...], cache: Path) -> tuple[str, str, str]:
    """(settings fingerprint, data set fingerprint, cache key) of `serve` with `flags`: the one place that
    names the functions computing them (the behavioural test above sees them through a server)."""
    from loader_server.cli import config_from_args
    from loader_server.data.datasets import load_dataset
    from loader_server.pipeline.cache import cache_key

    path, args = _serve(row, data, cache, *flags)
    config = config_from_args(build_parser().parse_args(["serve", "--data", str(path), *args]))
    index = load_dataset(config)
    return config.fingerprint(), index.fingerprint(), cache_key(config, index) if row.cache else ""


def test_the_fingerprint_and_the_cache_key_follow_the_table(data: dict[str, Any], tmp_path: Path) -> None:
    """In process, for every row: the settings' or the data set's fingerprint and the cache key change
    exactly where the table says (fast, and what the mutation tool runs against the pure core)."""
    wrong = []
    for row in ROWS:
        settings0, index0, key0 = _fingerprints(row, data, row.base, tmp_path)
        settings1, index1, key1 = _fingerprints(row, data, (*row.base, *row.change), tmp_path)
        expected = (row.resume in ("settings", "both"), row.resume in ("index", "both"), row.cache == "own")
        got = (settings0 != settings1, index0 != index1, key0 != key1)
        if got != expected:
            wrong.append(f"{row.name}: (settings, index, cache key) changed {got}, expected {expected}")
    assert not wrong, "\n".join(wrong)


def test_a_served_fingerprint_is_two_16_digit_hashes(data: dict[str, Any], tmp_path: Path) -> None:
    """settings-index, each 16 hex digits: the form every saved state holds (a client refuses over 64 characters)."""
    row = ROWS[0]
    settings, index, _ = _fingerprints(row, data, (), tmp_path)
    assert re.fullmatch(r"[0-9a-f]{16}", settings) and re.fullmatch(r"[0-9a-f]{16}", index), (settings, index)


# ---------------------------------------------------------------------------- the object-store settings
#: `--remote-*` change how bytes are fetched from a store (attempts, time, memory, how often a change is
#: looked for), never which bytes: the settings' fingerprint, the data set's and the cache key stay the same.
#: They live in DataOptions, which test_options does not hash; these rows state it, on a data set that is
#: really read over http:// (a list file and its images served from this process).
REMOTE_ROWS = [
    ("--remote-attempts", "3", "attempts", 3),
    ("--remote-timeout-s", "5", "timeout_s", 5.0),
    ("--remote-inflight-mb", "1", "inflight_bytes", 1 << 20),
    ("--remote-recheck-s", "0", "recheck_s", 0.0),
]


@pytest.fixture(scope="module")
def over_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    listfile = unique_label_list(tmp_path_factory.mktemp("http") / "data", 6, size=(16, 12))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(listfile.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{listfile.name}"
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.parametrize(("flag", "value", "field", "expected"), REMOTE_ROWS, ids=[r[0] for r in REMOTE_ROWS])
def test_object_store_settings_leave_both_fingerprints_and_the_cache_key_alone(
        over_http: str, flag: str, value: str, field: str, expected: float) -> None:
    from loader_server.cli import config_from_args
    from loader_server.data.datasets import load_dataset
    from loader_server.data.remote import reads_remote, storage_of
    from loader_server.options import DataOptions, options_of
    from loader_server.pipeline.cache import cache_key

    seen = []
    for flags in ((), (flag, value)):
        config = config_from_args(build_parser().parse_args(
            ["serve", "--data", over_http, "--size", "8x8", "--batch-size", "2", *flags]))
        index = load_dataset(config)
        assert reads_remote(index), "the data set is not read over http://"
        seen.append((config.fingerprint(), index.fingerprint(), cache_key(config, index)))
    storage = storage_of(options_of(config, DataOptions))
    assert getattr(storage.policy, field, getattr(storage, field, None)) == expected, "the setting was not applied"
    assert seen[0] == seen[1], f"{flag} {value} changed (settings fingerprint, data set fingerprint, cache key)"


def test_the_page_cache_leaves_both_fingerprints_and_the_cache_key_alone(tmp_path: Path) -> None:
    """--page-cache-mb bounds the memory of a worker's decompressed Parquet pages, never which bytes are read:
    the settings' fingerprint, the data set's and the cache key stay the same, at both ends of its range."""
    from loader_server.cli import config_from_args
    from loader_server.config import ServerConfig
    from loader_server.data.datasets import load_dataset
    from loader_server.pipeline.cache import cache_key
    from loader_server.sample_data import write_parquet

    files = load_dataset(ServerConfig(data=str(unique_label_list(tmp_path / "files", 6, size=(16, 12)))))
    tables = write_parquet(files, tmp_path / "zstd", 3, row_group_size=2, compression="zstd")
    seen = []
    for flags in ((), ("--page-cache-mb", "0"), ("--page-cache-mb", "1048576")):
        config = config_from_args(build_parser().parse_args(
            ["serve", "--data", tables, "--size", "8x8", "--batch-size", "2", *flags]))
        index = load_dataset(config)
        applied = index.page_cache_bytes  # type: ignore[attr-defined]
        assert applied == int(config.page_cache_mb * (1 << 20)), "the setting was not applied"
        seen.append((config.fingerprint(), index.fingerprint(), cache_key(config, index)))
    assert seen[0] == seen[1] == seen[2], "--page-cache-mb changed (settings fingerprint, data set fingerprint, cache key)"
