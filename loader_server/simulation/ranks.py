"""A simulated trainer rank: the client's real fail-over plan and balanced merge, simulated streams.

What `loader_client.hosts.HostsStream` does with threads and sockets, in simulated time: one
`EpochPlan` per epoch (`loader_client.failover`), a stream per task (a session on its host
positioned at the task's next batch, or a stream already standing there), each stream's pump
taking one batch ahead and granting the host a credit for it, the trainer taking whichever held
batch is the next of its task, idle servers stealing (`steal_for_idle`), a stream closed when
its task was handed on, a silent host lost (`lose`: its tasks to the survivors, from the first
batch not returned) after `timeout_s`, the others asked at once, and a host that answers again
rejoining at the next epoch boundary (`next_epoch_plan`). The decisions are the real functions;
only the plumbing around them is the simulation's.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loader_client.contract.messages import Hello
from loader_client.failover import EpochPlan, Task, next_epoch_plan, next_unserved

from .hosts import Payload, SimHost

if TYPE_CHECKING:
    from .fleet import Fleet

__all__ = ["SimRank", "SimStream"]

_ids = itertools.count(1)


@dataclass(eq=False)
class SimStream:
    """One client stream: a session of `share` on host `server` (an index into the rank's hosts)."""

    rank: SimRank
    server: int
    share: int
    host: SimHost
    epoch: int
    batch: int  # position of the next batch this stream returns
    task: Task | None
    expect: int  # stream position of the next batch that must arrive (the session sends in order)
    id: int = field(default_factory=lambda: next(_ids))
    generation: int = -1  # the host's generation when the session opened
    inbox: deque[tuple[int, Payload]] = field(default_factory=deque)
    held: tuple[int, Payload] | None = None
    closed: bool = False

    def advance(self, steps: int) -> None:
        self.batch += 1
        if self.batch >= steps:
            self.epoch, self.batch = self.epoch + 1, 0


class SimRank:
    """Rank `rank` reading from `hosts` (its endpoint list, in order) with the balanced merge."""

    def __init__(self, fleet: Fleet, rank: int, hosts: list[SimHost]) -> None:
        self.fleet, self.rank, self.hosts = fleet, rank, hosts
        self.servers, self.steps = len(hosts), fleet.steps
        self.epoch = 0
        self.plan = EpochPlan(self.servers, self.steps, range(self.servers))
        self.streams: list[SimStream] = []
        self.down: set[int] = set()
        self.rejoining: set[int] = set()
        self.waiting = False
        self.done_at: float | None = None
        self.delivered = 0

    # ------------------------------------------------------------------ the trainer
    def start(self) -> None:
        self._ensure_streams()
        self.want()

    def want(self) -> None:
        """The trainer asks for its next batch(es): takes what is ready, else waits for an arrival.

        With `sync` (data-parallel training), the ranks step together: a rank takes batch b + 1 only
        after every rank has taken batch b (the gradients' all-reduce), then computes `step_s`."""
        fleet = self.fleet
        while self.done_at is None:
            if fleet.spec.sync and self.delivered > fleet.step:
                return  # at the all-reduce: the fleet wakes every rank when the last one arrives
            if not self._take():
                self.waiting = True
                return
            if fleet.spec.sync:
                fleet.took()
                return
            if fleet.spec.step_s > 0:  # the trainer computes before it asks again
                fleet.clock.after(fleet.spec.step_s, self.want)
                return

    def _take(self) -> bool:
        """One turn of the balanced merge's loop: deliver a held batch, else steal and open streams."""
        for s in self.streams:
            if s.held is not None and s.task is not None and s.task.remaining and \
                    s.held[0] == self.epoch * self.steps + s.task.next:
                (_, payload), s.held = s.held, None
                self.plan.deliver(s.task, s.task.next)
                self.fleet.record(self, s.share, s.batch, payload)
                s.advance(self.steps)
                self.delivered += 1
                if s.task.handed_on(self.steps):
                    self._close(s)  # what follows belongs to the task that took its tail
                else:
                    self._pump(s)
                if self.plan.done:
                    self._next_epoch()
                return True
        stolen = self.plan.steal_for_idle(self.fleet.spec.client_prefetch)
        self.fleet.steals += len(stolen)
        self._ensure_streams()
        return False

    # ------------------------------------------------------------------ streams
    def _ensure_streams(self) -> None:
        """Give every task with batches left a stream on its server, positioned at its next batch."""
        while (unserved := next_unserved(self.plan, self.streams, self.epoch)) is not None:
            task, ready = unserved
            if ready is not None:
                ready.task = task
                continue
            host = self.hosts[task.server]
            start = self.epoch * self.steps + task.next
            stream = SimStream(self, task.server, task.share, host, self.epoch, task.next, task, start)
            self.streams.append(stream)
            self.rejoining.discard(task.server)
            hello = Hello(rank=self.rank * self.servers + task.share, world_size=self.fleet.world_size * self.servers,
                          epoch=self.epoch, batch=task.next, seed=self.fleet.spec.seed,
                          credit=self.fleet.spec.client_prefetch)
            self.fleet.clock.after(self.fleet.wire.latency_s, host.hello, stream, hello)

    def arrive(self, stream: SimStream, generation: int, position: int, payload: Payload) -> None:
        """A batch reaches this rank (or is lost with its host, or dropped by a closed stream)."""
        if generation != stream.host.generation:
            self.fleet.lost_in_flight += 1
            return
        if stream.closed:
            self.fleet.discarded += 1
            return
        if position != stream.expect:
            raise AssertionError(f"rank {self.rank}: host {stream.host.index} sent position {position}, expected "
                                 f"{stream.expect}: the session broke its order")
        stream.expect += 1
        stream.inbox.append((position, payload))
        self._pump(stream)
        if self.waiting:
            self.waiting = False
            self.want()

    def _pump(self, stream: SimStream) -> None:
        """The stream's pump takes one batch ahead; taking it grants the host one more credit."""
        if stream.held is None and stream.inbox and not stream.closed:
            stream.held = stream.inbox.popleft()
            self.fleet.clock.after(self.fleet.wire.latency_s, stream.host.credit, stream.generation, stream.id, 1)

    def _close(self, stream: SimStream) -> None:
        stream.closed = True
        self.fleet.discarded += len(stream.inbox) + (stream.held is not None)
        stream.inbox.clear()
        stream.held = None
        if stream in self.streams:
            self.streams.remove(stream)
        self.fleet.clock.after(self.fleet.wire.latency_s, stream.host.goodbye, stream.generation, stream.id)

    # ------------------------------------------------------------------ losses
    def handshake_unanswered(self, stream: SimStream) -> None:
        """A hello reached a dead host: the handshake times out."""
        self.fleet.clock.after(self.fleet.spec.timeout_s, self.stream_failed, stream)

    def stream_failed(self, stream: SimStream) -> None:
        """The stream's receiver gave up: silence for timeout_s (the host died, or restarted)."""
        if stream.closed or self.done_at is not None:
            return
        rejoining = stream.server in self.rejoining
        self._lose(stream.server)
        if not rejoining:  # the others are asked at once: hosts killed together are all found now
            for server in list(self.plan.alive):
                if not self.hosts[server].alive:
                    self._lose(server)
        self._ensure_streams()
        if self.waiting:
            self.waiting = False
            self.want()

    def _lose(self, server: int) -> None:
        self.down.add(server)
        self.rejoining.discard(server)
        for s in [s for s in self.streams if s.server == server]:
            self._close(s)
        moved = self.plan.lose(server)  # LookupError when none is left: the scenario never kills a rank's last
        self.fleet.losses += 1
        self.fleet.moved += sum(t.remaining for t in moved)

    # ------------------------------------------------------------------ epochs
    def _next_epoch(self) -> None:
        self.epoch += 1
        if self.epoch == self.fleet.spec.epochs:
            self.done_at = self.fleet.clock.now
            for s in list(self.streams):
                self._close(s)
            self.fleet.rank_done(self)
            return
        probe_s = min(max(self.fleet.spec.timeout_s / 2, 0.5), 5.0)  # the client's health prober
        for server in sorted(self.down):
            host = self.hosts[server]
            if host.alive and self.fleet.clock.now - host.up_since() >= probe_s:
                self.down.discard(server)
                self.rejoining.add(server)
        alive = [s for s in range(self.servers) if s not in self.down]
        positioned = [(s.share, s.server) for s in self.streams if (s.epoch, s.batch) == (self.epoch, 0)]
        self.plan = next_epoch_plan(self.servers, self.steps, alive, positioned)
        for s in self.streams:
            s.task = None
        self._ensure_streams()
        for s in [s for s in self.streams if s.task is None or s.task.handed_on(self.steps)]:
            self._close(s)
