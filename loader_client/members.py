"""The streams a several-server stream is made of: one `Member` per (server, share) stream, and the pool.

With m servers and rank r of n, share i of an epoch is share ``r * m + i`` of ``n * m`` of the
sampling plan, so any server can build any share from any batch. A member is one
single-server stream (a `ServerStream`, opened by the `connect` function the pool is given)
of one share, positioned at a batch; `HostsStream` gives each task of its `EpochPlan` a member.

`Members.admit` is the one place where a new member is checked against the first one: today
that it serves the same settings and data (fingerprint); checks that the hosts' content, shapes
and dtypes agree belong there too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .contract.errors import ConfigError
from .endpoints import Endpoint
from .failover import Task
from .options import Start
from .stream import Delivery, Stream

__all__ = ["Connect", "Member", "Members"]

#: Opens one server's stream from a start position (`ServerStream` with the client's options).
Connect = Callable[[Endpoint, Start], Stream]


@dataclass(eq=False)
class Member:
    """One single-server stream of one share, and where it stands."""

    server: int
    share: int
    stream: Stream
    epoch: int
    batch: int  # position of the next batch this stream returns
    task: Task | None = None
    held: Delivery | None = None  # balanced merge: one batch taken ahead
    permit: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    closed: bool = False
    pumping: bool = False

    def advance(self, steps: int) -> None:
        self.batch += 1
        if self.batch >= steps:
            self.epoch, self.batch = self.epoch + 1, 0


class Members:
    """The open members of one several-server stream: opened at a position, admitted, closed.

    `seed` and `fingerprint` are those of the saved state or, until then, None: the first
    member's welcome sets them, and every later member asks for them.
    """

    def __init__(self, endpoints: Sequence[Endpoint], connect: Connect, start: Start) -> None:
        self.endpoints, self.connect = list(endpoints), connect
        self.rank, self.world_size = start.rank, start.world_size
        self.seed, self.fingerprint = start.seed, start.fingerprint
        self.all: list[Member] = []
        self.first: dict[str, Any] | None = None  # the first member's metadata, that every later one must match

    def open(self, server: int, share: int, epoch: int, batch: int, task: Task | None = None) -> Member:
        """A new member for `share` on `server`, starting at (`epoch`, `batch`), admitted."""
        m = len(self.endpoints)
        start = Start.checked(epoch, batch, self.seed, self.fingerprint, self.rank * m + share, self.world_size * m)
        stream = self.connect(self.endpoints[server], start)
        try:
            self.admit(server, stream)
        except BaseException:
            stream.close()
            raise
        member = Member(server, share, stream, epoch, batch, task)
        self.all.append(member)
        return member

    def admit(self, server: int, stream: Stream) -> None:
        """Refuse a member whose server serves other settings or data than the first one's (module doc)."""
        info = stream.info
        if self.first is None:
            self.first = info
            self.seed, self.fingerprint = info["seed"], info["fingerprint"]
            return
        if info["fingerprint"] != self.first["fingerprint"]:
            raise ConfigError(f"the servers {[str(e) for e in self.endpoints]} run different settings or data sets "
                              f"({self.endpoints[server]} has fingerprint {info['fingerprint']}, not "
                              f"{self.first['fingerprint']}); start them with the same flags and index")

    def of(self, task: Task) -> Member | None:
        return next((s for s in self.all if s.task is task), None)

    def close(self, member: Member) -> None:
        member.closed = True
        member.permit.release()  # a pump waiting for its turn sees `closed` and ends
        if member in self.all:
            self.all.remove(member)
        member.stream.close()

    def close_server(self, server: int) -> None:
        for member in [s for s in self.all if s.server == server]:
            self.close(member)

    def close_all(self) -> None:
        for member in list(self.all):
            self.close(member)
