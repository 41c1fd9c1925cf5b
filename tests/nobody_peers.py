"""Raw ZMTP 3 peers run as another local user (65534, nobody), from the loopback addresses it chooses.

The script uses the standard library only (user 65534 cannot import from root's site-packages): it
does the NULL handshake of a DEALER by hand, optionally sends one request on some connections and
reads one reply each, then holds every connection until its stdin closes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from loader_client.contract import protocol

NOBODY = 65534

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root, to run peers as user 65534 (nobody)")

_SCRIPT = r"""
import json, socket, struct, sys
port, count, sources, body, talkers = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(","), \
    bytes.fromhex(sys.argv[4]), int(sys.argv[5])
greeting = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" * 32
ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"

def more(s):
    chunk = s.recv(65536)
    if not chunk:
        raise ConnectionError("closed by the server")
    return chunk

def handshake(s):
    s.sendall(greeting + bytes([0x04, len(ready)]) + ready)
    buf = b""
    while len(buf) < 64:  # the server's greeting, before any message (as a ZeroMQ peer does)
        buf += more(s)
    return buf[64:]

def reply(s, buf):
    while True:
        while len(buf) < 2 or (buf[0] & 2 and len(buf) < 9):
            buf += more(s)
        flags = buf[0]
        size, head = (struct.unpack(">Q", buf[1:9])[0], 9) if flags & 2 else (buf[1], 2)
        while len(buf) < head + size:
            buf += more(s)
        frame, buf = buf[head:head + size], buf[head + size:]
        if not flags & 4:
            return frame

held, answers = [], []
for i in range(count):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(sources[i % len(sources)], 0))
        pending = handshake(s)
        held.append(s)
        if i < talkers:
            s.sendall(bytes([0, len(body)]) + body)
            answers.append(reply(s, pending).hex())
    except OSError as exc:
        if i < talkers:
            answers.append("closed: " + str(exc))
print(json.dumps({"held": len(held), "answers": answers}), flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def nobody_python() -> str:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (f"/usr/bin/{version}", "/usr/bin/python3", sys.executable):
        if os.path.exists(exe) and subprocess.run([exe, "-c", "pass"], user=NOBODY, capture_output=True,
                                                  timeout=30).returncode == 0:
            return exe
    pytest.skip("no Python that user 65534 can run")


@contextmanager
def nobody_peers(port: int, count: int, sources: Sequence[str] = ("127.0.0.1",), *, request: bytes = b"",
                 talkers: int = 0) -> Iterator[dict[str, Any]]:
    """`count` connections of user 65534 to 127.0.0.1:`port`, from `sources` in turn; the first `talkers`
    each send `request` (one frame, under 256 bytes) and read one reply. Yields {"held": how many it
    holds, "answers": the replies decoded, or "closed: ..."}; the connections stay open until the end."""
    assert len(request) < 256
    flood = subprocess.Popen([nobody_python(), "-c", _SCRIPT, str(port), str(count), ",".join(sources),
                              request.hex(), str(talkers)], user=NOBODY, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert flood.stdout is not None
        line = flood.stdout.readline()
        assert line, "user 65534's peers did not report"
        report = json.loads(line)
        report["answers"] = [a if a.startswith("closed") else protocol.unpack(bytes.fromhex(a))
                             for a in report["answers"]]
        yield report
    finally:
        flood.kill()
        flood.communicate(timeout=30)
