"""How a several-server stream picks its next batch: ``merge="ordered"`` or ``merge="balanced"``.

* `OrderedMerge` (the default): merged batch b is batch ``b // m`` of share ``b % m`` (the next
  batch of the plan's deterministic order), a pure function of (seed, epoch, rank, world size,
  server count), whichever server builds it. Throughput is m times the slowest server's.
* `BalancedMerge`: the next batch is whichever share's stream has one ready (each member is
  pumped by a thread onto one queue), and a server that has finished its part of the epoch
  takes the back half of the largest task still being built. Faster servers deliver more;
  every batch is still returned exactly once per epoch, and epochs never mix, but the order
  inside an epoch depends on timing.

A merge asks its `Merged` stream (`HostsStream`) for the plan, the members and what to do with a
failure; it never opens or closes anything itself, except that a member whose task was cut short
by a steal is closed once its part is returned.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

from .contract.errors import LoaderError, LoaderTimeoutError, ProtocolError
from .failover import EpochPlan
from .members import Member, Members
from .stream import BatchInfo, Delivery

__all__ = ["MERGES", "BalancedMerge", "Merged", "OrderedMerge"]


class Merged(Protocol):
    """What a merge uses of the stream it serves."""

    epoch: int
    prefetch: int
    timeout_s: float
    endpoints: list[str]
    members: Members

    @property
    def plan(self) -> EpochPlan: ...

    def fail(self, server: int, exc: BaseException) -> None:
        """`server` failed: lose it (its tasks go elsewhere or are dropped), or raise."""

    def ensure_members(self) -> None:
        """Give every task of the plan with batches left a member positioned at its next batch."""

    def deliver(self, member: Member, info: BatchInfo) -> None:
        """`member` returned the batch at `info` to the trainer: advance the plan."""


class OrderedMerge:
    """The deterministic merge (module doc)."""

    def started(self, member: Member, merged: Merged) -> None:
        """A member got a task (nothing to start: the trainer's thread takes from it)."""

    def next(self, merged: Merged) -> Delivery:
        while True:
            task = merged.plan.ordered_task()
            member = merged.members.of(task)
            if member is None:
                merged.ensure_members()  # a task handed over after a loss gets its member here
                continue
            try:
                got = member.stream.take()
            except LoaderError as exc:
                merged.fail(member.server, exc)
                continue
            merged.deliver(member, got.info)
            return got


class BalancedMerge:
    """The merge whose load follows capacity (module doc)."""

    def __init__(self) -> None:
        self.arrivals: queue.Queue[tuple[Member, Delivery | BaseException]] = queue.Queue()

    def started(self, member: Member, merged: Merged) -> None:
        """Start the thread that takes `member`'s batches, one at a time, onto the arrivals queue."""
        if not member.pumping:
            member.pumping = True
            threading.Thread(target=_pump, args=(member, self.arrivals), daemon=True,
                             name=f"loader-hosts-{merged.endpoints[member.server]}-{member.share}").start()

    def next(self, merged: Merged) -> Delivery:
        while True:
            for s in merged.members.all:
                if s.held is not None and s.task is not None and s.task.remaining and \
                        (s.held.info.epoch, s.held.info.batch) == (merged.epoch, s.task.next):
                    got, s.held = s.held, None
                    merged.deliver(s, got.info)
                    if s.task.handed_on(merged.plan.steps):
                        merged.members.close(s)  # what follows belongs to the task that took its tail
                    else:
                        s.permit.release()
                    return got
            self._steal_for_idle_servers(merged)
            merged.ensure_members()  # tasks handed over after a loss get their member here
            try:
                member, payload = self.arrivals.get(timeout=merged.timeout_s * 3)
            except queue.Empty:  # the streams time out first; this is a last resort
                raise LoaderTimeoutError(f"no batch from any of {merged.endpoints} within "
                                         f"{merged.timeout_s * 3:g} s") from None
            if member.closed:
                continue
            if isinstance(payload, BaseException):
                merged.fail(member.server, payload)
                continue
            info = payload.info
            ahead = (info.epoch, info.batch) == (merged.epoch + 1, 0)  # the next epoch of a finished share
            task = member.task
            if task is not None and (info.epoch, info.batch) != (merged.epoch, task.next) and not (
                    ahead and task.remaining == 0):
                merged.fail(member.server, ProtocolError(
                    f"expected epoch {merged.epoch} batch {task.next} of share {member.share} from "
                    f"{merged.endpoints[member.server]}, got epoch {info.epoch} batch {info.batch}"))
                continue
            member.held = payload

    def _steal_for_idle_servers(self, merged: Merged) -> None:
        if merged.plan.steal_for_idle(merged.prefetch):
            merged.ensure_members()


#: The merges by the name ``merge=`` gives.
MERGES: dict[str, type[OrderedMerge] | type[BalancedMerge]] = {"ordered": OrderedMerge, "balanced": BalancedMerge}


def _pump(member: Member, arrivals: queue.Queue[tuple[Member, Delivery | BaseException]]) -> None:
    """Take one batch at a time from `member` onto the common arrivals queue.

    A function of the member alone (not of the stream), so that an unclosed stream can still be
    garbage-collected and closed."""
    while True:
        member.permit.acquire()
        if member.closed:
            return
        try:
            got = member.stream.take()
        except BaseException as exc:  # handed to the trainer's thread, never lost
            arrivals.put((member, exc))
            return
        arrivals.put((member, got))
