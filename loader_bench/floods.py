"""The ``floods`` probe: the server's memory under each attack of the hardening tests, against its bound.

Each flood runs against a fresh server (the run's data, batch and size, prefetch 8). The server
process's resident memory is sampled every 50 ms; the reported figure is the growth over its
level after a well-behaved client has warmed it up, beside the bound the README documents for
that flood. A well-behaved client then takes 8 batches, timed, to show the server still serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import zmq

from loader_client import LoaderClient, ServerError
from loader_client.contract import protocol
from loader_server.runtime.transport import SEND_QUEUE_BATCHES

from . import systems
from .context import Bench
from .systems import CLIENT_TIMEOUT_S

__all__ = ["floods"]

_PREFETCH = 8
_FLOOD_S = 4.0
V = protocol.PROTOCOL_VERSION


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _greedy(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> None:
    """One client that grants all the credit it can and never reads."""
    s = _raw(ctx, endpoint, socks)
    s.setsockopt(zmq.RCVHWM, 1)
    s.send(msgpack.packb({"v": V, "t": "hello", "shm": False, "credit": 10**6}))
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


def _raw(ctx: zmq.Context[Any], endpoint: str, socks: list[zmq.Socket[Any]]) -> zmq.Socket[Any]:
    s: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    socks.append(s)
    return s


_FLOODS: dict[str, tuple[str, Callable[..., None], list[str], Callable[[float, int], float]]] = {
    # name: (what, attack, extra serve flags, bound in MB from (batch MB, max clients))
    "greedy": ("one client granting credit without reading", _greedy, [],
               lambda mb, _: (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "greedy5": ("five such clients", _five_greedy, [], lambda mb, _: 5 * (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "sessions": ("100 such clients against --max-clients 4", _sessions, ["--max-clients", "4"],
                 lambda mb, n: n * (_PREFETCH + SEND_QUEUE_BATCHES) * mb),
    "idle": ("1,000 idle connections", _idle, [], lambda mb, _: 0.0),
    "fuzz": ("5,000 fuzzed requests", _fuzz, [], lambda mb, _: 0.0),
}


def floods(b: Bench) -> dict[str, Any]:
    batch_mb = b.batch_size * b.size[0] * b.size[1] * 3 / 2**20
    out: dict[str, Any] = {"batch_mb": batch_mb, "prefetch": _PREFETCH, "floods": {}}
    for name, (what, attack, extra, bound) in _FLOODS.items():
        flags = ["--prefetch", str(_PREFETCH), "--no-shm", *extra]
        with systems.served(b, b.data, flags, endpoint=None, ready=True) as server:
            with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, shared_memory=False) as warm:
                for _ in range(3 * _PREFETCH):
                    warm.next()
            time.sleep(0.5)
            base = _rss_mb(server.pid)
            ctx: zmq.Context[Any] = zmq.Context()
            socks: list[zmq.Socket[Any]] = []
            try:
                attack(ctx, server.endpoint, socks)
                peak, deadline = base, time.monotonic() + _FLOOD_S
                while time.monotonic() < deadline:
                    peak = max(peak, _rss_mb(server.pid))
                    time.sleep(0.05)
                started = time.perf_counter()
                try:
                    with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, shared_memory=False) as client:
                        for _ in range(8):
                            client.next()
                    served = f"{time.perf_counter() - started:.2f} s"
                except ServerError as exc:  # the sessions flood: every place is taken, and it says so
                    served = f"refused at once: {str(exc).split(';')[0]}"
            finally:
                for s in socks:
                    s.close(linger=0)
                ctx.term()
        limit = bound(batch_mb, int(extra[1]) if extra else 0)
        out["floods"][name] = {"what": what, "growth_mb": peak - base, "bound_mb": limit, "base_mb": base,
                               "legit_8_batches": served}
        print(f"flood {name} ({what}): server grew {peak - base:.0f} MB (bound {limit:.0f} MB); "
              f"a client's next 8 batches: {served}", flush=True)
    return {"floods": out}


def flood_tables(results: dict[str, Any]) -> list[str]:
    if "floods" not in results:
        return []
    r = results["floods"]
    lines = ["", f"Server memory under floods (prefetch {r['prefetch']}, batch {r['batch_mb']:.1f} MB, frames):", "",
             "| flood | server growth MB | documented bound MB | a client's next 8 batches |", "|---|---|---|---|"]
    for f in r["floods"].values():
        bound = f"{f['bound_mb']:.0f}" if f["bound_mb"] else "no batch memory (a descriptor each)"
        lines.append(f"| {f['what']} | {f['growth_mb']:.0f} | {bound} | {f['legit_8_batches']} |")
    return lines
