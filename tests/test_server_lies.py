"""A server that lies to the client (issue 21, "the client's trust"): every lie ends in the documented
error naming the server, and with several hosts the loss policy takes over.

The liars are real processes and sockets: a hand-written ZMTP server (tests/zmtp_server.py) that
sends a message that never ends, or squats an ipc socket as another user; ZeroMQ ROUTERs on
threads of this process that send batches of another share, of another shape, or too slowly;
and a fake server that announces a real server's arena of another trainer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
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

from loader_client import AuthenticationError, LoaderClient, ProtocolError
from loader_client.contract import messages as m
from loader_client.contract.protocol import describe_arrays
from loader_client.contract.sampling import SamplingPlan
from loader_client.contract.schema import encode

from .conftest import free_port, unique_label_list, wait_until
from .test_client_trust import BATCH, STEPS, X_SHAPE, FakeServer, batch_arrays, client_of, fake, no_leak, welcome_fields

__all__ = ["fake", "no_leak"]  # the fixtures of test_client_trust, used here

ROOT = Path(__file__).resolve().parent.parent
ZMTP_SERVER = Path(__file__).with_name("zmtp_server.py")
MiB = 1 << 20
SQUATTER_UID = 10003


# ---------------------------------------------------------------------------- a hand-written ZMTP server
def default_hello() -> m.Hello:
    """What a client with default settings says (rank 0 of 1, from the start, no seed)."""
    return m.Hello(credit=4, shm=False)


def batch_frames(epoch: int, batch: int, arrays: dict[str, np.ndarray] | None = None) -> list[str]:
    arrays = batch_arrays(epoch, batch) if arrays is None else arrays
    head = encode(m.Batch(epoch=epoch, batch=batch, steps=STEPS, arrays=describe_arrays(arrays)))
    return [head.hex(), *(a.tobytes().hex() for a in arrays.values())]


@contextlib.contextmanager
def zmtp_server(folder: Path, address: str, script: dict[str, Any], *,
                user: int | None = None) -> Iterator[Callable[[], dict[str, Any]]]:
    """Run tests/zmtp_server.py (as `user`, through setpriv, if given); yields a reader of its report."""
    (folder / "script.json").write_text(json.dumps(script))
    report = folder / "report.json"
    command = [sys.executable, str(ZMTP_SERVER)]
    if user is not None:
        shutil.copy(ZMTP_SERVER, folder / "zmtp_server.py")
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", other_users_python(),
                   str(folder / "zmtp_server.py")]
    log = folder / "zmtp_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*command, address, str(folder / "script.json"), str(report)], stdout=out,
                                stderr=subprocess.STDOUT)

    def read() -> dict[str, Any]:
        return json.loads(report.read_text())  # type: ignore[no-any-return]

    try:
        wait_until(lambda: report.exists() or proc.poll() is not None, 30, "the ZMTP server to listen")
        assert proc.poll() is None, log.read_text()
        yield read
    finally:
        proc.kill()
        proc.wait(10)


def other_users_python() -> str:
    """A Python that another user may run (tests/zmtp_server.py needs its standard library only)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(["setpriv", f"--reuid={SQUATTER_UID}", f"--regid={SQUATTER_UID}", "--clear-groups",
                                candidate, "-c", "import json, socket"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return candidate
    pytest.skip("no Python that another user may run")


#: A trainer in its own process: its peak memory growth while it waits for a batch, and the error it got.
MEASURE = """
import json, sys
from loader_client import LoaderClient, LoaderError
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
client = LoaderClient(sys.argv[1], timeout_s=float(sys.argv[2]), max_message_bytes=int(sys.argv[3]),
                      shared_memory=False)
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here
try:
    client.next()
    error = None
except LoaderError as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"grew": status("VmHWM:") - before, "error": error}))
client.close()
"""


@pytest.mark.parametrize(("transport", "heartbeat_s"), [("ipc", 3600.0), ("tcp", 1.0)])
def test_a_message_that_never_ends_is_cut_off_at_the_bound_the_client_states(tmp_path: Path, transport: str,
                                                                            heartbeat_s: float) -> None:
    """The guard is the client's own: a welcome's heartbeat does not move it, and its bound holds.

    Before: a heartbeat of 3600 s (or NaN) turned it off (1.5 GB until timeout_s), and with 1 s
    it let the trainer grow to 551 MB against a stated 128 MiB.
    """
    max_bytes = 32 * MiB  # the trainer's own bound on a message: the guard is 2 x 32 MiB + 64 MiB = 128 MiB
    bound = 2 * max_bytes + 64 * MiB
    address = str(tmp_path / "liar.sock") if transport == "ipc" else f"127.0.0.1:{free_port()}"
    endpoint = f"ipc://{address}" if transport == "ipc" else f"tcp://{address}"
    welcome = encode(m.Welcome(**welcome_fields(default_hello(), heartbeat_s=heartbeat_s,
                                                max_message_bytes=1 << 40)))
    # At a known pace, so that what the test allows beyond the bound does not depend on this machine's
    # speed: 256 MiB/s, and the client checks every 10 ms. (At full speed here: at most 16 MiB beyond.)
    script = {"welcome": welcome.hex(), "flood_bytes": 768 * MiB, "flood_rate": 256 * MiB, "hold_s": 60}
    with zmtp_server(tmp_path, address, script) as report:
        result = subprocess.run([sys.executable, "-c", MEASURE, endpoint, "20", str(max_bytes)], capture_output=True,
                                text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        sent = report()["flood_sent"]
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["error"] is not None and got["error"].startswith("ProtocolError: "), got
    assert "has not completed a message" in got["error"] and "a message that never ends" in got["error"], got
    # What arrives between two of its checks comes on top of the bound: 2.5 MiB at this pace, 32 MiB
    # allowed (for the checks of a thread that a loaded machine delays by up to 125 ms).
    assert got["grew"] < bound + 32 * MiB, (got["grew"] / MiB, sent / MiB)


def test_a_welcome_heartbeat_that_is_not_a_number_is_refused(fake: Any, no_leak: Any) -> None:
    """Before: NaN passed every range check, and turned the client's guard off."""
    server = fake(lambda s, h: (s.welcome(h, heartbeat_s=math.nan), s.idle(30)))
    no_leak()
    with pytest.raises(ProtocolError, match="'heartbeat_s' must be a finite number"):
        client_of(server, shared_memory=False)


# ---------------------------------------------------------------------------- batches against the welcome
def _sends(*arrays: dict[str, np.ndarray], **welcome: Any) -> Callable[[FakeServer, m.Hello], None]:
    def behaviour(server: FakeServer, hello: m.Hello) -> None:
        server.welcome(hello, **welcome)
        for b, a in enumerate(arrays):
            server.batch(0, b, arrays=a)
        server.idle(30)

    return behaviour


def _other_x(x: np.ndarray) -> dict[str, np.ndarray]:
    return {**batch_arrays(0, 0), "x": x}


@pytest.mark.parametrize(("batches", "match"), [
    ([_other_x(np.zeros((BATCH, 16, 7)))], r"has x of float64 \(2, 16, 7\); the welcome promised uint8 \(2, 4, 4, 3\)"),
    ([_other_x(np.zeros((BATCH, 4, 4, 3), np.float32))], "has x of float32"),
    ([_other_x(np.zeros((BATCH + 1, 4, 4, 3), np.uint8))], r"has x of uint8 \(3, 4, 4, 3\)"),
    ([{"x": np.zeros((0, 4, 4, 3), np.uint8), "y": np.zeros(0, np.int64), "index": np.zeros(0, np.int64)}],
     r"has x of uint8 \(0, 4, 4, 3\)"),
    ([{**batch_arrays(0, 0), "w": np.ones(BATCH + 1, np.float32)}], r"has w \(3,\): not one row"),
    ([{**batch_arrays(0, 0), "index": np.array([0, 7])}], r"not its share's .* 7 at place 1 \(owed 1\)"),
    ([{**batch_arrays(0, 0), "y": np.zeros((BATCH, 2), np.int64)}, batch_arrays(0, 1)],
     r"has y of int64 with samples of shape \(\); the stream's first batch had int64 of \(2,\)"),
])
def test_a_batch_that_is_not_what_the_welcome_promised_is_refused(fake: Any, no_leak: Any,
                                                                  batches: list[dict[str, np.ndarray]],
                                                                  match: str) -> None:
    """Before: float64 (16, 7) batches after a uint8 (64, 64, 3) welcome were accepted, and so were empty ones."""
    server = fake(_sends(*batches))
    no_leak()
    client = client_of(server, shared_memory=False)
    for _ in batches[:-1]:
        client.next()
    where = f"batch {len(batches) - 1} of epoch 0 from the loader server at {server.endpoint}"
    with pytest.raises(ProtocolError, match=match) as info:
        client.next()
    assert str(info.value).startswith(where)
    client.close()


def test_the_torch_adapter_gets_the_protocol_error_not_a_runtime_error(fake: Any, no_leak: Any) -> None:
    torch_adapter = pytest.importorskip("loader_client.torch")
    server = fake(_sends(_other_x(np.zeros((BATCH, 16, 7)))))
    no_leak()
    client = client_of(server, shared_memory=False)
    with pytest.raises(ProtocolError, match="the welcome promised uint8"):
        next(torch_adapter.tensors(client, channels_first=True))
    client.close()


def test_the_short_last_batch_of_a_keep_last_epoch_is_accepted_and_only_that_one(fake: Any, no_leak: Any) -> None:
    plan = SamplingPlan(STEPS * BATCH - 1, BATCH, shuffle=False, drop_last=False)
    short = plan.batch(0, STEPS - 1, seed=7)
    assert len(short) == 1

    def arrays(b: int, n: int) -> dict[str, np.ndarray]:
        index = np.resize(plan.batch(0, b, seed=7), n) if b < STEPS - 1 else short
        return {"x": np.zeros((n, *X_SHAPE), np.uint8), "y": index.copy(), "index": index}

    keep_last = {"num_samples": STEPS * BATCH - 1, "drop_last": False}
    good = fake(_sends(*(arrays(b, BATCH if b < STEPS - 1 else 1) for b in range(STEPS)), **keep_last))
    bad = fake(_sends(arrays(0, 1), **keep_last))
    no_leak()
    with client_of(good, shared_memory=False, prefetch=STEPS) as client:
        assert [len(client.next()[0]) for _ in range(STEPS)] == [BATCH] * (STEPS - 1) + [1]
    with client_of(bad, shared_memory=False) as client, pytest.raises(ProtocolError, match=r"\(1, 4, 4, 3\)"):
        client.next()


def test_a_welcome_whose_batches_per_epoch_do_not_follow_from_its_plan_is_refused(fake: Any, no_leak: Any) -> None:
    server = fake(lambda s, h: (s.welcome(h, num_samples=1000), s.idle(30)))
    no_leak()
    with pytest.raises(ProtocolError, match="5 batches per epoch, but 1000 samples in batches of 2 .* give 500"):
        client_of(server, shared_memory=False)


# ---------------------------------------------------------------------------- several hosts
class PlanServer:
    """A ZeroMQ ROUTER that serves any number of sessions by the sampling plan of `welcome_fields`
    (no shuffle), answers health requests, and can lie: send the samples of share `lie_share`
    instead of the one asked, announce other welcome fields (its batches follow them), or send
    a batch only every `batch_every_s` (with heartbeats between)."""

    def __init__(self, endpoint: str, *, lie_share: int | None = None, batch_every_s: float | None = None,
                 **welcome: Any) -> None:
        self.endpoint, self.lie_share, self.batch_every_s, self.overrides = endpoint, lie_share, batch_every_s, welcome
        self.sessions: dict[bytes, dict[str, Any]] = {}
        self.hellos: list[m.Hello] = []
        self.error: BaseException | None = None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            last_beat = 0.0
            while not self.stop.is_set():
                if self.sock.poll(10):
                    identity, frame, *_ = self.sock.recv_multipart()
                    self._on(identity, msgpack.unpackb(frame))
                now = time.monotonic()
                for identity, s in list(self.sessions.items()):
                    while s["credit"] > 0 and now >= s["due"]:
                        self._send_batch(identity, s)
                        s["due"] = now + self.batch_every_s if self.batch_every_s else 0.0
                if now - last_beat > 0.1:
                    for identity in list(self.sessions):
                        self.sock.send_multipart([identity, encode(m.Heartbeat())])
                    last_beat = now
        except BaseException as exc:  # a broken fixture must fail the test, not hang it
            self.error = exc

    def _on(self, identity: bytes, header: dict[str, Any]) -> None:
        kind = header["t"]
        if kind == "health":
            reply = m.HealthReply(ok=True, workers_ready=1, workers=1, clients=len(self.sessions), batches_sent=0)
            self.sock.send_multipart([identity, encode(reply)])
        elif kind == "hello":
            hello = m.Hello(**{k: v for k, v in header.items() if k not in ("v", "t")})
            self.hellos.append(hello)
            fields = welcome_fields(hello, **self.overrides)
            first = time.monotonic() + self.batch_every_s if self.batch_every_s else 0.0
            self.sessions[identity] = {"hello": hello, "fields": fields, "credit": hello.credit, "due": first,
                                       "position": hello.epoch * STEPS + hello.batch}
            self.sock.send_multipart([identity, encode(m.Welcome(**fields))])
        elif kind == "credit" and identity in self.sessions:
            self.sessions[identity]["credit"] += header["n"]
        elif kind == "bye":
            self.sessions.pop(identity, None)

    def _send_batch(self, identity: bytes, s: dict[str, Any]) -> None:
        hello, fields = s["hello"], s["fields"]
        epoch, batch = divmod(s["position"], STEPS)
        share = hello.rank if self.lie_share is None else self.lie_share
        plan = SamplingPlan(fields["num_samples"], BATCH, shuffle=False)
        index = np.ascontiguousarray(plan.batch(epoch, batch, seed=fields["seed"], rank=share,
                                                world_size=hello.world_size))
        x = np.zeros((len(index), *fields["x_shape"]), np.dtype(fields["x_dtype"]))
        arrays = {"x": x, "y": index.copy(), "index": index}
        head = encode(m.Batch(epoch=epoch, batch=batch, steps=STEPS, arrays=describe_arrays(arrays)))
        self.sock.send_multipart([identity, head, *(a.tobytes() for a in arrays.values())])
        s["credit"] -= 1
        s["position"] += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close(linger=0)
        self.ctx.term()
        if self.error is not None:
            raise self.error


@pytest.fixture
def plan_servers(tmp_path: Path) -> Iterator[Callable[..., PlanServer]]:
    servers: list[PlanServer] = []

    def start(**kwargs: Any) -> PlanServer:
        servers.append(PlanServer(f"ipc://{tmp_path}/plan{len(servers)}.sock", **kwargs))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def one_epoch(endpoints: list[str], **kwargs: Any) -> tuple[list[int], list[dict[str, Any]]]:
    """The sample indices of one merged epoch, in order, and the losses."""
    with LoaderClient(endpoints, shared_memory=False, **{"timeout_s": 5.0, **kwargs}) as client:
        assert client.steps_per_epoch == 2 * STEPS
        seen = []
        for _ in client.epoch():
            assert client.last is not None
            seen.extend(int(i) for i in client.last.indices)
        return seen, client.lost


@pytest.mark.parametrize("merge", ["ordered", "balanced"])
def test_a_host_that_sends_another_shares_samples_is_lost_and_its_share_built_by_the_others(
        plan_servers: Any, merge: str) -> None:
    """Before: merged silently, 96 of 192 samples twice and 96 never."""
    honest, liar = plan_servers(), plan_servers(lie_share=0)
    seen, lost = one_epoch([honest.endpoint, liar.endpoint], merge=merge)
    assert sorted(seen) == list(range(2 * STEPS * BATCH))  # every sample of the epoch once
    assert [loss["endpoint"] for loss in lost] == [liar.endpoint]
    assert "holds samples that are not its share's (rank 1 of 2, seed 7)" in lost[0]["error"], lost
    assert any(h.rank == 1 for h in honest.hellos)  # the honest host took over share 1


@pytest.mark.parametrize("other", [{"x_dtype": "<f4"}, {"x_shape": [8, 8, 3]}])
def test_a_second_host_with_other_shapes_or_dtypes_is_refused_at_admission(plan_servers: Any,
                                                                           other: dict[str, Any]) -> None:
    """Before: a second host's shape and dtype were never compared with the first's."""
    first, second = plan_servers(), plan_servers(**other)
    with pytest.raises(ProtocolError, match=f"{second.endpoint} announces another stream than {first.endpoint}, with "
                                            f"the same fingerprint: {next(iter(other))}"):
        LoaderClient([first.endpoint, second.endpoint], timeout_s=5.0, shared_memory=False, on_server_loss="raise")
    seen, lost = one_epoch([first.endpoint, second.endpoint])  # fail-over: the first host builds both shares
    assert sorted(seen) == list(range(2 * STEPS * BATCH))
    assert [loss["endpoint"] for loss in lost] == [second.endpoint] and "another stream" in lost[0]["error"]


def test_a_host_that_answers_but_delivers_too_slowly_is_lost(plan_servers: Any) -> None:
    """Progress, not heartbeats: a host sending one batch per 1.8 x timeout_s was never declared lost."""
    timeout_s = 2.0
    fast, slow = plan_servers(), plan_servers(batch_every_s=1.8 * timeout_s)
    seen, lost = one_epoch([fast.endpoint, slow.endpoint], timeout_s=timeout_s)
    assert sorted(seen) == list(range(2 * STEPS * BATCH))
    assert [loss["endpoint"] for loss in lost] == [slow.endpoint]
    assert f"has delivered no batch for {timeout_s:g} s while the trainer waited for one" in lost[0]["error"], lost


# ---------------------------------------------------------------------------- shared memory and ipc
def test_another_trainers_arena_is_not_mapped(start_server: Any, tmp_path: Path, fake: Any) -> None:
    """A lying server announces a real server's arena of another session (pid, fd and inode are easy to
    guess); this trainer could open it (same user), but the arena does not hold this client's key."""
    server = start_server(unique_label_list(tmp_path / "data", 16), "--batch-size", "4", "--size", "16x12",
                          "--workers", "1")
    with LoaderClient(server.endpoint, timeout_s=20) as victim:
        assert victim.shared_memory
        victim.next()
        theirs = victim.info["shm"]

        def announce(liar: FakeServer, hello: m.Hello) -> None:
            assert hello.shm
            liar.welcome(hello, shm=theirs)
            liar.idle(30)

        liar = fake(announce, transport="tcp")  # loopback TCP: the arena is looked for in /proc
        with pytest.raises(ProtocolError, match="does not hold the key this client gave for its own arena"):
            client_of(liar)


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A folder that every user may write (mode 1777, like /tmp), outside pytest's private tmp."""
    folder = Path(tempfile.mkdtemp(prefix="loader-squat-"))
    try:
        folder.chmod(0o1777)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_ipc_socket_squatted_by_another_user_is_refused_unless_that_uid_is_trusted() -> None:
    """Before: a socket another user put in a shared folder served a root trainer."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run a server as another user")
    hello = default_hello()
    script = {"welcome": encode(m.Welcome(**welcome_fields(hello))).hex(), "batches": [batch_frames(0, 0)],
              "hold_s": 60}
    with shared_folder() as folder:
        endpoint = f"ipc://{folder}/loader.sock"
        with zmtp_server(folder, str(folder / "loader.sock"), script, user=SQUATTER_UID) as report:
            assert report()["uid"] == SQUATTER_UID
            with pytest.raises(AuthenticationError, match=f"the ipc socket {folder}/loader.sock is served by a "
                                                          f"process of uid {SQUATTER_UID}, which this trainer"):
                LoaderClient(endpoint, timeout_s=5)
            wait_until(lambda: report()["connections"] == 1, 10, "the squatter to see the client's probe")
            assert report()["received"] == [0]  # the probe said nothing: no greeting, no hello
            # Trusted explicitly (a loader that runs as that user): the stream runs.
            with LoaderClient(endpoint, timeout_s=5, server_uid=SQUATTER_UID) as client:
                x, y = client.next()
                assert x.shape == (BATCH, *X_SHAPE) and y.tolist() == batch_arrays(0, 0)["y"].tolist()
            wait_until(lambda: len(report()["received"]) == 3 and report()["received"][2] > 0, 10,
                       "the squatter to count the trusting client's hello")
            # Or through LOADER_SERVER_UID, as compose and the pods set it, for a script that passes nothing.
            os.environ["LOADER_SERVER_UID"] = str(SQUATTER_UID)
            try:
                with LoaderClient(endpoint, timeout_s=5) as client:
                    assert client.next()[1].tolist() == batch_arrays(0, 0)["y"].tolist()
            finally:
                del os.environ["LOADER_SERVER_UID"]


def test_a_loopback_port_taken_by_another_user_is_refused_unless_that_uid_is_trusted() -> None:
    """A local user (65534) listening on the loopback port where a trainer expects its loader (taken before
    the server started, or after it stopped) serves a welcome and a batch of its choosing: the trainer
    refuses it, naming the uid, whether it listened first or only after the client began to wait (before:
    the squatter's batch was the trainer's first batch; README's threat model said "not covered")."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to run a server as another user")
    hello = default_hello()
    script = {"welcome": encode(m.Welcome(**welcome_fields(hello))).hex(), "batches": [batch_frames(0, 0)],
              "hold_s": 60}
    refusal = f"is listened on by a process of uid {SQUATTER_UID}, which this trainer"
    with shared_folder() as folder:
        port = free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        with zmtp_server(folder, f"127.0.0.1:{port}", script, user=SQUATTER_UID):
            with pytest.raises(AuthenticationError, match=refusal):
                LoaderClient(endpoint, timeout_s=5)
            # Trusted explicitly (a loader that runs as that user): the stream runs.
            with LoaderClient(endpoint, timeout_s=5, server_uid=SQUATTER_UID) as client:
                assert client.next()[1].tolist() == batch_arrays(0, 0)["y"].tolist()
        # A squatter that takes the port while the trainer already waits for its server.
        port = free_port()
        endpoint = f"tcp://127.0.0.1:{port}"
        outcome: list[BaseException | None] = []

        def trainer() -> None:
            try:
                LoaderClient(endpoint, timeout_s=20).close()
                outcome.append(None)
            except BaseException as exc:  # handed to the test
                outcome.append(exc)

        waiting = threading.Thread(target=trainer, daemon=True)
        waiting.start()
        time.sleep(0.5)
        with zmtp_server(folder, f"127.0.0.1:{port}", script, user=SQUATTER_UID):
            waiting.join(20)
        assert outcome and isinstance(outcome[0], AuthenticationError) and refusal in str(outcome[0]), outcome
