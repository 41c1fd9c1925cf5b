"""Streams across processes: resume after a killed trainer, rank shards, independent clients."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import ConfigError, LoaderClient
from loader_server.sampling import SamplingPlan

from .conftest import unique_label_list

ROOT = Path(__file__).resolve().parent.parent
N = 60


def consumer(endpoint: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.stream_consumer", endpoint, str(out), *args], cwd=ROOT)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plan_indices(listfile: Path, batch_size: int, seed: int, total: int) -> list[list[int]]:
    """The sample indices of the first `total` batches, straight from the pure sampling plan."""
    plan = SamplingPlan(len(listfile.read_text().splitlines()), batch_size)
    steps = plan.steps_per_epoch()
    return [plan.batch(k // steps, k % steps, seed=seed).tolist() for k in range(total)]


def test_killed_trainer_resumes_bitwise_identical(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N)
    server = start_server(listfile, "--batch-size", "7", "--size", "20x12", "--workers", "2", "--seed", "9")
    steps = N // 7
    killed_at = steps + 3  # batches the trainer took (and checkpointed) before it was SIGKILLed
    state_file, first = tmp_path / "state.json", tmp_path / "first.jsonl"
    proc = consumer(server.endpoint, first, "--state", str(state_file), "--die-after", str(killed_at))
    assert proc.wait(60) == -signal.SIGKILL
    assert len(records(first)) == killed_at
    rest = 2 * steps  # the rest of this epoch and two more epochs' worth
    total = killed_at + rest

    second = tmp_path / "second.jsonl"
    proc = consumer(server.endpoint, second, "--state", str(state_file), "--batches", str(rest))
    assert proc.wait(120) == 0
    reference = tmp_path / "reference.jsonl"  # an independent stream, counted from (0, 0)
    proc = consumer(server.endpoint, reference, "--batches", str(total))
    assert proc.wait(120) == 0
    # Spliced where the trainer really stopped, never where the saved state says it stopped.
    combined = records(first) + records(second)
    expected = [(e, b) for e in range(total // steps + 1) for b in range(steps)][:total]
    assert [(r["epoch"], r["batch"]) for r in combined] == expected
    assert [r["indices"] for r in combined] == plan_indices(listfile, 7, 9, total)
    assert [r["digest"] for r in combined] == [r["digest"] for r in records(reference)]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_processes_get_disjoint_equal_shares(start_server: Any, tmp_path: Path, world: int) -> None:
    listfile = unique_label_list(tmp_path / "data", N + 1)  # 61: a remainder for every world size
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "2")
    per_rank = {2: 7, 3: 5}[world]  # batches of 4 per rank: 61 // 2 = 30 samples -> 7, 61 // 3 = 20 -> 5
    outs = [tmp_path / f"rank{r}.jsonl" for r in range(world)]
    procs = [consumer(server.endpoint, outs[r], "--rank", str(r), "--world-size", str(world),
                      "--batches", str(2 * per_rank)) for r in range(world)]
    assert [p.wait(120) for p in procs] == [0] * world
    for epoch in range(2):
        shares = [[i for rec in records(out) if rec["epoch"] == epoch for i in rec["indices"]] for out in outs]
        assert {len(s) for s in shares} == {per_rank * 4}  # the same number of batches per rank
        union = [i for s in shares for i in s]
        assert len(set(union)) == len(union)  # disjoint: nothing twice in an epoch
        assert len(union) == {2: 56, 3: 60}[world]  # only the documented remainder is left out


def test_independent_clients_do_not_disturb_each_other(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", N)
    server = start_server(listfile, "--batch-size", "6", "--size", "8x8", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=30) as alone:
        expected = [alone.next()[1].copy() for _ in range(15)]
    with LoaderClient(server.endpoint, timeout_s=30) as a, \
         LoaderClient(server.endpoint, timeout_s=30, seed=123) as b, \
         LoaderClient(server.endpoint, timeout_s=30) as c:
        got_a, got_c = [], []
        for i in range(15):
            got_a.append(a.next()[1].copy())
            b.next()
            if i % 2 == 0:
                got_c.append(c.next()[1].copy())
        got_c += [c.next()[1].copy() for _ in range(15 - len(got_c))]
    for x, y, z in zip(expected, got_a, got_c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_resume_refused_when_index_changed(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 20)
    a = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    with LoaderClient(a.endpoint, timeout_s=30) as client:
        client.next()
        state = client.state_dict()
    assert json.loads(json.dumps(state)) == state  # JSON-serialisable as it is
    assert set(state) == {"epoch", "batch", "seed", "rank", "world_size", "fingerprint"}
    lines = listfile.read_text().splitlines()
    listfile.write_text("\n".join(lines[:-1]) + "\n")  # one sample fewer
    b = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    with pytest.raises(ConfigError, match="the data set index") as info:
        LoaderClient(b.endpoint, timeout_s=30, state=state)
    assert "batch settings" not in str(info.value)
