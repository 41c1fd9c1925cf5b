"""CPU per response head parsed by the object reader (`remote._Connection._head`): a SeaweedFS range answer, 11 fields.

    flock /work/bench.lock python docs/bench/s3-cpu/head_cost.py [CHECKOUT ...]

Each CHECKOUT (a folder with loader_server/, default: this one) runs in a process of its own: the best of 5 runs
of 100,000 heads, in us per head.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAD = (b"HTTP/1.1 206 Partial Content\r\nAccept-Ranges: bytes\r\n"
        b"Content-Disposition: inline; filename=\"shard-00003.tar\"\r\nContent-Length: 24576\r\n"
        b"Content-Range: bytes 1048576-1073151/26214400\r\nContent-Type: application/x-tar\r\n"
        b"Etag: \"5d41402abc4b2a76b9719d911017c592\"\r\nLast-Modified: Mon, 07 Dec 2026 16:00:00 GMT\r\n"
        b"Server: SeaweedFS 30GB 3.80\r\nX-Amz-Request-Id: 7f2c1e0a-5b1d-4c8e-9a3f-2d6b8e4f1a7c\r\n"
        b"Date: Mon, 07 Dec 2026 16:40:00 GMT\r\n\r\n")


def measure() -> float:
    import inspect
    import timeit
    import urllib.parse

    from loader_server.data import remote

    conn = remote._Connection(urllib.parse.urlsplit("http://127.0.0.1:1/"), 5)
    conn.rbuf[: len(HEAD)] = HEAD
    # (a checkout from before one header reader: its pipelined path, `lowered`)
    args = (None, 0.0, True) if "lowered" in inspect.signature(conn._head).parameters else (None, 0.0)

    def once() -> None:
        conn.lo, conn.hi = 0, len(HEAD)
        conn._head(*args)

    n = 100_000
    return min(timeit.repeat(once, number=n, repeat=5)) / n * 1e6


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(f"{measure():.2f}")
        sys.exit()
    for checkout in sys.argv[1:] or [str(Path(__file__).resolve().parents[3])]:
        out = subprocess.run([sys.executable, __file__, "--child"], env={"PYTHONPATH": checkout}, check=True,
                             capture_output=True, text=True).stdout.strip()
        print(f"{checkout}: {out} us per head")
