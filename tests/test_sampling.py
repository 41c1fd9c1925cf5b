"""Sampling plan: a pure function of (seed, epoch, rank, world size) and the settings."""

from __future__ import annotations

import numpy as np
import pytest

from loader_server.sampling import SamplingPlan


def epoch_batches(plan: SamplingPlan, epoch: int, seed: int = 0, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    return [plan.batch(epoch, b, seed=seed, rank=rank, world_size=world) for b in range(plan.steps_per_epoch(world))]


def test_same_seed_same_batches_other_epoch_other_order() -> None:
    plan = SamplingPlan(100, 10)
    a = np.concatenate(epoch_batches(plan, 0, seed=5))
    b = np.concatenate(epoch_batches(SamplingPlan(100, 10), 0, seed=5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, np.concatenate(epoch_batches(plan, 1, seed=5)))
    assert not np.array_equal(a, np.concatenate(epoch_batches(plan, 0, seed=6)))


def test_exactly_once_per_epoch() -> None:
    plan = SamplingPlan(100, 10)
    for epoch in range(3):
        seen = np.concatenate(epoch_batches(plan, epoch))
        assert sorted(seen.tolist()) == list(range(100))


def test_drop_last_and_keep_last_counts() -> None:
    drop = SamplingPlan(103, 10, drop_last=True)
    keep = SamplingPlan(103, 10, drop_last=False)
    assert drop.steps_per_epoch() == 10
    assert keep.steps_per_epoch() == 11
    kept = epoch_batches(keep, 0)
    assert [len(b) for b in kept] == [10] * 10 + [3]
    assert sorted(np.concatenate(kept).tolist()) == list(range(103))
    dropped = np.concatenate(epoch_batches(drop, 0))
    assert len(dropped) == 100 and len(set(dropped.tolist())) == 100
    with pytest.raises(IndexError):
        drop.batch(0, 10, seed=0)


def test_no_shuffle_keeps_file_order() -> None:
    plan = SamplingPlan(20, 5, shuffle=False)
    for epoch in range(2):
        assert np.concatenate(epoch_batches(plan, epoch)).tolist() == list(range(20))


def test_random_mode_with_replacement_is_deterministic() -> None:
    plan = SamplingPlan(50, 8, mode="random", steps_per_epoch=7)
    assert plan.steps_per_epoch() == 7
    a = epoch_batches(plan, 0, seed=1)
    assert all(len(b) == 8 and b.min() >= 0 and b.max() < 50 for b in a)
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(epoch_batches(plan, 0, seed=1)))
    assert not np.array_equal(np.concatenate(a), np.concatenate(epoch_batches(plan, 1, seed=1)))
    draws = np.concatenate([np.concatenate(epoch_batches(plan, e, seed=1)) for e in range(20)])
    assert len(set(draws.tolist())) < len(draws)  # with replacement: repeats happen
    assert SamplingPlan(50, 8, mode="random").steps_per_epoch() == 50 // 8


# (samples, ranks, drop-last, batches per rank, samples per rank): written out from the README's rule,
# n // world per rank with drop-last (then whole batches of 4), ceil(n / world) with keep-last.
@pytest.mark.parametrize(("n", "world", "drop_last", "steps", "per_rank"), [
    (103, 2, True, 12, 48), (103, 4, True, 6, 24), (103, 4, False, 7, 26), (7, 3, False, 1, 3),
    (100, 2, True, 12, 48), (100, 2, False, 13, 50), (104, 2, False, 13, 52), (8, 2, True, 1, 4),
])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "no-shuffle"])
def test_ranks_are_disjoint_with_equal_batch_counts(n: int, world: int, drop_last: bool, steps: int,
                                                    per_rank: int, shuffle: bool) -> None:
    plan = SamplingPlan(n, 4, drop_last=drop_last, shuffle=shuffle)
    shares = [np.concatenate(epoch_batches(plan, 2, rank=r, world=world)) for r in range(world)]
    assert [len(epoch_batches(plan, 2, rank=r, world=world)) for r in range(world)] == [steps] * world
    assert [len(s) for s in shares] == [per_rank] * world
    union = np.concatenate(shares)
    if drop_last:
        assert len(set(union.tolist())) == len(union) == world * per_rank  # disjoint, nothing twice
    else:
        assert set(union.tolist()) == set(range(n))  # everything, padded with a few repeats
        assert len(union) == world * per_rank  # only the padding repeats


def test_ranks_without_shuffle_take_every_world_size_th_sample_of_the_file() -> None:
    """Written out: rank r takes samples r, r + n, r + 2n, ...; keep-last pads from the start."""
    drop = SamplingPlan(10, 2, shuffle=False)
    assert [b.tolist() for b in epoch_batches(drop, 3, rank=0, world=2)] == [[0, 2], [4, 6]]
    assert [b.tolist() for b in epoch_batches(drop, 3, rank=1, world=2)] == [[1, 3], [5, 7]]
    keep = SamplingPlan(7, 2, shuffle=False, drop_last=False)
    assert [b.tolist() for b in epoch_batches(keep, 0, rank=0, world=2)] == [[0, 2], [4, 6]]
    assert [b.tolist() for b in epoch_batches(keep, 0, rank=1, world=2)] == [[1, 3], [5, 0]]
    three = SamplingPlan(7, 3, shuffle=False, drop_last=False)
    assert [b.tolist() for b in epoch_batches(three, 0, rank=2, world=3)] == [[2, 5, 1]]


@pytest.mark.parametrize("world", [2, 3])
def test_random_mode_gives_every_rank_its_own_draws(world: int) -> None:
    plan = SamplingPlan(50, 8, mode="random", steps_per_epoch=6)
    draws = [np.concatenate(epoch_batches(plan, 0, seed=1, rank=r, world=world)) for r in range(world)]
    assert [len(d) for d in draws] == [6 * 8] * world  # steps_per_epoch does not shrink with ranks
    for a in range(world):
        for b in range(a + 1, world):
            assert not np.array_equal(draws[a], draws[b]), f"ranks {a} and {b} drew the same samples"
    one = [plan.batch(0, b, seed=1, rank=0, world_size=world) for b in range(6)]
    assert len({tuple(x.tolist()) for x in one}) == 6  # and every batch of a rank is a new draw
    assert SamplingPlan(50, 8, mode="random").steps_per_epoch(world) == 6  # 50 // 8


def test_random_mode_steps_at_an_exact_multiple_of_the_batch() -> None:
    assert SamplingPlan(48, 8, mode="random").steps_per_epoch() == 6
    assert SamplingPlan(47, 8, mode="random").steps_per_epoch() == 5
    assert SamplingPlan(7, 8, mode="random").steps_per_epoch() == 1  # fewer samples than a batch: one step


def test_random_draws_reach_both_ends_of_the_index() -> None:
    plan = SamplingPlan(3, 8, mode="random", steps_per_epoch=4)
    draws = np.concatenate(epoch_batches(plan, 0, seed=2))
    assert set(draws.tolist()) == {0, 1, 2} and draws.dtype == np.int64
    with pytest.raises(IndexError, match="^batch 4 is outside epoch of 4 batches$"):
        plan.batch(0, 4, seed=2)
    with pytest.raises(IndexError, match="^batch -1 is outside epoch of 4 batches$"):
        plan.batch(0, -1, seed=2)
