"""The client-facing socket: binding safely, CURVE, the ipc socket janitor, bounded receive and send.

* An ``ipc://PATH`` socket file is created with mode 0600 (or the `ipc_mode` setting's 0660) from
  its first moment (the umask is narrowed around the bind), and a janitor process removes it if
  the server is SIGKILLed.
* ``ipc://@name`` (Linux abstract namespace) has no permissions at all: any local user can
  connect, so it is refused unless `insecure` is set.
* ``tcp://[::1]:PORT`` and other IPv6 addresses work (IPv6 is enabled on the socket for them).
* Requests are single frames of at most `MAX_REQUEST_BYTES`; a larger frame disconnects its
  peer (ZMQ_MAXMSGSIZE). At most `SEND_QUEUE_BATCHES` messages wait in the socket for one peer.
* ZMTP heartbeats close connections whose peer stopped answering.
* A TCP connection whose peer has sent more than `MAX_UNFINISHED_BYTES` beyond the requests it
  completed is closed (`ConnectionGuard`): a multipart message that never ends, which ZeroMQ
  buffers inside the library where no socket option bounds it. So is a connection beyond
  `max_connections_per_host` from one peer address: idle connections cost a descriptor and
  ZeroMQ's buffers each, and no other bound stops one peer from opening thousands.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import resource
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.utils.z85

from loader_client.contract.errors import ConfigError
from loader_client.contract.schema import Message, encode

from ..config import is_local_bind

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_UNFINISHED_BYTES",
    "SEND_QUEUE_BATCHES",
    "ClientTransport",
    "ConnectionGuard",
    "PeerLog",
    "start_janitor",
]

log = logging.getLogger("loader_server")

#: A client request larger than this (one frame) disconnects the peer.
MAX_REQUEST_BYTES = 64 * 1024
#: Messages that may wait in the socket for one peer (ZMQ_SNDHWM): batches beyond the built-ahead ones.
SEND_QUEUE_BATCHES = 8
#: Bytes a TCP peer may have sent beyond its completed requests before its connection is closed.
MAX_UNFINISHED_BYTES = 4 << 20
_ZMTP_HEARTBEAT_MS = 2_000
_ZMTP_HEARTBEAT_TIMEOUT_MS = 10_000
#: Wire bytes counted per completed frame beyond its body (ZMTP framing; a CURVE box is about 40).
_FRAME_OVERHEAD_BYTES = 64
#: Wire bytes a connection may send that are no request at all (greeting, handshake, heartbeats).
_HANDSHAKE_BYTES = 64 << 10
_IDLE_BYTES_PER_S = 64
#: TCP connections one peer address may hold at once (the max_connections_per_host setting's default).
DEFAULT_CONNECTIONS_PER_HOST = 256
#: How often the guard compares each connection's bytes with its completed requests.
GUARD_INTERVAL_S = 0.005
#: Offset of tcpi_bytes_received in Linux's struct tcp_info (since Linux 4.1).
_TCP_BYTES_RECEIVED_OFFSET = 128
_monitors = itertools.count()


class ClientTransport:
    """The ROUTER socket clients connect to."""

    def __init__(self, ctx: zmq.Context[Any], bind: str, *, curve_dir: str | None, insecure: bool,
                 max_connections_per_host: int = DEFAULT_CONNECTIONS_PER_HOST, ipc_mode: int = 0o600) -> None:
        self.bind_address = bind
        self.ipc_mode = ipc_mode
        if bind.startswith("ipc://@") and not insecure:
            raise ConfigError(f"`bind` {bind} is an abstract socket, which every local user can connect to: use "
                              "ipc:///PATH (a file of mode 0600) or pass --insecure")
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        s = self.sock
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        s.setsockopt(zmq.SNDHWM, SEND_QUEUE_BATCHES)
        s.setsockopt(zmq.RCVHWM, 1000)
        s.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_HEARTBEAT_TIMEOUT_MS)
        self._auth: Any = None
        self._ipc_path: str | None = None
        _raise_fd_limit()
        if "[" in bind or bind.count(":") > 2:
            s.setsockopt(zmq.IPV6, 1)
        self.guard: ConnectionGuard | None = None
        try:
            self._bind(ctx, bind, curve_dir)
            if bind.startswith("tcp://"):
                self.guard = ConnectionGuard(ctx, self.sock, per_host=max_connections_per_host)
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

    def recv(self) -> tuple[bytes, list[bytes]] | None:
        """(identity, body frames) of the next request, or None when none is waiting."""
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        body = [f.bytes for f in frames[1:]]
        if self.guard is not None and len(frames) > 1:
            self.guard.completed(frames[-1].get(zmq.SRCFD), sum(len(b) + _FRAME_OVERHEAD_BYTES for b in body))
        return frames[0].bytes, body

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
        """Best-effort single-frame reply (errors, health): dropped if the peer cannot take it."""
        self.send(identity, [encode(message)])

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


@dataclass
class _Connection:
    sock: socket.socket  # our own duplicate of ZeroMQ's descriptor: the same connection, never another
    opened: float
    host: str = "?"  # the peer's address
    completed: int = 0  # wire bytes of the requests it completed


def _accepted_connection(fd: int, endpoint: bytes) -> tuple[socket.socket, str] | None:
    """Our own duplicate of the descriptor that the monitor's ACCEPTED event names, and the peer's
    address; None when that descriptor is no longer the accepted connection.

    The event is read after the fact (every GUARD_INTERVAL_S, later on a loaded machine): by then
    ZeroMQ may have closed the connection and the number may belong to another descriptor (a
    worker's ipc connection, a metrics request, ...). Only a TCP socket on the listening port is
    taken; the closing event that follows the accept in the monitor's stream then finds nothing.
    """
    try:
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        dup = socket.socket(fileno=copy)
    except OSError:  # not a socket (a pipe, an eventfd): the copy is ours to close
        os.close(copy)
        return None
    try:
        port = int(endpoint.rsplit(b":", 1)[1])
        local, peer = dup.getsockname(), dup.getpeername()
        if dup.family in (socket.AF_INET, socket.AF_INET6) and dup.type == socket.SOCK_STREAM and local[1] == port:
            return dup, str(peer[0])
    except (OSError, ValueError, IndexError):
        pass
    dup.close()
    return None


class ConnectionGuard:
    """Closes TCP connections that hold an unfinished message of more than MAX_UNFINISHED_BYTES.

    ZeroMQ keeps the frames of a message until its last frame arrives, and ZMQ_MAXMSGSIZE bounds
    frames, not messages: one peer sending a message that never ends grows the server without
    bound. The guard learns each connection from the socket's monitor, counts the wire bytes of
    the requests that arrive from it (`completed`, keyed by the message's source descriptor), and
    compares them with what the kernel received on it (TCP_INFO): a connection that sent more
    than MAX_UNFINISHED_BYTES beyond its requests (plus handshake and heartbeat allowances) is
    shut down, which makes ZeroMQ drop it and its unfinished message.

    The check runs on a thread of its own every `GUARD_INTERVAL_S`, not on the event loop's
    tick: a peer on loopback sends about 1 GB/s, so a 100 ms tick let one grow the server by
    about 100 MB before the cut (seen in CI); at 5 ms it is a few MB. Only the thread touches the
    monitor socket and the duplicated descriptors; `completed` runs on the event loop, under a lock.
    """

    def __init__(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], clock: Any = time.monotonic,
                 interval_s: float = GUARD_INTERVAL_S, per_host: int = DEFAULT_CONNECTIONS_PER_HOST) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.per_host = per_host
        self._hosts: Counter[str] = Counter()  # open connections per peer address
        self._refused: dict[str, tuple[float, int]] = {}  # host -> (next log line at, closed since the last)
        address = f"inproc://loader-server-connections-{os.getpid()}-{next(_monitors)}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self._sock = sock
        self._events: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        self._events.setsockopt(zmq.LINGER, 0)
        self._events.connect(address)
        self.connections: dict[int, _Connection] = {}
        self.cut = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Check on a thread of its own until `close`; what it cuts is logged as a warning."""
        self._thread = threading.Thread(target=self._run, name="loader-server-connection-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed_at = -math.inf
        while not self._stop.is_set():
            try:
                for what in self.check():
                    log.warning("%s", what)
            except zmq.ZMQError:  # the context is being torn down
                return
            except Exception:  # a bug here must not end the guard: the server would be unprotected
                if self.clock() - failed_at >= 60:
                    failed_at = self.clock()
                    log.exception("the connection guard failed on one check; it goes on")
            self._stop.wait(self.interval_s)

    def completed(self, fd: int, nbytes: int) -> None:
        with self._lock:
            conn = self.connections.get(fd)
            if conn is not None:
                conn.completed += nbytes

    def check(self) -> list[str]:
        """Follow connections opening and closing; shut down those over the bound. Returns what was cut."""
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                event = parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                accepted = _accepted_connection(fd, event["endpoint"])
                if accepted is None:
                    continue
                dup, host = accepted
                if self._hosts[host] >= self.per_host:
                    self._refuse(dup, host)
                    continue
                self._hosts[host] += 1
                with self._lock:
                    self.connections[fd] = _Connection(dup, self.clock(), host)
            else:
                with self._lock:
                    gone = self.connections.pop(fd, None)
                if gone is not None:
                    self._forget(gone)
        cut = self._refusals()
        now = self.clock()
        with self._lock:
            connections = list(self.connections.items())
        for fd, conn in connections:
            try:
                info = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                received = struct.unpack_from("Q", info, _TCP_BYTES_RECEIVED_OFFSET)[0]
            except (OSError, struct.error):
                continue
            allowed = conn.completed + MAX_UNFINISHED_BYTES + _HANDSHAKE_BYTES + _IDLE_BYTES_PER_S * (now - conn.opened)
            if received > allowed:
                try:
                    host, port = conn.sock.getpeername()[:2]
                    peer = f"{host}:{port}"
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    peer = "a peer"
                with self._lock:
                    self.connections.pop(fd, None)
                self._forget(conn)
                self.cut += 1
                cut.append(f"closed the connection from {peer}: it sent {received - conn.completed} bytes beyond "
                           f"the requests it completed (a message that never ends?); the bound is "
                           f"{MAX_UNFINISHED_BYTES} bytes")
        return cut

    def _forget(self, conn: _Connection) -> None:
        conn.sock.close()
        self._hosts[conn.host] -= 1
        if self._hosts[conn.host] <= 0:
            del self._hosts[conn.host]

    def _refuse(self, dup: socket.socket, host: str) -> None:
        """Close a connection over the per-host bound at once (ZeroMQ then drops it)."""
        try:
            dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        dup.close()
        self.cut += 1
        if host not in self._refused and len(self._refused) >= 10_000:  # bounded: forget the oldest
            self._refused.pop(next(iter(self._refused)))
        next_log, pending = self._refused.get(host, (self.clock(), 0))
        self._refused[host] = (next_log, pending + 1)

    def _refusals(self) -> list[str]:
        """At most one line per host and minute about connections closed for the per-host bound."""
        now, lines = self.clock(), []
        for host, (next_log, pending) in list(self._refused.items()):
            if now < next_log:
                continue
            if pending:
                lines.append(f"closed {pending} connection(s) from {host} as they arrived: it already holds "
                             f"{self.per_host} (--max-connections-per-host)")
                self._refused[host] = (now + 60, 0)
            else:
                del self._refused[host]
        return lines

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._sock.disable_monitor()
        self._events.close(linger=0)
        for conn in self.connections.values():
            conn.sock.close()
        self.connections.clear()


class PeerLog:
    """Log lines about peers, at most `per_minute` per peer; peer-supplied text is escaped."""

    def __init__(self, per_minute: int = 10, clock: Any = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._windows: dict[bytes, tuple[float, int]] = {}

    def warning(self, identity: bytes, fmt: str, *args: Any) -> None:
        now = self.clock()
        start, count = self._windows.get(identity, (now, 0))
        if now - start >= 60:
            if count > self.per_minute:
                log.warning("%d more messages about client %s were not logged", count - self.per_minute,
                            identity.hex())
            start, count = now, 0
        count += 1
        if len(self._windows) > 10_000:  # bounded: forget the oldest windows
            self._windows.pop(next(iter(self._windows)))
        self._windows[identity] = (start, count)
        if count <= self.per_minute:
            log.warning(fmt, *(escape(a) if isinstance(a, str) else a for a in args))
        elif count == self.per_minute + 1:
            log.warning("client %s: further messages this minute are not logged", identity.hex())


def escape(text: str, limit: int = 300) -> str:
    """Peer text for a log line: control characters escaped, bounded in length."""
    shown = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _raise_fd_limit() -> None:
    """Idle connections cost a file descriptor each: allow as many as the system lets us."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20), hard))
    except (ValueError, OSError):
        pass


def start_curve(ctx: zmq.Context[Any], sock: zmq.Socket[Any], curve_dir: str) -> Any:
    """Make `sock` a CURVE server with DIR/server.key_secret, admitting the keys in DIR/clients.

    The allow-list is read again on every connection attempt, so adding or removing a key file
    takes effect for the next connection without a restart (connections already admitted stay).
    """
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    secret_file = os.path.join(curve_dir, "server.key_secret")
    clients = os.path.join(curve_dir, "clients")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--curve-dir: cannot load {secret_file} ({exc}); create it with "
                          f"`loader-server keygen {curve_dir}`") from None
    if not secret or not os.path.isdir(clients) or not any(f.endswith(".key") for f in os.listdir(clients)):
        raise ConfigError(f"--curve-dir: {clients} must hold the public .key file of every allowed client "
                          f"(`loader-server keygen {clients} --name TRAINER`, then keep the .key_secret "
                          "with the trainer)")

    class AllowListAuthenticator(ThreadAuthenticator):
        """Reloads the allow-list folder for each handshake, and logs every refusal."""

        async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
            self.configure_curve(domain="*", location=clients)
            result = super()._authenticate_curve(domain, client_key)
            allowed, reason = (await result) if inspect.isawaitable(result) else result  # pyzmq >= 25 is async
            if not allowed:
                log.warning("refused a client with CURVE key %s: %s", zmq.utils.z85.encode(client_key).decode(),
                            reason.decode(errors="replace"))
            return allowed, reason

    auth = AllowListAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve(domain="*", location=clients)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    log.info("CURVE on: encrypted, %d allowed client key(s) in %s (re-read on every connection)",
             sum(f.endswith(".key") for f in os.listdir(clients)), clients)
    return auth


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
