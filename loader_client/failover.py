"""Who builds what of an epoch when one trainer reads from several loader servers: a pure planner.

One rank's epoch is cut into ``m`` shares (m = the number of servers it was given): share ``i``
is share ``rank * m + i`` of ``world_size * m`` of the sampling plan, so its batches are a pure
function of (seed, epoch, rank, world size, m), and ANY server can build ANY of them: every
server holds the same index. A `Task` is a run of consecutive batches of one share that one
server's stream delivers in order; the tasks of an epoch cover exactly the batches not yet
returned to the trainer. Delivering advances a task; losing a server hands its tasks (from the
first batch not returned) to the survivors; a server that has nothing left may take the back
half of the largest task (balanced merge). Nothing is ever in two tasks, nothing is dropped:
every batch of the epoch is returned exactly once, whoever builds it. Only the "continue" loss
policy drops: `drop` ends a lost server's tasks where they stand, and later epochs plan only
the shares `only` names.

No sockets here: `loader_client.hosts` turns the plan into streams, and the fleet simulation
(`loader-server simulate`) drives the same plan with a simulated clock and network. The policy
of the balanced merge lives here too (`EpochPlan.steal_for_idle`, `Task.handed_on`,
`next_epoch_plan`), so that both run the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

__all__ = ["EpochPlan", "StreamPlace", "Task", "next_epoch_plan", "next_unserved", "ordered_share"]


def ordered_share(merged_batch: int, shares: int) -> tuple[int, int]:
    """(share, batch of that share) of merged batch b in the deterministic merge: b mod m, b div m."""
    return merged_batch % shares, merged_batch // shares


@dataclass
class Task:
    """Batches ``next .. stop - 1`` of `share`, built by server `server`, delivered in order."""

    share: int
    next: int
    stop: int
    server: int

    @property
    def remaining(self) -> int:
        return self.stop - self.next

    def handed_on(self, steps: int) -> bool:
        """Done, and what follows in its share belongs to another task (one that took its tail):
        the stream that built it must stop (what it builds next is not its to deliver)."""
        return self.remaining == 0 and self.stop < steps


class EpochPlan:
    """The tasks of one epoch of one rank, and what the trainer has been given of it.

    `pending` (from `pending()` of a saved plan) restarts mid-epoch, with `returned` batches
    of the epoch already returned (default: every batch not pending); without it every share
    of `only` (default: all) starts at batch 0. `alive` lists the servers that can build;
    `prefer` maps a share to the server that should keep it (a stream already positioned
    there), else shares go to their own server when it is alive, then to the least loaded
    survivors, lowest index first.
    """

    def __init__(self, shares: int, steps: int, alive: Iterable[int], *,
                 pending: Sequence[Sequence[int]] | None = None, prefer: dict[int, int] | None = None,
                 returned: int | None = None, only: Iterable[int] | None = None) -> None:
        if shares < 1 or steps < 1:
            raise ValueError(f"a plan needs shares >= 1 and steps >= 1, got {shares} and {steps}")
        self.shares, self.steps = shares, steps
        self.alive = sorted(set(alive))
        if not self.alive:
            raise ValueError("a plan needs at least one server")
        planned = range(shares) if only is None else sorted(set(only))
        runs = [(s, 0, steps) for s in planned] if pending is None else [tuple(p) for p in pending]
        _check_runs(runs, shares, steps)
        self.tasks = [Task(share, start, stop, -1) for share, start, stop in runs if start < stop]
        remaining = sum(t.remaining for t in self.tasks)
        if returned is None:
            returned = shares * steps - remaining if pending is not None else 0
        if not 0 <= returned <= shares * steps - remaining:
            raise ValueError(f"{returned} batches returned and {remaining} pending do not fit an epoch of "
                             f"{shares} shares of {steps} batches")
        self.returned = returned
        prefer = prefer or {}
        for t in self.tasks:  # first a stream already in place, then the share's own server
            wanted = prefer.get(t.share)
            if wanted in self.alive:
                t.server = wanted
        for t in self.tasks:
            if t.server < 0 and t.share in self.alive:
                t.server = t.share
        for t in self.tasks:  # the rest: the least loaded survivor
            if t.server < 0:
                t.server = self._least_loaded()

    # ---------------------------------------------------------------- queries
    @property
    def delivered(self) -> int:
        """Batches of the epoch already returned to the trainer."""
        return self.returned

    @property
    def size(self) -> int:
        """Batches this epoch returns in all: shares x steps, less what `drop` and `only` left out."""
        return self.returned + sum(t.remaining for t in self.tasks)

    @property
    def done(self) -> bool:
        return all(t.remaining == 0 for t in self.tasks)

    def pending(self) -> list[list[int]]:
        """``[share, next, stop]`` of every batch run not yet returned: a resumable, JSON-able state."""
        return [[t.share, t.next, t.stop] for t in self.tasks if t.remaining]

    def active(self) -> list[Task]:
        return [t for t in self.tasks if t.remaining]

    def tasks_of(self, server: int) -> list[Task]:
        return [t for t in self.tasks if t.server == server and t.remaining]

    def ordered_task(self) -> Task:
        """The task holding the next batch of the deterministic merge: batch j of share s is merged
        batch ``j * m + s``, so the next is the lowest (batch, share) not returned yet (share b mod m,
        batch b div m when no share was dropped)."""
        active = self.active()
        if not active:
            raise RuntimeError("the epoch is complete: no task has a batch left")
        return min(active, key=lambda t: (t.next, t.share))

    def is_ordered(self) -> bool:
        """True when the batches returned so far are a prefix of the deterministic merge."""
        d = self.delivered
        runs: dict[int, list[tuple[int, int]]] = {}
        for t in self.active():
            runs.setdefault(t.share, []).append((t.next, t.stop))
        for share in range(self.shares):
            start = (d + self.shares - 1 - share) // self.shares
            if runs.get(share, []) != ([(start, self.steps)] if start < self.steps else []):
                return False
        return True

    # ---------------------------------------------------------------- changes
    def deliver(self, task: Task, batch: int) -> None:
        """The trainer got batch `batch` of `task`'s share, which must be the task's next."""
        if batch != task.next or not task.remaining:
            raise ValueError(f"share {task.share}: expected batch {task.next} (run up to {task.stop}), got {batch}")
        task.next += 1
        self.returned += 1

    def lose(self, server: int) -> list[Task]:
        """Hand the unfinished tasks of `server` to the survivors; returns them (with new servers).

        Raises `LookupError` when no server is left.
        """
        if server in self.alive:
            self.alive.remove(server)
        moved = self.tasks_of(server)
        if not self.alive:
            raise LookupError("no server left")
        for t in moved:
            t.server = -1
            t.server = self._least_loaded()
        return moved

    def drop(self, server: int) -> list[Task]:
        """End the unfinished tasks of `server` where they stand (their batches are not returned this
        epoch); returns them. Raises `LookupError` when no server is left."""
        if server in self.alive:
            self.alive.remove(server)
        dropped = self.tasks_of(server)
        for t in dropped:
            t.stop = t.next
        if not self.alive:
            raise LookupError("no server left")
        return dropped

    def join(self, server: int) -> None:
        """A server can take work again (its old tasks stay where they are until the next epoch)."""
        if server not in self.alive:
            self.alive = sorted({*self.alive, server})

    def steal(self, thief: int, *, keep: int = 1, min_batches: int = 1) -> Task | None:
        """Give `thief` the back half of the largest task of another server, or None.

        The victim keeps at least `keep` batches (those already on their way to this host), and
        a steal smaller than `min_batches` is not worth a new stream.
        """
        candidates = [t for t in self.tasks if t.server != thief and t.remaining]
        if not candidates:
            return None
        victim = max(candidates, key=lambda t: (t.remaining, -t.share, -t.next))
        kept = max(keep, (victim.remaining + 1) // 2)
        if victim.remaining - kept < max(1, min_batches):
            return None
        task = Task(victim.share, victim.next + kept, victim.stop, thief)
        victim.stop = task.next
        self.tasks.append(task)
        return task

    def steal_for_idle(self, prefetch: int) -> list[Task]:
        """Balanced merge: every live server with nothing left of this epoch takes the back half of
        the largest task of another (`steal`), leaving the victim the `prefetch` + 1 batches that
        may already be on their way, and only when at least max(2, `prefetch`) batches move."""
        stolen = []
        for server in list(self.alive):
            if not self.tasks_of(server):
                task = self.steal(server, keep=prefetch + 1, min_batches=max(2, prefetch))
                if task is not None:
                    stolen.append(task)
        return stolen

    def _least_loaded(self) -> int:
        load = {s: 0 for s in self.alive}
        for t in self.tasks:
            if t.server in load:
                load[t.server] += t.remaining
        return min(self.alive, key=lambda s: (load[s], s))


class StreamPlace(Protocol):
    """What the planner needs of a stream: where it stands and which task it serves."""

    server: int
    share: int
    epoch: int
    batch: int  # the position of the next batch it returns
    task: Task | None
    closed: bool


S = TypeVar("S", bound=StreamPlace)


def next_unserved(plan: EpochPlan, streams: Sequence[S], epoch: int) -> tuple[Task, S | None] | None:
    """The first task with batches left that no stream serves, and an idle open stream already
    standing at its next batch on its server (None: a new stream must be opened there); None when
    every task is served."""
    for task in plan.active():
        if any(s.task is task for s in streams):
            continue
        ready = next((s for s in streams if s.task is None and not s.closed and s.server == task.server
                      and s.share == task.share and (s.epoch, s.batch) == (epoch, task.next)), None)
        return task, ready
    return None


def next_epoch_plan(shares: int, steps: int, alive: Iterable[int],
                    positioned: Iterable[tuple[int, int]] = (), only: Iterable[int] | None = None) -> EpochPlan:
    """The plan of a new epoch. `positioned` lists (share, server) of streams already standing at
    the start of that share (they ran on into the new epoch): such a stream keeps its share when
    the share's own server is not alive; otherwise a share goes home to its server. `only`: the
    shares planned (default all; the "continue" loss policy leaves dropped shares out)."""
    alive = sorted(set(alive))
    prefer: dict[int, int] = {}
    for share, server in positioned:
        if server in alive and share not in prefer and share not in alive:
            prefer[share] = server
    return EpochPlan(shares, steps, alive, prefer=prefer, only=only)


def _check_runs(runs: Sequence[Sequence[int]], shares: int, steps: int) -> None:
    """Saved runs must be well-formed and disjoint (a tampered or foreign state is refused)."""
    seen: dict[int, list[tuple[int, int]]] = {}
    for run in runs:
        if len(run) != 3 or not all(isinstance(v, int) for v in run):
            raise ValueError(f"a pending run is [share, next, stop] of ints, got {run!r}")
        share, start, stop = run
        if not (0 <= share < shares and 0 <= start <= stop <= steps):
            raise ValueError(f"pending run {list(run)} is outside {shares} shares of {steps} batches")
        for a, b in seen.get(share, []):
            if start < b and a < stop:
                raise ValueError(f"pending runs of share {share} overlap: {[a, b]} and {[start, stop]}")
        seen.setdefault(share, []).append((start, stop))
