"""The batch path of every client: sessions open, tasks are created, results routed, batches sent.

`Delivery` holds the connected clients (a pure `Session` each, plus its tasks and arena) and
moves batches from the supervisor's workers to the transport: it asks each session what to
build, turns positions into tasks, routes a worker's result, failure or bad files to the
session that asked, and sends what the session's credit and order allow. It talks to sockets
only through the `Transport` and `WorkerChannel` it is given.

A client whose hello names a share (shares.py) asks its `Share` for each position instead of
building it: a batch is built once (a task owned by the share) and given to every member
that wants it. With shared memory the share has one arena that every member maps: the slot of
a batch is with each member it was sent to, and free again when the last one releases it and
the share no longer keeps it (arenas.py). A member without the arena (another host, or shared
memory refused) gets the pixels of such a batch copied into a frame.

A member that leaves while it holds slots (a trainer killed, say) leaves them orphaned: they are
given back once the kernel says its processes have exited (processes.py; checked every tick),
so a sweep whose trials are stopped early keeps its shared memory. When an arena has no free
slot, batches go as frames over the socket: each such batch is counted (`stats`, Prometheus),
and the arena running out is logged with where its slots are.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loader_client.contract import protocol
from loader_client.contract.errors import ProtocolError
from loader_client.contract.messages import (
    MAX_BAD_NAMED,
    BadFile,
    Batch,
    Error,
    Goodbye,
    Heartbeat,
    Hello,
    Manifest,
    SampleManifest,
    ShmRef,
    Welcome,
)
from loader_client.contract.sampling import SamplingPlan
from loader_client.contract.schema import Message, encode
from loader_client.contract.shm import Arena as Mapping
from loader_client.contract.shm import shm_available

from ..config import ServerConfig
from ..data.batch_spec import BatchSpec
from ..data.classes import count_classes
from ..data.datasets import Dataset
from ..logs import Throttle
from ..metrics import Metrics
from .arenas import Arena, ArenaChannel, arena_slots, new_arena, share_arena_slots
from .bad_files import BadFiles
from .outgoing import OutOfRange, checked, checked_encode
from .processes import PeerProcesses
from .sessions import MAX_EPOCH, Refusal, Session, StreamFacts, open_session
from .shares import Share, ShareKey, ShareTerms
from .supervisor import GivenUp, Supervisor, Task, Worker
from .transport import ClientTransport, PeerLog, PeerSource, client_tag, escape
from .worker_channel import WorkerChannel
from .worker_messages import Failed, Forget, Result
from .worker_messages import Task as TaskMessage

__all__ = ["ARENA_CLOSE_DELAY_S", "Built", "Client", "Delivery", "SharedStream"]

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
    copied: Built | None = None  # the same batch with x copied out of its slot into a frame (shares)
    manifest: list[SampleManifest] | None = None  # each sample's source and draws, when the session asked


@dataclass
class Client:
    """A session plus what the loop keeps beside it: its tasks and its arena (its own, or its share's)."""

    identity: bytes
    session: Session[Built]
    tasks: dict[int, int]  # position -> task id, for batches being built
    arena: Arena | None = None
    share: ShareKey | None = None
    arena_token: str | None = None  # this client's key to its share's arena on the arena channel
    arena_key_slot: int = 0  # where its hello's key is in its share's arena
    processes: PeerProcesses | None = None  # a member mapping its share's arena: who may read its slots
    peer: str = "?"  # who it is for the per-peer bound: the CURVE key, the address, or a local user ("uid N")


@dataclass
class SharedStream:
    """A share (shares.py) and what the loop keeps beside it: its arena and the server's own mapping
    of it (to copy a batch into a frame for a member without the arena)."""

    share: Share[bytes, Built]
    arena: Arena | None = None
    mapping: Mapping | None = None
    members_shm: set[bytes] = field(default_factory=set)  # members that map the arena
    fallbacks: int = 0  # batches built as frames for members that map the arena, for want of a free slot


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
        self.shares: dict[ShareKey, SharedStream] = {}
        self.used = 0  # batches sent, a share's batch counted once (the autoscaler compares it with builds)
        # Peers whose connection was found gone while sending. They are dropped only after the
        # requests already received from them are read (`reap_departed`): a trainer that closes
        # its client sends a goodbye first, and that goodbye, still queued, is the reason to log.
        self.departed: set[bytes] = set()
        self._next_arena_id = 0
        self._sessions = 0  # sessions opened so far: a session without a name is "client-N"
        self.log = Throttle(log)  # lines about sessions coming and going, at most a budget per kind
        # Arenas of ended sessions, closed a little later: a client that has its welcome but
        # has not opened its arena yet (its first batch failed at once) must not find the fd
        # number reused by another file, which it would rightly refuse as not its memfd.
        self._closing: list[tuple[float, Arena]] = []

    # ------------------------------------------------------------------ sessions
    def open(self, identity: bytes, hello: Hello, peer: str = "?", source: PeerSource | None = None) -> None:
        """Open a stream for `hello` (replacing one of the same peer), or tell the peer why not. `source`
        tells the peer's processes (a member of a share's arena)."""
        self.departed.discard(identity)
        self.drop(identity, "reconnected", reopening=True)
        if len(self.clients) >= self.config.max_clients:
            self.error(identity, "server", f"the server already serves {len(self.clients)} clients (--max-clients "
                                           f"{self.config.max_clients}); retry later or raise --max-clients")
            return
        mine = sum(1 for c in self.clients.values() if c.peer == peer)
        if mine >= self.config.max_clients_per_peer:
            self.peer_log.warning(identity, "refused client %s: %s already has %d sessions (--max-clients-per-peer)",
                                  client_tag(identity), peer, mine)
            self.error(identity, "server", f"{peer} already has {mine} sessions on this server "
                                           f"(--max-clients-per-peer {self.config.max_clients_per_peer}); close some "
                                           "or raise --max-clients-per-peer")
            return
        if self.bad.too_many:
            self.error(identity, "bad_sample", self.bad.too_many)
            return
        self._sessions += 1
        opened = open_session(hello, hello.client or f"client-{self._sessions}", steps_for=self.plan.steps_per_epoch,
                              facts=self.facts, now=time.monotonic())
        if isinstance(opened, Refusal):
            self.peer_log.warning(identity, "refused client %s: %s", client_tag(identity), opened.message)
            self.error(identity, opened.kind, opened.message)
            return
        client = Client(identity, opened, {}, peer=peer)
        # Shared memory only for a hello with its key (written into the arena: the client maps no other).
        wants_shm = hello.shm and hello.shm_key is not None and self.config.shm and shm_available()
        if hello.share is not None:
            shared = self._join_share(client, hello, wants_shm, source)
            if shared is None:
                return
        elif wants_shm:
            client.arena = new_arena(self._new_arena_id(),
                                     arena_slots(self.config.prefetch_batches, hello.credit),
                                     self.spec.batch_bytes, self.arena_channel, self.log, key=hello.shm_key)
        try:
            welcome = checked_encode(self._welcome(client, hello))
        except OutOfRange as exc:  # the session cannot be described on the wire: refuse it, naming why
            if client.share is not None:
                self._leave_share(client)
            elif client.arena is not None:
                client.arena.close()
            self.error(identity, "server", f"this server cannot describe the stream in a welcome: {exc}")
            return
        self.clients[identity] = client
        self._send(client, [welcome])
        self.log.info("client-connected", "client %s connected from %s: rank %d/%d, seed %d, starting at epoch %d "
                      "batch %d, %s%s", escape(opened.name), escape(peer), opened.rank, opened.world_size, opened.seed,
                      hello.epoch, hello.batch, "shared memory" if client.arena else "frames over the socket",
                      f", in share {escape(str(client.share))}" if client.share else "")
        self.flush(client)

    def _new_arena_id(self) -> int:
        self._next_arena_id += 1
        return self._next_arena_id

    def _join_share(self, client: Client, hello: Hello, wants_shm: bool,
                    source: PeerSource | None = None) -> SharedStream | None:
        """Put `client` in the share its hello names (opening it), or refuse it naming each difference."""
        s = client.session
        key = ShareKey(hello.share or "", s.rank)
        terms = ShareTerms(world_size=s.world_size, seed=s.seed, augment=s.augment, manifest=s.manifest)
        shared = self.shares.get(key)
        if shared is not None:
            differences = shared.share.terms.differences(terms)
            if differences:
                message = (f"cannot join share {key}: this client asks for {'; '.join(differences)}. Every member "
                           "of a share asks for the same stream (rank, world size, seed, augmentation, "
                           "manifest): pass the same settings as the others, or another share name")
                self.peer_log.warning(client.identity, "refused client %s: %s", client_tag(client.identity), message)
                self.error(client.identity, "config", message)
                return None
        else:
            shared = SharedStream(Share(key, terms, self.config.share_window_batches))
            self.shares[key] = shared
        if wants_shm and shared.arena is None:
            shared.arena = new_arena(self._new_arena_id(),
                                     share_arena_slots(self.config.prefetch_batches, shared.share.window),
                                     self.spec.batch_bytes, self.arena_channel, self.log)
        key_slot = shared.arena.add_key(client.identity, hello.shm_key) if wants_shm and shared.arena else None
        if shared.arena is not None and key_slot is not None:
            client.arena, client.arena_token = shared.arena, shared.arena.offer()
            client.arena_key_slot = key_slot
            client.processes = source.processes() if source is not None else PeerProcesses()
            shared.members_shm.add(client.identity)
        client.share = key
        shared.share.join(client.identity, s.next_send)
        return shared

    def _welcome(self, client: Client, hello: Hello) -> Welcome:
        c, s, spec = self.config, client.session, self.spec
        return Welcome(
            num_samples=len(self.index), num_classes=self.num_classes, batch_size=spec.batch_size,
            steps_per_epoch=s.steps, rank=s.rank, world_size=s.world_size, seed=s.seed, epoch=hello.epoch,
            batch=hello.batch, mode=c.mode, in_order=c.in_order, drop_last=c.drop_last, shuffle=c.shuffle,
            x_shape=list(spec.x_shape), x_dtype=spec.x_dtype, layout=spec.layout, color=spec.color,
            class_names=list(self.index.class_names) if self.index.class_names else None,
            fingerprint=self.fingerprint, heartbeat_s=c.heartbeat_s, max_message_bytes=c.max_message_bytes,
            shm=client.arena.handle(client.arena_token, client.arena_key_slot) if client.arena else None,
            share=hello.share)

    def drop(self, identity: bytes, why: str, *, reopening: bool = False) -> None:
        """End a session: its tasks are cancelled, its batches and arena dropped (a share's arena stays
        with the share, which closes when its last member leaves).

        Its own arena is closed a little later (`ARENA_CLOSE_DELAY_S`), except when its own client
        says hello again (`reopening`): that client has moved on, and a peer repeating hellos must
        not pile up arenas. At most `max_clients` arenas wait to close; beyond that the oldest
        closes at once.
        """
        client = self.clients.pop(identity, None)
        if client is None:
            return
        self.supervisor.cancel(client.tasks.values())  # workers' results for them are then ignored
        for _ in client.session.drain():
            pass
        if client.share is not None:
            self._leave_share(client)
        elif client.arena is not None:
            self._close_arena(client.arena, now=reopening)
        self.log.info("client-left", "client %s left (%s)", escape(client.session.name), why)

    def _leave_share(self, client: Client) -> None:
        shared = self.shares.get(client.share) if client.share is not None else None
        if shared is None:
            return
        shared.share.leave(client.identity)
        shared.members_shm.discard(client.identity)
        if shared.arena is not None:
            shared.arena.forget(client.identity, client.processes)
        if shared.share.members:
            self._evict(shared)
            return
        del self.shares[shared.share.key]  # its last member left
        self.supervisor.cancel(shared.share.building())
        if shared.arena is not None:
            self._close_arena(shared.arena)
        self.log.info("share-closed", "share %s closed: %d batches built, %d handed to more than one member",
                      escape(str(shared.share.key)), shared.share.builds, shared.share.reused)

    def _close_arena(self, arena: Arena, *, now: bool = False) -> None:
        """Workers forget it now; it closes after ARENA_CLOSE_DELAY_S (at once if `now`), and at most
        `max_clients` arenas wait to close (beyond that the oldest closes at once)."""
        for w in self.supervisor.workers.values():  # ready or not: one that maps it must unmap it
            self.channel.send(w.identity, Forget(arena=arena.id))
        if now:
            arena.close()
            return
        self._closing.append((time.monotonic() + ARENA_CLOSE_DELAY_S, arena))
        while len(self._closing) > self.config.max_clients:
            self._closing.pop(0)[1].close()

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
        closed = set()
        for arena in [c.arena for c in self.clients.values()] + [s.arena for s in self.shares.values()]:
            if arena is not None and arena.id not in closed:
                closed.add(arena.id)
                arena.close()
        for _, arena in self._closing:
            arena.close()
        self._closing.clear()

    def heartbeats(self, now: float) -> None:
        """Drop clients silent for --client-timeout-s; a heartbeat to those idle for --heartbeat-s; give back
        the slots of members whose processes exited."""
        while self._closing and self._closing[0][0] <= now:
            self._closing.pop(0)[1].close()
        for shared in self.shares.values():
            if shared.arena is not None and shared.arena.left:
                self._reclaim(shared)
        for client in list(self.clients.values()):
            s = client.session
            if now - s.last_seen > self.config.client_timeout_s:
                self.drop(client.identity, f"silent for {now - s.last_seen:.0f} s")
            elif now - s.last_sent >= self.config.heartbeat_s:
                self._send(client, [encode(Heartbeat())])

    def release(self, client: Client, slots: list[int]) -> None:
        """The client gave shared-memory slots back."""
        if client.arena is None:
            raise ProtocolError("release of shared-memory slots, but this client has no arena")
        client.arena.release(slots, client.identity)
        self.schedule(client)

    # ------------------------------------------------------------------ building and sending
    def schedule(self, client: Client) -> bool:
        """Create tasks for what the session wants built (up to prefetch outstanding). True when a share
        had some of it built already: the caller may send more now."""
        s = client.session
        shared = self.shares.get(client.share) if client.share is not None else None
        ready_now = False
        for position in s.to_build():
            if shared is None:
                was_dry = client.arena is not None and client.arena.dry
                slot = client.arena.take() if client.arena is not None else None
                if slot is None and client.arena is not None:
                    self._fell_back(client.arena, f"client {escape(s.name)}", log_it=not was_dry)
                client.tasks[position] = self._new_task(client.identity, s, position, slot).id
                continue
            payload = self._want(shared, client, position)
            if payload is not None:
                s.built(position, self._for_member(shared, client, payload))
                ready_now = True
        return ready_now

    def _want(self, shared: SharedStream, client: Client, position: int) -> Built | None:
        """`client` wants `position` of its share: the batch if built, else None (the build is started,
        or in progress for another member)."""
        want = shared.share.want(client.identity, position)
        if want.build:
            key = shared.share.key
            slot = self._share_slot(shared)
            task = self._new_task((key, client.identity) if want.behind else key, client.session, position, slot)
            shared.share.started(position, task.id)
        return want.payload

    def _new_task(self, owner: Hashable, s: Session[Built], position: int, slot: int | None) -> Task:
        epoch, batch = s.place(position)
        indices = self.plan.batch(epoch, batch, seed=s.seed, rank=s.rank, world_size=s.world_size)
        return self.supervisor.new_task(owner, position, indices, seed=s.seed, epoch=epoch, augment=s.augment,
                                        slot=slot)

    def send_task(self, worker: Worker, task: Task) -> bool:
        """Hand `task` to `worker` over the worker channel (the supervisor's dispatch calls this)."""
        arena = self._task_arena(task) if task.slot is not None else None
        message = TaskMessage(id=task.id, indices=task.indices.tobytes(), seed=task.seed, epoch=task.epoch,
                              augment=task.augment, arena=arena.handle() if arena else None,
                              slot=task.slot if arena else None, manifest=self._task_manifest(task))
        try:
            checked(message)  # a task a worker would refuse never reaches one: its death would hit other batches
        except OutOfRange as exc:
            shared = None if isinstance(task.owner, bytes) else self.shares.get(_share_of(task.owner))
            clients = self._fail(task, shared)
            self.log.log(logging.ERROR, "bad-task", "a task of client %s does not fit its schema (%s); its session "
                         "is closed", ", ".join(escape(c.session.name) for c in clients) or "?", exc)
            for client in clients:
                self.error(client.identity, "server", f"the server could not build a task for this stream: {exc}")
                self.drop(client.identity, "its task did not fit the worker's schema")
            self.supervisor.cancel([task.id])
            return True  # consumed: the supervisor sees it cancelled
        return self.channel.send(worker.identity, message)

    def _task_manifest(self, task: Task) -> bool:
        """Whether `task`'s batch is built with its manifest: its session asked (a share's members all ask alike)."""
        if isinstance(task.owner, bytes):
            client = self.clients.get(task.owner)
            return client is not None and client.session.manifest
        shared = self.shares.get(_share_of(task.owner))
        return shared is not None and shared.share.terms.manifest

    def _task_arena(self, task: Task) -> Arena | None:
        if isinstance(task.owner, bytes):
            client = self.clients.get(task.owner)
            return client.arena if client is not None else None
        shared = self.shares.get(_share_of(task.owner))
        return shared.arena if shared is not None else None

    def flush(self, client: Client) -> None:
        """Send what the session may send now (credit and order allowing), then build more."""
        while client.identity not in self.departed and client.identity in self.clients:
            s = client.session
            shared = self.shares.get(client.share) if client.share is not None else None
            while (item := s.sendable()) is not None:
                position, built = item
                epoch, batch = s.place(position)
                manifest = (Manifest(epoch=epoch, batch=batch, samples=built.manifest)
                            if s.manifest and built.manifest is not None else None)
                try:
                    head = checked_encode(Batch(epoch=epoch, batch=batch, steps=s.steps, arrays=built.arrays,
                                                shm=built.shm, manifest=manifest))
                except OutOfRange as exc:
                    self.error(client.identity, "server", f"epoch {epoch} batch {batch} cannot be sent: {exc}")
                    self.drop(client.identity, "a batch did not fit the wire schema")
                    return
                if not self._send(client, [head, *built.frames]):
                    break
                s.sent(position, time.monotonic())
                if built.shm is not None and client.arena is not None:
                    client.arena.hand_over(built.shm.slot, client.identity)
                    if shared is None:
                        client.arena.give_back(built.shm.slot)  # its own arena: the slot is the client's now
                if shared is None or shared.share.handed(client.identity, position):
                    self.used += 1  # a batch a trainer takes for the first time (a share's once)
                self.metrics.sent(built.images, built.nbytes)
            if shared is not None:
                shared.share.advance(client.identity, s.next_send)
                self._evict(shared)
            if s.finished:
                self.error(client.identity, "config", f"the stream reached the end of epoch {MAX_EPOCH}, the last "
                           "epoch the protocol carries (epochs are below 2**31): start a new stream from a lower epoch")
                self.drop(client.identity, f"reached the end of epoch {MAX_EPOCH}")
                return
            if not self.schedule(client):
                return

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

    # ------------------------------------------------------------------ shares
    def _for_member(self, shared: SharedStream, client: Client, built: Built) -> Built:
        """`built` as `client` can take it: with x copied into a frame when it is in the share's arena and
        the client does not map that arena."""
        if built.shm is None or client.arena is shared.arena:
            return built
        if built.copied is None:
            arena = shared.arena
            assert arena is not None, "a batch in a slot comes from the share's arena"
            if shared.mapping is None:
                shared.mapping = Mapping.from_fd(arena.fd, arena.slots, arena.stride, writable=False)
            name, dtype, shape = built.shm.arrays[0]
            x = np.array(shared.mapping.view(built.shm.slot, dtype, shape))  # a copy: the slot is reused later
            built.copied = Built([*built.arrays, [name, dtype, list(shape)]], [*built.frames, x], None, built.images,
                                 built.nbytes, manifest=built.manifest)
        return built.copied

    def _share_slot(self, shared: SharedStream) -> int | None:
        """A slot of the share's arena for a new batch, or None: no member maps it, or none is free (counted
        and logged once per running out: the batch goes as frames)."""
        arena = shared.arena
        if arena is None or not shared.members_shm:
            return None
        was_dry = arena.dry
        slot = arena.take()
        if slot is None and arena.left and self._reclaim(shared):
            slot = arena.take()
        if slot is not None:
            return slot
        shared.fallbacks += 1
        self._fell_back(arena, f"share {escape(str(shared.share.key))}", log_it=not was_dry)
        return None

    def _fell_back(self, arena: Arena, whose: str, *, log_it: bool) -> None:
        """A batch for a client that maps `arena` is built as frames: no slot was free."""
        self.metrics.shm_fallbacks += 1
        if log_it:
            # A trainer that keeps a few batches alive (Keras's fit does) runs dry again and again, and nothing is
            # wrong: the first time is a warning, later ones are info lines (on a trainer's stderr under
            # local_server's WARNING level, one line instead of dozens); `stats` counts them all.
            arena.dry_spells += 1
            self.log.log(logging.WARNING if arena.dry_spells == 1 else logging.INFO, "shm-full",
                         "%s: no free slot in its shared-memory arena of %d slots (%s); batches go as frames over "
                         "the socket until slots come back (%d such batches so far on this server)%s", whose,
                         arena.slots, arena.fullness(), self.metrics.shm_fallbacks,
                         "; later times are logged at INFO" if arena.dry_spells == 1 else "")

    def _reclaim(self, shared: SharedStream) -> int:
        """Give back the slots that members which left held, once their processes have exited."""
        assert shared.arena is not None
        freed = shared.arena.reclaim()
        if freed:
            self.metrics.shm_reclaimed += freed
            self.log.info("shm-reclaimed", "share %s: %d shared-memory slot(s) held by members that left are reused "
                          "(their processes exited)", escape(str(shared.share.key)), freed)
        return freed

    def _evict(self, shared: SharedStream) -> None:
        """Free the batches the share no longer keeps."""
        for entry in shared.share.evict():
            built = entry.payload
            if built is not None and built.shm is not None and shared.arena is not None:
                shared.arena.give_back(built.shm.slot)

    def _rebuild(self, shared: SharedStream, position: int, members: list[bytes], why: str) -> None:
        """The build of `position` was lost (`why`): its waiting members ask again."""
        self.log.warning("share-rebuild", "share %s: the batch at position %d is built again (%s)",
                         escape(str(shared.share.key)), position, why)
        for m in members:
            client = self.clients.get(m)
            if client is not None:
                self._want(shared, client, position)  # nothing is built: its entry was just forgotten

    # ------------------------------------------------------------------ results
    def on_result(self, task: Task, result: Result, frames: list[Any]) -> None:
        shared = None if isinstance(task.owner, bytes) else self.shares.get(_share_of(task.owner))
        client: Client | None = None
        if shared is None:
            client = self._owner(task)
            if client is None:
                return  # its session (or share) ended: its arena went with it
        else:
            entry = shared.share.entries.get(task.position)
            if entry is None or entry.payload is not None or entry.task != task.id:
                if task.slot is not None and shared.arena is not None:
                    shared.arena.give_back(task.slot)
                return
        if result.bad:
            for path, code, reason in self.bad.note(result.bad):
                self.metrics.errors[code] += 1
                log.warning("bad file %s: %s (replaced by another sample of its batch; logged once)", path, reason)
            if self.bad.too_many:
                log.error(self.bad.too_many)
                for failed in ([client] if client is not None else self._fail(task, shared)):
                    self.error(failed.identity, "bad_sample", self.bad.too_many)
                    self.drop(failed.identity, "too many bad files")
                return
        protocol.build_arrays(result.arrays, frames, max_bytes=self.config.max_message_bytes)  # checks the frames
        arrays = result.arrays + (result.shm_arrays or [])
        shm = ShmRef(slot=task.slot, arrays=result.shm_arrays or []) if task.slot is not None else None
        images = next((a[2][0] for a in arrays if a[0] == "y"), 0)
        nbytes = sum(math.prod(a[2]) * np.dtype(a[1]).itemsize for a in arrays)
        built = Built(result.arrays, frames, shm, images, nbytes, manifest=result.manifest)
        if client is not None:
            client.session.built(task.position, built)
            self.flush(client)
            return
        assert shared is not None
        members = [self.clients[m] for m in shared.share.built(task.position, built)]
        for member in members:
            member.session.built(task.position, self._for_member(shared, member, built))
        for member in members:
            self.flush(member)
        self._evict(shared)

    def _fail(self, task: Task, shared: SharedStream | None) -> list[Client]:
        """Forget `task`'s batch: the clients that waited for it (their slot given back)."""
        if shared is None:
            client = self.clients.get(task.owner) if isinstance(task.owner, bytes) else None
            if client is None:
                return []
            client.tasks.pop(task.position, None)
            self._give_back_slot(client, task)
            return [client]
        members = shared.share.failed(task.position)
        if task.slot is not None and shared.arena is not None:
            shared.arena.give_back(task.slot)
        return [c for c in (self.clients.get(m) for m in members) if c is not None]

    def on_failed(self, task: Task, failed: Failed, worker_id: int) -> None:
        shared = None if isinstance(task.owner, bytes) else self.shares.get(_share_of(task.owner))
        bad = [BadFile(path=str(path), reason=str(code)) for path, code in failed.bad]
        for client in self._fail(task, shared):
            epoch, batch = client.session.place(task.position)
            self.log.log(logging.ERROR, "worker-failed", "worker %d failed on epoch %d batch %d: %s", worker_id,
                         epoch, batch, failed.message)
            self.error(client.identity, failed.kind, f"epoch {epoch} batch {batch}: {failed.message}",
                       path=failed.path, reason=failed.reason, traceback=failed.traceback,
                       bad=bad[:MAX_BAD_NAMED] or None, bad_count=len(bad) or None)
            self.drop(client.identity, "batch failed")

    def on_skipped(self, task: Task) -> None:
        """A worker skipped a task of an arena it was told to forget (its session or share ended)."""
        shared = None if isinstance(task.owner, bytes) else self.shares.get(_share_of(task.owner))
        if shared is None:
            self._fail(task, None)  # its session is normally gone already
            return
        members = [c.identity for c in self._fail(task, shared)]
        if members:
            self._rebuild(shared, task.position, members, "its worker skipped it")

    def give_up(self, gone: Iterable[GivenUp]) -> None:
        """Report tasks that killed or hung their workers too often, and end their sessions."""
        for g in gone:
            shared = None if isinstance(g.task.owner, bytes) else self.shares.get(_share_of(g.task.owner))
            for client in self._fail(g.task, shared):
                epoch, batch = client.session.place(g.task.position)
                self.error(client.identity, "worker_crashed", f"epoch {epoch} batch {batch}: its worker {g.why} "
                           f"{g.task.crashes} times; its files: {self.file_list(g.task, 8)}", exit_code=g.exit_code)
                self.drop(client.identity, "batch crashed workers repeatedly")

    def _owner(self, task: Task) -> Client | None:
        client = self.clients.get(task.owner) if isinstance(task.owner, bytes) else None
        if client is not None:
            client.tasks.pop(task.position, None)
        return client

    def _give_back_slot(self, client: Client, task: Task) -> None:
        if task.slot is not None and client.arena is not None:
            client.arena.give_back(task.slot)

    # ------------------------------------------------------------------ descriptions
    def describe_task(self, task: Task) -> str:
        if isinstance(task.owner, bytes):
            client = self.clients.get(task.owner)
            if client is None:
                return "a batch of a client that left"
            epoch, batch = client.session.place(task.position)
            return f"epoch {epoch} batch {batch} (files {self.file_list(task, 4)})"
        shared = self.shares.get(_share_of(task.owner))
        if shared is None:
            return "a batch of a share that closed"
        epoch, batch = divmod(task.position, self.plan.steps_per_epoch(shared.share.terms.world_size))
        return f"epoch {epoch} batch {batch} of share {shared.share.key} (files {self.file_list(task, 4)})"

    def file_list(self, task: Task, limit: int) -> str:
        """The first `limit` files of a task's batch, for error messages."""
        files = [self.index.describe(int(i)) for i in task.indices[:limit]]
        return ", ".join(files) + (" ..." if len(task.indices) > limit else "")

    def describe_shares(self) -> list[dict[str, Any]]:
        return [{**s.share.describe(), "shared_memory": s.arena is not None,
                 "arena_slots": s.arena.slots if s.arena else 0,
                 "slots_free": len(s.arena.free) if s.arena else 0,
                 "slots_orphaned": len(s.arena.orphans) if s.arena else 0,
                 "slots_reclaimed": s.arena.reclaimed if s.arena else 0,
                 "shm_fallbacks": s.fallbacks} for s in self.shares.values()]


def _share_of(owner: Hashable) -> ShareKey:
    """The share a task belongs to: its owner is the share's key, or (key, member) for a member behind."""
    if isinstance(owner, ShareKey):
        return owner
    assert isinstance(owner, tuple) and isinstance(owner[0], ShareKey), owner
    return owner[0]
