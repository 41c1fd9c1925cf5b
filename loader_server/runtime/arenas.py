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
from loader_client.contract.messages import MAX_ARENA_KEYS, MAX_ARENA_SLOTS, ArenaHandle
from loader_client.contract.shm import (
    ARENA_CHANNEL_REQUEST,
    ARENA_TOKEN_BYTES,
    arena_key,
    create_arena,
    write_arena_key,
)

from ..logs import Throttle
from .processes import PeerProcesses
from .transport import start_janitor

__all__ = ["Arena", "ArenaChannel", "LeftBehind", "arena_slots", "new_arena", "share_arena_slots"]

log = logging.getLogger("loader_server")

#: Slots beyond `prefetch`: those the client holds (in transit and in the trainer's hands).
CLIENT_SLOTS = 8


def arena_slots(prefetch: int, client_credit: int) -> int:
    """Slots for what may be outstanding: prefetch, the client's window (at most CLIENT_SLOTS), and 2
    (the trainer's current batch, one in release)."""
    return min(MAX_ARENA_SLOTS, prefetch + min(CLIENT_SLOTS, max(1, client_credit)) + 2)


#: Members whose private batches (built while they are behind, held by a paused trainer, left
#: behind by one that crashed) a share's arena has room for beyond its window; past that, batches
#: go as frames over the socket, never waiting for a slot.
SHARE_ARENA_MEMBERS = 8


def share_arena_slots(prefetch: int, window: int) -> int:
    """Slots of a share's arena: the pack's batches (its window, what is being built, what the clients
    hold) and the private batches of `SHARE_ARENA_MEMBERS` members."""
    per_member = prefetch + CLIENT_SLOTS + 2
    return min(MAX_ARENA_SLOTS, window + per_member * (1 + SHARE_ARENA_MEMBERS))


@dataclass
class LeftBehind:
    """The slots a client still held when it left, and the processes that may still read them."""

    slots: set[int]
    processes: PeerProcesses


@dataclass
class Arena:
    """One memfd of `slots` slots, and who holds each slot.

    A slot is *kept* by the server (being filled by a worker; built and waiting to be sent; in a
    share's window) and *with* each client it was sent to until that client releases it. It is
    free again when nobody keeps or holds it: the same slot may be with several clients at once
    (the members of a share), and it is freed when the last one releases it. A slot that a client
    still held when it left is an *orphan*: that process may still read it, so it is not reused
    until every process that could (`PeerProcesses`, processes.py) is known to have exited
    (`reclaim`), or the arena closes. A client whose processes cannot be told leaves its slots
    orphaned until the arena closes.
    """

    id: int
    fd: int
    inode: int
    slots: int
    stride: int
    free: deque[int]
    kept: set[int] = field(default_factory=set)
    with_clients: dict[int, set[bytes]] = field(default_factory=dict)
    orphans: set[int] = field(default_factory=set)
    channel: ArenaChannel | None = None  # offers the descriptor to the session's client under `token`
    token: str | None = None
    tokens: list[str] = field(default_factory=list)  # every token offered (one per client of a shared arena)
    key_slots: dict[bytes, int] = field(default_factory=dict)  # a share's members: client -> its key's entry
    left: list[LeftBehind] = field(default_factory=list)  # what clients that left still held, and who they were
    reclaimed: int = 0  # orphaned slots given back since the arena opened (their processes exited)
    dry: bool = False  # the last `take` found no free slot
    dry_spells: int = 0  # times it ran out (the first is a warning, later ones info lines)

    def take(self) -> int | None:
        """A free slot for a new batch, kept by the server (the most recently freed: fewer distinct
        pages), or None."""
        self.dry = not self.free
        if self.dry:
            return None
        slot = self.free.pop()
        self.kept.add(slot)
        return slot

    def give_back(self, slot: int) -> None:
        """The server no longer keeps `slot` (its batch was sent, dropped or failed)."""
        self.kept.discard(slot)
        self._settle(slot)

    def hand_over(self, slot: int, client: bytes) -> None:
        """The slot's batch went to `client`, which holds it until it releases it."""
        self.with_clients.setdefault(slot, set()).add(client)

    def release(self, slots: Iterable[int], client: bytes = b"") -> None:
        """`client` gave slots back; refuses slots it does not hold (nothing changes then)."""
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(client in self.with_clients.get(s, ()) for s in slots):
            raise ProtocolError(f"release of slots {slots[:16]!r} that this client does not hold")
        for s in slots:
            self.with_clients[s].discard(client)
            self._settle(s)

    def add_key(self, client: bytes, key: str | None) -> int | None:
        """Write `client`'s hello key (hex) into a free entry of the key table; its entry, or None
        when the client gave no key or every entry is taken (that client then takes frames)."""
        raw = arena_key(key)
        used = set(self.key_slots.values())
        free = next((k for k in range(MAX_ARENA_KEYS) if k not in used), None)
        if raw is None or free is None:
            return None
        write_arena_key(self.fd, self.slots, self.stride, free, raw)
        self.key_slots[client] = free
        return free

    def forget(self, client: bytes, processes: PeerProcesses | None = None) -> None:
        """`client` left: the slots it still held are orphans until `processes` (the client's, as the
        kernel told them) have all exited (`reclaim`); never reused without them. Its key is erased."""
        key_slot = self.key_slots.pop(client, None)
        if key_slot is not None:
            write_arena_key(self.fd, self.slots, self.stride, key_slot, None)
        held = set()
        for slot, holders in self.with_clients.items():
            if client in holders:
                holders.discard(client)
                held.add(slot)
        if held:
            self.orphans |= held
            self.left.append(LeftBehind(held, processes or PeerProcesses()))

    def reclaim(self) -> int:
        """Give back the orphans of clients whose processes have all exited; how many slots are no longer
        orphans (free now, unless the server keeps them or another client holds them)."""
        gone = [i for i, left in enumerate(self.left) if left.processes.gone()]
        if not gone:
            return 0
        for i in reversed(gone):
            del self.left[i]
        still = set().union(*(left.slots for left in self.left))
        freed = self.orphans - still
        self.orphans = still
        for slot in freed:
            self._settle(slot)
        self.reclaimed += len(freed)
        return len(freed)

    def fullness(self) -> str:
        """Where the slots are, in words (for the line that says the arena ran out)."""
        waiting = set().union(*(left.slots for left in self.left if left.processes.known))
        return (f"{len(self.kept)} kept by the server, {len(self.with_client)} held by clients, {len(self.orphans)} "
                f"left by clients that are gone: {len(waiting)} until their processes exit, "
                f"{len(self.orphans - waiting)} until the arena closes (their processes could not be told)")

    def _settle(self, slot: int) -> None:
        if slot in self.kept or self.with_clients.get(slot) or slot in self.orphans or slot in self.free:
            return
        self.with_clients.pop(slot, None)
        self.free.append(slot)

    @property
    def with_client(self) -> set[int]:
        """Slots some client holds."""
        return {s for s, holders in self.with_clients.items() if holders}

    def offer(self) -> str | None:
        """A fresh token for one more client to fetch the descriptor on the channel (None without one)."""
        if self.channel is None:
            return None
        token = self.channel.offer(self.fd)
        self.tokens.append(token)
        return token

    def handle(self, token: str | None = None, key_slot: int = 0) -> ArenaHandle:
        return ArenaHandle(id=self.id, pid=os.getpid(), fd=self.fd, inode=self.inode, slots=self.slots,
                           stride=self.stride, token=token or self.token, key_slot=key_slot)

    @property
    def nbytes(self) -> int:
        return self.slots * self.stride

    def close(self) -> None:
        if self.channel is not None:
            for token in {*self.tokens, *([self.token] if self.token else [])}:
                self.channel.withdraw(token)  # before the fd number can be reused
        os.close(self.fd)


def new_arena(arena_id: int, slots: int, slot_bytes: int, channel: ArenaChannel | None = None,
              throttle: Throttle | None = None, *, key: str | None = None) -> Arena | None:
    """A fresh arena, or None (logged, through `throttle` when given) where shared memory cannot be had;
    offered on `channel` if given.

    `key` (the client's `Hello.shm_key`, hex) is written into its first key slot, so that its
    client can tell it from every other arena (`loader_client.contract.shm.open_arena`); a share's
    arena takes each member's key in a slot of its own (`Arena.add_key`).
    """
    try:
        fd, stride = create_arena(f"loader-arena-{arena_id}", slots, slot_bytes, key=arena_key(key))
    except OSError as exc:
        (throttle or Throttle(log)).warning("no-shm", "no shared memory for a client (%s); sending frames over the "
                                            "socket", exc)
        return None
    arena = Arena(arena_id, fd, os.fstat(fd).st_ino, slots, stride, deque(range(slots)), channel=channel)
    arena.token = arena.offer()
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
