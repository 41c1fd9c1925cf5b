"""The fleet simulation (`loader-server simulate`): the real session, sampling, fail-over and
balanced-merge logic with many hosts and ranks, and checks that fail when that logic breaks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from loader_client import failover
from loader_client.contract.sampling import SamplingPlan
from loader_server.simulation import FleetSpec, simulate

SMALL = FleetSpec(hosts=8, ranks=32, seed=1)


@pytest.mark.timeout(180)
def test_64_hosts_256_ranks_every_check_holds_within_a_minute() -> None:
    result = subprocess.run([sys.executable, "-m", "loader_server", "simulate", "--hosts", "64", "--ranks", "256",
                             "--json"], capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert out["ok"] and not out["failures"], out
    assert out["wall_s"] < 60 and out["peak_rss_mb"] < 2048, out  # also the command's own budget check
    assert out["batches"] == 256 * 4 * 32 * 2, out  # every rank: 4 shares of 32 batches, 2 epochs
    assert out["deaths"] >= 4 and out["losses"] >= out["deaths"] and out["moved"] > 0, out  # deaths hit work
    assert out["steals"] > 0 and 0.9 <= out["load_min"] <= out["load_max"] <= 1.1, out


def test_the_command_prints_the_table_and_the_checks() -> None:
    result = subprocess.run([sys.executable, "-m", "loader_server", "simulate", "--hosts", "8", "--ranks", "32"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| 8 x 32 |" in result.stdout and result.stdout.count("  OK  ") == 4, result.stdout
    assert result.stdout.rstrip().endswith("simulate: OK")
    bad = subprocess.run([sys.executable, "-m", "loader_server", "simulate", "--hosts", "2", "--ranks", "4",
                          "--hosts-per-rank", "3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "hosts per rank must be between 1 and the 2 hosts" in bad.stdout


def test_a_small_fleet_passes() -> None:
    result = simulate(SMALL)
    assert result.ok, result.failures
    assert result.deaths == 1 and result.moved > 0 and result.steals > 0


def test_losing_the_batches_of_a_dead_host_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    lose = failover.EpochPlan.lose

    def lose_and_drop(self: failover.EpochPlan, server: int) -> list[failover.Task]:
        moved = lose(self, server)
        for task in moved:  # a broken fail-over: the dead host's rest is forgotten
            task.stop = task.next
        return moved

    monkeypatch.setattr(failover.EpochPlan, "lose", lose_and_drop)
    result = simulate(SMALL)
    assert any("arrived 0 times" in f for f in result.checks["exactly_once"]), result.failures


def test_ranks_sharing_samples_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = SamplingPlan.batch

    def rank_blind(self: SamplingPlan, epoch: int, b: int, *, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        return batch(self, epoch, b, seed=seed, rank=rank % 2, world_size=world_size)  # ranks 0, 2, 4... alike

    monkeypatch.setattr(SamplingPlan, "batch", rank_blind)
    result = simulate(SMALL)
    assert any("distinct" in f for f in result.checks["exactly_once"]), result.failures


def test_a_merge_that_never_steals_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failover.EpochPlan, "steal_for_idle", lambda self, prefetch: [])
    result = simulate(SMALL)
    assert result.steals == 0 and result.checks["load"], result.summary()
    assert not result.checks["exactly_once"]  # still exactly once: only the load is wrong


def test_the_budget_of_the_simulation_itself_is_checked() -> None:
    result = simulate(FleetSpec(hosts=4, ranks=8, steps=8, max_seconds=1e-6, max_memory_mb=1))
    assert len(result.checks["budget"]) == 2, result.failures
