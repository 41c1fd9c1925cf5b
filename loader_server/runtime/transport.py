"""The client-facing socket: binding safely, CURVE, the ipc socket janitor, bounded receive and send.

* An ``ipc://PATH`` socket file is created with mode 0600 (or the `ipc_mode` setting's 0660) from
  its first moment (the umask is narrowed around the bind), and a janitor process removes it if
  the server is SIGKILLed.
* ``ipc://@name`` (Linux abstract namespace) has no permissions at all: any local user can
  connect, so it is refused unless `insecure` is set.
* ``tcp://[::1]:PORT`` and other IPv6 addresses work (IPv6 is enabled on the socket for them).
* Only ZMTP 3 peers reach the socket. The socket has a ZAP domain, and libzmq refuses ZMTP 1.0
  and 2.0 peers on a socket with ZAP enabled. Those older protocols killed the server two ways
  (issue 21): their messages carry no connection metadata, so reading a request's source
  descriptor (ZMQ_SRCFD) raised EINVAL; and libzmq itself asserts (SIGABRT,
  zmtp_engine.cpp:422) when such a peer's routing-id message meets a session already being
  closed (process_routing_id_msg lacks the EAGAIN case that mechanism_ready has). No ZAP
  handler is needed for that: without CURVE, connections still need none.
* The ROUTER numbers peers that send no routing id itself (``\\0`` + a 32-bit counter) and
  asserts when that number is already taken, which a peer can do by claiming it as its own
  routing id (libzmq 4.3.5, socket_base.cpp:2113). The counter starts from libc's rand(),
  which libzmq never seeds (the first number was 0x6b8b4567 in every server): it is seeded
  from os.urandom here, and no routing id is ever shown to a peer, so a peer can only guess
  (C claims held, each connection without a routing id hits one with a chance of C / 2**32:
  see the README's threat model). The server's log and its errors name a client by `client_tag`,
  a keyed hash of its routing id, never by the id itself. The ZAP handler cannot refuse such
  claims: the identity frame of a ZAP request is this socket's own ZMQ_ROUTING_ID
  (zap_client.cpp copies options.routing_id), never the peer's.
* Requests are single frames of at most `MAX_REQUEST_BYTES`; a larger frame disconnects its
  peer (ZMQ_MAXMSGSIZE). At most `SEND_QUEUE_BATCHES` messages wait in the socket for one peer.
* ZMTP heartbeats close connections whose peer stopped answering.
* Each TCP connection is bounded by the `ConnectionGuard` (guard.py): bytes held inside
  ZeroMQ, time without a request, and connections per peer. Each request is labelled with its
  peer (`Request.peer`: the CURVE key; the address, or for a local process (loopback or another
  of this host's addresses, whichever it chose) its user alone, "uid N"; for ipc the user,
  "uid N"), which the sessions' per-peer bound counts.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from loader_client.contract.errors import ConfigError
from loader_client.contract.messages import Error
from loader_client.contract.schema import Message, encode

from ..config import is_local_bind
from ..logs import Throttle
from .allow_list import start_curve
from .guard import (
    DEFAULT_CONNECTIONS_PER_HOST,
    HEARTBEAT_IVL_MS,
    HEARTBEAT_TIMEOUT_MS,
    ConnectionGuard,
    wire_bytes,
)
from .outgoing import OutOfRange, checked_encode, error_message
from .processes import PeerProcesses, ipc_peer_pid

__all__ = [
    "MAX_REQUEST_BYTES",
    "RECEIVE_QUEUE",
    "SEND_QUEUE_BATCHES",
    "ZAP_DOMAIN",
    "ClientTransport",
    "PeerLog",
    "PeerSource",
    "Request",
    "client_tag",
    "escape",
    "start_curve",
    "start_janitor",
]

log = logging.getLogger("loader_server")

#: A client request larger than this (one frame) disconnects the peer.
MAX_REQUEST_BYTES = 64 * 1024
#: Messages that may wait in the socket for one peer (ZMQ_SNDHWM): batches beyond the built-ahead ones.
SEND_QUEUE_BATCHES = 8
#: Requests that may wait in the socket from one peer (ZMQ_RCVHWM); the guard bounds their bytes too.
RECEIVE_QUEUE = 1000
#: The ZAP domain of the client socket: with it set, libzmq refuses pre-ZMTP-3 peers.
ZAP_DOMAIN = b"loader-server"

_TAG_KEY = os.urandom(16)  # this process's key for client tags (a forked child draws its own)


def _new_tag_key() -> None:
    global _TAG_KEY
    _TAG_KEY = os.urandom(16)


os.register_at_fork(after_in_child=_new_tag_key)


def client_tag(identity: bytes) -> str:
    """How the server's log and its errors name a client: "c-" and 12 hex digits, a hash of its routing
    id keyed by this process's random key.

    One client has one tag in every line of a server's log (lines about it still correlate, and the
    tag in an error it received finds them), but neither its routing id nor libzmq's counter behind
    the ids it gives can be read or predicted from tags: a reader of the log learns nothing with
    which to claim the next id (socket_base.cpp:2113, see this module's docstring).
    """
    return "c-" + hashlib.blake2b(identity, key=_TAG_KEY, digest_size=6).hexdigest()


@dataclass(frozen=True)
class PeerSource:
    """Where a request came from, below ZeroMQ: an ipc peer's pid (0: unknown) or a TCP connection's fd."""

    pid: int = 0
    fd: int = -1
    uid: int = -1  # an ipc peer's user (SO_PEERCRED)

    def processes(self) -> PeerProcesses:
        """The processes at the other end (none known for a remote TCP peer, or one in another pid namespace)."""
        if self.pid > 0:
            return PeerProcesses.of_ipc(self.pid, self.fd, self.uid)
        return PeerProcesses.of_tcp(self.fd) if self.fd >= 0 else PeerProcesses()


@dataclass(frozen=True)
class Request:
    """One request: its sender's routing id, its frames, the peer it came from, and a refusal, if any.

    `source` tells the peer's processes (processes.py), for a request that needs them: the pid
    the kernel gives for an ipc peer, or the descriptor of a TCP connection (valid until the next
    receive).
    """

    identity: bytes
    body: list[bytes]
    peer: str
    refused: str = ""
    source: PeerSource = field(default_factory=PeerSource)


class ClientTransport:
    """The ROUTER socket clients connect to."""

    def __init__(self, ctx: zmq.Context[Any], bind: str, *, curve_dir: str | None, insecure: bool,
                 max_connections_per_host: int = DEFAULT_CONNECTIONS_PER_HOST, ipc_mode: int = 0o600,
                 idle_timeout_s: float = 30.0) -> None:
        self.bind_address = bind
        self.ipc_mode = ipc_mode
        if bind.startswith("ipc://@") and not insecure:
            raise ConfigError(f"`bind` {bind} is an abstract socket, which every local user can connect to: use "
                              "ipc:///PATH (a file of mode 0600) or pass --insecure")
        _seed_routing_ids()
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        s = self.sock
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        s.setsockopt(zmq.SNDHWM, SEND_QUEUE_BATCHES)
        s.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        s.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        s.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)  # ZAP enabled: libzmq refuses ZMTP 1.0 and 2.0 peers
        self._auth: Any = None
        self._ipc_path: str | None = None
        self.curve = bool(curve_dir)
        self.log = Throttle(log)
        _raise_fd_limit()
        if "[" in bind or bind.count(":") > 2:
            s.setsockopt(zmq.IPV6, 1)
        self.guard: ConnectionGuard | None = None
        try:
            self._bind(ctx, bind, curve_dir)
            if bind.startswith("tcp://"):
                self.guard = ConnectionGuard(ctx, self.sock, curve=self.curve, per_host=max_connections_per_host,
                                             idle_timeout_s=idle_timeout_s)
                self.guard.start()
        except BaseException:
            self.close()
            raise

    def _bind(self, ctx: zmq.Context[Any], bind: str, curve_dir: str | None) -> None:
        if curve_dir:
            self._auth = start_curve(ctx, self.sock, curve_dir)
        elif not is_local_bind(bind):
            log.warning("serving %s WITHOUT encryption or authentication (--insecure): anyone who can reach "
                        "it can read the data set's pixels and labels; use --curve-dir on shared networks", bind)
        old_umask = os.umask(0o777 & ~self.ipc_mode) if bind.startswith("ipc://") else None
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind `bind` {bind!r}: {exc}; choose another port or path") from None
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        if bind.startswith("ipc://") and not bind.startswith("ipc://@"):
            self._ipc_path = bind[len("ipc://"):]
            os.chmod(self._ipc_path, self.ipc_mode)
            start_janitor(self._ipc_path)

    def recv(self) -> Request | None:
        """The next request, or None when none is waiting.

        On TCP the guard counts it against its connection (and says whether that connection is
        refused). A request whose connection cannot be told (no source descriptor: never for a
        ZMTP 3 peer) is dropped.
        """
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            identity, body = frames[0].bytes, [f.bytes for f in frames[1:]]
            last = frames[-1]
            key = _property(last, "User-Id") if self.curve else None
            try:
                fd = last.get(zmq.SRCFD)  # the connection's descriptor (its peer's end, for `processes`)
            except zmq.ZMQError:
                fd = -1
            if self.guard is None:  # ipc: the peer is the user (SO_PEERCRED: "host:uid:gid:pid")
                address = _property(last, "Peer-Address") or "?"
                parts = address.split(":")
                peer = f"CURVE key {key}" if key else f"uid {parts[1]}" if len(parts) == 4 else address
                uid = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else -1
                return Request(identity, body, peer, source=PeerSource(pid=ipc_peer_pid(address), fd=fd, uid=uid))
            if fd < 0:  # no connection metadata: never from a ZMTP 3 peer, which is all that reaches us
                self.log.warning("no-metadata", "dropped a request without connection metadata")
                continue
            admission = self.guard.admit(fd, sum(wire_bytes(len(b), curve=self.curve) for b in body))
            peer = f"CURVE key {key}" if key else admission.peer
            return Request(identity, body, peer, admission.refused, PeerSource(fd=fd))

    def send(self, identity: bytes, frames: Sequence[Any]) -> str:
        """Send without blocking: "ok", "full" (the peer's queue is full: retry later) or "gone"."""
        try:
            self.sock.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return "full"
        except zmq.ZMQError:
            return "gone"
        return "ok"

    def reply(self, identity: bytes, message: Message) -> None:
        """Best-effort single-frame reply (errors, health): dropped if the peer cannot take it.

        The reply is checked against its schema first (an error's text is cut to its limits);
        one that does not fit becomes an error that says so.
        """
        if isinstance(message, Error):
            message = error_message(**message.fields())
        try:
            data = checked_encode(message)
        except OutOfRange as exc:
            self.log.warning("bad-reply", "the server built a %r reply that its schema refuses (%s); sent an error "
                             "instead", message.TYPE, exc)
            data = encode(error_message("server", f"the server could not build its {message.TYPE!r} reply: {exc}"))
        self.send(identity, [data])

    def close(self, linger_ms: int = 0) -> None:
        """Close; messages still queued get `linger_ms` to leave (goodbyes), then are dropped."""
        if self.guard is not None:
            self.guard.close()
        if self._auth is not None:
            self._auth.stop()
        self.sock.close(linger=linger_ms)
        if self._ipc_path is not None:
            try:
                os.unlink(self._ipc_path)
            except FileNotFoundError:
                pass


class PeerLog:
    """Log lines about peers: at most `per_minute` per peer, and at most `Throttle`'s budget per kind of
    line across all peers (a peer with a new identity for every line gets no more); peer text is escaped.
    Windows are kept by routing id; lines name a client by its `client_tag`."""

    def __init__(self, per_minute: int = 10, clock: Any = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.throttle = Throttle(log, clock=clock)
        self._windows: dict[bytes, tuple[float, int]] = {}

    def warning(self, identity: bytes, fmt: str, *args: Any) -> None:
        now = self.clock()
        start, count = self._windows.get(identity, (now, 0))
        if now - start >= 60:
            if count > self.per_minute:
                self.throttle.warning("peer-dropped", "%d more messages about client %s were not logged",
                                      count - self.per_minute, client_tag(identity))
            start, count = now, 0
        count += 1
        if len(self._windows) > 10_000:  # bounded: forget the oldest windows
            self._windows.pop(next(iter(self._windows)))
        self._windows[identity] = (start, count)
        if count <= self.per_minute:
            self.throttle.warning(fmt, fmt, *(escape(a) if isinstance(a, str) else a for a in args))
        elif count == self.per_minute + 1:
            self.throttle.warning("peer-muted", "client %s: further messages this minute are not logged",
                                  client_tag(identity))


def escape(text: str, limit: int = 300) -> str:
    """Peer text for a log line: control characters escaped, bounded in length."""
    shown = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _property(frame: zmq.Frame, name: str) -> str | None:
    """A connection property of a received frame (ZMTP metadata), or None."""
    try:
        value = frame.get(name)
    except (zmq.ZMQError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) and value else None


def _seed_routing_ids() -> None:
    """Seed libc's rand(), from which libzmq draws the first number a ROUTER gives to a peer that
    names itself with no routing id (libzmq never seeds it: the first was 0x6b8b4567 everywhere)."""
    try:
        ctypes.CDLL(None).srand(int.from_bytes(os.urandom(4), "little"))
    except (OSError, AttributeError):  # pragma: no cover - no libc symbols: the numbers stay predictable
        log.warning("could not seed libzmq's routing-id numbers; they are predictable")


def _raise_fd_limit() -> None:
    """Idle connections cost a file descriptor each: allow as many as the system lets us."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    except (ValueError, OSError):
        pass


def start_janitor(path: str) -> None:
    """Fork a tiny process that removes `path` (a socket file or a folder) once this server is gone.

    A clean stop removes it itself; after SIGKILL nothing in this process runs, so the
    janitor, which only waits for its pipe from us to close, removes it then (if it is still
    ours: same inode, so a newer server's socket is left alone). It touches no ZeroMQ.
    """
    inode = os.stat(path).st_ino
    read_fd, write_fd = os.pipe()
    middle = os.fork()
    if middle != 0:
        os.close(read_fd)  # the write end stays open in this process until it exits
        os.waitpid(middle, 0)
        return
    if os.fork() != 0:  # double fork: the janitor is nobody's child here, not counted as a worker
        os._exit(0)
    try:  # the janitor: detach from the terminal's signals, wait for EOF, clean up
        os.setsid()
        os.close(write_fd)
        os.closerange(3, read_fd)
        os.closerange(read_fd + 1, 1 << 16)
        while os.read(read_fd, 1):
            pass
        if os.stat(path).st_ino == inode:
            if os.path.isdir(path):
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    except OSError:
        pass
    finally:
        os._exit(0)
