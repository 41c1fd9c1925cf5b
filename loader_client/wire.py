"""One client socket to one server, and the messages on it: sent and received as messages.py classes.

`receive` reads one message, checks its size and frame count, its protocol version and every
header field (through the dispatch table of what may arrive at this point), and returns the
typed message with its array frames. `raise_for` turns a server's `Error` or `Goodbye` into
the exception the trainer sees.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeAlias

import zmq

from .contract import protocol, schema
from .contract.errors import LoaderError, ProtocolError, ServerStoppedError, from_wire
from .contract.messages import Error, Goodbye
from .security import apply_curve

__all__ = ["MAX_FRAMES", "Ctx", "Sock", "new_socket", "raise_for", "receive", "remote_error", "send"]

#: The client's sockets and contexts (frames are bytes).
Sock: TypeAlias = "zmq.Socket[bytes]"
Ctx: TypeAlias = "zmq.Context[zmq.Socket[bytes]]"
#: A batch header and at most 64 arrays (messages.Batch.arrays).
MAX_FRAMES = 65


def new_socket(ctx: Ctx, *, max_message_bytes: int, hwm: int, curve: Mapping[str, Any]) -> Sock:
    """A DEALER with a fresh random identity, bounded frames and queue, CURVE if keys are given."""
    sock: Sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.IPV6, 1)  # tcp://[::1]:PORT and other IPv6 endpoints
    sock.setsockopt(zmq.SNDHWM, hwm)
    apply_curve(sock, curve.get("server_public_key"), curve.get("client_keys"))
    return sock


def send(sock: Sock, message: schema.Message, flags: int = 0) -> bool:
    """Send `message`; False if it could not leave now (NOBLOCK) or the socket is gone."""
    try:
        sock.send(schema.encode(message), flags)
        return True
    except zmq.ZMQError:
        return False


def receive(sock: Sock, table: Mapping[str, type[schema.Message]], *, peer: str, where: str,
            max_bytes: int, flags: int = 0) -> tuple[schema.Message, list[Any]]:
    """The next message from `peer` (one of `table`'s types) and its array frames."""
    frames = sock.recv_multipart(flags, copy=False)
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{peer} sent a message of {len(frames)} frames; at most {MAX_FRAMES} are allowed")
    size = sum(len(f.buffer) for f in frames)
    if size > max_bytes:
        raise ProtocolError(f"{peer} sent a message of {size} bytes, over the bound of {max_bytes}")
    header = protocol.unpack(frames[0])
    protocol.check_version(header, peer=peer)
    return schema.decode(header, table, f"{where} from {peer}"), frames[1:]


def remote_error(message: Error) -> LoaderError:
    """The exception of a server's `Error`, rebuilt with its fields (path, reason, exit code)."""
    text = message.message
    if message.traceback:
        text += "\n--- worker traceback ---\n" + message.traceback.rstrip()
    return from_wire(message.kind, text, message.fields())


def stopped_error(message: Goodbye, peer: str) -> ServerStoppedError:
    reason = message.reason.encode("unicode_escape", "backslashreplace").decode("ascii")[:200]
    return ServerStoppedError(f"{peer} was stopped on purpose ({reason}): no more batches will come; restart it "
                              "and resume from your last state_dict()", reason=message.reason)


def raise_for(message: schema.Message, peer: str) -> None:
    """Raise the trainer's exception for an `Error` or a `Goodbye`; return for anything else."""
    if isinstance(message, Error):
        raise remote_error(message)
    if isinstance(message, Goodbye):
        raise stopped_error(message, peer)
