"""Several loader hosts feeding one trainer, exactly once when a host dies or is slow.

``LoaderClient([endpoint1, endpoint2, ...])`` holds a `HostsStream`: a `Stream` (stream.py)
merged from single-server streams (`ServerStream`s opened by the `connect` function it is
given, with the client's `ClientOptions`), one per share of the epoch, as an `EpochPlan`
(failover.py) says. With m servers and rank r of n, share i is share ``r * m + i`` of ``n * m``
of the sampling plan, so any server can build any share, from any batch. Its parts:

    members.py   the single-server streams (one per share being built), opened and admitted
    merges.py    which batch comes next: ``merge="ordered"`` (deterministic) or ``"balanced"``
    losses.py    what losing a server does: ``on_server_loss="failover"`` (the default: its
                 batches not returned yet, in flight included, are built by the survivors;
                 a lost server that answers again rejoins at the next epoch boundary),
                 ``"raise"``, or ``"continue"`` (its share is dropped)

Only when no server is left does `take()` raise, naming every endpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from .contract.errors import ConfigError, LoaderError, ProtocolError
from .endpoints import Endpoint
from .failover import EpochPlan, next_epoch_plan, next_unserved
from .losses import POLICIES, Answers, Losses
from .members import Connect, Member, Members
from .merges import MERGES
from .options import ClientOptions
from .stream import BatchInfo, Delivery, Servers

__all__ = ["HostsStream"]

_log = logging.getLogger("loader_client")


class HostsStream:
    """The `Stream` of several servers, merged and failing over between them (module doc).

    `lost` lists the losses (endpoint, error, epoch, batch; with ``"continue"`` also the share
    of each epoch lost); `servers` says who serves now, who will rejoin, and how many batches
    each built for the trainer. The options were checked by `ClientOptions`; `connect` opens
    one server's stream from a `Start`; `answers` (default: a `health` request) says whether a
    server answers, for the check of the others after a loss and for rejoining.
    """

    def __init__(self, endpoints: Sequence[Endpoint], options: ClientOptions, connect: Connect,
                 answers: Answers | None = None) -> None:
        self._closed = True  # until the members exist: close() and __del__ have nothing to do
        m = len(endpoints)  # one endpoint listed twice is allowed: that server then serves two shares
        self.endpoints = [str(e) for e in endpoints]
        self.options, self.timeout_s, self.prefetch = options, float(options.timeout_s), options.prefetch
        self.merge = MERGES[options.merge]()
        curve = {k: v for k, v in (("server_public_key", options.server_public_key),
                                   ("client_keys", options.client_keys)) if v}
        self.losses = Losses(POLICIES[options.on_server_loss], self.endpoints, self.timeout_s, curve, answers)
        self.delivered_by = dict.fromkeys(self.endpoints, 0)  # batches returned to the trainer, per server
        self.wait_s, self.batches_taken = 0.0, 0
        self._created = time.monotonic()
        start, state = options.start(), options.state
        pending = _saved_runs(state, m)
        self.rank, self.world_size, self.epoch = start.rank, start.world_size, start.epoch
        self.members = Members(endpoints, connect, start)
        self._plan: EpochPlan | None = None
        self._closed = False
        try:
            first = self._first_contact()
            self.info, self.x_dtype = dict(first.stream.info), first.stream.x_dtype
            self.steps: int = first.stream.steps_per_epoch
            if state is not None and pending is None:  # an ordered position: merged batch b
                pending = [[s, (start.batch + m - 1 - s) // m, self.steps] for s in range(m)]
            alive = self.losses.alive()
            self._plan = EpochPlan(m, self.steps, alive, pending=pending, prefer={first.share: first.server},
                                   returned=start.batch if state is not None else None,
                                   only=self.losses.policy.planned_shares(alive))
            if options.merge == "ordered" and state is not None and state.get("merge") == "balanced" \
                    and not self._plan.is_ordered():
                raise ConfigError("this state comes from merge='balanced' mid-epoch: resume it with merge='balanced'")
            self.ensure_members()
            self._drop_idle_members()
        except BaseException:
            self.close()
            raise

    def _first_contact(self) -> Member:
        """The first server that answers: its welcome tells seed, fingerprint and batches per share."""
        for server in range(len(self.endpoints)):
            try:
                return self.members.open(server, server, self.epoch, 0)
            except LoaderError as exc:
                if self.losses.policy.raises(exc):
                    raise
                self.losses.record(server, exc, (self.epoch, 0))
        raise self.losses.all_gone()

    # ---------------------------------------------------------------- the Stream protocol
    @property
    def plan(self) -> EpochPlan:
        assert self._plan is not None, "the plan exists once the first server answered"
        return self._plan

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.size

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.plan.delivered

    @property
    def shared_memory(self) -> bool:
        return bool(self.members.all) and all(s.stream.shared_memory for s in self.members.all)

    @property
    def servers(self) -> Servers:
        return Servers(tuple(self.endpoints), tuple(self.endpoints[s] for s in self.losses.alive()),
                       tuple(sorted(self.losses.prober.ready())), dict(self.delivered_by))

    @property
    def lost(self) -> list[dict[str, Any]]:
        return self.losses.lost

    def take(self) -> Delivery:
        if self.losses.failure is not None:
            raise self.losses.failure
        if self._closed:
            raise LoaderError("the client is closed")
        started = time.perf_counter()
        try:
            got = self.merge.next(self)
        finally:
            self.wait_s += time.perf_counter() - started
        info = BatchInfo(self.epoch, self.plan.delivered - 1, got.info.indices)
        self.batches_taken += 1
        if self.plan.done:
            self._next_epoch()
        return Delivery(got.x, got.y, got.extras, info)

    def state_dict(self) -> dict[str, Any]:
        """Merged position and server count; with the balanced merge or dropped shares, the runs not returned yet."""
        state: dict[str, Any] = {"epoch": self.epoch, "batch": self.plan.delivered, "seed": self.members.seed,
                                 "rank": self.rank, "world_size": self.world_size,
                                 "fingerprint": self.members.fingerprint, "servers": len(self.endpoints)}
        if self.options.merge == "balanced":
            state["merge"] = "balanced"
        if self.options.merge == "balanced" or not self.losses.policy.hands_over:
            state["pending"] = self.plan.pending()
        return state

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        streams = []
        for s in self.members.all:
            where = {"endpoint": self.endpoints[s.server], "share": s.share}
            try:
                streams.append({**where, **s.stream.stats(server=server)})
            except LoaderError as exc:
                streams.append({**where, "error": str(exc)})
        wall = time.monotonic() - self._created
        return {"streams": streams, "lost": self.lost, "active_endpoints": list(self.servers.active),
                "delivered_by": dict(self.delivered_by), "batches_taken": self.batches_taken, "wait_s": self.wait_s,
                "wall_s": wall, "stall_fraction": self.wait_s / max(wall, 1e-9), "position": list(self.position)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.losses.close()
        self.members.close_all()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # ---------------------------------------------------------------- for the merges (merges.Merged)
    def fail(self, server: int, exc: BaseException) -> None:
        """A member or a handshake on `server` failed: the loss policy says what follows."""
        where = (self.epoch, self._plan.delivered if self._plan is not None else 0)
        self.losses.handle(server, exc, self._plan, where, self.members.close_server)

    def ensure_members(self) -> None:
        """Give every task with batches left a member on its server, positioned at its next batch."""
        while (unserved := next_unserved(self.plan, self.members.all, self.epoch)) is not None:
            task, ready = unserved
            if ready is not None:
                ready.task = task
                self.merge.started(ready, self)
                continue
            try:
                member = self.members.open(task.server, task.share, self.epoch, task.next, task)
            except LoaderError as exc:
                self.fail(task.server, exc)
                continue
            self.losses.rejoining.discard(task.server)
            self.merge.started(member, self)

    def deliver(self, member: Member, info: BatchInfo) -> None:
        task = member.task
        assert task is not None
        if (info.epoch, info.batch) != (self.epoch, task.next):
            raise ProtocolError(f"expected epoch {self.epoch} batch {task.next} of share {task.share} from "
                                f"{self.endpoints[member.server]}, got epoch {info.epoch} batch {info.batch}")
        self.plan.deliver(task, info.batch)
        member.advance(self.steps)
        self.delivered_by[self.endpoints[member.server]] += 1

    # ---------------------------------------------------------------- epochs
    def _drop_idle_members(self) -> None:
        for s in [s for s in self.members.all if s.task is None or s.task.handed_on(self.steps)]:
            self.members.close(s)

    def _next_epoch(self) -> None:
        """The epoch is complete: rejoin servers that answer again, and plan the next one."""
        self.epoch += 1
        for endpoint in sorted({self.endpoints[s] for s in self.losses.rejoin()}):
            _log.info("loader server %s answers again: it rejoins at epoch %d", endpoint, self.epoch)
        alive = self.losses.alive()
        positioned = [(s.share, s.server) for s in self.members.all if (s.epoch, s.batch) == (self.epoch, 0)]
        self._plan = next_epoch_plan(len(self.endpoints), self.steps, alive, positioned,
                                     only=self.losses.policy.planned_shares(alive))
        for s in self.members.all:
            s.task = None
        self.ensure_members()
        self._drop_idle_members()
        if self.options.log_epochs:
            _log.info("epoch %d: serving from %s", self.epoch, ", ".join(self.servers.active))


def _saved_runs(state: Mapping[str, Any] | None, servers: int) -> list[list[int]] | None:
    """The saved state's batch runs not returned yet (None: an ordered position), checked against the servers."""
    if state is None:
        return None
    if state.get("servers") not in (None, servers):
        raise ConfigError(f"the saved state is for {state.get('servers')} servers, not {servers}: the shares "
                          "depend on the server count; list the same number of endpoints")
    pending = state.get("pending")
    if pending is not None and not isinstance(pending, list):
        raise ValueError("`state` pending must be a list of [share, next, stop]")
    return pending
