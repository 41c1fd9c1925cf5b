"""The fail-over planner alone (no sockets): every batch of an epoch returned exactly once,
whatever servers are lost, whoever steals what, and the ordered merge independent of who builds."""

from __future__ import annotations

import random

import pytest

from loader_client.failover import EpochPlan, ordered_share


def test_fresh_plan_gives_each_server_its_own_share_in_merge_order() -> None:
    plan = EpochPlan(3, 4, [0, 1, 2])
    assert [(t.share, t.server, t.next, t.stop) for t in plan.tasks] == [(0, 0, 0, 4), (1, 1, 0, 4), (2, 2, 0, 4)]
    order = []
    while not plan.done:
        t = plan.ordered_task()
        order.append((t.share, t.next))
        plan.deliver(t, t.next)
    assert order == [ordered_share(b, 3) for b in range(12)] and plan.delivered == 12


def test_loss_hands_the_undelivered_rest_to_the_least_loaded_survivor() -> None:
    plan = EpochPlan(3, 10, [0, 1, 2])
    for _ in range(7):  # merged batches 0..6: shares 0,1,2,0,1,2,0
        t = plan.ordered_task()
        plan.deliver(t, t.next)
    moved = plan.lose(1)
    assert [(t.share, t.next, t.stop) for t in moved] == [(1, 2, 10)]  # batches 0 and 1 of share 1 were returned
    assert moved[0].server in (0, 2) and plan.alive == [0, 2]
    assert plan.is_ordered() and plan.ordered_task().share == 1  # merged batch 7 is share 1, batch 2: unchanged
    with pytest.raises(ValueError):
        plan.deliver(moved[0], 3)  # never skip a batch
    plan.lose(0)
    assert {t.server for t in plan.active()} == {2}
    with pytest.raises(LookupError):
        plan.lose(2)


def test_next_epoch_without_a_server_spreads_its_share_and_home_comes_first() -> None:
    plan = EpochPlan(3, 5, [0, 2])
    assert {t.share: t.server for t in plan.tasks} == {0: 0, 2: 2, 1: 0}
    kept = EpochPlan(3, 5, [0, 2], prefer={1: 2})  # a stream of server 2 already stands at share 1
    assert {t.share: t.server for t in kept.tasks} == {0: 0, 1: 2, 2: 2}
    back = EpochPlan(3, 5, [0, 1, 2], prefer={})
    assert {t.share: t.server for t in back.tasks} == {0: 0, 1: 1, 2: 2}


def test_steal_takes_the_back_half_and_keeps_what_is_in_flight() -> None:
    plan = EpochPlan(2, 20, [0, 1])
    for _ in range(20):  # server 0 is fast: its whole share
        t = plan.tasks[0]
        plan.deliver(t, t.next)
    plan.deliver(plan.tasks[1], 0)
    stolen = plan.steal(0, keep=3, min_batches=2)
    assert stolen is not None and (stolen.share, stolen.next, stolen.stop, stolen.server) == (1, 11, 20, 0)
    assert plan.tasks[1].stop == 11
    assert plan.steal(0, keep=8, min_batches=2) is None or plan.tasks[1].remaining >= 8
    small = EpochPlan(2, 4, [0, 1])
    assert small.steal(0, keep=3, min_batches=2) is None  # not worth a stream


@pytest.mark.parametrize("seed", range(40))
def test_random_losses_and_steals_return_every_batch_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    servers, shares, steps = rng.randint(1, 4), 0, rng.randint(1, 30)
    shares = servers
    plan = EpochPlan(shares, steps, range(servers))
    got: list[tuple[int, int]] = []
    while not plan.done:
        roll = rng.random()
        if roll < 0.05 and len(plan.alive) > 1:
            plan.lose(rng.choice(plan.alive))
        elif roll < 0.25:
            thief = rng.choice(plan.alive)
            if not plan.tasks_of(thief):
                plan.steal(thief, keep=rng.randint(1, 3), min_batches=1)
        else:
            t = rng.choice(plan.active())
            got.append((t.share, t.next))
            plan.deliver(t, t.next)
        if rng.random() < 0.1 and not plan.done:  # save and resume mid-epoch
            plan = EpochPlan(shares, steps, plan.alive, pending=plan.pending())
    assert sorted(got) == [(s, b) for s in range(shares) for b in range(steps)]


@pytest.mark.parametrize("pending", [[[0, 0, 5], [0, 3, 6]], [[2, 0, 1]], [[0, 4, 2]], [[0, 0, 9]], [["0", 0, 1]]])
def test_tampered_pending_state_is_refused(pending: list[list[object]]) -> None:
    with pytest.raises(ValueError):
        EpochPlan(2, 6, [0, 1], pending=pending)  # type: ignore[arg-type]


def test_only_a_prefix_of_the_merge_counts_as_ordered() -> None:
    assert EpochPlan(3, 4, [0, 1, 2], pending=[[0, 2, 4], [1, 1, 4], [2, 1, 4]]).is_ordered()  # 4 returned
    assert not EpochPlan(3, 4, [0, 1, 2], pending=[[1, 0, 4], [2, 0, 4]]).is_ordered()  # share 0 done first
    assert not EpochPlan(2, 8, [0, 1], pending=[[0, 0, 4], [0, 6, 8], [1, 0, 8]]).is_ordered()  # a steal
