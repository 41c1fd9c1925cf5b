"""Liveness under slowness: heartbeats and timeouts when batches are slower than the timeouts.

A batch is made slow with a user transform that sleeps (tests/user_code_samples.py:slow), so it
takes longer than the client's `timeout_s`, the server's `--client-timeout-s` and many
heartbeats, however fast the machine. Nothing may time out: the server's heartbeats keep the
client's silence under its timeout while a batch is built, the client's pings keep the server's
view of it alive while the trainer is slow, and a worker busy on a slow batch is not hung
before `--batch-timeout-s`. The other side of each bound (a server really silent, a worker
really hung) is in test_end_to_end.py, test_hosts.py and test_reliability.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, server_stats

from .conftest import unique_label_list

CLIENT_TIMEOUT_S = 1.0
SLOW_S = 0.3  # per image: a batch of 4 takes at least 1.2 s, above CLIENT_TIMEOUT_S
SLOW = ("--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle", "--keep-last",
        "--transform", "tests.user_code_samples:slow", "--client-timeout-s", str(CLIENT_TIMEOUT_S),
        "--batch-timeout-s", "5")  # a batch of 1.2 s is six heartbeats of 0.2 s, and work, not a hang


@pytest.fixture
def slow_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLOW_TRANSFORM_S", str(SLOW_S))  # the server's workers inherit it
    return unique_label_list(tmp_path / "data", 8, size=(16, 12))


def _no_drop_no_hang(server: Any) -> None:
    log = server.log_text()
    assert "silent for" not in log, "the server dropped a live client as silent"
    assert "made no progress" not in log, "a worker busy on a slow batch was taken for hung"
    assert server_stats(server.endpoint)["worker_restarts"] == {}


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared memory", "frames"])
def test_a_batch_slower_than_the_client_timeout_arrives(start_server: Any, slow_data: Path,
                                                        shared_memory: bool) -> None:
    """Workers slower than the heartbeat and a client whose timeout is shorter than a batch: the
    server's heartbeats while the batch is built keep the stream alive; the worker is not hung."""
    server = start_server(slow_data, *SLOW)  # heartbeats every 0.2 s (the fixture's --heartbeat-s)
    with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, prefetch=1, shared_memory=shared_memory) as client:
        started = time.monotonic()
        _, y0 = client.next()
        waited = time.monotonic() - started
        _, y1 = client.next()
    assert waited > CLIENT_TIMEOUT_S  # the slowness under test really happened (at least 4 x 0.3 s)
    assert np.concatenate([y0, y1]).tolist() == list(range(8))
    _no_drop_no_hang(server)


def test_a_trainer_slower_than_the_server_client_timeout_keeps_its_session(start_server: Any, tmp_path: Path) -> None:
    """The trainer holds each batch longer than --client-timeout-s: the client's pings keep it alive, and
    the server's heartbeats keep the client from timing out while it has no credit to send against."""
    data = unique_label_list(tmp_path / "data", 12, size=(16, 12))
    server = start_server(data, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle",
                          "--client-timeout-s", str(CLIENT_TIMEOUT_S))
    with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, prefetch=1) as client:
        got = []
        for _ in range(2):
            got.extend(client.next()[1].tolist())
            time.sleep(1.5 * CLIENT_TIMEOUT_S)  # a slow training step
    assert got == list(range(8))
    assert "silent for" not in server.log_text()


def test_two_servers_with_slow_batches_are_not_lost(start_server: Any, slow_data: Path) -> None:
    """Failover starts on silence: slow batches with heartbeats are no reason to take a server's share."""
    endpoints = [start_server(slow_data, *SLOW, transport="tcp").endpoint for _ in range(2)]
    with LoaderClient(endpoints, timeout_s=CLIENT_TIMEOUT_S, prefetch=1) as client:
        labels = [v for _, y in client.epoch() for v in y.tolist()]
        assert client.lost == [] and sorted(client.active_endpoints) == sorted(endpoints)
    assert sorted(labels) == list(range(8))
