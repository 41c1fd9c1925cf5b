"""Opening a stream: hello, welcome, and the shared-memory arena if one was asked for and is genuine.

`open_stream` connects a fresh socket, sends a `Hello`, and waits up to `timeout_s` for the
`Welcome` (heartbeats may come first; an `Error` or `Goodbye` raises at once; a failed CURVE
handshake shows up on the socket monitor and raises `AuthenticationError` at once). When the
wait expires, the error names the real cause (`endpoints.why_silent`). The welcome is
checked for consistency with what was asked (`check_welcome`). An arena is opened only when
this client asked for one, on a same-host endpoint; one that this process cannot open makes
it start over on a fresh socket (a new identity, so nothing of the first stream can arrive
in the second) without shared memory.
"""

from __future__ import annotations

import itertools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.monitor

from . import wire
from .contract.errors import AuthenticationError, LoaderTimeoutError, ProtocolError
from .contract.messages import HANDSHAKE_REPLIES, ArenaHandle, Bye, Hello, Welcome
from .contract.protocol import ALLOWED_DTYPES, MAX_HEADER_BYTES
from .contract.shm import Arena, arena_channel_path, open_arena, receive_arena, shm_available, socket_peer
from .endpoints import Endpoint, why_silent
from .options import ClientOptions, Start
from .wire import Ctx, Sock

__all__ = ["BYE_LINGER_MS", "Opened", "check_welcome", "open_stream"]

_log = logging.getLogger("loader_client")
_counter = itertools.count()
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILURES_TEXT: dict[int, str] = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
                            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security mechanism mismatch",
                            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed"}
#: How long a goodbye may take to leave when a socket closes.
BYE_LINGER_MS = 200
_LAYOUTS = ("hwc", "chw")
#: Longest wait for the server's arena channel (it answers at once, or the stream uses frames).
_CHANNEL_TIMEOUT_S = 5.0


@dataclass
class Opened:
    """A stream that the server accepted: its socket, its welcome, its arena (or None)."""

    sock: Sock
    welcome: Welcome
    arena: Arena | None


def open_stream(ctx: Ctx, endpoint: Endpoint, options: ClientOptions, start: Start) -> Opened:
    """Say hello to the server at `endpoint` and return the accepted stream (sockets closed on failure)."""
    ask_shm = endpoint.same_host and options.shared_memory is not False and shm_available()
    hello = Hello(rank=start.rank, world_size=start.world_size, epoch=start.epoch, batch=start.batch,
                  seed=start.seed, fingerprint=start.fingerprint, credit=options.prefetch,
                  client=options.name, shm=ask_shm, augment=options.augment)
    opened = _hello(ctx, endpoint, options, hello, start)
    if opened.welcome.shm is None:
        return opened
    try:
        arena = _map_arena(endpoint, opened.welcome.shm, options)
    except BaseException:
        wire.send(opened.sock, Bye(), zmq.NOBLOCK)
        opened.sock.close(linger=BYE_LINGER_MS)
        raise
    if arena is not None:
        opened.arena = arena
        return opened
    # Neither /proc nor the arena channel gave the arena: frames over a fresh socket.
    _log.info("cannot open the shared-memory arena of %s; using frames over the socket", endpoint)
    wire.send(opened.sock, Bye(), zmq.NOBLOCK)
    opened.sock.close(linger=BYE_LINGER_MS)
    return _hello(ctx, endpoint, options, Hello(**{**hello.fields(), "shm": False}), start)


def _map_arena(endpoint: Endpoint, handle: ArenaHandle, options: ClientOptions) -> Arena | None:
    """The announced arena, through /proc when the server is this user's in this PID namespace, else
    passed over the arena channel of an ipc:// server; None when neither works."""
    if endpoint.scheme != "ipc":
        return open_arena(handle)  # loopback TCP: `open_arena` checks the descriptor itself
    listener = _ipc_listener(endpoint)
    if listener is None:
        return None
    pid, uid = listener
    if pid == handle.pid:
        arena = open_arena(handle)
        if arena is not None:
            return arena
    if endpoint.path.startswith("@"):
        return None  # an abstract socket has no folder for the channel
    return receive_arena(arena_channel_path(endpoint.path), handle, server_uid=uid,
                         timeout_s=min(options.timeout_s, _CHANNEL_TIMEOUT_S))


def _ipc_listener(endpoint: Endpoint) -> tuple[int, int] | None:
    """(pid, uid) of the process listening on an ipc:// endpoint, as this process sees them.

    A server in another pid namespace (another container sharing the socket file) announces
    a pid that means another process here, or none: the arena is then not looked for in /proc.
    The kernel tells the peer's pid (SO_PEERCRED, translated into this namespace, 0 when it
    has no pid here) and its uid, which the arena channel's listener must share.
    """
    address = "\0" + endpoint.path[1:] if endpoint.path.startswith("@") else endpoint.path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(address)
            pid, uid, _ = socket_peer(probe)
    except OSError:
        return None
    return pid, uid


def _hello(ctx: Ctx, endpoint: Endpoint, options: ClientOptions, hello: Hello, start: Start) -> Opened:
    sock = wire.new_socket(ctx, max_message_bytes=options.max_message_bytes, hwm=4 * options.prefetch + 16,
                           curve={"server_public_key": options.server_public_key, "client_keys": options.client_keys})
    monitor: Sock | None = None
    welcome: Welcome | None = None
    try:
        address = f"inproc://loader-client-monitor-{next(_counter)}"  # unique: never reused
        sock.monitor(address, _HANDSHAKE_FAILURES)
        monitor = ctx.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(address)
        sock.connect(endpoint.text)
        wire.send(sock, hello)
        welcome = _wait_for_welcome(sock, monitor, endpoint, options)
        check_welcome(welcome, hello, start, str(endpoint))
        # ZeroMQ reads MAXMSGSIZE (a bound per frame) when it connects: the welcome's tighter bound
        # applies to reconnections; the receiver checks every whole message against it.
        sock.setsockopt(zmq.MAXMSGSIZE, min(options.max_message_bytes, welcome.max_message_bytes))
    except BaseException:
        _close_monitor(sock, monitor)
        if welcome is not None:  # the server opened a session: end it now rather than at its timeout
            wire.send(sock, Bye(), zmq.NOBLOCK)
        sock.close(linger=BYE_LINGER_MS if welcome is not None else 0)
        raise
    _close_monitor(sock, monitor)
    return Opened(sock, welcome, None)


def _close_monitor(sock: Sock, monitor: Sock | None) -> None:
    if monitor is not None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)


def _wait_for_welcome(sock: Sock, monitor: Sock, endpoint: Endpoint, options: ClientOptions) -> Welcome:
    curve = bool(options.server_public_key)
    peer = f"the loader server at {endpoint}"
    deadline = time.monotonic() + options.timeout_s
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        ready = dict(poller.poll(max(0, remaining_ms)))
        if monitor in ready:
            event = int(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
            raise AuthenticationError(
                f"{peer} refused the connection during the handshake "
                f"({_HANDSHAKE_FAILURES_TEXT.get(event, event)}): "
                + ("check server_public_key, and that your public key is in the server's allow-list"
                   if curve else "it requires CURVE: pass server_public_key and client_keys")
            )
        if sock not in ready:
            raise LoaderTimeoutError(
                f"no answer from {peer} within {options.timeout_s:g} s: {why_silent(endpoint, options.timeout_s)}"
                + ("; with CURVE, check the keys" if curve else "")
            )
        message, frames = wire.receive(sock, HANDSHAKE_REPLIES, peer=peer, where="in reply to hello",
                                       max_bytes=MAX_HEADER_BYTES)
        if frames:
            raise ProtocolError(f"{peer} sent {len(frames)} array frames with a {message.TYPE!r} message")
        wire.raise_for(message, peer)
        if isinstance(message, Welcome):
            return message


def check_welcome(welcome: Welcome, hello: Hello, start: Start, peer: str) -> None:
    """Refuse a welcome that contradicts what was asked or itself (ProtocolError naming the field)."""
    problems: list[str] = []
    if welcome.shm is not None and not hello.shm:
        problems.append("it announces a shared-memory arena this client did not ask for")
    if (welcome.rank, welcome.world_size) != (start.rank, start.world_size):
        problems.append(f"rank {welcome.rank}/{welcome.world_size} is not the asked {start.rank}/{start.world_size}")
    if (welcome.epoch, welcome.batch) != (start.epoch, start.batch):
        problems.append(f"it starts at epoch {welcome.epoch} batch {welcome.batch}, not the asked "
                        f"epoch {start.epoch} batch {start.batch}")
    if start.seed is not None and welcome.seed != start.seed:
        problems.append(f"seed {welcome.seed} is not the asked {start.seed}")
    if start.fingerprint is not None and welcome.fingerprint != start.fingerprint:
        problems.append("its fingerprint is not the one of the saved state")
    if welcome.batch >= welcome.steps_per_epoch:
        problems.append(f"batch {welcome.batch} is outside an epoch of {welcome.steps_per_epoch} batches")
    if welcome.x_dtype not in ALLOWED_DTYPES:
        problems.append(f"x_dtype {welcome.x_dtype!r} is not an allowed dtype")
    if welcome.layout not in _LAYOUTS:
        problems.append(f"layout {welcome.layout!r} is not one of {', '.join(_LAYOUTS)}")
    if welcome.class_names is not None and welcome.num_classes is not None \
            and len(welcome.class_names) != welcome.num_classes:
        problems.append(f"{len(welcome.class_names)} class names for {welcome.num_classes} classes")
    if problems:
        raise ProtocolError(f"the welcome from the loader server at {peer} is inconsistent: " + "; ".join(problems))


def welcome_info(welcome: Welcome) -> dict[str, Any]:
    """`client.info`: the welcome's fields as a plain dict (the arena handle as a dict too)."""
    return welcome.fields()
