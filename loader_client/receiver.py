"""The background thread of a stream: receives batches, grants credit, pings, and checks the server.

It owns the socket once the handshake is done. It grants the server one credit per batch the
trainer takes, so at most `prefetch` batches are ever queued here, and it enforces that: a
batch beyond the credit it granted is a `ProtocolError`, as is a batch out of order (in-order
streams), a shared-memory reference it was not granted or to a slot it still holds, or a
message over the welcome's size bound. Any error ends the thread with its sockets closed, and
is handed to the trainer's next `next()`.
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
from .options import MIN_HEARTBEAT_S, ClientOptions
from .stream import BatchInfo, Delivery
from .wire import Sock

__all__ = ["CREDIT_POLL_MS", "Progress", "Receiver"]

#: While batches wait to be taken, look for consumed ones this often (ms) instead of being woken.
CREDIT_POLL_MS = 4
_PAGE = os.sysconf("SC_PAGE_SIZE")
_REQUIRED = ("x", "y", "index")


class Progress:
    """Batches the trainer has taken, counted by the trainer's thread and read by the receiver."""

    def __init__(self) -> None:
        self.consumed = 0


class Receiver:
    """The body of a stream's background thread (`run`)."""

    def __init__(self, sock: Sock, wake: Sock, out: queue.Queue[Delivery | BaseException],
                 peer: str, options: ClientOptions, welcome: Welcome, arena: Arena | None, norm: Normalization | None,
                 progress: Progress) -> None:
        self.sock, self.wake, self.out, self.peer = sock, wake, out, peer
        self.timeout_s = options.timeout_s
        assert options.heartbeat_s is not None
        self.heartbeat_s = max(MIN_HEARTBEAT_S, min(options.heartbeat_s, welcome.heartbeat_s))
        self.max_bytes = min(options.max_message_bytes, welcome.max_message_bytes)
        self.steps = welcome.steps_per_epoch
        self.start_epoch = welcome.epoch
        self.expect = (welcome.epoch, welcome.batch) if welcome.in_order else None
        self.arena, self.norm, self.progress = arena, norm, progress
        self.pool = BufferPool(keep=8)
        self.granted = options.prefetch  # batches the server may send, in all (the hello's credit, then Credit)
        self.received = 0
        self.credited = 0  # batches consumed and already credited back
        self.held: set[int] = set()  # arena slots the trainer still holds
        self.releases = _Releases()
        # ZeroMQ bounds frames, not messages: it buffers the frames of an unfinished message out of
        # sight. An honest server completes a message (a batch or a heartbeat) at least every
        # heartbeat; when none completed for longer and this process grew by more than a message
        # may hold, a message that never ends is filling memory.
        self.guard_after_s = 2 * welcome.heartbeat_s + 0.5
        self.guard_bytes = 2 * self.max_bytes + (64 << 20)
        self._handlers: dict[type[Message], Callable[[Any, list[Any]], None]] = {
            Batch: self._on_batch, Heartbeat: self._on_heartbeat, Error: self._on_end, Goodbye: self._on_end,
        }

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        poller.register(self.releases.read_fd, zmq.POLLIN)
        last_rx = last_tx = time.monotonic()
        hb_ms = max(1, int(self.heartbeat_s * 1000))
        linger = 0
        memory = _Memory()
        rss_at_rx = memory.rss()
        try:
            while True:
                # While batches wait here, look for consumed ones every few ms instead of being
                # woken by each next(): a wake-up per batch let this thread take the GIL just as
                # the trainer returned from next(), costing it 3-6 ms on a busy machine.
                waiting = self.progress.consumed > self.credited or not self.out.empty()
                events = dict(poller.poll(CREDIT_POLL_MS if waiting else hb_ms))
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
                        self._handlers[type(message)](message, frames)
                    if last_rx == now:
                        rss_at_rx = memory.rss()
                credits = self.progress.consumed - self.credited
                if credits:
                    wire.send(self.sock, Credit(n=credits), zmq.NOBLOCK)
                    self.credited += credits
                    self.granted += credits
                    last_tx = now
                elif now - last_tx >= self.heartbeat_s:
                    wire.send(self.sock, Ping(), zmq.NOBLOCK)
                    last_tx = now
                if now - last_rx > self.guard_after_s and memory.rss() - rss_at_rx > self.guard_bytes:
                    raise ProtocolError(
                        f"{self.peer} has not completed a message for {now - last_rx:.1f} s while this process "
                        f"grew by {(memory.rss() - rss_at_rx) >> 20} MiB, more than a message may hold "
                        f"({self.max_bytes} bytes): a message that never ends"
                    )
                if now - last_rx > self.timeout_s:
                    raise LoaderTimeoutError(
                        f"{self.peer} has been silent for {self.timeout_s:g} s (no complete message: no batch, "
                        "no heartbeat): it died, the network is down, or it sends a message that never ends"
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
        if index.ndim != 1 or index.dtype.kind not in "iu" or x.ndim == 0 or y.ndim == 0 \
                or not x.shape[0] == y.shape[0] == index.shape[0]:
            raise ProtocolError(f"batch from {self.peer} has x {x.shape}, y {y.shape} and index {index.shape} "
                                f"{index.dtype} that do not describe the same samples")
        if self.norm is not None:  # the uint8 view (and its slot) is released right here
            x = self.norm.apply(x, out=self.pool.get(x.shape, np.float32))
        extras = tuple(v for k, v in arrays.items() if k not in _REQUIRED)  # --collate arrays, in order
        self.out.put_nowait(Delivery(x, y, extras, BatchInfo(message.epoch, message.batch, index)))

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
        weakref.finalize(view, self.releases.release, slot)
        return name, view

    def _drain_releases(self) -> None:
        slots = self.releases.drain()
        self.held.difference_update(slots)
        for i in range(0, len(slots), MAX_RELEASE_SLOTS):
            wire.send(self.sock, Release(slots=slots[i:i + MAX_RELEASE_SLOTS]), zmq.NOBLOCK)


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
