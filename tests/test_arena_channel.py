"""The arena channel: shared memory for a trainer of another user or PID namespace, without /proc.

A trainer in another container (another uid, no shared PID namespace) cannot open
/proc/<server pid>/fd/N. The server passes the memfd itself with SCM_RIGHTS on a unix socket
beside its ipc socket, to whoever presents the arena's token from its own welcome, once. Here:
real servers and clients in a real second PID namespace (`unshare`) and as real other users
(`setpriv`), the one-shot token, and every check of a passed descriptor against a fake channel
that passes the wrong thing.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, ProtocolError
from loader_client.contract.messages import ArenaHandle
from loader_client.contract.shm import (
    ARENA_CHANNEL_REQUEST,
    ARENA_SEALS,
    arena_channel_path,
    create_arena,
    receive_arena,
)

from .conftest import unique_label_list, wait_until

ROOT = Path(__file__).resolve().parent.parent
N = 24
SERVER_UID, TRAINER_UID = 10001, 10002  # the images' users (docker/compose.yaml)

#: A trainer: one epoch, then what it got as JSON (it runs in another namespace or as another user).
TRAINER = """
import json, sys
from loader_client import LoaderClient
with LoaderClient(sys.argv[1], timeout_s=30) as client:
    labels = [int(v) for _, y in client.epoch() for v in y]
    print(json.dumps({"shm": client.shared_memory, "labels": sorted(labels), "uid": __import__("os").getuid()}))
"""


def run_trainer(endpoint: str, *prefix: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([*prefix, sys.executable, "-c", TRAINER, endpoint], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def can(*command: str) -> bool:
    """Whether `command` runs this Python with the packages (root, the tool, and readable packages)."""
    return os.geteuid() == 0 and shutil.which(command[0]) is not None and subprocess.run(
        [*command, sys.executable, "-c", "import numpy, zmq, msgpack"], capture_output=True, timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).returncode == 0


def test_a_trainer_in_another_pid_namespace_gets_shared_memory(start_server: Any, tmp_path: Path) -> None:
    unshare = ("unshare", "--pid", "--fork", "--mount-proc")
    if not can(*unshare):
        pytest.skip("needs root and unshare(1) to make a second PID namespace")
    server = start_server(unique_label_list(tmp_path / "data", N), "--batch-size", "4", "--size", "16x12",
                          "--workers", "1")
    got = run_trainer(server.endpoint, *unshare)
    assert got["shm"] is True and got["labels"] == list(range(N)), got
    log = server.log_text()
    assert "starting at epoch 0 batch 0, shared memory" in log, log


@contextlib.contextmanager
def shared_folder(gid: int, mode: int) -> Iterator[Path]:
    """A folder outside pytest's private tmp (0700, root's), owned by SERVER_UID:`gid` with `mode`."""
    folder = Path(tempfile.mkdtemp(prefix="loader-arena-test-"))
    try:
        os.chown(folder, SERVER_UID, gid)
        folder.chmod(mode)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_as(user: int, data: Path, endpoint: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", sys.executable,
                                 "-m", "loader_server", "serve", "--data", str(data), "--bind", endpoint,
                                 "--heartbeat-s", "0.2", *args], stdout=f, stderr=subprocess.STDOUT, env=env)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return subprocess.run([sys.executable, "-m", "loader_server", "health", endpoint, "--timeout-s", "2"],
                              capture_output=True, timeout=30, env=env).returncode == 0

    wait_until(ready, 60, f"the server as uid {user} to answer")
    return proc


def test_a_trainer_of_another_user_in_the_servers_group_gets_shared_memory(tmp_path: Path) -> None:
    setpriv = ("setpriv", f"--reuid={TRAINER_UID}", f"--regid={TRAINER_UID}", f"--groups={SERVER_UID}")
    if not can(*setpriv) or not can("setpriv", f"--reuid={SERVER_UID}", f"--regid={SERVER_UID}", "--clear-groups"):
        pytest.skip("needs root, setpriv(1), and a Python whose packages other users can read (tests/test_docker.py "
                    "runs the same with real containers)")
    with shared_folder(SERVER_UID, 0o755) as data_folder, shared_folder(SERVER_UID, 0o750) as run:
        listfile = unique_label_list(data_folder, N)
        for path in data_folder.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        endpoint = f"ipc://{run}/loader.sock"
        log = tmp_path / "server.log"
        proc = serve_as(SERVER_UID, listfile, endpoint, log, "--batch-size", "4", "--size", "16x12", "--workers",
                        "1", "--ipc-mode", "0660")
        try:
            for path in (run / "loader.sock", Path(arena_channel_path(str(run / "loader.sock")))):
                info = path.stat()
                assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660, oct(info.st_mode)
                assert (info.st_uid, info.st_gid) == (SERVER_UID, SERVER_UID)
            got = run_trainer(endpoint, *setpriv)
            assert got["uid"] == TRAINER_UID and got["shm"] is True and got["labels"] == list(range(N)), got
            # A user outside the group cannot even connect: the socket and the channel are 0660.
            stranger = subprocess.run(["setpriv", "--reuid=10003", "--regid=10003", "--clear-groups",
                                       sys.executable, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX, "
                                       "socket.SOCK_SEQPACKET); s.connect(sys.argv[1])",
                                       arena_channel_path(str(run / "loader.sock"))],
                                      capture_output=True, text=True, timeout=60)
            assert stranger.returncode != 0 and "Permission denied" in stranger.stderr, stranger.stderr
        finally:
            proc.terminate()
            assert proc.wait(30) == 0, log.read_text()
        assert not (run / "loader.sock").exists() and not Path(arena_channel_path(str(run / "loader.sock"))).exists()
    assert "shared memory" in log.read_text()


def test_the_token_is_good_once_and_only_for_its_own_arena(start_server: Any, tmp_path: Path) -> None:
    server = start_server(unique_label_list(tmp_path / "data", N), "--batch-size", "4", "--size", "16x12",
                          "--workers", "1")
    channel = arena_channel_path(server.endpoint.removeprefix("ipc://"))
    assert stat.S_IMODE(os.stat(channel).st_mode) == 0o600  # the ipc socket's mode, by default
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert client.shared_memory  # through /proc: the same user and PID namespace
        handle = ArenaHandle(**client.info["shm"])
        assert handle.token and len(bytes.fromhex(handle.token)) == 16
        x, y = client.next()
        arena = receive_arena(channel, handle, timeout_s=5, server_uid=os.getuid())
        assert arena is not None  # not used yet: the channel hands it over once
        assert arena.view(0, np.dtype("uint8"), (4, 12, 16, 3)).shape == x.shape
        assert receive_arena(channel, handle, timeout_s=5, server_uid=os.getuid()) is None  # once only
        other = ArenaHandle(**{**client.info["shm"], "token": "00" * 16})
        assert receive_arena(channel, other, timeout_s=5, server_uid=os.getuid()) is None
        assert receive_arena(channel, handle, timeout_s=5, server_uid=os.getuid() + 1) is None  # not the server's user
        arena.close()
    with LoaderClient(server.endpoint, timeout_s=20) as second:
        late = ArenaHandle(**second.info["shm"])
    # The session ended: its token is withdrawn with its arena (after the close delay, at most 5 s).
    def withdrawn() -> bool:
        return receive_arena(channel, late, timeout_s=5, server_uid=os.getuid()) is None

    wait_until(withdrawn, 30, "the ended session's token to be withdrawn")
    assert "refused" in server.log_text() and "without a valid token" in server.log_text()


# --- a fake channel that passes the wrong thing --------------------------------------------

class FakeChannel:
    """Answers every request on `path` with `answer` and the descriptors `fds()` gives."""

    def __init__(self, path: str, answer: bytes, fds: Any) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.answer, self.fds, self.requests = answer, fds, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                self.requests.append(conn.recv(256))
                fds = self.fds()
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
                conn.sendmsg([self.answer], ancillary)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def memfd(size: int, seals: int = ARENA_SEALS) -> int:
    fd = os.memfd_create("fake", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("case, problem", [
    ("regular file", "not a memfd"),
    ("pipe", "not a memfd"),
    ("unsealed memfd", "not sealed against shrinking"),
    ("another memfd", "inode"),
    ("too small", "need"),
    ("two descriptors", "descriptors"),
])
def test_a_passed_descriptor_is_checked_like_one_opened_through_proc(tmp_path: Path, case: str, problem: str) -> None:
    before = open_fds()
    fd, stride = create_arena("genuine", 2, 4096)
    made: list[int] = [fd]
    if case == "regular file":
        (tmp_path / "f").write_bytes(b"\0" * 8192)
        passed = [os.open(tmp_path / "f", os.O_RDWR)]
    elif case == "pipe":
        passed = list(os.pipe())
        made.append(passed.pop())
    elif case == "unsealed memfd":
        passed = [memfd(8192, seals=0)]
    elif case == "another memfd":
        passed = [memfd(8192)]
    elif case == "too small":
        passed = [fd]
    else:
        passed = [fd, memfd(8192)]
    made.extend(passed)
    # The announced inode is the genuine arena's, except where the case is about something else.
    inode = os.fstat(passed[0] if case == "unsealed memfd" else fd).st_ino
    slots = 4 if case == "too small" else 2  # the genuine arena holds 2 slots
    handle = ArenaHandle(id=1, pid=1, fd=3, inode=inode, slots=slots, stride=stride, token="ab" * 16)
    path = str(tmp_path / "channel")
    fake = FakeChannel(path, b"ok", lambda: passed)
    try:
        with pytest.raises(ProtocolError, match=problem):
            receive_arena(path, handle, timeout_s=5, server_uid=os.getuid())
        assert fake.requests == [ARENA_CHANNEL_REQUEST + b"ab" * 16]
    finally:
        fake.close()
        for f in set(made):
            with contextlib.suppress(OSError):
                os.close(f)
    # What the client received is closed too: the count is back to where it started.
    wait_until(lambda: open_fds() == before, 10, "every passed descriptor to be closed")


def test_no_channel_a_refusal_or_a_silent_channel_mean_frames(tmp_path: Path) -> None:
    handle = ArenaHandle(id=1, pid=1, fd=3, inode=1, slots=1, stride=4096, token="cd" * 16)
    path = str(tmp_path / "channel")
    assert receive_arena(path, handle, timeout_s=1, server_uid=None) is None  # nothing there
    assert receive_arena(path, ArenaHandle(**{**handle.fields(), "token": None}), timeout_s=1, server_uid=None) is None
    fake = FakeChannel(path, b"no", lambda: [])
    try:
        assert receive_arena(path, handle, timeout_s=5, server_uid=None) is None
    finally:
        fake.close()
    os.unlink(path)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # listens, never answers
    silent.bind(path)
    silent.listen(1)
    try:
        started = time.monotonic()
        assert receive_arena(path, handle, timeout_s=0.5, server_uid=None) is None
        assert time.monotonic() - started < 30
    finally:
        silent.close()
