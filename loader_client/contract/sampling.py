"""The sampling plan: which sample indices form batch ``b`` of epoch ``e`` for rank ``r`` of ``n``.

A pure function of (seed, epoch, rank, world size) and the settings: no state, no worker
count, so the same seed gives the same batches however many workers build them, and a resumed
stream can start anywhere. Both ends use it: the server to build each batch, the client to
check that each batch holds the samples its share is owed (a welcome states every setting the
plan needs: `messages.Welcome.plan`), so a server cannot hand one share another's samples.

Epoch mode: every epoch is a permutation of all samples (file order with shuffle off). Ranks
take every ``world_size``-th sample of it, so every rank gets the same number of samples:
``n // world_size`` with drop-last (the remainder is left out, a different remainder each
epoch when shuffled), or ``ceil(n / world_size)`` with keep-last, padding with samples from
the start of the permutation (as torch's DistributedSampler does). Only the last batch of an
epoch may be short, and only with keep-last (`batch_length`).

Random mode: each batch is drawn uniformly with replacement, keyed by (seed, epoch, rank, batch).

A sample that cannot be read under ``--on-error skip`` is replaced by the next good sample of
its batch (`substitute_sources`); `check_indices` accepts exactly such replacements.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["MODES", "SamplingPlan", "check_indices", "substitute_sources"]

#: The sampling modes a plan knows.
MODES = ("epoch", "random")


class SamplingPlan:
    """Maps (epoch, batch, rank, world_size, seed) to an int64 array of sample indices.

    The permutations of the last `orders_kept` (seed, epoch) pairs are kept (8 bytes a sample
    each): a server serves clients at several epochs, a client's stream spans two at most.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        mode: str = "epoch",
        shuffle: bool = True,
        drop_last: bool = True,
        steps_per_epoch: int | None = None,
        orders_kept: int = 8,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.mode = mode
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._random_steps = steps_per_epoch or max(1, num_samples // batch_size)
        self._orders: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._orders_kept = max(1, orders_kept)

    def samples_per_rank(self, world_size: int) -> int:
        """Samples each rank sees per epoch (epoch mode)."""
        if self.drop_last:
            return self.num_samples // world_size
        return math.ceil(self.num_samples / world_size)

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Batches per epoch for one rank; the same for every rank."""
        if self.mode == "random":
            return self._random_steps
        per_rank = self.samples_per_rank(world_size)
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def batch_length(self, batch: int, world_size: int = 1) -> int:
        """Samples in batch `batch` of an epoch: the batch size, less for the last one with keep-last."""
        if self.mode == "random":
            return self.batch_size
        return min(self.batch_size, self.samples_per_rank(world_size) - batch * self.batch_size)

    def batch(self, epoch: int, batch: int, *, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Sample indices of one batch; raises IndexError past the end of the epoch."""
        steps = self.steps_per_epoch(world_size)
        if not 0 <= batch < steps:
            raise IndexError(f"batch {batch} is outside epoch of {steps} batches")
        if self.mode == "random":
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, rank, batch])))
            return rng.integers(0, self.num_samples, size=self.batch_size, dtype=np.int64)
        order = self.epoch_order(seed, epoch)
        # Place j of this rank's share is place rank + j * world_size of the epoch order, which
        # keep-last pads by repeating it from the start: only this batch's places are computed.
        first = batch * self.batch_size
        places = rank + world_size * np.arange(first, first + self.batch_length(batch, world_size), dtype=np.int64)
        return order[places % len(order)]

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of all samples for `epoch` (file order with shuffle off; read-only)."""
        key = (seed, epoch)
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = _permutation(self.num_samples, seed, epoch, self.shuffle)
            while len(self._orders) > self._orders_kept:
                self._orders.popitem(last=False)
        else:
            self._orders.move_to_end(key)
        return order


def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        order = np.arange(n, dtype=np.int64)
    else:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
        order = rng.permutation(n).astype(np.int64, copy=False)
    order.flags.writeable = False
    return order


def substitute_sources(bad: Sequence[int], n: int) -> dict[int, int]:
    """Skip mode: the place whose sample replaces each bad place of a batch of `n`: the next good
    place, cyclically. Raises ValueError when every place is bad."""
    bad_set = set(bad)
    if len(bad_set) >= n:
        raise ValueError("every sample of the batch is bad")
    return {slot: next((slot + k) % n for k in range(1, n) if (slot + k) % n not in bad_set) for slot in bad}


def check_indices(index: np.ndarray, owed: np.ndarray) -> str | None:
    """Why `index` (what a batch says it holds) is not `owed` (what the plan gives that batch), or None.

    Places may differ only as skip mode replaces bad samples (`substitute_sources`): each place
    that differs holds the sample of the next place that holds its own.
    """
    if index.shape != owed.shape:
        return f"{len(index)} sample indices where the plan gives {len(owed)}"
    differ = np.flatnonzero(index != owed)
    if not len(differ):
        return None
    try:
        sources = substitute_sources(differ.tolist(), len(owed))
    except ValueError:
        sources = {}
    wrong = [int(p) for p in differ if p not in sources or index[p] != owed[sources[int(p)]]]
    if not wrong:
        return None
    shown = ", ".join(f"{int(index[p])} at place {p} (owed {int(owed[p])})" for p in wrong[:3])
    return f"{len(wrong)} of its {len(owed)} samples are not the ones owed: {shown}{', ...' if len(wrong) > 3 else ''}"
