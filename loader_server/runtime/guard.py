"""Bounds on each TCP connection of the client socket, enforced from outside ZeroMQ.

ZeroMQ keeps the frames of a message until its last frame arrives, and ZMQ_MAXMSGSIZE bounds
frames, not messages: a peer sending a message that never ends grows the server without
bound, and an empty frame (2 bytes on the wire) costs the library a 64-byte message slot, so
memory grows 32 times faster than the bytes sent. No socket option bounds it. The guard does:

* **Held bytes.** It learns each connection from the socket's monitor and compares what the
  kernel received on it (TCP_INFO) with the wire bytes of the requests the server took from
  it (`completed`, exact: a frame's body and its ZMTP framing, and CURVE's box). Whatever is
  neither is held inside ZeroMQ (an unfinished message, or requests not read yet) or was a
  ZMTP command the library answered itself (the handshake, heartbeats). The guard keeps a
  baseline of those command bytes that may grow only at the heartbeat rate since the last
  completed request, and is pinned down to the exact figure at every completed request (all
  bytes before a completed message were consumed: ZMTP is a byte stream). A connection
  holding more than `MAX_HELD_BYTES` beyond it is shut down. Memory per connection is then at
  most 32 x (MAX_HELD_BYTES + HANDSHAKE_BYTES + the heartbeat allowance) plus the bytes that
  arrive between two checks (`GUARD_INTERVAL_S`): see the README's threat model for the
  measured figure.
* **Idle connections.** A connection that completed no request for `idle_timeout_s` (the
  server's --client-timeout-s; a client pings every heartbeat) is shut down. An unfinished
  message blocks every later request on its connection, so this also bounds how long one can
  grow.
* **Connections per peer.** A peer is an address, but a local process (one connecting from
  127.0.0.0/8, ::1 or any other address of this host) is the user that owns the peer's socket
  (from /proc/net/tcp*), whatever address it chose: so that another local user cannot lock out
  this one's trainers, and so that one local user cannot multiply its bounds by connecting from
  127.0.0.2, 127.0.0.3, ... Beyond `per_host` connections a new one is marked refused: its first request is
  answered with an error naming --max-connections-per-host, then it is closed; one that sends
  nothing is closed after `REFUSED_GRACE_S`, and beyond `REFUSED_PENDING` waiting per peer the
  rest are closed as they arrive.

The checks run on a thread of their own every `GUARD_INTERVAL_S`, not on the event loop's
tick (a peer on loopback sends about 1 GB/s). The thread and the event loop share the
connection table under a lock; a shutdown goes through the guard's own duplicate of the
descriptor, so ZeroMQ sees an ordinary end of stream and drops the connection.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import socket
import struct
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import zmq

from ..logs import Throttle
from .processes import connection_ends, local_sockets, unmapped

__all__ = [
    "DEFAULT_CONNECTIONS_PER_HOST",
    "GUARD_INTERVAL_S",
    "HANDSHAKE_BYTES",
    "MAX_HELD_BYTES",
    "REFUSED_GRACE_S",
    "REFUSED_PENDING",
    "UNKNOWN_LOCAL_PEER",
    "Admission",
    "ConnectionGuard",
    "wire_bytes",
]

log = logging.getLogger("loader_server")

#: Wire bytes a connection may hold inside ZeroMQ (an unfinished message, requests not read yet).
MAX_HELD_BYTES = 128 << 10
#: Wire bytes of the ZMTP handshake allowed beyond any request (greeting, READY or CURVE's HELLO
#: and INITIATE with their metadata: a few hundred bytes for ZeroMQ's own peers).
HANDSHAKE_BYTES = 4 << 10
#: The socket's ZMTP heartbeat: a PING every so often, a connection silent this long after one is closed.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 10_000
#: Command bytes a peer may send per second beyond its requests (PONGs to our PINGs, its own PINGs).
HEARTBEAT_BYTES_PER_S = 64
#: TCP connections one peer may hold at once (the max_connections_per_host setting's default).
DEFAULT_CONNECTIONS_PER_HOST = 256
#: How often the guard compares each connection's bytes with its completed requests.
GUARD_INTERVAL_S = 0.005
#: A connection over the per-peer bound is closed this long after it arrived if it sent nothing.
REFUSED_GRACE_S = 2.0
#: Connections over the per-peer bound that may wait for their refusal at once, per peer.
REFUSED_PENDING = 8
#: After its refusal is sent, a refused connection is closed this much later (the reply leaves first).
_REFUSAL_LINGER_S = 0.2
#: Offset of tcpi_bytes_received in Linux's struct tcp_info (since Linux 4.1).
_TCP_BYTES_RECEIVED_OFFSET = 128
#: Closed connections whose peer is remembered (their last requests are read after they closed).
_CLOSED_KEPT = 4096
#: Addresses remembered as this host's own or not, and for how long (addresses can be added and removed).
_ADDRESSES_KEPT = 4096
_ADDRESS_TTL_S = 60.0
#: The peer a local connection is counted for when the user owning its socket cannot be found (its
#: socket already gone): one for all such, never an address a local user could choose.
UNKNOWN_LOCAL_PEER = "a local process of unknown uid"
#: Linux's IP_BIND_ADDRESS_NO_PORT: bind() checks the address without taking a port.
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
#: CURVE's MESSAGE command around each frame's body: "\x07MESSAGE", an 8-byte nonce, a 16-byte MAC, a flags byte.
_CURVE_BOX_BYTES = 33
_monitors = itertools.count()


def wire_bytes(body: int, *, curve: bool) -> int:
    """Exact wire bytes of one ZMTP 3 frame of `body` bytes (ZMTP framing; CURVE's box with --curve-dir)."""
    size = body + (_CURVE_BOX_BYTES if curve else 0)
    return size + (2 if size <= 255 else 9)


@dataclass(frozen=True)
class Admission:
    """What the guard says of a request's connection: its peer and, if refused, why."""

    peer: str
    refused: str = ""


@dataclass
class _Connection:
    sock: socket.socket  # our own duplicate of ZeroMQ's descriptor: the same connection, never another
    opened: float
    host: str  # the peer's address
    peer: str = ""  # the peer as counted and shown: the address, or for a local process its user ("uid N")
    completed: int = 0  # wire bytes of the requests it completed
    pin: float = 0.0  # unaccounted (command) bytes at `pinned_at`: the baseline of what may be held
    pinned_at: float = 0.0
    last_request: float = 0.0
    refused: str = ""  # why it is refused (over the per-peer bound); answered, then closed
    close_at: float = math.inf  # refused: when it is closed at the latest


class ConnectionGuard:
    """Bounds held bytes, idle time and connections per peer on the TCP connections of `sock`."""

    def __init__(self, ctx: zmq.Context[Any], sock: zmq.Socket[Any], *, curve: bool = False,
                 per_host: int = DEFAULT_CONNECTIONS_PER_HOST, idle_timeout_s: float = 30.0,
                 clock: Any = time.monotonic, interval_s: float = GUARD_INTERVAL_S) -> None:
        self.clock = clock
        self.interval_s = interval_s
        self.per_host = per_host
        self.curve = curve
        self.idle_timeout_s = idle_timeout_s
        self._peers: Counter[str] = Counter()  # open (admitted) connections per peer
        self._pending: Counter[str] = Counter()  # refused connections waiting for their answer, per peer
        self._unresolved: list[int] = []  # local connections whose owner is still to be found
        self._own: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # address -> (this host's?, when found)
        address = f"inproc://loader-server-connections-{os.getpid()}-{next(_monitors)}"
        sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self._sock = sock
        self._events: zmq.Socket[Any] = ctx.socket(zmq.PAIR)
        self._events.setsockopt(zmq.LINGER, 0)
        self._events.connect(address)
        self.connections: dict[int, _Connection] = {}
        self._closed: OrderedDict[int, tuple[str, str]] = OrderedDict()  # fd -> (peer, refusal) of closed ones
        self.cut = 0
        self.log = Throttle(log)
        self._lock = threading.RLock()  # the table, and the monitor socket (read by both threads)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ threads
    def start(self) -> None:
        """Check on a thread of its own until `close`; what it cuts is logged (throttled)."""
        self._thread = threading.Thread(target=self._run, name="loader-server-connection-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed_at = -math.inf
        while not self._stop.is_set():
            try:
                self.check()
            except zmq.ZMQError:  # the context is being torn down
                return
            except Exception:  # a bug here must not end the guard: the server would be unprotected
                if self.clock() - failed_at >= 60:
                    failed_at = self.clock()
                    log.exception("the connection guard failed on one check; it goes on")
            self._stop.wait(self.interval_s)

    # ------------------------------------------------------------------ the event loop's side
    def admit(self, fd: int, nbytes: int) -> Admission:
        """A request of `nbytes` wire bytes arrived from descriptor `fd`: count it, pin the baseline.

        Returns its connection's peer (and refusal). A connection already closed (its last
        requests are still read after it) gives the peer it had; one never seen, "an unknown peer".
        """
        with self._lock:
            # Events first: a closed connection's number may name this new one already, and the
            # monitor wrote its closing and the new one's accepting before this request arrived.
            self._follow_events()
            conn = self.connections.get(fd)
            if conn is None:  # closed already (its requests stay readable after it), or never seen
                gone = self._closed.get(fd)
                return Admission(gone[0], gone[1]) if gone is not None else Admission("an unknown peer")
            conn.completed += nbytes
            now = self.clock()
            conn.last_request = now
            received = _received(conn.sock)
            if received is not None:  # everything before this request's end was consumed
                unaccounted = received - conn.completed
                baseline = conn.pin + HEARTBEAT_BYTES_PER_S * (now - conn.pinned_at)
                conn.pin, conn.pinned_at = min(baseline, max(0, unaccounted)), now
            if conn.refused:
                conn.close_at = min(conn.close_at, now + _REFUSAL_LINGER_S)
            return Admission(conn.peer or conn.host, conn.refused)

    # ------------------------------------------------------------------ the guard's thread
    def check(self) -> list[str]:
        """Follow connections opening and closing; close those over a bound. Returns what was cut."""
        cut: list[str] = []
        with self._lock:
            self._follow_events()
            connections = list(self.connections.items())
        now = self.clock()
        for fd, conn in connections:
            why = self._over(conn, now)  # reads what `admit` updates: at worst one request late
            if why:
                with self._lock:
                    if self.connections.get(fd) is conn:
                        self._shut(fd, conn)
                        cut.append(why)
        for line in cut:
            self.log.warning("guard-cut", "%s", line)
        return cut

    def _over(self, conn: _Connection, now: float) -> str:
        """Why `conn` must be closed now, or ''."""
        if conn.refused:
            return "" if now < conn.close_at else f"closed a connection from {conn.peer}: {conn.refused}"
        received = _received(conn.sock)
        if received is None:
            return ""
        baseline = conn.pin + HEARTBEAT_BYTES_PER_S * (now - conn.pinned_at)
        held = received - conn.completed - baseline
        if held > MAX_HELD_BYTES:
            return (f"closed the connection from {_address(conn)}: it holds {held:.0f} bytes in ZeroMQ beyond the "
                    f"requests it completed (a message that never ends?); the bound is {MAX_HELD_BYTES} bytes")
        if now - max(conn.last_request, conn.opened) > self.idle_timeout_s:
            return (f"closed the connection from {_address(conn)}: no request for {self.idle_timeout_s:g} s "
                    "(--client-timeout-s)")
        return ""

    def _follow_events(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        while True:
            try:
                event = parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                accepted = _accepted_connection(fd, event["endpoint"])
                if accepted is not None:
                    dup, host = accepted
                    now = self.clock()
                    old = self.connections.pop(fd, None)
                    if old is not None:  # its closing event is still to come: that number is reused
                        self._forget(old)
                    conn = _Connection(dup, now, host, pin=HANDSHAKE_BYTES, pinned_at=now, last_request=now)
                    self.connections[fd] = conn
                    if self._is_local(host):
                        self._unresolved.append(fd)
                    else:
                        self._place(fd, conn, host)
            else:
                gone = self.connections.pop(fd, None)
                if gone is not None:
                    self._forget(gone, fd)
        if self._unresolved:
            self._resolve_local()

    def _is_local(self, host: str) -> bool:
        """Whether `host` is one of this host's own addresses (a peer there is a local process)."""
        if _is_loopback(host):
            return True
        now = self.clock()
        known = self._own.get(host)
        if known is None or now - known[1] > _ADDRESS_TTL_S:
            known = (_is_own_address(host), now)
            self._own[host] = known
            while len(self._own) > _ADDRESSES_KEPT:
                self._own.popitem(last=False)
        self._own.move_to_end(host)
        return known[0]

    def _resolve_local(self) -> None:
        """Name local peers by the user owning the peer's socket alone (one read of /proc/net/tcp*): not
        by address, which a local process chooses (127.0.0.2, 127.0.0.3, ... or another of the host's)."""
        fds, self._unresolved = self._unresolved, []
        ends = {fd: e for fd in fds if (c := self.connections.get(fd)) is not None
                and (e := connection_ends(c.sock)) is not None}
        owners = {e: s.uid for e, s in local_sockets(set(ends.values())).items()}
        for fd in fds:
            conn = self.connections.get(fd)
            if conn is None or conn.peer:
                continue
            end = ends.get(fd)
            uid = owners.get(end) if end else None
            if uid is not None:
                peer = f"uid {uid}"
            else:  # its socket is gone already; on loopback never the address, which its process chose
                peer = UNKNOWN_LOCAL_PEER if _is_loopback(conn.host) else conn.host
            self._place(fd, conn, peer)

    def _place(self, fd: int, conn: _Connection, peer: str) -> None:
        """Count `conn` for `peer`, or mark it refused (or close it) when the peer is at its bound."""
        conn.peer = peer
        if self._peers[peer] < self.per_host:
            self._peers[peer] += 1
            return
        reason = (f"{peer} already holds {self.per_host} connections (--max-connections-per-host "
                  f"{self.per_host}): close idle ones, or raise the setting")
        if self._pending[peer] >= REFUSED_PENDING:  # too many waiting to hear it: close at once
            self.connections.pop(fd, None)
            self._shut(fd, conn, counted=False)
            self._closed[fd] = (peer, reason)  # a request it sent already is refused, not served
            self.log.warning("guard-refused", "closed connection(s) from %s as they arrived: %s", peer, reason)
            return
        self._pending[peer] += 1
        conn.refused = reason
        conn.close_at = conn.opened + REFUSED_GRACE_S

    def _shut(self, fd: int, conn: _Connection, *, counted: bool = True) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connections.pop(fd, None)
        if counted:
            self._forget(conn, fd)
        else:
            conn.sock.close()
        self.cut += 1

    def _forget(self, conn: _Connection, fd: int | None = None) -> None:
        conn.sock.close()
        if fd is not None:  # requests read after it closed still name their peer
            self._closed[fd] = (conn.peer or conn.host, conn.refused)
            self._closed.move_to_end(fd)
            while len(self._closed) > _CLOSED_KEPT:
                self._closed.popitem(last=False)
        counter = self._pending if conn.refused else self._peers
        if conn.peer and counter[conn.peer] > 0:
            counter[conn.peer] -= 1
            if counter[conn.peer] <= 0:
                del counter[conn.peer]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            self._sock.disable_monitor()
            self._events.close(linger=0)
            for conn in self.connections.values():
                conn.sock.close()
            self.connections.clear()


def _received(sock: socket.socket) -> int | None:
    """Bytes the kernel received on this TCP connection so far; None if it cannot say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        value: int = struct.unpack_from("Q", info, _TCP_BYTES_RECEIVED_OFFSET)[0]
        return value
    except (OSError, struct.error):
        return None


def _address(conn: _Connection) -> str:
    """HOST:PORT of the connection's peer, and who it is counted for when that is not its address."""
    shown = f" ({conn.peer})" if conn.peer and conn.peer != conn.host else ""
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}{shown}"
    except OSError:
        return conn.peer or conn.host


def _is_loopback(host: str) -> bool:
    return host == "::1" or host.startswith("127.")


def _is_own_address(host: str) -> bool:
    """Whether `host` is an address of this host: one a socket can be bound to (no port is taken).

    Only "cannot assign that address" says no; any other failure says yes, and the peer is then
    looked up in /proc/net/tcp* (found there only if it is a local process).
    """
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            with contextlib.suppress(OSError):
                probe.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            probe.bind((host, 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    except (ValueError, UnicodeError):  # not an address at all
        return False
    return True


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
            return dup, unmapped(str(peer[0]))
    except (OSError, ValueError, IndexError):
        pass
    dup.close()
    return None
