"""Opening a stream: hello, welcome, and the shared-memory arena if one was asked for and is genuine.

`open_stream` connects a fresh socket, sends a `Hello`, and waits up to `timeout_s` for the
`Welcome` (heartbeats may come first; an `Error` or `Goodbye` raises at once; a failed CURVE
handshake shows up on the socket monitor and raises `AuthenticationError` at once). A server
still silent after `WAIT_GRACE_S` gets one warning naming the real cause (`endpoints.why_silent`:
no socket file, connection refused, no DNS answer), and the wait goes on, for a server that
starts late; when it expires, the error names the cause again. The welcome is checked for
consistency with what was asked and with itself (`check_welcome`). An arena is opened only when
this client asked for one, on a same-host endpoint, and only if it holds the key of this hello;
one that this process cannot open makes it start over on a fresh socket (a new identity, so
nothing of the first stream can arrive in the second) without shared memory.

An ``ipc://`` socket says who listens on it (SO_PEERCRED): before anything is sent, its
listener's uid must be trusted (`trusted_uids`: this process's own, root's, and
``server_uid`` when given), or `AuthenticationError` names it; a socket that another user put
in a shared folder never sees a hello. ZeroMQ never reconnects an ipc stream by itself (a
reconnection would reach whoever listens on that path then, unchecked).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.utils.monitor

from . import wire
from .contract.errors import AuthenticationError, LoaderTimeoutError, ProtocolError, ServerError
from .contract.messages import HANDSHAKE_REPLIES, ArenaHandle, Bye, Hello, Welcome
from .contract.protocol import ALLOWED_DTYPES, MAX_HEADER_BYTES
from .contract.sampling import MODES
from .contract.shm import (
    Arena,
    arena_channel_path,
    arena_key,
    new_arena_key,
    open_arena,
    receive_arena,
    shm_available,
    socket_peer,
)
from .endpoints import Endpoint, tcp_listener_uids, why_silent
from .options import ClientOptions, Start
from .wire import Ctx, Sock

__all__ = ["BYE_LINGER_MS", "WAIT_GRACE_S", "Opened", "check_welcome", "open_stream", "trusted_uids"]

_log = logging.getLogger("loader_client")
_counter = itertools.count()
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_HANDSHAKE_FAILURES_TEXT: dict[int, str] = {zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
                            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "security mechanism mismatch",
                            zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed"}
#: How long a client waits for a welcome before it logs, once, why the server does not answer (and waits on).
WAIT_GRACE_S = 2.0
#: How long a goodbye may take to leave when a socket closes.
BYE_LINGER_MS = 200
#: How long the look at a server's greeting may take (after it closed a handshake).
_GREETING_TIMEOUT_S = 2.0
_ZMTP_GREETING_BYTES = 64
_LAYOUTS = ("hwc", "chw")
#: Longest wait for the server's arena channel (it answers at once, or the stream uses frames).
_CHANNEL_TIMEOUT_S = 5.0
#: How often an ipc socket that does not answer yet is tried again while the client waits for its server.
_PROBE_INTERVAL_S = 0.1


@dataclass
class Opened:
    """A stream that the server accepted: its socket, its welcome, its arena (or None)."""

    sock: Sock
    welcome: Welcome
    arena: Arena | None


@dataclass
class _Wait:
    """One wait for a server (for its ipc socket to be listened on, then for its welcome): one
    deadline, and the cause of a silence said once, after `WAIT_GRACE_S`."""

    endpoint: Endpoint
    timeout_s: float
    started: float = field(default_factory=time.monotonic)
    said: bool = False

    def __post_init__(self) -> None:
        self.said = self.said or WAIT_GRACE_S >= self.timeout_s  # a wait shorter than the grace ends in the error

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s

    def say_why_once(self) -> None:
        """Log why the server is silent, once, when the grace period is over."""
        now = time.monotonic()
        if not self.said and now >= self.started + WAIT_GRACE_S:
            self.said = True  # once: the server may start late, and the wait goes on to timeout_s
            _log.warning("still waiting for the loader server at %s (up to timeout_s=%g s): %s", self.endpoint,
                         self.timeout_s, why_silent(self.endpoint, now - self.started))

    def next_wake(self) -> float:
        return self.deadline if self.said else min(self.deadline, self.started + WAIT_GRACE_S)


def open_stream(ctx: Ctx, endpoint: Endpoint, options: ClientOptions, start: Start) -> Opened:
    """Say hello to the server at `endpoint` and return the accepted stream (sockets closed on failure)."""
    wait = _Wait(endpoint, options.timeout_s)
    listener = _trusted_listener(endpoint, options, wait) if endpoint.scheme == "ipc" else None
    _check_loopback_listener(endpoint, options)  # one that listens already; again once connected
    ask_shm = endpoint.same_host and options.shared_memory is not False and shm_available()
    hello = Hello(rank=start.rank, world_size=start.world_size, epoch=start.epoch, batch=start.batch,
                  seed=start.seed, fingerprint=start.fingerprint, credit=options.prefetch,
                  client=options.name, shm=ask_shm, augment=options.augment, share=options.share,
                  shm_key=new_arena_key() if ask_shm else None, manifest=options.manifest)
    opened = _hello(ctx, endpoint, options, hello, start, wait)
    if opened.welcome.shm is None:
        return opened
    try:
        arena = _map_arena(endpoint, listener, opened.welcome.shm, arena_key(hello.shm_key) or b"", options)
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
    return _hello(ctx, endpoint, options, Hello(**{**hello.fields(), "shm": False, "shm_key": None}), start,
                  _Wait(endpoint, options.timeout_s, said=True))  # it answered: a wait of its own, nothing to say


def _map_arena(endpoint: Endpoint, listener: tuple[int, int] | None, handle: ArenaHandle, key: bytes,
               options: ClientOptions) -> Arena | None:
    """The announced arena holding `key`, through /proc when the server is this user's in this PID
    namespace, else passed over the arena channel of an ipc:// server; None when neither works."""
    private = options.share is not None  # a share's arena is every member's: what this one writes stays its own
    if listener is None:
        return open_arena(handle, key, private=private)  # loopback TCP: `open_arena` checks the descriptor itself
    pid, uid = listener
    if pid == handle.pid:
        arena = open_arena(handle, key, private=private)
        if arena is not None:
            return arena
    if endpoint.path.startswith("@"):
        return None  # an abstract socket has no folder for the channel
    return receive_arena(arena_channel_path(endpoint.path), handle, key, server_uid=uid,
                         timeout_s=min(options.timeout_s, _CHANNEL_TIMEOUT_S), private=private)


def _check_loopback_listener(endpoint: Endpoint, options: ClientOptions) -> None:
    """`AuthenticationError` when a process of a uid this trainer does not trust listens on a loopback TCP
    endpoint: any local user may take a free port (before the loader server starts, or after it stops) and
    serve batches of its choosing. A remote endpoint's server is proven by CURVE keys, not here."""
    if endpoint.scheme != "tcp" or not endpoint.same_host:
        return
    untrusted = sorted(tcp_listener_uids(endpoint) - trusted_uids(options))
    if untrusted:
        uid = untrusted[0]
        raise AuthenticationError(
            f"port {endpoint.port} of {endpoint} is listened on by a process of uid {uid}, which this trainer (uid "
            f"{os.getuid()}) does not trust: another local user may have taken the port before the loader server "
            f"(or after it stopped). If that user runs your loader server, pass server_uid={uid} or set "
            f"LOADER_SERVER_UID={uid}; an ipc:// endpoint or CURVE keys also prove who serves")


def trusted_uids(options: ClientOptions) -> set[int]:
    """The uids whose ipc or loopback TCP server this client talks to: its own, root (who can read and write all of
    this process anyway), and the `server_uid` option (a loader that runs as another user)."""
    return {os.getuid(), 0} | ({options.server_uid} if options.server_uid is not None else set())


def _trusted_listener(endpoint: Endpoint, options: ClientOptions, wait: _Wait) -> tuple[int, int]:
    """(pid, uid) of the process listening on an ipc:// endpoint, as this process sees them, once
    one listens (waiting up to `timeout_s`); `AuthenticationError` when its uid is not trusted.

    The kernel tells the peer's pid (SO_PEERCRED, translated into this namespace, 0 when it
    has no pid here) and its uid, which the arena channel's listener must share. A server in
    another pid namespace (another container sharing the socket file) announces a pid that
    means another process here, or none: its arena is then not looked for in /proc.
    """
    address = "\0" + endpoint.path[1:] if endpoint.path.startswith("@") else endpoint.path
    deadline = wait.deadline
    while True:
        wait.say_why_once()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
                probe.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                probe.connect(address)
                pid, uid, _ = socket_peer(probe)
            break
        except OSError:
            if time.monotonic() + _PROBE_INTERVAL_S >= deadline:
                raise _silence(endpoint, options) from None
            time.sleep(_PROBE_INTERVAL_S)
    if uid not in trusted_uids(options):
        raise AuthenticationError(
            f"the ipc socket {endpoint.path} is served by a process of uid {uid}, which this trainer (uid "
            f"{os.getuid()}) does not trust: another user may have put a socket there. If that user runs your "
            f"loader server (the two-user layout), pass server_uid={uid} or set LOADER_SERVER_UID={uid}")
    return pid, uid


def _silence(endpoint: Endpoint, options: ClientOptions) -> LoaderTimeoutError:
    return LoaderTimeoutError(
        f"no answer from the loader server at {endpoint} within {options.timeout_s:g} s: "
        f"{why_silent(endpoint, options.timeout_s)}" + ("; with CURVE, check the keys" if options.server_public_key
                                                          else ""))


def _hello(ctx: Ctx, endpoint: Endpoint, options: ClientOptions, hello: Hello, start: Start, wait: _Wait) -> Opened:
    sock = wire.new_socket(ctx, max_message_bytes=options.max_message_bytes, hwm=4 * options.prefetch + 16,
                           curve={"server_public_key": options.server_public_key, "client_keys": options.client_keys},
                           reconnect=endpoint.scheme != "ipc")
    monitor: Sock | None = None
    welcome: Welcome | None = None
    try:
        address = f"inproc://loader-client-monitor-{next(_counter)}"  # unique: never reused
        sock.monitor(address, _HANDSHAKE_FAILURES | zmq.EVENT_CONNECTED)
        monitor = ctx.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(address)
        sock.connect(endpoint.text)
        wire.send(sock, hello)
        welcome = _wait_for_welcome(sock, monitor, endpoint, options, wait)
        _check_loopback_listener(endpoint, options)  # who accepted: the port's listener now
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


def _wait_for_welcome(sock: Sock, monitor: Sock, endpoint: Endpoint, options: ClientOptions, wait: _Wait) -> Welcome:
    curve = bool(options.server_public_key)
    peer = f"the loader server at {endpoint}"
    deadline = wait.deadline
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    while True:
        wait.say_why_once()
        wake = wait.next_wake()
        ready = dict(poller.poll(max(0, int((wake - time.monotonic()) * 1000))))
        if not ready and time.monotonic() < deadline:
            continue
        if monitor in ready:
            event = int(zmq.utils.monitor.recv_monitor_message(monitor)["event"])
            if event == zmq.EVENT_CONNECTED:  # a server that started late: is it one this trainer trusts?
                _check_loopback_listener(endpoint, options)
                continue
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and not curve and _server_mechanism(endpoint) != b"CURVE":
                # Closed during the handshake by a server that does not ask for CURVE: not a matter of keys.
                raise ServerError(
                    f"{peer} closed the connection during the handshake: it may be refusing connections from "
                    "this host (too many open: see its log and --max-connections-per-host), or not be a loader "
                    "server"
                )
            raise AuthenticationError(
                f"{peer} refused the connection during the handshake "
                f"({_HANDSHAKE_FAILURES_TEXT.get(event, event)}): "
                + ("check server_public_key, and that your public key is in the server's allow-list"
                   if curve else "it requires CURVE: pass server_public_key and client_keys")
            )
        if sock not in ready:
            raise _silence(endpoint, options)
        message, frames = wire.receive(sock, HANDSHAKE_REPLIES, peer=peer, where="in reply to hello",
                                       max_bytes=MAX_HEADER_BYTES)
        if frames:
            raise ProtocolError(f"{peer} sent {len(frames)} array frames with a {message.TYPE!r} message")
        wire.raise_for(message, peer)
        if isinstance(message, Welcome):
            return message


def _server_mechanism(endpoint: Endpoint) -> bytes | None:
    """The security mechanism a server's ZMTP greeting announces (b"NULL", b"CURVE", ...), or None if it
    sends none: a server that closed a handshake is told apart from one that wants CURVE keys."""
    try:
        if endpoint.scheme == "ipc":
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = "\0" + endpoint.path[1:] if endpoint.path.startswith("@") else endpoint.path
        else:
            info = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)[0]
            probe = socket.socket(info[0], socket.SOCK_STREAM)
            address = info[4]
        with probe:
            probe.settimeout(_GREETING_TIMEOUT_S)
            probe.connect(address)
            # The signature and major version only: the server then sends its whole greeting, and has
            # nothing of ours to refuse before it does.
            probe.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3]))
            greeting = b""
            while len(greeting) < _ZMTP_GREETING_BYTES:
                chunk = probe.recv(_ZMTP_GREETING_BYTES - len(greeting))
                if not chunk:
                    return None
                greeting += chunk
    except OSError:
        return None
    return greeting[12:32].rstrip(b"\0")


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
    if welcome.share != hello.share:
        problems.append(f"it puts this client in share {welcome.share!r}, not the asked {hello.share!r}")
    if start.fingerprint is not None and welcome.fingerprint != start.fingerprint:
        problems.append("its fingerprint is not the one of the saved state")
    if welcome.batch >= welcome.steps_per_epoch:
        problems.append(f"batch {welcome.batch} is outside an epoch of {welcome.steps_per_epoch} batches")
    if welcome.x_dtype not in ALLOWED_DTYPES:
        problems.append(f"x_dtype {welcome.x_dtype!r} is not an allowed dtype")
    if welcome.layout not in _LAYOUTS:
        problems.append(f"layout {welcome.layout!r} is not one of {', '.join(_LAYOUTS)}")
    if welcome.mode not in MODES:
        problems.append(f"mode {welcome.mode!r} is not one of {', '.join(MODES)}")
    elif (planned := welcome.plan().steps_per_epoch(welcome.world_size)) != welcome.steps_per_epoch:
        problems.append(f"{welcome.steps_per_epoch} batches per epoch, but {welcome.num_samples} samples in batches "
                        f"of {welcome.batch_size} ({welcome.mode} mode, drop_last={welcome.drop_last}) give {planned} "
                        f"for each of {welcome.world_size} ranks")
    if welcome.class_names is not None and welcome.num_classes is not None \
            and len(welcome.class_names) != welcome.num_classes:
        problems.append(f"{len(welcome.class_names)} class names for {welcome.num_classes} classes")
    if problems:
        raise ProtocolError(f"the welcome from the loader server at {peer} is inconsistent: " + "; ".join(problems))


def welcome_info(welcome: Welcome) -> dict[str, Any]:
    """`client.info`: the welcome's fields as a plain dict (the arena handle as a dict too)."""
    return welcome.fields()
