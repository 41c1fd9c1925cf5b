"""Several loader hosts feeding one trainer, exactly once when a host dies or is slow.

``LoaderClient([endpoint1, endpoint2, ...])`` holds a `HostsStream`: one stream per share of
the epoch, each an ordinary single-server `LoaderClient` (this module uses nothing else of it
than its public API; `client.py` passes the class in, so there is no import cycle), merged as
`loader_client.failover` plans. With m servers and rank r of
n, share i is share ``r * m + i`` of ``n * m`` of the sampling plan, so any server can build
any share, from any batch.

* ``merge="ordered"`` (the default): merged batch b is batch ``b // m`` of share ``b % m``,
  a pure function of (seed, epoch, rank, world size, server count), whichever server builds
  it. Throughput is m times the slowest server's.
* ``merge="balanced"``: the next batch is whichever share's stream has one ready, and a
  server that has finished its share of the epoch takes the back half of the largest share
  still being built (a new stream on it, from that batch). Faster servers deliver more;
  every batch is still returned exactly once per epoch, and epochs never mix, but the order
  inside an epoch depends on timing: resume is exact (the state lists the batches not yet
  returned), a rerun is not batch-for-batch identical.

``on_server_loss="failover"`` (the default): when a server fails (an error, or silence for
`timeout_s`), the batches of its shares that were not returned yet, including those in
flight, are requested from the surviving servers, starting at the first batch the trainer has
not got: nothing lost, nothing repeated. The next epochs run on the survivors (one may serve
two shares), while the lost endpoints are probed in the background with `health`; one that
answers again (a restarted pod) rejoins at the next epoch boundary. Only when no server is
left does `next()` raise, naming every endpoint. ``on_server_loss="raise"``: the first loss
raises its error. (``"continue"``, the old drop-the-share behaviour, is `loader_client.multi`.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .queries import health
from .receiver import BatchInfo, Delivery

if TYPE_CHECKING:
    from .client import LoaderClient
from .errors import AuthenticationError, BadSampleError, ConfigError, LoaderError, LoaderTimeoutError, ProtocolError
from .failover import EpochPlan, Task, next_epoch_plan, next_unserved

__all__ = ["HostsStream", "MERGES", "ON_SERVER_LOSS"]

MERGES = ("ordered", "balanced")
ON_SERVER_LOSS = ("failover", "raise")
_log = logging.getLogger("loader_client")
_NOT_A_LOSS = (BadSampleError, ConfigError, AuthenticationError)  # another server would fail the same way


def is_server_loss(exc: BaseException) -> bool:
    """True for errors that mean this server stopped serving (silence, goodbye, broken stream),
    False for errors another server would raise too (a bad sample, settings, keys)."""
    return isinstance(exc, LoaderError) and not isinstance(exc, _NOT_A_LOSS)


@dataclass(eq=False)
class _Stream:
    """One single-server stream of one share, and where it stands."""

    server: int
    share: int
    client: LoaderClient
    epoch: int
    batch: int  # position of the next batch this stream returns
    task: Task | None = None
    held: tuple[tuple[np.ndarray, ...], BatchInfo] | None = None  # balanced: one batch taken ahead
    permit: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(1))
    closed: bool = False
    pumping: bool = False

    def advance(self, steps: int) -> None:
        self.batch += 1
        if self.batch >= steps:
            self.epoch, self.batch = self.epoch + 1, 0


class _Prober:
    """Asks the lost endpoints for `health` in the background; `ready()` lists those that answer."""

    def __init__(self, interval_s: float, timeout_s: float, curve: dict[str, Any]) -> None:
        self.interval_s, self.timeout_s, self.curve = interval_s, timeout_s, curve
        self._lost: set[str] = set()
        self._ready: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, endpoint: str) -> None:
        with self._lock:
            self._lost.add(endpoint)
            self._ready.discard(endpoint)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loader-hosts-prober", daemon=True)
            self._thread.start()

    def ready(self) -> set[str]:
        with self._lock:
            return self._ready & self._lost

    def rejoined(self, endpoint: str) -> None:
        with self._lock:
            self._lost.discard(endpoint)
            self._ready.discard(endpoint)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                lost = sorted(self._lost)
            for endpoint in lost:
                ok = _answers(endpoint, self.timeout_s, self.curve)
                with self._lock:
                    (self._ready.add if ok else self._ready.discard)(endpoint)

    def close(self) -> None:
        self._stop.set()


def _answers(endpoint: str, timeout_s: float, curve: dict[str, Any]) -> bool:
    try:
        return bool(health(endpoint, timeout_s=timeout_s, **curve).get("ok"))
    except Exception:  # any failure to answer means "not back yet"; never kill the prober
        return False


def _pump(stream: _Stream, arrivals: queue.Queue[tuple[_Stream, Any, BatchInfo | None]]) -> None:
    """Balanced merge: take one batch at a time from `stream` onto the common arrivals queue.

    A function of the stream alone (not of the `HostsStream`), so that an unclosed client can
    still be garbage-collected and closed."""
    while True:
        stream.permit.acquire()
        if stream.closed:
            return
        try:
            batch: Any = stream.client.next()
            info = stream.client.last
        except BaseException as exc:  # handed to the trainer's thread, never lost
            arrivals.put((stream, exc, None))
            return
        arrivals.put((stream, batch, info))


class HostsStream:
    """The stream of a `LoaderClient` over several servers, failing over between them (module doc).

    `lost` lists the losses (endpoint, error, epoch, batch); `delivered_by` counts the batches
    each server built for the trainer; `active_endpoints` the servers
    serving now; `ready_to_rejoin` the lost ones that answer again and will rejoin at the next
    epoch boundary. Other keyword arguments go to each server's `LoaderClient`.
    """

    def __init__(self, endpoint: Sequence[str], *, make_client: Callable[..., LoaderClient], rank: int = 0,
                 world_size: int = 1, seed: int | None = None,
                 state: dict[str, Any] | None = None, timeout_s: float = 30.0, prefetch: int = 4,
                 on_server_loss: str = "failover", merge: str = "ordered", log_epochs: bool = False,
                 **kwargs: Any) -> None:
        self._closed = True  # until the streams exist: close() and __del__ have nothing to do
        self._make_client = make_client
        if on_server_loss not in ON_SERVER_LOSS:
            raise ValueError(f"`on_server_loss` must be one of {ON_SERVER_LOSS} or 'continue', got {on_server_loss!r}")
        if merge not in MERGES:
            raise ValueError(f"`merge` must be one of {MERGES}, got {merge!r}")
        endpoints = list(endpoint)
        if not endpoints:  # one endpoint twice is allowed: that server then serves two shares
            raise ValueError("`endpoint` must name at least one server")
        m = len(endpoints)
        self.endpoints, self.servers = endpoints, m
        self.endpoint = ",".join(endpoints)
        self.on_server_loss, self.merge = on_server_loss, merge
        self.timeout_s, self.prefetch, self.log_epochs = float(timeout_s), prefetch, log_epochs
        self.lost: list[dict[str, Any]] = []
        self.delivered_by = dict.fromkeys(endpoints, 0)  # batches returned to the trainer, per server
        self.last: BatchInfo | None = None
        self.wait_s, self.batches_taken = 0.0, 0
        self._created = time.monotonic()
        self._child_kwargs = {"timeout_s": timeout_s, "prefetch": prefetch, **kwargs}
        curve = {k: kwargs[k] for k in ("server_public_key", "client_keys") if kwargs.get(k)}
        self._prober = _Prober(min(max(timeout_s / 2, 0.5), 5.0), min(timeout_s / 2, 2.0), curve)
        self._streams: list[_Stream] = []
        self._arrivals: queue.Queue[tuple[_Stream, Any, BatchInfo | None]] = queue.Queue()
        self._down: set[int] = set()
        self._rejoining: set[int] = set()
        epoch, pending = 0, None
        if state is not None:
            epoch, batch, seed, pending = _parse_state(state, m, merge)
            rank, world_size = state.get("rank", rank), state.get("world_size", world_size)
        self.rank, self.world_size = rank, world_size
        self.seed = seed  # None until the first server says
        if state is not None and isinstance(state.get("fingerprint"), str):
            self.fingerprint = state["fingerprint"]  # the first server is checked against it too
        self._failure: LoaderError | None = None
        self._epoch = epoch
        self._closed = False
        try:
            first = self._first_contact(seed)
            self._adopt_metadata(first.client)
            if state is not None and pending is None:  # an ordered position: merged batch b
                pending = [[s, (batch + m - 1 - s) // m, self._steps] for s in range(m)]
            self._plan = EpochPlan(m, self._steps, self._alive(), pending=pending, prefer={first.share: first.server})
            if merge == "ordered" and not self._plan.is_ordered():
                raise ConfigError("this state comes from merge='balanced' mid-epoch: resume it with merge='balanced'")
            self._ensure_streams()
            self._drop_idle_streams()
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- construction
    def _first_contact(self, seed: int | None) -> _Stream:
        """The first server that answers: its handshake tells seed, fingerprint and batches per share."""
        for server, endpoint in enumerate(self.endpoints):
            try:
                start = self._stream_state(0, self._epoch, 0) if self.seed is not None else None
                client = self._make_client(endpoint, rank=self.rank * self.servers,
                                      world_size=self.world_size * self.servers, seed=seed, state=start,
                                      **self._child_kwargs)
            except LoaderError as exc:
                if not is_server_loss(exc) or self.on_server_loss == "raise":
                    raise
                self._record_loss(server, exc)
                continue
            stream = _Stream(server, 0, client, client.position[0], client.position[1])
            self._streams.append(stream)
            return stream
        raise self._all_gone()

    def _adopt_metadata(self, first: LoaderClient) -> None:
        self.seed, self.fingerprint, self.info = first.seed, first.fingerprint, dict(first.info)
        self.num_samples, self.batch_size = first.num_samples, first.batch_size
        self.class_names, self.x_shape, self.x_dtype = first.class_names, first.x_shape, first.x_dtype
        self.num_classes = first.num_classes
        self._steps = first.steps_per_epoch
        self.steps_per_epoch = self._steps * self.servers

    def _stream_state(self, share: int, epoch: int, batch: int) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": epoch, "batch": batch, "seed": self.seed,
                                 "rank": self.rank * self.servers + share, "world_size": self.world_size * self.servers}
        if getattr(self, "fingerprint", None):
            state["fingerprint"] = self.fingerprint
        return state

    # ---------------------------------------------------------------- public API
    @property
    def active_endpoints(self) -> list[str]:
        return [self.endpoints[s] for s in self._alive()]

    @property
    def ready_to_rejoin(self) -> list[str]:
        return sorted(self._prober.ready())

    @property
    def shared_memory(self) -> bool:
        return bool(self._streams) and all(s.client.shared_memory for s in self._streams)

    @property
    def position(self) -> tuple[int, int]:
        return self._epoch, self._plan.delivered

    def next(self) -> tuple[np.ndarray, ...]:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise LoaderError("the client is closed")
        started = time.perf_counter()
        try:
            batch, info = self._next_ordered() if self.merge == "ordered" else self._next_balanced()
        finally:
            self.wait_s += time.perf_counter() - started
        self.last = BatchInfo(self._epoch, self._plan.delivered - 1, info.indices)
        self.batches_taken += 1
        if self._plan.done:
            self._next_epoch()
        return batch

    def take(self) -> Delivery:
        """The next merged batch (the stream interface `LoaderClient` uses)."""
        x, y, *extras = self.next()
        assert self.last is not None
        return Delivery(x, y, tuple(extras), self.last)

    def state_dict(self) -> dict[str, Any]:
        """Merged position and server count; the balanced merge adds the batch runs not returned yet."""
        state: dict[str, Any] = {"epoch": self._epoch, "batch": self._plan.delivered, "seed": self.seed,
                                 "rank": self.rank, "world_size": self.world_size, "fingerprint": self.fingerprint,
                                 "servers": self.servers}
        if self.merge == "balanced":
            state["merge"] = "balanced"
            state["pending"] = self._plan.pending()
        return state

    def stats(self, *, server: bool = True) -> dict[str, Any]:
        streams = []
        for s in self._streams:
            try:
                streams.append({"endpoint": self.endpoints[s.server], "share": s.share,
                                **s.client.stats(server=server)})
            except LoaderError as exc:
                streams.append({"endpoint": self.endpoints[s.server], "share": s.share, "error": str(exc)})
        wall = time.monotonic() - self._created
        return {"streams": streams, "lost": self.lost, "active_endpoints": self.active_endpoints,
                "delivered_by": dict(self.delivered_by),
                "batches_taken": self.batches_taken, "wait_s": self.wait_s, "wall_s": wall,
                "stall_fraction": self.wait_s / max(wall, 1e-9), "position": list(self.position)}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._prober.close()
        for s in list(self._streams):
            self._close_stream(s)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # ---------------------------------------------------------------- ordered merge
    def _next_ordered(self) -> tuple[tuple[np.ndarray, ...], BatchInfo]:
        while True:
            task = self._plan.ordered_task()
            stream = self._stream_of(task)
            try:
                batch = stream.client.next()
            except LoaderError as exc:
                self._on_error(stream.server, exc)
                continue
            info = stream.client.last
            assert info is not None
            self._deliver(stream, info)
            return batch, info

    # ---------------------------------------------------------------- balanced merge
    def _next_balanced(self) -> tuple[tuple[np.ndarray, ...], BatchInfo]:
        while True:
            for s in self._streams:
                if s.held is not None and s.task is not None and s.task.remaining and \
                        (s.held[1].epoch, s.held[1].batch) == (self._epoch, s.task.next):
                    (batch, info), s.held = s.held, None
                    self._deliver(s, info)
                    if s.task.handed_on(self._steps):
                        self._close_stream(s)  # what follows belongs to the task that took its tail
                    else:
                        s.permit.release()
                    return batch, info
            self._steal_for_idle_servers()
            self._ensure_streams()  # tasks handed over after a loss get their stream here
            try:
                stream, payload, arrived = self._arrivals.get(timeout=self.timeout_s * 3)
            except queue.Empty:  # the streams time out first; this is a last resort
                raise LoaderTimeoutError(f"no batch from any of {self.endpoints} within "
                                         f"{self.timeout_s * 3:g} s") from None
            if stream.closed:
                continue
            if isinstance(payload, BaseException):
                self._on_error(stream.server, payload)
                continue
            assert arrived is not None
            info = arrived
            ahead = (info.epoch, info.batch) == (self._epoch + 1, 0)  # the next epoch of a finished share
            if stream.task is not None and (info.epoch, info.batch) != (self._epoch, stream.task.next) and not (
                    ahead and stream.task.remaining == 0):
                self._on_error(stream.server, ProtocolError(
                    f"expected epoch {self._epoch} batch {stream.task.next} of share {stream.share} from "
                    f"{self.endpoints[stream.server]}, got epoch {info.epoch} batch {info.batch}"))
                continue
            stream.held = (payload, info)

    def _steal_for_idle_servers(self) -> None:
        if self._plan.steal_for_idle(self.prefetch):
            self._ensure_streams()

    # ---------------------------------------------------------------- shared machinery
    def _deliver(self, stream: _Stream, info: BatchInfo) -> None:
        task = stream.task
        assert task is not None
        if (info.epoch, info.batch) != (self._epoch, task.next):
            raise ProtocolError(f"expected epoch {self._epoch} batch {task.next} of share {task.share} from "
                                f"{self.endpoints[stream.server]}, got epoch {info.epoch} batch {info.batch}")
        self._plan.deliver(task, info.batch)
        stream.advance(self._steps)
        self.delivered_by[self.endpoints[stream.server]] += 1

    def _alive(self) -> list[int]:
        return [s for s in range(self.servers) if s not in self._down]

    def _stream_of(self, task: Task) -> _Stream:
        for s in self._streams:
            if s.task is task:
                return s
        self._ensure_streams()
        return next(s for s in self._streams if s.task is task)

    def _ensure_streams(self) -> None:
        """Give every task with batches left a stream on its server, positioned at its next batch."""
        while (unserved := next_unserved(self._plan, self._streams, self._epoch)) is not None:
            task, ready = unserved
            if ready is not None:
                ready.task = task
                self._start_pump(ready)
                continue
            try:
                start = self._stream_state(task.share, self._epoch, task.next)
                client = self._make_client(self.endpoints[task.server], state=start, **self._child_kwargs)
            except LoaderError as exc:
                self._on_error(task.server, exc)
                continue
            stream = _Stream(task.server, task.share, client, self._epoch, task.next, task)
            self._streams.append(stream)
            self._rejoining.discard(task.server)
            self._start_pump(stream)

    def _start_pump(self, stream: _Stream) -> None:
        if self.merge == "balanced" and not stream.pumping:
            stream.pumping = True
            threading.Thread(target=_pump, args=(stream, self._arrivals), daemon=True,
                             name=f"loader-hosts-{self.endpoints[stream.server]}-{stream.share}").start()

    def _drop_idle_streams(self) -> None:
        for s in [s for s in self._streams if s.task is None or s.task.handed_on(self._steps)]:
            self._close_stream(s)

    def _close_stream(self, stream: _Stream) -> None:
        stream.closed = True
        stream.permit.release()  # a pump waiting for its turn sees `closed` and ends
        if stream in self._streams:
            self._streams.remove(stream)
        stream.client.close()

    def _on_error(self, server: int, exc: BaseException) -> None:
        """A stream or a handshake on `server` failed: fail over, or raise."""
        rejoining = server in self._rejoining
        if not rejoining and (not is_server_loss(exc) or self.on_server_loss == "raise"):
            raise exc
        self._lose(server, exc)
        if not rejoining:
            self._check_survivors()

    def _lose(self, server: int, exc: BaseException) -> None:
        self._record_loss(server, exc)
        for s in [s for s in self._streams if s.server == server]:
            self._close_stream(s)
        try:
            moved = self._plan.lose(server)
        except LookupError:
            self._failure = self._all_gone()
            raise self._failure from exc
        _log.warning("lost loader server %s (%s); %d batch(es) of epoch %d go to %s", self.endpoints[server], exc,
                     sum(t.remaining for t in moved), self._epoch,
                     ", ".join(sorted({self.endpoints[t.server] for t in moved})) or "nobody (nothing was left)")

    def _record_loss(self, server: int, exc: BaseException) -> None:
        self._down.add(server)
        self._rejoining.discard(server)
        epoch, batch = (self._epoch, self._plan.delivered) if hasattr(self, "_plan") else (self._epoch, 0)
        self.lost.append({"endpoint": self.endpoints[server], "error": str(exc), "epoch": epoch, "batch": batch})
        if self.on_server_loss == "failover":
            self._prober.watch(self.endpoints[server])

    def _check_survivors(self) -> None:
        """After a loss, ask the others at once (in parallel, briefly): servers killed together
        are all found now, not one handshake timeout after another."""
        alive = self._alive()
        answers: dict[int, bool] = {}

        wait_s = min(self.timeout_s, 2.0)

        def ask(server: int) -> None:
            answers[server] = _answers(self.endpoints[server], wait_s, self._prober.curve)

        threads = [threading.Thread(target=ask, args=(s,), daemon=True) for s in alive]
        for t in threads:
            t.start()
        for t in threads:
            t.join(wait_s + 1.0)
        for server in alive:
            if not answers.get(server, False):
                self._lose(server, LoaderTimeoutError(
                    f"the loader server at {self.endpoints[server]} did not answer a health check within {wait_s:g} s"))

    def _all_gone(self) -> LoaderError:
        reasons = "; ".join(f"{loss['endpoint']}: {loss['error']}" for loss in self.lost[-self.servers:])
        return LoaderError(f"every loader server is gone ({', '.join(self.endpoints)}): {reasons}. Restart them "
                           "(`loader-server health ENDPOINT` says when one answers) and resume from state_dict()")

    def _next_epoch(self) -> None:
        """The epoch is complete: rejoin servers that answer again, and plan the next one."""
        self._epoch += 1
        for endpoint in self._prober.ready():
            self._prober.rejoined(endpoint)
            for server in [s for s in self._down if self.endpoints[s] == endpoint]:
                self._down.discard(server)
                self._rejoining.add(server)
            _log.info("loader server %s answers again: it rejoins at epoch %d", endpoint, self._epoch)
        positioned = [(s.share, s.server) for s in self._streams if (s.epoch, s.batch) == (self._epoch, 0)]
        self._plan = next_epoch_plan(self.servers, self._steps, self._alive(), positioned)
        for s in self._streams:
            s.task = None
        self._ensure_streams()
        self._drop_idle_streams()
        if self.log_epochs:
            _log.info("epoch %d: serving from %s", self._epoch, ", ".join(self.active_endpoints))


def _parse_state(state: dict[str, Any], servers: int, merge: str) -> tuple[int, int, int, list[list[int]] | None]:
    try:
        epoch, batch, seed = state["epoch"], state["batch"], state["seed"]
    except (KeyError, TypeError):
        raise ValueError("`state` must come from state_dict(): it needs epoch, batch and seed") from None
    if not all(isinstance(v, int) and v >= 0 for v in (epoch, batch, seed)):
        raise ValueError(f"`state` epoch, batch and seed must be non-negative ints, got {epoch}, {batch}, {seed}")
    if state.get("servers") not in (None, servers):
        raise ConfigError(f"the saved state is for {state.get('servers')} servers, not {servers}: the shares "
                          "depend on the server count; list the same number of endpoints")
    pending = state.get("pending")
    if pending is not None and not isinstance(pending, list):
        raise ValueError("`state` pending must be a list of [share, next, stop]")
    return epoch, batch, seed, pending
