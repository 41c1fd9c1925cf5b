"""The client's own checks, against a fake server: a real ZeroMQ ROUTER in the test that speaks the
wire format of `loader_client.contract.protocol` (a welcome, then batches as a msgpack header plus raw
frames) and misbehaves on purpose: a repeated, a skipped and an out-of-order batch, a frame of
the wrong size, and it counts the credit the client grants.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from loader_client import LoaderClient, ProtocolError
from loader_client.contract import protocol
from loader_client.contract.messages import Welcome
from loader_client.contract.schema import encode

STEPS = 3
BATCH = 2
X_SHAPE = (4, 4, 3)


class FakeServer:
    """Answers one hello with a welcome at (`epoch`, `batch`), then sends `positions` as batches."""

    def __init__(self, endpoint: str, positions: list[tuple[int, int]], *, epoch: int = 0, batch: int = 0,
                 short_frame_at: int | None = None) -> None:
        self.endpoint, self.positions, self.start = endpoint, positions, (epoch, batch)
        self.short_frame_at = short_frame_at
        self.hello: dict[str, Any] = {}
        self.credit = 0  # granted after the hello
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            identity = self._welcome()
            next_beat = 0.0
            while not self._stop.is_set():
                if self.sent < len(self.positions) and self.sent < self.hello["credit"] + self.credit:
                    self._sock.send_multipart([identity, *self._batch(*self.positions[self.sent])])
                    self.sent += 1
                    next_beat = time.monotonic() + 0.3
                elif time.monotonic() >= next_beat:
                    self._sock.send_multipart([identity, protocol.pack("heartbeat")])
                    next_beat = time.monotonic() + 0.3
                if self._sock.poll(20):
                    _, frame = self._sock.recv_multipart()
                    header = protocol.unpack(frame)
                    if header["t"] == "credit":
                        self.credit += header["n"]
        except BaseException as exc:
            self.error = exc
        finally:
            self._sock.close(linger=0)

    def _welcome(self) -> bytes:
        assert self._sock.poll(10_000), "no hello from the client"
        identity, frame = self._sock.recv_multipart()
        self.hello = protocol.unpack(frame)
        assert self.hello["t"] == "hello"
        epoch, batch = self.start
        welcome = Welcome(num_samples=STEPS * BATCH, num_classes=None, batch_size=BATCH, steps_per_epoch=STEPS,
                          rank=self.hello.get("rank", 0), world_size=self.hello.get("world_size", 1),
                          seed=self.hello.get("seed") or 0, epoch=epoch, batch=batch,
                          mode="epoch", in_order=True, drop_last=True, x_shape=list(X_SHAPE), x_dtype="|u1",
                          layout="hwc", color="rgb", class_names=None,
                          fingerprint=self.hello.get("fingerprint") or "fake", heartbeat_s=0.3,
                          max_message_bytes=1 << 30, shm=None)
        self._sock.send_multipart([identity, encode(welcome)])
        return identity

    def _batch(self, epoch: int, batch: int) -> list[bytes]:
        first = (epoch * STEPS + batch) * BATCH
        arrays: dict[str, np.ndarray] = {"x": np.full((BATCH, *X_SHAPE), batch, np.uint8),
                  "y": np.arange(first, first + BATCH, dtype=np.int64),
                  "index": np.arange(first, first + BATCH, dtype=np.int64)}
        frames = [a.tobytes() for a in arrays.values()]
        if self.short_frame_at == self.sent:
            frames[0] = frames[0][:-1]  # one byte short of what the header describes
        head = protocol.pack("batch", epoch=epoch, batch=batch, steps=STEPS,
                             arrays=protocol.describe_arrays(arrays), shm=None)
        return [head, *frames]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._ctx.term()
        assert not self._thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[Any]:
    servers: list[FakeServer] = []

    def start(positions: list[tuple[int, int]], **kw: Any) -> FakeServer:
        servers.append(FakeServer(f"ipc://{tmp_path}/fake{len(servers)}.sock", positions, **kw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def positions_taken(client: LoaderClient, count: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(count):
        _, y = client.next()
        assert client.last is not None
        assert y.tolist() == client.last.indices.tolist()
        out.append((client.last.epoch, client.last.batch))
    return out


def test_fake_server_in_order_stream_is_accepted(fake: Any) -> None:
    """The control: the fake speaks the wire format well enough for a well-behaved stream."""
    stream = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    server = fake(stream)
    with LoaderClient(server.endpoint, timeout_s=10, prefetch=2, shared_memory=False) as client:
        assert positions_taken(client, len(stream)) == stream
        assert client.position == (1, 2)


@pytest.mark.parametrize(("start", "stream", "good", "expected", "got"), [
    ((0, 0), [(0, 0), (0, 1), (0, 1)], 2, (0, 2), (0, 1)),  # repeated
    ((0, 0), [(0, 0), (0, 2)], 1, (0, 1), (0, 2)),  # one skipped
    ((0, 0), [(0, 1), (0, 0)], 0, (0, 0), (0, 1)),  # out of order
    ((0, 0), [(0, 0), (0, 1), (0, 2), (0, 0)], 3, (1, 0), (0, 0)),  # the epoch again instead of the next
    ((0, 0), [(0, 0), (0, 1), (0, 2), (2, 0)], 3, (1, 0), (2, 0)),  # a whole epoch skipped
    ((1, 1), [(1, 1), (1, 2), (1, 1)], 2, (2, 0), (1, 1)),  # resumed mid-epoch, then repeated
    ((1, 1), [(0, 0)], 0, (1, 1), (0, 0)),  # a resume the server ignored
], ids=["repeated", "skipped", "out-of-order", "epoch-repeated", "epoch-skipped", "resumed-repeated",
        "resume-ignored"])
def test_lost_or_repeated_batch_is_a_protocol_error(fake: Any, start: tuple[int, int],
                                                     stream: list[tuple[int, int]], good: int,
                                                     expected: tuple[int, int], got: tuple[int, int]) -> None:
    server = fake(stream, epoch=start[0], batch=start[1])
    state = {"epoch": start[0], "batch": start[1], "seed": 0, "rank": 0, "world_size": 1, "fingerprint": "fake"}
    with LoaderClient(server.endpoint, timeout_s=10, prefetch=4, shared_memory=False, state=state) as client:
        assert positions_taken(client, good) == stream[:good]
        with pytest.raises(ProtocolError) as info:
            client.next()
        with pytest.raises(ProtocolError):  # and it stays failed
            client.next()
    if got < start:  # before the stream's first batch: not a position of this stream at all
        assert (f"batch from the loader server at {server.endpoint} claims epoch {got[0]} batch {got[1]}, "
                "outside this stream") in str(info.value)
    else:
        assert (f"expected epoch {expected[0]} batch {expected[1]} from the loader server at {server.endpoint}, "
                f"got epoch {got[0]} batch {got[1]}: a batch was lost, repeated or out of order") in str(info.value)


def test_repeated_batch_from_one_of_several_servers_is_a_protocol_error(fake: Any) -> None:
    """The merged stream of several servers relies on each server's own order check.

    With on_server_loss="raise" the check's ProtocolError reaches the trainer as it is; with the
    default fail-over, the misbehaving server would be dropped and its share built elsewhere.
    """
    a, b = fake([(0, 0), (0, 1), (0, 2), (1, 0)]), fake([(0, 0), (0, 1), (0, 1)])
    with LoaderClient([a.endpoint, b.endpoint], timeout_s=10, prefetch=2, shared_memory=False,
                      on_server_loss="raise") as client:
        assert client.servers == 2 and (a.hello["rank"], b.hello["rank"]) == (0, 1)
        for _ in range(4):  # round robin: a (0, 0), b (0, 0), a (0, 1), b (0, 1)
            client.next()
        client.next()  # a (0, 2)
        with pytest.raises(ProtocolError, match=f"expected epoch 0 batch 2 from the loader server at {b.endpoint}, "
                                                "got epoch 0 batch 1: a batch was lost, repeated or out of order"):
            client.next()


def test_frame_of_the_wrong_size_is_a_protocol_error(fake: Any) -> None:
    server = fake([(0, 0), (0, 1)], short_frame_at=1)
    with LoaderClient(server.endpoint, timeout_s=10, prefetch=2, shared_memory=False) as client:
        client.next()
        with pytest.raises(ProtocolError, match="needs 96 bytes, frame has 95"):
            client.next()


def test_client_grants_one_credit_per_batch_taken(fake: Any) -> None:
    stream = [(0, b) for b in range(STEPS)] + [(1, b) for b in range(STEPS)]
    server = fake(stream)
    with LoaderClient(server.endpoint, timeout_s=10, prefetch=2, shared_memory=False) as client:
        assert server.hello["credit"] == 2
        deadline = time.monotonic() + 5
        while server.sent < 2 and time.monotonic() < deadline:  # the hello's credit used up
            time.sleep(0.01)
        time.sleep(0.5)  # time for any credit too many to arrive
        assert server.sent == 2 and server.credit == 0  # nothing taken, nothing more granted
        for taken in range(1, 5):
            client.next()
            deadline = time.monotonic() + 5
            while (server.credit < taken or server.sent < 2 + taken) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # time for any credit too many to arrive
            assert server.credit == taken  # one per batch taken, never ahead of the trainer
            assert server.sent == 2 + taken
