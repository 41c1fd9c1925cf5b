"""Which processes are at the other end of a client's connection, and whether they are gone.

A share's arena slot that a member still held when it left is an *orphan* (arenas.py): that
process may still read it, so it is not reused. Once every process that could read it has
exited (its mappings went with it), the slot is safe to reuse. This module tells who those
processes are, as the kernel reports them, and whether they have exited:

* ``ipc://``: the pid the kernel gives for the peer of the unix socket (SO_PEERCRED, which
  libzmq appends to the connection's ``Peer-Address`` as ``:uid:gid:pid``), translated into the
  server's pid namespace; 0 (unknown) when the client has no pid there. The peer's end of the
  socket (its inode, from sock_diag: `unix_peer_inode`) is kept to look for its holders later.
* loopback ``tcp://``: the processes that hold the client's end of the connection: its socket's
  inode in ``/proc/net/tcp`` (or ``tcp6``), found by the connection's two ends (`local_sockets`,
  which also tells the connection guard a local peer's user), then the
  processes of that socket's user whose descriptors include it (a trainer that forked after
  connecting counts with its children). That scan runs in a background thread, never in the
  event loop, and is bounded: a scan that takes too long finds nobody, scans take at most a
  tenth of the time (`SCAN_TIME_SHARE`), and at most `MAX_PENDING_SCANS` wait.

Once every process known has exited, the holders of the peer's end of the connection are looked
for again (in the same background thread, under the same bounds), and any found alive join them:
a trainer that forked after connecting or after the first scan (its child inherited the arena's
mapping and the connection) is not gone while that child lives. Found none: gone. A scan refused
or out of time: not yet.

A pid alone is not a process: pids are reused. A `Process` is a pid and its start time (field
22 of ``/proc/PID/stat``, in clock ticks since boot), so a new process under the same pid is
never taken for the old one. A zombie has released its memory: it counts as gone (unless other
threads of its process still run). Where no
process is known (another pid namespace, another host, a scan refused), nothing is ever called
gone, and the slots stay orphans until the share closes, as before.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["Ends", "LocalSocket", "PeerProcesses", "Process", "connection_ends", "ipc_peer_pid", "local_sockets",
           "tcp_ends", "tcp_peer_pids", "unix_peer_inode", "unmapped"]

#: The longest a scan of /proc for a TCP peer's processes may take (one per member that maps a share's
#: arena, in a background thread); past it the peer's processes are unknown.
SCAN_BUDGET_S = 2.0
#: Scans take at most this share of the time (over `_SCAN_WINDOW_S`): a local peer that says hello
#: again and again cannot keep the server scanning /proc; beyond it, unknown.
SCAN_TIME_SHARE = 0.1
#: Scans that may wait for the scanning thread; beyond it, unknown.
MAX_PENDING_SCANS = 64
_SCAN_WINDOW_S = 10.0


class _ScanClock:
    """The time spent scanning recently, decaying over `_SCAN_WINDOW_S` (used by the one scanning thread)."""

    def __init__(self) -> None:
        self.spent, self.at = 0.0, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.spent *= max(0.0, 1.0 - (now - self.at) / _SCAN_WINDOW_S)
        self.at = now
        return self.spent < SCAN_TIME_SHARE * _SCAN_WINDOW_S

    def add(self, seconds: float) -> None:
        self.spent += seconds


_scans = _ScanClock()


@dataclass(frozen=True)
class Process:
    """One process: its pid and when it started (which tells it from a later process with its pid)."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Process | None:
        """The live process `pid` now, or None (no such pid here, or already exited)."""
        start = _live_start(pid)
        return None if start is None else cls(pid, start)

    def gone(self) -> bool:
        """True once this process has exited (its pid gone, a zombie, or reused by another process)."""
        return _live_start(self.pid) != self.start


class PeerProcesses:
    """The processes behind one client connection: told at once (ipc), or once a background scan has
    found them (loopback TCP). Unknown (never gone) until then, and when none could be told.

    Where the peer's end of the connection is known (`link`, ``socket:[inode]``, with its user), the
    processes that hold it are looked for again once every process known has exited: a trainer that
    forked after connecting (a data-loader worker, a forked evaluation) has the arena mapped too and
    holds the socket it inherited, so it is added, and the processes are gone only when a scan finds
    nobody holding that socket any more (or none found is alive)."""

    def __init__(self, processes: tuple[Process, ...] = (), scan: Future[_Found | None] | None = None,
                 link: str | None = None, uid: int = -1) -> None:
        self._processes, self._scan = processes, scan
        self._link, self._uid = link, uid
        self._again: Future[_Found | None] | None = None  # a scan for the holders of `link` under way

    @classmethod
    def of(cls, pids: tuple[int, ...]) -> PeerProcesses:
        """The live processes among `pids`, now."""
        return cls(tuple(p for p in (Process.of(pid) for pid in pids) if p is not None))

    @classmethod
    def of_ipc(cls, pid: int, fd: int, uid: int) -> PeerProcesses:
        """The ipc peer `pid` (SO_PEERCRED), and the holders of its end of the connection `fd` (the server's
        descriptor of it, read now: `unix_peer_inode`) once `pid` has exited. Without that end (no sock_diag
        in this kernel, a closed descriptor), `pid` alone, as before."""
        peer = cls.of((pid,))
        inode = unix_peer_inode(fd) if fd >= 0 and uid >= 0 and peer.known else None
        if inode is not None:
            peer._link, peer._uid = f"socket:[{inode}]", uid
        return peer

    @classmethod
    def of_tcp(cls, fd: int) -> PeerProcesses:
        """The processes at the other end of the TCP connection `fd` (the server's descriptor of it, read
        now), found by a scan in the background: none for a peer that is not on loopback."""
        ends = tcp_ends(fd)
        return cls() if ends is None else cls(scan=_scanner.submit(_scan_tcp_peer_found, ends))

    @property
    def processes(self) -> tuple[Process, ...]:
        if self._scan is not None and self._scan.done():
            scan, self._scan = self._scan, None
            found = scan.result() if scan.exception() is None else None
            if found is not None:
                self._processes, self._link, self._uid = found
        return self._processes

    @property
    def known(self) -> bool:
        return bool(self.processes)

    def gone(self) -> bool:
        """True when they are known and every one has exited (unknown processes are never gone), and no
        process holds the peer's end of the connection any more (looked for in the background)."""
        processes = self.processes
        if not processes or not all(p.gone() for p in processes):
            return False
        if self._link is None:
            return True
        if self._again is None:
            self._again = _scanner.submit(_holders_found, self._link, self._uid)
            if self._again is None:  # too many scans waiting: not now
                return False
        if not self._again.done():
            return False
        again, self._again = self._again, None
        found = again.result() if again.exception() is None else None
        if found is None:  # the scan was refused or ran out of time: they cannot be told gone yet
            return False
        if found[0]:  # (a process that forked after connecting, or after the last scan)
            self._processes = tuple(dict.fromkeys(processes + found[0]))
            return False
        return True

    def __str__(self) -> str:
        return ", ".join(f"pid {p.pid}" for p in self.processes) or "unknown processes"


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2
_NLMSG_ERROR = 2
_NO_COOKIE = 0xFFFFFFFF


def unix_peer_inode(fd: int) -> int | None:
    """The inode of the other end of the unix socket `fd` (the server's descriptor of an ipc connection),
    asked of the kernel with sock_diag (``UNIX_DIAG_PEER``, what ``ss -x`` shows); None where it cannot be
    told (no unix_diag in this kernel, not a unix socket, closed)."""
    try:
        inode = os.fstat(fd).st_ino
        request = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, inode, _UDIAG_SHOW_PEER, _NO_COOKIE,
                              _NO_COOKIE)  # unix_diag_req: every state, this inode, its peer; no cookie check
        header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0)  # NLM_F_REQUEST
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)
            nl.send(header + request)
            data = nl.recv(8192)
        length, kind = struct.unpack_from("=IH", data)
        if kind == _NLMSG_ERROR or length > len(data) or struct.unpack_from("=I", data, 20)[0] != inode:
            return None
        at = 16 + 16  # nlmsghdr, unix_diag_msg; then its attributes
        while at + 4 <= length:
            size, attribute = struct.unpack_from("=HH", data, at)
            if size < 4:
                return None
            if attribute == _UNIX_DIAG_PEER and size >= 8:
                peer: int = struct.unpack_from("=I", data, at + 4)[0]
                return peer or None
            at += (size + 3) & ~3
    except (OSError, struct.error):
        return None
    return None


def ipc_peer_pid(peer_address: str | None) -> int:
    """The pid in libzmq's ``Peer-Address`` of an ipc connection (``...:uid:gid:pid``), or 0."""
    parts = (peer_address or "").split(":")
    if len(parts) != 4 or not parts[3].isdigit():
        return 0
    return int(parts[3])


#: A TCP connection by its two ends: ((peer host, port), (our host, port)), hosts as /proc/net/tcp* writes
#: them (IPv4-mapped IPv6 as IPv4, no IPv6 scope).
Ends = tuple[tuple[str, int], tuple[str, int]]


class LocalSocket(NamedTuple):
    """The peer's end of a local TCP connection, from /proc/net/tcp*: its owner and its inode."""

    uid: int
    inode: int


def connection_ends(sock: socket.socket) -> Ends | None:
    """The two ends of the TCP connection `sock`, or None (closed)."""
    try:
        peer, ours = sock.getpeername(), sock.getsockname()
    except OSError:
        return None
    return (_bare(str(peer[0])), int(peer[1])), (_bare(str(ours[0])), int(ours[1]))


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address written as IPv4 (any other unchanged)."""
    return host.removeprefix("::ffff:") if host.startswith("::ffff:") and "." in host else host


def _bare(host: str) -> str:
    return unmapped(host.split("%", 1)[0])


def local_sockets(ends: set[Ends]) -> dict[Ends, LocalSocket]:
    """The peer's end of each local TCP connection in `ends` (its owner and inode), from /proc/net/tcp*:
    the row whose local end is the peer's and whose remote end is ours (any state but TIME_WAIT, whose
    rows have no owner)."""
    if not ends:
        return {}
    wanted = {peer[1] for peer, _ in ends}
    found: dict[Ends, LocalSocket] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] == "06":  # TIME_WAIT
                        continue
                    hex_host, _, hex_port = fields[1].rpartition(":")
                    port = int(hex_port, 16)
                    if port not in wanted:
                        continue
                    remote_host, _, remote_port = fields[2].rpartition(":")
                    end = ((_proc_address(hex_host), port), (_proc_address(remote_host), int(remote_port, 16)))
                    if end in ends:
                        found[end] = LocalSocket(int(fields[7]), int(fields[9]))
        except (OSError, ValueError):
            continue
    return found


def _proc_address(hex_host: str) -> str:
    """An address as /proc/net/tcp* writes it (host-order 32-bit words), as getpeername() does."""
    raw = bytes.fromhex(hex_host)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    return unmapped(socket.inet_ntop(socket.AF_INET6, words))


def tcp_ends(fd: int) -> Ends | None:
    """The two ends of the loopback TCP connection `fd` (the server's descriptor of it), or None (not
    one, or closed)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with sock:
        ends = connection_ends(sock) if sock.family in (socket.AF_INET, socket.AF_INET6) else None
    return ends if ends is not None and _loopback(ends[0][0]) else None


def tcp_peer_pids(fd: int, *, budget_s: float = SCAN_BUDGET_S) -> tuple[int, ...]:
    """The pids of the processes holding the other end of the loopback TCP connection `fd` (the
    server's own descriptor of it), or () when it is not a loopback connection or they cannot be told.
    Scans /proc here and now (`PeerProcesses.of_tcp` does it in the background)."""
    ends = tcp_ends(fd)
    return () if ends is None else _scan_tcp_peer(ends, budget_s=budget_s)


#: The peer's end of a connection and the pids that hold it (None: not told in time).
_PeerEnd = tuple["LocalSocket", tuple[int, ...] | None]


def _scan_tcp_peer(ends: Ends, *, budget_s: float = SCAN_BUDGET_S) -> tuple[int, ...]:
    found = _scan_tcp_peer_end(ends, budget_s=budget_s)
    return () if found is None or found[1] is None else found[1]


def _scan_tcp_peer_end(ends: Ends, *, budget_s: float = SCAN_BUDGET_S) -> _PeerEnd | None:
    """The peer's end of the loopback connection `ends` and the pids that hold it (None: not told in time)."""
    if not _scans.allow():
        return None
    start = time.monotonic()
    try:
        found = local_sockets({ends}).get(ends)
        return None if found is None else (found, _holders(f"socket:[{found.inode}]", found.uid, start + budget_s))
    finally:
        _scans.add(time.monotonic() - start)


#: What a scan found: the live processes, the peer's end of the connection (``socket:[inode]``, looked for again
#: once they have all exited) and its user; None: nothing could be told.
_Found = tuple[tuple[Process, ...], str | None, int]


def _live(pids: tuple[int, ...]) -> tuple[Process, ...]:
    return tuple(p for p in (Process.of(pid) for pid in pids) if p is not None)


def _scan_tcp_peer_found(ends: Ends) -> _Found | None:
    found = _scan_tcp_peer_end(ends)
    if found is None:
        return None
    end, pids = found
    return None if pids is None else (_live(pids), f"socket:[{end.inode}]", end.uid)


def _holders_found(link: str, uid: int) -> _Found | None:
    """The live processes of `uid` that hold `link` now (None: the scan was refused or ran out of time)."""
    if not _scans.allow():
        return None
    start = time.monotonic()
    try:
        pids = _holders(link, uid, start + SCAN_BUDGET_S)
    finally:
        _scans.add(time.monotonic() - start)
    return None if pids is None else (_live(pids), link, uid)


class _Scanner:
    """One background thread that finds peers' processes (so the event loop never scans /proc), with
    at most `MAX_PENDING_SCANS` waiting: beyond that a peer's processes are unknown."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, scan: Callable[..., _Found | None], *args: Any) -> Future[_Found | None] | None:
        with self._lock:
            if self._pending >= MAX_PENDING_SCANS:
                return None
            self._pending += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader-peer-scan")
            pool = self._pool
        return pool.submit(self._run, scan, *args)

    def _run(self, scan: Callable[..., _Found | None], *args: Any) -> _Found | None:
        try:
            return scan(*args)
        finally:
            with self._lock:
                self._pending -= 1


_scanner = _Scanner()


def _live_start(pid: int) -> int | None:
    """The start time of the live process `pid`, or None: no such pid, or a zombie (whose memory is
    released; a thread-group leader that exited before its other threads shows as one too, and is
    alive while they run)."""
    stat = _stat(pid)
    if stat is None:
        return None
    state, start = stat
    if state in "ZXx":
        try:
            threads = len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            threads = 0
        if threads <= 1:
            return None
    return start


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of `pid` from /proc/PID/stat, or None."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the name in parentheses may hold spaces and ')'
    try:
        return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime) of proc(5)
    except (IndexError, ValueError):
        return None


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _holders(link: str, uid: int, deadline: float) -> tuple[int, ...] | None:
    """Pids of the processes of `uid` with a descriptor that is `link` (all, or None by `deadline`)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for name in entries:
        if not name.isdigit():
            continue
        if time.monotonic() > deadline:
            return None
        try:
            if os.stat(f"/proc/{name}").st_uid not in (uid, 0):  # 0: a process that is not dumpable
                continue
            with os.scandir(f"/proc/{name}/fd") as fds:
                if any(_readlink(e.path) == link for e in fds):
                    pids.append(int(name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return tuple(pids)


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
