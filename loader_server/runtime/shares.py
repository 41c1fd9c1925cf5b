"""Shares as pure state: trainers that ask for the same stream get each batch built once.

A hello that names a share (``LoaderClient(endpoint, share="sweep")``) joins the share of that
name and rank on this server; the first member opens it. Every member keeps its own `Session`
(sessions.py): its position, credit and order, so each member gets every batch of its stream
exactly once and in order, whatever the others do. What the share adds is where a batch comes
from: a member's session asks its share for each position it wants built, and the share
answers with the batch already built (or being built) for another member, or says to build it.

The rules:

* Members must ask for the same stream: the same world size, seed and augmentation (the
  rank is part of the share's key, the data settings are the server's). A hello that differs
  is refused, naming each difference (`ShareTerms.differences`).
* A built batch is kept while a member holds it (built for it and not yet sent), and, for the
  members behind the leading one, while its position is within `window` positions of the
  lead's next position (the *floor*). A member whose position falls below the floor is
  *behind*: the batches it asks for are built again for it (`Want.behind`), as a stream of its
  own, while the others go on; it never holds them back (nothing waits for a member) and never
  skips anything (its session still asks for every position). Once it is back within the
  window it meets the others' batches again.
* A member that joins late, or resumes from a saved state, starts where its own hello says.
* A member that leaves drops its holds; the share closes when its last member leaves.

No sockets, no processes, no clock: `Delivery` (delivery.py) turns `Want.build` into a task,
feeds the results back with `built`, and frees what `evict` returns. `K` is the member key (a
client identity), `P` what the loop stores for a built batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Entry", "Share", "ShareKey", "ShareTerms", "Want"]

K = TypeVar("K")
P = TypeVar("P")


@dataclass(frozen=True)
class ShareKey:
    """Which share: its name and the rank every member asks for (never a client identity)."""

    name: str
    rank: int

    def __str__(self) -> str:
        return f"{self.name!r} (rank {self.rank})"


@dataclass(frozen=True)
class ShareTerms:
    """What every member of a share must ask for alike (besides the rank, which is in its key)."""

    world_size: int
    seed: int
    augment: bool
    manifest: bool = False  # every batch with its manifest (built once for all, so asked by all or none)

    def differences(self, other: ShareTerms) -> list[str]:
        """Each setting of `other` (a new member) that differs from these (the share's), in words."""
        out = []
        if other.world_size != self.world_size:
            out.append(f"world_size {other.world_size} (the share has {self.world_size})")
        if other.seed != self.seed:
            out.append(f"seed {other.seed} (the share has {self.seed})")
        if other.augment != self.augment:
            out.append(f"augment={other.augment} (the share has augment={self.augment})")
        if other.manifest != self.manifest:
            out.append(f"manifest={other.manifest} (the share has manifest={self.manifest})")
        return out


@dataclass
class Entry(Generic[K, P]):
    """One position of the share's stream: being built (payload None) or built."""

    position: int
    behind: bool  # built for a member below the floor, not for the pack
    payload: P | None = None
    task: int | None = None
    waiting: set[K] = field(default_factory=set)  # members whose session waits for it to be built
    holding: set[K] = field(default_factory=set)  # members it was built for, not yet sent to them
    used: bool = False  # sent to some member already


@dataclass(frozen=True)
class Want(Generic[P]):
    """The share's answer to a member that wants a position: build it (`build`, for the pack or,
    `behind`, for a member below the floor), wait for the build in progress, or take `payload`."""

    build: bool
    behind: bool = False
    payload: P | None = None


class Share(Generic[K, P]):
    """One share's members and its window of built batches (module doc)."""

    def __init__(self, key: ShareKey, terms: ShareTerms, window: int) -> None:
        if window < 0:
            raise ValueError(f"a share's window is at least 0 positions, got {window}")
        self.key, self.terms, self.window = key, terms, window
        self.members: dict[K, int] = {}  # member -> the next position its session sends
        self.entries: dict[int, Entry[K, P]] = {}
        self.builds = 0  # batches built for the share (pack and behind)
        self.reused = 0  # batches a member got that were built for another member

    # ------------------------------------------------------------------ members
    def join(self, member: K, position: int) -> None:
        """`member` joins, its session starting at `position`."""
        self.members[member] = position

    def leave(self, member: K) -> None:
        """`member` left: it waits for and holds nothing any more."""
        self.members.pop(member, None)
        for entry in self.entries.values():
            entry.waiting.discard(member)
            entry.holding.discard(member)

    def advance(self, member: K, next_send: int) -> None:
        """`member`'s session now sends `next_send` next (it moved on)."""
        if member in self.members:
            self.members[member] = next_send

    @property
    def lead(self) -> int:
        """The next position of the member furthest ahead."""
        return max(self.members.values(), default=0)

    @property
    def floor(self) -> int:
        """Batches below this position are kept only while a member holds or waits for them."""
        return self.lead - self.window

    def behind(self, member: K) -> bool:
        """True when `member`'s position is below the floor: its batches are built for it alone."""
        return self.members.get(member, self.lead) < self.floor

    # ------------------------------------------------------------------ positions
    def want(self, member: K, position: int) -> Want[P]:
        """`member`'s session wants `position` built (see `Want`)."""
        entry = self.entries.get(position)
        if entry is None:
            behind = position < self.floor
            self.entries[position] = Entry(position, behind, waiting={member})
            return Want(build=True, behind=behind)
        if entry.payload is None:
            entry.waiting.add(member)
            return Want(build=False)
        entry.holding.add(member)
        self.reused += 1
        return Want(build=False, payload=entry.payload)

    def started(self, position: int, task: int) -> None:
        """The build of `position` is task `task`."""
        self.entries[position].task = task

    def built(self, position: int, payload: P) -> list[K]:
        """`position` is built: the members that waited for it, which now hold it. Raises KeyError for a
        position not being built (its share closed, for instance)."""
        entry = self.entries[position]
        if entry.payload is not None:
            raise KeyError(f"position {position} of share {self.key} was already built")
        entry.payload, entry.task = payload, None
        self.builds += 1
        members = [m for m in self.members if m in entry.waiting]
        self.reused += max(0, len(members) - 1)
        entry.holding |= entry.waiting
        entry.waiting = set()
        return members

    def failed(self, position: int) -> list[K]:
        """The build of `position` failed: it is forgotten; returns the members that waited for it."""
        entry = self.entries.pop(position, None)
        return [m for m in self.members if m in entry.waiting] if entry is not None else []

    def handed(self, member: K, position: int) -> bool:
        """`member`'s session sent `position`: the member holds it no longer. True when it is the first
        member this batch went to."""
        entry = self.entries.get(position)
        if entry is None:
            return False
        entry.holding.discard(member)
        first, entry.used = not entry.used, True
        return first

    def evict(self) -> list[Entry[K, P]]:
        """Remove and return the built batches nobody holds or waits for that fell below the floor (every
        one once no member is left); the caller frees what they hold."""
        floor, empty = self.floor, not self.members
        gone = [e for e in self.entries.values()
                if e.payload is not None and not e.waiting and not e.holding and (empty or e.position < floor)]
        for e in gone:
            del self.entries[e.position]
        return gone

    def building(self) -> Iterable[int]:
        """Task ids of the builds in progress."""
        return [e.task for e in self.entries.values() if e.payload is None and e.task is not None]

    def describe(self) -> dict[str, object]:
        return {"name": self.key.name, "rank": self.key.rank, "members": len(self.members), "lead": self.lead,
                "window": self.window, "kept": sum(1 for e in self.entries.values() if e.payload is not None),
                "building": sum(1 for e in self.entries.values() if e.payload is None), "built": self.builds,
                "reused": self.reused}
