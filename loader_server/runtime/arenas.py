"""Shared-memory arenas of sessions: creation, and which slot is where.

A slot is free, being filled by a worker, or with the client (sent, not yet released). The
slot accounting is pure; `new_arena` and `close` are the only OS calls. The arena itself is an
anonymous memfd (`loader_client.shm.create_arena`), named by the server, never by a peer.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from loader_client.errors import ProtocolError
from loader_client.messages import MAX_ARENA_SLOTS, ArenaHandle
from loader_client.shm import create_arena

from ..logs import Throttle

__all__ = ["Arena", "new_arena", "arena_slots"]

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
                           stride=self.stride)

    @property
    def nbytes(self) -> int:
        return self.slots * self.stride

    def close(self) -> None:
        os.close(self.fd)


def new_arena(arena_id: int, slots: int, slot_bytes: int, throttle: Throttle | None = None) -> Arena | None:
    """A fresh arena, or None (logged, through `throttle` when given) where shared memory cannot be had."""
    try:
        fd, stride = create_arena(f"loader-arena-{arena_id}", slots, slot_bytes)
    except OSError as exc:
        (throttle or Throttle(log)).warning("no-shm", "no shared memory for a client (%s); sending frames over the "
                                            "socket", exc)
        return None
    return Arena(arena_id, fd, os.fstat(fd).st_ino, slots, stride, deque(range(slots)))
