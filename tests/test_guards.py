"""Guards tested where they bite: rank range, count limits at N and N+1, a worker killed while it
provably holds a task, in-order delivery past a stuck batch, the skip policy and the CURVE
allow-list, each seen by a second test besides the one that first promised it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from loader_client import (
    AuthenticationError,
    BadSampleError,
    LoaderClient,
    ProtocolError,
    WorkerCrashedError,
    health,
    protocol,
    server_stats,
)
from loader_server.config import ServerConfig
from loader_server.pipeline.batch import _substitute
from loader_server.pipeline.decode import DecodeError, Decoder

from .conftest import free_port, unique_label_list, wait_until, write_image

MAX_CREDIT = 64  # loader_client.contract.messages.MAX_CREDIT, written out: a changed cap must fail here
MAX_REQUEST_BYTES = 64 * 1024  # loader_server.runtime.transport.MAX_REQUEST_BYTES
MAX_TASK_RETRIES = 3  # README: "the same batch kills or hangs 3 workers" -> WorkerCrashedError
MAX_HEADER_BYTES = 1 << 20  # loader_client.protocol.MAX_HEADER_BYTES: a header of at most 1 MiB


# ---------------------------------------------------------------------------- helpers
@contextmanager
def raw_sockets(endpoint: str) -> Iterator[Any]:
    """A factory of raw DEALER sockets to `endpoint` that speak msgpack by hand."""
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def new() -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        socks.append(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    try:
        yield new
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def hello(sock: zmq.Socket, **fields: Any) -> None:
    sock.send(msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "hello", "shm": False, **fields}))


def reply(sock: zmq.Socket, timeout_s: float = 10.0) -> dict[str, Any]:
    """The next message that is not a heartbeat."""
    deadline = time.monotonic() + timeout_s
    while sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        header = protocol.unpack(sock.recv_multipart()[0])
        if header["t"] != "heartbeat":
            return header
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no answer within {timeout_s} s")


def count_batches(sock: zmq.Socket, quiet_s: float = 1.5, limit_s: float = 30.0) -> int:
    """Batches received until none has come for `quiet_s` (heartbeats keep coming meanwhile)."""
    n = 0
    deadline = time.monotonic() + limit_s
    last = time.monotonic()
    while time.monotonic() - last < quiet_s:
        assert time.monotonic() < deadline, f"batches still coming after {limit_s} s"
        if sock.poll(50) and protocol.unpack(sock.recv_multipart()[0])["t"] == "batch":
            n += 1
            last = time.monotonic()
    return n


def receive_batches(sock: zmq.Socket, n: int, limit_s: float = 30.0) -> None:
    """Exactly `n` batches arrive (however slowly the machine builds them): then none more for a while."""
    got = 0
    deadline = time.monotonic() + limit_s
    while got < n:
        assert time.monotonic() < deadline, f"only {got} of {n} batches within {limit_s} s"
        if sock.poll(50) and protocol.unpack(sock.recv_multipart()[0])["t"] == "batch":
            got += 1
    assert count_batches(sock, quiet_s=1.5) == 0, f"more than {n} batches"


def fifo_waiters(pids: list[int], fifo: Path) -> list[int]:
    """Those of `pids` with a thread blocked opening a FIFO (`fifo` has no writer yet)."""
    out = []
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
            except OSError:
                continue
            if "wait_for_partner" in wchan or "fifo_open" in wchan:
                out.append(pid)
                break
    return out


def plant_fifo(listfile: Path, sample: int) -> tuple[Path, Path, bytes]:
    """Turn `sample`'s file into a FIFO (opening it blocks); returns (path, second name, real bytes)."""
    rel = listfile.read_text().splitlines()[sample].split()[0]
    path = listfile.parent / rel
    data = path.read_bytes()
    path.unlink()
    os.mkfifo(path)
    alias = path.with_name(path.name + ".fifo")
    os.link(path, alias)  # a second name for the same FIFO, to release a reader after `path` is restored
    return path, alias, data


def release_fifo(path: Path, alias: Path, data: bytes) -> None:
    """Put the real file back at `path`, then hand `data` to the reader blocked on the FIFO."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # later reads (other epochs) get the file itself
    fd = os.open(alias, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO here would mean no reader is blocked
    try:
        os.set_blocking(fd, True)
        os.write(fd, data)
    finally:
        os.close(fd)


def epochs_exact(got: list[tuple[int, int, np.ndarray]], n: int, steps: int, epochs: int) -> None:
    assert [(e, b) for e, b, _ in got] == [(e, b) for e in range(epochs) for b in range(steps)]
    for epoch in range(epochs):
        labels = np.concatenate([y for e, _, y in got if e == epoch])
        assert sorted(labels.tolist()) == list(range(n)), f"epoch {epoch} is not exactly once"


def take(client: LoaderClient, count: int) -> list[tuple[int, int, np.ndarray]]:
    out = []
    for _ in range(count):
        _, y = client.next()
        assert client.last is not None
        out.append((client.last.epoch, client.last.batch, y.copy()))
    return out


# ---------------------------------------------------------------------------- rank range
@pytest.mark.parametrize(("rank", "world"), [(2, 2), (3, 2), (1, 1), (-1, 2), (0, 0), (0, -1)])
def test_client_refuses_out_of_range_rank_before_connecting(tmp_path: Path, rank: int, world: int) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"  # no server: a check after connecting would time out
    started = time.monotonic()
    with pytest.raises(ValueError) as info:
        LoaderClient(endpoint, timeout_s=5, rank=rank, world_size=world)
    assert time.monotonic() - started < 1
    assert f"`rank` {rank} of `world_size` {world}" in str(info.value)


def test_client_refuses_out_of_range_rank_from_a_saved_state(tmp_path: Path) -> None:
    state = {"epoch": 0, "batch": 0, "seed": 1, "rank": 4, "world_size": 4, "fingerprint": "x"}
    with pytest.raises(ValueError, match=r'`state\["rank"\]` 4 of `state\["world_size"\]` 4'):
        LoaderClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=5, state=state)


@pytest.fixture
def small_server(start_server: Any, tmp_path: Path) -> Any:
    listfile = unique_label_list(tmp_path / "data", 16, size=(8, 8))
    return start_server(listfile, "--batch-size", "2", "--size", "8x8", "--workers", "1", "--seed", "1")


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (1, 1), (7, 3), (-1, 2), (0, 0)])
def test_server_refuses_out_of_range_rank_naming_both(small_server: Any, rank: int, world: int) -> None:
    with raw_sockets(small_server.endpoint) as raw:
        sock = raw()
        hello(sock, rank=rank, world_size=world, credit=2)
        answer = reply(sock)
        assert answer["t"] == "error" and answer["kind"] == "config", answer
        assert f"rank {rank} of world_size {world}" in answer["message"]
        ok = raw()  # the last rank in range is served (so the refusal is about the range, not ranks at all)
        hello(ok, rank=max(0, world - 1), world_size=max(1, world), credit=1)
        assert reply(ok)["t"] == "welcome"
        assert reply(ok)["t"] == "batch"


def test_world_size_limit_at_and_over(small_server: Any) -> None:
    """A world of 65,536 ranks passes the message schema (the session then says it leaves no full batch
    of 16 samples); one of 65,537 is refused by the schema itself, naming the field and its range."""
    with raw_sockets(small_server.endpoint) as raw:
        at = raw()
        hello(at, rank=65_535, world_size=65_536, credit=1)
        answer = reply(at)
        assert answer["t"] == "error" and "world_size 65536 leaves no full batch" in answer["message"], answer
        over = raw()
        hello(over, rank=0, world_size=65_537, credit=1)
        answer = reply(over)
        assert answer["t"] == "error" and "field 'world_size' must be between" in answer["message"], answer
        assert "65536, got 65537" in answer["message"]


def test_refused_rank_opens_no_stream(small_server: Any) -> None:
    with raw_sockets(small_server.endpoint) as raw:
        sock = raw()
        hello(sock, rank=2, world_size=2, credit=8)
        assert reply(sock)["t"] == "error"
        assert count_batches(sock, quiet_s=1.0) == 0  # no batch of a third share of two
    assert server_stats(small_server.endpoint)["clients"] == []
    assert "refused client" in small_server.log_text()


def test_hello_start_position_and_seed_limits(small_server: Any) -> None:
    steps = 16 // 2
    cases = [({"batch": steps - 1}, "welcome"), ({"batch": steps}, "error"), ({"epoch": -1}, "error"),
             ({"seed": 2**63 - 1}, "welcome"), ({"seed": 2**63}, "error")]
    with raw_sockets(small_server.endpoint) as raw:
        for fields, expected in cases:
            sock = raw()
            hello(sock, credit=0, **fields)
            answer = reply(sock)
            assert answer["t"] == expected, (fields, answer)
            if expected == "welcome":
                assert answer["batch"] == fields.get("batch", 0)
                assert answer["seed"] == fields.get("seed", 1)


# ---------------------------------------------------------------------------- credit bound
@pytest.mark.parametrize(("hello_credit", "more", "expected"),
                         [(MAX_CREDIT - 1, 0, MAX_CREDIT - 1), (MAX_CREDIT, 0, MAX_CREDIT),
                          (MAX_CREDIT + 1, 0, MAX_CREDIT), (MAX_CREDIT - 4, 10, MAX_CREDIT)])
def test_credit_is_capped_at_the_limit(start_server: Any, tmp_path: Path, hello_credit: int, more: int,
                                       expected: int) -> None:
    listfile = unique_label_list(tmp_path / "data", 16, size=(8, 8))
    # Batch 0 cannot be built until the FIFO is released, and nothing overtakes it: no batch leaves
    # before all the credit has arrived. (Sent batches use credit up: a grant that arrives after
    # some were sent is rightly not clamped. Seen under load: 70 batches for 60 + 10.)
    fifo, alias, data = plant_fifo(listfile, 0)
    server = start_server(listfile, "--batch-size", "2", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--batch-timeout-s", "100")
    with raw_sockets(server.endpoint) as raw:
        sock = raw()  # a client that asks for credit and never reads its batches (never grants more)
        hello(sock, credit=hello_credit)
        assert reply(sock)["t"] == "welcome"
        if more:
            sock.send(protocol.pack("credit", n=more))
        sock.send(protocol.pack("health"))  # answered in order: the credit before it has been counted
        assert reply(sock)["t"] == "health"
        wait_until(lambda: fifo_waiters(server.workers(), fifo) != [], 20, "the worker to block on the FIFO")
        release_fifo(fifo, alias, data)
        receive_batches(sock, expected)
        sock.send(protocol.pack("credit", n=1))  # one credit more: exactly one batch more
        receive_batches(sock, 1)


# ---------------------------------------------------------------------------- wire-size limits
def padded(size: int, **fields: Any) -> bytes:
    """A msgpack map with `fields` and a string pad, exactly `size` bytes long."""
    base = {"v": protocol.PROTOCOL_VERSION, **fields}
    for pad in range(size - 40, size + 1):  # the pad's own length prefix grows by steps
        data = msgpack.packb({**base, "client": "p" * pad})
        if len(data) == size:
            return data
    raise AssertionError(f"cannot pad to {size} bytes")


def test_request_size_limit_at_and_over(small_server: Any) -> None:
    with raw_sockets(small_server.endpoint) as raw:
        at = raw()
        at.send(padded(MAX_REQUEST_BYTES, t="hello", shm=False, credit=0))
        assert reply(at)["t"] == "error"  # read and answered (its 64 KiB name is refused by the schema)
        over = raw()  # one byte more: the server drops the connection without a word
        over.send(padded(MAX_REQUEST_BYTES + 1, t="hello", shm=False, credit=0))
        assert not over.poll(2000)


def test_header_size_limit_at_and_over() -> None:
    at = padded(MAX_HEADER_BYTES, t="x")
    assert len(protocol.unpack(at)["client"]) > 0
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        protocol.unpack(padded(MAX_HEADER_BYTES + 1, t="x"))


def test_message_bytes_and_dimension_limits_at_and_over() -> None:
    assert protocol.build_arrays([["x", "|u1", [16]]], [b"a" * 16], max_bytes=16)["x"].nbytes == 16
    with pytest.raises(ProtocolError, match="exceeds 15 bytes"):
        protocol.build_arrays([["x", "|u1", [16]]], [b"a" * 16], max_bytes=15)
    assert protocol.build_arrays([["x", "|u1", [1] * 8]], [b"a"])["x"].ndim == 8
    with pytest.raises(ProtocolError, match="not a list of non-negative ints"):
        protocol.build_arrays([["x", "|u1", [1] * 9]], [b"a"])


# ---------------------------------------------------------------------------- --max-pixels
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])  # header-read sizes, and after-decode sizes
def test_max_pixels_at_the_limit_and_one_over(ext: str) -> None:
    data = cv2.imencode(ext, np.full((30, 40, 3), 90, np.uint8))[1].tobytes()
    def cfg(max_pixels: int) -> ServerConfig:
        return ServerConfig(data="unused", size=(8, 8), workers=1, max_pixels=max_pixels)

    assert Decoder(cfg(40 * 30)).decode(data, "f" + ext, reduce=False).shape == (30, 40, 3)
    with pytest.raises(DecodeError, match=f"40x30 pixels exceeds --max-pixels {40 * 30 - 1}"):
        Decoder(cfg(40 * 30 - 1)).decode(data, "f" + ext)


def test_server_max_pixels_at_the_limit_and_one_over(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8, size=(40, 30))
    args = ("--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle")
    at = start_server(listfile, *args, "--max-pixels", str(40 * 30))
    with LoaderClient(at.endpoint, timeout_s=20) as client:
        assert sorted(np.concatenate([client.next()[1] for _ in range(2)]).tolist()) == list(range(8))
    over = start_server(listfile, *args, "--max-pixels", str(40 * 30 - 1))
    with LoaderClient(over.endpoint, timeout_s=20) as client:
        with pytest.raises(BadSampleError, match="exceeds --max-pixels 1199"):
            client.next()


# ---------------------------------------------------------------------------- --max-bad
@pytest.mark.parametrize("form", ["2", "5%"])  # a count, and 5% of 40 samples: both a limit of 2
@pytest.mark.parametrize("bad", [2, 3])
def test_max_bad_tolerates_exactly_the_limit(start_server: Any, tmp_path: Path, form: str, bad: int) -> None:
    n = 40
    listfile = unique_label_list(tmp_path / "data", n, size=(16, 12))
    lines = listfile.read_text().splitlines()
    broken = [1, 6, 11][:bad]  # in the first three batches
    for i in broken:
        (listfile.parent / lines[i].split()[0]).write_bytes(b"")
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--on-error", "skip", "--max-bad", form, "--no-scan")  # the workers meet them
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        if bad <= 2:
            got = [client.next()[1] for _ in range(2 * client.steps_per_epoch)]  # each bad file seen twice
            assert not set(np.concatenate(got).tolist()) & set(broken)
            assert server_stats(server.endpoint)["bad_files"] == bad
        else:
            with pytest.raises(BadSampleError, match=r"3 bad files exceed --max-bad \(2\)"):
                for _ in range(client.steps_per_epoch):
                    client.next()


# ---------------------------------------------------------------------------- task retries
@pytest.mark.parametrize("crashes", [MAX_TASK_RETRIES - 1, MAX_TASK_RETRIES])
def test_batch_that_kills_workers_is_retried_until_the_limit(start_server: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, crashes: int) -> None:
    n = 16
    listfile = unique_label_list(tmp_path / "data", n)  # sample 5 (in batch 0) kills its worker
    monkeypatch.setenv("CRASH_SAMPLES_COUNTER", str(tmp_path / "crashes"))
    monkeypatch.setenv("CRASH_SAMPLES_TIMES", str(crashes))
    # The crash is in the first batch a worker holds: a worker that dies just after sending a
    # result can lose it (unsent when the process ends), and the server then blames the batch
    # it built before, which would make the count of attempts vary from run to run.
    server = start_server(listfile, "--batch-size", "8", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--transform", "tests.crash_samples:crash_on_marked")
    with LoaderClient(server.endpoint, timeout_s=10) as client:
        if crashes < MAX_TASK_RETRIES:
            epochs_exact(take(client, 2 * 2), n, 2, 2)  # then delivered, every sample once per epoch
        else:
            with pytest.raises(WorkerCrashedError, match=f"epoch 0 batch 0: its worker died .* {crashes} times"):
                client.next()
    assert (tmp_path / "crashes").read_text() == "x" * crashes
    assert server.log_text().count("died with exit code 1") == crashes


# ---------------------------------------------------------------------------- worker killed holding a task
def test_worker_killed_while_holding_a_task_has_it_reissued(start_server: Any, tmp_path: Path) -> None:
    n = 24
    listfile = unique_label_list(tmp_path / "data", n)
    fifo, alias, data = plant_fifo(listfile, 6)  # batch 1: its worker blocks until the test says so
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "2", "--no-shuffle",
                          "--batch-timeout-s", "100", "--prefetch", "4")  # no batch of epoch 1 (the FIFO again) yet
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        got = take(client, 1)
        wait_until(lambda: len(fifo_waiters(server.workers(), fifo)) == 1, 20, "a worker to block on the FIFO")
        (victim,) = fifo_waiters(server.workers(), fifo)
        held = {w["pid"]: w["tasks"] for w in server_stats(server.endpoint)["workers"]}
        assert held[victim] >= 1  # the server agrees: it holds the blocked batch
        os.kill(victim, 9)
        wait_until(lambda: "re-issuing its" in server.log_text(), 20, "the crash to be logged")
        found = re.search(rf"\(pid {victim}\) died with exit code -9; starting a replacement and "
                          r"re-issuing its (\d+) task\(s\)", server.log_text())
        assert found is not None and int(found[1]) >= 1
        # The batch reached another worker, which now blocks on the FIFO in turn.
        wait_until(lambda: fifo_waiters(server.workers(), fifo) != [], 20, "the batch to be issued again")
        assert victim not in fifo_waiters(server.workers(), fifo)
        release_fifo(fifo, alias, data)
        got += take(client, 2 * 6 - 1)
    epochs_exact(got, n, 6, 2)


def test_in_order_stream_waits_for_a_stuck_batch(start_server: Any, tmp_path: Path) -> None:
    n = 24
    listfile = unique_label_list(tmp_path / "data", n)
    fifo, alias, data = plant_fifo(listfile, 1)  # batch 0 is stuck; the other worker builds later ones
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "2", "--no-shuffle",
                          "--batch-timeout-s", "100", "--prefetch", "4")  # no batch of epoch 1 (the FIFO again) yet
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        wait_until(lambda: fifo_waiters(server.workers(), fifo) != [], 20, "a worker to block on the FIFO")
        wait_until(lambda: server_stats(server.endpoint)["batches_ready"] >= 1, 20, "a later batch to be built")
        assert health(server.endpoint)["batches_sent"] == 0  # nothing overtakes batch 0
        assert len(fifo_waiters(server.workers(), fifo)) == 1
        release_fifo(fifo, alias, data)
        got = take(client, 2 * 6)
    epochs_exact(got, n, 6, 2)


# ---------------------------------------------------------------------------- skip policy (pure logic)
def test_substitute_takes_the_next_good_sample_cyclically() -> None:
    n = 6
    staging = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(10, 10 + n)
    index = np.arange(100, 100 + n)
    bad = [1, 2, 5]
    _substitute(bad, staging, labels, index, DecodeError("f", "empty file"))
    assert index.tolist() == [100, 103, 103, 103, 104, 100]
    assert labels.tolist() == [10, 13, 13, 13, 14, 10]  # labels follow the pixels
    assert staging[:, 0, 0, 0].tolist() == [0, 3, 3, 3, 4, 0]


def test_substitute_refuses_an_all_bad_batch() -> None:
    staging = np.zeros((3, 1, 1, 3), np.uint8)
    with pytest.raises(DecodeError, match="every other sample of its batch is bad too"):
        _substitute([0, 1, 2], staging, np.arange(3), np.arange(3), DecodeError("a.jpg", "empty file"))


# ---------------------------------------------------------------------------- CURVE allow-list
def keygen(where: Path, name: str) -> None:
    subprocess.run([sys.executable, "-m", "loader_server", "keygen", str(where), "--name", name], check=True,
                   capture_output=True, timeout=60)


def test_curve_admits_only_the_listed_keys(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 16, size=(8, 8))
    for name in ("server", "alice", "bob"):
        keygen(tmp_path / name, name)
    (tmp_path / "server" / "clients").mkdir()
    shutil.copy(tmp_path / "bob" / "bob.key", tmp_path / "server" / "clients" / "bob.key")  # only bob
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1",
                          "--curve-dir", str(tmp_path / "server"), endpoint=endpoint)
    server_key = str(tmp_path / "server" / "server.key")
    with LoaderClient(endpoint, timeout_s=20, server_public_key=server_key,
                      client_keys=str(tmp_path / "bob" / "bob.key_secret")) as client:
        assert client.next()[0].shape == (4, 8, 8, 3)
    with pytest.raises(AuthenticationError, match="authentication failed"):  # a valid key, not on the list
        LoaderClient(endpoint, timeout_s=10, server_public_key=server_key,
                     client_keys=str(tmp_path / "alice" / "alice.key_secret"))
    with raw_sockets(endpoint) as raw:  # a plain-text peer never gets an answer
        sock = raw()
        hello(sock, credit=1)
        assert not sock.poll(1500)
    log = server.log_text()
    assert "allowed client key(s)" in log and "refused a client with CURVE key" in log


def test_start_curve_admits_only_listed_keys_in_process(tmp_path: Path) -> None:
    """The server's CURVE set-up on its own, in this process: a listed key talks, another does not."""
    import zmq.auth

    from loader_client.contract.errors import ConfigError
    from loader_client.security import apply_curve
    from loader_server.runtime.transport import start_curve as _start_curve

    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("server", "alice", "bob"):
        zmq.auth.create_certificates(str(keys), name)
    server_dir = tmp_path / "server"
    (server_dir / "clients").mkdir(parents=True)
    shutil.copy(keys / "server.key_secret", server_dir / "server.key_secret")
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    with pytest.raises(ConfigError, match="must hold the public .key file"):  # an empty allow-list
        _start_curve(ctx, router, str(server_dir))
    # a mistyped folder: not "create it with keygen", which would make a key pair no trainer holds
    with pytest.raises(ConfigError, match=r"--curve-dir '.*/srever' is not a folder: pass the folder where "):
        _start_curve(ctx, router, str(tmp_path / "srever"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"cannot load .*/empty/server.key_secret .*create it with"):
        _start_curve(ctx, router, str(tmp_path / "empty"))
    shutil.copy(keys / "bob.key", server_dir / "clients" / "bob.key")
    auth = _start_curve(ctx, router, str(server_dir))
    dealers = []
    try:
        endpoint = f"ipc://{tmp_path}/curve.sock"
        router.bind(endpoint)
        for name, admitted in (("alice", False), ("bob", True)):
            dealer = ctx.socket(zmq.DEALER)
            dealers.append(dealer)
            dealer.setsockopt(zmq.LINGER, 0)
            apply_curve(dealer, str(keys / "server.key"), str(keys / f"{name}.key_secret"))
            dealer.setsockopt(zmq.SNDTIMEO, 5000)  # a refused handshake can tear the pipe down before the send
            dealer.connect(endpoint)
            try:
                dealer.send(name.encode())
            except zmq.Again:
                assert not admitted, f"{name} could not even send"
            if admitted:
                assert router.poll(10_000), name
                assert router.recv_multipart()[1] == name.encode()
            else:
                assert not router.poll(1500), f"{name} is not on the allow-list but got through"
    finally:
        auth.stop()
        for sock in (*dealers, router):
            sock.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------------------- images written for the guards
def test_fifo_helpers_release_exactly_one_reader(tmp_path: Path) -> None:
    listfile = tmp_path / "train.txt"
    write_image(tmp_path / "a.png", np.full((4, 4, 3), 7, np.uint8))
    listfile.write_text("a.png 0\n")
    fifo, alias, data = plant_fifo(listfile, 0)
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(fifo.read_bytes()))
    reader.start()
    wait_until(lambda: fifo_waiters([os.getpid()], fifo) == [os.getpid()], 10, "the reader to block")
    release_fifo(fifo, alias, data)
    reader.join(10)
    assert result == [data] and fifo.read_bytes() == data  # and the path is a plain file again
