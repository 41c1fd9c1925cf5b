"""Shared fixtures: images written with OpenCV, and real servers started as subprocesses."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from loader_server.launch import ServerProcess, ServerProcessError, alive, children_of

__all__ = [
    "RunningServer",
    "alive",
    "children_of",
    "color_classes",
    "free_port",
    "unique_label_list",
    "wait_until",
    "write_image",
]

SERVER_STOP_TIMEOUT_S = 15.0
#: A server on a million-line list file takes a few seconds to index it before its workers start.
SERVER_READY_TIMEOUT_S = 60.0


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
    """A TCP port that no socket on any local address holds now. Servers here bind 0.0.0.0 and
    127.0.0.2-4 too: a port free on 127.0.0.1 only may be held on another address, and the
    server's bind then fails ('Address already in use'). Someone may still take the port before the
    server binds it: rare, not impossible."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # the wildcard: the kernel picks a port no address uses
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


class RunningServer(ServerProcess):
    """A server started by the `start_server` fixture: `proc`, `endpoint`, `log`, `workers()`,
    `stop()`, `log_text()` (see `loader_server.launch.ServerProcess`)."""

    expect_exit: int | None = 0  # the exit code teardown expects when it stops the server

    def stop(self, timeout_s: float = SERVER_STOP_TIMEOUT_S) -> int:
        try:
            return super().stop(timeout_s)
        except ServerProcessError as exc:
            raise AssertionError(str(exc)) from None


_SERVERS = pytest.StashKey[list[RunningServer]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the log of every server it started."""
    report = yield
    if report.failed and report.when == "call" and _SERVERS in item.stash:
        servers: list[RunningServer] = item.stash[_SERVERS]
        for i, server in enumerate(servers):
            report.sections.append((f"server {i} log ({server.command()})", server.log_text() or "(empty)"))
    return report


def _curve_probe_keys(args: tuple[str, ...], where: Path) -> dict[str, str]:
    """With --curve-dir, a client key pair allowed in for the readiness probe only."""
    if "--curve-dir" not in args:
        return {}
    import zmq.auth

    curve_dir = Path(args[args.index("--curve-dir") + 1])
    where.mkdir(parents=True)
    public, secret = zmq.auth.create_certificates(str(where), "fixture-probe")
    (curve_dir / "clients").mkdir(exist_ok=True)
    shutil.copy(public, curve_dir / "clients" / "fixture-probe.key")
    return {"server_public_key": str(curve_dir / "server.key"), "client_keys": secret}


@pytest.fixture
def start_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., RunningServer]]:
    """Start `loader-server serve` as a real subprocess and wait until it is ready (it answers
    `health` with ok). A failing test prints every server's log. At teardown each server is
    stopped with SIGTERM and must exit 0, unless the test already reaped it (killed it, or
    stopped it itself and checked the code), and no worker may be left.

    With --curve-dir the readiness probe needs a key the server allows: the fixture adds
    `clients/fixture-probe.key` to that folder before the server starts.
    `ready=False`: do not wait for readiness (a server expected to refuse to start);
    `expect_exit`: the exit code teardown expects of a server it stops, None for any.
    """
    started: list[RunningServer] = []
    request.node.stash[_SERVERS] = started

    def start(data: Path, *args: str, transport: str = "ipc", endpoint: str | None = None, ready: bool = True,
              expect_exit: int | None = 0) -> RunningServer:
        if endpoint is None:
            if transport == "ipc":
                endpoint = f"ipc://{tmp_path}/s{len(started)}.sock"
            else:
                endpoint = f"tcp://127.0.0.1:{free_port()}"
        probe_keys = _curve_probe_keys(args, tmp_path / f"probe{len(started)}") if ready else {}
        server = RunningServer(data, "--heartbeat-s", "0.2", *args, endpoint=endpoint,
                               log=tmp_path / f"server{len(started)}.log")
        server.expect_exit = expect_exit
        started.append(server)
        if ready:
            try:
                server.wait_ready(SERVER_READY_TIMEOUT_S, **probe_keys)
            except ServerProcessError as exc:
                raise AssertionError(str(exc)) from None
        return server

    yield start
    problems = []
    for server in started:
        reaped_by_test = server.proc.returncode is not None and not server.terminated
        expected = server.expect_exit
        if expected and not reaped_by_test:  # a server expected to exit by itself: give it the time
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(SERVER_STOP_TIMEOUT_S)
        try:
            code = server.stop()
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        if not reaped_by_test and expected is not None and code != expected:
            problems.append(str(server.failure(f"exited with code {code} at teardown (expected {expected})")))

        def no_workers_left(server: RunningServer = server) -> bool:
            return not server.session_processes()

        try:
            wait_until(no_workers_left, 10, "the server's workers to exit")
        except AssertionError:
            problems.append(str(server.failure(f"left processes {server.session_processes()} behind")))
    assert not problems, "\n\n".join(problems)


CLASS_COLORS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30)]  # RGB


def color_classes(root: Path, per_class: int, *, size: int = 16, prefix: str = "c", seed: int = 1) -> Path:
    """Class folders (`prefix`0, `prefix`1, ...) whose images are noisy versions of one colour per
    class: quick to learn."""
    rng = np.random.default_rng(seed)
    for k, rgb in enumerate(CLASS_COLORS):
        for i in range(per_class):
            img = np.clip(np.array(rgb[::-1], np.int16) + rng.integers(-40, 41, (size, size, 3)), 0, 255)
            write_image(root / f"{prefix}{k}" / f"{i:04d}.png", img.astype(np.uint8))
    return root


def keygen(where: Path, name: str) -> None:
    """`loader-server keygen WHERE --name NAME`, as a user runs it."""
    subprocess.run([sys.executable, "-m", "loader_server", "keygen", str(where), "--name", name], check=True,
                   capture_output=True, timeout=60)
