"""A delaying TCP proxy: network latency between the loader server and an object store, in the network path.

The kernel's netem qdisc is not available on the benchmark machines, and latency added in our
own code would measure our code, not the network. This proxy is a separate process that
accepts TCP connections, connects each to the store, and forwards the bytes both ways, each
chunk released `delay_ms / 2` after it arrived (in order, per direction, without limiting the
bandwidth), as a link of that latency does: every request's round trip gains `delay_ms`, and
a new connection waits `delay_ms` more for its handshake. Pipelined requests on one connection
and requests on many connections overlap as they would on a real link.

    python -m loader_bench.latency_proxy --target 127.0.0.1:8333 --delay-ms 20 [--listen 127.0.0.1:0]

prints ``listening 127.0.0.1:PORT`` once it accepts connections, and on SIGTERM or SIGINT
prints what it carried (``carried {json}``: connections, requests and requests per second,
bytes each way, and the bytes on the link, sampled every 5 ms) and exits. `start_proxy` runs it as a child process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["Proxy", "main", "start_proxy"]

_CHUNK = 256 << 10


_REQUEST_LINE_END = b" HTTP/1.1\r\n"


class _Stats:
    connections = 0
    requests = 0  # HTTP request lines sent up (a chunk of pipelined requests holds several)
    first = last = 0.0  # monotonic times of the first and last request
    bytes_up = 0
    bytes_down = 0
    queued = 0  # bytes on the simulated link now, both ways
    samples = 0
    queued_sum = 0
    queued_max = 0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float, up: bool) -> None:
    """Forward `reader` to `writer`, each chunk written `delay_s` after it was read, in order."""
    queue: deque[tuple[float, bytes]] = deque()
    arrived = asyncio.Event()
    done = False

    async def read() -> None:
        nonlocal done
        try:
            while chunk := await reader.read(_CHUNK):
                now = time.monotonic()
                queue.append((now + delay_s, chunk))
                _Stats.queued += len(chunk)
                if up:
                    _Stats.bytes_up += len(chunk)
                    lines = chunk.count(_REQUEST_LINE_END)  # (a request line cut in two: counted where it ends)
                    if lines:
                        _Stats.requests += lines
                        _Stats.first = _Stats.first or now
                        _Stats.last = now
                else:
                    _Stats.bytes_down += len(chunk)
                arrived.set()
        except (ConnectionError, OSError):
            pass
        finally:
            done = True
            arrived.set()

    reading = asyncio.create_task(read())
    try:
        while True:
            if not queue:
                if done:
                    break
                arrived.clear()
                await arrived.wait()
                continue
            due, chunk = queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.popleft()
            _Stats.queued -= len(chunk)
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        reading.cancel()
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        _Stats.connections += 1
        try:
            await asyncio.sleep(delay_s)  # the handshake's round trip
            store_r, store_w = await asyncio.open_connection(*target, limit=_CHUNK)
        except (OSError, asyncio.CancelledError):
            client_w.close()
            return
        with contextlib.suppress(asyncio.CancelledError):  # cancelled when the proxy stops
            await asyncio.gather(_pump(client_r, store_w, delay_s / 2, True),
                                 _pump(store_r, client_w, delay_s / 2, False))

    async def sample() -> None:
        while True:
            await asyncio.sleep(0.005)
            if _Stats.requests:
                _Stats.samples += 1
                _Stats.queued_sum += _Stats.queued
                _Stats.queued_max = max(_Stats.queued_max, _Stats.queued)

    sampler = asyncio.create_task(sample())
    server = await asyncio.start_server(handle, *listen, limit=_CHUNK, backlog=1024)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    sampler.cancel()
    span = max(_Stats.last - _Stats.first, 1e-9)
    print("carried " + json.dumps({
        "connections": _Stats.connections, "requests": _Stats.requests, "bytes_up": _Stats.bytes_up,
        "bytes_down": _Stats.bytes_down, "requests_per_s": round(_Stats.requests / span, 1) if _Stats.requests > 1
        else 0.0, "link_bytes_mean": _Stats.queued_sum // max(_Stats.samples, 1),
        "link_bytes_max": _Stats.queued_max}), flush=True)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loader_bench.latency_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT of the store")
    p.add_argument("--delay-ms", type=float, required=True, help="latency added to every round trip")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on (port 0: any free port)")
    args = p.parse_args(argv)
    asyncio.run(_serve(_address(args.listen), _address(args.target), args.delay_ms / 1000))
    return 0


@dataclass
class Proxy:
    """A running proxy process: `endpoint` is ``http://HOST:PORT``."""

    proc: subprocess.Popen[str]
    host: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> dict[str, float]:
        """Stop it; what it carried: connections, requests (and per second from the first to the last),
        bytes each way, and the bytes on the simulated link (sampled every 5 ms: mean and max)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        line = next((ln for ln in (out or "").splitlines() if ln.startswith("carried ")), "carried {}")
        return dict(json.loads(line.removeprefix("carried ")))


def start_proxy(target: tuple[str, int], delay_ms: float, timeout_s: float = 30) -> Proxy:
    """Start the proxy in its own process in front of `target`; returns once it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", "loader_bench.latency_proxy", "--target", f"{target[0]}:{target[1]}",
                             "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening "):
            host, port = _address(line.split()[1])
            return Proxy(proc, host, port)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"the latency proxy did not start within {timeout_s:.0f} s: {line!r}")


if __name__ == "__main__":
    raise SystemExit(main())
