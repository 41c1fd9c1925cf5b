"""Unit tests of the server's pure runtime logic: sessions, supervision, arenas, the skip policy.

No sockets and no processes: these run in milliseconds, beside the process tests that cover
the same promises end to end.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from loader_client.contract.errors import ProtocolError
from loader_client.contract.messages import MAX_CREDIT, Hello
from loader_server.runtime.arenas import Arena, arena_slots
from loader_server.runtime.bad_files import BadFiles
from loader_server.runtime.sessions import Refusal, Session, StreamFacts, open_session
from loader_server.runtime.supervisor import Supervisor
from loader_server.sampling import SamplingPlan

FACTS = StreamFacts(batch_size=4, num_samples=40, default_seed=7, fingerprint="aa-bb", prefetch=3, in_order=True,
                    augment_available=False)


def steps_for(world_size: int) -> int:
    return SamplingPlan(40, 4).steps_per_epoch(world_size)


def session(**hello: Any) -> Session[Any]:
    opened = open_session(Hello(**hello), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert isinstance(opened, Session)
    return opened


# ---------------------------------------------------------------------------- sessions
def test_credit_is_never_exceeded_and_clamped() -> None:
    s = session(credit=2)
    for position in s.to_build():
        s.built(position, f"batch {position}")
    sent = []
    while (item := s.sendable()) is not None:
        s.sent(item[0], 1.0)
        sent.append(item[0])
    assert sent == [0, 1] and s.credit == 0  # two credits, two batches, the third waits
    assert s.sendable() is None
    s.grant(10**6, 2.0)
    assert s.credit == MAX_CREDIT
    assert session(credit=10**6).credit == MAX_CREDIT


def test_batches_leave_in_stream_order_whatever_order_they_finish() -> None:
    s = session(credit=10)
    positions = s.to_build()
    assert positions == [0, 1, 2]  # prefetch 3 outstanding
    assert s.to_build() == []
    s.built(2, "two")
    s.built(1, "one")
    assert s.sendable() is None  # 0 is not ready: nothing may overtake it
    s.built(0, "zero")
    order = []
    while (item := s.sendable()) is not None:
        s.sent(item[0], 0.0)
        order.append(item[1])
    assert order == ["zero", "one", "two"]
    assert s.to_build() == [3, 4, 5]


def test_unordered_sessions_send_what_is_ready() -> None:
    facts = StreamFacts(**{**FACTS.__dict__, "in_order": False})
    s = open_session(Hello(credit=5), "c", steps_for=steps_for, facts=facts, now=0.0)
    assert isinstance(s, Session)
    s.to_build()
    s.built(2, "two")
    item = s.sendable()
    assert item is not None and item[0] == 2


def test_resume_starts_at_the_saved_position() -> None:
    s = session(epoch=3, batch=5, seed=11)
    assert s.position == (3, 5) and s.seed == 11
    assert s.to_build() == [3 * 10 + 5, 3 * 10 + 6, 3 * 10 + 7]
    assert s.place(3 * 10 + 9) == (3, 9) and s.place(4 * 10) == (4, 0)
    assert session().seed == FACTS.default_seed


@pytest.mark.parametrize(("rank", "world"), [(2, 2), (5, 3)])
def test_out_of_range_rank_is_refused_naming_both_values(rank: int, world: int) -> None:
    refused = open_session(Hello(rank=rank, world_size=world), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert isinstance(refused, Refusal) and refused.kind == "config"
    assert f"rank {rank}" in refused.message and f"world_size {world}" in refused.message


def test_refusals_name_what_differs() -> None:
    fp = open_session(Hello(fingerprint="xx-bb"), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert isinstance(fp, Refusal) and "batch settings" in fp.message and "data set index" not in fp.message
    past = open_session(Hello(batch=10), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert isinstance(past, Refusal) and "outside the epoch of 10 batches" in past.message
    too_many = open_session(Hello(world_size=11), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert isinstance(too_many, Refusal) and "world_size 11 leaves no full batch" in too_many.message


def test_rank_shares_of_a_world_are_disjoint_and_cover_the_epoch() -> None:
    plan = SamplingPlan(40, 4)
    seen = []
    for rank in range(2):
        s = session(rank=rank, world_size=2)
        seen += [plan.batch(*s.place(p), seed=s.seed, rank=rank, world_size=2) for p in range(s.steps)]
    union = np.concatenate(seen)
    assert sorted(union.tolist()) == list(range(40))


def test_a_session_stream_covers_each_epoch_exactly_once_reshuffled() -> None:
    """Positions a session sends, turned into samples: every epoch once each, in a new order."""
    plan = SamplingPlan(40, 4)
    s = session(credit=MAX_CREDIT, seed=3)
    sent: list[int] = []
    while len(sent) < 3 * s.steps:
        for position in s.to_build():
            s.built(position, position)
        while (item := s.sendable()) is not None:
            s.sent(item[0], 0.0)
            sent.append(item[1])
    assert sent == list(range(3 * s.steps))
    epochs = [np.concatenate([plan.batch(*s.place(p), seed=s.seed) for p in sent if s.place(p)[0] == e])
              for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(40))  # nothing lost, nothing repeated
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_drain_drops_everything_outstanding() -> None:
    s = session(credit=0)
    for p in s.to_build()[:2]:
        s.built(p, p)
    assert sorted(s.drain()) == [0, 1] and s.outstanding == 0


# ---------------------------------------------------------------------------- supervision
@dataclass
class FakeProcess:
    pid: int
    exitcode: int | None = None
    sentinel: int = 0
    alive: bool = True
    signals: list[str] = field(default_factory=list)

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.signals.append("kill")
        self.alive, self.exitcode = False, -9

    def terminate(self) -> None:
        self.kill()

    def join(self, timeout: float | None = None) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def supervisor(workers: int = 2, clock: Clock | None = None, dumps: list[int] | None = None) -> Supervisor:
    pids = iter(range(1000, 2000))
    sup = Supervisor(lambda wid, ident: FakeProcess(next(pids), sentinel=wid), workers, batch_timeout_s=5.0,
                     clock=clock or Clock(),
                     dump_stack=(lambda p: dumps.append(p.pid)) if dumps is not None else (lambda p: None))
    sup.start()
    for w in sup.workers.values():
        sup.mark_ready(w)
    return sup


def tasks(sup: Supervisor, n: int) -> list[int]:
    return [sup.new_task(b"c", i, np.arange(4), seed=0, epoch=0, augment=False, slot=None).id for i in range(n)]


def test_dispatch_gives_each_worker_at_most_three_tasks() -> None:
    sup = supervisor()
    tasks(sup, 10)
    sent: list[tuple[int, int]] = []
    sup.dispatch(lambda w, t: sent.append((w.id, t.id)) is None)
    assert [len(w.tasks) for w in sup.workers.values()] == [3, 3]
    assert len(sup.queue) == 4 and len(sent) == 6


def test_dispatch_keeps_every_worker_busy_before_queueing_a_second_task_at_one() -> None:
    """8 tasks, 15 workers: 8 workers build one each (depth first, 3 workers built them all)."""
    sup = supervisor(workers=15)
    tasks(sup, 8)
    sent: list[tuple[int, int]] = []
    sup.dispatch(lambda w, t: sent.append((w.id, t.id)) is None)
    assert sorted(len(w.tasks) for w in sup.workers.values()) == [0] * 7 + [1] * 8
    assert [t for _, t in sent] == sorted(t for _, t in sent)  # still in queue order
    sup.finished(sup.workers[sent[0][0]], sent[0][1])
    tasks(sup, 1)
    sup.dispatch(lambda w, t: sent.append((w.id, t.id)) is None)
    assert len(sup.workers[sent[-1][0]].tasks) == 1 and sent[-1][0] not in [w for w, _ in sent[1:8]]  # an idle one
    tasks(sup, 20)
    sup.dispatch(lambda w, t: sent.append((w.id, t.id)) is None)
    assert sorted(len(w.tasks) for w in sup.workers.values()) == [1] * 2 + [2] * 13  # 28 spread, none over 2


def test_a_new_client_is_served_before_the_queued_prefetch_of_another() -> None:
    sup = supervisor(workers=1)
    old = tasks(sup, 8)  # client c: 3 at the worker, 5 queued
    sent: list[int] = []
    sup.dispatch(lambda w, t: sent.append(t.id) is None)
    new = [sup.new_task(b"d", i, np.arange(4), seed=0, epoch=0, augment=False, slot=None).id for i in range(3)]
    sup.finished(sup.workers[0], old[0])
    sup.dispatch(lambda w, t: sent.append(t.id) is None)
    assert sent == old[:3] + [new[0]]  # not after c's 5 queued tasks
    sup.finished(sup.workers[0], old[1])
    sup.dispatch(lambda w, t: sent.append(t.id) is None)
    assert sent[-1] == old[3]  # c and d hold one each at the worker: the queue's order breaks the tie
    sup.finished(sup.workers[0], old[2])
    sup.finished(sup.workers[0], new[0])
    sup.dispatch(lambda w, t: sent.append(t.id) is None)
    assert sent[-2:] == [new[1], old[4]]
    for owner in (b"c", b"d"):  # each client's tasks still go out in their order
        mine = [t for t in sent if t in (old if owner == b"c" else new)]
        assert mine == sorted(mine)


def test_a_dead_workers_tasks_are_reissued_and_only_the_first_is_charged() -> None:
    sup = supervisor(workers=1)
    ids = tasks(sup, 3)
    sup.dispatch(lambda w, t: True)
    worker = sup.workers[0]
    assert worker.tasks == ids
    worker.process.kill()
    dead, given_up = sup.worker_exited(0)
    assert dead is worker and given_up == []
    assert list(sup.queue) == ids  # back at the front, in order
    assert [sup.tasks[i].crashes for i in ids] == [1, 0, 0]
    assert sup.workers[0] is not worker and sup.workers[0].process.pid != worker.process.pid


def test_the_same_batch_killing_three_workers_is_given_up() -> None:
    sup = supervisor(workers=1)
    (tid,) = tasks(sup, 1)
    for attempt in range(1, 4):
        sup.mark_ready(sup.workers[0])
        sup.dispatch(lambda w, t: True)
        assert sup.workers[0].tasks == [tid]
        sup.workers[0].process.kill()
        _, given_up = sup.worker_exited(0)
        if attempt < 3:
            assert given_up == [] and list(sup.queue) == [tid]
    assert len(given_up) == 1 and given_up[0].task.id == tid and given_up[0].task.crashes == 3
    assert "exit code -9" in given_up[0].why and tid not in sup.tasks and not sup.queue


def test_a_silent_worker_is_hung_dumped_then_killed() -> None:
    clock, dumps = Clock(), []
    sup = supervisor(workers=1, clock=clock, dumps=dumps)
    tasks(sup, 1)
    sup.dispatch(lambda w, t: True)
    clock.now += 4.9
    assert sup.tick(lambda t: "batch X") == []
    clock.now += 0.2
    hung = sup.tick(lambda t: "batch X")
    assert hung == [sup.workers[0]] and "batch X" in hung[0].hung and dumps == [hung[0].process.pid]
    assert hung[0].process.is_alive()  # the stack dump gets its grace time first
    clock.now += 1.0
    sup.tick(lambda t: "batch X")
    assert not hung[0].process.is_alive()


def test_cancelled_tasks_are_not_dispatched_and_results_are_ignored() -> None:
    sup = supervisor(workers=1)
    ids = tasks(sup, 2)
    sup.cancel([ids[0]])
    sent: list[int] = []
    sup.dispatch(lambda w, t: sent.append(t.id) is None)
    assert sent == [ids[1]]
    assert sup.finished(sup.workers[0], ids[0]) is None


# ---------------------------------------------------------------------------- arenas, skip policy
def test_arena_slots_follow_their_batches_and_refuse_foreign_releases() -> None:
    arena = Arena(1, -1, 0, 4, 4096, deque(range(4)))
    slot = arena.take()
    assert slot == 3
    arena.hand_over(slot)
    with pytest.raises(ProtocolError, match="does not hold"):
        arena.release([0])
    with pytest.raises(ProtocolError, match="does not hold"):
        arena.release([slot, slot])
    arena.release([slot])
    assert sorted(arena.free) == [0, 1, 2, 3] and not arena.with_client
    assert arena_slots(8, 4) == 14 and arena_slots(8, 10**6) == 18


@pytest.mark.parametrize("limit", [1, 3])
def test_max_bad_tolerates_exactly_the_limit(limit: int) -> None:
    bad = BadFiles(limit, "train.txt")
    for i in range(limit):
        assert bad.note([(f"f{i}", "empty", "empty file")]) == [(f"f{i}", "empty", "empty file")]
        assert not bad.too_many
    assert bad.note([("f0", "empty", "empty file")]) == []  # seen before: not new, not counted again
    assert not bad.too_many
    bad.note([("one-more", "empty", "empty file")])
    assert bad.too_many.startswith(f"{limit + 1} bad files exceed --max-bad ({limit})")
