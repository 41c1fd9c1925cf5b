"""Unit tests of the pure state behind shares and ``--workers auto``: shares (runtime/shares.py),
the trainers' stall reports (sessions.py), shared arena slots (arenas.py), the autoscaler
(autoscale.py) and the supervisor's resize. No server; the end-to-end tests of the same promises
are in tests/test_sharing.py. The processes behind a member (processes.py) are told here from a
real child process and real loopback sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client.contract.errors import ProtocolError
from loader_client.contract.messages import Hello
from loader_client.contract.sampling import SamplingPlan
from loader_server.runtime import processes
from loader_server.runtime.arenas import Arena, LeftBehind, share_arena_slots
from loader_server.runtime.autoscale import Autoscaler, ScalePolicy
from loader_server.runtime.processes import PeerProcesses, Process, ipc_peer_pid, tcp_peer_pids
from loader_server.runtime.sessions import Session, StreamFacts, open_session
from loader_server.runtime.shares import Share, ShareKey, ShareTerms

from .conftest import wait_until
from .test_runtime import Clock, supervisor

TERMS = ShareTerms(world_size=1, seed=7, augment=False)
FACTS = StreamFacts(batch_size=4, num_samples=400, default_seed=7, fingerprint="aa-bb", prefetch=3, in_order=True,
                    augment_available=False)


def new_share(window: int = 4) -> Share[str, str]:
    return Share(ShareKey("sweep", 0), TERMS, window)


def member_session(**hello: Any) -> Session[Any]:
    opened = open_session(Hello(share="sweep", credit=100, **hello), "m",
                          steps_for=lambda w: SamplingPlan(400, 4).steps_per_epoch(w), facts=FACTS, now=0.0)
    assert isinstance(opened, Session)
    return opened


class Loop:
    """What delivery.py does with a share, minus sockets and workers: members' sessions ask the share,
    builds are counted, and each member takes what its session sends."""

    def __init__(self, share: Share[str, str]) -> None:
        self.share = share
        self.sessions: dict[str, Session[Any]] = {}
        self.builds: list[tuple[int, bool]] = []  # (position, behind) of each build started
        self.pending: list[int] = []  # positions being built
        self.got: dict[str, list[int]] = {}

    def join(self, name: str, position: int = 0) -> None:
        s = member_session(epoch=position // 100, batch=position % 100)
        self.sessions[name] = s
        self.got[name] = []
        self.share.join(name, s.next_send)
        self.schedule(name)

    def schedule(self, name: str) -> None:
        s = self.sessions[name]
        for p in s.to_build():
            want = self.share.want(name, p)
            if want.payload is not None:
                s.built(p, want.payload)
            elif want.build:
                self.builds.append((p, want.behind))
                self.pending.append(p)
                self.share.started(p, p)

    def finish_builds(self) -> None:
        while self.pending:
            p = self.pending.pop(0)
            for m in self.share.built(p, f"batch {p}"):
                self.sessions[m].built(p, f"batch {p}")
        self.share.evict()

    def take(self, name: str, n: int) -> None:
        """The member's trainer takes `n` batches (building what it waits for)."""
        s = self.sessions[name]
        for _ in range(n):
            while (item := s.sendable()) is None:
                self.schedule(name)
                self.finish_builds()
            position, payload = item
            assert payload == f"batch {position}"
            s.sent(position, 0.0)
            self.share.handed(name, position)
            self.share.advance(name, s.next_send)
            self.got[name].append(position)
            self.share.evict()
            self.schedule(name)


# ---------------------------------------------------------------------------- shares
def test_members_in_step_get_every_batch_built_once() -> None:
    loop = Loop(new_share())
    for m in ("a", "b", "c"):
        loop.join(m)
    for _ in range(20):
        for m in ("a", "b", "c"):
            loop.take(m, 1)
    for m in ("a", "b", "c"):
        assert loop.got[m] == list(range(20))
    built = [p for p, _ in loop.builds]
    assert len(built) == len(set(built)) and not any(behind for _, behind in loop.builds)
    assert loop.share.reused > 0


def test_a_member_paused_far_behind_holds_nobody_back_skips_nothing_and_rejoins() -> None:
    loop = Loop(new_share(window=4))
    for m in ("a", "b", "c"):
        loop.join(m)
    loop.take("c", 2)
    for _ in range(40):  # c pauses; a and b go on without waiting for it
        loop.take("a", 1)
        loop.take("b", 1)
    assert loop.got["a"] == list(range(40)) and loop.got["c"] == [0, 1]
    assert len(loop.share.entries) <= loop.share.window + 2 * 3 + 3  # bounded: window, holds, c's prefetch
    assert loop.share.behind("c")
    loop.take("c", 50)  # c resumes: its batches are built again for it, in order, none skipped
    assert loop.got["c"] == list(range(52))
    rebuilt = [p for p, behind in loop.builds if behind]
    assert rebuilt and min(rebuilt) <= 5 and max(rebuilt) < 40  # built again while it was behind
    assert not loop.share.behind("c")  # it caught up with the others' window


def test_late_and_resumed_members_start_where_their_state_says() -> None:
    loop = Loop(new_share(window=8))
    loop.join("a")
    loop.take("a", 10)
    loop.join("late", position=8)  # within the window: takes a's batches
    loop.take("late", 4)
    assert loop.got["late"] == [8, 9, 10, 11]
    assert [p for p, _ in loop.builds].count(8) == 1
    loop.join("resumed", position=102)  # epoch 1 batch 2: ahead of everyone, it leads
    loop.take("resumed", 2)
    assert loop.got["resumed"] == [102, 103]


def test_leaving_drops_holds_and_an_empty_share_evicts_everything() -> None:
    share = new_share()
    share.join("a", 0)
    share.join("b", 0)
    assert share.want("a", 0).build
    assert not share.want("b", 0).build
    assert share.built(0, "x") == ["a", "b"]
    share.leave("a")
    assert share.evict() == []  # b still holds it
    share.leave("b")
    assert [e.position for e in share.evict()] == [0]
    with pytest.raises(KeyError):
        share.built(5, "y")  # never asked for


def test_a_failed_build_names_its_waiting_members() -> None:
    share = new_share()
    for m in ("a", "b"):
        share.join(m, 0)
        share.want(m, 0)
    assert share.failed(0) == ["a", "b"]
    assert 0 not in share.entries
    assert share.want("a", 0).build  # asked again: built again


def test_terms_name_each_difference() -> None:
    assert TERMS.differences(TERMS) == []
    other = ShareTerms(world_size=2, seed=8, augment=True)
    assert TERMS.differences(other) == ["world_size 2 (the share has 1)", "seed 8 (the share has 7)",
                                        "augment=True (the share has augment=False)"]


# ---------------------------------------------------------------------------- stall reports
def test_stall_is_the_recent_growth_of_waiting_over_wall_time() -> None:
    s = member_session()
    assert s.stall() is None
    for i in range(41):  # 0.1 s apart, waiting 10% of the time
        s.report(0.01 * i, 0.1 * i)
    assert s.stall() == pytest.approx(0.1)
    for i in range(41, 61):  # then waiting half the time for 2 s
        s.report(0.4 + 0.05 * (i - 40), 0.1 * i)
    assert s.stall() == pytest.approx(0.5, abs=0.03)
    assert len(s.reports) <= 2 / 0.05 + 2


def test_many_reports_keep_a_bounded_record() -> None:
    s = member_session()
    for i in range(100_000):
        s.report(0.0, i * 1e-4)
    assert len(s.reports) < 50


@pytest.mark.parametrize("wait,wall,match", [(2.0, 1.0, "exceeds"), (None, 1.0, "both"), (0.0, 0.5, "back in time")])
def test_bad_stall_reports_are_refused(wait: float | None, wall: float | None, match: str) -> None:
    s = member_session()
    s.report(0.1, 1.0)
    with pytest.raises(ProtocolError, match=match):
        s.report(wait, wall)


# ---------------------------------------------------------------------------- arenas
def arena_with_slot(*holders: bytes) -> tuple[Arena, int]:
    """An arena of 4 slots, one taken and handed over to each of `holders`."""
    arena = Arena(1, -1, 0, 4, 4096, deque(range(4)))
    slot = arena.take()
    assert slot is not None
    for m in holders:
        arena.hand_over(slot, m)
    return arena, slot


def test_a_shared_slot_is_freed_when_the_last_member_releases_it() -> None:
    arena, slot = arena_with_slot(b"a", b"b", b"c")
    arena.give_back(slot)  # the share keeps it no longer
    arena.release([slot], b"a")
    arena.release([slot], b"b")
    assert slot not in arena.free
    with pytest.raises(ProtocolError):
        arena.release([slot], b"a")  # a released it already
    arena.release([slot], b"c")
    assert slot in arena.free


def test_a_slot_the_share_keeps_stays_after_every_release() -> None:
    arena, slot = arena_with_slot(b"a")
    arena.release([slot], b"a")
    assert slot not in arena.free  # still in the share's window
    arena.give_back(slot)
    assert slot in arena.free


def test_slots_a_leaving_member_held_are_never_reused() -> None:
    arena, slot = arena_with_slot(b"a", b"b")
    arena.give_back(slot)
    arena.forget(b"a")  # a's process may still read it
    arena.release([slot], b"b")
    assert slot not in arena.free and slot in arena.orphans
    assert share_arena_slots(8, 16) > 16 + 8


def test_slots_of_a_member_are_reused_once_its_process_has_exited() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        processes = PeerProcesses.of((child.pid,))
        assert processes.known and not processes.gone()
        arena, slot = arena_with_slot(b"a", b"b")
        arena.give_back(slot)
        arena.forget(b"a", processes)
        arena.release([slot], b"b")
        assert arena.reclaim() == 0 and slot in arena.orphans and slot not in arena.free  # a may still read it
        assert "1 until their processes exit" in arena.fullness()
        child.kill()
        deadline = time.monotonic() + 30
        while not processes.gone():  # a zombie (not reaped yet) has released its memory: gone
            assert time.monotonic() < deadline, "the killed process never counted as gone"
            time.sleep(0.01)
        assert arena.reclaim() == 1 and slot in arena.free and not arena.orphans and not arena.left
        assert arena.reclaimed == 1
    finally:
        child.kill()
        child.wait()


def test_a_process_whose_main_thread_exited_is_alive_while_another_thread_runs() -> None:
    """Its main thread shows as a zombie in /proc/PID/stat, but its memory (an arena's slots) is still mapped."""
    script = ("import ctypes, threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
              "print(flush=True); ctypes.CDLL(None).pthread_exit(None)")
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"\n"
            deadline = time.monotonic() + 30
            while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline, "the main thread never exited"
                time.sleep(0.01)
            processes = PeerProcesses.of((child.pid,))
            assert processes.known and not processes.gone()
            child.kill()
            child.wait()
            assert processes.gone()
        finally:
            child.kill()


def test_an_orphan_that_two_leavers_held_waits_for_both_and_a_held_one_for_its_holder() -> None:
    arena, slot = arena_with_slot(b"a", b"b", b"c")
    arena.give_back(slot)
    gone = PeerProcesses((Process(os.getpid(), -1),))  # this pid with another start time: not this process
    alive = PeerProcesses.of((os.getpid(),))
    assert gone.gone() and not alive.gone()
    arena.forget(b"a", gone)
    arena.forget(b"b", alive)
    assert arena.reclaim() == 0 and slot in arena.orphans  # b's process may still read it
    arena.left[-1] = LeftBehind({slot}, gone)  # b's process exits too
    assert arena.reclaim() == 1 and slot not in arena.free  # c still holds it
    arena.release([slot], b"c")
    assert slot in arena.free


def test_peer_processes_as_the_kernel_tells_them(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ipc_peer_pid(":0:0:1234") == 1234 and ipc_peer_pid("?") == 0 and ipc_peer_pid(None) == 0
    assert not PeerProcesses.of((0,)).known and not PeerProcesses().gone()  # unknown: never gone
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as ours:
            conn, _ = server.accept()
            with conn:
                assert tcp_peer_pids(conn.fileno()) == (os.getpid(),)  # the holder of the other end
                found = PeerProcesses.of_tcp(conn.fileno())  # the same, found in the background
                wait_until(lambda: found.known, 30, "the background scan")
                assert [p.pid for p in found.processes] == [os.getpid()] and not found.gone()
                assert tcp_peer_pids(conn.fileno(), budget_s=-1) == ()  # out of time: nobody
                busy = processes._ScanClock()
                busy.add(processes.SCAN_TIME_SHARE * 20)
                monkeypatch.setattr(processes, "_scans", busy)
                assert tcp_peer_pids(conn.fileno()) == ()  # scans took their share of the loop's time lately
                monkeypatch.undo()
                assert ours.fileno() >= 0
    with socket.socket() as server, socket.socket(socket.AF_INET6) as ours:  # a dual-stack client, as libzmq's
        server.bind(("127.0.0.1", 0))
        server.listen()
        ours.connect(("::ffff:127.0.0.1", server.getsockname()[1]))
        conn, _ = server.accept()
        with conn:
            assert tcp_peer_pids(conn.fileno()) == (os.getpid(),)
    assert tcp_peer_pids(-1) == () and not PeerProcesses.of_tcp(-1).known


def test_an_ipc_peer_is_gone_only_once_nothing_holds_its_end_of_the_connection() -> None:
    """The peer's end of a unix socket, from sock_diag; a process that forked after connecting holds it too:
    the peer is not gone while that child lives, though the pid SO_PEERCRED gave has exited."""
    ours, theirs = socket.socketpair()
    with ours:
        assert processes.unix_peer_inode(ours.fileno()) == os.fstat(theirs.fileno()).st_ino
        assert processes.unix_peer_inode(-1) is None
        ready, leave, go = os.pipe(), os.pipe(), os.pipe()
        first = os.fork()
        if first == 0:  # the trainer: forks a child holding the socket (as a data-loader worker), then exits
            try:
                os.close(leave[1])
                os.close(ready[0])
                os.close(go[1])
                if os.fork() == 0:
                    os.close(go[0])
                    os.write(ready[1], b"x")
                    os.read(leave[0], 1)  # until the test closes its end
                else:
                    os.read(go[0], 1)  # until the test has told it (as at its hello)
            finally:
                os._exit(0)
        theirs.close()
        for fd in (ready[1], leave[0], go[0]):
            os.close(fd)
        assert os.read(ready[0], 1) == b"x"
        peer = PeerProcesses.of_ipc(first, ours.fileno(), os.getuid())  # (as if told at the hello)
        assert peer.known and not peer.gone()
        os.close(go[1])  # the trainer exits
        os.waitpid(first, 0)
        for _ in range(20):
            assert not peer.gone()  # the child holds the trainer's end: not gone
            time.sleep(0.02)
        assert len(peer.processes) == 2  # the trainer (exited) and the child found holding its end
        os.close(leave[1])  # the child exits
        wait_until(peer.gone, 30, "the child to exit and no process to hold the socket")
        os.close(ready[0])
        assert not PeerProcesses.of_ipc(first, ours.fileno(), os.getuid()).known  # exited before its hello


# ---------------------------------------------------------------------------- autoscaler
POLICY = ScalePolicy(lo=1, hi=8, target=0.02, interval_s=3.0)


def run_scaler(scaler: Autoscaler, start: float, seconds: float, stall: float | None, busy_workers: float,
               workers: int, busy_s: float) -> tuple[list[tuple[float, int]], float, int]:
    """Tick every 0.1 s for `seconds`; returns (time, new count) of each change, the busy seconds and the count."""
    changes = []
    t = start
    while t < start + seconds:
        t += 0.1
        busy_s += 0.1 * min(busy_workers, workers)
        change = scaler.observe(t, {"trainer": stall}, busy_s, workers)
        if change is not None:
            assert change.before == workers and change.reason
            workers = change.workers
            changes.append((t, workers))
    return changes, busy_s, workers


def test_autoscaler_adds_workers_for_a_stalled_trainer_in_proportion() -> None:
    scaler = Autoscaler(POLICY, 0.0)
    changes, _, workers = run_scaler(scaler, 0.0, 3.5, stall=0.5, busy_workers=2, workers=2, busy_s=0.0)
    assert changes == [(pytest.approx(3.0), 5)]  # 2 / (1 - 0.5) x 1.1 = 4.4 -> 5


def test_autoscaler_never_changes_faster_than_its_interval_and_stays_in_bounds() -> None:
    scaler = Autoscaler(POLICY, 0.0)
    changes, _, workers = run_scaler(scaler, 0.0, 30.0, stall=0.9, busy_workers=100, workers=1, busy_s=0.0)
    times = [t for t, _ in changes]
    assert all(b - a >= POLICY.interval_s - 1e-9 for a, b in zip(times, times[1:], strict=False))
    assert workers == POLICY.hi and len(changes) <= 3


def test_autoscaler_adds_workers_before_a_trainer_waits_when_what_was_built_ahead_runs_out() -> None:
    def run(used_per_built: float, busy_workers: float) -> list[Any]:
        scaler = Autoscaler(POLICY, 0.0)
        return [c for i in range(1, 36) if (c := scaler.observe(i / 10, {"t": 0.0}, busy_workers * i / 10, 3,
                                                                used=int(10 * used_per_built * i), built=10 * i))]

    made = run(2.0, 3.0)  # busy, and twice the batches taken that are built: twice the workers, and a margin
    assert len(made) == 1 and made[0].workers == 7 and "2.00 batches for each one built" in made[0].reason
    assert run(1.0, 3.0) == []  # busy, but keeping up (or building ahead): no change
    assert run(2.0, 2.6) == []  # taking more than is built, with slack left: the workers catch up


def test_autoscaler_does_not_add_idle_workers() -> None:
    scaler = Autoscaler(POLICY, 0.0)
    changes, _, _ = run_scaler(scaler, 0.0, 10.0, stall=0.5, busy_workers=0.5, workers=2, busy_s=0.0)
    assert all(n <= 2 for _, n in changes)  # the limit is not the workers: none added


def test_autoscaler_releases_workers_that_are_not_needed_down_to_the_minimum() -> None:
    scaler = Autoscaler(POLICY, 0.0)
    changes, _, workers = run_scaler(scaler, 0.0, 20.0, stall=0.0, busy_workers=1.4, workers=8, busy_s=0.0)
    assert changes[0][1] == 4  # at most half at once
    assert workers == 2  # 1.4 busy workers at 75%: 2
    scaler = Autoscaler(POLICY, 0.0)
    _, _, workers = run_scaler(scaler, 0.0, 30.0, stall=None, busy_workers=0.0, workers=8, busy_s=0.0)
    assert workers == POLICY.lo  # no trainer, no work: the minimum


def test_autoscaler_keeps_workers_while_a_trainer_waits_a_little() -> None:
    scaler = Autoscaler(POLICY, 0.0)
    changes, _, _ = run_scaler(scaler, 0.0, 20.0, stall=0.015, busy_workers=1.0, workers=4, busy_s=0.0)
    assert changes == []  # under the target, but over half of it: no change either way


# ---------------------------------------------------------------------------- supervisor resize
def test_resize_spawns_and_retires_and_every_task_is_built_once() -> None:
    clock = Clock()
    sup = supervisor(workers=2, clock=clock)
    ids = [sup.new_task(b"c", i, np.arange(4), seed=0, epoch=0, augment=False, slot=None).id for i in range(12)]
    sup.dispatch(lambda w, t: True)
    spawned, retiring = sup.resize(4)
    assert spawned == [2, 3] and retiring == [] and sup.active == 4
    for w in sup.workers.values():
        sup.mark_ready(w)
    sup.dispatch(lambda w, t: True)
    busy = {wid: list(w.tasks) for wid, w in sup.workers.items()}
    spawned, retiring = sup.resize(1)
    assert spawned == [] and len(retiring) == 3 and sup.active == 1
    finished: list[int] = []
    for wid in retiring:  # the retiring finish what they hold, then are stopped; none gets more
        w = sup.workers[wid]
        assert not w.process.signals
        for tid in busy[wid]:
            task = sup.finished(w, tid)
            assert task is not None
            finished.append(task.id)
            sup.dispatch(lambda w, t: True)
            assert all(set(sup.workers[r].tasks) <= set(busy[r]) for r in retiring if r in sup.workers)
        assert w.process.signals == ["kill"]  # FakeProcess.terminate
        sup.worker_exited(wid)
        assert wid not in sup.workers  # not replaced
    keeper = next(iter(sup.workers.values()))
    while keeper.tasks or sup.queue:
        sup.dispatch(lambda w, t: True)
        for tid in list(keeper.tasks):
            task = sup.finished(keeper, tid)
            assert task is not None
            finished.append(task.id)
    assert sorted(finished) == ids


def test_a_retiring_worker_that_dies_returns_its_tasks() -> None:
    sup = supervisor(workers=2)
    ids = [sup.new_task(b"c", i, np.arange(4), seed=0, epoch=0, augment=False, slot=None).id for i in range(4)]
    sup.dispatch(lambda w, t: True)
    _, retiring = sup.resize(1)
    w = sup.workers[retiring[0]]
    held = list(w.tasks)
    w.process.kill()
    sup.worker_exited(w.id)
    assert set(held) <= set(sup.queue) and w.id not in sup.workers and len(sup.workers) == 1
    assert set(ids) == set(sup.tasks)
