"""Every sampling mode, served by a real server to 2 ranks: shares disjoint and complete, or distinct.

One row per mode a user can choose (server flags, client options, data kinds). Each row runs two
rank clients of world size 2 for one epoch and checks what the mode promises, with the expected
counts written out: 26 samples in batches of 4 are 13 per rank, so 3 batches (12 samples) per
rank with drop-last and 4 batches (the last of 1) with keep-last; random mode draws 26 // 4 = 6
batches per rank, different for each rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient

from .conftest import unique_label_list

N = 26
BASE = ("--batch-size", "4", "--size", "8x8", "--workers", "1", "--seed", "5")

#: (row, server flags, client options, data kind, batches per rank, samples per rank, promise)
#: promise: "partition" (disjoint, together all N), "disjoint" (no sample twice across ranks, the
#: documented remainder left out), or "distinct" (random draws: the ranks' streams differ).
MODES: list[tuple[str, tuple[str, ...], dict[str, Any], str, int, int, str]] = [
    ("epoch shuffle drop-last", (), {}, "images", 3, 12, "disjoint"),
    ("epoch shuffle keep-last", ("--keep-last",), {}, "images", 4, 13, "partition"),
    ("no-shuffle drop-last", ("--no-shuffle",), {}, "images", 3, 12, "disjoint"),
    ("no-shuffle keep-last", ("--no-shuffle", "--keep-last"), {}, "images", 4, 13, "partition"),
    ("random", ("--mode", "random"), {}, "images", 6, 24, "distinct"),
    ("random steps-per-epoch", ("--mode", "random", "--steps-per-epoch", "2"), {}, "images", 2, 8, "distinct"),
    ("unordered keep-last", ("--unordered", "--keep-last"), {}, "images", 4, 13, "partition"),
    ("augmented", ("--augment", "flip", "--keep-last"), {}, "images", 4, 13, "partition"),
    ("memory cache", ("--cache", "memory", "--keep-last"), {}, "images", 4, 13, "partition"),
    ("frames, no shared memory", ("--keep-last",), {"shared_memory": False}, "images", 4, 13, "partition"),
    ("client seed", ("--keep-last",), {"seed": 77}, "images", 4, 13, "partition"),
    # round(26 x 0.3) = 8 in val, 18 in train: 9 per rank, so 3 batches (4 + 4 + 1) with keep-last.
    ("subset train", ("--subset", "train", "--val-fraction", "0.3", "--keep-last"), {}, "images", 3, 9,
     "partition"),
    ("arrays", ("--keep-last",), {}, "arrays", 4, 13, "partition"),
    ("arrays random", ("--mode", "random"), {}, "arrays", 6, 24, "distinct"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, tuple[str, ...]]]:
    root = tmp_path_factory.mktemp("modes")
    images = unique_label_list(root / "images", N, size=(16, 12))
    np.save(root / "x.npy", np.arange(N * 3, dtype=np.float32).reshape(N, 3))
    np.save(root / "y.npy", np.arange(N, dtype=np.int64))
    return {"images": (images, ()), "arrays": (root / "x.npy", ("--labels", str(root / "y.npy")))}


def epoch_of(endpoint: str, rank: int, options: dict[str, Any]) -> tuple[list[int], list[list[int]], int]:
    """(labels of one epoch, each batch's labels, the client's steps per epoch) for `rank` of 2."""
    with LoaderClient(endpoint, timeout_s=30, rank=rank, world_size=2, **options) as client:
        batches = [y.tolist() for _, y in client.epoch()]
        return [v for b in batches for v in b], batches, client.steps_per_epoch


@pytest.mark.parametrize(("row", "flags", "options", "kind", "steps", "per_rank", "promise"), MODES,
                         ids=[r[0] for r in MODES])
def test_two_ranks_get_the_shares_their_mode_promises(start_server: Any, data: dict[str, Any], row: str,
                                                      flags: tuple[str, ...], options: dict[str, Any], kind: str,
                                                      steps: int, per_rank: int, promise: str) -> None:
    path, kind_flags = data[kind]
    args = [a for a in BASE if kind == "images" or a not in ("--size", "8x8")]
    server = start_server(path, *args, *kind_flags, *flags)
    (share0, batches0, steps0), (share1, batches1, steps1) = (epoch_of(server.endpoint, r, options) for r in (0, 1))
    assert steps0 == steps1 == steps and len(batches0) == len(batches1) == steps, (steps0, steps1)
    assert len(share0) == len(share1) == per_rank, (len(share0), len(share1))
    if promise == "distinct":
        assert share0 != share1, "both ranks drew the same samples"
        assert all(0 <= v < N for v in share0 + share1)
        return
    both = share0 + share1
    assert not set(share0) & set(share1), f"ranks share samples {sorted(set(share0) & set(share1))}"
    if promise == "partition":
        if row.startswith("subset"):  # the whole train subset: 26 - round(26 x 0.3) = 18 samples
            assert len(set(both)) == len(both) == 18
        else:
            assert sorted(both) == list(range(N)), f"missing {sorted(set(range(N)) - set(both))}"
    else:
        assert len(set(both)) == len(both) == 2 * per_rank  # the documented remainder only is left out


def test_a_resumed_rank_continues_its_own_share(start_server: Any, data: dict[str, Any]) -> None:
    """The state of rank 1 resumes rank 1 (its rank travels in the state), never rank 0's share."""
    path, kind_flags = data["images"]
    server = start_server(path, *BASE, *kind_flags, "--keep-last")
    with LoaderClient(server.endpoint, timeout_s=30, rank=1, world_size=2) as client:
        whole = [y.tolist() for _, y in client.epoch()]
    with LoaderClient(server.endpoint, timeout_s=30, rank=1, world_size=2) as client:
        first = client.next()[1].tolist()
        state = client.state_dict()
    assert {k: state.get(k) for k in ("rank", "world_size", "batch")} == {"rank": 1, "world_size": 2, "batch": 1}
    with LoaderClient(server.endpoint, timeout_s=30, state=state) as resumed:  # no rank given: the state's
        assert (resumed.rank, resumed.world_size) == (1, 2)
        rest = [y.tolist() for _, y in resumed.epoch()]
    assert [first, *rest] == whole


def test_a_resumed_rank_checkpoints_its_rank_again(start_server: Any, data: dict[str, Any]) -> None:
    """Resume, checkpoint, resume again: the second state still holds rank 1 of 2, and continues its share."""
    path, kind_flags = data["images"]
    server = start_server(path, *BASE, *kind_flags, "--keep-last")
    with LoaderClient(server.endpoint, timeout_s=30, rank=1, world_size=2) as client:
        whole = [y.tolist() for _, y in client.epoch()]
    with LoaderClient(server.endpoint, timeout_s=30, rank=1, world_size=2) as client:
        taken = [client.next()[1].tolist()]
        state = client.state_dict()
    with LoaderClient(server.endpoint, timeout_s=30, state=state) as resumed:
        taken.append(resumed.next()[1].tolist())
        again = resumed.state_dict()
    assert {k: again.get(k) for k in ("rank", "world_size", "epoch", "batch")} == \
        {"rank": 1, "world_size": 2, "epoch": 0, "batch": 2}
    with LoaderClient(server.endpoint, timeout_s=30, state=again) as last:
        taken += [y.tolist() for _, y in last.epoch()]
    assert taken == whole


@pytest.mark.parametrize("merge", ["ordered", "balanced"])
def test_two_ranks_over_two_servers_get_disjoint_shares_in_every_merge(start_server: Any, data: dict[str, Any],
                                                                      merge: str) -> None:
    path, kind_flags = data["images"]
    endpoints = [start_server(path, *BASE, *kind_flags, transport="tcp").endpoint for _ in range(2)]
    shares = []
    for rank in range(2):
        with LoaderClient(endpoints, timeout_s=30, rank=rank, world_size=2, merge=merge) as client:
            shares.append([v for _, y in client.epoch() for v in y.tolist()])
    # 2 ranks x 2 servers: 4 shares of 26 // 4 = 6 samples, one batch of 4 each: 8 samples per rank.
    assert [len(s) for s in shares] == [8, 8]
    assert len(set(shares[0] + shares[1])) == 16
