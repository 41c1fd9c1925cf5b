"""Shares and ``--workers auto`` end to end: real servers, workers, clients and trainer processes.

* three members of one share, one paused far behind and then resumed: each gets its epochs exactly
  once and in order, the same batches as a stream of its own, and the batches it held in shared
  memory while the others went on are never overwritten;
* a member SIGKILLed and resumed from its saved state rejoins at its next batch;
* members asking for another stream than the share's are refused, naming the difference;
* the share in each adapter and in ``from_env`` (LOADER_SHARE);
* ``--workers auto`` under a stepped load: workers added while the trainer waits, released when
  its step slows, the changes logged and counted, and every epoch still exact.

No test here depends on speed: each waits for a condition, with a deadline.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, server_stats
from loader_client.contract.errors import ConfigError, ProtocolError
from loader_client.env import from_env

from .conftest import RunningServer, unique_label_list, wait_until

SAMPLES, BATCH = 64, 4
STEPS = SAMPLES // BATCH
REPO = Path(__file__).resolve().parents[1]


def record(client: LoaderClient, n: int) -> list[tuple[int, int, list[int], str]]:
    """Take `n` batches: (epoch, batch, sample indices, digest of x and y) of each."""
    out = []
    for _ in range(n):
        x, y = client.next()[:2]
        out.append(entry(client, x, y))
    return out


def entry(client: LoaderClient, x: np.ndarray, y: np.ndarray) -> tuple[int, int, list[int], str]:
    """(epoch, batch, sample indices, digest of x and y) of the batch `client` just gave."""
    info = client.last
    assert info is not None
    return info.epoch, info.batch, info.indices.tolist(), hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


def check_exact(records: list[tuple[int, int, list[int], str]], start: int = 0) -> None:
    """In order from position `start`, nothing repeated or skipped; each whole epoch every sample once."""
    positions = [e * STEPS + b for e, b, _, _ in records]
    assert positions == list(range(start, start + len(records))), positions
    by_epoch: dict[int, list[int]] = {}
    for e, _, indices, _ in records:
        by_epoch.setdefault(e, []).extend(indices)
    for e, indices in by_epoch.items():
        assert len(indices) == len(set(indices)), f"epoch {e} repeats a sample"
        if len(indices) == SAMPLES:
            assert sorted(indices) == list(range(SAMPLES)), f"epoch {e} is not every sample once"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", SAMPLES)


def share_stats(endpoint: str) -> dict[str, Any]:
    shares = server_stats(endpoint, timeout_s=10)["shares"]
    assert len(shares) == 1, shares
    return dict(shares[0])


# ---------------------------------------------------------------------------- shares
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_three_members_one_paused_each_get_every_epoch_once_in_order(
        start_server: Callable[..., RunningServer], data: Path, transport: str) -> None:
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "2", "--prefetch", "4",
                          "--share-window", "6", transport=transport)
    epochs = 4
    with LoaderClient(server.endpoint, timeout_s=30) as alone:
        expected = record(alone, epochs * STEPS)  # the same stream, built for one trainer
    check_exact(expected)
    members = [LoaderClient(server.endpoint, share="sweep", name=f"member-{i}", timeout_s=30) for i in range(3)]
    try:
        assert all(m.info["share"] == "sweep" for m in members)
        # One arena for the three, each member's key in an entry of its own (on the same host).
        assert all(m.shared_memory for m in members)
        got: list[list[tuple[int, int, list[int], str]]] = [[], [], []]
        held = []  # the paused member keeps its first batches (views of shared slots when on the same host)
        for _ in range(2):
            x, y = members[2].next()[:2]
            held.append((x, x.copy(), y.copy()))
            info = members[2].last
            assert info is not None
            got[2].append((info.epoch, info.batch, info.indices.tolist(),
                           hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()))
        for _ in range(3 * STEPS):  # members 0 and 1 go on, three epochs ahead of the paused one
            got[0] += record(members[0], 1)
            got[1] += record(members[1], 1)
        stats = share_stats(server.endpoint)
        assert stats["members"] == 3 and stats["reused"] > 0
        assert stats["built"] < 2 * 3 * STEPS  # members 0 and 1 shared their batches
        for x, x_then, _ in held:  # nothing overwrote the slots the paused member still holds
            assert np.array_equal(x, x_then)
        held.clear()
        got[2] += record(members[2], epochs * STEPS - 2)  # it resumes: far behind, nothing skipped
        got[0] += record(members[0], STEPS)
        got[1] += record(members[1], STEPS)
        for g in got:
            check_exact(g)
            assert g == expected[:len(g)]  # the same batches, pixels included, as the stream built alone
        stats = share_stats(server.endpoint)
        assert stats["built"] > epochs * STEPS  # the paused member's batches were built again for it
        clients = {c["name"]: c for c in server_stats(server.endpoint, timeout_s=10)["clients"]}
        assert all(clients[f"member-{i}"]["share"] == "sweep" for i in range(3))
    finally:
        for m in members:
            m.close()


def test_a_member_changing_its_batch_in_place_changes_no_other_members_batch(
        start_server: Callable[..., RunningServer], data: Path) -> None:
    """Two members on shared memory; the first zeroes each batch it gets, in place (as `x -= mean` would),
    before the second takes the same batch: the second's batches are still the stream built alone, and so
    are the first's when its slots come back with new batches (its own writes are dropped with the array).
    Both get writable arrays, views of the share's slots (before: every one of the second's batches were
    the first one's zeros: both were views of one shared mapping)."""
    n = 160  # more batches than the arena has slots (132 here): every slot is reused
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "2", "--prefetch", "4",
                          "--share-window", "6")
    with LoaderClient(server.endpoint, timeout_s=30) as alone:
        expected = [alone.next()[0].copy() for _ in range(n)]
    with LoaderClient(server.endpoint, share="sweep", name="first", timeout_s=30) as first, \
            LoaderClient(server.endpoint, share="sweep", name="second", timeout_s=30) as second:
        assert first.shared_memory and second.shared_memory
        assert share_stats(server.endpoint)["arena_slots"] < n
        changed, first_wrong = [], []
        for k in range(n):
            x = first.next()[0]
            assert x.flags.writeable and in_shared_memory(x)
            first_wrong.append(not np.array_equal(x, expected[k]))
            x[...] = 0
            assert not x.any()  # its own writes it sees
            mine = second.next()[0]
            assert mine.flags.writeable and in_shared_memory(mine)
            changed.append(not np.array_equal(mine, expected[k]))
            del x, mine
        assert not any(changed), f"{sum(changed)} of {n} of the second member's batches were changed by the first"
        assert not any(first_wrong), f"{sum(first_wrong)} of {n} of the first member's batches were not the stream's"
        assert share_stats(server.endpoint)["reused"] > 0  # still built once for both


def test_a_member_without_shared_memory_gets_the_same_batches_as_frames(start_server: Callable[..., RunningServer],
                                                                      data: Path) -> None:
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "2")
    with LoaderClient(server.endpoint, share="mixed", timeout_s=30) as mapped, \
            LoaderClient(server.endpoint, share="mixed", shared_memory=False, timeout_s=30) as framed:
        assert mapped.shared_memory and not framed.shared_memory
        got_mapped, got_framed = [], []
        for _ in range(2 * STEPS):
            got_mapped += record(mapped, 1)
            got_framed += record(framed, 1)
        assert got_mapped == got_framed  # the pixels of each shared slot, copied into a frame for the other
        check_exact(got_mapped)
        stats = share_stats(server.endpoint)
        assert stats["shared_memory"] and stats["built"] < 2 * 2 * STEPS


def test_a_member_killed_and_resumed_from_its_state_rejoins(start_server: Callable[..., RunningServer], data: Path,
                                                            tmp_path: Path) -> None:
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "2")
    out, state = tmp_path / "killed.jsonl", tmp_path / "state.json"

    def consumer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tests.stream_consumer", server.endpoint, str(out), "--state",
                               str(state), "--share", "sweep", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    with LoaderClient(server.endpoint, share="sweep", timeout_s=30) as a, \
            LoaderClient(server.endpoint, share="sweep", timeout_s=30) as b:
        got_a, got_b = record(a, 5), record(b, 5)
        killed = consumer("--die-after", "10")
        assert killed.returncode == -9, killed.stderr
        assert json.loads(state.read_text())["batch"] == 10
        got_a += record(a, 10)
        got_b += record(b, 10)
        resumed = consumer("--batches", str(2 * STEPS))
        assert resumed.returncode == 0, resumed.stderr
        got_a += record(a, 3 * STEPS)
        got_b += record(b, 3 * STEPS)
        wait_until(lambda: share_stats(server.endpoint)["members"] == 2, 30, "the killed member's session to end")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    killed_run = [(d["epoch"], d["batch"], d["indices"], d["digest"]) for d in lines]
    check_exact(killed_run)  # ten batches, then the rest from batch 10: none lost, none repeated
    assert len(killed_run) == 10 + 2 * STEPS
    check_exact(got_a)
    assert got_a == got_b
    assert killed_run == got_a[:len(killed_run)]


def in_shared_memory(x: np.ndarray) -> bool:
    """Whether `x` is a view of a shared-memory slot (not a frame received over the socket)."""
    base: Any = x
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_members_killed_holding_slots_give_them_back_and_the_others_keep_shared_memory(
        start_server: Callable[..., RunningServer], data: Path, tmp_path: Path, transport: str) -> None:
    """Trials stopped early (SIGKILLed) while holding more slots than the arena can spare: once the
    kernel says their processes are gone their slots are reused, so the trials that go on keep
    shared memory; an arena that does run out says so, counts each batch sent as frames, and
    recovers when slots come back. Every member's epochs stay exact throughout."""
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "2", "--prefetch", "2",
                          "--share-window", "4", transport=transport)
    with LoaderClient(server.endpoint, share="sweep", name="a", timeout_s=30) as a, \
            LoaderClient(server.endpoint, share="sweep", name="b", timeout_s=30) as b:
        assert a.shared_memory and b.shared_memory
        got_a, got_b = record(a, 2), record(b, 2)
        slots = share_stats(server.endpoint)["arena_slots"]
        hold = slots // 2 + 1  # each killed trial holds more than half of the arena: two leave no room
        runs = []
        for i in range(3):
            out = tmp_path / f"killed-{i}.jsonl"
            killed = subprocess.run([sys.executable, "-m", "tests.stream_consumer", server.endpoint, str(out),
                                     "--share", "sweep", "--hold", "--die-after", str(hold)], cwd=REPO,
                                    capture_output=True, text=True, timeout=120)
            assert killed.returncode == -9, killed.stderr
            runs.append([(d["epoch"], d["batch"], d["indices"], d["digest"])
                         for d in map(json.loads, out.read_text().splitlines())])
            got_a += record(a, 3)
            got_b += record(b, 3)

            def given_back(i: int = i) -> bool:
                s = share_stats(server.endpoint)
                return s["members"] == 2 and s["slots_orphaned"] == 0 and s["slots_reclaimed"] >= (i + 1) * hold

            wait_until(given_back, 60, "the killed trial's slots to be given back")
        stats = share_stats(server.endpoint)
        assert stats["shm_fallbacks"] == 0 and stats["slots_free"] > slots // 2, stats
        for _ in range(STEPS):  # the trials that go on still get every batch in shared memory
            for member, got in ((a, got_a), (b, got_b)):
                x, y = member.next()[:2]
                assert in_shared_memory(x)
                got.append(entry(member, x, y))
        # A trial that holds every batch runs the arena dry: frames then, counted and said once.
        held = []
        for _ in range(slots + 4):
            x, y = a.next()[:2]
            held.append(x)
            got_a.append(entry(a, x, y))
            got_b += record(b, 1)
        assert in_shared_memory(held[0]) and not in_shared_memory(held[-1])
        dry = share_stats(server.endpoint)
        assert dry["shm_fallbacks"] > 0, dry
        assert server_stats(server.endpoint, timeout_s=10)["shm_fallback_batches"] >= dry["shm_fallbacks"]
        held.clear()  # its slots are released: shared memory again
        got_a += record(a, 2 * STEPS)
        got_b += record(b, 2 * STEPS)
        x, y = a.next()[:2]
        assert in_shared_memory(x)
        got_a.append(entry(a, x, y))
    for run in runs:  # each killed trial got its batches exactly once, in order, from its start
        assert len(run) == hold
        check_exact(run)
    check_exact(got_a)
    assert got_b == got_a[:len(got_b)]
    assert runs[0] == got_a[:hold]  # the same stream for every member, pixels included
    assert server.log_text().count("no free slot in its shared-memory arena") >= 1
    assert "slot(s) held by members that left are reused" in server.log_text()


def test_members_asking_for_another_stream_are_refused_naming_the_difference(
        start_server: Callable[..., RunningServer], data: Path) -> None:
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "1", "--augment", "flip")
    with LoaderClient(server.endpoint, share="sweep", timeout_s=30) as first:
        first.next()
        cases = [({"seed": 5}, r"seed 5 \(the share has 0\)"),
                 ({"world_size": 2}, r"world_size 2 \(the share has 1\)"),
                 ({"augment": False}, r"augment=False \(the share has augment=True\)"),
                 ({"manifest": True}, r"manifest=True \(the share has manifest=False\)"),
                 ({"seed": 5, "augment": False}, r"seed 5 .*; augment=False")]
        for kwargs, match in cases:
            with pytest.raises(ConfigError, match=match) as caught:
                LoaderClient(server.endpoint, share="sweep", timeout_s=30, **kwargs)
            assert "cannot join share 'sweep' (rank 0)" in str(caught.value)
        with LoaderClient(server.endpoint, share="sweep", seed=0, timeout_s=30) as same:  # the same stream: joins
            assert record(same, 1)[0][:3] == (0, 0, first.last.indices.tolist() if first.last else [])
        with LoaderClient(server.endpoint, share="sweep", rank=1, world_size=2, timeout_s=30) as other_rank:
            other_rank.next()  # another rank: another share of that name, nobody refused
            assert len(server_stats(server.endpoint, timeout_s=10)["shares"]) == 2
    # A share of members that all ask for manifests: each gets the one built for all, its own batch's.
    with LoaderClient(server.endpoint, share="traced", manifest=True, timeout_s=30) as a, \
            LoaderClient(server.endpoint, share="traced", manifest=True, timeout_s=30) as b:
        for member in (a, b):
            member.next()
            assert member.last is not None and member.last.manifest is not None
            assert [s["index"] for s in member.last.manifest["samples"]] == member.last.indices.tolist()
    with pytest.raises(ConfigError, match="`share` must be printable"):
        LoaderClient(server.endpoint, share="bad\nname")


def test_share_from_env_and_the_adapters(start_server: Callable[..., RunningServer], data: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "1")
    monkeypatch.setenv("LOADER_ENDPOINT", server.endpoint)
    monkeypatch.setenv("LOADER_SHARE", "from-env")
    with from_env(timeout_s=30) as client, LoaderClient(server.endpoint, share="from-env", timeout_s=30) as other:
        assert client.options.share == "from-env"
        assert record(client, 3) == record(other, 3)
        assert share_stats(server.endpoint)["members"] == 2
    torch_adapter = pytest.importorskip("loader_client.torch")
    dataset = torch_adapter.LoaderDataset(server.endpoint, share="torch", timeout_s=30)
    try:
        first = next(iter(dataset))
        assert dataset.client.info["share"] == "torch" and first[0].shape[0] == BATCH
    finally:
        dataset.close()


def test_a_welcome_in_another_share_is_refused() -> None:
    from loader_client.contract.messages import Hello, Welcome
    from loader_client.handshake import check_welcome
    from loader_client.options import ClientOptions

    start = ClientOptions(share="a").start()
    welcome = Welcome(num_samples=8, num_classes=2, batch_size=4, steps_per_epoch=2, rank=0, world_size=1, seed=0,
                      epoch=0, batch=0, mode="epoch", in_order=True, drop_last=True, shuffle=True, x_shape=[2, 2, 3], x_dtype="|u1",
                      layout="hwc", color="rgb", class_names=None, fingerprint="f", heartbeat_s=1.0,
                      max_message_bytes=1 << 20, share="b")
    with pytest.raises(ProtocolError, match="share 'b', not the asked 'a'"):
        check_welcome(welcome, Hello(share="a"), start, "test")


# ---------------------------------------------------------------------------- --workers auto
def test_workers_auto_follows_a_stepped_load_and_epochs_stay_exact(start_server: Callable[..., RunningServer],
                                                                   data: Path) -> None:
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "auto",
                          "--workers-min", "1", "--workers-max", "4", "--scale-interval-s", "1",
                          "--simulate-read-latency-ms", "15", "--read-threads", "0", "--prefetch", "8",
                          "--log-interval-s", "0")
    got: list[tuple[int, int, list[int], str]] = []

    def stats() -> dict[str, Any]:
        return server_stats(server.endpoint, timeout_s=10)

    assert stats()["workers_target"] == 1 and stats()["autoscale"]
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        # A trainer with no step of its own waits for every batch: workers are added.
        deadline = time.monotonic() + 90
        while stats()["workers_target"] < 3:
            assert time.monotonic() < deadline, f"no scale-up: {stats()['worker_changes']}"
            got += record(client, 4)
        peak = stats()["workers_target"]
        clients = stats()["clients"]
        assert clients[0]["stall"] is not None and clients[0]["stall"] > 0.02
        # The step slows: the workers wait on the trainer and are released.
        deadline = time.monotonic() + 90
        while stats()["workers_target"] >= peak:
            assert time.monotonic() < deadline, f"no scale-down: {stats()['worker_changes']}"
            got += record(client, 1)
            time.sleep(0.25)
        got += record(client, STEPS)
    check_exact(got)
    s = stats()
    directions = [("up" if c["to"] > c["from"] else "down") for c in s["worker_changes"]]
    assert "up" in directions and "down" in directions
    assert all(c["reason"] for c in s["worker_changes"])
    assert s["worker_changes_total"]["up"] >= 1 and s["worker_changes_total"]["down"] >= 1
    wait_until(lambda: len(stats()["workers"]) == stats()["workers_target"], 30, "the retired workers to exit")
    log = server.log_text()
    assert "workers 1 -> " in log and "waits" in log and "retired" in log
    assert "died" not in log and "crashed" not in log


def test_workers_auto_settings_are_checked(tmp_path: Path) -> None:
    from loader_server.config import ServerConfig

    with pytest.raises(ConfigError, match="`workers_min` applies to --workers auto only"):
        ServerConfig(data=str(tmp_path), workers=2, workers_min=1)
    with pytest.raises(ConfigError, match="`workers_min` 4 is above `workers_max` 2"):
        ServerConfig(data=str(tmp_path), workers="auto", workers_min=4, workers_max=2)
    with pytest.raises(ConfigError, match=r"`target_stall` must be <= 0.999, got 2.0 \(its range: 0.001 to 0.999\)"):
        ServerConfig(data=str(tmp_path), workers="auto", target_stall=2.0)
    with pytest.raises(ConfigError, match="`target_stall` must be >= 0.001, got 0.0"):
        ServerConfig(data=str(tmp_path), workers="auto", target_stall=0.0)
    config = ServerConfig(data=str(tmp_path), workers="auto", workers_min=2, workers_max=6)
    assert config.worker_bounds == (2, 6) and config.initial_workers == 2 and config.prefetch_batches == 12


def test_a_member_that_forked_after_connecting_keeps_its_slots_until_its_child_is_gone(
        start_server: Callable[..., RunningServer], data: Path, tmp_path: Path) -> None:
    """A trial that forks after connecting (a data-loader worker) and is then killed: its child still maps the
    arena, holds its batches and the connection it inherited. Its slots were reused once the trial's own pid
    was gone (the only process known of an ipc member; a TCP member's holders were scanned once, at its
    hello), under the child's feet. Now the holders of the member's end of the connection are looked for
    again before its slots are reused: they come back only once the child has exited too."""
    server = start_server(data, "--batch-size", str(BATCH), "--size", "16x16", "--workers", "2", "--prefetch", "2",
                          "--share-window", "4", "--client-timeout-s", "2", transport="ipc")
    flag = tmp_path / "child-may-exit"
    with LoaderClient(server.endpoint, share="sweep", name="a", timeout_s=30) as a:
        assert a.shared_memory
        record(a, 2)
        hold = 3
        killed = subprocess.run([sys.executable, "-m", "tests.stream_consumer", server.endpoint,
                                 str(tmp_path / "killed.jsonl"), "--share", "sweep", "--hold", "--die-after", str(hold),
                                 "--fork-hold", str(flag)], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr
        child = int(Path(f"{flag}.pid").read_text())
        try:
            assert os.path.exists(f"/proc/{child}")

            def left() -> bool:
                s = share_stats(server.endpoint)
                return s["members"] == 1 and s["slots_orphaned"] + s["slots_reclaimed"] >= hold

            wait_until(left, 60, "the killed trial's session to end")
            for _ in range(30):  # ticks of the server's loop (each looks for slots to reclaim), 0.1 s each
                record(a, 1)
                time.sleep(0.1)
            stats = share_stats(server.endpoint)
            assert stats["slots_orphaned"] >= hold and stats["slots_reclaimed"] == 0, stats  # the child may read
        finally:
            flag.touch()
        try:
            wait_until(lambda: share_stats(server.endpoint)["slots_reclaimed"] >= hold, 60,
                       "the slots to come back once the child exited")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {share_stats(server.endpoint)}") from None
        assert share_stats(server.endpoint)["slots_orphaned"] == 0
        record(a, 2)
