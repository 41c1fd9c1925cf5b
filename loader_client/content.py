"""What every batch of a stream must hold, from its welcome: the one place a batch's content is checked.

The welcome states the stream's batches: ``x``'s dtype and per-sample shape, the batch size,
and every setting of its sampling plan (`loader_client.contract.sampling`). A batch must match
them exactly (`BatchContent.check`), or the stream ends with a `ProtocolError` naming the server
and the difference:

* ``x`` has the welcome's dtype and per-sample shape, and as many samples as the plan gives
  that batch: the batch size, or the short last batch of a keep-last epoch; never none;
* ``y``, ``index`` and every ``--collate`` array have one row per sample, and ``y``'s dtype and
  per-sample shape stay those of the stream's first batch;
* ``index`` names the samples the plan owes this stream's share (rank and world size) at that
  batch of that epoch, but for the replacements of skip mode (`sampling.check_indices`).

In a stream of several servers each member is one share of the plan (rank ``r * m + i`` of
``n * m``), so a host that sends another share's samples fails here, and the loss policy of
`loader_client.losses` applies to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .contract.errors import ProtocolError
from .contract.messages import Batch, Welcome
from .contract.sampling import check_indices

__all__ = ["BatchContent"]


class BatchContent:
    """The expectations of one stream, from its welcome (module doc)."""

    def __init__(self, welcome: Welcome, peer: str) -> None:
        self.peer = peer
        self.plan = welcome.plan()
        self.seed, self.rank, self.world_size = welcome.seed, welcome.rank, welcome.world_size
        self.x_dtype = np.dtype(welcome.x_dtype)
        self.x_shape = tuple(welcome.x_shape)
        self.y_format: tuple[np.dtype[Any], tuple[int, ...]] | None = None  # set by the first batch

    def check(self, message: Batch, x: np.ndarray, y: np.ndarray, index: np.ndarray,
              extras: dict[str, np.ndarray]) -> None:
        """Raise `ProtocolError` unless the batch at `message`'s place holds what the welcome promised."""
        where = f"batch {message.batch} of epoch {message.epoch} from {self.peer}"
        n = self.plan.batch_length(message.batch, self.world_size)
        if x.dtype != self.x_dtype or x.shape != (n, *self.x_shape):
            raise ProtocolError(f"{where} has x of {x.dtype} {x.shape}; the welcome promised {self.x_dtype} "
                                f"{(n, *self.x_shape)} ({n} samples of {self.x_shape})")
        rows = {"y": y, "index": index, **extras}
        wrong = [f"{name} {a.shape}" for name, a in rows.items() if a.ndim == 0 or a.shape[0] != n]
        if wrong or index.ndim != 1 or index.dtype.kind not in "iu":
            raise ProtocolError(f"{where} has {', '.join(wrong) or f'index of {index.dtype} {index.shape}'}: "
                                f"not one row (an integer index) for each of its {n} samples")
        y_format = (y.dtype, y.shape[1:])
        if self.y_format is None:
            self.y_format = y_format
        elif y_format != self.y_format:
            raise ProtocolError(f"{where} has y of {y.dtype} with samples of shape {y.shape[1:]}; the stream's first "
                                f"batch had {self.y_format[0]} of {self.y_format[1]}")
        owed = self.plan.batch(message.epoch, message.batch, seed=self.seed, rank=self.rank,
                               world_size=self.world_size)
        problem = check_indices(index.astype(np.int64, copy=False), owed)
        if problem is not None:
            raise ProtocolError(f"{where} holds samples that are not its share's (rank {self.rank} of "
                                f"{self.world_size}, seed {self.seed}): {problem}")
