"""Every message between a client and a server, defined once and used by both ends.

Client -> server: `Hello` (open a stream, first credit), `Credit`, `Release` (shared-memory
slots given back), `Ping`, `Bye`; `HealthRequest` and `StatsRequest` open no session.
Server -> client: `Welcome` (the stream's metadata), `Batch`, `Heartbeat`, `Error`, `Goodbye`
(the server stops on purpose), `HealthReply`, `StatsReply`.

Each field's type, range and length is checked by `schema` (this package) when a message is
received, on either side. Integers are bounded so that they fit everything they later reach:
positions and epochs below 2**31, seeds below 2**63. Names a peer chooses are printable text
of bounded length, so they are safe in a log line and in a system call.

To add a message: define its dataclass here, add it to the dispatch table of the side that
receives it, and handle it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schema import INT32_MAX, INT63_MAX, Message, item, spec

__all__ = [
    "CLIENT_REQUESTS",
    "HANDSHAKE_REPLIES",
    "HEALTH_REPLIES",
    "MAX_ARENA_SLOTS",
    "MAX_CREDIT",
    "MAX_NAME_CHARS",
    "MAX_RELEASE_SLOTS",
    "MAX_WORLD_SIZE",
    "STATS_REPLIES",
    "STREAM_MESSAGES",
    "ArenaHandle",
    "Batch",
    "Bye",
    "Credit",
    "Error",
    "Goodbye",
    "HealthReply",
    "HealthRequest",
    "Heartbeat",
    "Hello",
    "Ping",
    "Release",
    "ShmRef",
    "StatsReply",
    "StatsRequest",
    "Welcome",
]

#: Longest client name (printable text); longer names are refused.
MAX_NAME_CHARS = 128
#: Largest data-parallel world size a stream may ask for.
MAX_WORLD_SIZE = 1 << 16
#: Most credit a client may hold; a larger grant is clamped to this (bounds what is queued for it).
MAX_CREDIT = 64
#: Most slots one release message may name.
MAX_RELEASE_SLOTS = 1024
#: Most slots of one shared-memory arena.
MAX_ARENA_SLOTS = 1024
_MAX_TEXT = 1 << 16  # error messages and tracebacks
_FINGERPRINT_CHARS = 64

_ARRAY_DESC = item(list, max_len=3)  # [name, dtype, shape]: checked by protocol.build_arrays


# ----------------------------------------------------------------------------- client -> server
@dataclass(frozen=True)
class Hello(Message):
    """Open a stream: where to start, which share, what the client can take."""

    TYPE = "hello"
    # Any int32 rank and world size pass here: the session refuses a bad pair naming both values.
    rank: int = spec(int, default=0, lo=-INT32_MAX, hi=INT32_MAX)
    world_size: int = spec(int, default=1, lo=-INT32_MAX, hi=MAX_WORLD_SIZE)
    epoch: int = spec(int, default=0, lo=0, hi=INT32_MAX)
    batch: int = spec(int, default=0, lo=0, hi=INT32_MAX)
    seed: int | None = spec(int, type(None), default=None, lo=0, hi=INT63_MAX)
    fingerprint: str | None = spec(str, type(None), default=None, max_len=_FINGERPRINT_CHARS, text=True)
    credit: int = spec(int, default=0, lo=0, hi=INT32_MAX)
    client: str | None = spec(str, type(None), default=None, max_len=MAX_NAME_CHARS, text=True)
    shm: bool = spec(bool, default=False)
    augment: bool = spec(bool, default=True)


@dataclass(frozen=True)
class Credit(Message):
    """The trainer took `n` more batches: the server may send `n` more."""

    TYPE = "credit"
    n: int = spec(int, lo=1, hi=INT32_MAX)


@dataclass(frozen=True)
class Release(Message):
    """Shared-memory slots the client no longer uses."""

    TYPE = "release"
    slots: list[int] = spec(list, max_len=MAX_RELEASE_SLOTS, items=item(int, lo=0, hi=MAX_ARENA_SLOTS - 1))


@dataclass(frozen=True)
class Ping(Message):
    TYPE = "ping"


@dataclass(frozen=True)
class Bye(Message):
    TYPE = "bye"


@dataclass(frozen=True)
class HealthRequest(Message):
    TYPE = "health"


@dataclass(frozen=True)
class StatsRequest(Message):
    TYPE = "stats"


# ----------------------------------------------------------------------------- server -> client
@dataclass(frozen=True)
class ArenaHandle(Message):
    """Where a session's shared-memory arena is: fd `fd` of server process `pid` (a sealed memfd), also
    handed over once, to whoever presents `token`, on the channel beside an ipc:// socket."""

    TYPE = "arena"
    id: int = spec(int, lo=0, hi=INT63_MAX)
    pid: int = spec(int, lo=1, hi=INT32_MAX)
    fd: int = spec(int, lo=0, hi=INT32_MAX)
    inode: int = spec(int, lo=0, hi=2**64 - 1)
    slots: int = spec(int, lo=1, hi=MAX_ARENA_SLOTS)
    stride: int = spec(int, lo=1, hi=1 << 40)
    # The key to this arena on the server's descriptor channel (`shm.receive_arena`): hex of 16 random bytes.
    token: str | None = spec(str, type(None), default=None, max_len=64, text=True)

    @property
    def path(self) -> str:
        """The /proc path the client opens; built here, never taken from the peer."""
        return f"/proc/{self.pid}/fd/{self.fd}"


@dataclass(frozen=True)
class ShmRef(Message):
    """Arrays of a batch that live in a shared-memory slot instead of in frames."""

    TYPE = "shm"
    slot: int = spec(int, lo=0, hi=MAX_ARENA_SLOTS - 1)
    arrays: list[list[Any]] = spec(list, max_len=1, items=_ARRAY_DESC)


@dataclass(frozen=True)
class Welcome(Message):
    """The stream's metadata, sent once in reply to a `Hello`."""

    TYPE = "welcome"
    num_samples: int = spec(int, lo=0, hi=INT63_MAX)
    num_classes: int | None = spec(int, type(None), lo=1, hi=INT63_MAX)  # None: labels are not classes
    batch_size: int = spec(int, lo=1, hi=INT32_MAX)
    steps_per_epoch: int = spec(int, lo=1, hi=INT32_MAX)
    rank: int = spec(int, lo=0, hi=MAX_WORLD_SIZE - 1)
    world_size: int = spec(int, lo=1, hi=MAX_WORLD_SIZE)
    seed: int = spec(int, lo=0, hi=INT63_MAX)
    epoch: int = spec(int, lo=0, hi=INT32_MAX)
    batch: int = spec(int, lo=0, hi=INT32_MAX)
    mode: str = spec(str, max_len=16, text=True)
    in_order: bool = spec(bool)
    drop_last: bool = spec(bool)
    x_shape: list[int] = spec(list, max_len=8, items=item(int, lo=0, hi=1 << 40))
    x_dtype: str = spec(str, max_len=8, text=True)
    layout: str = spec(str, max_len=8, text=True)
    color: str = spec(str, max_len=8, text=True)
    class_names: list[str] | None = spec(list, type(None), max_len=1 << 20, items=item(str, max_len=1024))
    fingerprint: str = spec(str, max_len=_FINGERPRINT_CHARS, text=True)
    heartbeat_s: float = spec(float, lo=0.001, hi=3600.0)
    max_message_bytes: int = spec(int, lo=1, hi=1 << 40)
    shm: ArenaHandle | None = spec(dict, type(None), default=None, nested=ArenaHandle)


@dataclass(frozen=True)
class Batch(Message):
    """One batch: its place in the stream, and its arrays (frames follow the header)."""

    TYPE = "batch"
    epoch: int = spec(int, lo=0, hi=INT32_MAX)
    batch: int = spec(int, lo=0, hi=INT32_MAX)
    steps: int = spec(int, lo=1, hi=INT32_MAX)
    arrays: list[list[Any]] = spec(list, max_len=64, items=_ARRAY_DESC)
    shm: ShmRef | None = spec(dict, type(None), default=None, nested=ShmRef)


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = "heartbeat"


@dataclass(frozen=True)
class Error(Message):
    """A refused request or a failed batch. `kind` selects the exception the client raises."""

    TYPE = "error"
    kind: str = spec(str, max_len=32, text=True)
    message: str = spec(str, max_len=_MAX_TEXT)
    path: str | None = spec(str, type(None), default=None, max_len=4096)
    reason: str | None = spec(str, type(None), default=None, max_len=1024)
    traceback: str | None = spec(str, type(None), default=None, max_len=_MAX_TEXT)
    exit_code: int | None = spec(int, type(None), default=None, lo=-256, hi=256)


@dataclass(frozen=True)
class Goodbye(Message):
    """The server stops on purpose (SIGTERM, SIGINT): no more batches will come."""

    TYPE = "goodbye"
    reason: str = spec(str, max_len=1024)


@dataclass(frozen=True)
class HealthReply(Message):
    TYPE = "health"
    ok: bool = spec(bool)
    workers_ready: int = spec(int, lo=0, hi=INT32_MAX)
    workers: int = spec(int, lo=0, hi=INT32_MAX)
    clients: int = spec(int, lo=0, hi=INT32_MAX)
    batches_sent: int = spec(int, lo=0, hi=INT63_MAX)


@dataclass(frozen=True)
class StatsReply(Message):
    TYPE = "stats"
    stats: dict[str, Any] = spec(dict)


def _table(*classes: type[Message]) -> dict[str, type[Message]]:
    return {c.TYPE: c for c in classes}


#: What a server accepts from a client.
CLIENT_REQUESTS = _table(Hello, Credit, Release, Ping, Bye, HealthRequest, StatsRequest)
#: What a client accepts while it waits for its welcome.
HANDSHAKE_REPLIES = _table(Welcome, Error, Heartbeat, Goodbye)
#: What a client accepts on an open stream.
STREAM_MESSAGES = _table(Batch, Heartbeat, Error, Goodbye)
#: Answers to the requests that open no session.
HEALTH_REPLIES = _table(HealthReply, Error, Goodbye)
STATS_REPLIES = _table(StatsReply, Error, Goodbye)
