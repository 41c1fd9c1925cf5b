"""Faults injected for real: bad files, hung and killed workers, dead trainers and servers, bad wire input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from loader_client import BadSampleError, LoaderClient, WorkerCrashedError
from loader_client.contract import protocol
from loader_client.contract.sampling import SamplingPlan

from .conftest import alive, unique_label_list, wait_until

ROOT = Path(__file__).resolve().parent.parent
N = 40
# sample index -> (what is wrong, a phrase of the reason the server gives)
BAD = {
    3: ("corrupt", "not a decodable image"),
    8: ("truncated", "truncated JPEG"),
    12: ("empty", "empty file"),
    17: ("missing", "file not found"),
    21: ("text", "not a decodable image"),
    26: ("bomb", "exceeds --max-pixels"),
    30: ("directory", "is a directory"),
}


def make_bad(listfile: Path) -> dict[int, str]:
    """Turn the samples in BAD into broken files; returns index -> path."""
    root = listfile.parent
    lines = listfile.read_text().splitlines()
    paths = {}
    for i, (kind, _) in BAD.items():
        rel = lines[i].split()[0]
        path = root / rel
        if kind == "corrupt":  # a JPEG whose headers are garbage; start and end markers intact
            data = bytearray(cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))[1].tobytes())
            data[2:300] = bytes(np.random.default_rng(i).integers(0, 256, 298, np.uint8))
            path.write_bytes(bytes(data))
        elif kind == "truncated":
            img = np.random.default_rng(i).integers(0, 256, (60, 80, 3), dtype=np.uint8)
            data = cv2.imencode(".jpg", img)[1].tobytes()
            path = path.with_suffix(".jpg")
            path.write_bytes(data[: len(data) * 2 // 3])
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "missing":
            path.unlink()
        elif kind == "text":
            path.write_text("this is a text file with an image extension\n")
        elif kind == "bomb":
            png = bytearray(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
            png[16:24] = (60000).to_bytes(4, "big") * 2  # the header claims 60000 x 60000 pixels
            path = path.with_suffix(".png")
            path.write_bytes(bytes(png))
        elif kind == "directory":
            path.unlink()
            path.mkdir()
        lines[i] = f"{path.relative_to(root)} {i}"
        paths[i] = str(path)
    listfile.write_text("\n".join(lines) + "\n")
    return paths


@pytest.fixture
def bad_list(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    listfile = unique_label_list(tmp_path / "data", N)
    return listfile, make_bad(listfile)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_check_reports_every_bad_file(bad_list: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    listfile, paths = bad_list
    report = tmp_path / "bad.tsv"
    result = run_cli("check", "--data", str(listfile), "--report", str(report), "--workers", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"checked {N} samples" in result.stdout and f"{len(BAD)} bad" in result.stdout
    rows = dict(line.split("\t") for line in report.read_text().splitlines())
    assert set(rows) == set(paths.values())
    for i, (_, reason) in BAD.items():
        assert reason in rows[paths[i]], (paths[i], rows[paths[i]])
    assert f"{N}/{N}" in result.stderr  # the progress line reached the end
    # The summary counts by DecodeError's code, whatever the words of each reason.
    summary = {m[2]: int(m[1]) for m in re.finditer(r"^ +(\d+)  (\w+) \(e\.g\. ", result.stdout, re.M)}
    assert summary == {"undecodable": 2, "truncated": 1, "empty": 1, "not_found": 1, "too_many_pixels": 1,
                       "is_directory": 1}, result.stdout
    # ... and each line names a file of that kind, so one bad file is found without opening the report
    for line in re.finditer(r"^ +\d+  (\w+) \(e\.g\. (.*): (\S+)\)$", result.stdout, re.M):
        assert rows[line[3]].startswith(line[2]), (line[0], rows)
    assert len(re.findall(r"^ +\d+  \w+ \(e\.g\. .*: \S+\)$", result.stdout, re.M)) == 6, result.stdout
    clean = unique_label_list(tmp_path / "clean", 10)
    ok = run_cli("check", "--data", str(clean), "--report", str(tmp_path / "none.tsv"))
    assert ok.returncode == 0 and "0 bad" in ok.stdout and (tmp_path / "none.tsv").read_text() == ""


def _epochs(endpoint: str, epochs: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    with LoaderClient(endpoint, timeout_s=20) as client:
        out = []
        for _ in range(epochs):
            for x, y in client.epoch():
                assert client.last is not None
                out.append((x.copy(), y.copy(), client.last.indices.copy()))
        return out


def test_skip_replaces_bad_samples_the_same_way_for_any_worker_count(
        start_server: Any, bad_list: tuple[Path, dict[int, str]]) -> None:
    listfile, paths = bad_list
    runs, servers = [], []
    for workers in ("1", "3"):
        server = start_server(listfile, "--batch-size", "8", "--size", "16x12", "--workers", workers,
                              "--on-error", "skip", "--max-bad", str(len(BAD)), "--seed", "5",  # at the limit
                              "--no-scan")  # met by the workers (the start-up scan: tests/test_local_server.py)
        servers.append(server)
        runs.append(_epochs(server.endpoint, 2))
    for (xa, ya, ia), (xb, yb, ib) in zip(*runs, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ya, yb)
        assert len(ya) == 8  # the batch keeps its size
        np.testing.assert_array_equal(ya, ia)  # labels follow the substitutes
        assert not set(ia.tolist()) & set(BAD)  # no bad sample is ever delivered
    log = servers[0].log_text()
    for path in paths.values():
        assert log.count(f"bad file {path}:") == 1, path  # logged once, though seen in 2 epochs


def test_too_many_bad_files_is_an_error(start_server: Any, bad_list: tuple[Path, dict[int, str]]) -> None:
    listfile, _ = bad_list
    server = start_server(listfile, "--batch-size", "8", "--size", "16x12", "--workers", "2",
                          "--on-error", "skip", "--max-bad", "2", "--no-shuffle", "--no-scan")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(BadSampleError, match=r"exceed --max-bad \(2\)"):
            for _ in range(10):
                client.next()
    with pytest.raises(BadSampleError, match="loader-server check"):
        LoaderClient(server.endpoint, timeout_s=20)  # later clients are told at once


@pytest.mark.parametrize("i", sorted(BAD))
def test_raise_names_the_file_and_reason(start_server: Any, bad_list: tuple[Path, dict[int, str]], i: int) -> None:
    listfile, paths = bad_list
    lines = listfile.read_text().splitlines()
    listfile.write_text("\n".join([lines[i]] * 4) + "\n")  # a data set of that one file
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1", "--no-scan")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(BadSampleError) as info:
            client.next()
    text = str(info.value)
    assert paths[i] in text and BAD[i][1] in text and "worker traceback" in text


def test_hung_worker_is_killed_reported_and_retried(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    fifo = tmp_path / "data" / "img" / "stuck.jpg"
    os.mkfifo(fifo)  # opening it blocks forever, like a read from a dead network share
    lines = listfile.read_text().splitlines()
    lines[5] = "img/stuck.jpg 5"
    listfile.write_text("\n".join(lines) + "\n")
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1", "--no-shuffle",
                          "--batch-timeout-s", "1")
    started = time.monotonic()
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        first = client.next()[1]
        with pytest.raises(WorkerCrashedError) as info:
            client.next()
    assert first.tolist() == [0, 1, 2, 3]
    assert time.monotonic() - started < 20
    assert "epoch 0 batch 1" in str(info.value) and "hung" in str(info.value) and str(fifo) in str(info.value)
    log = server.log_text()
    assert "made no progress" in log and str(fifo) in log
    assert "Current thread" in log or "Thread 0x" in log  # the hung worker's Python stack
    assert log.count("killed it, starting a replacement") == 3  # the bounded retries


def test_dead_trainer_releases_its_session(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2",
                          "--client-timeout-s", "1.5")
    out = tmp_path / "out.jsonl"
    trainer = subprocess.Popen([sys.executable, "-m", "tests.stream_consumer", server.endpoint, str(out)], cwd=ROOT)
    try:
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 3, 30, "the trainer to start")
        trainer.send_signal(signal.SIGSTOP)  # frozen: its socket stays open, only heartbeats can tell
        wait_until(lambda: "left (silent for" in server.log_text(), 15, "the server to notice the frozen trainer")
    finally:
        trainer.kill()
        trainer.wait(10)
    with LoaderClient(server.endpoint, timeout_s=20) as client:  # the next client is served normally
        assert client.next()[0].shape == (4, 12, 16, 3)


def test_server_restart_resumes_exactly_from_saved_state(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N)
    args = ("--batch-size", "4", "--size", "16x12", "--workers", "2", "--seed", "8")
    endpoint = f"ipc://{tmp_path}/restart.sock"
    server = start_server(listfile, *args, endpoint=endpoint)
    state_file, first = tmp_path / "state.json", tmp_path / "first.jsonl"
    trainer = subprocess.Popen([sys.executable, "-m", "tests.stream_consumer", endpoint, str(first),
                                "--state", str(state_file), "--timeout-s", "2"], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    wait_until(lambda: first.exists() and len(first.read_text().splitlines()) >= 12, 30, "12 batches")
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    _, err = trainer.communicate(timeout=30)
    assert trainer.returncode != 0 and "LoaderTimeoutError" in err and "silent" in err  # a clear error, no hang
    # The trainer died inside next(): every batch it recorded was also checkpointed, so the
    # records (not the saved state) say where it really stopped.
    done = [json.loads(line) for line in first.read_text().splitlines()]
    start_server(listfile, *args, endpoint=endpoint)  # the server comes back
    second = tmp_path / "second.jsonl"
    rest = 20
    subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(second), "--state",
                    str(state_file), "--batches", str(rest)], cwd=ROOT, check=True, timeout=60)
    total = len(done) + rest
    reference = tmp_path / "reference.jsonl"  # an independent stream, counted from (0, 0)
    subprocess.run([sys.executable, "-m", "tests.stream_consumer", endpoint, str(reference), "--batches",
                    str(total)], cwd=ROOT, check=True, timeout=60)
    combined = done + [json.loads(line) for line in second.read_text().splitlines()]
    steps = N // 4
    assert [(r["epoch"], r["batch"]) for r in combined] == [divmod(k, steps) for k in range(total)]
    plan = SamplingPlan(N, 4)
    assert [r["indices"] for r in combined] == [plan.batch(*divmod(k, steps), seed=8).tolist() for k in range(total)]
    assert [r["digest"] for r in combined] == [json.loads(line)["digest"] for line in
                                               reference.read_text().splitlines()]


def test_sigkill_of_the_server_leaves_no_process_or_file(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N)
    endpoint = f"ipc://{tmp_path}/killed.sock"
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2", endpoint=endpoint)
    with LoaderClient(endpoint, timeout_s=20) as client:
        client.next()
        wait_until(lambda: len(server.workers()) == 2, 10, "2 workers")
        workers = server.workers()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    wait_until(lambda: not any(alive(p) for p in workers), 10, "the workers to exit with the server")
    wait_until(lambda: not (tmp_path / "killed.sock").exists(), 10, "the janitor to remove the socket file")
    assert sorted(os.listdir("/dev/shm")) == sorted(p for p in os.listdir("/dev/shm") if "loader" not in p)


def test_bad_wire_input_is_refused_and_other_clients_keep_going(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2")
    good = LoaderClient(server.endpoint, timeout_s=20)
    ctx = zmq.Context()
    try:
        good.next()

        def raw() -> zmq.Socket:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.endpoint)
            return sock

        def answer(sock: zmq.Socket) -> dict[str, Any]:
            assert sock.poll(10_000), "no answer"
            return protocol.unpack(sock.recv_multipart()[0])

        bad = raw()
        cases = [
            ([b"\x93garbage"], "protocol"),
            ([b"a", b"b", b"c"], "protocol"),
            ([msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "hello", "rank": "zero"})], "protocol"),
            ([msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "hello", "path": "/etc/passwd"})], "protocol"),
            ([msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "explode"})], "protocol"),  # not a message type
            ([msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "credit", "n": 1})], "server"),  # no session yet
            ([msgpack.packb({"v": 7, "t": "hello"})], "version"),
        ]
        for frames, kind in cases:
            bad.send_multipart(frames)
            assert answer(bad)["kind"] == kind, frames
        bad.send(msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "hello", "shm": False, "credit": 1}))
        assert answer(bad)["t"] == "welcome"
        for frames in ([msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "frobnicate"})],
                       [msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "release", "slots": [0, 1]})],
                       [msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "credit", "n": -5})]):
            bad.send_multipart(frames)
            while (reply := answer(bad))["t"] in ("batch", "heartbeat"):
                pass
            assert reply["t"] == "error" and reply["kind"] == "protocol"
        huge = raw()  # a frame over the server's 64 KiB request limit: the connection is dropped
        huge.send(b"\x00" * (256 * 1024))
        silent = raw()  # a client that asks for a lot and never reads
        silent.send(msgpack.packb({"v": protocol.PROTOCOL_VERSION, "t": "hello", "shm": False, "credit": 100000}))
        for _ in range(30):
            assert good.next()[0].shape == (4, 12, 16, 3)  # the well-behaved client is unaffected
    finally:
        good.close()
        ctx.destroy(linger=0)
    log = server.log_text()
    assert log.count("ignored bad message from client") >= 6 and "refused client" in log
