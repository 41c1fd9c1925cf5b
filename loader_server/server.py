"""The server's event loop: one thread that owns every socket and wires the runtime together.

Data flows one way: a client's `Hello` opens a session (`runtime.sessions`, pure state); the
session asks for positions to build; the supervisor (`runtime.supervisor`) hands them as tasks
to worker processes over the private worker channel; results come back as raw frames (or in a
shared-memory slot, `runtime.arenas`) and go to the client through the transport
(`runtime.transport`), in stream order, one per credit.

Every request is handled in isolation: whatever goes wrong while handling one peer's message
is that peer's error reply (or the end of its session), logged at most a few times a minute,
and the server keeps serving everyone else.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import zmq

from loader_client.contract import protocol
from loader_client.contract.errors import ProtocolError, ProtocolVersionError
from loader_client.contract.messages import (
    CLIENT_REQUESTS,
    MAX_SOURCE_CHARS,
    Bye,
    Credit,
    Error,
    HealthReply,
    HealthRequest,
    Hello,
    Ping,
    Release,
    SourcesReply,
    SourcesRequest,
    StatsReply,
    StatsRequest,
)
from loader_client.contract.sampling import SamplingPlan
from loader_client.contract.schema import Message, decode, wire_text
from loader_client.contract.shm import arena_channel_path, shm_available

from .config import ServerConfig
from .data.batch_spec import BatchSpec, batch_spec
from .data.classes import negative_labels_note
from .data.datasets import Dataset
from .metrics import Metrics, serve_metrics
from .options import PipelineOptions
from .pipeline.cache import open_cache
from .runtime.arenas import ArenaChannel
from .runtime.autoscale import Autoscaler, Change, ScalePolicy
from .runtime.delivery import Delivery
from .runtime.supervisor import MAX_TASK_RETRIES, Supervisor
from .runtime.transport import ClientTransport, PeerLog, PeerSource, client_tag, escape
from .runtime.worker import worker_main
from .runtime.worker_channel import WorkerChannel
from .runtime.worker_messages import Failed, Ready, Result, Skipped

__all__ = ["MAX_TASK_RETRIES", "Server", "install_signal_handlers"]

log = logging.getLogger("loader_server")

_WORKER_STOP_TIMEOUT_S = 5.0
_LOOP_TICK_MS = 100
#: Client requests handled per turn of the loop before it looks at workers and timers again.
_REQUESTS_PER_TURN = 256
_GOODBYE_LINGER_MS = 200
#: Where a client's request is said to come from in the errors its decoding raises (`schema.decode`'s `where`).
#: A NUL marks it: a value the peer sent is shown by its repr, which never holds one. The error sent to the
#: client names it there by its tag; the log line, which names it once before the error, leaves it out.
_FROM_CLIENT = "from client\x00"
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Server:
    """Serve batches of `index` under `config` until `stop()` or SIGINT/SIGTERM."""

    def __init__(self, config: ServerConfig, index: Dataset, spec: BatchSpec | None = None, *,
                 known_bad: list[tuple[str, str, str]] | None = None) -> None:
        self.config = config
        self.known_bad = known_bad or []  # (path, code, reason) the start-up scan found, tolerated in skip mode
        self.index = index
        self.spec = batch_spec(config, index) if spec is None else spec
        self.plan = SamplingPlan(len(index), self.spec.batch_size, mode=config.mode, shuffle=config.shuffle,
                                 drop_last=config.drop_last, steps_per_epoch=config.steps_per_epoch)
        self.data_version = index.fingerprint()  # what a sources reply calls the data set's version
        self.fingerprint = f"{config.fingerprint()}-{self.data_version}"
        self.metrics = Metrics()
        self.cache = open_cache(config, index) if config.cache else None  # before the workers fork: they share it
        self.peer_log = PeerLog()
        self._stopping = ""
        self._serial_said: set[str] = set()  # hosts said to answer one request per connection (`_serial_hosts`)
        self.worker_log: list[tuple[float, Change]] = []  # (wall time, change) of --workers auto, latest last
        self._more_requests = False  # the last drain stopped at _REQUESTS_PER_TURN
        self._next_log = time.monotonic() + config.log_interval_s
        self._mp = multiprocessing.get_context("fork")
        self._handlers: dict[type[Message], Callable[[bytes, Any], None]] = {
            Credit: self._on_credit, Release: self._on_release, Ping: self._on_ping,
            Bye: self._on_bye, HealthRequest: self._on_health, StatsRequest: self._on_stats,
            SourcesRequest: self._on_sources,
        }

    # ------------------------------------------------------------------ lifecycle
    def stop(self, signum: int = signal.SIGTERM, *_: Any) -> None:
        """Ask the loop to say goodbye to its clients and exit (also the SIGINT/SIGTERM handler)."""
        self._stopping = f"the server was stopped ({signal.Signals(signum).name})"

    def run(self) -> int:
        """Bind, start workers, serve until stopped; returns the exit code."""
        ctx: zmq.Context[Any] = zmq.Context()
        transport: ClientTransport | None = None
        channel: WorkerChannel | None = None
        arena_channel: ArenaChannel | None = None
        self.supervisor = Supervisor(self._spawn, self.config.initial_workers,
                                     batch_timeout_s=self.config.batch_timeout_s, dump_stack=_dump_stack,
                                     tasks_per_worker=1 + self.config.read_ahead_tasks)
        lo, hi = self.config.worker_bounds
        self.autoscaler = Autoscaler(ScalePolicy(lo, hi, self.config.target_stall, self.config.scale_interval_s),
                                     time.monotonic()) if self.config.autoscale else None
        try:
            transport = ClientTransport(ctx, self.config.bind, curve_dir=self.config.curve_dir,
                                        insecure=self.config.insecure,
                                        max_connections_per_host=self.config.max_connections_per_host,
                                        ipc_mode=int(self.config.ipc_mode, 8),
                                        idle_timeout_s=self.config.client_timeout_s)
            arena_channel = self._arena_channel()
            channel = WorkerChannel(ctx, self.config.max_message_bytes)
            self.transport, self.channel = transport, channel
            self.delivery = Delivery(self.config, self.index, self.spec, self.plan, fingerprint=self.fingerprint,
                                     supervisor=self.supervisor, transport=transport, channel=channel,
                                     metrics=self.metrics, peer_log=self.peer_log, arena_channel=arena_channel)
            for _, code, _ in self.delivery.bad.note(self.known_bad):  # logged by the scan; met once, counted once
                self.metrics.errors[code] += 1
            if self.config.metrics_port:
                self._metrics_http = serve_metrics(self.config.metrics_host, self.config.metrics_port,
                                                  lambda: self.metrics.snapshot)
            self.supervisor.start()
            log.info("serving %d samples from %s on %s: %s, batch %d, %d steps per epoch, settings %s",
                     len(self.index), self.index.source, self.config.bind, _workers_text(self.config),
                     self.spec.batch_size, self.plan.steps_per_epoch(), _settings_line(self.config))
            note = negative_labels_note(self.index)
            if note:
                log.warning("%s", note)
            from .pipeline.decode import decoders_line, region_decoder_note  # here: health, stats import no OpenCV

            log.info("%s", decoders_line())
            note = region_decoder_note(self.config.augment, self.config.reduced_decode)
            if note:
                log.warning("%s", note)
            self._loop()
            self.delivery.goodbye(self._stopping or "the server was stopped")
        finally:
            self.supervisor.stop(_WORKER_STOP_TIMEOUT_S)
            if hasattr(self, "delivery"):
                self.delivery.close_arenas()
            if arena_channel is not None:
                arena_channel.close()
            if transport is not None:
                transport.close(linger_ms=_GOODBYE_LINGER_MS if self._stopping else 0)  # goodbyes may leave
            if channel is not None:
                channel.close()
            ctx.destroy(linger=0)  # closes whatever a failed start left open, so this cannot hang
        log.info("stopped after sending %d batches", self.metrics.batches_sent)
        return 0

    def _arena_channel(self) -> ArenaChannel | None:
        """The channel that hands arenas to clients of an ipc:// bind that cannot open them through /proc."""
        bind = self.config.bind
        if not (bind.startswith("ipc://") and not bind.startswith("ipc://@") and self.config.shm and shm_available()):
            return None
        return ArenaChannel.open(arena_channel_path(bind[len("ipc://"):]), int(self.config.ipc_mode, 8))

    def _spawn(self, wid: int, identity: bytes) -> Any:
        proc = self._mp.Process(target=worker_main, name=f"loader-worker-{wid}", daemon=True,
                                args=(wid, identity, self.channel.endpoint, PipelineOptions.of(self.config), self.index,
                                      self.spec, os.getpid(), self.cache))
        # Block SIGINT/SIGTERM across the fork so that the child never runs our handlers;
        # worker_main installs its own and unblocks them.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return proc

    # ------------------------------------------------------------------ event loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.transport.sock, zmq.POLLIN)
        poller.register(self.channel.sock, zmq.POLLIN)
        registered: set[int] = set()
        tick_s = min(self.config.heartbeat_s / 2, _LOOP_TICK_MS / 1000)
        next_tick = time.monotonic()
        while not self._stopping:
            sentinels = self.supervisor.sentinels()
            for fd in registered - sentinels.keys():
                poller.unregister(fd)
            for fd in sentinels.keys() - registered:
                poller.register(fd, zmq.POLLIN)
            registered = set(sentinels)
            timeout_ms = 0 if self._more_requests else max(0, int((next_tick - time.monotonic()) * 1000))
            events = dict(poller.poll(timeout_ms))
            if self.channel.sock in events:
                self._drain_workers()
            if self.transport.sock in events or self._more_requests:
                self._more_requests = False
                self._drain_clients()
            if self.delivery.departed:  # their goodbyes may be queued: read them first
                self._drain_clients()
                self.delivery.reap_departed()
            for fd, wid in sentinels.items():
                worker = self.supervisor.workers.get(wid)
                if fd in events and worker is not None and not worker.process.is_alive():
                    self._worker_exited(wid)
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + tick_s
            self.supervisor.dispatch(self.delivery.send_task)

    # ------------------------------------------------------------------ client requests
    def _drain_clients(self) -> None:
        """Handle the requests waiting, at most `_REQUESTS_PER_TURN` (a flood must not starve the
        workers, the heartbeats or a stop: the loop comes back at once for the rest)."""
        for _ in range(_REQUESTS_PER_TURN):
            request = self.transport.recv()
            if request is None:
                return
            identity = request.identity
            if request.refused:  # its connection is over a per-peer bound: say so, then it is closed
                self.peer_log.warning(identity, "refused client %s: %s", client_tag(identity), request.refused)
                self.transport.reply(identity, Error(kind="server", message=f"refused: {request.refused}"))
                continue
            try:
                self._on_request(identity, request.body, request.peer, request.source)
            except ProtocolVersionError as exc:
                self.peer_log.warning(identity, "refused client %s: %s", client_tag(identity), str(exc))
                self.transport.reply(identity, Error(kind="version", message=str(exc)))
            except ProtocolError as exc:
                said, tag = str(exc), client_tag(identity)
                self.peer_log.warning(identity, "ignored bad message from client %s: %s", tag,
                                      said.replace(f" {_FROM_CLIENT}", ""))
                self.transport.reply(identity, Error(kind="protocol",
                                                     message=said.replace(_FROM_CLIENT, f"from client {tag}")))
            except Exception as exc:  # a bug reached by one peer's request: that peer's problem only
                log.debug("request of client %s failed", client_tag(identity), exc_info=True)
                self.peer_log.warning(identity, "request of client %s failed: %s: %s (its session is closed)",
                                      client_tag(identity), type(exc).__name__, str(exc))
                self.transport.reply(identity, Error(kind="server", message=f"the server could not handle the "
                                                     f"request: {type(exc).__name__}: {exc}"))
                self.delivery.drop(identity, "its request failed")
        self._more_requests = True

    def _on_request(self, identity: bytes, body: list[bytes], peer: str = "?",
                    source: PeerSource | None = None) -> None:
        if len(body) != 1:
            raise ProtocolError(f"client requests are one frame, got {len(body)}")
        header = protocol.unpack(body[0])
        protocol.check_version(header, peer="the client")
        message = decode(header, CLIENT_REQUESTS, _FROM_CLIENT)
        if identity not in self.delivery.clients and not isinstance(message, _SESSIONLESS):
            self.delivery.error(identity, "server", "no session: the server restarted or dropped this client; "
                                "create a new LoaderClient (pass state= to resume where you were)")
            return
        if isinstance(message, Hello):
            self.delivery.open(identity, message, peer, source)
            return
        self._handlers[type(message)](identity, message)

    def _on_credit(self, identity: bytes, credit: Credit) -> None:
        client = self.delivery.clients[identity]
        client.session.grant(credit.n, time.monotonic())
        self.delivery.flush(client)
        client.session.report(credit.wait_s, credit.wall_s)  # a bad report is this peer's error, after its credit

    def _on_release(self, identity: bytes, release: Release) -> None:
        client = self.delivery.clients[identity]
        client.session.seen(time.monotonic())
        self.delivery.release(client, release.slots)

    def _on_ping(self, identity: bytes, ping: Ping) -> None:
        session = self.delivery.clients[identity].session
        session.seen(time.monotonic())
        session.report(ping.wait_s, ping.wall_s)

    def _on_bye(self, identity: bytes, _: Bye) -> None:
        self.delivery.drop(identity, "said goodbye")

    def _on_health(self, identity: bytes, _: HealthRequest) -> None:
        ready = self.supervisor.ready_count()
        self.transport.reply(identity, HealthReply(ok=ready > 0, workers_ready=ready, workers=self.supervisor.active,
                                                   clients=len(self.delivery.clients),
                                                   batches_sent=self.metrics.batches_sent))

    def _on_stats(self, identity: bytes, _: StatsRequest) -> None:
        self.transport.reply(identity, StatsReply(stats=self.stats()))

    def _on_sources(self, identity: bytes, request: SourcesRequest) -> None:
        n = len(self.index)
        outside = [i for i in request.indices if i >= n]
        if outside:
            self.delivery.error(identity, "config", f"sample index {outside[0]} is outside the data set of {n} "
                                                    f"samples ({self.index.source}): indices count from 0")
            return
        self.transport.reply(identity, SourcesReply(
            sources=[wire_text(self.index.describe(i), MAX_SOURCE_CHARS) for i in request.indices],
            dataset=wire_text(self.index.source, MAX_SOURCE_CHARS), version=self.data_version))

    # ------------------------------------------------------------------ workers
    def _drain_workers(self) -> None:
        while (received := self.channel.recv()) is not None:
            identity, frames = received
            worker = self.supervisor.worker_of(identity)
            if worker is None or not frames:
                self.channel.unknown_peer()
                continue
            self.supervisor.heard_from(worker)
            try:
                message = self.channel.decode(frames, worker.id)
            except ProtocolError as exc:
                log.error("worker %d sent a bad message (%s); it is replaced", worker.id, exc)
                worker.process.kill()
                continue
            if isinstance(message, Ready):
                self.supervisor.mark_ready(worker)
                continue
            assert isinstance(message, (Result, Failed, Skipped))
            if not isinstance(message, Skipped) and message.serial_hosts:
                self._serial_hosts(message.serial_hosts)
            if isinstance(message, Result):
                self.metrics.built(message.build_s)
                if self.cache is not None:
                    self.cache.count(message.cache_hits, message.cache_misses)
            elif isinstance(message, Failed):
                self.metrics.errors[message.reason] += 1
            task = self.supervisor.finished(worker, message.id)
            if task is None:
                continue  # its session went away
            if isinstance(message, Result):
                self.delivery.on_result(task, message, frames[1:])
            elif isinstance(message, Failed):
                self.delivery.on_failed(task, message, worker.id)
            else:
                self.delivery.on_skipped(task)

    def _serial_hosts(self, hosts: list[str]) -> None:
        """Hosts a worker found to answer only the first request of a pipeline: each said once per server (every
        worker finds it on its own connections, and reads from it one request per connection from then on)."""
        from .data.remote import serial_host_line

        for host in hosts:
            if host not in self._serial_said and len(self._serial_said) < _SERIAL_HOSTS_SAID:
                self._serial_said.add(host)
                log.warning("%s", serial_host_line(host))

    def _worker_exited(self, wid: int) -> None:
        worker, given_up = self.supervisor.worker_exited(wid, respawn=not self._stopping)
        if self._stopping:
            return
        if worker.retiring and worker.stopped and not worker.tasks:
            log.info("worker %d (pid %d) retired", wid, worker.process.pid)
            return
        self.metrics.worker_restarts["hung" if worker.hung else "crashed"] += 1
        if worker.hung:
            log.error("worker %d (pid %d) %s; killed it, starting a replacement and re-issuing its %d task(s)",
                      wid, worker.process.pid, worker.hung, len(worker.tasks))
        else:
            log.error("worker %d (pid %d) died with exit code %s; starting a replacement and re-issuing "
                      "its %d task(s)", wid, worker.process.pid, worker.process.exitcode, len(worker.tasks))
        self.delivery.give_up(given_up)

    # ------------------------------------------------------------------ housekeeping
    def _tick(self) -> None:
        """Heartbeats to idle clients; drop silent clients; kill stuck workers; publish stats."""
        now = time.monotonic()
        if self.config.metrics_port:  # the HTTP thread reads this published snapshot
            self.metrics.snapshot = self.stats()
        if self.config.log_interval_s and now >= self._next_log:
            self._next_log = now + self.config.log_interval_s
            snap = self.stats()
            busy = [round(100 * w["busy_fraction"]) for w in snap["workers"]]
            log.info("%.0f images/s (%.1f batches/s) over the last minute; %d batches ready; workers busy %s%%; "
                     "%d clients; %d bad files", snap["images_per_s"], snap["batches_per_s"], snap["batches_ready"],
                     busy, len(snap["clients"]), snap["bad_files"])
        self.peer_log.throttle.flush()  # counts of lines not logged, for kinds that went quiet
        self.delivery.log.flush()
        for worker in self.supervisor.tick(self.delivery.describe_task):
            log.error("worker %d (pid %d) %s; its Python stack follows", worker.id, worker.process.pid, worker.hung)
        self.delivery.heartbeats(now)
        if self.autoscaler is not None:
            self._autoscale(now)

    def _autoscale(self, now: float) -> None:
        """--workers auto: apply the autoscaler's change, if any (runtime/autoscale.py)."""
        assert self.autoscaler is not None
        stalls: dict[str, float | None] = {}
        for c in self.delivery.clients.values():  # two clients may share a name: the larger stall counts
            stall, name = c.session.stall(), escape(c.session.name)
            stalls[name] = stall if stalls.get(name) is None else max(stall or 0.0, stalls[name] or 0.0)
        change = self.autoscaler.observe(now, stalls, self.supervisor.busy_seconds(), self.supervisor.active,
                                         used=self.delivery.used, built=sum(self.metrics.build_counts))
        if change is None:
            return
        self.supervisor.resize(change.workers)
        self.metrics.worker_changes["up" if change.up else "down"] += 1
        self.worker_log.append((time.time(), change))
        del self.worker_log[:-_WORKER_LOG_KEPT]
        log.info("workers %d -> %d: %s", change.before, change.workers, change.reason)

    def stats(self) -> dict[str, Any]:
        """What the server is doing: rates, queues, workers, errors, clients (a stats request)."""
        now = time.monotonic()
        images_s, batches_s = self.metrics.rates()
        clients = self.delivery.clients.values()
        return {
            "uptime_s": now - self.metrics.started, "images_per_s": images_s, "batches_per_s": batches_s,
            "batches_sent": self.metrics.batches_sent, "images_sent": self.metrics.images_sent,
            "bytes_sent": self.metrics.bytes_sent,
            "batches_ready": sum(len(c.session.ready) for c in clients),
            "workers_ready": self.supervisor.ready_count(), "workers_target": self.supervisor.active,
            "worker_bounds": list(self.config.worker_bounds), "autoscale": self.config.autoscale,
            "target_stall": self.config.target_stall,
            "worker_changes": [{"time": t, "from": c.before, "to": c.workers, "reason": c.reason}
                               for t, c in self.worker_log],
            "worker_changes_total": dict(self.metrics.worker_changes),
            "workers": self.supervisor.describe(), "worker_restarts": dict(self.metrics.worker_restarts),
            "errors_by_reason": dict(self.metrics.errors), "bad_files": len(self.delivery.bad.files),
            "shm_fallback_batches": self.metrics.shm_fallbacks, "shm_slots_reclaimed": self.metrics.shm_reclaimed,
            "clients": [{**c.session.describe(), "shared_memory": c.arena is not None} for c in clients],
            "shares": self.delivery.describe_shares(),
            "batch_build_seconds": self.metrics.build_histogram(),
            "fingerprint": self.fingerprint,
            **({"cache": self.cache.stats()} if self.cache is not None else {}),
        }


_SESSIONLESS = (Hello, HealthRequest, StatsRequest, SourcesRequest, Bye)
#: Worker-count changes listed in stats (the latest).
_WORKER_LOG_KEPT = 32
#: Hosts said to answer one request per connection, at most (then no more are said: a worker only sends
#: hosts its data set's URLs name).
_SERIAL_HOSTS_SAID = 1024


def _workers_text(config: ServerConfig) -> str:
    if not config.autoscale:
        return f"{config.initial_workers} workers"
    lo, hi = config.worker_bounds
    return (f"{lo} workers to start (--workers auto: {lo} to {hi}, target stall {100 * config.target_stall:g}%, "
            f"at most one change per {config.scale_interval_s:g} s)")


def _dump_stack(process: Any) -> None:
    """Ask a hung worker for its Python stack (faulthandler on SIGUSR1)."""
    try:
        os.kill(process.pid, signal.SIGUSR1)
    except (ProcessLookupError, TypeError):
        pass


def _settings_line(config: ServerConfig) -> str:
    d = config.as_dict()
    d.pop("data")
    return " ".join(f"{k}={v}" for k, v in d.items())


def install_signal_handlers(server: Server) -> None:
    """SIGINT and SIGTERM ask the server to say goodbye to its clients and exit 0."""
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, server.stop)
