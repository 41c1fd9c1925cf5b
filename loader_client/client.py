"""The client: a generator of ``(x, y)`` batches received from one or several loader servers.

`LoaderClient` is what a trainer holds: iteration, epochs, position, resume state, statistics
and the context manager, the same for every kind of stream. It holds a `Stream`
(`loader_client.stream`), which `open_stream` picks: a `ServerStream` (one server) or a
`HostsStream` (several, merged; `loader_client.hosts`). Settings are grouped and checked once
in a `ClientOptions` (`loader_client.options`); the streams take them as they are.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import numpy as np

from .contract.errors import ConfigError, LoaderError
from .endpoints import Endpoint, parse_endpoint
from .hosts import HostsStream
from .options import ClientOptions, Start
from .queries import Sources, health, server_stats, sources
from .server_stream import ServerStream
from .stream import BatchInfo, Stream

__all__ = ["BatchInfo", "BatchTuple", "ClientOptions", "LoaderClient", "batches", "health", "open_stream",
           "server_stats"]

#: What iterating a client yields: ``(x, y)``, or ``(x, y, *extras)`` when the server's --collate
#: adds arrays (in the order the collate function returned them). Typed as a tuple of any length
#: because it is one: ``x, y = batch`` holds only for servers without --collate arrays.
BatchTuple: TypeAlias = tuple[np.ndarray, ...]

_log = logging.getLogger("loader_client")


def open_stream(endpoints: Sequence[Endpoint], options: ClientOptions) -> Stream:
    """The stream a client of `endpoints` holds: the one place that picks a `Stream` class."""
    if len(endpoints) == 1:
        return ServerStream(endpoints[0], options, options.start())

    def connect(endpoint: Endpoint, start: Start) -> Stream:
        return ServerStream(endpoint, options, start)

    return HostsStream(endpoints, options, connect)


class LoaderClient:
    """Connects to a loader server and yields ``(x, y)`` batches, epoch after epoch.

    Example::

        with LoaderClient("tcp://127.0.0.1:5555") as client:
            model.fit(iter(client), steps_per_epoch=client.steps_per_epoch, epochs=10, shuffle=False)

    Keywords (grouped in `ClientOptions`; ``options=ClientOptions(...)`` passes them all at once):
    `timeout_s` bounds every wait for the server; `prefetch` batches are kept in transit.
    `state` (from `state_dict()`) resumes a stream exactly where it stopped; `rank` and
    `world_size` select one data-parallel share of every epoch; `seed` overrides the server's.
    `share="NAME"` joins the server's share of that name: trainers asking for the same stream
    (rank, world size, seed, augmentation) get every batch built once for all of them, each
    still exactly once and in order (README, "One decode for a sweep").
    `shared_memory` (default: on for ipc:// and loopback endpoints) lets a server on the same
    host hand over pixels through shared memory instead of the socket; it falls back to the
    socket when that is not possible. `normalize=True` (with optional per-channel `mean`/`std`)
    turns uint8 batches into float32 ``(x / 255 - mean) / std`` on this host's background
    thread, keeping uint8 on the wire. `log_epochs=True` logs one line per epoch with the time
    the trainer waited for data (on stderr when Python logging is not configured to show INFO lines
    of the ``loader_client`` logger). `manifest=True` asks for every batch's manifest
    (``client.last.manifest``: each sample's index, source and augmentation draws).
    `augment=False` asks for no augmentation (a validation stream from a training server).
    `name` is how the server's log names this client.

    A list of endpoints merges several servers (see `loader_client.hosts`; `merge` says how,
    `on_server_loss` what losing one does). `server_public_key` and `client_keys` (public, secret; Z85
    text or a path to a key file from `loader-server keygen`) connect to a CURVE server.
    `server_uid` trusts an ``ipc://`` or loopback ``tcp://`` server that runs as that user (by default only
    this user's and root's: a socket that another user put in a shared folder, or a port another user took,
    is refused); without it, the
    ``LOADER_SERVER_UID`` variable when set (as compose and the pods set it for the trainer).
    """

    def __init__(self, endpoint: str | Sequence[str], *, options: ClientOptions | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either options=ClientOptions(...) or keyword arguments, not both")
        self.options = options if options is not None else ClientOptions.from_kwargs(**kwargs)
        if isinstance(endpoint, str):
            endpoints = [parse_endpoint(endpoint)]
        elif isinstance(endpoint, Sequence) and len(endpoint) >= 1:
            endpoints = [parse_endpoint(e) for e in endpoint]
        else:
            raise ConfigError(f"`endpoint` must name at least one server, e.g. 'tcp://127.0.0.1:5555', "
                              f"got {endpoint!r}")
        self.stream: Stream = open_stream(endpoints, self.options)
        self.endpoint = ",".join(self.stream.servers.endpoints)
        self.last: BatchInfo | None = None
        self.batches_taken = 0
        self._created = time.monotonic()
        self._epoch_mark = (self._created, 0.0, 0)  # (start time, wait_s, batches) of the current epoch
        self._closed = False
        info = self.stream.info
        self.info: dict[str, Any] = info
        self.num_samples: int = info["num_samples"]
        self.num_classes: int | None = info["num_classes"]  # None: the labels are not class numbers
        self.batch_size: int = info["batch_size"]
        self.class_names: list[str] | None = info["class_names"]
        self.x_shape: tuple[int, ...] = tuple(info["x_shape"])
        self.x_dtype: np.dtype[Any] = self.stream.x_dtype
        self.seed: int = info["seed"]
        self.fingerprint: str = info["fingerprint"]
        self.rank: int = self.stream.state_dict()["rank"]
        self.world_size: int = self.stream.state_dict()["world_size"]
        self.timeout_s: float = float(self.options.timeout_s)
        self.prefetch: int = self.options.prefetch
        self.log_epochs = self.options.log_epochs
        self._dataset_version: str | None = None

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Generator[BatchTuple, None, None]:
        """Yield ``(x, y)`` (or ``(x, y, *extras)``) forever, epoch after epoch.

        A real generator, as Keras requires.
        """
        while True:
            yield self.next()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self) -> Generator[BatchTuple, None, None]:
        """Yield the batches left in the current epoch: all `steps_per_epoch` at an epoch start."""
        for _ in range(self.steps_per_epoch - self.position[1]):
            yield self.next()

    def next(self) -> BatchTuple:
        """Return the next ``(x, y)`` (plus the server's --collate arrays, in order, if any).

        Raises the server's error, `ServerStoppedError`, `ProtocolError` or `LoaderTimeoutError`;
        the client's sockets and thread are closed by then.
        """
        if self._closed:
            raise LoaderError("the client is closed")
        epoch = self.position[0]
        got = self.stream.take()
        self.last = got.info
        self.batches_taken += 1
        if self.position[0] != epoch:
            self._end_of_epoch(epoch)
        return (got.x, got.y, *got.extras) if got.extras else (got.x, got.y)

    def _end_of_epoch(self, epoch: int) -> None:
        started, waited, taken = self._epoch_mark
        now = time.monotonic()
        self._epoch_mark = (now, self.wait_s, self.batches_taken)
        if self.log_epochs:
            wall, wait = now - started, self.wait_s - waited
            line = (f"epoch {epoch}: {self.batches_taken - taken} batches in {wall:.1f} s; waited {wait:.2f} s for "
                    f"data ({100 * wait / max(wall, 1e-9):.1f}% stall)")
            if _log.hasHandlers() and _log.isEnabledFor(logging.INFO):
                _log.info("%s", line)
            else:  # asked for, but logging would drop it (not configured, or above INFO): say it anyway
                print(f"loader_client: {line}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ where the stream is
    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (for several servers, it shrinks when one is lost with on_server_loss='continue')."""
        return self.stream.steps_per_epoch

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batch)`` of the next batch `next()` returns."""
        return self.stream.position

    @property
    def wait_s(self) -> float:
        """Total time the trainer spent waiting in `next()`."""
        return self.stream.wait_s

    @property
    def shared_memory(self) -> bool:
        """True when batches arrive through shared memory rather than over the socket."""
        return self.stream.shared_memory

    @property
    def servers(self) -> int:
        """How many servers feed this client."""
        return len(self.stream.servers.endpoints)

    @property
    def endpoints(self) -> list[str]:
        return list(self.stream.servers.endpoints)

    @property
    def lost(self) -> list[dict[str, Any]]:
        """Servers lost: endpoint, error, where (epoch, batch); with on_server_loss='continue', the share dropped."""
        return list(self.stream.lost)

    @property
    def active_endpoints(self) -> list[str]:
        """The servers serving now (with several: the lost ones are left out until they rejoin)."""
        return list(self.stream.servers.active)

    @property
    def ready_to_rejoin(self) -> list[str]:
        """Lost servers that answer again: they rejoin at the next epoch boundary."""
        return list(self.stream.servers.ready_to_rejoin)

    @property
    def delivered_by(self) -> dict[str, int]:
        """Batches each server built for this trainer (several servers)."""
        return dict(self.stream.servers.delivered_by)

    @property
    def merge(self) -> str:
        return self.options.merge

    @property
    def on_server_loss(self) -> str:
        return self.options.on_server_loss

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable state; ``LoaderClient(endpoint, state=...)`` resumes there."""
        return self.stream.state_dict()

    def sources(self, indices: Iterable[int]) -> list[str]:
        """Where each sample comes from: one string per index (a path, ``shard.tar:member`` or
        ``file.parquet:row``), for the indices of `client.last.indices` or a manifest. Asked of a server
        that serves this stream (they all hold the same data set); `dataset_version` says which version."""
        found = self._sources(indices)
        self._dataset_version = found.version
        return found.sources

    @property
    def dataset_version(self) -> str:
        """The served data set's version: a hash that changes when its samples or labels change (asked once)."""
        if self._dataset_version is None:
            self._dataset_version = self._sources([]).version
        return self._dataset_version

    def _sources(self, indices: Iterable[int]) -> Sources:
        wanted = list(indices)
        curve = {"server_public_key": self.options.server_public_key, "client_keys": self.options.client_keys}
        failure: LoaderError | None = None
        for endpoint in self.active_endpoints or self.endpoints:
            try:
                return sources(endpoint, wanted, timeout_s=self.timeout_s, **curve)
            except ConfigError:
                raise  # an index outside the data set: every server would say so
            except LoaderError as exc:  # that server is gone: ask another
                failure = exc
        assert failure is not None
        raise failure

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        """The trainer's side (data stall: the time spent waiting in next()) and the server's stats.

        A stall fraction near 0 means the loader keeps up; a large one means the trainer waits
        for data: add workers or loader hosts.
        """
        return self.stream.stats(server=server)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the background thread(s), say goodbye to the server(s), release the sockets."""
        if self._closed:
            return
        self._closed = True
        self.stream.close()

    def __enter__(self) -> LoaderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def batches(endpoint: str | Sequence[str], **kwargs: Any) -> Iterator[BatchTuple]:
    """Plain generator of ``(x, y)``: the drop-in for a classic ``train_data(...)`` generator.

    Keyword arguments go to `LoaderClient`; the connection closes with the generator.
    """
    with LoaderClient(endpoint, **kwargs) as client:
        yield from client
