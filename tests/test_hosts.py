"""Several loader hosts as real processes on loopback aliases: exactly once across a server's
death (SIGKILL) or freeze (SIGSTOP), the next epoch on the survivors, a restarted server back at
the next epoch boundary, an error naming every endpoint when all are gone, resume before, during
and after a loss, and the balanced merge."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loader_client import ConfigError, LoaderClient, LoaderError
from loader_client.hosts import HostsStream

from .conftest import free_port, unique_label_list, wait_until

N = 120  # 3 shares of 40 samples: 10 batches of 4 per share, 30 merged batches per epoch
ARGS = ("--batch-size", "4", "--size", "16x12", "--workers", "1", "--seed", "5")
TIMEOUT_S = 2.0
#: A loss is found after `timeout_s` of silence; a busy shared machine gets a generous margin.
RECOVERY_LIMIT_S = 2 * TIMEOUT_S + 4.0


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", N)


def start(start_server: Any, listfile: Path, count: int, *extra: str) -> list[Any]:
    return [start_server(listfile, *ARGS, *extra, endpoint=f"tcp://127.0.0.{2 + i}:{free_port()}")
            for i in range(count)]


def labels(client: LoaderClient, n: int) -> list[list[int]]:
    return [client.next()[1].tolist() for _ in range(n)]


def flat(batches: list[list[int]]) -> list[int]:
    return [v for b in batches for v in b]


def reference(endpoints: list[str], epochs: int) -> list[list[list[int]]]:
    with LoaderClient(endpoints, timeout_s=20) as client:
        return [labels(client, client.steps_per_epoch) for _ in range(epochs)]


def kill(server: Any) -> None:
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)


@contextlib.contextmanager
def frozen(server: Any) -> Iterator[None]:
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_three_servers_one_killed_epoch_exact_next_on_two_restarted_back_to_three(
        start_server: Any, listfile: Path) -> None:
    servers = start(start_server, listfile, 3)
    endpoints = [s.endpoint for s in servers]
    ref = reference(endpoints, 3)
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S) as client:
        assert isinstance(client.stream, HostsStream) and client.steps_per_epoch == 30
        epoch0 = labels(client, 10)
        kill(servers[1])
        started = time.monotonic()
        epoch0 += labels(client, 3)  # merged batch 10 is share 1's: it comes from a survivor
        recovery = time.monotonic() - started
        epoch0 += labels(client, 17)
        assert client.position == (1, 0)
        # Every sample once, in exactly the order of a run without the loss.
        assert epoch0 == ref[0] and len(set(flat(epoch0))) == N
        assert recovery < RECOVERY_LIMIT_S, f"failover took {recovery:.1f} s"
        assert [loss["endpoint"] for loss in client.lost] == [endpoints[1]]
        epoch1 = labels(client, 15)
        assert client.active_endpoints == [endpoints[0], endpoints[2]]  # the next epoch runs on two
        before = client.delivered_by[endpoints[1]]
        assert before <= 10  # only what it built before it died
        # The killed pod comes back on the same address mid-epoch, and rejoins at the next boundary.
        servers[1] = start_server(listfile, *ARGS, endpoint=endpoints[1])
        wait_until(lambda: endpoints[1] in client.ready_to_rejoin, 30, "the client to see the restarted server")
        epoch1 += labels(client, 15)
        assert epoch1 == ref[1] and client.delivered_by[endpoints[1]] == before
        epoch2 = labels(client, 30)
        assert epoch2 == ref[2] and client.active_endpoints == endpoints
        assert client.delivered_by[endpoints[1]] - before == 10  # its own share again


def test_every_server_lost_raises_within_the_timeout_naming_them(start_server: Any, listfile: Path) -> None:
    servers = start(start_server, listfile, 2)
    endpoints = [s.endpoint for s in servers]
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S) as client:
        labels(client, 3)
        for s in servers:
            kill(s)
        started = time.monotonic()
        with pytest.raises(LoaderError) as caught:
            labels(client, 30)
        elapsed = time.monotonic() - started
    assert all(ep in str(caught.value) for ep in endpoints), caught.value
    assert elapsed < RECOVERY_LIMIT_S, f"the error took {elapsed:.1f} s"


def test_frozen_server_fails_over_after_the_timeout(start_server: Any, listfile: Path) -> None:
    servers = start(start_server, listfile, 3)
    endpoints = [s.endpoint for s in servers]
    ref = reference(endpoints, 1)[0]
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S) as client:
        got = labels(client, 4)
        with frozen(servers[2]):
            started = time.monotonic()
            got += labels(client, 26)
            elapsed = time.monotonic() - started
        assert got == ref
        assert [loss["endpoint"] for loss in client.lost] == [endpoints[2]]
        assert "silent" in client.lost[0]["error"]
        assert elapsed < RECOVERY_LIMIT_S, elapsed  # the silence, then the survivors take over


def test_resume_before_during_and_after_a_loss(start_server: Any, listfile: Path) -> None:
    servers = start(start_server, listfile, 3)
    endpoints = [s.endpoint for s in servers]
    two = reference(endpoints, 2)
    ref = flat(two[0] + two[1])
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S) as client:
        first = flat(labels(client, 5))
        before = client.state_dict()
        kill(servers[2])
        during_run = flat(labels(client, 10))
        during = client.state_dict()
    assert before["servers"] == 3 and (during["epoch"], during["batch"]) == (0, 15)
    assert first + during_run == ref[:60]
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S, state=before) as resumed:  # one server is dead now
        assert flat(labels(resumed, 10)) == ref[20:60]
        assert [loss["endpoint"] for loss in resumed.lost] == [endpoints[2]]
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S, state=during) as resumed:
        assert flat(labels(resumed, 25)) == ref[60:160]  # across the epoch boundary, on two servers
        after = resumed.state_dict()
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S, state=after) as resumed:
        assert (after["epoch"], after["batch"]) == (1, 10)
        assert flat(labels(resumed, 1)) == ref[160:164]


def test_balanced_merge_lets_the_fast_server_deliver_more_exactly_once(start_server: Any, listfile: Path) -> None:
    fast = start_server(listfile, *ARGS, endpoint=f"tcp://127.0.0.2:{free_port()}")
    slow = start_server(listfile, *ARGS, "--simulate-read-latency-ms", "40", "--read-threads", "0",
                        endpoint=f"tcp://127.0.0.3:{free_port()}")
    endpoints = [fast.endpoint, slow.endpoint]
    ordered = reference(endpoints, 2)
    with LoaderClient(endpoints, timeout_s=10, merge="balanced", prefetch=1) as client:
        assert client.steps_per_epoch == 30  # 2 shares of 60 samples: 15 batches each
        epochs = [labels(client, 30) for _ in range(2)]
        by = dict(client.delivered_by)
        state_mid = None
        part = labels(client, 11)
        state_mid = client.state_dict()
        rest_seen = labels(client, 19)
    for got, want in zip(epochs, ordered, strict=True):  # the same samples as the ordered merge, each once
        assert sorted(flat(got)) == sorted(flat(want)) and len(set(flat(got))) == 120
    assert by[fast.endpoint] > by[slow.endpoint], by
    assert state_mid is not None and state_mid["merge"] == "balanced" and state_mid["batch"] == 11
    with LoaderClient(endpoints, timeout_s=10, merge="balanced", prefetch=1, state=state_mid) as resumed:
        rest = labels(resumed, 19)
        assert resumed.position == (3, 0)
    assert sorted(flat(part + rest)) == sorted(flat(part + rest_seen)) and len(set(flat(part + rest))) == 120


def test_balanced_merge_survives_a_kill_exactly_once(start_server: Any, listfile: Path) -> None:
    servers = start(start_server, listfile, 3)
    endpoints = [s.endpoint for s in servers]
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S, merge="balanced", prefetch=2) as client:
        got = labels(client, 8)
        kill(servers[0])
        got += labels(client, 22)
        nxt = labels(client, 30)
    assert len(set(flat(got))) == len(flat(got)) == N
    assert len(set(flat(nxt))) == N


def test_raise_mode_and_bad_options(start_server: Any, listfile: Path) -> None:
    servers = start(start_server, listfile, 2)
    endpoints = [s.endpoint for s in servers]
    with pytest.raises(ValueError, match="merge"):
        LoaderClient(endpoints, merge="fastest")
    with pytest.raises(ValueError, match="on_server_loss"):
        LoaderClient(endpoints, on_server_loss="ignore")
    with LoaderClient(endpoints, timeout_s=TIMEOUT_S, on_server_loss="raise") as client:
        labels(client, 2)
        kill(servers[0])
        with pytest.raises(LoaderError, match=endpoints[0].replace(".", r"\.")):
            labels(client, 30)


def test_servers_with_different_settings_are_refused_at_once(start_server: Any, listfile: Path) -> None:
    a = start_server(listfile, *ARGS, endpoint=f"tcp://127.0.0.2:{free_port()}")
    b = start_server(listfile, *ARGS, "--size", "20x12", endpoint=f"tcp://127.0.0.3:{free_port()}")  # other pixels
    with pytest.raises(ConfigError, match="fingerprint|settings"):
        LoaderClient([a.endpoint, b.endpoint], timeout_s=10)
