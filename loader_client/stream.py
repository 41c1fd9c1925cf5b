"""The stream protocol: what a `LoaderClient` holds, whatever feeds it.

A `Stream` hands out batches in order (`take`), says where it stands (`position`,
`steps_per_epoch`, `state_dict`), how it is doing (`stats`, `wait_s`), who serves it
(`servers`, `lost`) and what its batches look like (`info`, `x_dtype`), and releases
everything on `close`. `LoaderClient` uses nothing else of it, so a new way of feeding a
trainer is one new class that implements this protocol and one line where the client picks it
(`loader_client.client.open_stream`). Today:

    ServerStream   one server (server_stream.py): handshake, background receiver, credit
    HostsStream    several servers merged (hosts.py), built from ServerStreams and the
                   `ClientOptions`; what losing one does is its loss policy (losses.py)

`BatchInfo` and `Delivery` are what a stream hands out; `Servers` is who serves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["BatchInfo", "Delivery", "Servers", "Stream"]


@dataclass(frozen=True)
class BatchInfo:
    """Where a batch sits in the stream, and which samples it holds."""

    epoch: int
    batch: int
    indices: np.ndarray


@dataclass(frozen=True)
class Delivery:
    """One received batch: ``x``, ``y``, the --collate arrays in order, and where it sits."""

    x: np.ndarray
    y: np.ndarray
    extras: tuple[np.ndarray, ...]
    info: BatchInfo


@dataclass(frozen=True)
class Servers:
    """Who feeds a stream: every endpoint it was given (in order), those serving now, lost ones
    that answer again and rejoin at the next epoch boundary, and the batches each built for the
    trainer (several servers; empty for one)."""

    endpoints: tuple[str, ...]
    active: tuple[str, ...]
    ready_to_rejoin: tuple[str, ...] = ()
    delivered_by: Mapping[str, int] = field(default_factory=dict)


class Stream(Protocol):
    """A source of batches for one trainer (module doc). Implementations need not subclass it."""

    @property
    def info(self) -> dict[str, Any]:
        """The stream's metadata: the server's welcome fields (num_samples, batch_size, seed, ...)."""

    @property
    def x_dtype(self) -> np.dtype[Any]:
        """The dtype of ``x`` as the trainer gets it (float32 when the client normalizes)."""

    @property
    def steps_per_epoch(self) -> int:
        """Batches in the current epoch."""

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch)`` of the next batch `take()` returns."""

    @property
    def wait_s(self) -> float:
        """Total time the trainer spent waiting in `take()`."""

    @property
    def shared_memory(self) -> bool:
        """True when batches arrive through shared memory rather than over a socket."""

    @property
    def servers(self) -> Servers:
        """Who feeds this stream."""

    @property
    def lost(self) -> list[dict[str, Any]]:
        """Servers lost so far: endpoint, error, and where in the stream it happened."""

    def take(self) -> Delivery:
        """The next batch; raises the error that ended the stream (and again on every later call)."""

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable state that resumes the stream exactly where it stands."""

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        """The trainer's side (waits, stall) and, with `server`, the servers' own statistics."""

    def close(self) -> None:
        """Release threads and sockets; idempotent."""
