"""End to end: real `loader-server serve` processes, real worker processes, real sockets."""

from __future__ import annotations

import os
import signal
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from loader_client import (
    BadSampleError,
    ConfigError,
    LoaderClient,
    LoaderTimeoutError,
    ProtocolVersionError,
    batches,
    protocol,
)
from loader_server.cli import build_parser, config_from_args
from loader_server.data.index import load_index
from loader_server.pipeline.batch import BatchBuilder

from .conftest import alive, unique_label_list, wait_until

N = 45
BATCH = 8
SIZE = "24x16"


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", N)


def consume(client: LoaderClient, epochs: int) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for _ in range(epochs):
        for x, y in client.epoch():
            info = client.last
            assert info is not None
            out.append((info.epoch, info.batch, x.copy(), y.copy(), info.indices.copy()))
    return out


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
@pytest.mark.parametrize("last", ["--drop-last", "--keep-last"])
def test_every_sample_exactly_once_per_epoch(start_server: Any, listfile: Path, transport: str, last: str) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2", last,
                          transport=transport)
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        steps = 5 if last == "--drop-last" else 6  # 45 samples in batches of 8: 5 full, or 6 with the last 5
        assert client.steps_per_epoch == len(client) == steps
        assert client.num_samples == N and client.batch_size == BATCH
        assert client.x_shape == (16, 24, 3) and client.x_dtype == np.uint8
        got = consume(client, 3)
    assert [(e, b) for e, b, *_ in got] == [(e, b) for e in range(3) for b in range(steps)]
    for epoch in range(3):
        labels = np.concatenate([y for e, _, _, y, _ in got if e == epoch])
        indices = np.concatenate([i for e, _, _, _, i in got if e == epoch])
        np.testing.assert_array_equal(labels, indices)  # label i belongs to sample i
        assert len(set(labels.tolist())) == len(labels)  # nothing repeated
        assert len(labels) == (40 if last == "--drop-last" else 45)
    orders = [np.concatenate([i for e, _, _, _, i in got if e == epoch]) for epoch in range(2)]
    assert not np.array_equal(orders[0], orders[1])  # reshuffled each epoch
    # Pixels are exactly what the decoding pipeline gives for those files.
    args = build_parser().parse_args(["serve", "--data", str(listfile), "--batch-size", str(BATCH), "--size", SIZE])
    builder = BatchBuilder(config_from_args(args), load_index(listfile))
    for _, _, x, _, idx in got[:3]:
        np.testing.assert_array_equal(x, builder.build(idx, builder.allocate(len(idx)))["x"])


def test_same_batches_for_1_and_3_workers(start_server: Any, listfile: Path) -> None:
    runs = []
    for workers in ("1", "3"):
        server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", workers,
                              "--seed", "7")
        with LoaderClient(server.endpoint, timeout_s=20) as client:
            runs.append(consume(client, 2))
    assert len(runs[0]) == len(runs[1]) == 2 * (N // BATCH)
    for a, b in zip(*runs, strict=True):
        assert a[:2] == b[:2]
        for u, v in zip(a[2:], b[2:], strict=True):
            np.testing.assert_array_equal(u, v)


def test_timeout_when_no_server_names_the_endpoint(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    started = time.monotonic()
    with pytest.raises(LoaderTimeoutError) as info:
        LoaderClient(endpoint, timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert isinstance(info.value, TimeoutError)
    assert endpoint in str(info.value) and "loader-server serve" in str(info.value)


def test_sigterm_stops_server_and_workers(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "3")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        next(iter(client))
        wait_until(lambda: len(server.workers()) == 3, 10, "3 workers")
        workers = server.workers()
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 10
    assert not any(alive(pid) for pid in workers)
    assert not Path(server.endpoint[len("ipc://"):]).exists()
    assert "stopped after sending" in server.log_text()


def test_server_killed_client_raises_timeout_and_workers_exit(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2")
    client = LoaderClient(server.endpoint, timeout_s=1.5)
    it = iter(client)
    next(it)
    wait_until(lambda: len(server.workers()) == 2, 10, "2 workers")
    workers = server.workers()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    started = time.monotonic()
    with pytest.raises(LoaderTimeoutError, match="silent") as err:
        for _ in range(100):
            next(it)
    assert time.monotonic() - started < 6
    assert str(err.value).endswith("resume from your last state_dict()")  # what to do next, as after a SIGTERM
    wait_until(lambda: not any(alive(p) for p in workers), 10, "orphaned workers to exit")
    client.close()


def test_metadata_class_names_and_writable_arrays(start_server: Any, tmp_path: Path) -> None:
    from loader_server.sample_data import write_sample_images

    root = write_sample_images(tmp_path / "folders", 24, classes=3, min_side=40, max_side=60)
    server = start_server(root, "--batch-size", "4", "--size", "20x10", "--workers", "1", "--no-shuffle")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert client.class_names == ["class_0", "class_1", "class_2"]
        gen = iter(client)
        assert isinstance(gen, types.GeneratorType)
        x, y = next(gen)
        assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
        assert x.flags.writeable and y.flags.writeable
        assert x.shape == (4, 10, 20, 3) and y.dtype == np.int64
        assert y.tolist() == [0, 0, 0, 0]  # file order: class_0 files first
        x[0, 0, 0, 0] = 1  # writable for real
        assert client.last is not None and client.last.indices.tolist() == [0, 1, 2, 3]


def test_batches_generator_is_a_drop_in(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1")
    gen = batches(server.endpoint, timeout_s=20)
    assert isinstance(gen, types.GeneratorType)
    xs = [next(gen) for _ in range(N // BATCH + 2)]  # runs past the epoch boundary
    assert all(x.shape == (BATCH, 16, 24, 3) for x, _ in xs)
    gen.close()


def test_resume_from_state_is_bitwise_identical(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2", "--seed", "3")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        full = consume(client, 2)
    k = 4
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        it = iter(client)
        for _ in range(k):
            next(it)
        state = client.state_dict()
    assert state["epoch"] == 0 and state["batch"] == k
    with LoaderClient(server.endpoint, timeout_s=20, state=state) as client:
        rest = [next(iter_) for iter_ in [iter(client)] for _ in range(len(full) - k)]
        assert client.position == (2, 0)
    for (_, _, x, y, _), (x2, y2) in zip(full[k:], rest, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)


def test_resume_refused_when_settings_differ(start_server: Any, listfile: Path) -> None:
    a = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1")
    with LoaderClient(a.endpoint, timeout_s=20) as client:
        state = client.state_dict()
    b = start_server(listfile, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "1")
    with pytest.raises(ConfigError, match="batch settings"):
        LoaderClient(b.endpoint, timeout_s=20, state=state)


def test_two_ranks_share_one_server(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", SIZE, "--workers", "2")
    clients = [LoaderClient(server.endpoint, timeout_s=20, rank=r, world_size=2) for r in range(2)]
    try:
        assert clients[0].steps_per_epoch == clients[1].steps_per_epoch == 5  # 45 // 2 = 22 samples: 5 batches of 4
        seen = [np.concatenate([i for *_, i in consume(c, 1)]) for c in clients]
    finally:
        for c in clients:
            c.close()
    union = np.concatenate(seen)
    assert len(set(union.tolist())) == len(union) == 40


def test_unordered_mode_still_delivers_every_sample_once(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2", "--unordered",
                          "--keep-last")
    epoch0: dict[int, np.ndarray] = {}
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        it = iter(client)
        # Later batches may overtake a slow one (a worker's first batch warms up its decoders).
        for _ in range(client.steps_per_epoch * 20):
            _, y = next(it)
            assert client.last is not None
            if client.last.epoch == 0:
                assert client.last.batch not in epoch0
                epoch0[client.last.batch] = y
            if len(epoch0) == client.steps_per_epoch:
                break
    assert sorted(np.concatenate(list(epoch0.values())).tolist()) == list(range(N))


def test_bad_file_reaches_the_trainer_with_its_name(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    bad = tmp_path / "data" / "img" / "00003.jpg"
    bad.write_bytes(b"this is not a jpeg")
    server = start_server(listfile, "--batch-size", "4", "--size", SIZE, "--workers", "1", "--no-shuffle")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(BadSampleError) as info:
            next(iter(client))
    assert str(bad) in str(info.value) and "not a decodable image" in str(info.value)
    assert "Traceback" in str(info.value)
    # The server keeps serving: another client gets the same clear error, not a hang.
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(BadSampleError):
            next(iter(client))


def test_every_bad_file_of_a_batch_is_named(start_server: Any, tmp_path: Path) -> None:
    """Three bad files in one batch: the error names all three (not only the first), with their codes."""
    listfile = unique_label_list(tmp_path / "data", 8)
    img = tmp_path / "data" / "img"
    (img / "00001.jpg").unlink()  # missing
    (img / "00002.jpg").write_bytes(b"")  # empty
    (img / "00003.jpg").write_bytes(b"this is not a jpeg")  # undecodable
    server = start_server(listfile, "--batch-size", "4", "--size", SIZE, "--workers", "1", "--no-shuffle",
                          "--no-scan")  # the workers meet them (the scan would stop the server first)
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(BadSampleError) as info:
            client.next()
    err = info.value
    assert err.bad_count == 3 and [(Path(p).name, code) for p, code in err.bad] == [
        ("00001.jpg", "not_found"), ("00002.jpg", "empty"), ("00003.jpg", "undecodable")]
    assert (err.path, err.reason) == (str(img / "00001.jpg"), "not_found")  # the first, as before
    assert "3 of the 4 samples of this batch are bad" in str(err)
    assert all(str(img / name) in str(err) for name in ("00001.jpg", "00002.jpg", "00003.jpg"))


def test_worker_killed_is_replaced_and_epoch_stays_exact(start_server: Any, listfile: Path) -> None:
    # The victim may well be idle here ("re-issuing its 0 task(s)"): this checks the replacement.
    # test_guards.py::test_worker_killed_while_holding_a_task_has_it_reissued kills one that
    # provably holds a batch and checks the re-issue.
    server = start_server(listfile, "--batch-size", "3", "--size", SIZE, "--workers", "2", "--prefetch", "2")
    with LoaderClient(server.endpoint, timeout_s=20, prefetch=1) as client:
        it = iter(client)
        first = [next(it)[1]]
        wait_until(lambda: len(server.workers()) == 2, 10, "2 workers")
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "died with exit code" in server.log_text(), 10, "the crash to be logged")
        rest = [next(it)[1] for _ in range(client.steps_per_epoch * 2 - 1)]
    labels = np.concatenate(first + rest)
    for epoch in range(2):
        part = labels[epoch * (N // 3) * 3 : (epoch + 1) * (N // 3) * 3]
        assert sorted(part.tolist()) == list(range(N))
    log = server.log_text()
    assert f"(pid {victim}) died with exit code -9" in log


def test_protocol_version_mismatch_is_refused_by_the_server(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1")
    with LoaderClient(server.endpoint, timeout_s=20):
        pass  # the server is up
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        import msgpack

        sock.send(msgpack.packb({"v": 99, "t": "hello"}))
        assert sock.poll(10_000), "no answer to a wrong-version hello"
        header = protocol.unpack(sock.recv())
        assert header["t"] == "error" and header["kind"] == "version"
        assert "version 99" in header["message"] and f"version {protocol.PROTOCOL_VERSION}" in header["message"]
        # A client of another version sees both numbers too.
        sock.send(b"\x00garbage")
        assert sock.poll(10_000)
        assert protocol.unpack(sock.recv())["kind"] == "protocol"
    finally:
        sock.close()
        ctx.term()
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        next(iter(client))  # still serving
    assert "refused client" in server.log_text()


def test_client_raises_version_error_from_the_welcome(tmp_path: Path) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/fake.sock"
    router.bind(endpoint)
    try:
        import threading

        def fake_server() -> None:
            if router.poll(10_000):
                ident, _ = router.recv_multipart()
                import msgpack

                router.send_multipart([ident, msgpack.packb({"v": 42, "t": "welcome", "meta": {}})])

        t = threading.Thread(target=fake_server)
        t.start()
        with pytest.raises(ProtocolVersionError, match="version 42"):
            LoaderClient(endpoint, timeout_s=10)
        t.join(10)
    finally:
        router.close()
        ctx.term()


def test_health_check_command(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    def check(endpoint: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loader_server", "health", endpoint, "--timeout-s", "2"],
                              capture_output=True, text=True, timeout=60)

    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "2")
    # Ready (ok) once one worker is: the second may come a moment later on a loaded machine.
    wait_until(lambda: "workers_ready=2" in check(server.endpoint).stdout, 20, "both workers to be ready")
    result = check(server.endpoint)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok=True" in result.stdout and "workers_ready=2" in result.stdout and "clients=0" in result.stdout
    missing = check(f"ipc://{tmp_path}/none.sock")
    assert missing.returncode == 1 and "no health answer" in missing.stderr


def test_slow_trainer_makes_the_server_wait(start_server: Any, listfile: Path) -> None:
    from loader_client import health

    server = start_server(listfile, "--batch-size", "4", "--size", SIZE, "--workers", "2", "--prefetch", "6")
    with LoaderClient(server.endpoint, timeout_s=20, prefetch=2) as client:
        next(iter(client))
        # One consumed batch gave one credit back: the server may have sent 1 + 2 batches, no more.
        wait_until(lambda: health(server.endpoint)["batches_sent"] == 3, 10, "the credit window to fill")
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert health(server.endpoint)["batches_sent"] == 3
        next(iter(client))
        wait_until(lambda: health(server.endpoint)["batches_sent"] == 4, 10, "one more batch per credit")


def test_random_mode_is_endless_with_replacement(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "10", "--size", SIZE, "--workers", "2", "--mode", "random",
                          "--steps-per-epoch", "3", "--seed", "11")
    runs = []
    for _ in range(2):
        with LoaderClient(server.endpoint, timeout_s=20) as client:
            assert client.steps_per_epoch == 3
            it = iter(client)
            runs.append([(client.last.epoch if client.last else -1, next(it)[1]) for _ in range(8)])
    labels = np.concatenate([y for _, y in runs[0]])
    assert labels.min() >= 0 and labels.max() < N and len(set(labels.tolist())) < len(labels)
    for (_, a), (_, b) in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)  # same seed, same draws


@pytest.mark.parametrize("shared_memory", [True, False])
def test_client_side_normalization_keeps_uint8_on_the_wire(start_server: Any, listfile: Path,
                                                           shared_memory: bool) -> None:
    server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1", "--seed", "2")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    with LoaderClient(server.endpoint, timeout_s=20, shared_memory=shared_memory) as raw, \
         LoaderClient(server.endpoint, timeout_s=20, shared_memory=shared_memory, normalize=True,
                      mean=mean, std=std) as norm:
        assert norm.x_dtype == np.float32 and raw.x_dtype == np.uint8
        for _ in range(3):
            (xr, yr), (xn, yn) = raw.next(), norm.next()
            np.testing.assert_array_equal(yr, yn)
            np.testing.assert_allclose(xn, (xr / 255 - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-5)
    float_server = start_server(listfile, "--batch-size", str(BATCH), "--size", SIZE, "--workers", "1",
                                "--dtype", "float32")
    with pytest.raises(ValueError, match="needs uint8 batches"):
        LoaderClient(float_server.endpoint, timeout_s=20, normalize=True)
