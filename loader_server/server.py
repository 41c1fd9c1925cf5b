"""The server: one event loop that owns every ZeroMQ socket and supervises the workers.

Data flows one way: a client's ``hello`` opens a *session* (its stream position, rank and
credit); the session schedules up to ``prefetch`` batch tasks ahead; tasks go to idle workers
over a private ipc ROUTER socket; results come back as raw frames and are forwarded to the
client zero-copy, in stream order (or as they complete, with ``in_order=False``), one per
credit the client has granted. Memory is thus bounded by ``prefetch`` batches per client.

A worker that dies is logged (id, pid, exit code) and replaced, and the tasks it held are
issued again; a task that kills workers repeatedly is reported to its client.
"""

from __future__ import annotations

import inspect
import logging
import math
import multiprocessing
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.utils.z85

from loader_client import protocol
from loader_client.errors import ProtocolError, ProtocolVersionError
from loader_client.shm import create_arena, shm_available

from .batch_spec import BatchSpec, batch_spec
from .config import ServerConfig, is_local_bind
from .datasets import Dataset
from .metrics import Metrics, serve_metrics
from .sampling import SamplingPlan
from .worker import worker_main

__all__ = ["Server", "MAX_TASK_RETRIES"]

log = logging.getLogger("loader_server")

#: Tasks a worker holds at once: one being built and two whose file reads run ahead (slow storage).
_TASKS_PER_WORKER = 3
#: A task whose worker died this many times is reported to the client instead of retried.
MAX_TASK_RETRIES = 3
#: Most credit a client may hold; more is clamped (bounds what we might queue for it).
_MAX_CREDIT = 64
_MAX_REQUEST_BYTES = 64 * 1024
_WORKER_STOP_TIMEOUT_S = 5.0
_LOOP_TICK_MS = 100
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
#: Time a hung worker gets to write its stack dump before SIGKILL.
_HUNG_DUMP_GRACE_S = 0.5


@dataclass
class _Session:
    """One client's stream: where it is, what it may receive, what is being built for it."""

    identity: bytes
    name: str
    rank: int
    world_size: int
    seed: int
    steps: int
    next_schedule: int  # stream position (epoch * steps + batch) of the next task to create
    next_send: int  # stream position the client expects next (in-order mode)
    credit: int
    last_seen: float
    last_sent: float
    ready: dict[int, list[Any]] = field(default_factory=dict)  # position -> [described, frames, shm]
    in_flight: set[int] = field(default_factory=set)  # task ids
    arena: _Arena | None = None  # shared-memory slots, for a client on this host
    augment: bool = False  # the server's augmentations apply to this stream

    @property
    def outstanding(self) -> int:
        return len(self.ready) + len(self.in_flight)


@dataclass
class _Arena:
    """A session's shared-memory arena: slots are free, being filled, ready, or with the client."""

    id: int
    fd: int
    inode: int
    slots: int
    stride: int
    free: deque[int]
    with_client: set[int] = field(default_factory=set)

    def describe(self) -> list[Any]:
        return [self.id, f"/proc/{os.getpid()}/fd/{self.fd}", self.slots, self.stride, self.inode]


@dataclass
class _Task:
    id: int
    session: bytes
    position: int
    indices: np.ndarray
    slot: int | None = None  # shared-memory slot the worker writes x into
    crashes: int = 0


@dataclass
class _Worker:
    id: int
    process: Any
    identity: bytes  # random routing id, known only to this process tree
    ready: bool = False
    tasks: list[int] = field(default_factory=list)
    last_progress: float = 0.0  # last message from it, or when it got work while idle
    hung: str = ""  # why it is being killed, when it is
    kill_at: float = 0.0
    spawned: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0  # time spent with at least one task
    busy_since: float = 0.0

    def set_busy(self, busy: bool, now: float) -> None:
        if busy and not self.busy_since:
            self.busy_since = now
        elif not busy and self.busy_since:
            self.busy_s += now - self.busy_since
            self.busy_since = 0.0


class Server:
    """Serve batches of `index` under `config` until `stop()` or SIGINT/SIGTERM."""

    def __init__(self, config: ServerConfig, index: Dataset, spec: BatchSpec | None = None) -> None:
        self.config = config
        self.index = index
        self.spec = batch_spec(config, index) if spec is None else spec
        self.plan = SamplingPlan(
            len(index), self.spec.batch_size, mode=config.mode, shuffle=config.shuffle,
            drop_last=config.drop_last, steps_per_epoch=config.steps_per_epoch,
        )
        self.fingerprint = f"{config.fingerprint()}-{index.fingerprint()}"
        self._stopping = False
        self._sessions: dict[bytes, _Session] = {}
        self._tasks: dict[int, _Task] = {}
        self._queue: deque[int] = deque()
        self._workers: dict[int, _Worker] = {}
        self._next_task_id = 0
        self._next_arena_id = 0
        self._mp = multiprocessing.get_context("fork")
        self._by_identity: dict[bytes, int] = {}
        self.bad_files: dict[str, str] = {}  # skip mode: path -> reason, each logged once
        self._too_many_bad = ""
        self.metrics = Metrics()
        self._next_log = time.monotonic() + config.log_interval_s

    # ------------------------------------------------------------------ lifecycle
    def stop(self, *_: Any) -> None:
        """Ask the loop to drain and exit (also the SIGINT/SIGTERM handler)."""
        self._stopping = True

    def run(self) -> int:
        """Bind, start workers, serve until stopped; returns the exit code."""
        self._ctx = zmq.Context()
        self._clients = self._ctx.socket(zmq.ROUTER)
        self._clients.setsockopt(zmq.LINGER, 0)
        self._clients.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._clients.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST_BYTES)
        self._clients.setsockopt(zmq.SNDHWM, _MAX_CREDIT + 16)  # credit bounds batches; + heartbeats
        self._workers_sock = self._ctx.socket(zmq.ROUTER)
        self._workers_sock.setsockopt(zmq.LINGER, 0)
        self._workers_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._workers_sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        self._workers_sock.setsockopt(zmq.RCVHWM, 0)
        # An abstract socket: no file to leave behind, even on SIGKILL. Other local users could
        # connect to it, so workers are known by random identities that only our forked
        # children have, and messages from any other identity are ignored.
        self._worker_endpoint = f"ipc://@loader-server-{os.getpid()}-{secrets.token_hex(16)}"
        try:
            self._bind_clients()
            if self.config.metrics_port:
                self._metrics_http = serve_metrics(self.config.metrics_port, lambda: self.metrics.snapshot)
            self._workers_sock.bind(self._worker_endpoint)
            for wid in range(self.config.workers):
                self._spawn(wid)
            log.info(
                "serving %d samples from %s on %s: %d workers, batch %d, %d steps per epoch, settings %s",
                len(self.index), self.index.source, self.config.bind, self.config.workers,
                self.spec.batch_size, self.plan.steps_per_epoch(), _settings_line(self.config),
            )
            self._loop()
        finally:
            self._shutdown()
        log.info("stopped after sending %d batches", self.metrics.batches_sent)
        return 0

    def _bind_clients(self) -> None:
        bind = self.config.bind
        if self.config.curve_dir:
            self._auth = _start_curve(self._ctx, self._clients, self.config.curve_dir)
        elif not is_local_bind(bind):
            log.warning("serving %s WITHOUT encryption or authentication (--insecure): anyone who can reach "
                        "it can read the data set's pixels and labels; use --curve-dir on shared networks", bind)
        try:
            self._clients.bind(bind)
        except zmq.ZMQError as exc:
            from loader_client.errors import ConfigError

            raise ConfigError(f"cannot bind `bind` {bind!r}: {exc}; choose another port or path") from None
        if bind.startswith("ipc://") and not bind.startswith("ipc://@"):
            path = bind[len("ipc://"):]
            os.chmod(path, 0o600)
            _start_janitor(path)

    def _shutdown(self) -> None:
        for w in self._workers.values():
            if w.process.is_alive():
                w.process.terminate()  # workers hold nothing worth draining
        deadline = time.monotonic() + _WORKER_STOP_TIMEOUT_S
        for w in self._workers.values():
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1.0)
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
        self._clients.close(linger=0)
        self._workers_sock.close(linger=0)
        self._ctx.term()
        if self.config.bind.startswith("ipc://"):
            try:
                os.unlink(self.config.bind[len("ipc://"):])
            except FileNotFoundError:
                pass

    def _spawn(self, wid: int) -> None:
        identity = secrets.token_bytes(16)
        proc = self._mp.Process(
            target=worker_main,
            args=(wid, identity, self._worker_endpoint, self.config, self.index, self.spec, os.getpid()),
            name=f"loader-worker-{wid}",
            daemon=True,
        )
        # Block SIGINT/SIGTERM across the fork so that the child never runs our handlers;
        # worker_main installs its own and unblocks them.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._workers[wid] = _Worker(wid, proc, identity)
        self._by_identity[identity] = wid

    # ------------------------------------------------------------------ event loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._clients, zmq.POLLIN)
        poller.register(self._workers_sock, zmq.POLLIN)
        sentinels: dict[int, int] = {}
        tick_s = min(self.config.heartbeat_s / 2, _LOOP_TICK_MS / 1000)
        next_tick = time.monotonic()
        while not self._stopping:
            for wid, w in self._workers.items():
                if sentinels.get(wid) != w.process.sentinel:
                    if wid in sentinels:
                        poller.unregister(sentinels[wid])
                    sentinels[wid] = w.process.sentinel
                    poller.register(w.process.sentinel, zmq.POLLIN)
            events = dict(poller.poll(max(0, int((next_tick - time.monotonic()) * 1000))))
            if self._workers_sock in events:
                self._drain_workers()
            if self._clients in events:
                self._drain_clients()
            for wid, fd in list(sentinels.items()):
                if fd in events and not self._workers[wid].process.is_alive():
                    poller.unregister(fd)
                    del sentinels[wid]
                    self._replace_worker(wid)
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + tick_s
            self._dispatch()

    def _drain_clients(self) -> None:
        while True:
            try:
                frames = self._clients.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = frames[0], frames[1:]
            try:
                self._on_client(identity, body)
            except ProtocolVersionError as exc:
                log.warning("refused client %s: %s", identity.hex(), exc)
                self._send_error(identity, "version", str(exc))
            except ProtocolError as exc:
                log.warning("ignored bad message from client %s: %s", identity.hex(), exc)
                self._send_error(identity, "protocol", str(exc))

    def _on_client(self, identity: bytes, body: list[bytes]) -> None:
        if len(body) != 1:
            raise ProtocolError(f"client requests are one frame, got {len(body)}")
        header = protocol.unpack(body[0])
        protocol.check_version(header, peer="the client")
        kind = header["t"]
        session = self._sessions.get(identity)
        now = time.monotonic()
        if kind == "hello":
            self._on_hello(identity, protocol.validate_fields(header, protocol.HELLO_FIELDS))
        elif kind in ("health", "stats"):
            protocol.validate_fields(header, {})
            snap = self.stats()
            if kind == "health":
                reply = protocol.pack("health", ok=snap["workers_ready"] > 0, workers_ready=snap["workers_ready"],
                                      workers=self.config.workers, clients=len(snap["clients"]),
                                      batches_sent=snap["batches_sent"])
            else:
                reply = protocol.pack("stats", stats=snap)
            try:
                self._clients.send_multipart([identity, reply], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        elif session is None:
            if kind != "bye":
                self._send_error(identity, "server", "no session: the server restarted or dropped this client; "
                                 "create a new LoaderClient (pass state= to resume where you were)")
        elif kind == "credit":
            n = protocol.validate_fields(header, protocol.CREDIT_FIELDS, required=("n",))["n"]
            if n < 1:
                raise ProtocolError(f"credit must be >= 1, got {n}")
            session.credit = min(_MAX_CREDIT, session.credit + n)
            session.last_seen = now
            self._schedule(session)
            self._flush(session)
        elif kind == "release":
            slots = protocol.validate_fields(header, protocol.RELEASE_FIELDS, required=("slots",))["slots"]
            arena = session.arena
            if arena is None or not all(isinstance(k, int) and k in arena.with_client for k in slots):
                raise ProtocolError(f"release of slots {slots!r} that this client does not hold")
            for k in slots:
                arena.with_client.discard(k)
                arena.free.append(k)
            session.last_seen = now
            self._schedule(session)
        elif kind == "ping":
            session.last_seen = now
        elif kind == "bye":
            self._drop(identity, "said goodbye")
        else:
            raise ProtocolError(f"unknown message type {kind!r}")

    def _on_hello(self, identity: bytes, req: dict[str, Any]) -> None:
        rank, world = req.get("rank", 0), req.get("world_size", 1)
        if world < 1 or not 0 <= rank < world:
            raise ProtocolError(f"rank {rank} of world_size {world} is invalid: need 0 <= rank < world_size")
        steps = self.plan.steps_per_epoch(world)
        if steps < 1:
            self._send_error(identity, "config", f"world_size {world} leaves no full batch of "
                             f"{self.spec.batch_size} per rank from {len(self.index)} samples")
            return
        if self._too_many_bad:
            self._send_error(identity, "bad_sample", self._too_many_bad)
            return
        fp = req.get("fingerprint")
        if fp is not None and fp != self.fingerprint:
            self._send_error(identity, "config", _fingerprint_mismatch(fp, self.fingerprint))
            return
        epoch, batch = req.get("epoch", 0), req.get("batch", 0)
        if epoch < 0 or not 0 <= batch < steps:
            raise ProtocolError(f"start position epoch {epoch} batch {batch} is outside 0..{steps - 1}")
        seed = req.get("seed")
        seed = self.config.seed if seed is None else seed
        if not 0 <= seed < 2**63:
            raise ProtocolError(f"seed must be between 0 and 2**63-1, got {seed}")
        if identity in self._sessions:
            self._drop(identity, "reconnected")
        name = req.get("client") or identity.hex()
        start = epoch * steps + batch
        now = time.monotonic()
        session = _Session(identity, name, rank, world, seed, steps, start, start,
                           min(_MAX_CREDIT, max(0, req.get("credit", 0))), now, now)
        session.augment = bool(self.config.augment) and req.get("augment", True)
        if req.get("shm") and self.config.shm and shm_available():
            session.arena = self._new_arena(session)
        self._sessions[identity] = session
        meta = {
            "num_samples": len(self.index), "batch_size": self.spec.batch_size, "steps_per_epoch": steps,
            "rank": rank, "world_size": world, "seed": seed, "epoch": epoch, "batch": batch,
            "mode": self.config.mode, "in_order": self.config.in_order, "drop_last": self.config.drop_last,
            "x_shape": list(self.spec.x_shape), "x_dtype": self.spec.x_dtype,
            "layout": self.spec.layout, "color": self.spec.color,
            "class_names": list(self.index.class_names) if self.index.class_names else None,
            "fingerprint": self.fingerprint, "heartbeat_s": self.config.heartbeat_s,
            "max_message_bytes": self.config.max_message_bytes,
            "shm": session.arena.describe() if session.arena else None,
        }
        self._send(session, [protocol.pack("welcome", meta=meta)])
        log.info("client %s connected: rank %d/%d, seed %d, starting at epoch %d batch %d, %s",
                 name, rank, world, seed, epoch, batch,
                 "shared memory" if session.arena else "frames over the socket")
        self._schedule(session)

    def _new_arena(self, session: _Session) -> _Arena | None:
        """Slots for everything that may be outstanding: prefetch, plus the client's credit window.

        A client that keeps batches alive longer holds more slots; tasks then fall back to frames.
        """
        slots = self.config.prefetch + max(1, session.credit) + 2  # + the trainer's batch, + one in release
        try:
            fd, stride = create_arena(f"loader-{session.name}", slots, self.spec.batch_bytes)
        except OSError as exc:
            log.warning("no shared memory for client %s (%s); sending frames over the socket", session.name, exc)
            return None
        self._next_arena_id += 1
        return _Arena(self._next_arena_id, fd, os.fstat(fd).st_ino, slots, stride, deque(range(slots)))

    def _close_arena(self, arena: _Arena) -> None:
        for w in self._workers.values():
            if w.ready:
                try:
                    self._workers_sock.send_multipart([w.identity, protocol.pack("forget", arena=arena.id)],
                                                      zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        os.close(arena.fd)

    def _drain_workers(self) -> None:
        while True:
            try:
                frames = self._workers_sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            wid = self._by_identity.get(frames[0].bytes)
            if wid is None or len(frames) < 2:
                log.warning("ignored a message on the worker socket from an unknown peer")
                continue
            worker = self._workers.get(wid)
            if worker is not None:
                worker.last_progress = time.monotonic()
            header = protocol.unpack(frames[1])
            kind = header["t"]
            if kind == "ready":
                if worker is not None:
                    worker.ready = True
                continue
            if kind == "result" and isinstance(header.get("build_s"), float):
                self.metrics.built(header["build_s"])
            elif kind == "failed":
                self.metrics.errors[str(header.get("reason") or header.get("kind"))] += 1
            task = self._tasks.pop(header["id"], None)
            if worker is not None and header["id"] in worker.tasks:
                worker.tasks.remove(header["id"])
                if not worker.tasks:
                    worker.set_busy(False, time.monotonic())
            if task is None:
                continue  # its session went away
            session = self._sessions.get(task.session)
            if session is None:
                continue
            session.in_flight.discard(task.id)
            if kind == "result" and header.get("bad") and not self._note_bad(header["bad"]):
                self._send_error(task.session, "bad_sample", self._too_many_bad)
                self._drop(task.session, "too many bad files")
                continue
            if kind == "result":
                shm = None
                if task.slot is not None:
                    shm = {"slot": task.slot, "arrays": header.get("shm_arrays", [])}
                session.ready[task.position] = [header["arrays"], frames[2:], shm]
                self._flush(session)
            elif kind == "failed":
                self._free_slot(session, task)
                epoch, batch = divmod(task.position, session.steps)
                log.error("worker %d failed on epoch %d batch %d: %s", wid, epoch, batch, header["message"])
                self._send_error(task.session, header["kind"],
                                 f"epoch {epoch} batch {batch}: {header['message']}",
                                 path=header.get("path"), reason=header.get("reason"),
                                 traceback=header.get("traceback"))
                self._drop(task.session, "batch failed")

    def _note_bad(self, bad: list[list[str]]) -> bool:
        """Log each bad file once and count it; False once there are more than --max-bad."""
        for path, reason in bad:
            if path not in self.bad_files:
                self.bad_files[path] = reason
                self.metrics.errors[reason.split(" (")[0].split(":")[0]] += 1
                log.warning("bad file %s: %s (replaced by another sample of its batch; logged once)",
                            path, reason)
        limit = self.config.max_bad_files(len(self.index))
        if len(self.bad_files) > limit and not self._too_many_bad:
            self._too_many_bad = (
                f"{len(self.bad_files)} bad files exceed --max-bad ({limit}): the model would train on "
                f"substitutes. Run `loader-server check --data {self.config.data}` for the list, fix or "
                "remove them, or raise --max-bad"
            )
            log.error(self._too_many_bad)
        return not self._too_many_bad

    def _hung(self, worker: _Worker, now: float) -> None:
        """Dump a stuck worker's Python stack (SIGUSR1, faulthandler), then kill it shortly after."""
        worker.hung = (f"made no progress for {now - worker.last_progress:.0f} s (--batch-timeout-s "
                       f"{self.config.batch_timeout_s:g}) while building {_describe_task(self, worker.tasks[0])}")
        worker.kill_at = now + _HUNG_DUMP_GRACE_S
        log.error("worker %d (pid %d) %s; its Python stack follows", worker.id, worker.process.pid, worker.hung)
        try:
            os.kill(worker.process.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    def _free_slot(self, session: _Session, task: _Task) -> None:
        if task.slot is not None and session.arena is not None:
            session.arena.free.append(task.slot)

    def _replace_worker(self, wid: int) -> None:
        worker = self._workers.pop(wid)
        self._by_identity.pop(worker.identity, None)
        code = worker.process.exitcode
        worker.process.join(0)
        if self._stopping:
            return
        self.metrics.worker_restarts["hung" if worker.hung else "crashed"] += 1
        if worker.hung:
            log.error("worker %d (pid %d) %s; killed it, starting a replacement and re-issuing its %d task(s)",
                      wid, worker.process.pid, worker.hung, len(worker.tasks))
        else:
            log.error("worker %d (pid %d) died with exit code %s; starting a replacement and re-issuing "
                      "its %d task(s)", wid, worker.process.pid, code, len(worker.tasks))
        # Tasks are built in order: the first one was being built; the others only waited.
        culprit = worker.tasks[0] if worker.tasks else None
        for tid in reversed(worker.tasks):
            task = self._tasks.get(tid)
            if task is None:
                continue
            if tid == culprit:
                task.crashes += 1
            session = self._sessions.get(task.session)
            if task.crashes >= MAX_TASK_RETRIES and session is not None:
                epoch, batch = divmod(task.position, session.steps)
                del self._tasks[tid]
                self._free_slot(session, task)
                what = "hung" if worker.hung else f"died (last exit code {code})"
                self._send_error(task.session, "worker_crashed",
                                 f"epoch {epoch} batch {batch}: its worker {what} {task.crashes} times; "
                                 f"its files: {_file_list(self.index, task, 8)}")
                self._drop(task.session, "batch crashed workers repeatedly")
            else:
                self._queue.appendleft(tid)
        self._spawn(wid)

    # ------------------------------------------------------------------ scheduling
    def _schedule(self, session: _Session) -> None:
        """Create tasks for `session` until `prefetch` batches are in flight or ready."""
        while session.outstanding < self.config.prefetch:
            slot = None
            if session.arena is not None and session.arena.free:
                slot = session.arena.free.pop()  # most recent first: fewer distinct pages touched
                # (with no free slot the client holds them all: this task uses frames)
            epoch, batch = divmod(session.next_schedule, session.steps)
            indices = self.plan.batch(epoch, batch, seed=session.seed, rank=session.rank,
                                      world_size=session.world_size)
            tid = self._next_task_id
            self._next_task_id += 1
            self._tasks[tid] = _Task(tid, session.identity, session.next_schedule, indices, slot)
            session.in_flight.add(tid)
            session.next_schedule += 1
            self._queue.append(tid)

    def _dispatch(self) -> None:
        """Hand queued tasks to ready workers, at most `_TASKS_PER_WORKER` each."""
        for worker in self._workers.values():
            while self._queue and worker.ready and len(worker.tasks) < _TASKS_PER_WORKER:
                tid = self._queue.popleft()
                task = self._tasks.get(tid)
                if task is None:
                    continue
                arena = None
                if task.slot is not None:
                    session = self._sessions.get(task.session)
                    if session is None or session.arena is None:
                        continue
                    arena = session.arena.describe()
                session = self._sessions.get(task.session)
                key = [session.seed, task.position // session.steps] if session else [0, 0]
                msg = protocol.pack("task", id=tid, indices=task.indices.tobytes(), arena=arena, slot=task.slot,
                                    key=key, augment=bool(session and session.augment))
                try:
                    self._workers_sock.send_multipart([worker.identity, msg], zmq.NOBLOCK)
                except zmq.ZMQError:
                    self._queue.appendleft(tid)
                    worker.ready = False  # not connected (yet/anymore); its sentinel will tell
                    break
                if not worker.tasks:
                    worker.last_progress = time.monotonic()  # the batch deadline starts now
                    worker.set_busy(True, worker.last_progress)
                worker.tasks.append(tid)

    def _flush(self, session: _Session) -> None:
        """Send ready batches the session has credit for, in stream order unless unordered."""
        while session.credit > 0 and session.ready:
            if self.config.in_order:
                position = session.next_send
                if position not in session.ready:
                    return
            else:
                position = min(session.ready)
            described, frames, shm = session.ready.pop(position)
            epoch, batch = divmod(position, session.steps)
            head = protocol.pack("batch", epoch=epoch, batch=batch, steps=session.steps, arrays=described, shm=shm)
            if not self._send(session, [head, *frames]):
                return
            if shm is not None and session.arena is not None:
                session.arena.with_client.add(shm["slot"])
            session.credit -= 1
            session.next_send = position + 1
            arrays = described + (shm["arrays"] if shm else [])
            images = next((a[2][0] for a in arrays if a[0] == "y"), 0)
            self.metrics.sent(images, sum(math.prod(a[2]) * np.dtype(a[1]).itemsize for a in arrays))
        self._schedule(session)

    # ------------------------------------------------------------------ sending
    def _send(self, session: _Session, frames: list[Any]) -> bool:
        try:
            self._clients.send_multipart([session.identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:  # its queue is full (a client that does not read): keep the batch, retry later
            return False
        except zmq.ZMQError as exc:
            self._drop(session.identity, f"unreachable ({exc.strerror})")
            return False
        session.last_sent = time.monotonic()
        return True

    def _send_error(self, identity: bytes, kind: str, message: str, **extra: Any) -> None:
        try:
            self._clients.send_multipart(
                [identity, protocol.pack("error", kind=kind, message=message, **extra)], zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass

    def _drop(self, identity: bytes, why: str) -> None:
        session = self._sessions.pop(identity, None)
        if session is None:
            return
        for tid in session.in_flight:
            self._tasks.pop(tid, None)  # workers' results for them are discarded
        session.ready.clear()
        if session.arena is not None:
            self._close_arena(session.arena)
        log.info("client %s left (%s)", session.name, why)

    def stats(self) -> dict[str, Any]:
        """What the server is doing: rates, queues, workers, errors, clients (a stats request)."""
        now = time.monotonic()
        images_s, batches_s = self.metrics.rates()
        workers = []
        for w in self._workers.values():
            busy = w.busy_s + (now - w.busy_since if w.busy_since else 0.0)
            state = "hung" if w.hung else "busy" if w.tasks else "idle" if w.ready else "starting"
            workers.append({"id": w.id, "pid": w.process.pid, "state": state, "tasks": len(w.tasks),
                            "busy_fraction": busy / max(1e-9, now - w.spawned)})
        return {
            "uptime_s": now - self.metrics.started, "images_per_s": images_s, "batches_per_s": batches_s,
            "batches_sent": self.metrics.batches_sent, "images_sent": self.metrics.images_sent,
            "bytes_sent": self.metrics.bytes_sent,
            "batches_ready": sum(len(s.ready) for s in self._sessions.values()),
            "workers_ready": sum(1 for w in self._workers.values() if w.ready and not w.hung),
            "workers": workers, "worker_restarts": dict(self.metrics.worker_restarts),
            "errors_by_reason": dict(self.metrics.errors), "bad_files": len(self.bad_files),
            "clients": [{"name": s.name, "rank": s.rank, "world_size": s.world_size,
                         "epoch": s.next_send // s.steps, "batch": s.next_send % s.steps,
                         "shared_memory": s.arena is not None} for s in self._sessions.values()],
            "batch_build_seconds": {"counts": list(self.metrics.build_counts), "sum_s": self.metrics.build_sum_s},
            "fingerprint": self.fingerprint,
        }

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
        for worker in self._workers.values():
            if worker.hung:
                if now >= worker.kill_at and worker.process.is_alive():
                    worker.process.kill()  # its sentinel fires and _replace_worker takes over
            elif worker.tasks and now - worker.last_progress > self.config.batch_timeout_s:
                self._hung(worker, now)
        for session in list(self._sessions.values()):
            if now - session.last_seen > self.config.client_timeout_s:
                self._drop(session.identity, f"silent for {now - session.last_seen:.0f} s")
            elif now - session.last_sent >= self.config.heartbeat_s:
                self._send(session, [protocol.pack("heartbeat")])


def _describe_task(server: Server, tid: int) -> str:
    task = server._tasks.get(tid)
    session = server._sessions.get(task.session) if task else None
    if task is None or session is None:
        return "a batch of a client that left"
    epoch, batch = divmod(task.position, session.steps)
    return f"epoch {epoch} batch {batch} (files {_file_list(server.index, task, 4)})"


def _file_list(index: Dataset, task: _Task, limit: int) -> str:
    """The first `limit` files of a task's batch, for error messages."""
    files = [index.describe(int(i)) for i in task.indices[:limit]]
    return ", ".join(files) + (" ..." if len(task.indices) > limit else "")


def _fingerprint_mismatch(theirs: str, ours: str) -> str:
    t_settings, _, t_index = theirs.partition("-")
    o_settings, _, o_index = ours.partition("-")
    what = []
    if t_settings != o_settings:
        what.append("the batch settings (size, resize, dtype, sampling, ...)")
    if t_index != o_index:
        what.append("the data set index (files or labels)")
    return (f"cannot resume: {' and '.join(what) or 'the fingerprint'} differ from the saved state "
            f"(saved {theirs}, server {ours}); start the server with the original settings and data")


def _settings_line(config: ServerConfig) -> str:
    d = config.as_dict()
    d.pop("data")
    return " ".join(f"{k}={v}" for k, v in d.items())


def _start_curve(ctx: zmq.Context, sock: zmq.Socket, curve_dir: str) -> Any:
    """Make `sock` a CURVE server with DIR/server.key_secret, admitting the keys in DIR/clients."""
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    from loader_client.errors import ConfigError

    secret_file = os.path.join(curve_dir, "server.key_secret")
    clients = os.path.join(curve_dir, "clients")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--curve-dir: cannot load {secret_file} ({exc}); create it with "
                          f"`loader-server keygen {curve_dir}`") from None
    if not secret or not os.path.isdir(clients) or not any(f.endswith(".key") for f in os.listdir(clients)):
        raise ConfigError(f"--curve-dir: {clients} must hold the public .key file of every allowed client "
                          f"(`loader-server keygen {clients} --name TRAINER`, then keep the .key_secret "
                          "with the trainer)")

    class LoggingAuthenticator(ThreadAuthenticator):
        async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
            result = super()._authenticate_curve(domain, client_key)
            allowed, reason = (await result) if inspect.isawaitable(result) else result  # pyzmq >= 25 is async
            if not allowed:
                log.warning("refused a client with CURVE key %s: %s", zmq.utils.z85.encode(client_key).decode(),
                            reason.decode(errors="replace"))
            return allowed, reason

    auth = LoggingAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve(domain="*", location=clients)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    log.info("CURVE on: encrypted, %d allowed client key(s) in %s",
             sum(f.endswith(".key") for f in os.listdir(clients)), clients)
    return auth


def _start_janitor(path: str) -> None:
    """Fork a tiny process that removes the ipc socket file once this server is gone.

    A clean stop removes the file itself; after SIGKILL nothing in this process runs, so the
    janitor, which only waits for its pipe from us to close, removes the file then (if it is
    still ours: same inode, so a newer server's socket is left alone). It touches no ZeroMQ.
    """
    inode = os.stat(path).st_ino
    read_fd, write_fd = os.pipe()
    middle = os.fork()
    if middle != 0:
        os.close(read_fd)  # the write end stays open in this process until it exits
        os.waitpid(middle, 0)
        return
    if os.fork() != 0:  # double fork: the janitor is nobody's child here, not counted as a worker
        os._exit(0)
    try:  # the janitor: detach from the terminal's signals, wait for EOF, clean up
        os.setsid()
        os.close(write_fd)
        for fd in range(3, 1024):
            if fd != read_fd:
                try:
                    os.close(fd)
                except OSError:
                    pass
        while os.read(read_fd, 1):
            pass
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except OSError:
        pass
    finally:
        os._exit(0)


def install_signal_handlers(server: Server) -> None:
    """SIGINT and SIGTERM ask the server to drain and exit 0."""
    signal.signal(signal.SIGINT, server.stop)
    signal.signal(signal.SIGTERM, server.stop)
