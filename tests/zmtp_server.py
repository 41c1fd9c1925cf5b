"""A hand-written malicious loader server: ZMTP 3.0 spoken by hand over a plain socket, standard library only.

libzmq never sends the frames of a message before its last one, so a ZeroMQ peer cannot send a
message that never ends; this one can. It needs nothing but Python 3, so it also runs as another
user (through ``setpriv``) with any Python, even one that cannot read this repository's packages.

    python3 tests/zmtp_server.py ADDRESS SCRIPT REPORT

ADDRESS is a unix socket path (``/...``) or ``HOST:PORT``. SCRIPT is a JSON file:
``{"welcome": HEX, "batches": [[HEX, ...], ...], "flood_bytes": N, "flood_rate": B, "hold_s": S}``:
to the first message of each connection (the hello) it answers the welcome frame, then each
batch (its frames), then, with `flood_bytes`, frames of 64 KiB all flagged MORE (a message that
never ends), at most `flood_rate` bytes a second if given, until that many are sent or the peer
closes; then it keeps the connection open for `hold_s`,
reading what comes. REPORT is a JSON file it rewrites after each connection: how many
connections came, the bytes each sent, and the flood bytes sent.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from typing import Any

_FLOOD_FRAME = 64 * 1024


def _greeting() -> bytes:
    return b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31


def _command(body: bytes) -> bytes:
    return bytes([0x04, len(body)]) + body


def _frame(data: bytes, more: bool = False) -> bytes:
    flags = 0x01 if more else 0
    if len(data) > 255:
        return bytes([flags | 0x02]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data


class _Reader:
    def __init__(self, conn: socket.socket, counted: list[int]) -> None:
        self.conn, self.counted, self.buffer = conn, counted, b""

    def take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError
            self.counted[0] += len(chunk)
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def message(self) -> list[bytes]:
        """The next message's frames (commands skipped)."""
        frames = []
        while True:
            flags = self.take(1)[0]
            size = struct.unpack(">Q", self.take(8))[0] if flags & 0x02 else self.take(1)[0]
            body = self.take(size)
            if flags & 0x04:
                continue
            frames.append(body)
            if not flags & 0x01:
                return frames


def serve(conn: socket.socket, script: dict[str, Any], record: dict[str, Any]) -> None:
    counted = [0]
    record["received"].append(counted)
    reader = _Reader(conn, counted)
    try:
        conn.sendall(_greeting())
        reader.take(64)
        socket_type = b"\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER"
        conn.sendall(_command(b"\x05READY" + socket_type))
        reader.message()  # the hello
        conn.sendall(_frame(bytes.fromhex(script["welcome"])))
        for frames in script.get("batches", []):
            data = [bytes.fromhex(f) for f in frames]
            conn.sendall(b"".join(_frame(f, more=i < len(data) - 1) for i, f in enumerate(data)))
        flood, rate = script.get("flood_bytes", 0), script.get("flood_rate", 0)
        chunk = _frame(b"\0" * _FLOOD_FRAME, more=True)
        started = time.monotonic()
        while record["flood_sent"] < flood:
            conn.sendall(chunk)
            record["flood_sent"] += _FLOOD_FRAME
            ahead = record["flood_sent"] / rate - (time.monotonic() - started) if rate else 0.0
            if ahead > 0.002:
                time.sleep(ahead)
        conn.settimeout(0.2)
        deadline = time.monotonic() + script.get("hold_s", 0)
        while time.monotonic() < deadline:
            try:
                if not conn.recv(65536):
                    break
            except TimeoutError:
                continue
    except (EOFError, OSError):
        pass  # the peer left (the client's probe of an ipc socket connects and leaves at once)
    finally:
        conn.close()


def main(address: str, script_path: str, report: str) -> None:
    with open(script_path) as f:
        script = json.load(f)
    if address.startswith("/"):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
    else:
        host, _, port = address.rpartition(":")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
    listener.listen(16)
    record: dict[str, Any] = {"received": [], "flood_sent": 0, "uid": os.getuid()}
    lock = threading.Lock()

    def write_report() -> None:
        with lock:
            tmp = report + ".tmp"
            with open(tmp, "w") as out:
                json.dump({"connections": len(record["received"]), "received": [c[0] for c in record["received"]],
                           "flood_sent": record["flood_sent"], "uid": record["uid"]}, out)
            os.replace(tmp, report)

    write_report()  # the listener is up
    while True:
        conn, _ = listener.accept()
        thread = threading.Thread(target=lambda c=conn: (serve(c, script, record), write_report()), daemon=True)
        thread.start()
        time.sleep(0.05)
        write_report()


if __name__ == "__main__":
    main(*sys.argv[1:4])
