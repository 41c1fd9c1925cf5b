"""Bounded soak and memory tests (marked slow; .ci/run runs them): minutes, not hours."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient

from .conftest import alive, unique_label_list, wait_until

pytestmark = pytest.mark.slow


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def private_kb(pid: int) -> int:
    """Memory a process does not share (copy-on-write growth shows up here)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))


def test_soak_with_worker_kills_and_reconnects(start_server: Any, tmp_path: Path) -> None:
    n, batch, epochs = 240, 8, 10
    listfile = unique_label_list(tmp_path / "data", n)
    server = start_server(listfile, "--batch-size", str(batch), "--size", "24x16", "--workers", "2",
                          "--seed", "1")
    steps = n // batch
    state = None
    rss: list[int] = []
    kills = 0
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + 240
    for epoch in range(epochs):
        seen: list[int] = []
        # A new client (a reconnect) every epoch, resuming from the last one's state.
        with LoaderClient(server.endpoint, timeout_s=30, state=state) as client:
            assert client.position == (epoch, 0)
            kill_at = set(rng.choice(np.arange(2, steps - 2), size=2, replace=False).tolist())
            for b in range(steps):
                x, y = client.next()
                assert client.last is not None and client.last.epoch == epoch and client.last.batch == b
                np.testing.assert_array_equal(y, client.last.indices)
                seen.extend(y.tolist())
                if b in kill_at:
                    workers = server.workers()
                    if workers:
                        victim = workers[int(rng.integers(len(workers)))]
                        os.kill(victim, signal.SIGKILL)
                        kills += 1
                        wait_until(lambda victim=victim: not alive(victim), 10, "the killed worker to die")
            state = client.state_dict()
        assert sorted(seen) == list(range(n)), f"epoch {epoch} was not exactly once"
        wait_until(lambda: len(server.workers()) == 2, 20, "replacement workers")
        rss.append(rss_kb(server.proc.pid))
        assert time.monotonic() < deadline, "soak ran too long"
    assert kills == 2 * epochs
    wait_until(lambda: server.log_text().count("died with exit code -9") == kills, 10, "every kill to be logged")
    warm = rss[1]  # after warm-up
    assert max(rss[2:]) <= warm * 1.10, f"server RSS grew from {warm} kB to {max(rss[2:])} kB"


def test_memory_stays_flat_with_a_million_entry_index(start_server: Any, tmp_path: Path) -> None:
    base = unique_label_list(tmp_path / "data", 50)
    lines = base.read_text().splitlines()
    big = tmp_path / "data" / "million.txt"
    with open(big, "w") as f:
        for i in range(1_000_000):
            f.write(f"{lines[i % 50].split()[0]} {i % 50}\n")
    server = start_server(big, "--batch-size", "64", "--size", "16x12", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=60) as client:
        it = iter(client)
        for _ in range(30):
            next(it)
        workers = server.workers()
        assert len(workers) == 2
        before = {pid: private_kb(pid) for pid in workers}
        server_before = private_kb(server.proc.pid)
        for _ in range(400):  # 25,600 samples drawn from all over the shuffled index
            next(it)
        after = {pid: private_kb(pid) for pid in workers}
        server_after = private_kb(server.proc.pid)
    for pid in workers:  # no copy-on-access growth: the index is a few numpy arrays, read only
        assert after[pid] - before[pid] < 8 * 1024, (before, after)
    assert server_after - server_before < 16 * 1024
