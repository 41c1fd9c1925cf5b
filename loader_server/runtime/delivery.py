"""The batch path of every client: sessions open, tasks are created, results routed, batches sent.

`Delivery` holds the connected clients (a pure `Session` each, plus its tasks and arena) and
moves batches from the supervisor's workers to the transport: it asks each session what to
build, turns positions into tasks, routes a worker's result, failure or bad files to the
session that asked, and sends what the session's credit and order allow. It talks to sockets
only through the `Transport` and `WorkerChannel` it is given.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from loader_client.contract import protocol
from loader_client.contract.messages import Batch, Error, Goodbye, Heartbeat, Hello, ShmRef, Welcome
from loader_client.contract.schema import Message, encode
from loader_client.contract.shm import shm_available

from ..config import ServerConfig
from ..data.batch_spec import BatchSpec
from ..data.classes import count_classes
from ..data.datasets import Dataset
from ..metrics import Metrics
from ..sampling import SamplingPlan
from .arenas import Arena, ArenaChannel, arena_slots, new_arena
from .bad_files import BadFiles
from .sessions import Refusal, Session, StreamFacts, open_session
from .supervisor import GivenUp, Supervisor, Task, Worker
from .transport import ClientTransport, PeerLog, escape
from .worker_channel import WorkerChannel
from .worker_messages import Failed, Forget, Result
from .worker_messages import Task as TaskMessage

__all__ = ["ARENA_CLOSE_DELAY_S", "Built", "Client", "Delivery"]

log = logging.getLogger("loader_server")

#: How long an ended session's arena stays open (its client may still be about to open it).
ARENA_CLOSE_DELAY_S = 5.0


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


class Delivery:
    """Every client's stream, from hello to goodbye."""

    def __init__(self, config: ServerConfig, index: Dataset, spec: BatchSpec, plan: SamplingPlan, *, fingerprint: str,
                 supervisor: Supervisor, transport: ClientTransport, channel: WorkerChannel, metrics: Metrics,
                 peer_log: PeerLog, arena_channel: ArenaChannel | None = None) -> None:
        self.config, self.index, self.spec, self.plan = config, index, spec, plan
        self.arena_channel = arena_channel
        self.fingerprint = fingerprint
        self.supervisor, self.transport, self.channel, self.metrics = supervisor, transport, channel, metrics
        self.peer_log = peer_log
        self.facts = StreamFacts(batch_size=spec.batch_size, num_samples=len(index), default_seed=config.seed,
                                 fingerprint=fingerprint, prefetch=config.prefetch_batches, in_order=config.in_order,
                                 augment_available=bool(config.augment))
        self.num_classes = count_classes(index)
        self.bad = BadFiles(config.max_bad_files(len(index)), config.data)
        self.clients: dict[bytes, Client] = {}
        # Peers whose connection was found gone while sending. They are dropped only after the
        # requests already received from them are read (`reap_departed`): a trainer that closes
        # its client sends a goodbye first, and that goodbye, still queued, is the reason to log.
        self.departed: set[bytes] = set()
        self._next_arena_id = 0
        # Arenas of ended sessions, closed a little later: a client that has its welcome but
        # has not opened its arena yet (its first batch failed at once) must not find the fd
        # number reused by another file, which it would rightly refuse as not its memfd.
        self._closing: list[tuple[float, Arena]] = []

    # ------------------------------------------------------------------ sessions
    def open(self, identity: bytes, hello: Hello) -> None:
        """Open a stream for `hello` (replacing one of the same peer), or tell the peer why not."""
        self.departed.discard(identity)
        self.drop(identity, "reconnected")
        if len(self.clients) >= self.config.max_clients:
            self.error(identity, "server", f"the server already serves {len(self.clients)} clients (--max-clients "
                                           f"{self.config.max_clients}); retry later or raise --max-clients")
            return
        if self.bad.too_many:
            self.error(identity, "bad_sample", self.bad.too_many)
            return
        opened = open_session(hello, hello.client or identity.hex(), steps_for=self.plan.steps_per_epoch,
                              facts=self.facts, now=time.monotonic())
        if isinstance(opened, Refusal):
            self.peer_log.warning(identity, "refused client %s: %s", identity.hex(), opened.message)
            self.error(identity, opened.kind, opened.message)
            return
        client = Client(identity, opened, {})
        if hello.shm and self.config.shm and shm_available():
            self._next_arena_id += 1
            client.arena = new_arena(self._next_arena_id, arena_slots(self.config.prefetch_batches, hello.credit),
                                     self.spec.batch_bytes, self.arena_channel)
        self.clients[identity] = client
        self._send(client, [encode(self._welcome(client, hello))])
        log.info("client %s connected: rank %d/%d, seed %d, starting at epoch %d batch %d, %s",
                 escape(opened.name), opened.rank, opened.world_size, opened.seed, hello.epoch, hello.batch,
                 "shared memory" if client.arena else "frames over the socket")
        self.schedule(client)

    def _welcome(self, client: Client, hello: Hello) -> Welcome:
        c, s, spec = self.config, client.session, self.spec
        return Welcome(
            num_samples=len(self.index), num_classes=self.num_classes, batch_size=spec.batch_size,
            steps_per_epoch=s.steps, rank=s.rank, world_size=s.world_size, seed=s.seed, epoch=hello.epoch,
            batch=hello.batch, mode=c.mode, in_order=c.in_order, drop_last=c.drop_last, x_shape=list(spec.x_shape),
            x_dtype=spec.x_dtype, layout=spec.layout, color=spec.color,
            class_names=list(self.index.class_names) if self.index.class_names else None,
            fingerprint=self.fingerprint, heartbeat_s=c.heartbeat_s, max_message_bytes=c.max_message_bytes,
            shm=client.arena.handle() if client.arena else None)

    def drop(self, identity: bytes, why: str) -> None:
        """End a session: its tasks are cancelled, its batches and arena dropped."""
        client = self.clients.pop(identity, None)
        if client is None:
            return
        self.supervisor.cancel(client.tasks.values())  # workers' results for them are then ignored
        for _ in client.session.drain():
            pass
        if client.arena is not None:
            for w in self.supervisor.workers.values():
                if w.ready:
                    self.channel.send(w.identity, Forget(arena=client.arena.id))
            self._closing.append((time.monotonic() + ARENA_CLOSE_DELAY_S, client.arena))
        log.info("client %s left (%s)", escape(client.session.name), why)

    def reap_departed(self) -> None:
        """End the sessions of peers found gone (call after reading the requests already received)."""
        for identity in self.departed:
            self.drop(identity, "disconnected (its connection closed without a goodbye)")
        self.departed.clear()

    def goodbye(self, reason: str) -> None:
        """Tell every client the server stops on purpose, and end their sessions."""
        for identity in list(self.clients):
            self.reply(identity, Goodbye(reason=reason))
            self.drop(identity, "the server stopped")

    def close_arenas(self) -> None:
        for client in self.clients.values():
            if client.arena is not None:
                client.arena.close()
        for _, arena in self._closing:
            arena.close()
        self._closing.clear()

    def heartbeats(self, now: float) -> None:
        """Drop clients silent for --client-timeout-s; a heartbeat to those idle for --heartbeat-s."""
        while self._closing and self._closing[0][0] <= now:
            self._closing.pop(0)[1].close()
        for client in list(self.clients.values()):
            s = client.session
            if now - s.last_seen > self.config.client_timeout_s:
                self.drop(client.identity, f"silent for {now - s.last_seen:.0f} s")
            elif now - s.last_sent >= self.config.heartbeat_s:
                self._send(client, [encode(Heartbeat())])

    # ------------------------------------------------------------------ building and sending
    def schedule(self, client: Client) -> None:
        """Create tasks for what the session wants built (up to prefetch outstanding)."""
        s = client.session
        for position in s.to_build():
            epoch, batch = s.place(position)
            indices = self.plan.batch(epoch, batch, seed=s.seed, rank=s.rank, world_size=s.world_size)
            slot = client.arena.take() if client.arena is not None else None
            task = self.supervisor.new_task(client.identity, position, indices, seed=s.seed, epoch=epoch,
                                            augment=s.augment, slot=slot)
            client.tasks[position] = task.id

    def send_task(self, worker: Worker, task: Task) -> bool:
        """Hand `task` to `worker` over the worker channel (the supervisor's dispatch calls this)."""
        client = self.clients.get(task.owner)
        arena = client.arena if client is not None and task.slot is not None else None
        message = TaskMessage(id=task.id, indices=task.indices.tobytes(), seed=task.seed, epoch=task.epoch,
                              augment=task.augment, arena=arena.handle() if arena else None,
                              slot=task.slot if arena else None)
        return self.channel.send(worker.identity, message)

    def flush(self, client: Client) -> None:
        """Send what the session may send now (credit and order allowing), then build more."""
        if client.identity in self.departed:
            return
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
        self.schedule(client)

    def _send(self, client: Client, frames: list[Any]) -> bool:
        outcome = self.transport.send(client.identity, frames)
        if outcome == "gone":
            self.departed.add(client.identity)
        elif outcome == "ok":
            client.session.last_sent = time.monotonic()
        return outcome == "ok"

    def reply(self, identity: bytes, message: Message) -> None:
        self.transport.reply(identity, message)

    def error(self, identity: bytes, kind: str, message: str, **extra: Any) -> None:
        self.transport.reply(identity, Error(kind=kind, message=message, **extra))

    # ------------------------------------------------------------------ results
    def on_result(self, task: Task, result: Result, frames: list[Any]) -> None:
        client = self._owner(task)
        if client is None:
            return
        if result.bad:
            for path, code, reason in self.bad.note(result.bad):
                self.metrics.errors[code] += 1
                log.warning("bad file %s: %s (replaced by another sample of its batch; logged once)", path, reason)
            if self.bad.too_many:
                log.error(self.bad.too_many)
                self.error(client.identity, "bad_sample", self.bad.too_many)
                self.drop(client.identity, "too many bad files")
                return
        protocol.build_arrays(result.arrays, frames, max_bytes=self.config.max_message_bytes)  # checks the frames
        arrays = result.arrays + (result.shm_arrays or [])
        shm = ShmRef(slot=task.slot, arrays=result.shm_arrays or []) if task.slot is not None else None
        images = next((a[2][0] for a in arrays if a[0] == "y"), 0)
        nbytes = sum(math.prod(a[2]) * np.dtype(a[1]).itemsize for a in arrays)
        client.session.built(task.position, Built(result.arrays, frames, shm, images, nbytes))
        self.flush(client)

    def on_failed(self, task: Task, failed: Failed, worker_id: int) -> None:
        client = self._owner(task)
        if client is None:
            return
        self._give_back_slot(client, task)
        epoch, batch = client.session.place(task.position)
        log.error("worker %d failed on epoch %d batch %d: %s", worker_id, epoch, batch, failed.message)
        self.error(client.identity, failed.kind, f"epoch {epoch} batch {batch}: {failed.message}", path=failed.path,
                   reason=failed.reason, traceback=failed.traceback)
        self.drop(client.identity, "batch failed")

    def on_skipped(self, task: Task) -> None:
        client = self._owner(task)
        if client is not None:  # its arena was forgotten, so its session is normally gone already
            self._give_back_slot(client, task)

    def give_up(self, gone: Iterable[GivenUp]) -> None:
        """Report tasks that killed or hung their workers too often, and end their sessions."""
        for g in gone:
            client = self._owner(g.task)
            if client is None:
                continue
            self._give_back_slot(client, g.task)
            epoch, batch = client.session.place(g.task.position)
            self.error(client.identity, "worker_crashed", f"epoch {epoch} batch {batch}: its worker {g.why} "
                       f"{g.task.crashes} times; its files: {self.file_list(g.task, 8)}", exit_code=g.exit_code)
            self.drop(client.identity, "batch crashed workers repeatedly")

    def _owner(self, task: Task) -> Client | None:
        client = self.clients.get(task.owner)
        if client is not None:
            client.tasks.pop(task.position, None)
        return client

    def _give_back_slot(self, client: Client, task: Task) -> None:
        if task.slot is not None and client.arena is not None:
            client.arena.give_back(task.slot)

    # ------------------------------------------------------------------ descriptions
    def describe_task(self, task: Task) -> str:
        client = self.clients.get(task.owner)
        if client is None:
            return "a batch of a client that left"
        epoch, batch = client.session.place(task.position)
        return f"epoch {epoch} batch {batch} (files {self.file_list(task, 4)})"

    def file_list(self, task: Task, limit: int) -> str:
        """The first `limit` files of a task's batch, for error messages."""
        files = [self.index.describe(int(i)) for i in task.indices[:limit]]
        return ", ".join(files) + (" ..." if len(task.indices) > limit else "")
