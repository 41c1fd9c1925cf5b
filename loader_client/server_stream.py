"""One server's stream: the handshake, the background receiver, and the trainer's side of its queue.

`ServerStream` owns a ZeroMQ context, its socket (handed to the `Receiver` thread after the
handshake) and a bounded queue of received batches. `take()` returns the next `Delivery`; an
error from the receiver is raised there, once the stream's thread has stopped and its
sockets are closed, and again on every later call. It implements the `Stream` protocol
(stream.py): `LoaderClient` holds one of these, or a `HostsStream` made of several.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
import weakref
from typing import Any

import numpy as np
import zmq

from . import wire
from .contract.errors import ConfigError, LoaderError, LoaderTimeoutError
from .contract.messages import Bye
from .contract.normalize import Normalization
from .endpoints import Endpoint
from .handshake import BYE_LINGER_MS, open_stream
from .options import ClientOptions, Start
from .queries import server_stats
from .receiver import Progress, Receiver
from .stream import Delivery, Servers

__all__ = ["ServerStream"]

_counter = itertools.count()
_STOP_JOIN_TIMEOUT_S = 5.0
_open_streams: weakref.WeakSet[ServerStream] = weakref.WeakSet()


class ServerStream:
    """The batches of one server, for one rank: position, state and statistics of that stream."""

    def __init__(self, endpoint: Endpoint, options: ClientOptions, start: Start) -> None:
        self.endpoint = str(endpoint)
        self.lost: list[dict[str, Any]] = []  # one server: its loss is the stream's error, raised by take()
        self.options = options
        self.timeout_s = float(options.timeout_s)
        self.prefetch = options.prefetch
        self.wait_s = 0.0  # total time the trainer spent waiting in take()
        self.batches_taken = 0
        self._created = time.monotonic()
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ctx = zmq.Context()
        try:
            opened = open_stream(self._ctx, endpoint, options, start)
        except BaseException:
            self._ctx.destroy(linger=0)
            self._closed = True
            raise
        self._sock = opened.sock
        self.welcome = welcome = opened.welcome
        self._arena = opened.arena
        self.x_dtype = np.dtype(welcome.x_dtype)
        try:
            norm = self._normalization(options)
        except BaseException:
            wire.send(self._sock, Bye(), zmq.NOBLOCK)
            self._sock.close(linger=BYE_LINGER_MS)
            self._ctx.term()
            self._closed = True
            raise
        self.info: dict[str, Any] = welcome.fields()
        self._epoch, self._batch = welcome.epoch, welcome.batch  # the next batch take() returns
        self._queue: queue.Queue[Delivery | BaseException] = queue.Queue(maxsize=options.prefetch + 1)
        self._progress = Progress()
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        wake_rx = self._ctx.socket(zmq.PAIR)
        for s in (self._wake_tx, wake_rx):
            s.setsockopt(zmq.LINGER, 0)
        wake = f"inproc://loader-client-wake-{next(_counter)}"
        wake_rx.bind(wake)
        self._wake_tx.connect(wake)
        receiver = Receiver(opened.sock, wake_rx, self._queue, f"the loader server at {endpoint}", options, welcome,
                            self._arena, norm, self._progress)
        self._thread = threading.Thread(target=receiver.run, name=f"loader-client-{endpoint}", daemon=True)
        self._thread.start()
        _open_streams.add(self)

    def _normalization(self, options: ClientOptions) -> Normalization | None:
        if not (options.normalize or options.mean is not None or options.std is not None):
            return None
        if self.x_dtype != np.uint8:
            raise ConfigError(f"normalize=True needs uint8 batches; the server sends {self.x_dtype} already")
        layout = self.welcome.layout
        shape = self.welcome.x_shape
        channels = shape[0] if layout == "chw" else shape[-1]
        norm = Normalization(channels, layout, options.mean, options.std)
        self.x_dtype = np.dtype(np.float32)
        return norm

    # ------------------------------------------------------------------ the trainer's side
    def take(self) -> Delivery:
        """The next batch; raises the server's error, a `ProtocolError`, or `LoaderTimeoutError`."""
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise LoaderError("the client is closed")
        started = time.perf_counter()
        try:
            item = self._queue.get(timeout=self.timeout_s * 2)  # the receiver times out first
        except queue.Empty:
            item = LoaderTimeoutError(f"no batch from {self.endpoint} within {self.timeout_s * 2:.0f} s")
        self.wait_s += time.perf_counter() - started
        if isinstance(item, BaseException):
            self._failure = item
            self.close()
            raise item
        self._progress.consumed += 1  # the receiver returns a credit for it within CREDIT_POLL_MS
        if self._queue.empty():  # nothing left here: wake the receiver to ask for more now
            try:
                self._wake_tx.send(b"c", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.batches_taken += 1
        self._epoch, self._batch = item.info.epoch, item.info.batch + 1
        if self._batch >= self.steps_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return item

    # ------------------------------------------------------------------ metadata and state
    @property
    def steps_per_epoch(self) -> int:
        return self.welcome.steps_per_epoch

    @property
    def shared_memory(self) -> bool:
        """True when batches arrive through shared memory rather than over the socket."""
        return self._arena is not None

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch)`` of the next batch `take()` returns."""
        return self._epoch, self._batch

    @property
    def servers(self) -> Servers:
        return Servers((self.endpoint,), (self.endpoint,))

    @property
    def alive(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def state_dict(self) -> dict[str, Any]:
        w = self.welcome
        return {"epoch": self._epoch, "batch": self._batch, "seed": w.seed, "rank": w.rank,
                "world_size": w.world_size, "fingerprint": w.fingerprint}

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        wall = time.monotonic() - self._created
        out: dict[str, Any] = {
            "batches_taken": self.batches_taken, "wait_s": self.wait_s, "wall_s": wall,
            "stall_fraction": self.wait_s / max(wall, 1e-9), "position": list(self.position),
            "shared_memory": self.shared_memory, "endpoint": self.endpoint,
        }
        if server:
            out["server"] = server_stats(self.endpoint, timeout_s=self.timeout_s,
                                         server_public_key=self.options.server_public_key,
                                         client_keys=self.options.client_keys)
        return out

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop the receiver thread (it says goodbye to the server), release the sockets.

        The goodbye gets `BYE_LINGER_MS` to leave (so the server frees this stream at once);
        everything else is dropped (linger 0).
        """
        if self._closed:
            return
        self._closed = True
        _open_streams.discard(self)
        joined = True
        if self._thread is not None and self._thread.is_alive():
            try:
                self._wake_tx.send(b"x", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._thread.join(_STOP_JOIN_TIMEOUT_S)
            joined = not self._thread.is_alive()
        if self._arena is not None:
            self._arena.close()
        if joined:  # the receiver closed its own sockets
            self._wake_tx.close(linger=0)
            self._ctx.term()
        else:  # the receiver is stuck: tear everything down from here
            self._ctx.destroy(linger=0)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


@atexit.register
def _close_open_streams() -> None:
    """A trainer's normal exit (or Ctrl-C) says goodbye, so the server logs a normal departure."""
    for stream in list(_open_streams):
        stream.close()
