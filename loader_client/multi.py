"""Several loader servers feeding one trainer: a deterministic round-robin merge of their shares.

With m servers and data-parallel rank r of n, the client asks server i for share
``r * m + i`` of ``n * m``: the shares are disjoint, have the same number of batches, and
together hold every sample of the epoch once (less the documented remainder). Merged batch b
of an epoch is batch ``b // m`` of server ``b % m``, so the order is as deterministic as each
server's stream. ``LoaderClient([endpoint1, endpoint2, ...])`` holds one of these, made of
one `ServerStream` per server.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from .contract.errors import ConfigError, LoaderError
from .endpoints import Endpoint
from .options import ClientOptions, Start
from .receiver import BatchInfo, Delivery
from .stream import ServerStream

__all__ = ["MultiServerStream"]

_log = logging.getLogger("loader_client")


class MultiServerStream:
    """The merged stream of several servers; `on_server_loss` is ``"raise"`` or ``"continue"``.

    With ``"raise"`` (the default) the loss of any server raises its error, which names the
    endpoint. With ``"continue"`` the merge goes on over the servers left; the lost share of
    each epoch is missing, `steps_per_epoch` shrinks accordingly, and `lost` lists what was lost.
    """

    def __init__(self, endpoints: Sequence[Endpoint], options: ClientOptions) -> None:
        m = len(endpoints)
        self.endpoint = ",".join(str(e) for e in endpoints)
        self.endpoints = [str(e) for e in endpoints]
        self.on_server_loss = options.on_server_loss
        self.lost: list[dict[str, Any]] = []
        self.servers = m
        self._children: list[ServerStream] = []
        self._closed = False
        state = options.state
        rank, world_size = options.rank, options.world_size
        start = options.start()
        if state is not None:
            if state.get("servers") not in (None, m):
                raise ConfigError(f"the saved state is for {state.get('servers')} servers, not {m}")
            rank, world_size = start.rank, start.world_size
        try:
            for i, ep in enumerate(endpoints):
                child = Start.checked(start.epoch, (start.batch + m - 1 - i) // m, start.seed, start.fingerprint,
                                      rank * m + i, world_size * m)
                self._children.append(ServerStream(ep, options, child))
        except BaseException:
            self.close()
            raise
        first = self._children[0]
        prints = {c.welcome.fingerprint for c in self._children}
        if len(prints) != 1:
            self.close()
            raise ConfigError(f"the servers {self.endpoints} run different settings or data sets (fingerprints "
                              f"{sorted(prints)}); start them with the same flags and index")
        self.rank, self.world_size = rank, world_size
        self.welcome, self.info, self.x_dtype = first.welcome, dict(first.info), first.x_dtype
        self.timeout_s, self.prefetch = first.timeout_s, first.prefetch
        self._child_steps = first.steps_per_epoch
        self.steps_per_epoch = self._child_steps * m
        self._epoch, self._batch = start.epoch, start.batch
        self._alive = list(range(m))

    @property
    def wait_s(self) -> float:
        return sum(c.wait_s for c in self._children)

    @property
    def shared_memory(self) -> bool:
        return all(c.shared_memory for c in self._children)

    @property
    def position(self) -> tuple[int, int]:
        return self._epoch, self._batch

    @property
    def alive(self) -> bool:
        return any(c.alive for c in self._children)

    def take(self) -> Delivery:
        while True:
            k = self._alive[self._batch % len(self._alive)]
            try:
                got = self._children[k].take()
            except LoaderError as exc:
                if self.on_server_loss == "raise" or len(self._alive) == 1:
                    raise
                self._lose(k, exc)
                continue
            merged = Delivery(got.x, got.y, got.extras, BatchInfo(got.info.epoch, self._batch, got.info.indices))
            self._batch += 1
            if self._batch >= self.steps_per_epoch:
                self._epoch, self._batch = self._epoch + 1, 0
            return merged

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
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.welcome.seed, "rank": self.rank,
                "world_size": self.world_size, "fingerprint": self.welcome.fingerprint, "servers": self.servers}

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        return {"servers": [c.stats(server=server) for c in self._children], "lost": self.lost,
                "wait_s": self.wait_s}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for c in self._children:
            c.close()
