"""Questions to a server that open no stream: `health` (the Docker health check) and `server_stats`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import zmq

from . import wire
from .contract.errors import LoaderTimeoutError, ProtocolError
from .contract.messages import HEALTH_REPLIES, STATS_REPLIES, HealthReply, HealthRequest, StatsReply, StatsRequest
from .contract.protocol import MAX_HEADER_BYTES
from .contract.schema import Message
from .endpoints import parse_endpoint, why_silent

__all__ = ["health", "server_stats"]


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
