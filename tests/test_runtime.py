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
from loader_client.contract.messages import Hello
from loader_client.contract.sampling import SamplingPlan
from loader_server.runtime.arenas import Arena, arena_slots
from loader_server.runtime.bad_files import BadFiles
from loader_server.runtime.sessions import Refusal, Session, StreamFacts, fingerprint_mismatch, open_session
from loader_server.runtime.supervisor import Supervisor

#: The most credit a client may hold (README: "at most 64 batches of credit"), written out: a changed cap
#: must fail here, not follow the code's constant.
MAX_CREDIT = 64

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
    arena.hand_over(slot, b"c")
    arena.give_back(slot)  # sent: the server keeps it no longer, the client holds it
    assert slot not in arena.free
    with pytest.raises(ProtocolError, match="does not hold"):
        arena.release([0], b"c")
    with pytest.raises(ProtocolError, match="does not hold"):
        arena.release([slot, slot], b"c")
    with pytest.raises(ProtocolError, match="does not hold"):
        arena.release([slot], b"another client")
    arena.release([slot], b"c")
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


# ---------------------------------------------------------------------------- what a session holds, written out
def test_an_opened_session_holds_exactly_what_its_hello_and_the_server_say() -> None:
    facts = StreamFacts(**{**FACTS.__dict__, "augment_available": True})
    opened = open_session(Hello(rank=1, world_size=2, epoch=2, batch=3, seed=9, credit=5, client="trainer-1",
                                augment=True), "trainer-1", steps_for=steps_for, facts=facts, now=12.5)
    assert isinstance(opened, Session)
    assert (opened.name, opened.rank, opened.world_size, opened.seed, opened.steps, opened.prefetch) == \
        ("trainer-1", 1, 2, 9, 5, 3)  # 40 samples over 2 ranks in batches of 4: 5 batches each
    assert (opened.in_order, opened.augment, opened.credit, opened.last_seen, opened.last_sent) == \
        (True, True, 5, 12.5, 12.5)
    assert (opened.next_schedule, opened.next_send) == (2 * 5 + 3, 2 * 5 + 3)
    assert opened.describe() == {"name": "trainer-1", "rank": 1, "world_size": 2, "epoch": 2, "batch": 3,
                                 "share": None, "stall": None, "wait_s": None, "wall_s": None}


@pytest.mark.parametrize(("available", "asked", "augmented"),
                         [(True, True, True), (True, False, False), (False, True, False), (False, False, False)])
def test_a_session_is_augmented_only_when_the_server_can_and_the_client_asks(available: bool, asked: bool,
                                                                             augmented: bool) -> None:
    facts = StreamFacts(**{**FACTS.__dict__, "augment_available": available})
    opened = open_session(Hello(augment=asked), "c", steps_for=steps_for, facts=facts, now=0.0)
    assert isinstance(opened, Session) and opened.augment is augmented


def test_a_world_that_leaves_exactly_one_batch_per_rank_is_served() -> None:
    """40 samples in batches of 4: 10 ranks get one batch each (served), 11 get none (refused)."""
    one = open_session(Hello(rank=9, world_size=10), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert isinstance(one, Session) and one.steps == 1
    none = open_session(Hello(rank=0, world_size=11), "c", steps_for=steps_for, facts=FACTS, now=0.0)
    assert none == Refusal("config", "world_size 11 leaves no full batch of 4 per rank from 40 samples; use fewer "
                                     "ranks, a smaller batch or --keep-last")


def test_every_refusal_is_a_config_error_with_its_whole_message() -> None:
    def refusal(**hello: Any) -> Refusal:
        r = open_session(Hello(**hello), "c", steps_for=steps_for, facts=FACTS, now=0.0)
        assert isinstance(r, Refusal)
        return r

    assert refusal(rank=2, world_size=2) == Refusal(
        "config", "rank 2 of world_size 2 is out of range: need 0 <= rank < world_size (ranks count from 0)")
    assert refusal(batch=10, epoch=1) == Refusal(
        "config", "start position epoch 1 batch 10 is outside the epoch of 10 batches")
    assert refusal(fingerprint="xx-bb") == Refusal(
        "config", "cannot resume: the batch settings (size, resize, dtype, sampling, ...) differ from the saved "
                  "state (saved xx-bb, server aa-bb); start the server with the original settings and data")


@pytest.mark.parametrize(("saved", "what"), [
    ("aa-cc", "the data set index (files or labels)"),
    ("xx-cc", "the batch settings (size, resize, dtype, sampling, ...) and the data set index (files or labels)"),
    ("aa-bb-cc", "the data set index (files or labels)"),  # a tampered state: split at its first dash
    ("aa", "the data set index (files or labels)"),
])
def test_a_refused_resume_names_what_differs(saved: str, what: str) -> None:
    assert fingerprint_mismatch(saved, "aa-bb") == (
        f"cannot resume: {what} differ from the saved state (saved {saved}, server aa-bb); start the server with "
        "the original settings and data")
    assert fingerprint_mismatch("aa-bb", "aa-bb") == (
        "cannot resume: the fingerprint differ from the saved state (saved aa-bb, server aa-bb); start the server "
        "with the original settings and data")


def test_events_move_the_clocks_they_name() -> None:
    s = session(credit=1)
    s.seen(3.0)
    assert (s.last_seen, s.last_sent) == (3.0, 0.0)
    s.grant(1, 4.0)
    assert (s.last_seen, s.credit) == (4.0, 2)
    (position,) = s.to_build()[:1]
    s.built(position, "b")
    s.sent(position, 5.0)
    assert (s.last_sent, s.last_seen, s.next_send) == (5.0, 4.0, 1)
    with pytest.raises(KeyError, match="position 99 is not being built for this session"):
        s.built(99, "x")


# ---------------------------------------------------------------------------- the trainer's stall, written out
def test_a_stall_report_needs_both_times_that_only_grow() -> None:
    s = session()
    s.report(None, None)  # no report (a client that does not measure): nothing recorded
    assert list(s.reports) == [] and s.stall() is None
    with pytest.raises(ProtocolError, match="^a stall report needs both wait_s and wall_s$"):
        s.report(1.0, None)
    with pytest.raises(ProtocolError, match="^a stall report needs both wait_s and wall_s$"):
        s.report(None, 1.0)
    with pytest.raises(ProtocolError, match=r"^stall report: wait_s 2\.5 exceeds wall_s 2$"):
        s.report(2.5, 2.0)
    s.report(2.000001, 2.0)  # within a microsecond of the wall time: clock rounding, taken
    with pytest.raises(ProtocolError, match=r"^stall report went back in time: wait_s 1, wall_s 1\.5 after 2, 2$"):
        s.report(1.0, 1.5)  # the wall time went back
    with pytest.raises(ProtocolError, match=r"^stall report went back in time: wait_s 1\.9, wall_s 3 after 2, 2$"):
        s.report(1.9, 3.0)  # the waiting went back
    assert list(s.reports) == [(2.0, 2.000001)]


def test_reports_closer_than_50_ms_replace_each_other_and_one_before_the_window_is_kept() -> None:
    s = session()
    s.report(0.0, 0.0)
    s.report(0.0, 0.0)  # the same times again: not back in time, taken
    s.report(0.005, 0.01)  # 10 ms after the report before the last: replaces the last
    s.report(0.02, 0.04)  # 40 ms: replaces it again
    assert list(s.reports) == [(0.0, 0.0), (0.04, 0.02)]
    s.report(0.03, 0.05)  # exactly 50 ms after the report before the last: kept
    assert list(s.reports) == [(0.0, 0.0), (0.04, 0.02), (0.05, 0.03)]
    later = session()  # the spacing is measured in wall time, from the report before the last
    later.report(2.0, 10.0)
    later.report(2.1, 10.01)
    later.report(2.2, 10.04)
    later.report(2.3, 10.2)
    assert list(later.reports) == [(10.0, 2.0), (10.04, 2.2), (10.2, 2.3)]
    t = session()
    for wall in (10.0, 11.0, 12.0, 13.0):
        t.report(wall / 10, wall, window_s=2.0)
    # At 13 the window starts at 11: 11 is the one report at or before its start that stays.
    assert [w for w, _ in t.reports] == [11.0, 12.0, 13.0]
    t.report(1.45, 14.5, window_s=2.0)
    assert [w for w, _ in t.reports] == [12.0, 13.0, 14.5]  # from 12.5: 12 stays
    t.report(2.0, 20.0, window_s=2.0)  # after a gap: only the last report before the window and this one
    assert [w for w, _ in t.reports] == [14.5, 20.0]
    assert t.stall(window_s=2.0) == pytest.approx((2.0 - 1.45) / (20.0 - 14.5))


def test_the_stall_is_the_growth_of_waiting_over_the_growth_of_wall_time_in_the_window() -> None:
    s = session()
    s.report(2.0, 10.0)
    assert s.stall(window_s=2.0) is None  # one report: no span
    s.report(2.2, 10.5)
    assert s.stall(window_s=2.0) is None  # 0.5 s spanned: less than half the 2 s window
    s.report(2.3, 10.999)
    assert s.stall(window_s=2.0) is None  # still just under half
    s.report(2.5, 11.0)  # exactly half the window: measured, from the first report to the last
    assert s.stall(window_s=2.0) == pytest.approx((2.5 - 2.0) / (11.0 - 10.0))
    s.report(3.5, 12.0)
    assert s.stall(window_s=2.0) == pytest.approx((3.5 - 2.0) / (12.0 - 10.0))  # 0.75: not from the 2nd report
    assert s.describe()["stall"] == s.stall() and (s.describe()["wait_s"], s.describe()["wall_s"]) == (3.5, 12.0)
    two = session()
    two.report(1.0, 20.0)
    two.report(1.0, 21.0)  # exactly two reports, a trainer that did not wait
    assert two.stall(window_s=2.0) == 0.0
    busy = session()
    busy.report(0.0, 0.0)
    busy.report(1.000001, 1.0)  # waited the whole second (and a rounding microsecond): capped at 1
    assert busy.stall(window_s=2.0) == 1.0


def test_a_stream_ends_after_the_last_batch_of_epoch_2_31_minus_1() -> None:
    s = session()  # 10 batches an epoch
    assert s.end == 2**31 * 10  # the first position past epoch 2**31 - 1
    s.next_schedule = s.end - 1
    assert s.to_build() == [2**31 * 10 - 1] and s.to_build() == []  # the last batch, and nothing after it


def test_a_manifest_is_refused_for_batches_over_1024_samples_and_the_share_is_kept() -> None:
    def facts(batch: int) -> StreamFacts:
        return StreamFacts(**{**FACTS.__dict__, "batch_size": batch, "num_samples": 4096})

    at = open_session(Hello(manifest=True, share="sweep"), "c", steps_for=lambda w: 3, facts=facts(1024), now=0.0)
    assert isinstance(at, Session) and (at.manifest, at.share) == (True, "sweep")
    assert at.describe()["share"] == "sweep"
    over = open_session(Hello(manifest=True), "c", steps_for=lambda w: 3, facts=facts(1025), now=0.0)
    assert over == Refusal("config", "a batch manifest describes at most 1024 samples; batches of 1025 have none: "
                                     "create the client without manifest=True, and ask "
                                     "client.sources(client.last.indices) instead")
    plain = open_session(Hello(), "c", steps_for=lambda w: 3, facts=facts(1025), now=0.0)
    assert isinstance(plain, Session) and (plain.manifest, plain.share) == (False, None)
