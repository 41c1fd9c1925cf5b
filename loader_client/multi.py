"""Several loader servers feeding one trainer: a deterministic round-robin merge of their shares.

With m servers and data-parallel rank r of n, the client asks server i for share
``r * m + i`` of ``n * m``: the shares are disjoint, have the same number of batches, and
together hold every sample of the epoch once (less the documented remainder). Merged batch b
of an epoch is batch ``b // m`` of server ``b % m``, so the order is as deterministic as each
server's stream. ``LoaderClient([endpoint1, endpoint2, ...])`` returns this class.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from .client import BatchInfo, LoaderClient
from .errors import ConfigError, LoaderError

__all__ = ["MultiServerClient"]

_log = logging.getLogger("loader_client")


class MultiServerClient(LoaderClient):
    """A `LoaderClient` over several servers; `on_server_loss` is ``"raise"`` or ``"continue"``.

    With ``"raise"`` (the default) the loss of any server raises its error, which names the
    endpoint. With ``"continue"`` the merge goes on over the servers left; the lost share of
    each epoch is missing, `steps_per_epoch` shrinks accordingly, and `lost` lists what was lost.
    """

    def __init__(self, endpoint: list[str] | tuple[str, ...], *, rank: int = 0, world_size: int = 1,
                 state: dict[str, Any] | None = None, on_server_loss: str = "raise", **kwargs: Any) -> None:
        if on_server_loss not in ("raise", "continue"):
            raise ValueError(f"`on_server_loss` must be 'raise' or 'continue', got {on_server_loss!r}")
        endpoints = list(endpoint)
        m = len(endpoints)
        self.endpoint = ",".join(endpoints)
        self.endpoints = endpoints
        self.on_server_loss = on_server_loss
        self.lost: list[dict[str, Any]] = []
        self.last: BatchInfo | None = None
        self._children: list[LoaderClient] = []
        self._closed = False
        if state is not None:
            if state.get("servers") not in (None, m):
                raise ConfigError(f"the saved state is for {state.get('servers')} servers, not {m}")
            rank, world_size = state.get("rank", rank), state.get("world_size", world_size)
        try:
            for i, ep in enumerate(endpoints):
                child_state = None
                if state is not None:
                    b = state["batch"]
                    child_state = {**state, "batch": (b + m - 1 - i) // m, "rank": rank * m + i,
                                   "world_size": world_size * m}
                    child_state.pop("servers", None)
                self._children.append(LoaderClient(ep, rank=rank * m + i, world_size=world_size * m,
                                                   state=child_state, **kwargs))
        except BaseException:
            self.close()
            raise
        first = self._children[0]
        prints = {c.fingerprint for c in self._children}
        if len(prints) != 1:
            self.close()
            raise ConfigError(f"the servers {endpoints} run different settings or data sets (fingerprints "
                              f"{sorted(prints)}); start them with the same flags and index")
        self.rank, self.world_size, self.servers = rank, world_size, m
        self.num_samples, self.batch_size = first.num_samples, first.batch_size
        self.class_names, self.x_shape, self.x_dtype = first.class_names, first.x_shape, first.x_dtype
        self.num_classes = first.num_classes
        self.seed, self.fingerprint, self.info = first.seed, first.fingerprint, dict(first.info)
        self.timeout_s, self.prefetch = first.timeout_s, first.prefetch
        self._child_steps = first.steps_per_epoch
        self.steps_per_epoch = self._child_steps * m
        self._epoch, self._batch = (state["epoch"], state["batch"]) if state is not None else (0, 0)
        self._alive = list(range(m))

    @property
    def wait_s(self) -> float:  # type: ignore[override]
        return sum(c.wait_s for c in self._children)

    @property
    def shared_memory(self) -> bool:
        return all(c.shared_memory for c in self._children)

    def next(self) -> tuple[np.ndarray, ...]:
        while True:
            k = self._alive[self._batch % len(self._alive)]
            child = self._children[k]
            try:
                batch = child.next()
            except LoaderError as exc:
                if self.on_server_loss == "raise" or len(self._alive) == 1:
                    raise
                self._lose(k, exc)
                continue
            info = child.last
            assert info is not None
            self.last = BatchInfo(info.epoch, self._batch, info.indices)
            self._batch += 1
            if self._batch >= self.steps_per_epoch:
                self._epoch, self._batch = self._epoch + 1, 0
            return batch

    def _lose(self, k: int, exc: Exception) -> None:
        self._alive.remove(k)
        share = 1 / self.servers
        self.lost.append({"endpoint": self.endpoints[k], "error": str(exc), "share": share})
        self.steps_per_epoch = self._child_steps * len(self._alive)
        self._batch = min(self._batch, self.steps_per_epoch - 1)
        _log.warning("lost loader server %s (%s); continuing on %d server(s): %.0f%% of each epoch is "
                     "missing from now on", self.endpoints[k], exc, len(self._alive),
                     100 * share * (self.servers - len(self._alive)))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.fingerprint, "servers": self.servers}

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        return {"servers": [c.stats(server=server) for c in self._children], "lost": self.lost,
                "wait_s": self.wait_s}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self._children:
            c.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()
