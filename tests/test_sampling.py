"""Sampling plan: a pure function of (seed, epoch, rank, world size) and the settings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loader_client.contract.sampling import SamplingPlan, check_indices, substitute_sources


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


@pytest.mark.parametrize(("n", "world", "drop_last", "shuffle"), [(103, 4, False, True), (103, 4, True, True),
                                                                   (10, 3, False, False), (7, 1, False, True)])
def test_a_batch_is_its_slice_of_the_ranks_padded_share(n: int, world: int, drop_last: bool, shuffle: bool) -> None:
    """Only a batch's own places are computed; they are the slice of the rank's share of the epoch order,
    which keep-last pads by repeating the order from its start (as torch's DistributedSampler)."""
    plan = SamplingPlan(n, 4, drop_last=drop_last, shuffle=shuffle)
    order = plan.epoch_order(3, 1)
    total = plan.samples_per_rank(world) * world
    for rank in range(world):
        share = np.resize(order, total)[rank:total:world]
        got = np.concatenate(epoch_batches(plan, 1, seed=3, rank=rank, world=world))
        np.testing.assert_array_equal(got, share[:len(got)])  # drop-last leaves out the last partial batch
        lengths = [plan.batch_length(b, world) for b in range(plan.steps_per_epoch(world))]
        assert lengths == [len(b) for b in epoch_batches(plan, 1, seed=3, rank=rank, world=world)]
        assert all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4


def test_the_indices_of_a_batch_may_differ_from_the_plan_only_by_skip_modes_replacements() -> None:
    owed = np.array([10, 11, 12, 13], np.int64)
    assert check_indices(owed.copy(), owed) is None
    assert substitute_sources([1, 2], 4) == {1: 3, 2: 3} and substitute_sources([3], 4) == {3: 0}
    assert check_indices(np.array([10, 13, 13, 13]), owed) is None  # places 1 and 2 bad: the next good, 3
    assert check_indices(np.array([10, 11, 12, 10]), owed) is None  # the last place: cyclically, the first
    assert check_indices(np.array([10, 12, 12, 13]), owed) is None  # place 1 bad: the next good is place 2
    problem = check_indices(np.array([10, 13, 12, 13]), owed)  # place 1 holds 3's sample, but 2 is good
    assert problem == "1 of its 4 samples are not the ones owed: 13 at place 1 (owed 11)"
    assert check_indices(np.array([20, 21, 22, 23]), owed) is not None  # another share's samples
    assert check_indices(np.array([10, 11]), owed) == "2 sample indices where the plan gives 4"
    with pytest.raises(ValueError):
        substitute_sources([0, 1], 2)  # every place bad


# ---------------------------------------------------------------------------- the plan's forms, written out
@pytest.mark.parametrize("kind", [{}, {"shuffle": False}, {"mode": "random"}, {"drop_last": False}])
def test_indices_are_int64_and_an_epoch_order_is_read_only(kind: dict[str, object]) -> None:
    plan = SamplingPlan(10, 4, **kind)  # type: ignore[arg-type]
    assert plan.batch(0, 1, seed=3).dtype == np.int64  # what the worker message and the client's check expect
    order = plan.epoch_order(3, 0)
    assert order.dtype == np.int64 and not order.flags.writeable  # shared by every session: nobody may change it
    with pytest.raises(ValueError, match="read-only"):
        order[0] = 1


def test_the_default_rank_and_world_are_one_trainer() -> None:
    for plan in (SamplingPlan(10, 2), SamplingPlan(10, 4, drop_last=False)):
        assert plan.batch(1, 1, seed=4).tolist() == plan.batch(1, 1, seed=4, rank=0, world_size=1).tolist()
    keep = SamplingPlan(10, 4, drop_last=False)
    assert [keep.batch_length(b) for b in range(3)] == [4, 4, 2]  # one rank: 10 samples, the last batch 2
    assert [keep.batch_length(b, 2) for b in range(2)] == [4, 1]  # two ranks: 5 samples each


def test_random_mode_draws_with_replacement_whatever_the_batch_number() -> None:
    """800 draws from 50 samples: a permutation repeated would hold each sample exactly 16 times."""
    plan = SamplingPlan(50, 8, mode="random", steps_per_epoch=100)
    assert [plan.batch_length(b) for b in (0, 6, 7, 99)] == [8, 8, 8, 8]  # past the data set's 6 batches too
    draws = np.concatenate(epoch_batches(plan, 0, seed=2))
    counts = np.bincount(draws, minlength=50)
    assert len(draws) == 800 and draws.min() >= 0 and draws.max() < 50
    assert counts.min() != counts.max(), "random mode drew a repeated permutation, not with replacement"


def test_the_plan_keeps_the_orders_of_its_last_8_seed_epoch_pairs() -> None:
    plan = SamplingPlan(20, 4)
    first = plan.epoch_order(0, 0)
    assert plan.epoch_order(0, 0) is first  # kept: not drawn again for every batch
    for epoch in range(1, 8):
        plan.epoch_order(0, epoch)
    assert plan.epoch_order(0, 0) is first  # 8 pairs kept, and using epoch 0 made it the newest
    for epoch in range(8, 15):
        plan.epoch_order(0, epoch)
    assert plan.epoch_order(0, 8) is plan.epoch_order(0, 8)
    assert plan.epoch_order(0, 0) is first  # 0, 8..14: still the last 8
    plan.epoch_order(0, 15)  # a 9th: the oldest used (8) goes, not the newest
    again = plan.epoch_order(0, 0)
    assert again is first
    nine = SamplingPlan(20, 4)
    oldest = nine.epoch_order(0, 0)
    for epoch in range(1, 9):  # 8 more pairs: 9 in all
        nine.epoch_order(0, epoch)
    assert nine.epoch_order(0, 0) is not oldest  # 8 kept, not 9
    one = SamplingPlan(20, 4, orders_kept=1)
    a = one.epoch_order(1, 0)
    one.epoch_order(1, 1)
    b = one.epoch_order(1, 0)
    assert b is not a and b.tolist() == a.tolist()  # one kept: drawn again, the same


def test_a_welcome_describes_the_plan_its_client_checks_against() -> None:
    from loader_client.contract.messages import Welcome

    welcome = Welcome(num_samples=50, num_classes=2, batch_size=8, steps_per_epoch=9, rank=0, world_size=1, seed=1,
                      epoch=0, batch=0, mode="random", in_order=True, drop_last=False, shuffle=False, x_shape=[4, 4, 3],
                      x_dtype="|u1", layout="hwc", color="rgb", class_names=None, fingerprint="f", heartbeat_s=1.0,
                      max_message_bytes=1 << 20)
    plan = welcome.plan()
    assert (plan.num_samples, plan.batch_size, plan.mode, plan.shuffle, plan.drop_last, plan.steps_per_epoch()) == \
        (50, 8, "random", False, False, 9)
    epochs = SamplingPlan(10, 2, shuffle=False)
    fixed = dataclasses.replace(welcome, mode="epoch", num_samples=10, batch_size=2, drop_last=True).plan()
    assert [fixed.batch(0, b, seed=0).tolist() for b in range(5)] == \
        [epochs.batch(0, b, seed=0).tolist() for b in range(5)] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    kept = dataclasses.replace(welcome, mode="epoch", shuffle=True).plan()  # a stream spans two epochs at most
    a = kept.epoch_order(1, 0)
    kept.epoch_order(1, 1)
    assert kept.epoch_order(1, 0) is a  # two kept
    b = kept.epoch_order(1, 5)
    kept.epoch_order(1, 6)
    kept.epoch_order(1, 7)
    assert kept.epoch_order(1, 5) is not b  # not three


def test_check_indices_names_the_first_three_wrong_places_and_says_when_there_are_more() -> None:
    owed = np.array([10, 11, 12, 13, 14], np.int64)
    three = check_indices(np.array([20, 21, 22, 13, 14]), owed)
    assert three == ("3 of its 5 samples are not the ones owed: 20 at place 0 (owed 10), 21 at place 1 (owed 11), "
                     "22 at place 2 (owed 12)")
    four = check_indices(np.array([20, 21, 22, 23, 14]), owed)
    assert four == ("4 of its 5 samples are not the ones owed: 20 at place 0 (owed 10), 21 at place 1 (owed 11), "
                    "22 at place 2 (owed 12), ...")


def test_an_all_bad_batch_has_no_substitute() -> None:
    with pytest.raises(ValueError, match="^every sample of the batch is bad$"):
        substitute_sources([0, 1, 2], 3)
    assert substitute_sources([0, 1], 3) == {0: 2, 1: 2}
