"""The ``floods`` probe: the server's memory under each attack of the hardening tests, against its bound.

Each flood runs against a fresh server (the run's data, batch and size, prefetch 8). The memory
of the server and its workers together (their proportional set size: a page they share, such as
a shared-memory arena, counts once) is sampled every 50 ms; the reported figure is the growth
over its level after a well-behaved client has warmed it up, beside the bound the README
documents for that flood. The log lines each flood caused are counted (the README's log-volume
figure: ``curve``, handshakes with random client keys against a --curve-dir server, each refused
and logged at most 60 times a minute). A well-behaved client then takes 8 batches, timed, to show
the server still serves.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import msgpack
import numpy as np
import zmq

from loader_client import LoaderClient, ServerError
from loader_client.contract import protocol
from loader_client.contract.shm import new_arena_key
from loader_server.runtime.guard import HANDSHAKE_BYTES, MAX_HELD_BYTES
from loader_server.runtime.transport import SEND_QUEUE_BATCHES

from . import systems
from .context import Bench
from .systems import CLIENT_TIMEOUT_S

__all__ = ["floods"]

_PREFETCH = 8
_FLOOD_S = 4.0
V = protocol.PROTOCOL_VERSION


def _pss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except OSError:
            continue
    return total / 1024


#: TCP connections of the unfinished-message flood, all from one peer address.
_UNFINISHED_CONNECTIONS = 12
#: Memory ZeroMQ may spend per wire byte held: an empty frame is 2 bytes on the wire and a 64-byte slot.
_MEMORY_PER_WIRE_BYTE = 32
_GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" * 32
_READY = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


#: What one connection may add besides its held bytes: its ZeroMQ buffers and one check's arrivals.
_CONNECTION_SLACK_MB = 2.0


def _connection_mb() -> float:
    """The README's bound of one connection's memory: 32 x the wire bytes it may hold in ZeroMQ, plus slack."""
    return _MEMORY_PER_WIRE_BYTE * (MAX_HELD_BYTES + HANDSHAKE_BYTES) / 2**20 + _CONNECTION_SLACK_MB


def _unfinished(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    """Connections from one address, each a message of empty frames that never ends (paced so that
    ZeroMQ reads every byte: 2 wire bytes, a 64-byte slot each), until the guard closes it."""
    port = int(endpoint.rsplit(":", 1)[1])

    def one() -> None:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.2", 0))
            s.sendall(_GREETING + bytes([0x04, len(_READY)]) + _READY)
            greeting = b""
            while len(greeting) < 64:  # the server's greeting: frames sent before it end the handshake
                more = s.recv(4096)
                if not more:
                    return
                greeting += more
            chunk = b"\x01\x00" * 8192
            for _ in range(640):  # 10 MiB at most
                s.sendall(chunk)
                time.sleep(0.002)
        except OSError:  # closed by the guard
            pass

    for t in [threading.Thread(target=one, daemon=True) for _ in range(_UNFINISHED_CONNECTIONS)]:
        t.start()


def _shm_greedy(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    """One client on shared memory that grants all the credit it can and never releases a slot."""
    _greedy(ctx, endpoint, socks, shm=True)


def _greedy(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]], shm: bool = False) -> None:
    """One client that grants all the credit it can and never reads."""
    s = _raw(ctx, endpoint, socks)
    s.setsockopt(zmq.RCVHWM, 1)
    key = {"shm_key": new_arena_key()} if shm else {}  # an arena only for a hello with its key
    s.send(msgpack.packb({"v": V, "t": "hello", "shm": shm, "credit": 10**6, **key}))
    for _ in range(200):
        s.send(msgpack.packb({"v": V, "t": "credit", "n": 10**6}))


def _five_greedy(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    for _ in range(5):
        _greedy(ctx, endpoint, socks)


def _idle(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    for _ in range(1000):
        _raw(ctx, endpoint, socks)


def _fuzz(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    rng = np.random.default_rng(0)
    values: list[Any] = [None, True, -1, 2**64 - 1, "a\x00", "x" * 300, [2**40], {"a": 1}]
    s = _raw(ctx, endpoint, socks)
    for _ in range(5000):
        t = str(rng.choice(["hello", "credit", "release", "ping", "bye", "health", "stats", "zap"]))
        s.send(msgpack.packb({"v": V, "t": t, "client": "fuzz", str(rng.choice(["rank", "n", "slots", "epoch"])):
                              values[int(rng.integers(len(values)))]}))


def _sessions(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    """More hellos than --max-clients allows, each granting credit and never reading."""
    for _ in range(100):
        _greedy(ctx, endpoint, socks)


#: Peers of the CURVE flood, each a new random key pair; each reconnects when refused (every 100 ms).
_CURVE_PEERS = 64


def _curve_random_keys(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]], *,
                       server_public_key: str) -> None:
    """Peers with random client keys (none in the allow-list) against a --curve-dir server: every
    handshake is refused by the ZAP handler and logged, within the log's budget per kind."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(server_public_key)
    for _ in range(_CURVE_PEERS):
        public, secret = zmq.curve_keypair()
        s = _raw(ctx, endpoint, socks, curve=(server_public, public, secret))
        s.send(msgpack.packb({"v": V, "t": "health"}))  # queued until a handshake succeeds: never


def _raw(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]],
         curve: tuple[bytes, bytes, bytes] | None = None) -> zmq.Socket[Any]:
    s: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve
    s.connect(endpoint)
    socks.append(s)
    return s


_Bound = Callable[[float, int], float]


@dataclass(frozen=True)
class _Flood:
    what: str
    attack: Callable[..., None]
    extra: list[str]  # serve flags
    bound: _Bound  # the README's bound in MB, from (batch MB, workers)
    tcp: bool = False  # over TCP (the guard's floods), else the default ipc bind
    curve: bool = False  # a --curve-dir server (made under the scratch folder); clients use its allowed key


_FLOODS: dict[str, _Flood] = {
    "greedy": _Flood("one client granting credit without reading", _greedy, ["--no-shm"],
                     lambda mb, _: (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "greedy5": _Flood("five such clients", _five_greedy, ["--no-shm"],
                      lambda mb, _: 5 * (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "sessions": _Flood("100 such clients against --max-clients 4", _sessions, ["--no-shm", "--max-clients", "4"],
                       lambda mb, _: 4 * (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "peer": _Flood("100 such clients from one peer (--max-clients-per-peer 16)", _sessions, ["--no-shm"],
                   lambda mb, _: 16 * (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "shm": _Flood("one client on shared memory that never releases a slot", _shm_greedy, [],
                  lambda mb, w: ((_PREFETCH + 8 + 2) + (_PREFETCH + SEND_QUEUE_BATCHES) + 3 * w) * mb),
    "unfinished": _Flood(f"{_UNFINISHED_CONNECTIONS} connections from one address, each a message of empty frames "
                         "that never ends", _unfinished, ["--no-shm"],
                         lambda mb, _: _UNFINISHED_CONNECTIONS * _connection_mb(), tcp=True),
    "idle": _Flood("1,000 idle connections", _idle, ["--no-shm"], lambda mb, _: 0.0),
    "fuzz": _Flood("5,000 fuzzed requests", _fuzz, ["--no-shm"], lambda mb, _: 0.0),
    "curve": _Flood(f"CURVE handshakes with random client keys ({_CURVE_PEERS} peers, each retrying every 100 ms)",
                    _curve_random_keys, ["--no-shm"], lambda mb, _: 0.0, tcp=True, curve=True),
}


def floods(b: Bench, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Every flood of `_FLOODS` (or those in `names`), each against a fresh server."""
    batch_mb = b.batch_size * b.size[0] * b.size[1] * 3 / 2**20
    out: dict[str, Any] = {"batch_mb": batch_mb, "prefetch": _PREFETCH, "floods": {}}
    for name, flood in _FLOODS.items():
        if names is not None and name not in names:
            continue
        flags = ["--prefetch", str(_PREFETCH), "--log-level", "INFO", *flood.extra]
        client: dict[str, Any] = {}
        attack = flood.attack
        if flood.curve:
            curve_dir, client = systems.curve_keys(b.scratch)
            flags += ["--curve-dir", curve_dir]
            attack = partial(attack, server_public_key=client["server_public_key"])
        endpoint = f"tcp://127.0.0.1:{_free_port()}" if flood.tcp else None
        with systems.served(b, b.data, flags, endpoint=endpoint) as server:
            server.wait_ready(CLIENT_TIMEOUT_S, **client)
            with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, **client) as warm:
                for _ in range(3 * _PREFETCH):
                    warm.next()
            time.sleep(0.5)
            pids = [server.pid, *server.workers()]
            base = _pss_mb(pids)
            lines_before = len(server.log_text().splitlines())
            ctx: zmq.Context[Any] = zmq.Context()
            socks: list[zmq.Socket[Any]] = []
            try:
                started_flood = time.monotonic()
                attack(ctx, server.endpoint, socks)
                peak, deadline = base, time.monotonic() + _FLOOD_S
                while time.monotonic() < deadline:
                    peak = max(peak, _pss_mb(pids))
                    time.sleep(0.05)
                log_lines = len(server.log_text().splitlines()) - lines_before
                flood_s = time.monotonic() - started_flood
                started = time.perf_counter()
                try:
                    with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, **client) as legit:
                        for _ in range(8):
                            legit.next()
                    served = f"{time.perf_counter() - started:.2f} s"
                except ServerError as exc:  # the sessions flood: every place is taken, and it says so
                    served = f"refused at once: {str(exc).split(';')[0]}"
            finally:
                for s in socks:
                    s.close(linger=0)
                ctx.term()
        limit = flood.bound(batch_mb, b.workers)
        out["floods"][name] = {"what": flood.what, "growth_mb": peak - base, "bound_mb": limit, "base_mb": base,
                               "legit_8_batches": served, "log_lines": log_lines, "flood_s": flood_s}
        print(f"flood {name} ({flood.what}): server and workers grew {peak - base:.0f} MB (bound {limit:.0f} MB), "
              f"{log_lines} log lines in {flood_s:.1f} s; a client's next 8 batches: {served}", flush=True)
    return {"floods": out}


def flood_tables(results: dict[str, Any]) -> list[str]:
    if "floods" not in results:
        return []
    r = results["floods"]
    lines = ["", f"Server and worker memory under floods (prefetch {r['prefetch']}, batch {r['batch_mb']:.1f} MB):", "",
             "| flood | growth MB | documented bound MB | log lines | a client's next 8 batches |",
             "|---|---|---|---|---|"]
    for f in r["floods"].values():
        bound = f"{f['bound_mb']:.0f}" if f["bound_mb"] else "no batch memory (a descriptor each)"
        lines.append(f"| {f['what']} | {f['growth_mb']:.0f} | {bound} | {f.get('log_lines', '')} | "
                     f"{f['legit_8_batches']} |")
    return lines
