"""Questions to a server that open no stream: `health` (the Docker health check), `server_stats`, `sources`."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from . import wire
from .contract.errors import ConfigError, LoaderTimeoutError, ProtocolError
from .contract.messages import (
    HEALTH_REPLIES,
    MAX_SOURCES,
    SOURCES_REPLIES,
    STATS_REPLIES,
    HealthReply,
    HealthRequest,
    SourcesReply,
    SourcesRequest,
    StatsReply,
    StatsRequest,
)
from .contract.protocol import MAX_HEADER_BYTES
from .contract.schema import Message
from .endpoints import parse_endpoint, why_silent

__all__ = ["Sources", "health", "server_stats", "sources"]


def health(endpoint: str, *, timeout_s: float = 5.0, **curve: Any) -> dict[str, Any]:
    """Ask a server whether it is up and has a ready worker, without opening a stream.

    Returns the server's answer (``ok``, ``workers_ready``, ``clients``, ...); raises
    `LoaderTimeoutError` naming the cause if it does not answer within `timeout_s`, and
    `EndpointError` at once for an endpoint that is not tcp://HOST:PORT or ipc://PATH.
    `curve`: `server_public_key` and `client_keys`, as for `LoaderClient`.
    """
    answer = _ask(endpoint, HealthRequest(), HEALTH_REPLIES, timeout_s, curve)
    assert isinstance(answer, HealthReply)
    return answer.fields()


def server_stats(endpoint: str, *, timeout_s: float = 5.0, **curve: Any) -> dict[str, Any]:
    """The server's statistics: images/s and batches/s over the last minute, batches ready,
    per-worker state and busy fraction, errors by reason, bytes sent, clients, uptime and the
    configuration fingerprint. Opens no stream."""
    answer = _ask(endpoint, StatsRequest(), STATS_REPLIES, timeout_s, curve)
    assert isinstance(answer, StatsReply)
    return answer.stats


@dataclass(frozen=True)
class Sources:
    """Where samples come from: one source per asked index (a path, ``shard.tar:member`` or
    ``file.parquet:row``), the served data set and its version (a hash that changes when its samples
    or labels do)."""

    sources: list[str]
    dataset: str
    version: str


def sources(endpoint: str, indices: Iterable[int], *, timeout_s: float = 5.0, **curve: Any) -> Sources:
    """The source of each sample index of the data set a server serves (`client.last.indices` name them),
    asked `MAX_SOURCES` at a time. An index outside the data set raises `ConfigError`."""
    wanted = [_index(i) for i in indices]
    got: list[str] = []
    answer: SourcesReply | None = None
    for lo in range(0, max(1, len(wanted)), MAX_SOURCES):
        chunk = wanted[lo : lo + MAX_SOURCES]
        reply = _ask(endpoint, SourcesRequest(indices=chunk), SOURCES_REPLIES, timeout_s, curve)
        assert isinstance(reply, SourcesReply)
        if len(reply.sources) != len(chunk) or (answer is not None and reply.version != answer.version):
            raise ProtocolError(f"the loader server at {endpoint} answered {len(reply.sources)} sources for "
                                f"{len(chunk)} indices, or changed its data set between two answers")
        got.extend(reply.sources)
        answer = reply
    assert answer is not None
    return Sources(got, answer.dataset, answer.version)


def _index(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ConfigError(f"a sample index is an integer >= 0 (from client.last.indices), got {value!r}")
    return int(value)


def _ask(endpoint: str, request: Message, replies: Mapping[str, type[Message]], timeout_s: float,
         curve: Mapping[str, Any]) -> Message:
    """One request on a socket of its own; the reply of `request`'s type (an Error or Goodbye raises)."""
    ep = parse_endpoint(endpoint)
    unknown = set(curve) - {"server_public_key", "client_keys"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}")
    ctx = zmq.Context()
    sock = wire.new_socket(ctx, max_message_bytes=MAX_HEADER_BYTES, hwm=16, curve=curve)
    peer = f"the loader server at {endpoint}"
    try:
        sock.connect(ep.text)
        wire.send(sock, request)
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0 and sock.poll(int(remaining * 1000) + 1):
            message, frames = wire.receive(sock, replies, peer=peer, where=f"in reply to {request.TYPE}",
                                           max_bytes=MAX_HEADER_BYTES)
            if frames:
                raise ProtocolError(f"{peer} sent array frames with a {message.TYPE!r} reply")
            wire.raise_for(message, peer)
            if message.TYPE == request.TYPE:
                return message
        raise LoaderTimeoutError(f"no {request.TYPE} answer from {peer} within {timeout_s:g} s: "
                                 f"{why_silent(ep, timeout_s)}")
    finally:
        sock.close(linger=0)
        ctx.term()
