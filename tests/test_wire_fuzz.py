"""The raw wire, below the message layer: bytes no ZeroMQ client would send, while a trainer is served.

Every connection here is a plain socket speaking (or failing to speak) ZMTP by hand: random
bytes, ZMTP 1.0 and 2.0 greetings, truncated and corrupt ZMTP 3 greetings, a valid handshake
followed by garbage, over TCP, IPv6 and ipc. They used to kill the server (issue 21): a
ZMTP 1.0 peer's request has no connection metadata, and reading its source descriptor raised;
libzmq itself aborted when such a peer's routing id met a closing session; and a peer that
claimed the routing id the ROUTER was about to give another peer made libzmq assert. A real
client consumes batches throughout and after, and checks every one of them.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from loader_client import LoaderClient, health, server_stats
from loader_client.contract import protocol

from .conftest import free_port, unique_label_list

N = 40
ARGS = ("--batch-size", "4", "--size", "16x12", "--workers", "1")
V = protocol.PROTOCOL_VERSION
#: Connections per run of the standing fuzz, over the three transports together (at least 2,000).
CONNECTIONS = {"tcp": 800, "tcp6": 600, "ipc": 600}
_READY = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"


def greeting3(minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, minor]) + mechanism.ljust(20, b"\0") + b"\0" * 32


def payload(kind: str, rng: random.Random) -> list[bytes]:
    """The parts a hostile peer sends, in order (with small pauses between them)."""
    junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
    ident = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 8)))
    if kind == "random":
        return [junk]
    if kind == "zmtp1":  # unversioned: a routing-id frame, then a message (what killed the server)
        return [bytes([len(ident) + 1, 0]) + ident, bytes([6, rng.choice([0, 1])]) + b"hello" + junk[:8]]
    if kind == "zmtp1-versioned":
        return [b"\xff" + b"\0" * 8 + b"\x7f" + b"\x00", bytes([len(ident) + 1, 0]) + ident, bytes([6, 0]) + b"hello"]
    if kind == "zmtp2":
        return [b"\xff" + b"\0" * 8 + b"\x7f" + bytes([1, 5]), bytes([0, len(ident)]) + ident,
                b"\x00\x05hello" * rng.randint(1, 3)]
    if kind == "truncated3":
        return [greeting3()[:rng.randint(1, 63)]]
    if kind == "corrupt3":
        g = bytearray(greeting3())
        for _ in range(rng.randint(1, 4)):
            g[rng.randrange(len(g))] = rng.getrandbits(8)
        return [bytes(g), junk[:rng.randint(0, 40)]]
    if kind == "mechanism":  # a valid greeting with another security mechanism
        return [greeting3(mechanism=rng.choice([b"CURVE", b"PLAIN", b"GSSAPI", b"X"])), junk]
    if kind == "handshake-garbage":  # ZMTP 3 done, then bytes that are no frame at all
        return [greeting3(), bytes([0x04, len(_READY)]) + _READY, junk]
    if kind == "handshake-frames":  # ZMTP 3 done, then frames with random flags and sizes
        frames = b"".join(bytes([rng.choice([0, 1, 2, 3, 4, 0x80])]) + bytes([rng.randint(0, 20)])
                          + bytes(rng.randint(0, 20)) for _ in range(rng.randint(1, 20)))
        return [greeting3(), bytes([0x04, len(_READY)]) + _READY, frames]
    raise AssertionError(kind)


KINDS = ("random", "zmtp1", "zmtp1-versioned", "zmtp2", "truncated3", "corrupt3", "mechanism", "handshake-garbage",
         "handshake-frames")


def connect(transport: str, where: Any) -> socket.socket:
    if transport == "ipc":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(where)
        return s
    family = socket.AF_INET6 if transport == "tcp6" else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(where)
    return s


def hostile(transport: str, where: Any, seed: int) -> str:
    """One connection of a random kind: its parts sent with random pauses, then closed (sometimes by RST)."""
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    try:
        s = connect(transport, where)
    except OSError:
        return "refused"
    try:
        for part in payload(kind, rng):
            s.sendall(part)
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.005)
        if rng.random() < 0.3:  # read what the server answers (its greeting, at most)
            s.settimeout(0.05)
            try:
                s.recv(4096)
            except OSError:
                pass
        if rng.random() < 0.3:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    finally:
        s.close()
    return kind


class Trainer(threading.Thread):
    """A real client taking batches until told to stop; it checks each one and counts them."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.batches = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with LoaderClient(self.endpoint, timeout_s=30, shared_memory=False) as client:
                while not self.stop.is_set():
                    x, y = client.next()
                    assert x.shape == (4, 12, 16, 3)
                    assert client.last is not None
                    np.testing.assert_array_equal(y, client.last.indices)
                    self.batches += 1
        except BaseException as exc:  # handed to the test
            self.error = exc


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", N)


def test_raw_wire_fuzz_never_stops_the_server(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    """At least 2,000 hostile connections over TCP, IPv6 and ipc, 8 at a time; a trainer is served throughout."""
    servers = {
        "tcp": start_server(listfile, *ARGS, endpoint=f"tcp://127.0.0.1:{(p4 := free_port())}"),
        "tcp6": start_server(listfile, *ARGS, endpoint=f"tcp://[::1]:{(p6 := free_port())}"),
        "ipc": start_server(listfile, *ARGS, endpoint=f"ipc://{tmp_path}/fuzz.sock"),
    }
    where = {"tcp": ("127.0.0.1", p4), "tcp6": ("::1", p6), "ipc": f"{tmp_path}/fuzz.sock"}
    seen: dict[str, int] = {}
    for transport, server in servers.items():
        trainer = Trainer(server.endpoint)
        trainer.start()
        with ThreadPoolExecutor(8) as pool:
            kinds = list(pool.map(lambda i, t=transport: hostile(t, where[t], i), range(CONNECTIONS[transport])))
        for kind in kinds:
            seen[kind] = seen.get(kind, 0) + 1
        assert server.proc.poll() is None, f"the {transport} server died under the fuzz"
        during = trainer.batches
        deadline = time.monotonic() + 30
        while trainer.batches < during + 10 and trainer.error is None and time.monotonic() < deadline:
            time.sleep(0.05)  # and it goes on serving after it
        trainer.stop.set()
        trainer.join(30)
        assert trainer.error is None, f"the trainer on {transport} failed: {trainer.error!r}"
        assert trainer.batches >= during + 10, (transport, during, trainer.batches)
        assert health(server.endpoint)["ok"]
        assert server.proc.poll() is None
    assert sum(seen.values()) - seen.get("refused", 0) >= 2000, seen
    assert set(KINDS) <= set(seen), seen


def test_pre_zmtp3_peers_never_reach_the_socket(start_server: Any, listfile: Path) -> None:
    """A ZMTP 1.0 peer's message used to reach the server's loop (and kill it); now the connection is
    closed during the greeting, and nothing it sends is read as a request."""
    port = free_port()
    server = start_server(listfile, *ARGS, endpoint=f"tcp://127.0.0.1:{port}")
    hello = msgpack.packb({"v": V, "t": "stats"})
    for greeting in (bytes([2, 0]) + b"A",  # unversioned ZMTP 1.0: a routing id "A"
                     b"\xff" + b"\0" * 8 + b"\x7f" + b"\x00" + bytes([2, 0]) + b"A",  # versioned 1.0
                     b"\xff" + b"\0" * 8 + b"\x7f" + bytes([1, 5]) + bytes([0, 1]) + b"A"):  # ZMTP 2.0, as a DEALER
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(greeting)
            framed = (bytes([len(hello) + 1, 0]) if greeting[0] != 0xff or greeting[10] == 0
                      else bytes([0, len(hello)]))
            try:
                s.sendall(framed + hello)
                data, deadline = b"", time.monotonic() + 5
                while time.monotonic() < deadline:  # the server's greeting at most, then the end of the stream
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:  # reset: closed as well
                data = b""
            assert b"stats" not in data and b"uptime" not in data
    assert server.proc.poll() is None
    assert "ignored bad message" not in server.log_text()  # nothing of theirs reached the loop
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        client.next()


def test_a_peer_claiming_the_next_routing_ids_does_not_kill_the_server(start_server: Any, listfile: Path) -> None:
    """The ROUTER numbers peers that send no routing id from libc's rand(), never seeded by libzmq
    (0x6b8b4567 first, in every server), and asserts when the number is taken; the server's stats
    also named those numbers. A peer that claimed the next ones and then connected without one
    killed the server (SIGABRT in libzmq)."""
    port = free_port()
    server = start_server(listfile, *ARGS, endpoint=f"tcp://127.0.0.1:{port}")
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.Context()
    socks: list[zmq.Socket[Any]] = []

    def dealer(routing_id: bytes | None = None) -> zmq.Socket[Any]:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            s.setsockopt(zmq.ROUTING_ID, routing_id)
        s.connect(endpoint)
        socks.append(s)
        return s

    try:
        probe = dealer()  # one without a routing id: the server numbers it, and its stats named it
        probe.send(msgpack.packb({"v": V, "t": "hello", "credit": 0, "shm": False}))
        assert probe.poll(10_000)
        names = [c["name"] for c in server_stats(endpoint)["clients"]]
        guesses = {0x6B8B4567 + k for k in range(64)}  # where an unseeded counter starts
        guesses |= {int(n, 16) + k for n in names if len(n) == 10 and n.startswith("00") for k in range(1, 33)}
        for number in sorted(guesses):
            claimer = dealer(b"\x00" + struct.pack(">I", number & 0xFFFFFFFF))
            claimer.send(msgpack.packb({"v": V, "t": "health"}))
        for s in socks[1:]:  # a claim of a number in use is ignored by the ROUTER: no answer then
            if s.poll(2000):
                s.recv()
        for _ in range(64):  # peers the ROUTER numbers itself, one after the other
            s = dealer()
            s.send(msgpack.packb({"v": V, "t": "health"}))
            assert s.poll(10_000) or server.proc.poll() is None
        time.sleep(0.5)
        assert server.proc.poll() is None, server.log_text()[-2000:]
        assert not any(len(n) == 10 and n.startswith("00") for n in names), names  # no routing id is shown
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    with LoaderClient(endpoint, timeout_s=20) as client:
        client.next()


_FIRST_ROUTING_ID = """
import sys
import zmq
from loader_server.runtime.transport import ClientTransport
ctx = zmq.Context()
transport = ClientTransport(ctx, sys.argv[1], curve_dir=None, insecure=False)
dealer = ctx.socket(zmq.DEALER)  # no routing id of its own: the ROUTER numbers it
dealer.setsockopt(zmq.LINGER, 0)
dealer.connect(sys.argv[1])
dealer.send(b"x")
assert transport.sock.poll(10_000), "the request did not arrive"
request = transport.recv()
assert request is not None
print(request.identity.hex())
dealer.close()
transport.close()
ctx.term()
"""


def test_the_routing_id_counter_is_seeded_per_server(tmp_path: Path) -> None:
    """Two servers' client sockets (`ClientTransport`, each in a fresh process, as `serve` makes it)
    number their first id-less peer differently, and neither starts at libc's unseeded value. Read
    inside each process: neither the server's log nor anything it sends names a routing id."""
    firsts = []
    for k in range(2):
        done = subprocess.run([sys.executable, "-c", _FIRST_ROUTING_ID, f"ipc://{tmp_path}/first{k}.sock"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        firsts.append(done.stdout.strip())
    assert all(len(f) == 10 and f.startswith("00") for f in firsts), firsts  # \0 and the 32-bit counter
    assert firsts[0] != firsts[1] and "006b8b4567" not in firsts, firsts


def test_the_log_names_clients_by_a_tag_never_by_their_routing_id(start_server: Any, listfile: Path) -> None:
    """A reader of the server's log must not learn routing ids (nor so the ROUTER's counter, which a peer
    could use to claim the next id: libzmq asserts). Each client is named by a keyed hash instead, the
    same in every line about it (and in the protocol errors it is sent, to find those lines)."""
    server = start_server(listfile, *ARGS)
    ctx = zmq.Context()
    chosen = b"c" + os.urandom(15)  # as our own client names itself
    socks: dict[str, zmq.Socket[Any]] = {}
    replies: dict[str, list[str]] = {"chosen": [], "numbered": []}
    try:
        for name, routing_id in (("chosen", chosen), ("numbered", None)):
            s = socks[name] = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            if routing_id is not None:
                s.setsockopt(zmq.ROUTING_ID, routing_id)
            s.connect(server.endpoint)
            for request in ({"v": V, "t": "hello", "rank": 5, "world_size": 1},  # refused: rank outside
                            {"v": V, "t": "hello", "rank": 5, "world_size": 1},
                            {"v": V, "t": "hello", "bogus": 1}):  # a bad message: a protocol error
                s.send(msgpack.packb(request))
                assert s.poll(20_000), server.log_text()[-2000:]
                reply = msgpack.unpackb(s.recv())
                assert reply["t"] == "error", reply
                replies[name].append(reply["message"])
    finally:
        for s in socks.values():
            s.close(linger=0)
        ctx.term()
    log = server.log_text()
    tags = {}
    for name in ("chosen", "numbered"):  # the protocol error tells its client its tag
        told = re.findall(r"from client (c-[0-9a-f]{12})\b", replies[name][2])
        assert len(told) == 1, replies[name]
        tags[name] = told[0]
    assert tags["chosen"] != tags["numbered"]
    refused = re.findall(r"refused client (c-[0-9a-f]{12}): ", log)
    ignored = re.findall(r"ignored bad message from client (c-[0-9a-f]{12}): ", log)
    assert sorted(refused) == sorted([tags["chosen"]] * 2 + [tags["numbered"]] * 2), log  # one tag per client
    assert sorted(ignored) == sorted(tags.values()), log
    for name, tag in tags.items():  # the bad message's line names its client once: before the error, not inside
        line = next(x for x in log.splitlines() if f"ignored bad message from client {tag}: " in x)
        assert line.count(tag) == 1, line
        assert line.endswith(f"from client {tag}: field 'bogus' is not allowed in a 'hello' message"), line
        assert replies[name][2] == f"field 'bogus' is not allowed in a 'hello' message from client {tag}", replies
        assert "\x00" not in log and "\\x00" not in log, log
    for text in (log, *replies["chosen"], *replies["numbered"]):
        assert chosen.hex() not in text.lower() and chosen[1:].hex() not in text.lower()
        # \0 and libzmq's 32-bit counter: the id the ROUTER gave the second socket, in any case
        assert not re.search(r"(?<![0-9a-f])00[0-9a-f]{8}(?![0-9a-f])", text.lower()), text


def test_stress_rss_is_bounded_after_the_fuzz(start_server: Any, listfile: Path) -> None:
    """300 hostile connections leave no lasting memory behind (each costs a descriptor, only while open)."""
    port = free_port()
    server = start_server(listfile, *ARGS, endpoint=f"tcp://127.0.0.1:{port}")
    with LoaderClient(server.endpoint, timeout_s=20) as warm:
        for _ in range(10):
            warm.next()

    def rss_mb() -> float:
        with open(f"/proc/{server.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    before = rss_mb()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: hostile("tcp", ("127.0.0.1", port), 10_000 + i), range(300)))
    time.sleep(1.0)
    assert rss_mb() - before < 30, (before, rss_mb())
    assert server.proc.poll() is None
