"""The worker process: receives tasks (sample indices), builds batches, sends them back.

A worker does only work. It owns its ZeroMQ context (created after the fork, never shared),
runs OpenCV on one thread, and exits on its own when the server dies (parent-death signal,
plus a check of the parent pid whenever it is idle).

Batches are sent zero-copy: the frame points at the batch buffer itself, and a small pool of
buffers is recycled once ZeroMQ reports it has finished with each one.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import time
import traceback
from collections import deque

import numpy as np
import zmq

from loader_client.contract import protocol
from loader_client.contract.errors import ProtocolError
from loader_client.contract.messages import ArenaHandle
from loader_client.contract.schema import decode, decode_fields, encode
from loader_client.contract.shm import Arena

from ..data.batch_spec import BatchSpec
from ..data.datasets import Dataset
from ..options import PipelineOptions
from ..pipeline.cache import SampleCache
from .worker_messages import TO_WORKER, Failed, Forget, Ready, Result, Skipped, Task

__all__ = ["WORKER_IDLE_POLL_MS", "worker_main"]

#: How often an idle worker checks that its server is still alive.
WORKER_IDLE_POLL_MS = 500
#: Output buffers in flight per worker: one being filled, others still being sent.
_POOL_SIZE = 3
_TRACKER_WAIT_S = 30.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the server dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _arena_id(task: Task) -> int | None:
    return task.arena.id if task.arena is not None else None


def _arena(arenas: dict[int, Arena], handle: ArenaHandle) -> Arena | None:
    """The mapping of a session's arena, opened on first use; None if it is already gone."""
    arena = arenas.get(handle.id)
    if arena is None:
        try:
            if os.stat(handle.path).st_ino != handle.inode:  # the fd number now names another arena
                return None
            arena = Arena(handle.path, handle.slots, handle.stride, writable=True)
        except OSError:
            return None
        arenas[handle.id] = arena
    return arena


def _refuse_task(sock: zmq.Socket[bytes], head: bytes, exc: ProtocolError) -> None:
    """A message from the server that does not decode: a failure of that task if its id can be read."""
    try:
        task_id = protocol.unpack(head).get("id")
    except ProtocolError:
        task_id = None
    if isinstance(task_id, int) and not isinstance(task_id, bool) and 0 <= task_id < 2**63:
        sock.send(encode(Failed(id=task_id, kind="server", reason="ProtocolError",
                                message=f"the worker refused its task: {exc}")))


def worker_main(worker_id: int, identity: bytes, endpoint: str, options: PipelineOptions, index: Dataset,
                spec: BatchSpec, parent_pid: int, cache: SampleCache | None = None) -> None:
    """Entry point of a worker process (forked from the server's main thread).

    `options` are the option groups of the sample path (not the whole configuration);
    `identity` is this worker's secret routing id on the server's worker socket; `cache` the
    server's decoded-sample cache, whose mapping the fork shares.
    """
    _die_with_parent()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the server asks for a stack when we hang
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})  # blocked across fork
    if os.getppid() != parent_pid:  # the server died before prctl took effect
        os._exit(1)
    import cv2

    cv2.setNumThreads(1)
    from ..data.reading import BadSamples
    from ..data.remote import report_serial_hosts, serial_hosts_found
    from ..pipeline.batch import BatchBuilder, Reads
    from ..pipeline.decode import DecodeError

    report_serial_hosts()  # the server says once what every worker finds of a host (not a line per worker)
    builder = BatchBuilder(options, index, spec, cache)
    pool: deque[tuple[np.ndarray, zmq.MessageTracker | None]] = deque(
        (builder.allocate(), None) for _ in range(_POOL_SIZE)
    )
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.connect(endpoint)
    sock.send(encode(Ready(worker=worker_id, pid=os.getpid())))
    arenas: dict[int, Arena] = {}  # shared-memory arenas of sessions, by arena id
    out_dtype = np.dtype(spec.x_dtype)
    pending: deque[tuple[Task, np.ndarray, Reads]] = deque()  # tasks received, reads started
    try:
        while True:
            if not pending and not sock.poll(WORKER_IDLE_POLL_MS):
                if os.getppid() != parent_pid:
                    return
                continue
            while True:  # take every task already here, so their reads overlap this decode
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    message = decode(protocol.unpack(frames[0]), TO_WORKER, "from the server")
                except ProtocolError as exc:  # never the server's: answer for that task alone, keep serving
                    _refuse_task(sock, frames[0], exc)
                    continue
                if isinstance(message, Task):
                    indices = np.frombuffer(message.indices, dtype=np.int64)
                    pending.append((message, indices, builder.read_ahead(indices, message.augment)))
                elif isinstance(message, Forget):  # the session ended: drop its arena and its tasks
                    gone = arenas.pop(message.arena, None)
                    if gone is not None:
                        gone.close()
                    for p in [p for p in pending if _arena_id(p[0]) == message.arena]:
                        pending.remove(p)
                        sock.send(encode(Skipped(id=p[0].id)))  # keeps the server's count
            if not pending:
                continue
            task, indices, reads = pending.popleft()
            task_id = task.id
            try:
                if task.arena is not None and task.slot is not None:
                    arena = _arena(arenas, task.arena)
                    if arena is None:  # its session ended (the server discards this), or mapping failed
                        raise RuntimeError("the worker could not map the session's shared memory")
                    x = arena.view(task.slot, out_dtype, (spec.batch_size, *spec.x_shape))
                else:
                    x, tracker = pool.popleft()
                    if tracker is not None and not tracker.done:
                        tracker.wait(_TRACKER_WAIT_S)
                    pool.append((x, tracker))
                started = time.perf_counter()
                arrays = builder.build(indices, x, reads, key=(task.seed, task.epoch), augment=task.augment,
                                       manifest=task.manifest)
                build_s = time.perf_counter() - started
            except DecodeError as exc:
                bad = [[e.path, e.code] for e in (exc.bad if isinstance(exc, BadSamples) else [exc])]
                sock.send(encode(Failed(id=task_id, kind="bad_sample", path=exc.path, reason=exc.code,
                                        message=str(exc), traceback=traceback.format_exc(), bad=bad,
                                        serial_hosts=serial_hosts_found())))
                continue
            except Exception as exc:  # a bug or an unexpected library error: report, keep serving
                sock.send(encode(Failed(id=task_id, kind="server", reason=type(exc).__name__,
                                        message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                                        serial_hosts=serial_hosts_found())))
                continue
            bad = [list(b) for b in builder.last_bad]
            hits, misses = builder.cache_hits, builder.cache_misses
            shm_x = arrays.pop("x") if task.arena is not None else None  # x is already in the client's slot
            result = Result(id=task_id, arrays=protocol.describe_arrays(arrays), bad=bad, build_s=build_s,
                            cache_hits=hits, cache_misses=misses, manifest=builder.last_manifest,
                            serial_hosts=serial_hosts_found(),
                            shm_arrays=protocol.describe_arrays({"x": shm_x}) if shm_x is not None else None)
            try:  # what the server would refuse (and kill this worker for) is this task's failure instead
                decode_fields(Result, result.fields(), "this worker's result")
            except ProtocolError as exc:
                sock.send(encode(Failed(id=task_id, kind="server", reason="ProtocolError",
                                        message=f"the batch cannot be sent to the server: {exc}")))
                continue
            if shm_x is not None:
                sock.send_multipart([encode(result), *arrays.values()])  # type: ignore[list-item]
            else:
                tracker = sock.send_multipart([encode(result), *arrays.values()], copy=False,  # type: ignore[list-item]
                                              track=True)
                pool[-1] = (x, tracker)
            # Views of a session's arena keep its mapping alive (Arena.close never unmaps): none may
            # outlive the task, or a departed client's arena stays mapped here (issue 21).
            del x, arrays, shm_x
    except KeyboardInterrupt:  # pragma: no cover
        pass
    finally:
        builder.close()
        sock.close(linger=0)
        ctx.term()
        sys.stdout.flush()
