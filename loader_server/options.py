"""The settings carved into small option groups, one per consumer.

`ServerConfig` (config.py) stays the one flat definition of every setting: its flag, default,
help and validation. Each group below names a subset of its fields, by the same names; every
field belongs to exactly one group (checked when config.py is imported). A step of the sample
path is built from its own group only, never from the whole config:

==================  ====================================================  ================
group               consumer                                              shapes batches
==================  ====================================================  ================
DataOptions         load_dataset: which samples (kinds, subset)           by the data set's
                                                                          own fingerprint
SamplingOptions     the sampling plan: which samples form a batch          yes
DecodeOptions       the decode step: a sample's pixels as decoded          yes (and the
                    (and the record size of ``--cache-size``)             cache key)
AugmentOptions      the augment step                                       yes
UserCodeOptions     ``--transform`` and ``--collate``                      yes
OutputOptions       the finish step: dtype, layout, normalisation          yes
ErrorOptions        what a worker does with a bad sample                   yes
ReadOptions         the read step: bounds and read-ahead                   no
CacheOptions        where decoded records are kept                         no
ServeOptions        the runtime: sockets, workers, sessions, limits        no
LogOptions          logs and metrics                                       no
==================  ====================================================  ================

The fingerprint that guards a resume hashes the groups that shape batches; the cache key
hashes `DecodeOptions` (the decode step reads nothing else, so a setting that changes a
record's pixels is in the key by construction) with the data set's fingerprint and its
location (`ByteDataset.location`: where the bytes are, which a resume may change but a cached
record may not). There are no deny-lists: a new setting goes into the group of the step that
reads it, and its place in the fingerprint follows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "GROUPS",
    "AugmentOptions",
    "CacheOptions",
    "DataOptions",
    "DecodeOptions",
    "ErrorOptions",
    "LogOptions",
    "OutputOptions",
    "PipelineOptions",
    "ReadOptions",
    "SamplingOptions",
    "ServeOptions",
    "UserCodeOptions",
    "check_partition",
    "group_hash",
    "options_of",
]


@dataclass(frozen=True)
class DataOptions:
    """Which data set and which samples of it (each kind reads its own)."""

    shapes_batches: ClassVar[bool] = False  # the data set's fingerprint covers them
    data: str
    labels: str | None = None
    offsets: str | None = None
    maxlen: int | None = None
    pad: str = "pre"
    truncate: str = "pre"
    subset: str = "all"
    val_fraction: float = 0.0
    split_seed: int = 0
    image_column: str = "image"
    label_column: str = "label"
    page_cache_mb: float = 64.0
    json_label: str | None = None
    index_dir: str | None = None
    remote_attempts: int = 8
    remote_timeout_s: float = 30.0
    remote_inflight_mb: float = 64.0
    remote_recheck_s: float = 60.0


@dataclass(frozen=True)
class SamplingOptions:
    shapes_batches: ClassVar[bool] = True
    batch_size: int = 32
    mode: str = "epoch"
    shuffle: bool = True
    drop_last: bool = True
    steps_per_epoch: int | None = None


@dataclass(frozen=True)
class DecodeOptions:
    """Everything that decides a decoded sample's pixels: the decode step reads these and nothing else."""

    shapes_batches: ClassVar[bool] = True
    size: tuple[int, int] = (224, 224)  # (width, height)
    resize: str = "stretch"
    interpolation: str = "linear"
    pad_value: int = 0
    color: str = "rgb"
    reduced_decode: bool = True
    max_pixels: int = 178_956_970
    cache_size: int | None = None  # the record's shorter side (centre region) for a source-stage crop

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def record_shape(self) -> tuple[int, int, int]:
        """(height, width, channels) of a record: the output size, or with `cache_size` S the output's
        aspect ratio at shorter side S (the centre region, as ``--resize crop`` cuts it)."""
        w, h = self.size
        if self.cache_size is None:
            return h, w, self.channels
        short = min(w, h)
        return round(h * self.cache_size / short), round(w * self.cache_size / short), self.channels

    def for_record(self) -> DecodeOptions:
        """The options that decode a record: these, or with `cache_size` a centre crop at the record size."""
        if self.cache_size is None:
            return self
        h, w, _ = self.record_shape
        return dataclasses.replace(self, size=(w, h), resize="crop", cache_size=None)


@dataclass(frozen=True)
class AugmentOptions:
    shapes_batches: ClassVar[bool] = True
    augment: str | None = None


@dataclass(frozen=True)
class UserCodeOptions:
    shapes_batches: ClassVar[bool] = True
    transform: str | None = None
    collate: str | None = None


@dataclass(frozen=True)
class OutputOptions:
    shapes_batches: ClassVar[bool] = True
    dtype: str = "uint8"
    layout: str = "hwc"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ErrorOptions:
    shapes_batches: ClassVar[bool] = True  # skip mode replaces samples
    on_error: str = "raise"


@dataclass(frozen=True)
class ReadOptions:
    shapes_batches: ClassVar[bool] = False
    max_file_bytes: int = 256 << 20
    read_threads: int | None = None
    read_connections: int = 4
    simulate_read_latency_ms: float = 0.0


@dataclass(frozen=True)
class CacheOptions:
    shapes_batches: ClassVar[bool] = False  # where records live; what they hold is DecodeOptions
    cache: str | None = None


@dataclass(frozen=True)
class ServeOptions:
    shapes_batches: ClassVar[bool] = False
    workers: int | str = 1  # a count, or "auto" (the next four)
    workers_min: int | None = None
    workers_max: int | None = None
    target_stall: float = 0.02
    scale_interval_s: float = 3.0
    share_window: int | None = None
    seed: int = 0  # the default seed: a client's own seed is part of its state, not of the fingerprint
    bind: str = "tcp://127.0.0.1:5555"
    curve_dir: str | None = None
    insecure: bool = False
    ipc_mode: str = "0600"
    prefetch: int | None = None
    read_ahead_tasks: int = 2
    in_order: bool = True
    shm: bool = True
    max_clients: int = 64
    max_clients_per_peer: int = 16
    max_connections_per_host: int = 256
    max_message_bytes: int = 1 << 30
    batch_timeout_s: float = 120.0
    heartbeat_s: float = 1.0
    client_timeout_s: float = 30.0
    max_bad: float = 0.001
    scan: bool | None = None  # the start-up scan of the data set's files (None: auto, by size)


@dataclass(frozen=True)
class LogOptions:
    shapes_batches: ClassVar[bool] = False
    log_level: str = "INFO"
    log_format: str = "text"
    log_interval_s: float = 30.0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


#: Every group; together they hold every setting of ServerConfig exactly once.
GROUPS: tuple[type[Any], ...] = (DataOptions, SamplingOptions, DecodeOptions, AugmentOptions, UserCodeOptions,
                            OutputOptions, ErrorOptions, ReadOptions, CacheOptions, ServeOptions, LogOptions)


G = TypeVar("G")


def options_of(settings: Any, group: type[G]) -> G:
    """The `group` part of `settings` (a ServerConfig, or already a `group`)."""
    if isinstance(settings, group):
        return settings
    return group(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(group)})  # type: ignore[arg-type]


def group_hash(*groups: Any, extra: dict[str, Any] | None = None) -> str:
    """A short stable hash of option groups (by group name and every field), plus `extra`."""
    blob = {type(g).__name__: dataclasses.asdict(g) for g in groups}
    if extra:
        blob.update(extra)
    text = json.dumps(blob, sort_keys=True, default=list)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def check_partition(setting_names: list[str]) -> None:
    """Raise if a setting belongs to no group, or to two, or a group names a setting that does not exist."""
    owners: dict[str, list[str]] = {}
    for group in GROUPS:
        for f in dataclasses.fields(group):
            owners.setdefault(f.name, []).append(group.__name__)
    missing = [n for n in setting_names if n not in owners]
    twice = {n: g for n, g in owners.items() if len(g) > 1}
    unknown = sorted(set(owners) - set(setting_names))
    if missing or twice or unknown:
        raise RuntimeError(f"settings and option groups disagree (loader_server/options.py): in no group {missing}, "
                           f"in several {twice}, not a setting {unknown}")


@dataclass(frozen=True)
class PipelineOptions:
    """What a worker's steps need, and nothing else: the groups of the sample path."""

    decode: DecodeOptions
    read: ReadOptions = ReadOptions()
    augment: AugmentOptions = AugmentOptions()
    user_code: UserCodeOptions = UserCodeOptions()
    output: OutputOptions = OutputOptions()
    errors: ErrorOptions = ErrorOptions()

    @classmethod
    def of(cls, settings: Any) -> PipelineOptions:
        """The pipeline's groups of a ServerConfig (or `settings` itself when it already is one)."""
        if isinstance(settings, PipelineOptions):
            return settings
        return cls(decode=options_of(settings, DecodeOptions), read=options_of(settings, ReadOptions),
                   augment=options_of(settings, AugmentOptions), user_code=options_of(settings, UserCodeOptions),
                   output=options_of(settings, OutputOptions), errors=options_of(settings, ErrorOptions))
