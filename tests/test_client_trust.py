"""The client trusts nothing a server says (issue 12) and fails fast saying why (issue 14).

A malicious server here is a real ZeroMQ ROUTER on a thread of the test process, speaking the
wire format through `loader_client.contract.messages`. Every test checks the exception's type and
message, and that the client left no socket, file descriptor or thread behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from loader_client import (
    BadSampleError,
    ConfigError,
    EndpointError,
    LoaderClient,
    LoaderTimeoutError,
    ProtocolError,
    ProtocolVersionError,
    ServerStoppedError,
    health,
)
from loader_client.contract import messages as m
from loader_client.contract.protocol import PROTOCOL_VERSION, describe_arrays
from loader_client.contract.sampling import SamplingPlan
from loader_client.contract.schema import decode_fields, encode
from loader_client.contract.shm import (
    ARENA_KEY_MAGIC,
    ARENA_SEALS,
    arena_key,
    create_arena,
    new_arena_key,
    open_arena,
)
from loader_client.endpoints import parse_endpoint, same_host

from .conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
WAIT_GRACE_S = 2.0  # README: "After 2 s of silence it logs the cause once" (written out, not the code's constant)
STEPS = 5
BATCH = 2
X_SHAPE = [4, 4, 3]


def welcome_fields(hello: m.Hello, **overrides: Any) -> dict[str, Any]:
    """A valid welcome for `hello`, as a wire map (so tests can break any field)."""
    fields = m.Welcome(
        num_samples=STEPS * BATCH * hello.world_size, num_classes=3, batch_size=BATCH, steps_per_epoch=STEPS,
        rank=hello.rank, world_size=hello.world_size, seed=hello.seed if hello.seed is not None else 7,
        epoch=hello.epoch, batch=hello.batch, mode="epoch", in_order=True, drop_last=True, shuffle=False,
        x_shape=X_SHAPE, x_dtype="|u1", layout="hwc", color="rgb", class_names=["a", "b", "c"], fingerprint="f" * 16,
        heartbeat_s=0.2, max_message_bytes=1 << 20,
    ).fields()
    fields.update(overrides)
    return fields


def owed(epoch: int, batch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """The sample indices the plan of `welcome_fields` gives that batch of that share (no shuffle)."""
    plan = SamplingPlan(STEPS * BATCH * world, BATCH, shuffle=False)
    return np.ascontiguousarray(plan.batch(epoch, min(batch, STEPS - 1), seed=7, rank=rank, world_size=world))


def batch_arrays(epoch: int, batch: int, *, with_x: bool = True, extra: bool = False, rank: int = 0,
                 world: int = 1) -> dict[str, np.ndarray]:
    """A batch as the plan has it; y counts the stream's samples, so a test sees which batch it got."""
    start = (epoch * STEPS + batch) * BATCH
    arrays = {"x": np.full([BATCH, *X_SHAPE], batch, np.uint8)} if with_x else {}
    arrays["y"] = np.arange(start, start + BATCH, dtype=np.int64)
    arrays["index"] = owed(epoch, batch, rank, world)
    if extra:
        arrays["w"] = np.ones(BATCH, np.float32)
    return arrays


#: Fds the fake servers hold for their behaviours (not the client's, so not a leak).
SERVER_FDS: set[int] = set()


class _KeptFds(list[int]):
    def append(self, fd: int) -> None:
        SERVER_FDS.add(fd)
        super().append(fd)


class FakeServer:
    """A ROUTER that answers the first hello with `behaviour(server, hello)` on its own thread."""

    def __init__(self, endpoint: str, behaviour: Callable[[FakeServer, m.Hello], None]) -> None:
        self.endpoint = endpoint
        self.behaviour = behaviour
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.received: list[str] = []  # message types, in order
        self.hello: m.Hello | None = None
        self.identity = b""
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.keep = _KeptFds()  # fds that must outlive a behaviour
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.sock.poll(50):
                    continue
                identity, *frames = self.sock.recv_multipart()
                header = msgpack.unpackb(frames[0])
                self.received.append(header["t"])
                if header["t"] == "hello" and self.hello is None:
                    self.identity = identity
                    self.hello = m.Hello(**{k: v for k, v in header.items() if k not in ("v", "t")})
                    self.behaviour(self, self.hello)
        except BaseException as exc:  # a broken fixture must fail the test, not hang it
            self.error = exc

    # what behaviours use
    def send(self, message: m.Message | dict[str, Any], frames: list[bytes] | None = None, flags: int = 0) -> None:
        frames = frames or []
        head = encode(message) if isinstance(message, m.Message) else msgpack.packb(
            {"v": PROTOCOL_VERSION, **message}, use_bin_type=True)
        self.sock.send_multipart([self.identity, head, *frames], flags)

    def welcome(self, hello: m.Hello, **overrides: Any) -> None:
        self.send({"t": "welcome", **welcome_fields(hello, **overrides)})

    def batch(self, epoch: int, batch: int, *, steps: int = STEPS, shm: m.ShmRef | None = None,
              arrays: dict[str, np.ndarray] | None = None) -> None:
        arrays = batch_arrays(epoch, batch, with_x=shm is None) if arrays is None else arrays
        self.send(m.Batch(epoch=epoch, batch=batch, steps=steps, arrays=describe_arrays(arrays), shm=shm),
                  [a.tobytes() for a in arrays.values()])

    def idle(self, seconds: float) -> None:
        """Read (and record) what the client sends for `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.sock.poll(20):
                _, *frames = self.sock.recv_multipart()
                self.received.append(msgpack.unpackb(frames[0])["t"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the fake server's thread did not stop"
        self.sock.close(linger=0)
        self.ctx.term()
        for fd in self.keep:
            os.close(fd)
            SERVER_FDS.discard(fd)
        if self.error is not None:
            raise self.error


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def start(behaviour: Callable[[FakeServer, m.Hello], None], transport: str = "ipc") -> FakeServer:
        endpoint = f"ipc://{tmp_path}/fake{len(servers)}.sock" if transport == "ipc" \
            else f"tcp://127.0.0.1:{free_port()}"
        server = FakeServer(endpoint, behaviour)
        servers.append(server)
        return server

    yield start
    while _OPEN_CLIENTS:  # a test that failed before its own close() must not hang on its client
        _OPEN_CLIENTS.pop().close()
    for server in servers:
        server.close()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("loader-client-")]


@pytest.fixture
def no_leak() -> Iterator[Callable[[], None]]:
    """Call after the fake server started: checks that the client's fds and threads are all gone."""
    marks: dict[str, set[int]] = {}

    def mark() -> None:
        marks["fds"] = open_fds()

    yield mark
    if "fds" in marks:
        wait_until(lambda: not client_threads(), 10, "the client's receiver thread to stop")
        def leaked() -> set[int]:
            return open_fds() - marks["fds"] - SERVER_FDS

        try:
            wait_until(lambda: not leaked(), 10, "the client to close its sockets")
        except AssertionError:
            raise AssertionError(f"fds left open: {[_describe(fd) for fd in leaked()]}") from None


def _describe(fd: int) -> str:
    try:
        return f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


_OPEN_CLIENTS: list[LoaderClient] = []


def client_of(server: FakeServer, **kwargs: Any) -> LoaderClient:
    """A client of the fake server, closed by the `fake` fixture even when the test fails early."""
    client = LoaderClient(server.endpoint, **{"timeout_s": 5.0, **kwargs})
    _OPEN_CLIENTS.append(client)
    return client


def just_welcome(server: FakeServer, hello: m.Hello) -> None:
    server.welcome(hello)
    server.idle(30)


# ---------------------------------------------------------------------------- shared-memory arenas
def _arena_behaviour(make: Callable[[FakeServer], tuple[int, int]]) -> Callable[[FakeServer, m.Hello], None]:
    """A welcome announcing fd `make()` of this process as the arena: (fd, inode)."""

    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        fd, inode = make(server)
        server.keep.append(fd)
        handle = m.ArenaHandle(id=1, pid=os.getpid(), fd=fd, inode=inode, slots=2, stride=4096)
        server.welcome(hello, shm=handle.fields())
        server.idle(30)

    return behaviour


def _regular_file(server: FakeServer) -> tuple[int, int]:
    fd, path = tempfile.mkstemp()
    os.ftruncate(fd, 8192)
    os.unlink(path)
    return fd, os.fstat(fd).st_ino


def _pipe(server: FakeServer) -> tuple[int, int]:
    r, w = os.pipe()
    server.keep.append(w)
    return r, os.fstat(r).st_ino


def _memfd_unsealed(server: FakeServer) -> tuple[int, int]:
    fd = os.memfd_create("loader-unsealed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8192)
    return fd, os.fstat(fd).st_ino


def _memfd_grow_seal_only(server: FakeServer) -> tuple[int, int]:
    fd = os.memfd_create("loader-grow-only", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
    return fd, os.fstat(fd).st_ino


def _memfd_wrong_inode(server: FakeServer) -> tuple[int, int]:
    fd, _ = create_arena("loader-wrong-inode", 2, 4096)
    return fd, os.fstat(fd).st_ino + 1


def _memfd_too_small(server: FakeServer) -> tuple[int, int]:
    fd = os.memfd_create("loader-small", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)  # announced as 2 slots
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
    return fd, os.fstat(fd).st_ino


@pytest.mark.parametrize(("make", "match"), [
    (_regular_file, "is not a memfd but '/"),
    (_pipe, "is not a memfd but 'pipe:"),
    (_memfd_unsealed, "not sealed against shrinking"),
    (_memfd_grow_seal_only, "not sealed against shrinking"),
    (_memfd_wrong_inode, "not the announced"),
    (_memfd_too_small, "holds 4096 bytes"),
])
def test_arena_that_is_not_a_sealed_memfd_is_refused(fake: Any, no_leak: Any, make: Any, match: str) -> None:
    server = fake(_arena_behaviour(make))
    no_leak()
    with pytest.raises(ProtocolError, match=match):
        client_of(server)


def test_arena_path_is_built_from_integers_never_taken_from_the_server() -> None:
    handle = m.ArenaHandle(id=1, pid=1, fd=3, inode=5, slots=1, stride=4096)
    assert handle.path == "/proc/1/fd/3"
    with pytest.raises(ProtocolError, match="'pid' must be int"):  # no room for a path
        decode_fields(m.ArenaHandle, {**handle.fields(), "pid": "1/fd/../../../etc"}, "test")


def test_arena_of_a_pid_that_is_not_the_servers_is_not_even_opened(fake: Any, no_leak: Any) -> None:
    """A server in another pid namespace (or lying) announces someone else's pid: frames, nothing opened."""

    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        assert hello.shm
        fd, _ = _regular_file(server)
        server.keep.append(fd)
        handle = m.ArenaHandle(id=1, pid=os.getppid(), fd=fd, inode=os.fstat(fd).st_ino, slots=2, stride=4096)
        server.welcome(hello, shm=handle.fields())
        while not server.stop.is_set():  # the client says bye, then hello again on a fresh socket
            if server.sock.poll(20):
                identity, head, *_ = server.sock.recv_multipart()
                header = msgpack.unpackb(head)
                server.received.append(header["t"])
                if header["t"] == "hello":
                    assert header["shm"] is False
                    server.identity = identity
                    server.welcome(hello)

    server = fake(behaviour)
    no_leak()
    with client_of(server) as client:
        assert not client.shared_memory
    assert server.received[:3] == ["hello", "bye", "hello"]


def test_arena_not_asked_for_is_refused(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        assert not hello.shm
        fd, _ = create_arena("loader-unasked", 2, 4096)
        server.keep.append(fd)
        handle = m.ArenaHandle(id=1, pid=os.getpid(), fd=fd, inode=os.fstat(fd).st_ino, slots=2, stride=4096)
        server.welcome(hello, shm=handle.fields())
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    with pytest.raises(ProtocolError, match="arena this client did not ask for"):
        client_of(server, shared_memory=False)


def test_remote_endpoints_never_ask_for_shared_memory() -> None:
    assert same_host("ipc:///tmp/x.sock") and same_host("tcp://127.0.0.1:5555") and same_host("tcp://[::1]:5555")
    assert same_host("tcp://localhost:1") and not same_host("tcp://10.0.0.7:5555")
    assert not same_host("tcp://loader-host:5555") and not same_host("not an endpoint")


def _genuine_arena(server: FakeServer, hello: m.Hello, then: Callable[[FakeServer, int], None]) -> None:
    assert hello.shm
    fd, stride = create_arena("loader-genuine", 2, 4096, key=arena_key(hello.shm_key))
    server.keep.append(fd)
    os.pwrite(fd, bytes(range(96)) * 1, 0)  # the pixels of slot 0
    handle = m.ArenaHandle(id=1, pid=os.getpid(), fd=fd, inode=os.fstat(fd).st_ino, slots=2, stride=stride)
    server.welcome(hello, shm=handle.fields())
    then(server, fd)
    server.idle(30)


def _slot_batch(server: FakeServer, batch: int, slot: int) -> None:
    ref = m.ShmRef(slot=slot, arrays=[["x", "|u1", [BATCH, *X_SHAPE]]])
    server.batch(0, batch, shm=ref)


def test_genuine_sealed_arena_is_mapped_and_a_held_slot_cannot_be_reused(fake: Any, no_leak: Any) -> None:
    server = fake(lambda s, h: _genuine_arena(s, h, lambda s2, fd: (_slot_batch(s2, 0, 0), _slot_batch(s2, 1, 0))))
    no_leak()
    client = client_of(server)
    try:
        assert client.shared_memory
        x, _ = client.next()
        assert x.tobytes() == bytes(range(96)) and x.flags.writeable
        with pytest.raises(ProtocolError, match="slot 0, which this client still holds"):
            client.next()
    finally:
        client.close()
    del x


def test_shared_memory_reference_without_an_arena_is_refused(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        _slot_batch(server, 0, 0)
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(ProtocolError, match="shared memory this client was not granted"):
        client.next()
    client.close()


def test_create_arena_seals_and_sanitises_its_name_and_holds_its_clients_key() -> None:
    key = bytes(range(16))
    fd, stride = create_arena("loader-\0evil\nname/" + "x" * 500, 3, 5000, key=key)
    try:
        assert stride % 4096 == 0 and stride >= 5000
        assert os.fstat(fd).st_size == 3 * stride + 4096  # and one page for the key, after the last slot
        assert os.pread(fd, 64, 3 * stride).rstrip(b"\0") == ARENA_KEY_MAGIC + key
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & ARENA_SEALS == ARENA_SEALS
        name = os.readlink(f"/proc/self/fd/{fd}")
        assert name.startswith("/memfd:loader-_evil_name_x") and len(name) < 100 and "\n" not in name
        with pytest.raises(PermissionError):
            os.ftruncate(fd, stride)  # sealed: nobody can shrink it under a mapping
    finally:
        os.close(fd)


def test_a_shared_arena_holds_each_members_key_in_its_own_entry() -> None:
    """A share's one arena serves several trainers, each with its own hello key: each key has an entry
    of its own after the last slot (128 of them), the welcome names it, and a client maps the arena
    only if its own key is in the entry its welcome names. A member that leaves has its key erased."""
    from loader_server.runtime.arenas import new_arena

    arena = new_arena(1, 2, 4096)
    assert arena is not None
    try:
        keys = [new_arena_key() for _ in range(3)]
        entries = [arena.add_key(f"member-{i}".encode(), key) for i, key in enumerate(keys)]
        assert entries == [0, 1, 2]
        for entry, key in zip(entries, keys, strict=True):
            mapped = open_arena(arena.handle(key_slot=entry), arena_key(key) or b"")
            assert mapped is not None
            mapped.close()
        with pytest.raises(ProtocolError, match="does not hold the key this client gave"):
            open_arena(arena.handle(key_slot=1), arena_key(keys[0]) or b"")  # another member's entry
        arena.forget(b"member-1")
        with pytest.raises(ProtocolError, match="does not hold the key this client gave"):
            open_arena(arena.handle(key_slot=1), arena_key(keys[1]) or b"")  # erased when it left
        assert arena.add_key(b"member-3", new_arena_key()) == 1  # the free entry is taken again
        assert arena.add_key(b"no-key", None) is None  # a hello without a key gets frames
        for i in range(4, 4 + 125):
            assert arena.add_key(f"member-{i}".encode(), new_arena_key()) is not None
        assert arena.add_key(b"one-too-many", new_arena_key()) is None  # 128 entries: the 129th takes frames
    finally:
        arena.close()


# ---------------------------------------------------------------------------- credit, sizes, order
def test_server_that_ignores_credit_gets_a_protocol_error(fake: Any, no_leak: Any) -> None:
    sent_all = threading.Event()

    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello, in_order=False)
        for b in range(hello.credit + 3):  # more than the credit the hello granted
            server.batch(0, b % STEPS)
        sent_all.set()
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, prefetch=2, shared_memory=False)
    assert sent_all.wait(10), "the fake server did not send its batches"
    time.sleep(0.5)  # every batch has arrived before the trainer takes one (a take grants more credit)
    with pytest.raises(ProtocolError, match="beyond the 2 batches of credit"):
        for _ in range(5):
            client.next()
    assert client.batches_taken <= 2
    client.close()


def test_never_ending_multipart_message_is_cut_off(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        server.sock.send(server.identity, zmq.SNDMORE)
        chunk = b"z" * 60_000
        deadline = time.monotonic() + 20
        while not server.stop.is_set() and time.monotonic() < deadline:
            try:
                server.sock.send(chunk, zmq.SNDMORE | zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.01)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, timeout_s=60, shared_memory=False)
    started = time.monotonic()
    with pytest.raises(ProtocolError, match="has not completed a message for .* s while this process grew by "
                                            ".* MiB, more than a message may hold"):
        client.next()
    assert time.monotonic() - started < 15  # long before the 60 s timeout
    client.close()


@pytest.mark.parametrize(("kind", "match"), [("bytes", "over the bound of 4096"), ("frames", "of 70 frames")])
def test_oversized_messages_are_refused(fake: Any, no_leak: Any, kind: str, match: str) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello, max_message_bytes=4096)
        if kind == "bytes":
            server.batch(0, 0, arrays={**batch_arrays(0, 0), "big": np.zeros(8192, np.uint8)})
        else:
            server.send(m.Heartbeat(), [b"1"] * 69)
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(ProtocolError, match=match):
        client.next()
    client.close()


@pytest.mark.parametrize(("sent", "match"), [
    ([(0, 0), (0, 0)], "expected epoch 0 batch 1 .* got epoch 0 batch 0: .*repeated"),
    ([(0, 0), (0, 2)], "expected epoch 0 batch 1 .* got epoch 0 batch 2"),
    ([(0, 1)], "expected epoch 0 batch 0 .* got epoch 0 batch 1"),
    ([(0, STEPS)], "outside this stream"),
])
def test_repeated_skipped_or_out_of_order_batches_are_refused(fake: Any, no_leak: Any, sent: list[tuple[int, int]],
                                                              match: str) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        for e, b in sent:
            server.batch(e, b)
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(ProtocolError, match=match):
        for _ in sent:
            client.next()
    client.close()


def test_batch_with_other_steps_or_mismatched_arrays_is_refused(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        server.batch(0, 0, steps=STEPS + 1)
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(ProtocolError, match="says 6 batches per epoch; the welcome said 5"):
        client.next()
    client.close()


# ---------------------------------------------------------------------------- the welcome
@pytest.mark.parametrize(("overrides", "match"), [
    ({"batch_size": "32"}, "'batch_size' must be int, got str"),
    ({"in_order": 1}, "'in_order' must be bool, got int"),
    ({"x_shape": [4, -1, 3]}, "'x_shape' item must be between 0"),
    ({"heartbeat_s": 0}, "'heartbeat_s' must be between 0.001"),
    ({"path": "/etc/passwd"}, "field 'path' is not allowed"),
    ({"rank": 1, "world_size": 2}, "rank 1/2 is not the asked 0/1"),
    ({"class_names": ["a"]}, "1 class names for 3 classes"),
    ({"x_dtype": "|O"}, "x_dtype '|O' is not an allowed dtype"),
    ({"batch": 5}, "starts at epoch 0 batch 5"),
])
def test_bad_welcome_is_a_protocol_error_with_sockets_closed(fake: Any, no_leak: Any, overrides: dict[str, Any],
                                                             match: str) -> None:
    server = fake(lambda s, h: (s.welcome(h, **overrides), s.idle(30)))
    no_leak()
    with pytest.raises(ProtocolError, match=match):
        client_of(server, shared_memory=False)


def _missing_field(server: FakeServer, hello: m.Hello) -> None:
    fields = welcome_fields(hello)
    del fields["num_classes"]
    server.send({"t": "welcome", **fields})
    server.idle(30)


def _other_version(server: FakeServer, hello: m.Hello) -> None:
    server.sock.send_multipart([server.identity, msgpack.packb({"v": PROTOCOL_VERSION + 1, "t": "welcome"})])
    server.idle(30)


def test_missing_welcome_field_and_other_version_are_refused(fake: Any, no_leak: Any) -> None:
    missing, other = fake(_missing_field), fake(_other_version)
    no_leak()
    with pytest.raises(ProtocolError, match="'num_classes' is required"):
        client_of(missing)
    with pytest.raises(ProtocolVersionError, match=f"speaks version {PROTOCOL_VERSION + 1}"):
        client_of(other)


def test_tiny_heartbeat_does_not_flood_the_server_with_pings(fake: Any, no_leak: Any) -> None:
    server = fake(lambda s, h: (s.welcome(h, heartbeat_s=0.001), s.idle(30)))
    no_leak()
    started = time.monotonic()
    with client_of(server, shared_memory=False, timeout_s=30) as client:
        assert client.num_classes == 3 and client.info["layout"] == "hwc" and client.info["heartbeat_s"] == 0.001
        time.sleep(1.0)
    elapsed = time.monotonic() - started  # about 1 s; longer on a stalled machine, which pings longer too
    pings = server.received.count("ping")
    assert 5 <= pings <= elapsed / 0.05 + 1, (pings, elapsed)  # at most one per 50 ms, whatever the welcome says


def test_collate_arrays_come_after_x_and_y(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        server.batch(0, 0, arrays=batch_arrays(0, 0, extra=True))
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    with client_of(server, shared_memory=False) as client:
        x, y, w = client.next()
        assert x.shape == (BATCH, *X_SHAPE) and y.tolist() == [0, 1] and w.dtype == np.float32
        assert client.position == (0, 1) and client.last is not None and client.last.indices.tolist() == [0, 1]


# ---------------------------------------------------------------------------- errors and goodbyes
def test_goodbye_during_the_handshake_raises_at_once(fake: Any, no_leak: Any) -> None:
    server = fake(lambda s, h: (s.send(m.Goodbye(reason="SIGTERM")), s.idle(30)))
    no_leak()
    started = time.monotonic()
    with pytest.raises(ServerStoppedError, match="was stopped on purpose \\(SIGTERM\\)") as info:
        client_of(server, timeout_s=30)
    assert time.monotonic() - started < 3 and info.value.reason == "SIGTERM"
    assert "died" not in str(info.value)


def test_goodbye_on_an_open_stream_raises_at_once_and_stays(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        server.batch(0, 0)
        server.send(m.Goodbye(reason="SIGINT\nforged log line"))
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, timeout_s=30, shared_memory=False)
    client.next()
    started = time.monotonic()
    with pytest.raises(ServerStoppedError, match=r"stopped on purpose \(SIGINT\\nforged log line\)"):
        client.next()
    assert time.monotonic() - started < 3
    with pytest.raises(ServerStoppedError):  # the failure stays
        client.next()
    client.close()


def test_server_error_carries_its_structured_fields(fake: Any, no_leak: Any) -> None:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello)
        server.send(m.Error(kind="bad_sample", message="cannot decode img/3.jpg", path="img/3.jpg",
                            reason="corrupt", traceback="Traceback: ...", exit_code=None))
        server.idle(30)

    server = fake(behaviour)
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(BadSampleError, match="cannot decode img/3.jpg") as info:
        client.next()
    assert info.value.path == "img/3.jpg" and info.value.reason == "corrupt"
    assert "worker traceback" in str(info.value)
    client.close()


def test_unexpected_message_on_the_stream_is_refused(fake: Any, no_leak: Any) -> None:
    server = fake(lambda s, h: (s.welcome(h), s.welcome(h), s.idle(30)))
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(ProtocolError, match="unexpected message type 'welcome'"):
        client.next()
    client.close()


def test_close_says_bye(fake: Any, no_leak: Any) -> None:
    server = fake(just_welcome)
    no_leak()
    client_of(server, shared_memory=False).close()
    wait_until(lambda: "bye" in server.received, 5, "the client's bye")


def test_a_trainer_that_exits_without_close_says_bye(fake: Any) -> None:
    server = fake(just_welcome)
    code = ("import sys; from loader_client import LoaderClient; "
            f"client = LoaderClient({server.endpoint!r}, timeout_s=10, shared_memory=False); "
            "print(client.num_classes)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
    wait_until(lambda: "bye" in server.received, 5, "the exiting trainer's bye")


# ---------------------------------------------------------------------------- settings checked locally
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "evil\nINFO forged"}, "`name` must be printable"),
    ({"name": "nul\0byte"}, "`name` must be printable"),
    ({"name": "x" * 200}, "`name` must be printable text of 1 to 128"),
    ({"state": {"epoch": 2**64 - 1, "batch": 0, "seed": 1}},
     r'`state\["epoch"\]` must be an integer from 0 to 2147483647'),
    ({"state": {"epoch": 0, "batch": 0, "seed": 2**63}}, r'`state\["seed"\]` must be an integer'),
    ({"state": {"epoch": 0}}, "`state` must come from LoaderClient.state_dict"),
    ({"rank": 2, "world_size": 2}, "`rank` 2 of `world_size` 2 is out of range"),
    ({"prefetch": 0}, "`prefetch` must be an integer from 1 to 64"),
    ({"timeout_s": 0}, "`timeout_s` must be a number"),
    ({"heartbeat_s": 0.001}, "`heartbeat_s` must be a number from 0.05"),
    ({"on_server_loss": "ignore"}, "`on_server_loss` must be 'failover', 'raise' or 'continue'"),
])
def test_bad_settings_are_refused_before_anything_is_sent(fake: Any, kwargs: dict[str, Any], match: str) -> None:
    server = fake(just_welcome)
    with pytest.raises(ConfigError, match=match):
        LoaderClient(server.endpoint, **kwargs)
    time.sleep(0.1)
    assert server.received == []


def test_unknown_keyword_is_refused() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) prefetc"):
        LoaderClient("tcp://127.0.0.1:5555", prefetc=3)


# ---------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize(("endpoint", "match"), [
    ("127.0.0.1:5555", "has no scheme \\(did you mean tcp://127.0.0.1:5555\\?\\)"),
    ("http://127.0.0.1:5555", "uses scheme 'http'.*tcp://127.0.0.1:5555"),
    ("tcp://127.0.0.1", "needs a port between 1 and 65535"),
    ("tcp://127.0.0.1:0", "needs a port between 1 and 65535"),
    ("tcp://127.0.0.1:70000", "needs a port between 1 and 65535"),
    ("tcp://:5555", "has no host"),
    ("tcp://bad host:5555", "is not a host name or an address"),
    ("tcp://[zz]:5555", "is not an IPv6 address"),
    ("ipc://", "names no socket path"),
    ("tcp://a\n:1", "holds control characters"),
])
def test_endpoints_are_validated_at_once_with_an_example(endpoint: str, match: str) -> None:
    with pytest.raises(EndpointError, match=match) as info:
        LoaderClient(endpoint, timeout_s=30)
    assert "://" in str(info.value).split(":", 1)[1]  # a correct example follows
    with pytest.raises(EndpointError):
        health(endpoint, timeout_s=30)
    with pytest.raises(EndpointError):
        LoaderClient([endpoint, "tcp://127.0.0.1:5555"], timeout_s=30)


def test_parse_endpoint_accepts_the_usual_forms() -> None:
    assert parse_endpoint("tcp://[::1]:5555").host == "::1"
    assert parse_endpoint("tcp://loader-host.example:80").port == 80
    assert parse_endpoint("ipc:///tmp/a.sock").path == "/tmp/a.sock"


@pytest.mark.parametrize("command", ["health", "stats"])
def test_health_and_stats_cli_refuse_a_malformed_endpoint_as_a_usage_error(command: str) -> None:
    """Exit 2 (bad input), not 1: a probe must not read a typo in its manifest as an unhealthy server."""
    result = subprocess.run([sys.executable, "-m", "loader_server", command, "127.0.0.1:5555"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert result.returncode == 2, result.stderr
    assert "did you mean tcp://127.0.0.1:5555" in result.stderr and "Traceback" not in result.stderr
    unanswered = subprocess.run([sys.executable, "-m", "loader_server", command, f"tcp://127.0.0.1:{free_port()}",
                                 "--timeout-s", "0.5"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                                check=False)
    assert unanswered.returncode == 1, unanswered.stderr  # well-formed, nobody answers: unhealthy
    assert "connection refused" in unanswered.stderr


# ---------------------------------------------------------------------------- why nothing answered
def test_timeout_names_a_missing_socket_file(tmp_path: Path, no_leak: Any) -> None:
    no_leak()
    with pytest.raises(LoaderTimeoutError, match=f"there is no socket file at {tmp_path}/none.sock"):
        LoaderClient(f"ipc://{tmp_path}/none.sock", timeout_s=0.3)


def test_timeout_names_a_stale_socket_file(tmp_path: Path, no_leak: Any) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # bound, never listening: what a killed server leaves behind
        no_leak()
        with pytest.raises(LoaderTimeoutError, match="nothing listens on the socket file"):
            LoaderClient(f"ipc://{path}", timeout_s=0.3)


def test_timeout_names_an_unresolvable_host(no_leak: Any) -> None:
    no_leak()
    with pytest.raises(LoaderTimeoutError, match="the host name 'no-such-host.invalid' does not resolve"):
        LoaderClient("tcp://no-such-host.invalid:5555", timeout_s=0.3)


def test_timeout_names_a_closed_port(no_leak: Any) -> None:
    port = free_port()
    no_leak()
    with pytest.raises(LoaderTimeoutError, match=f"nothing listens on port {port} of 127.0.0.1"):
        LoaderClient(f"tcp://127.0.0.1:{port}", timeout_s=0.3)
    with pytest.raises(LoaderTimeoutError, match=f"no health answer .* nothing listens on port {port}"):
        health(f"tcp://127.0.0.1:{port}", timeout_s=0.3)


def test_timeout_names_a_server_that_accepts_but_does_not_answer(no_leak: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        no_leak()
        with pytest.raises(LoaderTimeoutError, match="accepted the connection on port .* but did not answer"):
            LoaderClient(f"tcp://127.0.0.1:{port}", timeout_s=0.5)
        from loader_client.endpoints import parse_endpoint, why_silent

        # the time waited so far is shown rounded (the warning after 2 s said "within 2.0021 s")
        assert "did not answer within 2 s:" in why_silent(parse_endpoint(f"tcp://127.0.0.1:{port}"), 2.0021)


def test_a_waiting_client_says_why_once_and_gives_up_at_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A refused port is known at once: the cause is logged once after the grace period, not only at the end."""
    port = free_port()
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="loader_client"):
        with pytest.raises(LoaderTimeoutError, match=f"nothing listens on port {port}"):
            LoaderClient(f"tcp://127.0.0.1:{port}", timeout_s=WAIT_GRACE_S + 1.5)
    records = [r for r in caplog.records if r.name == "loader_client" and "still waiting" in r.getMessage()]
    said = [r.getMessage() for r in records]
    assert len(said) == 1 and f"nothing listens on port {port} of 127.0.0.1 (connection refused)" in said[0], said
    assert records[0].created - started >= WAIT_GRACE_S  # not before the grace (a busy machine only delays it)
    assert f"up to timeout_s={WAIT_GRACE_S + 1.5:g} s" in said[0]


def test_a_waiting_client_connects_to_a_server_that_starts_late(start_server: Any, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from .conftest import unique_label_list

    listfile = unique_label_list(tmp_path / "data", 8)
    endpoint = f"ipc://{tmp_path}/late.sock"
    got: dict[str, Any] = {}

    def connect() -> None:
        try:
            with LoaderClient(endpoint, timeout_s=120) as client:
                got["samples"] = client.num_samples
        except BaseException as exc:  # reported by the assertion below
            got["error"] = exc

    with caplog.at_level(logging.WARNING, logger="loader_client"):
        waiting = threading.Thread(target=connect)
        waiting.start()
        wait_until(lambda: any("still waiting" in r.getMessage() for r in caplog.records), 60, "the cause logged")
        start_server(listfile, "--batch-size", "2", "--size", "8x8", "--workers", "1", endpoint=endpoint)
        waiting.join(120)
    assert got == {"samples": 8}
    said = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert len(said) == 1 and f"there is no socket file at {tmp_path}/late.sock" in said[0]


# ---------------------------------------------------------------------------- an honest server
def honest(server: FakeServer, hello: m.Hello) -> None:
    """Sends in order, only against credit, with heartbeats: what the real server does."""
    server.welcome(hello, heartbeat_s=0.1)
    credit, position = hello.credit, hello.epoch * STEPS + hello.batch
    last_tx = time.monotonic()
    while not server.stop.is_set():
        while credit > 0:
            e, b = divmod(position, STEPS)
            arrays = batch_arrays(e, b, rank=hello.rank, world=hello.world_size)
            arrays["y"] += 1000 * hello.rank  # which share it came from
            server.batch(e, b, arrays=arrays)
            credit, position, last_tx = credit - 1, position + 1, time.monotonic()
        if server.sock.poll(20):
            _, *frames = server.sock.recv_multipart()
            header = msgpack.unpackb(frames[0])
            server.received.append(header["t"])
            if header["t"] == "credit":
                credit += header["n"]
        if time.monotonic() - last_tx > 0.1:
            server.send(m.Heartbeat())
            last_tx = time.monotonic()


def test_epochs_position_and_resume_against_an_honest_server(fake: Any, no_leak: Any) -> None:
    server, resumed = fake(honest), fake(honest)
    no_leak()
    with client_of(server, prefetch=2, shared_memory=False) as client:
        assert len(client) == client.steps_per_epoch == STEPS and client.num_classes == 3
        first = [y.tolist() for _, y in client.epoch()]
        assert first == [[2 * b, 2 * b + 1] for b in range(STEPS)] and client.position == (1, 0)
        client.next(), client.next()
        state = client.state_dict()
        assert state == {"epoch": 1, "batch": 2, "seed": 7, "rank": 0, "world_size": 1, "fingerprint": "f" * 16}
        assert len(list(client.epoch())) == STEPS - 2 and client.position == (2, 0)
        stats = client.stats(server=False)
        assert stats["batches_taken"] == 2 * STEPS and stats["position"] == [2, 0]
    with client_of(resumed, state=state, shared_memory=False) as client:
        assert client.position == (1, 2) and resumed.hello is not None and resumed.hello.batch == 2
        assert client.next()[1].tolist() == [(STEPS + 2) * 2, (STEPS + 2) * 2 + 1]


def test_several_servers_merge_round_robin_with_state(fake: Any, no_leak: Any) -> None:
    a, b = fake(honest), fake(honest, transport="tcp")
    no_leak()
    with LoaderClient([a.endpoint, b.endpoint], timeout_s=5, shared_memory=False) as client:
        assert client.servers == 2 and client.steps_per_epoch == 2 * STEPS
        assert a.hello is not None and b.hello is not None
        assert (a.hello.rank, a.hello.world_size, b.hello.rank, b.hello.world_size) == (0, 2, 1, 2)
        got = [client.next()[1][0] // 1000 for _ in range(4)]
        assert got == [0, 1, 0, 1]  # server b % m for merged batch b
        assert client.state_dict()["servers"] == 2 and client.position == (0, 4)


# ---------------------------------------------------------------------------- against the real server
def test_real_server_stopped_on_purpose_raises_at_once_and_a_trainer_exit_is_a_normal_departure(
        start_server: Any, tmp_path: Path) -> None:
    from .conftest import unique_label_list

    listfile = unique_label_list(tmp_path / "data", 16)
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    code = ("from loader_client import LoaderClient; "
            f"client = LoaderClient({server.endpoint!r}, timeout_s=30, name='leaver'); client.next()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                            check=False)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "client leaver left (said goodbye)" in server.log_text(), 10, "the server to log the bye")
    client = LoaderClient(server.endpoint, timeout_s=30)
    try:
        client.next()
        server.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(ServerStoppedError, match="stopped on purpose") as info:
            for _ in range(100):
                client.next()
        assert time.monotonic() - started < 5  # not the 30 s silence timeout
        assert "died" not in str(info.value)
    finally:
        client.close()
    assert server.proc.wait(15) == 0
