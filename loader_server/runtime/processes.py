"""Which processes are at the other end of a client's connection, and whether they are gone.

A share's arena slot that a member still held when it left is an *orphan* (arenas.py): that
process may still read it, so it is not reused. Once every process that could read it has
exited (its mappings went with it), the slot is safe to reuse. This module tells who those
processes are, as the kernel reports them, and whether they have exited:

* ``ipc://``: the pid the kernel gives for the peer of the unix socket (SO_PEERCRED, which
  libzmq appends to the connection's ``Peer-Address`` as ``:uid:gid:pid``), translated into the
  server's pid namespace; 0 (unknown) when the client has no pid there.
* loopback ``tcp://``: the processes that hold the client's end of the connection: its socket's
  inode in ``/proc/net/tcp`` (or ``tcp6``), found by the connection's two ends (`local_sockets`,
  which also tells the connection guard a local peer's user), then the
  processes of that socket's user whose descriptors include it (a trainer that forked after
  connecting counts with its children). That scan runs in a background thread, never in the
  event loop, and is bounded: a scan that takes too long finds nobody, scans take at most a
  tenth of the time (`SCAN_TIME_SHARE`), and at most `MAX_PENDING_SCANS` wait.

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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Ends", "LocalSocket", "PeerProcesses", "Process", "connection_ends", "ipc_peer_pid", "local_sockets",
           "tcp_ends", "tcp_peer_pids", "unmapped"]

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
    found them (loopback TCP). Unknown (never gone) until then, and when none could be told."""

    def __init__(self, processes: tuple[Process, ...] = (), scan: Future[tuple[Process, ...]] | None = None) -> None:
        self._processes, self._scan = processes, scan

    @classmethod
    def of(cls, pids: tuple[int, ...]) -> PeerProcesses:
        """The live processes among `pids`, now."""
        return cls(tuple(p for p in (Process.of(pid) for pid in pids) if p is not None))

    @classmethod
    def of_tcp(cls, fd: int) -> PeerProcesses:
        """The processes at the other end of the TCP connection `fd` (the server's descriptor of it, read
        now), found by a scan in the background: none for a peer that is not on loopback."""
        ends = tcp_ends(fd)
        return cls() if ends is None else cls(scan=_scanner.submit(ends))

    @property
    def processes(self) -> tuple[Process, ...]:
        if self._scan is not None and self._scan.done():
            scan, self._scan = self._scan, None
            self._processes = scan.result() if scan.exception() is None else ()
        return self._processes

    @property
    def known(self) -> bool:
        return bool(self.processes)

    def gone(self) -> bool:
        """True when they are known and every one has exited (unknown processes are never gone)."""
        return self.known and all(p.gone() for p in self.processes)

    def __str__(self) -> str:
        return ", ".join(f"pid {p.pid}" for p in self.processes) or "unknown processes"


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


def _scan_tcp_peer(ends: Ends, *, budget_s: float = SCAN_BUDGET_S) -> tuple[int, ...]:
    if not _scans.allow():
        return ()
    start = time.monotonic()
    try:
        found = local_sockets({ends}).get(ends)
        return () if found is None else _holders(f"socket:[{found.inode}]", found.uid, start + budget_s)
    finally:
        _scans.add(time.monotonic() - start)


class _Scanner:
    """One background thread that finds TCP peers' processes (so the event loop never scans /proc), with
    at most `MAX_PENDING_SCANS` waiting: beyond that a peer's processes are unknown."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, ends: Ends) -> Future[tuple[Process, ...]] | None:
        with self._lock:
            if self._pending >= MAX_PENDING_SCANS:
                return None
            self._pending += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader-peer-scan")
            pool = self._pool
        return pool.submit(self._scan, ends)

    def _scan(self, ends: Ends) -> tuple[Process, ...]:
        try:
            pids = _scan_tcp_peer(ends)
            return tuple(p for p in (Process.of(pid) for pid in pids) if p is not None)
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


def _holders(link: str, uid: int, deadline: float) -> tuple[int, ...]:
    """Pids of the processes of `uid` with a descriptor that is `link` (all or nothing by `deadline`)."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return ()
    for name in entries:
        if not name.isdigit():
            continue
        if time.monotonic() > deadline:
            return ()
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
