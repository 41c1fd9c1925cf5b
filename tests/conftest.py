"""Shared fixtures: images written with OpenCV, and real servers started as subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

SERVER_STOP_TIMEOUT_S = 15.0


def write_image(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok, path
    path.write_bytes(buf.tobytes())
    return path


def unique_label_list(root: Path, count: int, *, size: tuple[int, int] = (40, 30)) -> Path:
    """`count` small JPEGs whose label is their own number, so each sample is identifiable."""
    rng = np.random.default_rng(count)
    lines = []
    for i in range(count):
        img = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        img[:4, :4] = i % 256  # a corner that differs between samples
        name = f"img/{i:05d}.{'png' if i % 5 == 0 else 'jpg'}"
        write_image(root / name, img)
        lines.append(f"{name} {i}")
    listfile = root / "train.txt"
    listfile.write_text("\n".join(lines) + "\n")
    return listfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (read from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


class RunningServer:
    def __init__(self, proc: subprocess.Popen[bytes], endpoint: str, log: Path) -> None:
        self.proc, self.endpoint, self.log = proc, endpoint, log

    def workers(self) -> list[int]:
        """Live worker processes (a killed one not yet reaped is left out)."""
        return [pid for pid in children_of(self.proc.pid) if alive(pid)]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {SERVER_STOP_TIMEOUT_S} s of SIGTERM") from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Start `loader-server serve` as a real subprocess; stopped (and checked) at teardown."""
    started: list[RunningServer] = []

    def start(data: Path, *args: str, transport: str = "ipc", endpoint: str | None = None) -> RunningServer:
        if endpoint is None:
            if transport == "ipc":
                endpoint = f"ipc://{tmp_path}/s{len(started)}.sock"
            else:
                endpoint = f"tcp://127.0.0.1:{free_port()}"
        log = tmp_path / f"server{len(started)}.log"
        cmd = [sys.executable, "-m", "loader_server", "serve", "--data", str(data), "--bind", endpoint,
               "--heartbeat-s", "0.2", *args]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        server = RunningServer(proc, endpoint, log)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


CLASS_COLORS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]  # RGB


def color_classes(root: Path, per_class: int, *, size: int = 16) -> Path:
    """Class folders whose images are noisy versions of one colour per class: quick to learn."""
    rng = np.random.default_rng(1)
    for k, rgb in enumerate(CLASS_COLORS):
        for i in range(per_class):
            img = np.clip(np.array(rgb[::-1], np.int16) + rng.integers(-40, 41, (size, size, 3)), 0, 255)
            write_image(root / f"c{k}" / f"{i:04d}.png", img.astype(np.uint8))
    return root
