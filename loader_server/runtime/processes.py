"""Which processes are at the other end of a client's connection, and whether they are gone.

A share's arena slot that a member still held when it left is an *orphan* (arenas.py): that
process may still read it, so it is not reused. Once every process that could read it has
exited (its mappings went with it), the slot is safe to reuse. This module tells who those
processes are, as the kernel reports them, and whether they have exited:

* ``ipc://``: the pid the kernel gives for the peer of the unix socket (SO_PEERCRED, which
  libzmq appends to the connection's ``Peer-Address`` as ``:uid:gid:pid``), translated into the
  server's pid namespace; 0 (unknown) when the client has no pid there.
* loopback ``tcp://``: the processes that hold the client's end of the connection: its socket's
  inode in ``/proc/net/tcp`` (or ``tcp6``), found by the connection's two addresses, then the
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
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["PeerProcesses", "Process", "ipc_peer_pid", "tcp_addresses", "tcp_peer_pids"]

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
        addresses = tcp_addresses(fd)
        if addresses is None:
            return cls()
        return cls(scan=_scanner.submit(*addresses))

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


Address = tuple[str, int]


def tcp_addresses(fd: int) -> tuple[Address, Address] | None:
    """(the peer's address, ours) of the loopback TCP connection `fd`, or None (not one, or closed)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with sock:
        try:
            ours, theirs = sock.getsockname(), sock.getpeername()
        except OSError:
            return None
    if not (isinstance(theirs, tuple) and isinstance(ours, tuple) and _loopback(theirs[0])):
        return None
    return (str(theirs[0]), int(theirs[1])), (str(ours[0]), int(ours[1]))


def tcp_peer_pids(fd: int, *, budget_s: float = SCAN_BUDGET_S) -> tuple[int, ...]:
    """The pids of the processes holding the other end of the loopback TCP connection `fd` (the
    server's own descriptor of it), or () when it is not a loopback connection or they cannot be told.
    Scans /proc here and now (`PeerProcesses.of_tcp` does it in the background)."""
    addresses = tcp_addresses(fd)
    return () if addresses is None else _scan_tcp_peer(*addresses, budget_s=budget_s)


def _scan_tcp_peer(theirs: Address, ours: Address, *, budget_s: float = SCAN_BUDGET_S) -> tuple[int, ...]:
    if not _scans.allow():
        return ()
    start = time.monotonic()
    try:
        found = _socket_of(theirs, ours)
        if found is None:
            return ()
        uid, inode = found
        return _holders(f"socket:[{inode}]", uid, start + budget_s)
    finally:
        _scans.add(time.monotonic() - start)


class _Scanner:
    """One background thread that finds TCP peers' processes (so the event loop never scans /proc), with
    at most `MAX_PENDING_SCANS` waiting: beyond that a peer's processes are unknown."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._lock = threading.Lock()

    def submit(self, theirs: Address, ours: Address) -> Future[tuple[Process, ...]] | None:
        with self._lock:
            if self._pending >= MAX_PENDING_SCANS:
                return None
            self._pending += 1
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader-peer-scan")
            pool = self._pool
        return pool.submit(self._scan, theirs, ours)

    def _scan(self, theirs: Address, ours: Address) -> tuple[Process, ...]:
        try:
            pids = _scan_tcp_peer(theirs, ours)
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
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _proc_net(host: str, port: int) -> list[str]:
    """How /proc/net/tcp{,6} write the address (host, port): each 32-bit word hex in host byte order. An
    IPv4 address is also written as IPv4-mapped IPv6 (a dual-stack socket's, as libzmq's clients have)."""
    address = ipaddress.ip_address(host.split("%")[0])
    v4 = address if isinstance(address, ipaddress.IPv4Address) else address.ipv4_mapped
    forms: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {address}
    if v4 is not None:
        forms |= {v4, ipaddress.IPv6Address(f"::ffff:{v4}")}
    out = []
    for a in forms:
        words = struct.unpack(f"={len(a.packed) // 4}I", a.packed)
        out.append("".join(f"{w:08X}" for w in words) + f":{port:04X}")
    return out


def _socket_of(local: Address, remote: Address) -> tuple[int, int] | None:
    """(uid, inode) of the TCP socket whose own address is `local` and whose peer is `remote`."""
    locals_, remotes = set(_proc_net(*local)), set(_proc_net(*remote))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 10 and fields[1] in locals_ and fields[2] in remotes:
                try:
                    inode = int(fields[9])
                    return int(fields[7]), inode
                except ValueError:
                    return None
    return None


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
