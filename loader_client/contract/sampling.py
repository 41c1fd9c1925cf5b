"""The sampling plan: which sample indices form batch ``b`` of epoch ``e`` for rank ``r`` of ``n``.

A pure function of (seed, epoch, rank, world size) and the settings: no state, no worker
count, so the same seed gives the same batches however many workers build them, and a resumed
stream can start anywhere.

Epoch mode: every epoch is a permutation of all samples (file order with shuffle off). Ranks
take every ``world_size``-th sample of it, so every rank gets the same number of samples:
``n // world_size`` with drop-last (the remainder is left out, a different remainder each
epoch when shuffled), or ``ceil(n / world_size)`` with keep-last, padding with samples from
the start of the permutation (as torch's DistributedSampler does).

Random mode: each batch is drawn uniformly with replacement, keyed by (seed, epoch, rank, batch).
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["SamplingPlan"]


class SamplingPlan:
    """Maps (epoch, batch, rank, world_size, seed) to an int64 array of sample indices."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        mode: str = "epoch",
        shuffle: bool = True,
        drop_last: bool = True,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.mode = mode
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._random_steps = steps_per_epoch or max(1, num_samples // batch_size)

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

    def batch(self, epoch: int, batch: int, *, seed: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Sample indices of one batch; raises IndexError past the end of the epoch."""
        steps = self.steps_per_epoch(world_size)
        if not 0 <= batch < steps:
            raise IndexError(f"batch {batch} is outside epoch of {steps} batches")
        if self.mode == "random":
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, rank, batch])))
            return rng.integers(0, self.num_samples, size=self.batch_size, dtype=np.int64)
        mine = self._rank_order(seed, epoch, rank, world_size)
        return mine[batch * self.batch_size : (batch + 1) * self.batch_size]

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of all samples for `epoch` (file order with shuffle off)."""
        return _permutation(self.num_samples, seed, epoch, self.shuffle)

    def _rank_order(self, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
        order = self.epoch_order(seed, epoch)
        total = self.samples_per_rank(world_size) * world_size
        if total > len(order):  # keep-last with ranks: pad from the start of the permutation
            order = np.resize(order, total)
        return order[rank:total:world_size]


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        order = np.arange(n, dtype=np.int64)
    else:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
        order = rng.permutation(n).astype(np.int64, copy=False)
    order.flags.writeable = False
    return order
