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
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from loader_client import protocol
from loader_client.errors import ProtocolError, ProtocolVersionError
from loader_client.messages import (
    CLIENT_REQUESTS,
    Batch,
    Bye,
    Credit,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    HealthReply,
    HealthRequest,
    Ping,
    Release,
    ShmRef,
    StatsReply,
    StatsRequest,
    Welcome,
)
from loader_client.schema import Message, decode, encode
from loader_client.shm import shm_available

from .config import ServerConfig
from .index import DatasetIndex
from .metrics import Metrics, serve_metrics
from .runtime.arenas import Arena, arena_slots, new_arena
from .runtime.bad_files import BadFiles
from .runtime.sessions import Refusal, Session, StreamFacts, open_session
from .runtime.supervisor import MAX_TASK_RETRIES, GivenUp, Supervisor, Task, Worker
from .runtime.transport import ClientTransport, PeerLog, escape
from .runtime.worker_channel import WorkerChannel
from .runtime.worker_messages import Failed, Forget, Ready, Result, Skipped
from .runtime.worker_messages import Task as TaskMessage
from .sampling import SamplingPlan
from .worker import worker_main

__all__ = ["Server", "MAX_TASK_RETRIES", "install_signal_handlers"]

log = logging.getLogger("loader_server")

_WORKER_STOP_TIMEOUT_S = 5.0
_LOOP_TICK_MS = 100
_GOODBYE_LINGER_MS = 200
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@dataclass
class Built:
    """A batch built for a session, waiting for credit."""

    arrays: list[list[Any]]
    frames: list[Any]
    shm: ShmRef | None
    images: int
    nbytes: int


@dataclass
class Client:
    """A session plus what the loop keeps beside it: its tasks and its arena."""

    identity: bytes
    session: Session[Built]
    tasks: dict[int, int]  # position -> task id, for batches being built
    arena: Arena | None = None


class Server:
    """Serve batches of `index` under `config` until `stop()` or SIGINT/SIGTERM."""

    def __init__(self, config: ServerConfig, index: DatasetIndex) -> None:
        self.config = config
        self.index = index
        self.plan = SamplingPlan(len(index), config.batch_size, mode=config.mode, shuffle=config.shuffle,
                                 drop_last=config.drop_last, steps_per_epoch=config.steps_per_epoch)
        self.fingerprint = f"{config.fingerprint()}-{index.fingerprint()}"
        self.facts = StreamFacts(batch_size=config.batch_size, num_samples=len(index), default_seed=config.seed,
                                 fingerprint=self.fingerprint, prefetch=config.prefetch, in_order=config.in_order,
                                 augment_available=bool(config.augment))
        self.num_classes = int(index.labels.max()) + 1 if len(index.labels) else 0
        if index.class_names:
            self.num_classes = len(index.class_names)
        self.metrics = Metrics()
        self.bad = BadFiles(config.max_bad_files(len(index)), config.data)
        self.clients: dict[bytes, Client] = {}
        self.peer_log = PeerLog()
        self._stopping = ""
        self._next_arena_id = 0
        self._next_log = time.monotonic() + config.log_interval_s
        self._mp = multiprocessing.get_context("fork")
        self._handlers: dict[type[Message], Callable[[bytes, Any], None]] = {
            Hello: self._on_hello, Credit: self._on_credit, Release: self._on_release, Ping: self._on_ping,
            Bye: self._on_bye, HealthRequest: self._on_health, StatsRequest: self._on_stats,
        }

    # ------------------------------------------------------------------ lifecycle
    def stop(self, signum: int = signal.SIGTERM, *_: Any) -> None:
        """Ask the loop to say goodbye to its clients and exit (also the SIGINT/SIGTERM handler)."""
        name = signal.Signals(signum).name if signum in iter(signal.Signals) else str(signum)
        self._stopping = f"the server was stopped ({name})"

    def run(self) -> int:
        """Bind, start workers, serve until stopped; returns the exit code."""
        ctx: zmq.Context[Any] = zmq.Context()
        self.transport: ClientTransport | None = None
        self.channel: WorkerChannel | None = None
        self.supervisor = Supervisor(self._spawn, self.config.workers, batch_timeout_s=self.config.batch_timeout_s,
                                     dump_stack=_dump_stack)
        try:
            self.transport = ClientTransport(ctx, self.config.bind, curve_dir=self.config.curve_dir,
                                             insecure=self.config.insecure)
            self.channel = WorkerChannel(ctx, self.config.max_message_bytes)
            if self.config.metrics_port:
                self._metrics_http = serve_metrics(self.config.metrics_port, lambda: self.metrics.snapshot)
            self.supervisor.start()
            log.info("serving %d samples from %s on %s: %d workers, batch %d, %d steps per epoch, settings %s",
                     len(self.index), self.index.source, self.config.bind, self.config.workers,
                     self.config.batch_size, self.plan.steps_per_epoch(), _settings_line(self.config))
            self._loop()
            self._say_goodbye()
        finally:
            self.supervisor.stop(_WORKER_STOP_TIMEOUT_S)
            for client in self.clients.values():
                if client.arena is not None:
                    client.arena.close()
            if self.transport is not None:
                self.transport.close()
            if self.channel is not None:
                self.channel.close()
            ctx.term()
        log.info("stopped after sending %d batches", self.metrics.batches_sent)
        return 0

    def _spawn(self, wid: int, identity: bytes) -> Any:
        assert self.channel is not None
        proc = self._mp.Process(target=worker_main, name=f"loader-worker-{wid}", daemon=True,
                                args=(wid, identity, self.channel.endpoint, self.config, self.index, os.getpid()))
        # Block SIGINT/SIGTERM across the fork so that the child never runs our handlers;
        # worker_main installs its own and unblocks them.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return proc

    def _say_goodbye(self) -> None:
        """Tell every client that the server stops on purpose, so none waits for a timeout."""
        assert self.transport is not None
        for identity in list(self.clients):
            self.transport.reply(identity, Goodbye(reason=self._stopping or "the server was stopped"))
            self._drop(identity, "the server stopped")
        self.transport.sock.setsockopt(zmq.LINGER, _GOODBYE_LINGER_MS)

    # ------------------------------------------------------------------ event loop
    def _loop(self) -> None:
        assert self.transport is not None and self.channel is not None
        poller = zmq.Poller()
        poller.register(self.transport.sock, zmq.POLLIN)
        poller.register(self.channel.sock, zmq.POLLIN)
        registered: dict[int, int] = {}
        tick_s = min(self.config.heartbeat_s / 2, _LOOP_TICK_MS / 1000)
        next_tick = time.monotonic()
        while not self._stopping:
            sentinels = self.supervisor.sentinels()
            for fd in set(registered) - set(sentinels):
                poller.unregister(fd)
                del registered[fd]
            for fd, wid in sentinels.items():
                if fd not in registered:
                    poller.register(fd, zmq.POLLIN)
                    registered[fd] = wid
            events = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000))))
            if self.channel.sock in events:
                self._drain_workers()
            if self.transport.sock in events:
                self._drain_clients()
            for fd, wid in sentinels.items():
                worker = self.supervisor.workers.get(wid)
                if fd in events and worker is not None and not worker.process.is_alive():
                    self._worker_exited(wid)
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + tick_s
            self.supervisor.dispatch(self._send_task)

    # ------------------------------------------------------------------ clients
    def _drain_clients(self) -> None:
        assert self.transport is not None
        while (received := self.transport.recv()) is not None:
            identity, body = received
            try:
                self._on_request(identity, body)
            except ProtocolVersionError as exc:
                self.peer_log.warning(identity, "refused client %s: %s", identity.hex(), str(exc))
                self.transport.reply(identity, Error(kind="version", message=str(exc)))
            except ProtocolError as exc:
                self.peer_log.warning(identity, "ignored bad message from client %s: %s", identity.hex(), str(exc))
                self.transport.reply(identity, Error(kind="protocol", message=str(exc)))
            except Exception as exc:  # a bug reached by one peer's request: that peer's problem only
                log.debug("request of client %s failed", identity.hex(), exc_info=True)
                self.peer_log.warning(identity, "request of client %s failed: %s: %s (its session is closed)",
                                      identity.hex(), type(exc).__name__, str(exc))
                self.transport.reply(identity, Error(kind="server", message=f"the server could not handle the "
                                                     f"request: {type(exc).__name__}: {exc}"))
                self._drop(identity, "its request failed")

    def _on_request(self, identity: bytes, body: list[bytes]) -> None:
        if len(body) != 1:
            raise ProtocolError(f"client requests are one frame, got {len(body)}")
        header = protocol.unpack(body[0])
        protocol.check_version(header, peer="the client")
        message = decode(header, CLIENT_REQUESTS, f"from client {identity.hex()}")
        if identity not in self.clients and not isinstance(message, (Hello, HealthRequest, StatsRequest, Bye)):
            self.transport_reply_error(identity, "server", "no session: the server restarted or dropped this "
                                       "client; create a new LoaderClient (pass state= to resume where you were)")
            return
        self._handlers[type(message)](identity, message)

    def transport_reply_error(self, identity: bytes, kind: str, message: str, **extra: Any) -> None:
        assert self.transport is not None
        self.transport.reply(identity, Error(kind=kind, message=message, **extra))

    def _on_hello(self, identity: bytes, hello: Hello) -> None:
        if identity in self.clients:
            self._drop(identity, "reconnected")
        if len(self.clients) >= self.config.max_clients:
            self.transport_reply_error(identity, "server", f"the server already serves {len(self.clients)} clients "
                                       f"(--max-clients {self.config.max_clients}); retry later or raise --max-clients")
            return
        if self.bad.too_many:
            self.transport_reply_error(identity, "bad_sample", self.bad.too_many)
            return
        opened = open_session(hello, hello.client or identity.hex(), steps_for=self.plan.steps_per_epoch,
                              facts=self.facts, now=time.monotonic())
        if isinstance(opened, Refusal):
            self.transport_reply_error(identity, opened.kind, opened.message)
            return
        client = Client(identity, opened, {})
        if hello.shm and self.config.shm and shm_available():
            self._next_arena_id += 1
            client.arena = new_arena(self._next_arena_id, arena_slots(self.config.prefetch, hello.credit),
                                     self.config.batch_bytes)
        self.clients[identity] = client
        s = opened
        welcome = Welcome(
            num_samples=len(self.index), num_classes=self.num_classes, batch_size=self.config.batch_size,
            steps_per_epoch=s.steps, rank=s.rank, world_size=s.world_size, seed=s.seed, epoch=hello.epoch,
            batch=hello.batch, mode=self.config.mode, in_order=self.config.in_order,
            drop_last=self.config.drop_last, x_shape=list(self.config.x_shape),
            x_dtype=np.dtype(self.config.x_dtype).str, layout=self.config.layout, color=self.config.color,
            class_names=list(self.index.class_names) if self.index.class_names else None,
            fingerprint=self.fingerprint, heartbeat_s=self.config.heartbeat_s,
            max_message_bytes=self.config.max_message_bytes,
            shm=client.arena.handle() if client.arena else None)
        self._send(client, [encode(welcome)])
        log.info("client %s connected: rank %d/%d, seed %d, starting at epoch %d batch %d, %s", escape(s.name),
                 s.rank, s.world_size, s.seed, hello.epoch, hello.batch,
                 "shared memory" if client.arena else "frames over the socket")
        self._schedule(client)

    def _on_credit(self, identity: bytes, credit: Credit) -> None:
        client = self.clients[identity]
        client.session.grant(credit.n, time.monotonic())
        self._flush(client)

    def _on_release(self, identity: bytes, release: Release) -> None:
        client = self.clients[identity]
        if client.arena is None:
            raise ProtocolError("release of shared-memory slots, but this client has no arena")
        client.arena.release(release.slots)
        client.session.seen(time.monotonic())
        self._schedule(client)

    def _on_ping(self, identity: bytes, _: Ping) -> None:
        self.clients[identity].session.seen(time.monotonic())

    def _on_bye(self, identity: bytes, _: Bye) -> None:
        self._drop(identity, "said goodbye")

    def _on_health(self, identity: bytes, _: HealthRequest) -> None:
        assert self.transport is not None
        ready = self.supervisor.ready_count()
        self.transport.reply(identity, HealthReply(ok=ready > 0, workers_ready=ready, workers=self.config.workers,
                                                   clients=len(self.clients), batches_sent=self.metrics.batches_sent))

    def _on_stats(self, identity: bytes, _: StatsRequest) -> None:
        assert self.transport is not None
        self.transport.reply(identity, StatsReply(stats=self.stats()))

    # ------------------------------------------------------------------ building and sending
    def _schedule(self, client: Client) -> None:
        """Create tasks for what the session wants built (up to prefetch outstanding)."""
        s = client.session
        for position in s.to_build():
            epoch, batch = s.place(position)
            indices = self.plan.batch(epoch, batch, seed=s.seed, rank=s.rank, world_size=s.world_size)
            slot = client.arena.take() if client.arena is not None else None
            task = self.supervisor.new_task(client.identity, position, indices, seed=s.seed, epoch=epoch,
                                            augment=s.augment, slot=slot)
            client.tasks[position] = task.id

    def _send_task(self, worker: Worker, task: Task) -> bool:
        assert self.channel is not None
        client = self.clients.get(task.owner)
        arena = client.arena.handle() if client is not None and client.arena is not None and task.slot is not None \
            else None
        message = TaskMessage(id=task.id, indices=task.indices.tobytes(), seed=task.seed, epoch=task.epoch,
                              augment=task.augment, arena=arena, slot=task.slot if arena else None)
        return self.channel.send(worker.identity, message)

    def _flush(self, client: Client) -> None:
        """Send what the session may send now (credit and order allowing), then build more."""
        s = client.session
        while (item := s.sendable()) is not None:
            position, built = item
            epoch, batch = s.place(position)
            head = encode(Batch(epoch=epoch, batch=batch, steps=s.steps, arrays=built.arrays, shm=built.shm))
            if not self._send(client, [head, *built.frames]):
                break
            s.sent(position, time.monotonic())
            if built.shm is not None and client.arena is not None:
                client.arena.hand_over(built.shm.slot)
            self.metrics.sent(built.images, built.nbytes)
        self._schedule(client)

    def _send(self, client: Client, frames: list[Any]) -> bool:
        assert self.transport is not None
        outcome = self.transport.send(client.identity, frames)
        if outcome == "gone":
            self._drop(client.identity, "disconnected (its socket closed: the trainer exited)")
        elif outcome == "ok":
            client.session.last_sent = time.monotonic()
        return outcome == "ok"

    def _drop(self, identity: bytes, why: str) -> None:
        client = self.clients.pop(identity, None)
        if client is None:
            return
        self.supervisor.cancel(client.tasks.values())  # workers' results for them are then ignored
        for _ in client.session.drain():
            pass
        if client.arena is not None:
            self._close_arena(client.arena)
        log.info("client %s left (%s)", escape(client.session.name), why)

    def _close_arena(self, arena: Arena) -> None:
        assert self.channel is not None
        for w in self.supervisor.workers.values():
            if w.ready:
                self.channel.send(w.identity, Forget(arena=arena.id))
        arena.close()

    # ------------------------------------------------------------------ workers
    def _drain_workers(self) -> None:
        assert self.channel is not None
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
            if isinstance(message, Result):
                self.metrics.built(message.build_s)
            elif isinstance(message, Failed):
                self.metrics.errors[message.reason] += 1
            task = self.supervisor.finished(worker, message.id)
            client = self.clients.get(task.owner) if task is not None else None
            if task is None or client is None:
                continue  # its session went away
            client.tasks.pop(task.position, None)
            if isinstance(message, Result):
                self._on_result(client, task, message, frames[1:])
            elif isinstance(message, Failed):
                self._on_failed(client, task, message, worker.id)
            else:  # Skipped: its arena was forgotten, so its session is gone already
                self._give_back_slot(client, task)

    def _on_result(self, client: Client, task: Task, result: Result, frames: list[Any]) -> None:
        if result.bad:
            for path, code, reason in self.bad.note(result.bad):
                self.metrics.errors[code] += 1
                log.warning("bad file %s: %s (replaced by another sample of its batch; logged once)", path, reason)
            if self.bad.too_many:
                log.error(self.bad.too_many)
                self.transport_reply_error(client.identity, "bad_sample", self.bad.too_many)
                self._drop(client.identity, "too many bad files")
                return
        arrays = result.arrays + (result.shm_arrays or [])
        protocol.build_arrays(result.arrays, frames, max_bytes=self.config.max_message_bytes)  # checks the frames
        shm = None
        if task.slot is not None:
            shm = ShmRef(slot=task.slot, arrays=result.shm_arrays or [])
        images = next((a[2][0] for a in arrays if a[0] == "y"), 0)
        nbytes = sum(math.prod(a[2]) * np.dtype(a[1]).itemsize for a in arrays)
        client.session.built(task.position, Built(result.arrays, frames, shm, images, nbytes))
        self._flush(client)

    def _on_failed(self, client: Client, task: Task, failed: Failed, worker_id: int) -> None:
        self._give_back_slot(client, task)
        epoch, batch = client.session.place(task.position)
        log.error("worker %d failed on epoch %d batch %d: %s", worker_id, epoch, batch, failed.message)
        self.transport_reply_error(client.identity, failed.kind, f"epoch {epoch} batch {batch}: {failed.message}",
                                   path=failed.path, reason=failed.reason, traceback=failed.traceback)
        self._drop(client.identity, "batch failed")

    def _give_back_slot(self, client: Client, task: Task) -> None:
        if task.slot is not None and client.arena is not None:
            client.arena.give_back(task.slot)

    def _worker_exited(self, wid: int) -> None:
        worker, given_up = self.supervisor.worker_exited(wid, respawn=not self._stopping)
        if self._stopping:
            return
        code = worker.process.exitcode
        self.metrics.worker_restarts["hung" if worker.hung else "crashed"] += 1
        if worker.hung:
            log.error("worker %d (pid %d) %s; killed it, starting a replacement and re-issuing its %d task(s)",
                      wid, worker.process.pid, worker.hung, len(worker.tasks))
        else:
            log.error("worker %d (pid %d) died with exit code %s; starting a replacement and re-issuing "
                      "its %d task(s)", wid, worker.process.pid, code, len(worker.tasks))
        for gone in given_up:
            self._give_up(gone)

    def _give_up(self, gone: GivenUp) -> None:
        client = self.clients.get(gone.task.owner)
        if client is None:
            return
        self._give_back_slot(client, gone.task)
        epoch, batch = client.session.place(gone.task.position)
        self.transport_reply_error(client.identity, "worker_crashed",
                                   f"epoch {epoch} batch {batch}: its worker {gone.why} {gone.task.crashes} times; "
                                   f"its files: {_file_list(self.index, gone.task, 8)}", exit_code=gone.exit_code)
        self._drop(client.identity, "batch crashed workers repeatedly")

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
        for worker in self.supervisor.tick(self._describe_task):
            log.error("worker %d (pid %d) %s; its Python stack follows", worker.id, worker.process.pid, worker.hung)
        for client in list(self.clients.values()):
            s = client.session
            if now - s.last_seen > self.config.client_timeout_s:
                self._drop(client.identity, f"silent for {now - s.last_seen:.0f} s")
            elif now - s.last_sent >= self.config.heartbeat_s:
                self._send(client, [encode(Heartbeat())])

    def _describe_task(self, task: Task) -> str:
        client = self.clients.get(task.owner)
        if client is None:
            return "a batch of a client that left"
        epoch, batch = client.session.place(task.position)
        return f"epoch {epoch} batch {batch} (files {_file_list(self.index, task, 4)})"

    def stats(self) -> dict[str, Any]:
        """What the server is doing: rates, queues, workers, errors, clients (a stats request)."""
        now = time.monotonic()
        images_s, batches_s = self.metrics.rates()
        return {
            "uptime_s": now - self.metrics.started, "images_per_s": images_s, "batches_per_s": batches_s,
            "batches_sent": self.metrics.batches_sent, "images_sent": self.metrics.images_sent,
            "bytes_sent": self.metrics.bytes_sent,
            "batches_ready": sum(len(c.session.ready) for c in self.clients.values()),
            "workers_ready": self.supervisor.ready_count(),
            "workers": self.supervisor.describe(), "worker_restarts": dict(self.metrics.worker_restarts),
            "errors_by_reason": dict(self.metrics.errors), "bad_files": len(self.bad.files),
            "clients": [{**c.session.describe(), "shared_memory": c.arena is not None}
                        for c in self.clients.values()],
            "batch_build_seconds": {"counts": list(self.metrics.build_counts), "sum_s": self.metrics.build_sum_s},
            "fingerprint": self.fingerprint,
        }


def _file_list(index: DatasetIndex, task: Task, limit: int) -> str:
    """The first `limit` files of a task's batch, for error messages."""
    files = [index.path(int(i)) for i in task.indices[:limit]]
    return ", ".join(files) + (" ..." if len(task.indices) > limit else "")


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
