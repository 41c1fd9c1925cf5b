"""Server settings: one frozen dataclass, validated once at start-up.

Each field is the one definition of its setting: its default, its type, its choices, its
help text and the form of its command-line flag live in the field (``setting(...)``); the
command line (cli.py), the TOML file and the ``LOADER_*`` environment (layered.py) are built
from them. Nothing derived from the data set is stored here: the shape and dtype of a batch
are a `BatchSpec` (batch_spec.py), derived from a config and a data set.

Every message names the setting, the rule and the value given, so that a user can fix the
command line without reading code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, TypeVar

from loader_client.contract.errors import ConfigError

from .options import GROUPS, check_partition, group_hash, options_of

G = TypeVar("G")

__all__ = [
    "AUTO_READ_THREADS",
    "AUTO_SCAN_LIMIT",
    "DATA_SETTINGS",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "SLOW_READ_S",
    "SUBSETS",
    "ServerConfig",
    "default_workers",
    "is_local_bind",
    "parse_floats",
    "parse_max_bad",
    "parse_size",
    "parse_workers",
    "setting",
]

RESIZE_MODES = ("stretch", "letterbox", "crop")
INTERPOLATIONS = ("nearest", "linear", "area", "cubic", "lanczos")
COLORS = ("rgb", "bgr", "gray")
DTYPES = ("uint8", "float32")
LAYOUTS = ("hwc", "chw")
SAMPLING_MODES = ("epoch", "random")
SUBSETS = ("all", "train", "val")
#: Modes of an ipc:// socket file: the owner only, or also the server's group (never other users).
IPC_MODES = ("0600", "0660")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

#: Batches built ahead per client when `prefetch` is unset: at least this many ...
MIN_PREFETCH = 8
#: ... and this many per worker: a client alone keeps every worker busy.
PREFETCH_PER_WORKER = 2
#: Read threads a worker starts when reads turn out slow (read_threads unset).
AUTO_READ_THREADS = 64
#: Average read time above which a worker moves reads to its thread pool (read_threads unset).
SLOW_READ_S = 0.002
#: HTTP/1.1 connections per worker on which s3:// and http(s):// range reads are pipelined (read_connections).
DEFAULT_READ_CONNECTIONS = 4

#: Data sets of at most this many files are scanned at start-up unless `scan` says otherwise.
AUTO_SCAN_LIMIT = 100_000
#: The settings that choose the samples: every command that opens a data set takes these.
DATA_SETTINGS = ("data", "labels", "offsets", "maxlen", "pad", "truncate", "subset", "val_fraction", "split_seed",
                 "image_column", "label_column", "page_cache_mb", "json_label", "index_dir", "remote_attempts",
                 "remote_timeout_s", "remote_inflight_mb", "remote_recheck_s")


def is_local_bind(endpoint: str) -> bool:
    """ipc:// endpoints and tcp:// on loopback addresses are not reachable from other hosts."""
    if endpoint.startswith("ipc://"):
        return True
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def default_workers() -> int:
    """CPU count minus one (left for the server and the trainer), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def parse_workers(value: Any) -> int | str:
    """A worker count (``4``), or ``auto``: the server sizes itself (--workers-min .. --workers-max)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"`workers` must be a whole number or auto, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`workers` must be a whole number or auto, got {value!r}") from None


def parse_max_bad(text: Any) -> float:
    """``100`` (files), ``0.5%`` or ``0.005`` (fraction of the index) into a float."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        text = str(text).strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ConfigError(f"`max_bad` must be a count (100), a percentage (0.5%) or a fraction (0.005), "
                              f"got {text!r}") from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise ConfigError(f"`max_bad` must be a whole count >= 1 or a fraction in [0, 1), got {text!r}")
    return value


def parse_size(text: Any) -> tuple[int, int]:
    """Parse ``WxH`` (width x height, the order cv2.resize takes), ``W,H``, or a [W, H] pair, into a tuple."""
    if isinstance(text, (list, tuple)) and len(text) == 2 and all(isinstance(v, int) for v in text):
        return int(text[0]), int(text[1])
    m = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"`size` must look like WIDTHxHEIGHT, for example 224x224, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def parse_floats(value: Any) -> tuple[float, ...]:
    """``0.5,0.5,0.5`` or a list of numbers into a tuple of floats."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(float(v) for v in items)


def setting(default: Any = MISSING, *, help: str, default_factory: Callable[[], Any] | None = None,
            choices: tuple[str, ...] | None = None, parse: Callable[[Any], Any] | None = None,
            flags: dict[str, tuple[bool, str]] | None = None, shown: str | None = None,
            metavar: str | None = None, cli: bool = True, format: Callable[[Any], Any] | None = None) -> Any:
    """A config field together with everything the command line, the file and the environment need.

    `help`: the flag's help text. `choices`: the allowed values (checked in `validate` and by
    argparse). `parse`: converts a string from a flag or the environment, or a TOML value, when
    the field's type is not enough. `flags`: for booleans, the flags that set them, each with
    the value it sets and its help (``{"--no-shuffle": (False, "...")}``); other settings get
    ``--name-with-dashes``. `shown`: the default as ``--help`` shows it, when not the value
    itself. `format`: the value as `--print-config` writes it in TOML, when not the value itself
    (`parse` reads it back). `cli=False`: file and environment only.
    """
    metadata = {"help": help, "choices": choices, "parse": parse, "flags": flags, "shown": shown,
                "metavar": metavar, "cli": cli, "format": format}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know; `validate()` is called by `__post_init__`."""

    data: str = setting(
        help="the data set: a list file of `path label` (or `path,label`) lines, a folder of class sub-folders, "
             "tar shards in the WebDataset layout ('shards/train-{000000..000099}.tar', a folder of .tar files, "
             "or shard paths joined by ::), Parquet tables ('train-*.parquet' or a folder of them), or numpy "
             "arrays (x.npy with --labels, arrays.npz, or a folder of x_*.npy/y_*.npy shards)",
        shown="required")
    labels: str | None = setting(None, help="array data: labels .npy, one per row of --data x.npy")
    offsets: str | None = setting(
        None, help="ragged array data: offsets .npy (n + 1 positions) into the values of --data")
    maxlen: int | None = setting(None, help="ragged array data: pad or truncate sequences to this length")
    pad: Literal["pre", "post"] = setting("pre", choices=("pre", "post"), help="ragged: where padding goes")
    truncate: Literal["pre", "post"] = setting("pre", choices=("pre", "post"), help="ragged: which end is cut")
    image_column: str = setting(
        "image", help="Parquet tables: the image column (a struct of bytes and path, as Hugging Face datasets "
                      "writes it, or plain binary)")
    label_column: str = setting("label", help="Parquet tables: the integer label column")
    page_cache_mb: float = setting(
        64.0, help="Parquet tables: decompressed pages each worker keeps, at most (MB; 0: none), for pages of "
                   "zstd, gzip, brotli or lz4, whose rows cost their whole page's decompression (a zstd, gzip or "
                   "brotli page larger than this is read by its stream up to the row, never held); snappy pages "
                   "(the default) and uncompressed ones are read a row at a time and use none of it")
    json_label: str | None = setting(
        None, metavar="FIELD", shown="off (labels from .cls)",
        help="tar shards: take each sample's label from this field of its .json member instead of its .cls member")
    index_dir: str | None = setting(
        None, metavar="DIR", shown="beside the data, else ~/.cache/loader-service",
        help="tar shards and Parquet tables: where the member index is kept, so that a restart does not rebuild it")
    remote_attempts: int = setting(
        8, help="s3:// and http(s):// data: attempts per request; timeouts, dropped connections, 5xx and 503 "
                "SlowDown are retried with exponential backoff (0.2 s doubling to 10 s) and full jitter, then the "
                "sample is a bad file (the error names the URL, the status and the attempts)")
    remote_timeout_s: float = setting(30.0, help="s3:// and http(s):// data: the limit of one request attempt")
    remote_inflight_mb: float = setting(
        64.0, help="s3:// and http(s):// data: bytes of range requests in flight per worker, at most (MB); the "
                   "read-ahead threads wait beyond it")
    remote_recheck_s: float = setting(
        60.0, help="s3:// and http(s):// data: how often a worker asks the store whether an object changed since "
                   "it was indexed (one listing per folder, in the background: the last known state answers "
                   "meanwhile; 0: on every use, at once), before serving its decoded record from --cache")
    subset: Literal["all", "train", "val"] = setting(
        "all", choices=SUBSETS,
        help="serve part of the data set: `val` is a fixed random --val-fraction of it, `train` the rest "
             "(chosen by --split-seed), so a training and a validation server never share a sample")
    val_fraction: float = setting(
        0.0, help="share of the samples in the `val` subset, between 0 and 1 (needed with --subset train|val)")
    split_seed: int = setting(0, help="seed of the train/val split (independent of --seed, the shuffle)")
    batch_size: int = setting(32, help="samples per batch")
    size: tuple[int, int] = setting((224, 224), parse=parse_size, format=lambda v: f"{v[0]}x{v[1]}",
                                    shown="224x224", metavar="WxH",
                                    help="output WIDTHxHEIGHT, as cv2.resize takes it")  # (width, height)
    workers: int | str = setting(
        default_factory=default_workers, parse=parse_workers, shown=f"CPUs - 1, {default_workers()} here",
        metavar="N|auto",
        help="worker processes; auto: as many as keep every trainer's data stall under --target-stall, from "
             "--workers-min to --workers-max, changed at most every --scale-interval-s")
    workers_min: int | None = setting(None, shown="1", help="--workers auto: the fewest workers")
    workers_max: int | None = setting(
        None, shown="CPUs - 1", help="--workers auto: the most workers (more than the CPUs helps only when reads wait "
                                     "on slow storage)")
    target_stall: float = setting(
        0.02, help="--workers auto: the share of its step time a trainer may wait in next() (its client reports it); "
                   "more adds workers, much less removes them")
    scale_interval_s: float = setting(
        3.0, help="--workers auto: at least this long between two changes of the worker count, each decided on what "
                  "was measured since the last (so the count never swings faster than every 2 intervals)")
    share_window: int | None = setting(
        None, shown="auto",
        help="batches a share (clients that pass share=NAME) keeps behind its leading member for the others; a "
             "member further behind has its batches built again; auto: 2 x prefetch")
    seed: int = setting(0, help="seed of the shuffle; same seed, same batches")
    bind: str = setting("tcp://127.0.0.1:5555", help="endpoint to serve on: tcp://HOST:PORT or ipc://PATH")
    curve_dir: str | None = setting(
        None, help="encrypt and authenticate with CurveZMQ: DIR/server.key_secret and an allow-list of client "
                   "public keys in DIR/clients/*.key (see `loader-server keygen`)")
    insecure: bool = setting(False, help="", flags={
        "--insecure": (True, "allow binding a non-loopback address without CURVE (anyone who reaches it gets data)")})
    ipc_mode: Literal["0600", "0660"] = setting(
        "0600", choices=IPC_MODES,
        help="permissions of an ipc:// socket file (and of its shared-memory channel): 0600, this user only; "
             "0660, also members of the server's group, for a trainer that runs as another user (another "
             "container) in that group")
    prefetch: int | None = setting(
        None, shown="auto",
        help="batches built ahead per client (bounds memory: prefetch x batch bytes); auto: "
             f"max({MIN_PREFETCH}, {PREFETCH_PER_WORKER} x workers), so that one client keeps every worker busy")
    read_ahead_tasks: int = setting(
        2, help="tasks each worker holds beyond the one it builds, their samples read ahead meanwhile (a task is "
                "a batch); for an object store 100 ms away: 6, with --prefetch at least workers x (this + 1) and "
                "--read-threads 256")
    mode: Literal["epoch", "random"] = setting(
        "epoch", choices=SAMPLING_MODES,
        help="epoch: a permutation per epoch; random: draw with replacement, endless")
    shuffle: bool = setting(True, help="", flags={"--no-shuffle": (False, "keep file order in epoch mode")})
    drop_last: bool = setting(True, help="", flags={
        "--drop-last": (True, "drop the short last batch of an epoch (len // batch_size batches)"),
        "--keep-last": (False, "keep the short last batch")})
    steps_per_epoch: int | None = setting(
        None, shown="samples // batch size", help="batches per epoch in random mode")
    in_order: bool = setting(True, help="", flags={
        "--unordered": (False, "send batches as they complete instead of in stream order (faster, not "
                               "reproducible)")})
    resize: Literal["stretch", "letterbox", "crop"] = setting(
        "stretch", choices=RESIZE_MODES,
        help="stretch to WxH, letterbox (keep aspect, pad), or crop (shorter side, centre)")
    interpolation: str = setting("linear", choices=INTERPOLATIONS,
                                 help="resize interpolation (area costs about 6x linear)")
    pad_value: int = setting(0, help="letterbox padding value (0..255)")
    color: Literal["rgb", "bgr", "gray"] = setting("rgb", choices=COLORS, help="channel order of x")
    dtype: Literal["uint8", "float32"] = setting(
        "uint8", choices=DTYPES, help="uint8 pixels, or float32 scaled to [0, 1] (4x the bytes on the wire)")
    layout: Literal["hwc", "chw"] = setting("hwc", choices=LAYOUTS, help="image layout inside a batch")
    reduced_decode: bool = setting(True, help="", flags={
        "--no-reduced-decode": (False, "decode JPEGs whole and at full size, instead of at the cheapest of "
                                       "libjpeg-turbo's M/8 scales that still covers the output (or the crop's "
                                       "output) and, for a crop, only down to the crop")})
    augment: str | None = setting(
        None, help='training augmentations, e.g. "rrc(scale=0.08-1),flip,jitter(0.4),rotate(10),cutout(0.25)"; '
                   "seeded by (seed, epoch, sample); clients that pass augment=False get none")
    transform: str | None = setting(
        None, help="package.module:function(image, rng) -> image, run on every decoded image in the workers")
    collate: str | None = setting(
        None, help="package.module:function(arrays, rng) -> dict of extra per-sample arrays for each batch")
    max_pixels: int = setting(178_956_970,  # Pillow's decompression bomb limit
                              help="refuse larger images before decoding them (decompression bombs)")
    max_file_bytes: int = setting(256 << 20, help="files larger than this (and devices) are bad files, refused "
                                                  "before they are read")
    max_clients: int = setting(64, help="sessions served at once; more clients are refused with a clear error")
    max_clients_per_peer: int = setting(
        16, help="sessions one peer may hold at once (a CURVE key; an address, and on loopback its user; an ipc "
                 "user), so that one peer cannot take every --max-clients place; more are refused naming this")
    max_connections_per_host: int = setting(
        256, help="TCP connections one peer (an address, and on loopback its user) may hold open at once; more "
                  "are refused with an error naming this setting, then closed")
    on_error: Literal["raise", "skip"] = setting(
        "raise", choices=("raise", "skip"),
        help="a bad file: raise (the trainer gets an error naming it) or skip (replace the sample with another "
             "of the same batch, log the file once, count it)")
    max_bad: float = setting(0.001, parse=parse_max_bad, shown="0.1%",
                             help="skip mode: more bad files than this (a count, or a percentage of the index) "
                                  "is an error")
    scan: bool | None = setting(None, help="", shown=f"auto: on up to {AUTO_SCAN_LIMIT:,} files", flags={
        "--scan": (True, "at start-up, stat every file of the data set (list files, class folders) and report the "
                         "missing or unreadable ones before the first batch: exit 2 naming them, or with "
                         "--on-error skip count them against --max-bad and log them"),
        "--no-scan": (False, "no start-up scan: a bad file is met when a worker reads it")})
    shm: bool = setting(True, help="", flags={
        "--no-shm": (False, "never use shared memory, even for clients on this host (frames over the socket)")})
    read_threads: int | None = setting(
        None, shown="auto",
        help="file reads in flight per worker, overlapping slow storage with decoding; 0 reads inline; "
             f"auto: inline while reads are fast, {AUTO_READ_THREADS} threads once they average "
             f"over {SLOW_READ_S * 1000:g} ms; for s3:// and http(s):// data, the reads --read-connections does "
             "not pipeline")
    read_connections: int = setting(
        DEFAULT_READ_CONNECTIONS,
        help="s3:// and http(s):// data: connections per worker on which the range reads of tar members and "
             "uncompressed Parquet values are pipelined (HTTP/1.1, up to 32 requests sent before their answers); "
             "0: one request per read thread, as with local data; no effect on local data, nor with "
             "--simulate-read-latency-ms")
    simulate_read_latency_ms: float = setting(
        0.0, help="benchmark option: add this latency to every file read (simulates network storage; turns off "
                  "--read-connections pipelining, so that every read waits it)")
    mean: tuple[float, ...] | None = setting(None, parse=parse_floats, metavar="M,M,M",
                                             help="per-channel mean, float32 only: (x/255-mean)/std")
    std: tuple[float, ...] | None = setting(None, parse=parse_floats, metavar="S,S,S",
                                            help="per-channel std, float32 only")
    batch_timeout_s: float = setting(
        120.0, help="a worker that makes no progress on a batch this long is hung: its stack is logged, "
                    "it is killed and replaced, and the batch is built again")
    heartbeat_s: float = setting(1.0, help="heartbeat interval to idle clients")
    client_timeout_s: float = setting(30.0, help="drop a client silent for this long (its trainer died)")
    max_message_bytes: int = setting(1 << 30, help="largest message accepted from a worker (a batch)")
    log_level: str = setting("INFO", choices=LOG_LEVELS, help="log messages of this level and above")
    log_format: Literal["text", "json"] = setting(
        "text", choices=("text", "json"), help="json: one JSON object per line, for log collectors")
    log_interval_s: float = setting(30.0, help="log a throughput line this often (0: never)")
    metrics_port: int | None = setting(
        None, shown="off", help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics")
    metrics_host: str = setting(
        "127.0.0.1", help="address the Prometheus endpoint binds (0.0.0.0 for a scraper on another host)")
    cache: str | None = setting(
        None, metavar="DIR|memory", shown="off",
        help="keep every decoded sample (uint8, after the resize) in a memory-mapped file in DIR on a local disk "
             "(shared by every server using DIR; `loader-server cache build` fills it ahead) or in `memory` (shared "
             "by this server's workers); later epochs copy instead of decoding")
    cache_size: int | None = setting(
        None, metavar="S", shown="off",
        help="with --augment rrc: take the random resized crop from each image's centre region at shorter side S, "
             "not from the full original (as FFCV does); with --cache that region is what is cached, so the pixels "
             "are the same with and without --cache; S >= the output's shorter side")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        _check_ranges(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("choices"):
                _one_of(f.name, getattr(self, f.name), f.metadata["choices"])
        _at_least("batch_size", self.batch_size, 1)
        self._validate_workers()
        if self.prefetch is not None:
            _at_least("prefetch", self.prefetch, 1)
        if self.read_threads is not None:
            _at_least("read_threads", self.read_threads, 0)
        if self.maxlen is not None:
            _at_least("maxlen", self.maxlen, 1)
        if self.simulate_read_latency_ms < 0:
            raise ConfigError(f"`simulate_read_latency_ms` must be >= 0, got {self.simulate_read_latency_ms}")
        w, h = self.size
        if not (1 <= w <= 16384 and 1 <= h <= 16384):
            raise ConfigError(f"`size` must be between 1x1 and 16384x16384, got {w}x{h}")
        if self.subset == "all":
            if self.val_fraction != 0:
                raise ConfigError(f"`val_fraction` {self.val_fraction} needs --subset train or val (with --subset "
                                  "all every sample is served)")
        elif not 0 < self.val_fraction < 1:
            raise ConfigError(f"`subset` {self.subset} needs `val_fraction` between 0 and 1 (exclusive), got "
                              f"{self.val_fraction}; for example --val-fraction 0.2")
        if not 0 <= self.split_seed < 2**63:
            raise ConfigError(f"`split_seed` must be between 0 and 2**63-1, got {self.split_seed}")
        for name in ("transform", "collate"):
            if getattr(self, name):
                from .pipeline.user_code import load_function

                load_function(getattr(self, name), name)  # fails at start-up, not in a worker
        if self.augment:
            crop = self._source_crop()  # raises ConfigError naming the bad part
            if self.resize != "stretch" and crop:
                raise ConfigError(f"`augment` {crop} replaces the resize: use it with --resize stretch")
        _at_least("max_pixels", self.max_pixels, 1)
        _at_least("remote_attempts", self.remote_attempts, 1)
        _at_least("read_ahead_tasks", self.read_ahead_tasks, 0)
        _at_least("max_file_bytes", self.max_file_bytes, 1)
        _at_least("max_clients", self.max_clients, 1)
        _at_least("max_connections_per_host", self.max_connections_per_host, 1)
        if not self.max_bad >= 0:
            raise ConfigError(f"`max_bad` must be a count >= 1 or a fraction in [0, 1), got {self.max_bad}")
        if not 0 <= self.pad_value <= 255:
            raise ConfigError(f"`pad_value` must be between 0 and 255, got {self.pad_value}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"`seed` must be between 0 and 2**63-1, got {self.seed}")
        if self.steps_per_epoch is not None:
            _at_least("steps_per_epoch", self.steps_per_epoch, 1)
            if self.mode != "random":
                raise ConfigError("`steps_per_epoch` applies to --mode random only; epoch mode derives it")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            if self.dtype != "float32":
                raise ConfigError(f"`{name}` needs --dtype float32 (normalised values do not fit uint8)")
            if len(value) != self.channels:
                raise ConfigError(
                    f"`{name}` needs {self.channels} values for --color {self.color}, got {len(value)}"
                )
            if name == "std" and any(v <= 0 for v in value):
                raise ConfigError(f"`std` values must be > 0, got {list(value)}")
        if self.log_interval_s < 0:
            raise ConfigError(f"`log_interval_s` must be >= 0, got {self.log_interval_s}")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ConfigError(f"`metrics_port` must be a TCP port (1..65535), got {self.metrics_port}")
        if not _is_host(self.metrics_host):
            raise ConfigError(f"`metrics_host` must be an IP address or a host name, for example 127.0.0.1 or "
                              f"0.0.0.0, got {self.metrics_host!r}")
        if self.batch_timeout_s <= 0:
            raise ConfigError(f"`batch_timeout_s` must be > 0, got {self.batch_timeout_s}")
        if self.heartbeat_s <= 0:
            raise ConfigError(f"`heartbeat_s` must be > 0, got {self.heartbeat_s}")
        if self.client_timeout_s <= self.heartbeat_s:
            raise ConfigError("`client_timeout_s` must be larger than `heartbeat_s`")
        _at_least("max_message_bytes", self.max_message_bytes, 1)
        self._validate_cache()
        if not self.bind.startswith(("tcp://", "ipc://")):
            from loader_client.contract.endpoint_text import missing_scheme_hint

            raise ConfigError(f"`bind` must be tcp://HOST:PORT or ipc://PATH, got {self.bind!r}"
                              f"{missing_scheme_hint(self.bind)}")
        if not is_local_bind(self.bind) and not self.curve_dir and not self.insecure:
            raise ConfigError(
                f"`bind` {self.bind} is reachable from the network: pass --curve-dir DIR to encrypt and "
                "authenticate (create keys with `loader-server keygen DIR`), or --insecure to serve anyone "
                "who can reach it"
            )

    def _validate_workers(self) -> None:
        if self.workers != "auto":
            if not isinstance(self.workers, int):
                raise ConfigError(f"`workers` must be a whole number or auto, got {self.workers!r}")
            _at_least("workers", self.workers, 1)
            for name in ("workers_min", "workers_max"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"`{name}` applies to --workers auto only; --workers {self.workers} is fixed")
        if self.workers_min is not None:
            _at_least("workers_min", self.workers_min, 1)
        if self.workers_max is not None:
            _at_least("workers_max", self.workers_max, 1)
        lo, hi = self.worker_bounds
        if lo > hi:
            raise ConfigError(f"`workers_min` {lo} is above `workers_max` {hi}")
        if self.share_window is not None:
            _at_least("share_window", self.share_window, 0)

    @property
    def autoscale(self) -> bool:
        """--workers auto: the worker count follows the trainers' stall."""
        return self.workers == "auto"

    @property
    def worker_bounds(self) -> tuple[int, int]:
        """(fewest, most) workers: both the fixed count unless --workers auto."""
        if isinstance(self.workers, int):
            return self.workers, self.workers
        lo = self.workers_min if self.workers_min is not None else 1
        return lo, self.workers_max if self.workers_max is not None else max(lo, default_workers())

    @property
    def initial_workers(self) -> int:
        """Workers started with the server (--workers auto: the fewest)."""
        return self.worker_bounds[0]

    @property
    def share_window_batches(self) -> int:
        """`share_window`, or by default twice the batches built ahead per client."""
        return self.share_window if self.share_window is not None else 2 * self.prefetch_batches

    def _validate_cache(self) -> None:
        if self.cache is not None and not self.cache.strip():
            raise ConfigError("`cache` must be a folder or `memory`, got an empty value")
        if self.cache_size is not None:
            if not min(self.size) <= self.cache_size <= 16384:
                raise ConfigError(f"`cache_size` must be between the output's shorter side ({min(self.size)}) and "
                                  f"16384, got {self.cache_size}")
            if self.cache is None and not self._source_crop():
                raise ConfigError(f"`cache_size` {self.cache_size} is the resolution a random resized crop is taken "
                                  "from (--augment rrc), with or without --cache: add --augment rrc,... or drop "
                                  "--cache-size")
            if self.transform:
                raise ConfigError("--cache-size crops from a resized centre region, but --transform runs on the full "
                                  "decoded image: drop one of them")
        if self.cache is None:
            return
        if self.transform:
            raise ConfigError("--cache cannot keep the output of --transform (it runs on the full decoded image, "
                              "with randomness per epoch): drop one of them")
        crop = self._source_crop()
        if crop and self.cache_size is None:
            raise ConfigError(f"--augment {crop} crops the full image, which a cache of the output size no longer has: "
                              "add --cache-size S (for example 256: the crop is taken from the centre region at "
                              "shorter side S), or drop --cache")

    def _source_crop(self) -> str | None:
        """The name of the augmentation that crops the full-size source (rrc), if `augment` has one."""
        if not self.augment:
            return None
        from .pipeline.augment import Augmenter, parse_augment

        return Augmenter(parse_augment(self.augment)).source_crop_name

    def options(self, group: type[G]) -> G:
        """The settings of one option group (options.py), the only part a step of the sample path sees."""
        return options_of(self, group)

    @property
    def channels(self) -> int:
        """Channels of a decoded image: 1 for gray, else 3."""
        return 1 if self.color == "gray" else 3

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one output image in the configured layout."""
        w, h = self.size
        return (self.channels, h, w) if self.layout == "chw" else (h, w, self.channels)

    @property
    def prefetch_batches(self) -> int:
        """Batches built ahead per client: `prefetch`, or by default enough for every worker to
        hold two (one being built, the next waiting), as torch DataLoader's prefetch_factor=2 (with
        --workers auto: the most workers)."""
        if self.prefetch is not None:
            return self.prefetch
        return max(MIN_PREFETCH, PREFETCH_PER_WORKER * self.worker_bounds[1])

    def max_bad_files(self, samples: int) -> int:
        """How many distinct bad files skip mode tolerates for an index of `samples`."""
        if self.max_bad >= 1:
            return int(self.max_bad)
        return max(1, int(self.max_bad * samples))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the option groups that shape batches (options.py): which samples, their pixels, their order.

        The data set's settings are not here: the data set's own fingerprint covers what they
        choose (see subset.py for the split).
        """
        return group_hash(*(options_of(self, g) for g in GROUPS if g.shapes_batches))


check_partition([f.name for f in dataclasses.fields(ServerConfig)])


def _is_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*", text))


#: The finite range of every numeric setting, checked first in `validate` (NaN and infinities are
#: refused too). Each bound is what the value later reaches: a wire field (heartbeat_s and
#: max_message_bytes go into every welcome, whose schema has these limits; steps reach 32-bit
#: positions; a batch's indices and bad-file list reach the worker messages), a per-session
#: table (prefetch: at most 1,024 shared-memory slots), or simply a machine (workers, threads).
RANGES: dict[str, tuple[float, float]] = {
    "maxlen": (1, 1 << 24),
    "val_fraction": (0.0, 1.0),
    "split_seed": (0, 2**63 - 1),
    "batch_size": (1, 1 << 20),
    "workers": (1, 1024),  # or auto (not checked here)
    "workers_min": (1, 1024),
    "workers_max": (1, 1024),
    "target_stall": (0.001, 0.999),
    "scale_interval_s": (0.01, 86400.0),
    "share_window": (0, 1 << 20),
    "seed": (0, 2**63 - 1),
    "prefetch": (1, 1000),
    "steps_per_epoch": (1, 2**31 - 1),
    "pad_value": (0, 255),
    "max_pixels": (1, 1 << 40),
    "max_file_bytes": (1, 1 << 40),
    "max_clients": (1, 4096),
    "max_clients_per_peer": (1, 4096),
    "max_connections_per_host": (1, 65536),
    "max_bad": (0.0, 1 << 40),
    "read_threads": (0, 1024),
    "read_connections": (0, 64),
    "read_ahead_tasks": (0, 64),
    "remote_attempts": (1, 100),
    "remote_timeout_s": (0.01, 86400.0),
    "remote_inflight_mb": (0.01, 1048576.0),
    "page_cache_mb": (0.0, 1048576.0),
    "remote_recheck_s": (0.0, 7 * 86400.0),
    "simulate_read_latency_ms": (0.0, 60_000.0),
    "batch_timeout_s": (0.01, 7 * 86400.0),
    "heartbeat_s": (0.01, 3600.0),
    "client_timeout_s": (0.02, 7 * 86400.0),
    "max_message_bytes": (1, 1 << 40),
    "log_interval_s": (0.0, 86400.0),
    "metrics_port": (1, 65535),
    "cache_size": (1, 16384),
}


def _check_ranges(config: ServerConfig) -> None:
    """Every numeric setting in its finite range: the message names the setting, the rule and the value."""
    for name, (low, high) in RANGES.items():
        value = getattr(config, name)
        if value is None or (name == "workers" and value == "auto"):
            continue
        span = f"{_shown(low)} to {_shown(high)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"`{name}` must be a finite number from {span}, got {value!r}")
        if name == "metrics_port" and not low <= value <= high:
            raise ConfigError(f"`metrics_port` must be a TCP port (1..65535), got {value!r}")
        if value < low:
            raise ConfigError(f"`{name}` must be >= {_shown(low)}, got {value!r} (its range: {span})")
        if value > high:
            raise ConfigError(f"`{name}` must be <= {_shown(high)}, got {value!r} (its range: {span})")
    for name in ("mean", "std"):
        values = getattr(config, name)
        if values is not None and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ConfigError(f"`{name}` values must be finite numbers, got {list(values)}")


def _shown(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"`{name}` must be >= {low}, got {value!r}")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {', '.join(choices)}; got {value!r}")
