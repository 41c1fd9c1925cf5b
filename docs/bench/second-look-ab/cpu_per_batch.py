"""CPU time per batch of the trainer's process and of the server and its workers, and wall images/s.

Run with the tree under test first on PYTHONPATH (ab.sh does). The settings of
`loader-server bench`: the corpus, 224x224 uint8, batches of 64, 2 workers, prefetch 4, ipc
(shared memory on). CPU time is what the code spends: far less sensitive than wall time to a
machine that other jobs keep busy. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

from loader_client import LoaderClient
from loader_server.launch import ServerProcess, children_of

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def main(n: int) -> None:
    data = os.path.join(os.environ.get("CORPUS", "../shared/corpus"), "train.txt")
    server = ServerProcess(data, "--size", "224x224", "--batch-size", "64", "--workers", "2")
    try:
        server.wait_ready(120)
        with LoaderClient(server.endpoint, timeout_s=60, prefetch=4) as client:
            it = iter(client)
            for _ in range(8):  # warm-up
                next(it)
            procs = [server.pid, *children_of(server.pid)]
            before = {p: cpu_s(p) for p in procs}
            cpu0, wall0 = time.process_time(), time.perf_counter()
            touched = 0
            for _ in range(n):
                x = next(it)[0]
                touched += int(x.reshape(-1)[0])
            cpu1, wall1 = time.process_time(), time.perf_counter()
            after = {p: cpu_s(p) for p in procs}
    finally:
        server.stop()
    print(json.dumps({"client_ms": (cpu1 - cpu0) / n * 1000,
                      "server_ms": (after[server.pid] - before[server.pid]) / n * 1000,
                      "workers_ms": sum(after[p] - before[p] for p in procs[1:]) / n * 1000,
                      "images_per_s": n * 64 / (wall1 - wall0), "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
