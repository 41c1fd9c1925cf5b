"""The client's settings, grouped and validated once, before anything is sent.

`ClientOptions` holds every keyword `LoaderClient` accepts besides the endpoint;
`ClientOptions.from_kwargs(**kwargs)` refuses unknown names with the list of known ones.
`Start` is where a stream begins (a `state_dict()` or rank/world size/seed), checked against
the same bounds the server's schema applies, so a bad name or an epoch of 2**64-1 fails here
with a `ConfigError` naming the setting, not on the server.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .contract import protocol
from .contract.errors import ConfigError
from .contract.messages import MAX_CREDIT, MAX_NAME_CHARS, MAX_WORLD_SIZE
from .contract.schema import INT32_MAX, INT63_MAX, is_printable

__all__ = ["MIN_HEARTBEAT_S", "ClientOptions", "Start"]

#: The client never pings more often than this, whatever a server's welcome says.
MIN_HEARTBEAT_S = 0.05
_FINGERPRINT_CHARS = 64


@dataclass(frozen=True)
class ClientOptions:
    """Everything about a stream except where the server is. See `LoaderClient` for each one."""

    timeout_s: float = 30.0
    prefetch: int = 4
    rank: int = 0
    world_size: int = 1
    seed: int | None = None
    state: Mapping[str, Any] | None = field(default=None, compare=False)
    heartbeat_s: float | None = None
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    name: str | None = None
    shared_memory: bool | None = None
    normalize: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    log_epochs: bool = False
    on_server_loss: str = "failover"  # several servers: failover, raise or continue
    merge: str = "ordered"  # several servers: ordered (deterministic) or balanced (load follows capacity)
    server_public_key: Any = None
    client_keys: Any = None
    augment: bool = True
    share: str | None = None  # join the server's share of this name: one decode for every trainer in it
    server_uid: int | None = None  # an ipc:// or loopback tcp:// server of this uid is trusted (and this user, root)
    manifest: bool = False  # every batch with its manifest (client.last.manifest)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> ClientOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LoaderClient got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def __post_init__(self) -> None:
        _number("timeout_s", self.timeout_s, lo=1e-3, hi=1e6)
        _integer("prefetch", self.prefetch, 1, MAX_CREDIT, "the server never holds more credit than that")
        _integer("max_message_bytes", self.max_message_bytes, 1, 1 << 40)
        if self.heartbeat_s is None:
            object.__setattr__(self, "heartbeat_s", max(MIN_HEARTBEAT_S, min(1.0, self.timeout_s / 3)))
        _number("heartbeat_s", self.heartbeat_s, lo=MIN_HEARTBEAT_S, hi=self.timeout_s)
        if self.heartbeat_s >= self.timeout_s:  # type: ignore[operator]
            raise ConfigError(f"`heartbeat_s` must be below `timeout_s` ({self.timeout_s}), got {self.heartbeat_s}")
        if self.name is not None and not (isinstance(self.name, str) and 0 < len(self.name) <= MAX_NAME_CHARS
                                          and is_printable(self.name)):
            raise ConfigError(f"`name` must be printable text of 1 to {MAX_NAME_CHARS} characters, without "
                              f"newlines or NUL bytes, got {_show(self.name)}")
        if self.share is not None and not (isinstance(self.share, str) and 0 < len(self.share) <= MAX_NAME_CHARS
                                           and is_printable(self.share)):
            raise ConfigError(f"`share` must be printable text of 1 to {MAX_NAME_CHARS} characters (the name every "
                              f"trainer of the share passes), got {_show(self.share)}")
        if self.on_server_loss not in ("failover", "raise", "continue"):
            raise ConfigError(f"`on_server_loss` must be 'failover', 'raise' or 'continue', "
                              f"got {self.on_server_loss!r}")
        if self.merge not in ("ordered", "balanced"):
            raise ConfigError(f"`merge` must be 'ordered' or 'balanced', got {self.merge!r}")
        if self.seed is not None:
            _integer("seed", self.seed, 0, INT63_MAX)
        uid_text = os.environ.get("LOADER_SERVER_UID", "").strip()
        if self.server_uid is None and uid_text:  # the two-user layouts set it for every trainer script
            try:
                object.__setattr__(self, "server_uid", int(uid_text))
            except ValueError:
                raise ConfigError(f"LOADER_SERVER_UID must be a user id (a whole number), got {uid_text!r}") from None
        if self.server_uid is not None:
            _integer("server_uid", self.server_uid, 0, 2**32 - 2)
        if not isinstance(self.manifest, bool):
            raise ConfigError(f"`manifest` must be True or False, got {_show(self.manifest)}")
        if self.shared_memory is not None and not isinstance(self.shared_memory, bool):
            raise ConfigError(f"`shared_memory` must be True, False or None, got {self.shared_memory!r}")
        self.start()  # the rank, world size and state: refused now rather than by the server

    def start(self) -> Start:
        """Where the stream begins: the saved `state` if any, else epoch 0 of this rank."""
        if self.state is None:
            return Start.checked(0, 0, self.seed, None, self.rank, self.world_size)
        state = self.state
        if not isinstance(state, Mapping) or not {"epoch", "batch", "seed"} <= state.keys():
            raise ConfigError("`state` must come from LoaderClient.state_dict(): it needs epoch, batch and seed")
        fingerprint = state.get("fingerprint")
        return Start.checked(state["epoch"], state["batch"], state["seed"],
                             fingerprint if fingerprint is not None else None,
                             state.get("rank", self.rank), state.get("world_size", self.world_size), where="state")


@dataclass(frozen=True)
class Start:
    """Where a stream begins, in the bounds of the `hello` message."""

    epoch: int
    batch: int
    seed: int | None
    fingerprint: str | None
    rank: int
    world_size: int

    @classmethod
    def checked(cls, epoch: Any, batch: Any, seed: Any, fingerprint: Any, rank: Any, world_size: Any,
                where: str = "") -> Start:
        def name(key: str) -> str:
            return f'{where}["{key}"]' if where else key

        _integer(name("epoch"), epoch, 0, INT32_MAX)
        _integer(name("batch"), batch, 0, INT32_MAX)
        if seed is not None:
            _integer(name("seed"), seed, 0, INT63_MAX)
        _integer(name("world_size"), world_size, -(2**31), MAX_WORLD_SIZE)
        _integer(name("rank"), rank, -(2**31), 2**31)
        if not 0 <= rank < world_size:  # world_size < 1 too: both values named
            raise ConfigError(f"`{name('rank')}` {rank!r} of `{name('world_size')}` {world_size!r} is out of range: "
                              "need 0 <= rank < world_size (ranks count from 0)")
        if fingerprint is not None and not (isinstance(fingerprint, str) and len(fingerprint) <= _FINGERPRINT_CHARS
                                            and is_printable(fingerprint)):
            raise ConfigError(f"`{name('fingerprint')}` must be the text saved by state_dict(), "
                              f"got {_show(fingerprint)}")
        return cls(epoch, batch, seed, fingerprint, rank, world_size)


def _integer(name: str, value: Any, lo: int, hi: int, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"`{name}` must be an integer from {lo} to {hi}{' (' + why + ')' if why else ''}, "
                          f"got {_show(value)}")


def _number(name: str, value: Any, *, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"`{name}` must be a number from {lo:g} to {hi:g}, got {_show(value)}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."
