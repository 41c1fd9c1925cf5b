"""A simulated loader host: the server's real sessions and sampling plan, simulated workers.

Each hello opens a real `Session` (`open_session`, with the server's `StreamFacts`); the host
queues what the sessions ask (`to_build`) and hands it to `workers` simulated worker processes
as the supervisor does: the real `fair_next` picks the task, the worker holding the fewest
takes it, each holds at most `TASKS_PER_WORKER` and builds them one after the other, in a
host-specific time per batch. Each batch's sample indices come from the real `SamplingPlan`,
and the session sends what credit and order allow (`sendable`/`sent`). A host that dies loses
its sessions and everything being built or queued; one that returns starts empty, as a
restarted server.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from loader_client.contract.messages import Hello

from ..runtime.sessions import Refusal, Session, StreamFacts, open_session
from ..runtime.supervisor import TASKS_PER_WORKER, fair_next
from ..sampling import SamplingPlan
from .clock import Clock

if TYPE_CHECKING:
    from .ranks import SimStream

__all__ = ["Payload", "SimHost", "Wire"]


@dataclass(frozen=True)
class Payload:
    """A built batch as the simulation carries it: its indices, who built it and when."""

    indices: np.ndarray
    host: int
    built_at: float


@dataclass(frozen=True)
class Wire:
    """The simulated network: one-way delay of a small message and of a batch."""

    latency_s: float
    transfer_s: float


class SimHost:
    """One loader host (module doc). `up_periods` lists its alive intervals: [start, end, first
    session] (a host that returns gets sessions only when ranks rejoin it, at their epoch boundary)."""

    def __init__(self, index: int, *, workers: int, build_s: float, jitter: float, clock: Clock, plan: SamplingPlan,
                 facts: StreamFacts, wire: Wire, rng: random.Random) -> None:
        self.index, self.workers, self.build_s, self.jitter = index, workers, build_s, jitter
        self.clock, self.plan, self.facts, self.wire, self.rng = clock, plan, facts, wire, rng
        self.alive, self.generation = True, 0
        self.sessions: dict[int, tuple[Session[Payload], SimStream]] = {}
        self.tasks: dict[int, tuple[int, int]] = {}  # task id -> (session id, position)
        self.owner: dict[int, int] = {}  # queued task id -> session id (tasks of ended sessions leave at once)
        self.queue: deque[int] = deque()
        self.held: list[deque[int]] = [deque() for _ in range(workers)]  # each worker's tasks, first one building
        self.at_workers: Counter[int] = Counter()  # tasks at workers, per session
        self._task_ids = 0
        self.up_periods: list[list[float]] = [[0.0, float("inf"), 0.0]]  # start, end, first session
        self.built = self.dropped = self.lost = 0
        self.on_death: Callable[[SimHost, list[SimStream]], None] = lambda host, streams: None

    @property
    def capacity(self) -> float:
        """Batches per simulated second when every worker is busy."""
        return self.workers / self.build_s

    # ------------------------------------------------------------------ messages from clients
    def hello(self, stream: SimStream, hello: Hello) -> None:
        if not self.alive:
            stream.rank.handshake_unanswered(stream)
            return
        opened = open_session(hello, f"rank{stream.rank.rank}-share{stream.share}",
                              steps_for=self.plan.steps_per_epoch, facts=self.facts, now=self.clock.now)
        if isinstance(opened, Refusal):
            raise RuntimeError(f"host {self.index} refused a hello the simulation sent: {opened.message}")
        self.sessions[stream.id] = (opened, stream)
        stream.generation = self.generation
        if self.up_periods[-1][2] == float("inf"):
            self.up_periods[-1][2] = self.clock.now
        self._schedule(opened, stream.id)
        self._dispatch()

    def credit(self, generation: int, sid: int, n: int) -> None:
        entry = self.sessions.get(sid) if generation == self.generation else None
        if entry is not None:
            entry[0].grant(n, self.clock.now)
            self._flush(sid)
            self._dispatch()

    def goodbye(self, generation: int, sid: int) -> None:
        entry = self.sessions.pop(sid, None) if generation == self.generation else None
        if entry is not None:
            self.dropped += sum(1 for _ in entry[0].drain())  # built, never sent: work thrown away
            cancelled = [tid for tid in self.queue if self.owner[tid] == sid]  # the supervisor cancels them
            for tid in cancelled:
                self.queue.remove(tid)
                del self.owner[tid], self.tasks[tid]

    # ------------------------------------------------------------------ building and sending
    def _schedule(self, session: Session[Payload], sid: int) -> None:
        for position in session.to_build():
            self._task_ids += 1
            self.tasks[self._task_ids] = (sid, position)
            self.owner[self._task_ids] = sid
            self.queue.append(self._task_ids)

    def _dispatch(self) -> None:
        while self.queue:
            worker = min(range(self.workers), key=lambda w: len(self.held[w]))
            if len(self.held[worker]) >= TASKS_PER_WORKER:
                return
            tid, _ = fair_next(self.queue, self.owner.get, self.at_workers)
            if tid is None:
                return
            self.queue.remove(tid)
            del self.owner[tid]
            self.held[worker].append(tid)
            self.at_workers[self.tasks[tid][0]] += 1
            if len(self.held[worker]) == 1:
                self._start(worker)

    def _start(self, worker: int) -> None:
        took = self.build_s * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self.clock.after(took, self._built, self.generation, worker)

    def _built(self, generation: int, worker: int) -> None:
        if generation != self.generation:
            return  # the host died while building it
        tid = self.held[worker].popleft()
        if self.held[worker]:
            self._start(worker)
        self.built += 1
        sid, position = self.tasks.pop(tid)
        self.at_workers[sid] -= 1
        if not self.at_workers[sid]:
            del self.at_workers[sid]
        entry = self.sessions.get(sid)
        if entry is None:
            self.dropped += 1  # built for a session that ended meanwhile: its result is ignored
        else:
            session = entry[0]
            epoch, batch = session.place(position)
            indices = self.plan.batch(epoch, batch, seed=session.seed, rank=session.rank, world_size=session.world_size)
            session.built(position, Payload(indices, self.index, self.clock.now))
            self._flush(sid)
        self._dispatch()

    def _flush(self, sid: int) -> None:
        session, stream = self.sessions[sid]
        while (item := session.sendable()) is not None:
            position, payload = item
            session.sent(position, self.clock.now)
            self.clock.after(self.wire.transfer_s, stream.rank.arrive, stream, self.generation, position, payload)
        self._schedule(session, sid)

    # ------------------------------------------------------------------ death and return
    def die(self) -> None:
        """The host is gone: sessions, queued and half-built batches with it."""
        self.alive = False
        self.generation += 1
        self.up_periods[-1][1] = self.clock.now
        streams = [stream for _, stream in self.sessions.values()]
        self.lost += sum(s.outstanding for s, _ in self.sessions.values())
        self.sessions.clear()
        self.tasks.clear()
        self.owner.clear()
        self.queue.clear()
        for held in self.held:
            held.clear()
        self.at_workers.clear()
        self.on_death(self, streams)

    def revive(self) -> None:
        """A fresh server on the same address: no sessions; clients find it with `health`."""
        self.alive = True
        self.generation += 1
        self.up_periods.append([self.clock.now, float("inf"), float("inf")])

    def up_since(self) -> float:
        return self.up_periods[-1][0]

    def up_time(self, until: float) -> float:
        """Time alive and in use (from its first session after a return) before `until`."""
        return sum(max(0.0, min(end, until) - max(start, joined)) for start, end, joined in self.up_periods)

    def rejoin_wait(self, until: float) -> float:
        """Time alive after a return but without a session yet (waiting for ranks' epoch boundaries)."""
        return sum(max(0.0, min(joined, end, until) - start) for start, end, joined in self.up_periods[1:])

    def describe(self) -> dict[str, Any]:
        return {"host": self.index, "capacity": self.capacity, "built": self.built, "dropped": self.dropped,
                "lost": self.lost}
