"""Sessions as a pure state machine: one client's stream position, credit and reorder buffer.

No sockets, no processes, no clock of its own: the event loop feeds it events (a hello, a
credit, a finished batch, a send that went through) and it says what to do next (which
positions to build, which batch may be sent now). Everything here is unit-tested directly.

A stream position is ``epoch * steps + batch``. The rules:

* at most `prefetch` batches are outstanding (being built, or built and waiting for credit);
* a batch is sent only against credit, and credit is clamped to `MAX_CREDIT`;
* in order mode, batches leave in stream order whatever order they finish in;
* a session that leaves drops everything it had outstanding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from loader_client.contract.messages import MAX_CREDIT, Hello

__all__ = ["Refusal", "Session", "StreamFacts", "fingerprint_mismatch", "open_session"]

P = TypeVar("P")


@dataclass(frozen=True)
class StreamFacts:
    """What the server knows that decides whether a hello can open a stream."""

    batch_size: int
    num_samples: int
    default_seed: int
    fingerprint: str
    prefetch: int
    in_order: bool
    augment_available: bool


@dataclass(frozen=True)
class Refusal:
    """A hello that cannot open a stream: the error kind and message its client gets."""

    kind: str
    message: str


@dataclass
class Session(Generic[P]):
    """One client's stream. `P` is whatever the loop stores for a built batch (its frames)."""

    name: str
    rank: int
    world_size: int
    seed: int
    steps: int
    prefetch: int
    in_order: bool
    augment: bool
    next_schedule: int  # position of the next batch to build
    next_send: int  # position the client expects next (in order mode)
    credit: int
    last_seen: float
    last_sent: float
    ready: dict[int, P] = field(default_factory=dict)
    building: set[int] = field(default_factory=set)

    # ------------------------------------------------------------------ events
    def grant(self, n: int, now: float) -> None:
        """The client took `n` batches: `n` more may be sent (credit is clamped)."""
        self.credit = min(MAX_CREDIT, self.credit + n)
        self.last_seen = now

    def seen(self, now: float) -> None:
        self.last_seen = now

    def to_build(self) -> list[int]:
        """Positions to start building now, so that `prefetch` batches are outstanding."""
        out = []
        while len(self.ready) + len(self.building) < self.prefetch:
            out.append(self.next_schedule)
            self.building.add(self.next_schedule)
            self.next_schedule += 1
        return out

    def built(self, position: int, payload: P) -> None:
        """A batch this session asked for is ready to send."""
        if position not in self.building:
            raise KeyError(f"position {position} is not being built for this session")
        self.building.discard(position)
        self.ready[position] = payload

    def sendable(self) -> tuple[int, P] | None:
        """The batch that may be sent now (credit and order allowing), or None; see `sent`."""
        if self.credit <= 0 or not self.ready:
            return None
        position = self.next_send if self.in_order else min(self.ready)
        if position not in self.ready:
            return None
        return position, self.ready[position]

    def sent(self, position: int, now: float) -> None:
        """The batch from `sendable` went out: it costs one credit."""
        del self.ready[position]
        self.credit -= 1
        self.next_send = position + 1
        self.last_sent = now

    def drain(self) -> Iterator[P]:
        """Everything outstanding, dropped (the session ends)."""
        self.building.clear()
        while self.ready:
            yield self.ready.popitem()[1]

    # ------------------------------------------------------------------ views
    @property
    def outstanding(self) -> int:
        return len(self.ready) + len(self.building)

    def place(self, position: int) -> tuple[int, int]:
        """(epoch, batch) of a stream position."""
        return divmod(position, self.steps)

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch) of the next batch the client expects."""
        return self.place(self.next_send)

    def describe(self) -> dict[str, Any]:
        epoch, batch = self.position
        return {"name": self.name, "rank": self.rank, "world_size": self.world_size, "epoch": epoch, "batch": batch}


def open_session(hello: Hello, name: str, *, steps_for: Callable[[int], int], facts: StreamFacts,
                 now: float) -> Session[Any] | Refusal:
    """Validate a hello against the server's facts and open its stream (or say why not).

    `steps_for(world_size)` is the number of batches per epoch for one rank. Every refusal
    names the values it refuses, so the user can fix the call.
    """
    rank, world = hello.rank, hello.world_size
    if not 0 <= rank < world:
        return Refusal("config", f"rank {rank} of world_size {world} is out of range: need 0 <= rank < world_size "
                                 "(ranks count from 0)")
    steps = steps_for(world)
    if steps < 1:
        return Refusal("config", f"world_size {world} leaves no full batch of {facts.batch_size} per rank from "
                                 f"{facts.num_samples} samples; use fewer ranks, a smaller batch or --keep-last")
    if hello.fingerprint is not None and hello.fingerprint != facts.fingerprint:
        return Refusal("config", fingerprint_mismatch(hello.fingerprint, facts.fingerprint))
    if hello.batch >= steps:
        return Refusal("config", f"start position epoch {hello.epoch} batch {hello.batch} is outside the epoch of "
                                 f"{steps} batches")
    start = hello.epoch * steps + hello.batch
    seed = facts.default_seed if hello.seed is None else hello.seed
    return Session(name=name, rank=rank, world_size=world, seed=seed, steps=steps, prefetch=facts.prefetch,
                   in_order=facts.in_order, augment=facts.augment_available and hello.augment,
                   next_schedule=start, next_send=start, credit=min(MAX_CREDIT, hello.credit),
                   last_seen=now, last_sent=now)


def fingerprint_mismatch(theirs: str, ours: str) -> str:
    """Which part of a saved state's fingerprint differs from the server's, in words."""
    t_settings, _, t_index = theirs.partition("-")
    o_settings, _, o_index = ours.partition("-")
    what = []
    if t_settings != o_settings:
        what.append("the batch settings (size, resize, dtype, sampling, ...)")
    if t_index != o_index:
        what.append("the data set index (files or labels)")
    return (f"cannot resume: {' and '.join(what) or 'the fingerprint'} differ from the saved state "
            f"(saved {theirs}, server {ours}); start the server with the original settings and data")
