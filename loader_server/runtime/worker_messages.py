"""Every message between the server and its worker processes, defined once for both ends.

Server -> worker: `Task` (build a batch), `Forget` (a session's arena is gone).
Worker -> server: `Ready`, `Result` (arrays follow as frames), `Failed`, `Skipped` (a task of a
forgotten arena, so the server's count stays right).

Workers are the server's own forked children and reach it on a private socket; their
messages are still checked at the boundary, like any peer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loader_client.contract.messages import MAX_MANIFEST_SAMPLES, ArenaHandle, SampleManifest
from loader_client.contract.schema import INT32_MAX, INT63_MAX, Message, item, spec

from ..data.remote import SERIAL_HOSTS_KEPT

__all__ = ["FROM_WORKER", "TO_WORKER", "Failed", "Forget", "Ready", "Result", "Skipped", "Task"]

_TEXT = 1 << 16
#: A host this worker found to answer only the first request of a pipeline (``scheme://host:port``, as
#: `remote.serial_host_found` says it), sent with its next `Result` or `Failed`: the server says it once.
_HOST = item(str, max_len=1024, text=True)


@dataclass(frozen=True)
class Ready(Message):
    TYPE = "ready"
    worker: int = spec(int, lo=0, hi=INT32_MAX)
    pid: int = spec(int, lo=1, hi=INT32_MAX)


@dataclass(frozen=True)
class Task(Message):
    """Build the batch of sample `indices` (int64 bytes); into arena slot `slot` when given."""

    TYPE = "task"
    id: int = spec(int, lo=0, hi=INT63_MAX)
    indices: bytes = spec(bytes, max_len=8 * (1 << 24))
    seed: int = spec(int, lo=0, hi=INT63_MAX)
    epoch: int = spec(int, lo=0, hi=INT32_MAX)
    augment: bool = spec(bool)
    arena: ArenaHandle | None = spec(dict, type(None), default=None, nested=ArenaHandle)
    slot: int | None = spec(int, type(None), default=None, lo=0, hi=INT32_MAX)
    manifest: bool = spec(bool, default=False)  # record each sample's source and augmentation draws


@dataclass(frozen=True)
class Forget(Message):
    TYPE = "forget"
    arena: int = spec(int, lo=0, hi=INT63_MAX)


@dataclass(frozen=True)
class Result(Message):
    """A built batch: `arrays` describe the frames that follow; `shm_arrays` what is in the slot."""

    TYPE = "result"
    id: int = spec(int, lo=0, hi=INT63_MAX)
    arrays: list[list[Any]] = spec(list, max_len=64, items=item(list, max_len=3))
    build_s: float = spec(float, lo=0.0, hi=1e9)
    bad: list[list[str]] = spec(list, default_factory=list, max_len=1 << 20,
                                items=item(list, max_len=3))  # [path, code, reason]
    shm_arrays: list[list[Any]] | None = spec(list, type(None), default=None, max_len=1,
                                              items=item(list, max_len=3))
    cache_hits: int = spec(int, default=0, lo=0, hi=INT32_MAX)  # samples copied from the decoded-sample cache
    cache_misses: int = spec(int, default=0, lo=0, hi=INT32_MAX)  # samples decoded (and stored) with a cache on
    manifest: list[SampleManifest] | None = spec(list, type(None), default=None, max_len=MAX_MANIFEST_SAMPLES,
                                                 items=item(dict, nested=SampleManifest))  # when the task asked
    serial_hosts: list[str] = spec(list, default_factory=list, max_len=SERIAL_HOSTS_KEPT, items=_HOST)


@dataclass(frozen=True)
class Failed(Message):
    """A batch that could not be built: a bad sample (`kind` bad_sample) or an error (server)."""

    TYPE = "failed"
    id: int = spec(int, lo=0, hi=INT63_MAX)
    kind: str = spec(str, max_len=32, text=True)
    message: str = spec(str, max_len=_TEXT)
    reason: str = spec(str, max_len=1024)
    path: str | None = spec(str, type(None), default=None, max_len=4096)
    traceback: str | None = spec(str, type(None), default=None, max_len=_TEXT)
    bad: list[list[str]] = spec(list, default_factory=list, max_len=1 << 20,
                                items=item(list, max_len=2))  # [sample, code] of every bad sample
    serial_hosts: list[str] = spec(list, default_factory=list, max_len=SERIAL_HOSTS_KEPT, items=_HOST)


@dataclass(frozen=True)
class Skipped(Message):
    TYPE = "skipped"
    id: int = spec(int, lo=0, hi=INT63_MAX)


TO_WORKER = {c.TYPE: c for c in (Task, Forget)}
FROM_WORKER = {c.TYPE: c for c in (Ready, Result, Failed, Skipped)}
