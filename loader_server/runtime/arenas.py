"""Shared-memory arenas of sessions: creation, which slot is where, and handing the arena over.

A slot is free, being filled by a worker, or with the client (sent, not yet released). The
slot accounting is pure; `new_arena` and `close` are the only OS calls. The arena itself is an
anonymous memfd (`loader_client.contract.shm.create_arena`), named by the server, never by a peer.

A client reaches the arena in one of two ways. The same user in the same PID namespace opens
``/proc/<server pid>/fd/<fd>``. Any other client of an ``ipc://`` bind (another user, another
container, no shared PID namespace) asks the `ArenaChannel`: a unix socket beside the ipc
socket (`loader_client.contract.shm.arena_channel_path`, the same mode) that passes the descriptor
itself with SCM_RIGHTS, once, to whoever presents the arena's token. The token is 128 random
bits that only the session's own welcome carries, so a peer can get no arena but its own;
ZeroMQ's ipc transport cannot carry descriptors, hence the second socket.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from loader_client.contract.errors import ProtocolError
from loader_client.contract.messages import MAX_ARENA_SLOTS, ArenaHandle
from loader_client.contract.shm import ARENA_CHANNEL_REQUEST, ARENA_TOKEN_BYTES, create_arena

from .transport import start_janitor

__all__ = ["Arena", "ArenaChannel", "arena_slots", "new_arena"]

log = logging.getLogger("loader_server")

#: Slots beyond `prefetch`: those the client holds (in transit and in the trainer's hands).
CLIENT_SLOTS = 8


def arena_slots(prefetch: int, client_credit: int) -> int:
    """Slots for what may be outstanding: prefetch, the client's window (at most CLIENT_SLOTS), and 2
    (the trainer's current batch, one in release)."""
    return min(MAX_ARENA_SLOTS, prefetch + min(CLIENT_SLOTS, max(1, client_credit)) + 2)


@dataclass
class Arena:
    id: int
    fd: int
    inode: int
    slots: int
    stride: int
    free: deque[int]
    with_client: set[int] = field(default_factory=set)
    channel: ArenaChannel | None = None  # offers the descriptor to the session's client under `token`
    token: str | None = None

    def take(self) -> int | None:
        """A free slot for a new batch (the most recently freed: fewer distinct pages), or None."""
        return self.free.pop() if self.free else None

    def give_back(self, slot: int) -> None:
        """A slot whose batch was not sent (failed, dropped)."""
        self.free.append(slot)

    def hand_over(self, slot: int) -> None:
        """The slot's batch went to the client."""
        self.with_client.add(slot)

    def release(self, slots: Iterable[int]) -> None:
        """The client gave slots back; refuses slots it does not hold (nothing changes then)."""
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(s in self.with_client for s in slots):
            raise ProtocolError(f"release of slots {slots[:16]!r} that this client does not hold")
        for s in slots:
            self.with_client.discard(s)
            self.free.append(s)

    def handle(self) -> ArenaHandle:
        return ArenaHandle(id=self.id, pid=os.getpid(), fd=self.fd, inode=self.inode, slots=self.slots,
                           stride=self.stride, token=self.token)

    @property
    def nbytes(self) -> int:
        return self.slots * self.stride

    def close(self) -> None:
        if self.channel is not None and self.token is not None:
            self.channel.withdraw(self.token)  # before the fd number can be reused
        os.close(self.fd)


def new_arena(arena_id: int, slots: int, slot_bytes: int, channel: ArenaChannel | None = None) -> Arena | None:
    """A fresh arena, or None (logged) where shared memory cannot be had; offered on `channel` if given."""
    try:
        fd, stride = create_arena(f"loader-arena-{arena_id}", slots, slot_bytes)
    except OSError as exc:
        log.warning("no shared memory for a client (%s); sending frames over the socket", exc)
        return None
    arena = Arena(arena_id, fd, os.fstat(fd).st_ino, slots, stride, deque(range(slots)))
    if channel is not None:
        arena.channel, arena.token = channel, channel.offer(fd)
    return arena


#: How long one peer of the arena channel may take to send its request.
_CHANNEL_PEER_TIMEOUT_S = 1.0
_CHANNEL_LOG_INTERVAL_S = 60.0


class ArenaChannel:
    """Passes arena descriptors with SCM_RIGHTS over a unix socket at `path` (mode `mode`).

    One thread accepts one peer at a time; a peer gets at most `_CHANNEL_PEER_TIMEOUT_S` to send
    its request (``ARENA_CHANNEL_REQUEST`` + the token, one SOCK_SEQPACKET message), and the
    answer is ``ok`` with the descriptor, or ``no``. A token is good for one hand-over, and is
    withdrawn when its arena closes. The registry holds the server's own fd numbers: the event
    loop withdraws a token (under the lock) before it closes the fd, so a number that the kernel
    reuses is never passed.
    """

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self._offers: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refused = 0
        self._next_log = 0.0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o777 & ~mode)  # the file has `mode` from its first moment
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket of a killed server (the ipc bind replaces its own too)
            self._sock.bind(path)
        except OSError:
            self._sock.close()
            raise
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        start_janitor(path)
        self._thread = threading.Thread(target=self._serve, name="loader-arena-channel", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str, mode: int) -> ArenaChannel | None:
        """The channel at `path`, or None (logged) when it cannot be bound: clients then get frames
        unless they can open the arena through /proc."""
        try:
            return cls(path, mode)
        except OSError as exc:
            log.warning("cannot bind the shared-memory channel %s (%s): clients of another user or container get "
                        "frames over the socket", path, exc.strerror or exc)
            return None

    def offer(self, fd: int) -> str:
        """Register `fd` for one hand-over; returns the token its client presents (hex)."""
        token = secrets.token_bytes(ARENA_TOKEN_BYTES)
        with self._lock:
            self._offers[token] = fd
        return token.hex()

    def withdraw(self, token: str) -> None:
        with self._lock:
            self._offers.pop(bytes.fromhex(token), None)

    @property
    def offered(self) -> int:
        with self._lock:
            return len(self._offers)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)  # out of descriptors, for instance: try again shortly
                continue
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    pass  # the peer went away or was too slow: its loss alone

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(_CHANNEL_PEER_TIMEOUT_S)
        request = conn.recv(len(ARENA_CHANNEL_REQUEST) + 2 * ARENA_TOKEN_BYTES + 1)
        token = request.removeprefix(ARENA_CHANNEL_REQUEST)
        with self._lock:
            fd = self._offers.pop(_unhex(token), None) if request.startswith(ARENA_CHANNEL_REQUEST) else None
            if fd is not None:
                conn.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
                return
        conn.send(b"no")
        self._refused += 1
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + _CHANNEL_LOG_INTERVAL_S
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
            log.warning("shared-memory channel: refused %d request(s) without a valid token in the last minute "
                        "(the latest from pid %d, uid %d)", self._refused, pid, uid)
            self._refused = 0


def _unhex(token: bytes) -> bytes:
    try:
        return bytes.fromhex(token.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return b""
