"""The several-server stream over in-memory streams (no sockets): it uses nothing but the `Stream`
protocol of what it merges, so its merges and loss policies are tested here as pure behaviour.

Batch j of share s in epoch e carries the label ``e * 1000 + s * 100 + j``. With 3 shares of
4 batches, the ordered merge of epoch e is therefore share b % 3, batch b // 3 for b in 0..11.
The real processes (SIGKILL, SIGSTOP, restarts) are in test_hosts.py and test_scale_out.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from loader_client import ClientOptions, LoaderClient
from loader_client.contract.errors import ConfigError, LoaderError, LoaderTimeoutError
from loader_client.endpoints import Endpoint, parse_endpoint
from loader_client.hosts import HostsStream
from loader_client.options import Start
from loader_client.stream import BatchInfo, Delivery, Servers, Stream

ENDPOINTS = [parse_endpoint(f"tcp://loader-{i}:5555") for i in range(3)]
STEPS = 4  # batches per share


def ordered(epoch: int, shares: tuple[int, ...] = (0, 1, 2)) -> list[int]:
    """Epoch `epoch` of the ordered merge of `shares`: batch j of each share, share by share."""
    return [epoch * 1000 + s * 100 + j for j in range(STEPS) for s in shares]


class Fleet:
    """In-memory servers: `connect` opens a share's stream; a `dead` server refuses and goes silent."""

    def __init__(self) -> None:
        self.dead: set[str] = set()
        self.opened: list[tuple[str, int, int, int]] = []  # (endpoint, share, epoch, batch)

    def connect(self, endpoint: Endpoint, start: Start) -> Stream:
        if str(endpoint) in self.dead:
            raise LoaderTimeoutError(f"no answer from the loader server at {endpoint}")
        self.opened.append((str(endpoint), start.rank, start.epoch, start.batch))
        return ShareStream(self, str(endpoint), start)

    def answers(self, endpoint: str, timeout_s: float, curve: dict[str, Any]) -> bool:
        return endpoint not in self.dead


class ShareStream:
    """One share of one server, as a `ServerStream` would deliver it (and fail: the failure stays)."""

    def __init__(self, fleet: Fleet, endpoint: str, start: Start) -> None:
        self.fleet, self.endpoint, self.share = fleet, endpoint, start.rank
        self.epoch, self.batch = start.epoch, start.batch
        self.info: dict[str, Any] = {"seed": 7, "fingerprint": "f" * 16, "steps_per_epoch": STEPS, "num_samples": 12,
                                     "num_classes": None, "batch_size": 1, "class_names": None, "x_shape": [2]}
        self.x_dtype = np.dtype(np.uint8)
        self.steps_per_epoch, self.wait_s, self.shared_memory = STEPS, 0.0, False
        self.lost: list[dict[str, Any]] = []
        self.failure: LoaderError | None = None
        self.closed = False

    @property
    def servers(self) -> Servers:
        return Servers((self.endpoint,), (self.endpoint,))

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.batch

    def take(self) -> Delivery:
        if self.failure is None and self.endpoint in self.fleet.dead:
            self.failure = LoaderTimeoutError(f"the loader server at {self.endpoint} has been silent")
        if self.failure is not None:
            raise self.failure
        label = self.epoch * 1000 + self.share * 100 + self.batch
        got = Delivery(np.full((1, 2), label % 256, np.uint8), np.array([label]), (),
                       BatchInfo(self.epoch, self.batch, np.array([label])))
        self.epoch, self.batch = (self.epoch, self.batch + 1) if self.batch + 1 < STEPS else (self.epoch + 1, 0)
        return got

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": 7, "rank": self.share, "world_size": 3}

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        return {"endpoint": self.endpoint}

    def close(self) -> None:
        self.closed = True


def hosts(fleet: Fleet, **options: Any) -> HostsStream:
    return HostsStream(ENDPOINTS, ClientOptions(timeout_s=2.0, **options), fleet.connect, fleet.answers)


def labels(stream: Stream, n: int) -> list[int]:
    return [int(stream.take().y[0]) for _ in range(n)]


def test_ordered_merge_position_state_and_resume() -> None:
    fleet = Fleet()
    stream = hosts(fleet)
    try:
        assert (stream.steps_per_epoch, stream.position) == (12, (0, 0))
        assert labels(stream, 5) == ordered(0)[:5] and stream.position == (0, 5)
        state = stream.state_dict()
        assert state == {"epoch": 0, "batch": 5, "seed": 7, "rank": 0, "world_size": 1, "fingerprint": "f" * 16,
                         "servers": 3}
        assert labels(stream, 7 + 12) == ordered(0)[5:] + ordered(1) and stream.position == (2, 0)
        assert stream.servers == Servers(tuple(map(str, ENDPOINTS)), tuple(map(str, ENDPOINTS)), (),
                                         {str(e): 8 for e in ENDPOINTS})
    finally:
        stream.close()
    resumed = hosts(Fleet(), state=state)
    try:
        assert resumed.position == (0, 5) and labels(resumed, 7) == ordered(0)[5:]
    finally:
        resumed.close()


def test_failover_builds_the_lost_share_elsewhere_in_the_same_order() -> None:
    fleet = Fleet()
    stream = hosts(fleet)
    try:
        got = labels(stream, 4)
        fleet.dead.add(str(ENDPOINTS[1]))
        got += labels(stream, 8)
        assert got == ordered(0) and stream.steps_per_epoch == 12  # nothing lost, nothing repeated
        assert [(loss["endpoint"], loss["epoch"], loss["batch"]) for loss in stream.lost] == \
            [(str(ENDPOINTS[1]), 0, 4)]
        assert labels(stream, 12) == ordered(1)  # the next epoch on the two survivors, in the same order
        assert stream.servers.active == (str(ENDPOINTS[0]), str(ENDPOINTS[2]))
        assert stream.servers.delivered_by[str(ENDPOINTS[1])] == 1  # batch 0 of its share, before it died
    finally:
        stream.close()


def test_continue_drops_the_lost_share_and_later_epochs_plan_without_it() -> None:
    fleet = Fleet()
    stream = hosts(fleet, on_server_loss="continue")
    try:
        got = labels(stream, 4)  # shares 0, 1, 2 batch 0, then share 0 batch 1
        fleet.dead.add(str(ENDPOINTS[1]))
        got += labels(stream, 5)
        # Share 1 is gone after its batch 0: the rest of the epoch is shares 0 and 2, in merge order.
        assert got == [0, 100, 200, 1, 201, 2, 202, 3, 203]
        assert stream.position == (1, 0) and stream.steps_per_epoch == 2 * STEPS
        loss = stream.lost[0]
        assert (loss["endpoint"], loss["share"], loss["epoch"], loss["batch"]) == (str(ENDPOINTS[1]), 1 / 3, 0, 4)
        assert labels(stream, 8) == ordered(1, (0, 2))
        assert stream.servers.active == (str(ENDPOINTS[0]), str(ENDPOINTS[2]))
        fleet.dead.update(str(e) for e in ENDPOINTS)
        with pytest.raises(LoaderTimeoutError, match="silent"):  # the last server's own error, as before
            labels(stream, 8)
        with pytest.raises(LoaderTimeoutError):  # and it stays
            stream.take()
    finally:
        stream.close()


def test_continue_state_resumes_without_the_dropped_batches() -> None:
    fleet = Fleet()
    stream = hosts(fleet, on_server_loss="continue")
    try:
        labels(stream, 2)
        fleet.dead.add(str(ENDPOINTS[2]))
        first = labels(stream, 3)  # share 2 fails at its batch 0: it is dropped, all 4 batches
        state = stream.state_dict()
        rest = labels(stream, stream.steps_per_epoch - stream.position[1])
    finally:
        stream.close()
    assert first + rest == [1, 101, 2, 102, 3, 103]
    assert state["pending"] == [[0, 3, 4], [1, 2, 4]] and state["batch"] == 5
    fleet.dead.clear()
    resumed = hosts(fleet, on_server_loss="continue", state=state)
    try:
        assert resumed.position == (0, 5) and resumed.steps_per_epoch == 8
        assert labels(resumed, 3) == rest and resumed.position == (1, 0)
        assert labels(resumed, 12) == ordered(1)  # a new client: every server answers, every share again
    finally:
        resumed.close()


def test_raise_policy_raises_the_first_loss_and_not_a_loss_always_raises() -> None:
    fleet = Fleet()
    stream = hosts(fleet, on_server_loss="raise")
    try:
        labels(stream, 2)
        fleet.dead.add(str(ENDPOINTS[2]))
        with pytest.raises(LoaderTimeoutError, match="loader-2"):
            labels(stream, 1)
        assert stream.lost == []
    finally:
        stream.close()
    fleet = Fleet()
    fleet.dead.add(str(ENDPOINTS[0]))
    with pytest.raises(LoaderTimeoutError, match="loader-0"):  # a first contact that fails: raised too
        hosts(fleet, on_server_loss="raise")


def test_balanced_merge_returns_every_batch_once() -> None:
    fleet = Fleet()
    stream = hosts(fleet, merge="balanced", prefetch=1)
    try:
        epochs = [labels(stream, 12) for _ in range(2)]
        assert [sorted(e) for e in epochs] == [sorted(ordered(0)), sorted(ordered(1))]
        assert stream.state_dict()["merge"] == "balanced"
    finally:
        stream.close()


def test_every_server_gone_at_the_start_names_them_all() -> None:
    fleet = Fleet()
    fleet.dead.update(str(e) for e in ENDPOINTS)
    with pytest.raises(LoaderError, match="every loader server is gone") as info:
        hosts(fleet)
    assert all(str(e) in str(info.value) for e in ENDPOINTS)


def test_a_server_with_other_data_is_refused_when_admitted() -> None:
    fleet = Fleet()
    original = fleet.connect

    def connect(endpoint: Endpoint, start: Start) -> Stream:
        stream = original(endpoint, start)
        if str(endpoint) == str(ENDPOINTS[2]):
            stream.info["fingerprint"] = "e" * 16  # type: ignore[index]
        return stream

    with pytest.raises(ConfigError, match="different settings or data sets"):
        HostsStream(ENDPOINTS, ClientOptions(timeout_s=2.0), connect, fleet.answers)


def test_the_client_facade_reads_only_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """LoaderClient over the in-memory fleet: what it reports comes from the Stream it holds."""
    import loader_client.client as client_module

    fleet = Fleet()
    monkeypatch.setattr(client_module, "open_stream",
                        lambda endpoints, options: HostsStream(endpoints, options, fleet.connect, fleet.answers))
    with LoaderClient([str(e) for e in ENDPOINTS], timeout_s=2.0, on_server_loss="continue") as client:
        assert client.servers == 3 and client.steps_per_epoch == 12 and client.endpoint == \
            ",".join(map(str, ENDPOINTS))
        assert int(client.next()[1][0]) == 0
        fleet.dead.add(str(ENDPOINTS[1]))
        assert [int(client.next()[1][0]) for _ in range(7)] == [200, 1, 201, 2, 202, 3, 203]
        assert client.position == (1, 0) and client.steps_per_epoch == 8
        assert client.lost[0]["endpoint"] == str(ENDPOINTS[1]) and client.lost[0]["share"] == 1 / 3
        assert client.active_endpoints == [str(ENDPOINTS[0]), str(ENDPOINTS[2])]
        assert client.state_dict()["servers"] == 3 and client.last is not None and client.last.batch == 7
