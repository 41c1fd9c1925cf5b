"""The background thread of a stream: receives batches, grants credit, pings, and checks the server.

It owns the socket once the handshake is done. It grants the server one credit per batch the
trainer takes, so at most `prefetch` batches are ever queued here, and it enforces that: a
batch beyond the credit it granted is a `ProtocolError`, as is a batch out of order (in-order
streams), a shared-memory reference it was not granted or to a slot it still holds, a message
over the size bound, or a batch whose content is not what the welcome promised (`content`).
Its own clocks and bounds, never the server's word, end a stream that stalls: no complete
message for `timeout_s` (silence), no batch for `timeout_s` while the trainer waits for one (no
progress, though heartbeats come), or a message that never ends (`guard_bytes`). Any error ends
the thread with its sockets closed, and is handed to the trainer's next `next()`.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from . import wire
from .content import BatchContent
from .contract import protocol
from .contract.errors import LoaderError, LoaderTimeoutError, ProtocolError
from .contract.messages import (
    MAX_RELEASE_SLOTS,
    STREAM_MESSAGES,
    Batch,
    Bye,
    Credit,
    Error,
    Goodbye,
    Heartbeat,
    Ping,
    Release,
    Welcome,
)
from .contract.normalize import BufferPool, Normalization
from .contract.schema import Message
from .contract.shm import Arena
from .handshake import BYE_LINGER_MS
from .manifests import checked_manifest
from .options import MIN_HEARTBEAT_S, ClientOptions
from .stream import BatchInfo, Delivery
from .wire import Sock

__all__ = ["CREDIT_POLL_MS", "GUARD_POLL_MS", "Progress", "Receiver"]

#: While batches wait to be taken, look for consumed ones this often (ms) instead of being woken.
CREDIT_POLL_MS = 4
#: The longest the thread sleeps: how often it checks for a message that never ends (ms).
GUARD_POLL_MS = 10
#: What the trainer may grow by, beyond twice the message bound, while no message completes.
GUARD_SLACK_BYTES = 64 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_REQUIRED = ("x", "y", "index")


class Progress:
    """What the trainer's thread has done, read by the receiver: batches taken, and time spent waiting
    in ``take()`` (reported to the server as the trainer's stall with every credit and ping)."""

    def __init__(self) -> None:
        self.consumed = 0
        self.started = time.perf_counter()
        self.wait_s = 0.0  # finished waits
        self.waiting_since = 0.0  # perf_counter() when the wait in progress began; 0 when none
        self._reported = (0.0, 0.0)

    def waited(self, since: float, until: float) -> None:
        """The trainer's thread waited from `since` to `until` (perf_counter)."""
        self.wait_s += until - since
        self.waiting_since = 0.0

    def report(self) -> tuple[float, float]:
        """(wait_s, wall_s) now, cumulative, never below an earlier report (the two threads race)."""
        now = time.perf_counter()
        since = self.waiting_since  # read before wait_s: a wait that just ended is counted at most once
        wait = self.wait_s + (now - since if since else 0.0)
        wall = now - self.started
        wait, wall = max(wait, self._reported[0]), max(wall, self._reported[1])
        self._reported = (min(wait, wall), wall)
        return self._reported


class Receiver:
    """The body of a stream's background thread (`run`)."""

    def __init__(self, sock: Sock, wake: Sock, out: queue.Queue[Delivery | BaseException],
                 peer: str, options: ClientOptions, welcome: Welcome, arena: Arena | None, norm: Normalization | None,
                 progress: Progress) -> None:
        self.sock, self.wake, self.out, self.peer = sock, wake, out, peer
        self.timeout_s = options.timeout_s
        assert options.heartbeat_s is not None
        self.heartbeat_s = max(MIN_HEARTBEAT_S, min(options.heartbeat_s, welcome.heartbeat_s))
        self.max_bytes = min(options.max_message_bytes, welcome.max_message_bytes)  # the server may only lower it
        self.steps = welcome.steps_per_epoch
        self.start_epoch = welcome.epoch
        self.expect = (welcome.epoch, welcome.batch) if welcome.in_order else None
        self.arena, self.norm, self.progress = arena, norm, progress
        self.manifest = options.manifest  # every batch must come with its manifest, and none may come without
        self.pool = BufferPool(keep=8)
        self.granted = options.prefetch  # batches the server may send, in all (the hello's credit, then Credit)
        self.received = 0
        self.credited = 0  # batches consumed and already credited back
        self.held: set[int] = set()  # arena slots the trainer still holds
        self.releases = _Releases()
        # ZeroMQ bounds frames, not messages: it buffers the frames of an unfinished message out of
        # sight. Since the last complete message, an honest server's next one holds at most
        # `max_bytes`; when this process grew by more than twice that plus GUARD_SLACK_BYTES, a
        # message that never ends is filling memory. Checked every GUARD_POLL_MS at least, so the
        # bound holds to what arrives in that time, however fast the server sends.
        self.guard_bytes = 2 * self.max_bytes + GUARD_SLACK_BYTES
        self.content = BatchContent(welcome, peer)
        self._handlers: dict[type[Message], Callable[[Any, list[Any]], None]] = {
            Batch: self._on_batch, Heartbeat: self._on_heartbeat, Error: self._on_end, Goodbye: self._on_end,
        }

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        poller.register(self.releases.read_fd, zmq.POLLIN)
        last_rx = last_tx = last_batch = time.monotonic()
        idle_ms = max(1, min(int(self.heartbeat_s * 1000), GUARD_POLL_MS))
        linger = 0
        memory = _Memory()
        rss_at_rx = memory.rss()
        try:
            while True:
                # While batches wait here, look for consumed ones every few ms instead of being
                # woken by each next(): a wake-up per batch let this thread take the GIL just as
                # the trainer returned from next(), costing it 3-6 ms on a busy machine.
                waiting = self.progress.consumed > self.credited or not self.out.empty()
                events = dict(poller.poll(CREDIT_POLL_MS if waiting else idle_ms))
                now = time.monotonic()
                if self.releases.read_fd in events:
                    self._drain_releases()
                if self.wake in events and self._stop_requested():
                    wire.send(self.sock, Bye(), zmq.NOBLOCK)
                    linger = BYE_LINGER_MS
                    return
                if self.sock in events:
                    while True:
                        try:
                            message, frames = wire.receive(self.sock, STREAM_MESSAGES, peer=self.peer,
                                                           where="on the stream", max_bytes=self.max_bytes,
                                                           flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_rx = now
                        if isinstance(message, Batch):
                            last_batch = now
                        self._handlers[type(message)](message, frames)
                    if last_rx == now:
                        rss_at_rx = memory.rss()
                credits = self.progress.consumed - self.credited
                if credits:
                    wait_s, wall_s = self.progress.report()
                    wire.send(self.sock, Credit(n=credits, wait_s=wait_s, wall_s=wall_s), zmq.NOBLOCK)
                    self.credited += credits
                    self.granted += credits
                    last_tx = now
                elif now - last_tx >= self.heartbeat_s:
                    wait_s, wall_s = self.progress.report()
                    wire.send(self.sock, Ping(wait_s=wait_s, wall_s=wall_s), zmq.NOBLOCK)
                    last_tx = now
                if last_rx != now and (grown := memory.rss() - rss_at_rx) > self.guard_bytes:
                    raise ProtocolError(
                        f"{self.peer} has not completed a message for {now - last_rx:.1f} s while this process "
                        f"grew by {grown >> 20} MiB, more than a message may hold (twice the bound of "
                        f"{self.max_bytes} bytes, plus {GUARD_SLACK_BYTES >> 20} MiB): a message that never ends"
                    )
                if now - last_rx > self.timeout_s:
                    raise LoaderTimeoutError(
                        f"{self.peer} has been silent for {self.timeout_s:g} s (no complete message: no batch, "
                        "no heartbeat): it died, the network is down, or it sends a message that never ends; "
                        "once it answers again (`loader-server health`), resume from your last state_dict()"
                    )
                since = self.progress.waiting_since  # perf_counter(), 0.0 when the trainer does not wait
                waited = time.perf_counter() - since if since else 0.0
                if since and min(waited, now - last_batch) > self.timeout_s and self.out.empty():
                    raise LoaderTimeoutError(
                        f"{self.peer} has delivered no batch for {self.timeout_s:g} s while the trainer waited for "
                        "one, though it still answers (heartbeats): it is stuck, or too slow for timeout_s"
                    )
        except LoaderError as exc:
            self.out.put_nowait(exc)
        except Exception as exc:  # never die silently: the trainer would wait forever
            self.out.put_nowait(LoaderError(f"client receiver failed: {type(exc).__name__}: {exc}"))
        finally:
            memory.close()
            self.releases.close()
            self.sock.close(linger=linger)
            self.wake.close(linger=0)

    def _stop_requested(self) -> bool:
        while True:
            try:
                if self.wake.recv(zmq.NOBLOCK) == b"x":
                    return True
            except zmq.Again:
                return False

    # ------------------------------------------------------------------ messages
    def _on_heartbeat(self, message: Heartbeat, frames: list[Any]) -> None:
        if frames:
            raise ProtocolError(f"{self.peer} sent {len(frames)} array frames with a heartbeat")

    def _on_end(self, message: Error | Goodbye, frames: list[Any]) -> None:
        wire.raise_for(message, self.peer)

    def _on_batch(self, message: Batch, frames: list[Any]) -> None:
        if self.received >= self.granted:
            raise ProtocolError(f"{self.peer} sent a batch beyond the {self.granted} batches of credit this "
                                "client granted: it ignores flow control")
        self.received += 1
        self._check_position(message)
        arrays = protocol.build_arrays(message.arrays, frames, max_bytes=self.max_bytes)
        if message.shm is not None:
            name, view = self._from_arena(message.shm.slot, message.shm.arrays)
            if name in arrays:
                raise ProtocolError(f"{self.peer} sent array {name!r} both in a frame and in shared memory")
            arrays[name] = view
        missing = [k for k in _REQUIRED if k not in arrays]
        if missing:
            raise ProtocolError(f"batch from {self.peer} lacks arrays {', '.join(missing)}: got {sorted(arrays)}")
        x, y, index = arrays["x"], arrays["y"], arrays["index"]
        extras = {k: v for k, v in arrays.items() if k not in _REQUIRED}  # --collate arrays, in order
        self.content.check(message, x, y, index, extras)
        if self.norm is not None:  # the uint8 view (and its slot) is released right here
            x = self.norm.apply(x, out=self.pool.get(x.shape, np.float32))
        manifest = checked_manifest(message, index, self.manifest, self.peer)
        self.out.put_nowait(Delivery(x, y, tuple(extras.values()),
                                     BatchInfo(message.epoch, message.batch, index, manifest)))

    def _check_position(self, message: Batch) -> None:
        if message.steps != self.steps:
            raise ProtocolError(f"batch from {self.peer} says {message.steps} batches per epoch; the welcome said "
                                f"{self.steps}")
        if message.batch >= self.steps or message.epoch < self.start_epoch:
            raise ProtocolError(f"batch from {self.peer} claims epoch {message.epoch} batch {message.batch}, "
                                f"outside this stream")
        if self.expect is None:
            return
        epoch, batch = self.expect
        if (message.epoch, message.batch) != (epoch, batch):
            raise ProtocolError(f"expected epoch {epoch} batch {batch} from {self.peer}, got epoch {message.epoch} "
                                f"batch {message.batch}: a batch was lost, repeated or out of order")
        self.expect = (epoch, batch + 1) if batch + 1 < self.steps else (epoch + 1, 0)

    def _from_arena(self, slot: int, described: list[list[Any]]) -> tuple[str, np.ndarray]:
        """Wrap the array in its shared-memory slot without a copy.

        The slot goes back to the server when the last reference to the array (or to any view
        or tensor made from it) is gone: a finalizer writes the slot number to a pipe that this
        thread watches. A trainer that holds on to batches only makes the server fall back to
        frames over the socket, never stall.
        """
        if self.arena is None:
            raise ProtocolError(f"batch from {self.peer} refers to shared memory this client was not granted")
        if slot in self.held:
            raise ProtocolError(f"batch from {self.peer} uses shared-memory slot {slot}, which this client still "
                                "holds")
        if len(described) != 1:
            raise ProtocolError("a shared-memory slot holds exactly one array")
        item = described[0]
        if not (len(item) == 3 and isinstance(item[0], str)):
            raise ProtocolError(f"shared-memory array description {item!r} is not [name, dtype, shape]")
        name, dtype, shape = item
        view = self.arena.view(slot, dtype, shape)
        self.held.add(slot)
        weakref.finalize(view, _give_back, self.arena, self.releases, slot)
        return name, view

    def _drain_releases(self) -> None:
        slots = self.releases.drain()
        self.held.difference_update(slots)
        for i in range(0, len(slots), MAX_RELEASE_SLOTS):
            wire.send(self.sock, Release(slots=slots[i:i + MAX_RELEASE_SLOTS]), zmq.NOBLOCK)


def _give_back(arena: Arena, releases: _Releases, slot: int) -> None:
    """The trainer dropped the last reference to `slot`'s array: forget what it wrote there (a share's
    arena, mapped copy-on-write, so that a member changing its batch in place changes no other member's),
    then give the slot back to the server."""
    arena.discard_writes(slot)
    releases.release(slot)


class _Memory:
    """This process's private resident memory, from /proc/self/statm (0 where there is none)."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = None

    def rss(self) -> int:
        """Private resident memory (resident less file-backed and shared pages, so arena pages do not count)."""
        if self._fd is None:
            return 0
        fields = os.pread(self._fd, 128, 0).split()
        return (int(fields[1]) - int(fields[2])) * _PAGE

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Releases:
    """Slot numbers from finalizers (which run on any thread) to the receiver, through a pipe."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._lock = threading.Lock()
        self._closed = False

    def release(self, slot: int) -> None:
        with self._lock:
            if not self._closed:  # after close the fd number may belong to someone else
                os.write(self._write_fd, struct.pack("<i", slot))

    def drain(self) -> list[int]:
        try:
            data = os.read(self.read_fd, 4096)
        except BlockingIOError:
            return []
        return [s for (s,) in struct.iter_unpack("<i", data[: len(data) // 4 * 4])]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.read_fd)
            os.close(self._write_fd)
