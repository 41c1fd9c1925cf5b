"""Liveness under slowness: heartbeats and timeouts when batches are slow.

A batch is made slow with a user transform that sleeps (tests/user_code_samples.py:slow), so it
takes longer than many heartbeats, however fast the machine. The server's heartbeats keep the
client's silence under its timeout while a batch is built, the client's pings keep the server's
view of it alive while the trainer is slow, and a worker busy on a slow batch is not hung
before `--batch-timeout-s`. A batch slower than the client's `timeout_s` while the trainer waits
is the client's own progress deadline (README, "The client trusts nothing a server says"): it
says the server still answers but delivers no batch, which it can tell only because heartbeats
came during the build (without them it would be "silent"). The other side of each bound (a
server really silent, a worker really hung) is in test_end_to_end.py, test_hosts.py,
test_reliability.py and test_server_lies.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, LoaderTimeoutError, server_stats

from .conftest import unique_label_list

CLIENT_TIMEOUT_S = 1.0
SLOW_S = 0.3  # per image: a batch of 4 takes at least 1.2 s, above CLIENT_TIMEOUT_S
SLOWISH_S = 0.15  # per image: a batch of 4 takes at least 0.6 s: three heartbeats, under CLIENT_TIMEOUT_S
SLOW = ("--batch-size", "4", "--size", "8x8", "--workers", "1", "--no-shuffle", "--keep-last",
        "--transform", "tests.user_code_samples:slow", "--client-timeout-s", str(CLIENT_TIMEOUT_S),
        "--batch-timeout-s", "5")  # a batch of 1.2 s is six heartbeats of 0.2 s, and work, not a hang


@pytest.fixture
def slow_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLOW_TRANSFORM_S", str(SLOW_S))  # the server's workers inherit it
    return unique_label_list(tmp_path / "data", 8, size=(16, 12))


@pytest.fixture
def slowish_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLOW_TRANSFORM_S", str(SLOWISH_S))
    return unique_label_list(tmp_path / "data", 8, size=(16, 12))


def _no_drop_no_hang(server: Any) -> None:
    log = server.log_text()
    assert "silent for" not in log, "the server dropped a live client as silent"
    assert "made no progress" not in log, "a worker busy on a slow batch was taken for hung"
    assert server_stats(server.endpoint)["worker_restarts"] == {}


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared memory", "frames"])
def test_a_batch_slower_than_the_heartbeat_arrives(start_server: Any, slowish_data: Path,
                                                   shared_memory: bool) -> None:
    """Workers slower than the heartbeat (a batch of 0.6 s, heartbeats every 0.2 s): the stream goes on,
    the worker is not hung."""
    server = start_server(slowish_data, *SLOW)  # heartbeats every 0.2 s (the fixture's --heartbeat-s)
    with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, prefetch=1, shared_memory=shared_memory) as client:
        started = time.monotonic()
        _, y0 = client.next()
        waited = time.monotonic() - started
        _, y1 = client.next()
    assert waited > 3 * 0.2  # the slowness under test really happened (at least 4 x 0.15 s)
    assert np.concatenate([y0, y1]).tolist() == list(range(8))
    _no_drop_no_hang(server)


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared memory", "frames"])
def test_a_batch_slower_than_the_client_timeout_is_slow_not_silent(start_server: Any, slow_data: Path,
                                                                   shared_memory: bool) -> None:
    """A batch of 1.2 s against a client timeout of 1 s while the trainer waits: the client's progress
    deadline ends the stream, naming a server that answers (its heartbeats came during the build) but
    delivers nothing: never "silent", which is what a server that stops its heartbeats while it builds
    would be. The server itself drops nobody as silent and takes no worker for hung."""
    server = start_server(slow_data, *SLOW)
    with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, prefetch=1, shared_memory=shared_memory) as client:
        with pytest.raises(LoaderTimeoutError) as caught:
            client.next()
    message = str(caught.value)
    assert "has delivered no batch for 1 s while the trainer waited for one, though it still answers" in message, \
        message
    assert "silent" not in message
    time.sleep(0.5)  # the worker finishes its batch: still no hang
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


def test_two_servers_with_slow_batches_are_not_lost(start_server: Any, slowish_data: Path) -> None:
    """Failover starts on silence or on no progress for timeout_s: batches slower than the heartbeat, but
    within the timeout, are no reason to take a server's share."""
    endpoints = [start_server(slowish_data, *SLOW, transport="tcp").endpoint for _ in range(2)]
    with LoaderClient(endpoints, timeout_s=CLIENT_TIMEOUT_S, prefetch=1) as client:
        labels = [v for _, y in client.epoch() for v in y.tolist()]
        assert client.lost == [] and sorted(client.active_endpoints) == sorted(endpoints)
    assert sorted(labels) == list(range(8))
