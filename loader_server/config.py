"""Server settings: one frozen dataclass, validated once at start-up.

Every message names the setting, the rule and the value given, so that a user can fix the
command line without reading code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from loader_client.errors import ConfigError

__all__ = ["ServerConfig", "parse_size", "parse_max_bad", "is_local_bind", "default_workers", "RESIZE_MODES", "INTERPOLATIONS"]

RESIZE_MODES = ("stretch", "letterbox", "crop")
INTERPOLATIONS = ("nearest", "linear", "area", "cubic", "lanczos")
COLORS = ("rgb", "bgr", "gray")
DTYPES = ("uint8", "float32")
LAYOUTS = ("hwc", "chw")
SAMPLING_MODES = ("epoch", "random")


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


def parse_max_bad(text: str) -> float:
    """``100`` (files), ``0.5%`` or ``0.005`` (fraction of the index) into a float."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"`max_bad` must be a count (100), a percentage (0.5%) or a fraction (0.005), "
                          f"got {text!r}") from None
    if value < 0 or (value >= 1 and value != int(value)):
        raise ConfigError(f"`max_bad` must be a whole count >= 1 or a fraction in [0, 1), got {text!r}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` (width x height, the order cv2.resize takes) into a tuple."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise ConfigError(f"`size` must look like WIDTHxHEIGHT, for example 224x224, got {text!r}")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to know; `validate()` is called by `__post_init__`."""

    data: str
    labels: str | None = None  # array data: labels .npy beside --data x.npy
    offsets: str | None = None  # ragged array data: sample i = values[offsets[i]:offsets[i+1]]
    maxlen: int | None = None  # ragged array data: pad or truncate to this length
    pad: Literal["pre", "post"] = "pre"
    truncate: Literal["pre", "post"] = "pre"
    sample_shape: tuple[int, ...] | None = None  # array data: set from the arrays at start-up
    sample_dtype: str | None = None
    batch_size: int = 32
    size: tuple[int, int] = (224, 224)  # (width, height)
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    bind: str = "tcp://127.0.0.1:5555"
    curve_dir: str | None = None  # server.key_secret and an allow-list clients/*.key (loader-server keygen)
    insecure: bool = False  # allow a non-loopback bind without CURVE
    prefetch: int = 8
    mode: Literal["epoch", "random"] = "epoch"
    shuffle: bool = True
    drop_last: bool = True
    steps_per_epoch: int | None = None  # random mode only; default len(data) // batch_size
    in_order: bool = True
    resize: Literal["stretch", "letterbox", "crop"] = "stretch"
    interpolation: str = "linear"
    pad_value: int = 0
    color: Literal["rgb", "bgr", "gray"] = "rgb"
    dtype: Literal["uint8", "float32"] = "uint8"
    layout: Literal["hwc", "chw"] = "hwc"
    reduced_decode: bool = True
    augment: str | None = None  # e.g. "rrc(scale=0.08-1),flip,jitter(0.4)"; see loader_server.augment
    transform: str | None = None  # module:function(image, rng) -> image, run in the workers
    collate: str | None = None  # module:function(arrays, rng) -> dict of extra arrays
    max_pixels: int = 178_956_970  # larger images are refused before decoding (Pillow's bomb limit)
    max_file_bytes: int = 256 << 20  # larger files (and devices) are refused before they are read
    max_clients: int = 64  # sessions at once; more are refused with a clear error
    on_error: Literal["raise", "skip"] = "raise"
    max_bad: float = 0.001  # skip mode: >= 1 a count of bad files, < 1 a fraction of the index
    shm: bool = True  # offer shared-memory slots to clients on this host
    read_threads: int | None = None  # reads in flight per worker; None: inline until reads are slow
    simulate_read_latency_ms: float = 0.0  # benchmark option: sleep before every file read
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_timeout_s: float = 120.0  # a worker without progress this long on a batch is hung
    heartbeat_s: float = 1.0
    client_timeout_s: float = 30.0
    max_message_bytes: int = 1 << 30
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_interval_s: float = 30.0  # a throughput line this often (0: never)
    metrics_port: int | None = None  # Prometheus text endpoint on 127.0.0.1, off when None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        _at_least("batch_size", self.batch_size, 1)
        _at_least("workers", self.workers, 1)
        _at_least("prefetch", self.prefetch, 1)
        if self.read_threads is not None:
            _at_least("read_threads", self.read_threads, 0)
        if self.simulate_read_latency_ms < 0:
            raise ConfigError(f"`simulate_read_latency_ms` must be >= 0, got {self.simulate_read_latency_ms}")
        w, h = self.size
        if not (1 <= w <= 16384 and 1 <= h <= 16384):
            raise ConfigError(f"`size` must be between 1x1 and 16384x16384, got {w}x{h}")
        _one_of("mode", self.mode, SAMPLING_MODES)
        _one_of("resize", self.resize, RESIZE_MODES)
        _one_of("interpolation", self.interpolation, INTERPOLATIONS)
        _one_of("color", self.color, COLORS)
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("layout", self.layout, LAYOUTS)
        _one_of("on_error", self.on_error, ("raise", "skip"))
        _one_of("pad", self.pad, ("pre", "post"))
        _one_of("truncate", self.truncate, ("pre", "post"))
        if self.sample_shape is not None and (self.augment or self.transform or self.dtype != "uint8"
                                              or self.layout != "hwc" or self.mean or self.std):
            raise ConfigError("array data sets are served as stored: --augment, --transform, --dtype, --layout, "
                              "--mean and --std apply to images only")
        for setting in ("transform", "collate"):
            if getattr(self, setting):
                from .user_code import load_function

                load_function(getattr(self, setting), setting)  # fails at start-up, not in a worker
        if self.augment:
            from .augment import parse_augment

            parse_augment(self.augment)  # raises ConfigError naming the bad part
            if self.resize != "stretch" and "rrc" in self.augment:
                raise ConfigError("`augment` rrc replaces the resize: use it with --resize stretch")
        _at_least("max_pixels", self.max_pixels, 1)
        _at_least("max_file_bytes", self.max_file_bytes, 1)
        _at_least("max_clients", self.max_clients, 1)
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
        _one_of("log_level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))
        _one_of("log_format", self.log_format, ("text", "json"))
        if self.log_interval_s < 0:
            raise ConfigError(f"`log_interval_s` must be >= 0, got {self.log_interval_s}")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ConfigError(f"`metrics_port` must be a TCP port (1..65535), got {self.metrics_port}")
        if self.batch_timeout_s <= 0:
            raise ConfigError(f"`batch_timeout_s` must be > 0, got {self.batch_timeout_s}")
        if self.heartbeat_s <= 0:
            raise ConfigError(f"`heartbeat_s` must be > 0, got {self.heartbeat_s}")
        if self.client_timeout_s <= self.heartbeat_s:
            raise ConfigError("`client_timeout_s` must be larger than `heartbeat_s`")
        if not self.bind.startswith(("tcp://", "ipc://")):
            raise ConfigError(f"`bind` must be tcp://HOST:PORT or ipc://PATH, got {self.bind!r}")
        if not is_local_bind(self.bind) and not self.curve_dir and not self.insecure:
            raise ConfigError(
                f"`bind` {self.bind} is reachable from the network: pass --curve-dir DIR to encrypt and "
                "authenticate (create keys with `loader-server keygen DIR`), or --insecure to serve anyone "
                "who can reach it"
            )
        if self.batch_bytes > self.max_message_bytes:
            raise ConfigError(
                f"one batch would be {self.batch_bytes} bytes, above `max_message_bytes` "
                f"({self.max_message_bytes}); lower --batch-size or --size"
            )

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one output image in the configured layout."""
        w, h = self.size
        return (self.channels, h, w) if self.layout == "chw" else (h, w, self.channels)

    @property
    def x_shape(self) -> tuple[int, ...]:
        """Shape of one sample of x: an image, or a row of an array data set."""
        return self.sample_shape if self.sample_shape is not None else self.image_shape

    @property
    def x_dtype(self) -> str:
        return self.sample_dtype if self.sample_dtype is not None else self.dtype

    @property
    def batch_bytes(self) -> int:
        return self.batch_size * math.prod(self.x_shape) * np.dtype(self.x_dtype).itemsize

    def max_bad_files(self, samples: int) -> int:
        """How many distinct bad files skip mode tolerates for an index of `samples`."""
        if self.max_bad >= 1:
            return int(self.max_bad)
        return max(1, int(self.max_bad * samples))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every setting that changes batch contents or order (not bind, workers, ...)."""
        keep = {
            k: v
            for k, v in self.as_dict().items()
            if k not in ("data", "workers", "bind", "prefetch", "in_order", "heartbeat_s", "client_timeout_s",
                         "max_message_bytes", "seed", "read_threads", "simulate_read_latency_ms", "shm",
                         "batch_timeout_s", "max_bad", "log_level", "log_format", "log_interval_s",
                         "metrics_port", "curve_dir", "insecure", "max_file_bytes", "max_clients")
        }
        blob = json.dumps(keep, sort_keys=True, default=list).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or value < low:
        raise ConfigError(f"`{name}` must be >= {low}, got {value!r}")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {', '.join(choices)}; got {value!r}")
