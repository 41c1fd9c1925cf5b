"""The client: a generator of ``(x, y)`` batches received from a loader server.

A background thread owns the socket. It grants the server one credit per batch the trainer
takes (so at most `prefetch` batches are ever in transit or waiting here), pings the server
while the trainer is busy, and raises `LoaderTimeoutError` when the server has been silent
for `timeout_s`. Arrays are wrapped around the received frames without a copy, and are
writable.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import struct
import threading
import time
import weakref
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.utils.monitor

import dataclasses

from . import protocol
from .messages import HANDSHAKE_REPLIES, ArenaHandle, Error, Goodbye, Welcome
from .schema import decode
from .errors import ERROR_KINDS, AuthenticationError, LoaderError, LoaderTimeoutError, ProtocolError
from .normalize import BufferPool, Normalization
from .security import apply_curve
from .shm import Arena, shm_available

__all__ = ["LoaderClient", "BatchInfo", "batches", "health", "server_stats"]

_counter = itertools.count()
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILURES_TEXT = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
                            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security mechanism mismatch",
                            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed"}
_log = logging.getLogger("loader_client")
_STOP_JOIN_TIMEOUT_S = 5.0
_BYE_LINGER_MS = 200
_CREDIT_POLL_MS = 4


@dataclass(frozen=True)
class BatchInfo:
    """Where a batch sits in the stream, and which samples it holds."""

    epoch: int
    batch: int
    indices: np.ndarray


class LoaderClient:
    """Connects to a loader server and yields ``(x, y)`` batches, epoch after epoch.

    Example::

        with LoaderClient("tcp://127.0.0.1:5555") as client:
            model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=10, shuffle=False)

    `state` (from `state_dict()`) resumes a stream exactly where it stopped; `rank` and
    `world_size` select one data-parallel share of every epoch. `shared_memory` (default: on
    for ipc:// and loopback endpoints) lets a server on the same host hand over pixels through
    shared memory instead of the socket; it falls back to the socket when that is not possible.
    `normalize=True` (with optional per-channel `mean`/`std`) turns uint8 batches into float32
    ``(x / 255 - mean) / std`` on this host's background thread, keeping uint8 on the wire.
    `log_epochs=True` logs one line per epoch with the time the trainer waited for data.
    `augment=False` asks for no augmentation (a validation stream from a training server).

    A list of endpoints merges several servers (see `loader_client.hosts`: `on_server_loss`
    says what losing one does, `merge` whether the order is deterministic or follows each
    server's speed; both mean nothing for one server). `server_public_key` and `client_keys`
    (public, secret; Z85 text or a path to a key file from `loader-server keygen`) connect to
    a CURVE server.
    """

    def __new__(cls, endpoint: str | list[str] | tuple[str, ...], *args: Any, **kwargs: Any) -> LoaderClient:
        if cls is LoaderClient and isinstance(endpoint, (list, tuple)) and len(endpoint) > 1:
            if kwargs.get("on_server_loss") == "continue":  # the old drop-the-share merge
                from .multi import MultiServerClient

                return super().__new__(MultiServerClient)
            from .hosts import LoaderHosts  # fail-over (default) or raise; ordered or balanced merge

            return super().__new__(LoaderHosts)
        return super().__new__(cls)

    def __init__(
        self,
        endpoint: str | list[str] | tuple[str, ...],
        *,
        timeout_s: float = 30.0,
        prefetch: int = 4,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        state: dict[str, Any] | None = None,
        heartbeat_s: float | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        name: str | None = None,
        shared_memory: bool | None = None,
        normalize: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        log_epochs: bool = False,
        on_server_loss: str = "failover",
        merge: str = "ordered",
        server_public_key: str | bytes | None = None,
        client_keys: tuple[str | bytes, str | bytes] | None = None,
        augment: bool = True,
    ) -> None:
        if isinstance(endpoint, (list, tuple)):
            if len(endpoint) != 1:
                raise ValueError("`endpoint` must name at least one server")
            endpoint = endpoint[0]
        if timeout_s <= 0:
            raise ValueError(f"`timeout_s` must be > 0, got {timeout_s}")
        if prefetch < 1:
            raise ValueError(f"`prefetch` must be >= 1, got {prefetch}")
        if heartbeat_s is None:
            heartbeat_s = min(1.0, timeout_s / 3)
        if heartbeat_s <= 0 or heartbeat_s >= timeout_s:
            raise ValueError(f"`heartbeat_s` must be > 0 and below `timeout_s`, got {heartbeat_s}")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.prefetch = prefetch
        self.last: BatchInfo | None = None
        self.wait_s = 0.0  # total time the trainer spent waiting in next()
        self.batches_taken = 0
        self.log_epochs = log_epochs
        self._created = time.monotonic()
        self._epoch_mark = (self._created, 0.0, 0)  # (start time, wait_s, batches) of the current epoch
        self._closed = False
        self._failure: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._arena: Arena | None = None
        if shared_memory is None:
            shared_memory = _same_host(endpoint)
        shared_memory = shared_memory and shm_available()
        epoch = batch = 0
        fingerprint = None
        if state is not None:
            epoch, batch, fingerprint = _parse_state(state)
            seed = state["seed"]
            rank, world_size = state.get("rank", rank), state.get("world_size", world_size)

        self._ctx = zmq.Context()
        self._monitor: zmq.Socket | None = None
        self._curve = bool(server_public_key)
        self._curve_keys = {"server_public_key": server_public_key, "client_keys": client_keys}
        self._sock = self._new_socket(max_message_bytes)
        self._wake_tx = self._ctx.socket(zmq.PAIR)
        self._wake_rx = self._ctx.socket(zmq.PAIR)
        for s in (self._wake_tx, self._wake_rx):
            s.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.connect(endpoint)
            wake = f"inproc://loader-client-wake-{next(_counter)}"
            self._wake_rx.bind(wake)
            self._wake_tx.connect(wake)
            hello: dict[str, Any] = {"rank": rank, "world_size": world_size, "epoch": epoch, "batch": batch,
                                     "seed": seed, "fingerprint": fingerprint, "credit": prefetch,
                                     "shm": bool(shared_memory), "augment": augment}
            if name:
                hello["client"] = name
            self._sock.send(protocol.pack("hello", **hello))
            meta = self._handshake()
            if meta.get("shm"):
                self._arena = _open_arena(meta["shm"])
                if self._arena is None:  # not the same host or user after all: frames over the socket
                    # A new socket (a new identity): nothing queued for the first stream can arrive
                    # in the second one's handshake.
                    self._sock.send(protocol.pack("bye"))
                    self._stop_monitor()
                    self._sock.close(linger=_BYE_LINGER_MS)
                    self._sock = self._new_socket(max_message_bytes)
                    self._sock.connect(endpoint)
                    self._sock.send(protocol.pack("hello", **{**hello, "shm": False}))
                    meta = self._handshake()
        except BaseException:
            self._stop_monitor()
            self._close_sockets()
            raise
        self._stop_monitor()
        self.info: dict[str, Any] = meta
        self.num_samples: int = meta["num_samples"]
        self.batch_size: int = meta["batch_size"]
        self.steps_per_epoch: int = meta["steps_per_epoch"]
        self.class_names: list[str] | None = meta["class_names"]
        self.num_classes: int | None = _num_classes(meta)  # class names, else max label + 1
        self.x_shape: tuple[int, ...] = tuple(meta["x_shape"])
        self.x_dtype = np.dtype(meta["x_dtype"])
        norm = None
        if normalize or mean is not None or std is not None:
            if self.x_dtype != np.uint8:
                self._abort()
                raise ValueError(f"normalize=True needs uint8 batches; the server sends {self.x_dtype} already")
            layout = meta.get("layout", "hwc")
            channels = self.x_shape[0] if layout == "chw" else self.x_shape[-1]
            try:
                norm = Normalization(channels, layout, mean, std)
            except ValueError:
                self._abort()
                raise
            self.x_dtype = np.dtype(np.float32)
        self.seed: int = meta["seed"]
        self.rank: int = meta["rank"]
        self.world_size: int = meta["world_size"]
        self.fingerprint: str = meta["fingerprint"]
        self._in_order: bool = meta["in_order"]
        self._epoch, self._batch = meta["epoch"], meta["batch"]  # next batch the trainer gets
        self._queue: queue.Queue[Any] = queue.Queue()
        self._progress = _Progress()
        self._thread = threading.Thread(
            target=_Receiver(self._sock, self._wake_rx, self._queue, endpoint, self.timeout_s,
                             min(heartbeat_s, meta["heartbeat_s"]), max_message_bytes,
                             (self._epoch, self._batch, self.steps_per_epoch) if self._in_order else None,
                             self._arena, norm, self._progress).run,
            name=f"loader-client-{endpoint}",
            daemon=True,
        )
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def __iter__(self) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """Yield ``(x, y)`` forever, epoch after epoch (a real generator, as Keras requires)."""
        while True:
            yield self.next()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self) -> Generator[tuple[np.ndarray, np.ndarray], None, None]:
        """Yield the batches left in the current epoch: all `steps_per_epoch` at an epoch start."""
        for _ in range(self.steps_per_epoch - self._batch):
            yield self.next()

    def next(self) -> tuple[np.ndarray, ...]:
        """Return the next ``(x, y)`` (plus the server's --collate arrays, in order, if any).

        Raises the server's error or `LoaderTimeoutError`.
        """
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
            raise item
        x, y, info, extras = item
        self._progress.consumed += 1  # the receiver returns a credit for it within _CREDIT_POLL_MS
        if self._queue.empty():  # nothing left here: wake the receiver to ask for more now
            try:
                self._wake_tx.send(b"c", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self.last = info
        self.batches_taken += 1
        self._epoch, self._batch = info.epoch, info.batch + 1
        if self._batch >= self.steps_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
            self._end_of_epoch(info.epoch)
        return (x, y, *extras) if extras else (x, y)

    def _end_of_epoch(self, epoch: int) -> None:
        started, waited, taken = self._epoch_mark
        now = time.monotonic()
        self._epoch_mark = (now, self.wait_s, self.batches_taken)
        if self.log_epochs:
            wall, wait = now - started, self.wait_s - waited
            _log.info("epoch %d: %d batches in %.1f s; waited %.2f s for data (%.1f%% stall)",
                      epoch, self.batches_taken - taken, wall, wait, 100 * wait / max(wall, 1e-9))

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        """The trainer's side (data stall: the time spent waiting in next()) and the server's stats.

        A stall fraction near 0 means the loader keeps up; a large one means the trainer waits
        for data: add workers or loader hosts.
        """
        wall = time.monotonic() - self._created
        out: dict[str, Any] = {
            "batches_taken": self.batches_taken, "wait_s": self.wait_s, "wall_s": wall,
            "stall_fraction": self.wait_s / max(wall, 1e-9), "position": list(self.position),
            "shared_memory": self.shared_memory, "endpoint": self.endpoint,
        }
        if server:
            out["server"] = server_stats(self.endpoint, timeout_s=self.timeout_s, **self._curve_keys)
        return out

    @property
    def shared_memory(self) -> bool:
        """True when batches arrive through shared memory rather than over the socket."""
        return self._arena is not None

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch)`` of the next batch `next()` returns."""
        return self._epoch, self._batch

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable state; ``LoaderClient(endpoint, state=...)`` resumes there."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.fingerprint}

    def _abort(self) -> None:
        """Say goodbye and close the sockets when construction fails after the handshake."""
        try:
            self._sock.send(protocol.pack("bye"), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._close_sockets()
        self._closed = True

    def close(self) -> None:
        """Stop the receiver thread, say goodbye to the server, release the sockets.

        The goodbye gets `_BYE_LINGER_MS` to leave (so the server frees this stream at once);
        everything else is dropped (linger 0).
        """
        if self._closed:
            return
        self._closed = True
        joined = True
        if self._thread is not None and self._thread.is_alive():
            try:
                self._wake_tx.send(b"x", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._thread.join(_STOP_JOIN_TIMEOUT_S)
            joined = not self._thread.is_alive()
        self._close_sockets(joined)

    def __enter__(self) -> LoaderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ctx", None) is not None and not getattr(self, "_closed", True):
            self.close()

    # ------------------------------------------------------------------ internals
    def _new_socket(self, max_message_bytes: int) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, max(1000, 4 * self.prefetch))
        sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT and other IPv6 endpoints
        apply_curve(sock, *self._curve_keys.values())
        return sock

    def _handshake(self) -> dict[str, Any]:
        """Wait for the welcome; a failed security handshake shows up on the monitor at once.

        Each monitor gets an address of its own: pyzmq's default one, named after the socket's
        file descriptor, can still be taken when a socket is replaced.
        """
        deadline = time.monotonic() + self.timeout_s
        if self._monitor is None:
            address = f"inproc://loader-client-monitor-{next(_counter)}"  # unique: never reused
            self._sock.monitor(address, _HANDSHAKE_FAILURES)
            self._monitor = self._ctx.socket(zmq.PAIR)
            self._monitor.connect(address)
        monitor = self._monitor
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            ready = dict(poller.poll(max(0, remaining_ms)))
            if monitor in ready:
                event = zmq.utils.monitor.recv_monitor_message(monitor)["event"]
                raise AuthenticationError(
                    f"the loader server at {self.endpoint} refused the connection during the handshake "
                    f"({_HANDSHAKE_FAILURES_TEXT.get(event, event)}): "
                    + ("check server_public_key, and that your public key is in the server's allow-list"
                       if self._curve else "it requires CURVE: pass server_public_key and client_keys")
                )
            if self._sock not in ready:
                raise LoaderTimeoutError(
                    f"no answer from the loader server at {self.endpoint} within {self.timeout_s:g} s: "
                    f"is it running? Start it with `loader-server serve --data PATH --bind {self.endpoint}`, "
                    "or raise timeout_s if it is slow to start"
                    + ("; with CURVE, check the keys" if self._curve else "")
                )
            meta = self._read_handshake_reply()
            if meta is not None:
                return meta

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _read_handshake_reply(self) -> dict[str, Any] | None:
        """The metadata of a welcome; None for a heartbeat; raises on anything else."""
        frames = self._sock.recv_multipart(copy=False)
        header = protocol.unpack(frames[0])
        protocol.check_version(header, peer=f"the server at {self.endpoint}")
        message = decode(header, HANDSHAKE_REPLIES, f"from {self.endpoint}")
        if isinstance(message, Error):
            raise _remote_error(message.fields())
        if isinstance(message, Goodbye):
            raise LoaderError(f"the loader server at {self.endpoint} is stopping: {message.reason}")
        if isinstance(message, Welcome):
            return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
        return None

    def _close_sockets(self, receiver_done: bool = True) -> None:
        if self._arena is not None and receiver_done:
            self._arena.close()
        if receiver_done:
            self._sock.close(linger=_BYE_LINGER_MS)
            for s in (self._wake_rx, self._wake_tx):
                s.close(linger=0)
            self._ctx.term()
        else:  # the receiver is stuck: tear everything down from here
            self._ctx.destroy(linger=0)


class _Receiver:
    """Runs on the background thread; owns the DEALER socket once the handshake is done."""

    def __init__(self, sock: zmq.Socket, wake: zmq.Socket, out: queue.Queue[Any], endpoint: str,
                 timeout_s: float, heartbeat_s: float, max_bytes: int,
                 expect: tuple[int, int, int] | None, arena: Arena | None, norm: Normalization | None,
                 progress: _Progress) -> None:
        self.sock, self.wake, self.out = sock, wake, out
        self.endpoint, self.timeout_s, self.heartbeat_s, self.max_bytes = endpoint, timeout_s, heartbeat_s, max_bytes
        self.expect = expect  # (epoch, batch, steps) of the next batch in in-order mode
        self.arena = arena
        self.norm = norm
        self.pool = BufferPool(keep=8)
        self.progress = progress
        self.credited = 0  # batches consumed and already credited back to the server
        self.releases = _Releases()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        poller.register(self.releases.read_fd, zmq.POLLIN)
        last_rx = last_tx = time.monotonic()
        hb_ms = max(1, int(self.heartbeat_s * 1000))
        try:
            while True:
                # While batches wait here, look for consumed ones every few ms instead of being
                # woken by each next(): a wake-up per batch let this thread take the GIL just as
                # the trainer returned from next(), costing it 3-6 ms on a busy machine.
                waiting = self.progress.consumed > self.credited or not self.out.empty()
                events = dict(poller.poll(_CREDIT_POLL_MS if waiting else hb_ms))
                now = time.monotonic()
                if self.releases.read_fd in events:
                    self._drain_releases()
                if self.wake in events:
                    while True:
                        try:
                            msg = self.wake.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if msg == b"x":
                            self._send("bye")
                            return
                if self.sock in events:
                    last_rx = now
                    while True:
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                credits = self.progress.consumed - self.credited
                if credits:
                    self._send("credit", n=credits)
                    self.credited += credits
                    last_tx = now
                elif now - last_tx >= self.heartbeat_s:
                    self._send("ping")
                    last_tx = now
                if now - last_rx > self.timeout_s:
                    raise LoaderTimeoutError(
                        f"the loader server at {self.endpoint} has been silent for {self.timeout_s:g} s "
                        "(no batch, no heartbeat): it died or the network is down"
                    )
        except LoaderError as exc:
            self.out.put(exc)
        except Exception as exc:  # never die silently: the trainer would wait forever
            self.out.put(LoaderError(f"client receiver failed: {type(exc).__name__}: {exc}"))
        finally:
            self.releases.close()

    def _from_arena(self, shm: Any) -> dict[str, np.ndarray]:
        """Wrap the arrays in their shared-memory slot without a copy.

        The slot goes back to the server when the last reference to the array (or to any view
        or tensor made from it) is gone: a finalizer writes the slot number to a pipe that this
        thread watches. A trainer that holds on to batches only makes the server fall back to
        frames over the socket, never stall.
        """
        if self.arena is None or not isinstance(shm, dict) or not isinstance(shm.get("arrays"), list):
            raise ProtocolError("batch refers to shared memory this client did not ask for")
        slot = shm.get("slot")
        if len(shm["arrays"]) != 1:
            raise ProtocolError("a shared-memory slot holds exactly one array")
        item = shm["arrays"][0]
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
            raise ProtocolError(f"shared-memory array description {item!r} is not [name, dtype, shape]")
        name, dtype, shape = item
        view = self.arena.view(slot, dtype, shape)
        weakref.finalize(view, self.releases.release, slot)
        return {name: view}

    def _drain_releases(self) -> None:
        slots = self.releases.drain()
        if slots:
            self._send("release", slots=slots)

    def _send(self, t: str, **fields: Any) -> None:
        try:
            self.sock.send(protocol.pack(t, **fields), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the server is gone; the silence timeout reports it

    def _handle(self, frames: list[Any]) -> None:
        header = protocol.unpack(frames[0])
        protocol.check_version(header, peer=f"the server at {self.endpoint}")
        kind = header["t"]
        if kind == "heartbeat":
            return
        if kind == "error":
            raise _remote_error(header)
        if kind == "goodbye":
            raise LoaderError(f"the loader server at {self.endpoint} was stopped: {header.get('reason')}")
        if kind != "batch":
            raise ProtocolError(f"unexpected message {kind!r} from {self.endpoint}")
        epoch, batch = header.get("epoch"), header.get("batch")
        if not (isinstance(epoch, int) and isinstance(batch, int)):
            raise ProtocolError("batch header lacks integer 'epoch' and 'batch'")
        arrays = protocol.build_arrays(header.get("arrays"), frames[1:], max_bytes=self.max_bytes)
        shm = header.get("shm")
        if shm is not None:
            arrays.update(self._from_arena(shm))
        if not {"x", "y", "index"} <= arrays.keys():
            raise ProtocolError(f"batch lacks arrays x, y and index: got {sorted(arrays)}")
        if self.expect is not None:
            e, b, steps = self.expect
            if (epoch, batch) != (e, b):
                raise ProtocolError(f"expected epoch {e} batch {b} from {self.endpoint}, got epoch {epoch} "
                                    f"batch {batch}: a batch was lost or repeated")
            self.expect = (e, b + 1, steps) if b + 1 < steps else (e + 1, 0, steps)
        if self.norm is not None:  # the uint8 view (and its slot) is released right here
            x = arrays["x"]
            arrays["x"] = self.norm.apply(x, out=self.pool.get(x.shape, np.float32))
        extras = tuple(v for k, v in arrays.items() if k not in ("x", "y", "index"))  # --collate arrays
        self.out.put((arrays["x"], arrays["y"], BatchInfo(epoch, batch, arrays["index"]), extras))


class _Progress:
    """Batches the trainer has taken, counted by next() and read by the receiver thread."""

    def __init__(self) -> None:
        self.consumed = 0


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


def _same_host(endpoint: str) -> bool:
    """ipc:// and loopback tcp:// endpoints are on this host."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _open_arena(handle: ArenaHandle) -> Arena | None:
    """Map the server's arena, or None if this process cannot reach it."""
    try:
        if os.stat(handle.path).st_ino != handle.inode:
            return None
        return Arena(handle.path, handle.slots, handle.stride, writable=True)
    except (OSError, ValueError, TypeError, ProtocolError):
        return None


def _remote_error(header: dict[str, Any]) -> LoaderError:
    kind = header.get("kind")
    cls = ERROR_KINDS.get(kind if isinstance(kind, str) else "", LoaderError)
    message = str(header.get("message", "unknown error"))
    tb = header.get("traceback")
    if isinstance(tb, str) and tb:
        message += "\n--- worker traceback ---\n" + tb.rstrip()
    err = cls(message)
    err.path = header.get("path")  # type: ignore[attr-defined]
    err.reason = header.get("reason")  # type: ignore[attr-defined]
    return err


_META_TYPES: dict[str, type | tuple[type, ...]] = {
    "num_samples": int, "batch_size": int, "steps_per_epoch": int, "rank": int, "world_size": int,
    "seed": int, "epoch": int, "batch": int, "in_order": bool, "x_shape": list, "x_dtype": str,
    "class_names": (list, type(None)), "fingerprint": str, "heartbeat_s": (int, float),
}


def _num_classes(meta: dict[str, Any]) -> int | None:
    """The welcome's `num_classes`: a positive int, or None (labels that are not classes, older server)."""
    n = meta.get("num_classes")
    if n is None:
        return len(meta["class_names"]) if meta["class_names"] else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ProtocolError(f"welcome metadata field 'num_classes' must be a positive int or None, got {n!r}")
    return n


def _check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise ProtocolError("welcome carries no metadata map")
    for key, types in _META_TYPES.items():
        if not isinstance(meta.get(key), types):
            raise ProtocolError(f"welcome metadata field {key!r} is missing or has the wrong type")
    _num_classes(meta)  # validated here, where a bad welcome still closes the sockets
    return meta


def _parse_state(state: dict[str, Any]) -> tuple[int, int, str | None]:
    try:
        epoch, batch, seed = state["epoch"], state["batch"], state["seed"]
    except (KeyError, TypeError):
        raise ValueError("`state` must come from LoaderClient.state_dict(): it needs epoch, batch and seed") from None
    if not all(isinstance(v, int) and v >= 0 for v in (epoch, batch, seed)):
        raise ValueError(f"`state` epoch, batch and seed must be non-negative ints, got {epoch}, {batch}, {seed}")
    fp = state.get("fingerprint")
    return epoch, batch, fp if isinstance(fp, str) else None


def batches(endpoint: str, **kwargs: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Plain generator of ``(x, y)``: the drop-in for a classic ``train_data(...)`` generator.

    Keyword arguments go to `LoaderClient`; the connection closes with the generator.
    """
    with LoaderClient(endpoint, **kwargs) as client:
        yield from client


def health(endpoint: str, *, timeout_s: float = 5.0, **curve: Any) -> dict[str, Any]:
    """Ask a server whether it is up and has a ready worker, without opening a stream.

    Returns the server's answer (``ok``, ``workers_ready``, ``clients``, ...); raises
    `LoaderTimeoutError` if it does not answer within `timeout_s`. `curve`: `server_public_key`
    and `client_keys`, as for `LoaderClient`.
    """
    return _ask(endpoint, "health", timeout_s, **curve)


def server_stats(endpoint: str, *, timeout_s: float = 5.0, **curve: Any) -> dict[str, Any]:
    """The server's statistics: images/s and batches/s over the last minute, batches ready,
    per-worker state and busy fraction, errors by reason, bytes sent, clients, uptime and the
    configuration fingerprint. Opens no stream."""
    answer = _ask(endpoint, "stats", timeout_s, **curve)
    if not isinstance(answer.get("stats"), dict):
        raise ProtocolError(f"stats answer from {endpoint} carries no stats map")
    return answer["stats"]


def _ask(endpoint: str, t: str, timeout_s: float, server_public_key: Any = None,
         client_keys: Any = None) -> dict[str, Any]:
    """One request that needs no session, on a socket of its own."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_HEADER_BYTES)
    sock.setsockopt(zmq.IPV6, 1)
    apply_curve(sock, server_public_key, client_keys)
    try:
        sock.connect(endpoint)
        sock.send(protocol.pack(t))
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0 and sock.poll(int(remaining * 1000) + 1):
            frames = sock.recv_multipart()
            header = protocol.unpack(frames[0])
            protocol.check_version(header, peer=f"the server at {endpoint}")
            if header["t"] == "error":
                raise _remote_error(header)
            if header["t"] == t:
                return {k: v for k, v in header.items() if k not in ("v", "t")}
        raise LoaderTimeoutError(f"no {t} answer from {endpoint} within {timeout_s:g} s")
    finally:
        sock.close(linger=0)
        ctx.term()
