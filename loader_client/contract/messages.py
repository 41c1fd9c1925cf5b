"""Every message between a client and a server, defined once and used by both ends.

Client -> server: `Hello` (open a stream, first credit, the share to join), `Credit` and `Ping`
(with the trainer's stall), `Release` (shared-memory slots given back), `Bye`; `HealthRequest`,
`StatsRequest` and `SourcesRequest` open no session.
Server -> client: `Welcome` (the stream's metadata), `Batch` (with its `Manifest` when the hello
asked for one), `Heartbeat`, `Error`, `Goodbye` (the server stops on purpose), `HealthReply`,
`StatsReply`, `SourcesReply`.

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

from .sampling import SamplingPlan
from .schema import INT32_MAX, INT63_MAX, Message, item, spec

__all__ = [
    "ARENA_KEY_BYTES",
    "CLIENT_REQUESTS",
    "HANDSHAKE_REPLIES",
    "HEALTH_REPLIES",
    "MAX_ARENA_SLOTS",
    "MAX_BAD_NAMED",
    "MAX_CREDIT",
    "MAX_DRAWN_OPS",
    "MAX_MANIFEST_SAMPLES",
    "MAX_MANIFEST_SOURCE_CHARS",
    "MAX_NAME_CHARS",
    "MAX_RELEASE_SLOTS",
    "MAX_REPORTED_S",
    "MAX_SOURCES",
    "MAX_SOURCE_CHARS",
    "MAX_WORLD_SIZE",
    "SOURCES_REPLIES",
    "STATS_REPLIES",
    "STREAM_MESSAGES",
    "ArenaHandle",
    "BadFile",
    "Batch",
    "Bye",
    "Credit",
    "Drawn",
    "Error",
    "Goodbye",
    "HealthReply",
    "HealthRequest",
    "Heartbeat",
    "Hello",
    "Manifest",
    "Ping",
    "Release",
    "SampleManifest",
    "ShmRef",
    "SourcesReply",
    "SourcesRequest",
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
#: Largest cumulative wait or wall time (seconds) a client reports: about 31 years.
MAX_REPORTED_S = 1e9
#: Random bytes of the key a client gives for its arena (`Hello.shm_key`).
ARENA_KEY_BYTES = 16
#: Keys an arena holds after its last slot (one page of 32-byte entries): one per member of a share.
MAX_ARENA_KEYS = 128
#: Most bad files one error names in its list (the message says how many there were in all).
MAX_BAD_NAMED = 64
#: Most sample indices one sources request names (the client asks for more in several requests): the
#: reply, at most MAX_SOURCES x MAX_SOURCE_CHARS, stays inside a header (protocol.MAX_HEADER_BYTES).
MAX_SOURCES = 200
#: Longest source of a sample (a path, ``shard.tar:member``, ``file.parquet:row``).
MAX_SOURCE_CHARS = 4096
#: Most samples a batch manifest describes: a stream with larger batches cannot ask for one.
MAX_MANIFEST_SAMPLES = 1024
#: Longest source in a manifest (longer ones are cut in the middle; `SourcesRequest` gives them whole). With
#: the other bounds, a manifest stays well inside a header (protocol.MAX_HEADER_BYTES).
MAX_MANIFEST_SOURCE_CHARS = 512
#: Most augmentations one sample's manifest lists, and numbers each one drew.
MAX_DRAWN_OPS = 16
_MAX_DRAWN_VALUES = 8
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
    # Join the share of this name (server: runtime/shares.py): trainers asking for the same stream
    # (the same rank, world size, seed and augmentation) get every batch built once for all of them.
    share: str | None = spec(str, type(None), default=None, max_len=MAX_NAME_CHARS, text=True)
    # With `shm`: fresh random bytes (hex) the server writes into the arena it creates for this
    # stream, so that the client maps no arena but its own (`shm.open_arena`).
    shm_key: str | None = spec(str, type(None), default=None, max_len=2 * ARENA_KEY_BYTES,
                               pattern=f"[0-9a-f]{{{2 * ARENA_KEY_BYTES}}}")
    manifest: bool = spec(bool, default=False)  # every batch with its Manifest


@dataclass(frozen=True)
class Credit(Message):
    """The trainer took `n` more batches: the server may send `n` more.

    `wait_s` and `wall_s` (both or neither) report the trainer's stall: the seconds it has spent
    waiting in ``next()`` and the seconds since its stream opened, both cumulative on the
    client's clock; the server takes their growth over a few seconds as this trainer's stall
    (what ``--workers auto`` keeps under ``--target-stall``).
    """

    TYPE = "credit"
    n: int = spec(int, lo=1, hi=INT32_MAX)
    wait_s: float | None = spec(float, type(None), default=None, lo=0.0, hi=MAX_REPORTED_S)
    wall_s: float | None = spec(float, type(None), default=None, lo=0.0, hi=MAX_REPORTED_S)


@dataclass(frozen=True)
class Release(Message):
    """Shared-memory slots the client no longer uses."""

    TYPE = "release"
    slots: list[int] = spec(list, max_len=MAX_RELEASE_SLOTS, items=item(int, lo=0, hi=MAX_ARENA_SLOTS - 1))


@dataclass(frozen=True)
class Ping(Message):
    """The client is alive (and idle); `wait_s`/`wall_s` report its stall, as in `Credit`."""

    TYPE = "ping"
    wait_s: float | None = spec(float, type(None), default=None, lo=0.0, hi=MAX_REPORTED_S)
    wall_s: float | None = spec(float, type(None), default=None, lo=0.0, hi=MAX_REPORTED_S)


@dataclass(frozen=True)
class Bye(Message):
    TYPE = "bye"


@dataclass(frozen=True)
class HealthRequest(Message):
    TYPE = "health"


@dataclass(frozen=True)
class StatsRequest(Message):
    TYPE = "stats"


@dataclass(frozen=True)
class SourcesRequest(Message):
    """Where samples come from: the source of each of `indices` (indices of the served data set)."""

    TYPE = "sources"
    indices: list[int] = spec(list, max_len=MAX_SOURCES, items=item(int, lo=0, hi=INT63_MAX))


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
    # Where this client's key is in the arena's key table (a share's arena holds one per member).
    key_slot: int = spec(int, lo=0, hi=MAX_ARENA_KEYS - 1, default=0)

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
    shuffle: bool = spec(bool)
    x_shape: list[int] = spec(list, max_len=8, items=item(int, lo=0, hi=1 << 40))
    x_dtype: str = spec(str, max_len=8, text=True)
    layout: str = spec(str, max_len=8, text=True)
    color: str = spec(str, max_len=8, text=True)
    class_names: list[str] | None = spec(list, type(None), max_len=1 << 20, items=item(str, max_len=1024))
    fingerprint: str = spec(str, max_len=_FINGERPRINT_CHARS, text=True)
    heartbeat_s: float = spec(float, lo=0.001, hi=3600.0)
    max_message_bytes: int = spec(int, lo=1, hi=1 << 40)
    shm: ArenaHandle | None = spec(dict, type(None), default=None, nested=ArenaHandle)
    share: str | None = spec(str, type(None), default=None, max_len=MAX_NAME_CHARS, text=True)  # the share joined

    def plan(self) -> SamplingPlan:
        """The sampling plan these settings describe: which samples each batch of the stream holds
        (keeping the orders of two epochs: a stream spans two at most)."""
        return SamplingPlan(self.num_samples, self.batch_size, mode=self.mode, shuffle=self.shuffle,
                            drop_last=self.drop_last, steps_per_epoch=self.steps_per_epoch, orders_kept=2)


@dataclass(frozen=True)
class Drawn(Message):
    """What one augmentation drew for one sample: ``rrc`` [x, y, w, h] of the region it took (of the source,
    or of the record with --cache-size), ``flip`` [1] or [0], ``jitter`` [brightness, contrast, saturation]
    factors, ``rotate`` [degrees], ``cutout`` [x, y, w, h] or [] when it did not apply."""

    TYPE = "drawn"
    op: str = spec(str, max_len=32, text=True)
    values: list[float] = spec(list, max_len=_MAX_DRAWN_VALUES, items=item(int, float))


@dataclass(frozen=True)
class SampleManifest(Message):
    """One sample of a batch: its index, its source (cut to MAX_MANIFEST_SOURCE_CHARS), its draws in order."""

    TYPE = "sample"
    index: int = spec(int, lo=0, hi=INT63_MAX)
    source: str = spec(str, max_len=MAX_MANIFEST_SOURCE_CHARS)
    augment: list[Drawn] = spec(list, default_factory=list, max_len=MAX_DRAWN_OPS, items=item(dict, nested=Drawn))


@dataclass(frozen=True)
class Manifest(Message):
    """What a batch holds, sample by sample, in batch order: for audits and for replaying a step."""

    TYPE = "manifest"
    epoch: int = spec(int, lo=0, hi=INT32_MAX)
    batch: int = spec(int, lo=0, hi=INT32_MAX)
    samples: list[SampleManifest] = spec(list, max_len=MAX_MANIFEST_SAMPLES, items=item(dict, nested=SampleManifest))


@dataclass(frozen=True)
class Batch(Message):
    """One batch: its place in the stream, and its arrays (frames follow the header)."""

    TYPE = "batch"
    epoch: int = spec(int, lo=0, hi=INT32_MAX)
    batch: int = spec(int, lo=0, hi=INT32_MAX)
    steps: int = spec(int, lo=1, hi=INT32_MAX)
    arrays: list[list[Any]] = spec(list, max_len=64, items=_ARRAY_DESC)
    shm: ShmRef | None = spec(dict, type(None), default=None, nested=ShmRef)
    manifest: Manifest | None = spec(dict, type(None), default=None, nested=Manifest)


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = "heartbeat"


@dataclass(frozen=True)
class BadFile(Message):
    """One bad file (or member, or row) of a batch: what names it, and the stable code of what is wrong."""

    TYPE = "bad_file"
    path: str = spec(str, max_len=4096)
    reason: str = spec(str, max_len=64, text=True)


@dataclass(frozen=True)
class Error(Message):
    """A refused request or a failed batch. `kind` selects the exception the client raises.

    A batch with bad files names the first in `path` and `reason`, and every one, up to
    `MAX_BAD_NAMED`, in `bad`; `bad_count` is how many there were in all.
    """

    TYPE = "error"
    kind: str = spec(str, max_len=32, text=True)
    message: str = spec(str, max_len=_MAX_TEXT)
    path: str | None = spec(str, type(None), default=None, max_len=4096)
    reason: str | None = spec(str, type(None), default=None, max_len=1024)
    traceback: str | None = spec(str, type(None), default=None, max_len=_MAX_TEXT)
    exit_code: int | None = spec(int, type(None), default=None, lo=-256, hi=256)
    bad: list[BadFile] | None = spec(list, type(None), default=None, max_len=MAX_BAD_NAMED,
                                     items=item(dict, nested=BadFile))
    bad_count: int | None = spec(int, type(None), default=None, lo=0, hi=INT32_MAX)


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


@dataclass(frozen=True)
class SourcesReply(Message):
    """The source of each asked index, in order; the data set (`dataset`) and its version (its fingerprint)."""

    TYPE = "sources"
    sources: list[str] = spec(list, max_len=MAX_SOURCES, items=item(str, max_len=MAX_SOURCE_CHARS))
    dataset: str = spec(str, max_len=MAX_SOURCE_CHARS)
    version: str = spec(str, max_len=64, text=True)


def _table(*classes: type[Message]) -> dict[str, type[Message]]:
    return {c.TYPE: c for c in classes}


#: What a server accepts from a client.
CLIENT_REQUESTS = _table(Hello, Credit, Release, Ping, Bye, HealthRequest, StatsRequest, SourcesRequest)
#: What a client accepts while it waits for its welcome.
HANDSHAKE_REPLIES = _table(Welcome, Error, Heartbeat, Goodbye)
#: What a client accepts on an open stream.
STREAM_MESSAGES = _table(Batch, Heartbeat, Error, Goodbye)
#: Answers to the requests that open no session.
HEALTH_REPLIES = _table(HealthReply, Error, Goodbye)
STATS_REPLIES = _table(StatsReply, Error, Goodbye)
SOURCES_REPLIES = _table(SourcesReply, Error, Goodbye)
