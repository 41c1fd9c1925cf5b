"""Shared-memory arenas: the same-host fast path for batch pixels.

For a client on the same host, the server creates one anonymous arena per session with
`create_arena`: a ``memfd`` (no name in /dev/shm, nothing to leak when a process is killed),
sized once and sealed (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``) so that nobody, the
server included, can truncate it under a mapping and kill the trainer with SIGBUS. Workers
decode straight into a slot; only the slot number travels over ZeroMQ.

The client trusts none of what the server says about the arena. `open_arena` builds the
path ``/proc/<pid>/fd/<fd>`` from two integers of the welcome (never a path the server sent),
and after opening checks what the descriptor really is: a memfd (its link reads
``/memfd:...``, and ``F_GET_SEALS`` succeeds, which it does only on a memfd), a regular file
with the announced inode, large enough for every slot, and sealed against shrinking. And that
it is this stream's own: the client's hello carries a fresh random key (`Hello.shm_key`) that
the server writes after the last slot (`ARENA_KEY_MAGIC` + the key) before it seals the arena,
and an arena without that key is refused. Inodes and fd numbers are easy to guess, and a
lying server could announce another trainer's arena that this client can open (same uid); it
cannot write this client's key into it, and reading another session's welcome or hello tells
it nothing that helps (each key is one client's, for one stream). Linux
lets only the same user (or a process allowed to ptrace the server) open another process's
fd. A client that cannot (another user, another PID namespace: a trainer in another
container) asks for the descriptor itself with `receive_arena`, on the server's channel beside
its ipc socket (`arena_channel_path`), presenting the token of its welcome; the descriptor it
gets is checked exactly as one opened through /proc. A client that gets none falls back to
frames over the socket.
"""

from __future__ import annotations

import array
import errno
import fcntl
import hmac
import math
import mmap
import os
import re
import secrets
import socket
import stat
from typing import Any

import numpy as np

from .errors import ProtocolError
from .messages import ARENA_KEY_BYTES, MAX_ARENA_KEYS, ArenaHandle
from .protocol import ALLOWED_DTYPES

__all__ = [
    "ARENA_CHANNEL_REQUEST",
    "ARENA_KEY_ENTRY",
    "ARENA_KEY_MAGIC",
    "ARENA_SEALS",
    "ARENA_TOKEN_BYTES",
    "MAX_ARENA_NAME",
    "Arena",
    "arena_channel_path",
    "arena_key",
    "create_arena",
    "new_arena_key",
    "open_arena",
    "receive_arena",
    "shm_available",
    "write_arena_key",
]

_PAGE = mmap.PAGESIZE
#: Seals every arena carries: its size can never change, and no seal can be removed or added.
ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: Longest memfd name passed to the kernel (it allows 249 bytes).
MAX_ARENA_NAME = 64
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")
#: What a client sends on the arena channel, followed by its token in hex (one SOCK_SEQPACKET message).
ARENA_CHANNEL_REQUEST = b"loader-arena "
#: Random bytes of an arena's token.
ARENA_TOKEN_BYTES = 16
#: Room for more descriptors than the one expected, so that extra ones are seen (and closed).
_MAX_PASSED_FDS = 4
#: Written after an arena's last slot, followed by its client's key.
ARENA_KEY_MAGIC = b"loader-arena-key"


def new_arena_key() -> str:
    """A fresh key for one stream's arena (hex), sent in its hello."""
    return secrets.token_hex(ARENA_KEY_BYTES)


def arena_key(text: str | None) -> bytes | None:
    """The bytes of a hello's `shm_key` (its schema checked the hex), or None."""
    return None if text is None else bytes.fromhex(text)


def arena_channel_path(ipc_path: str) -> str:
    """The arena channel's socket beside the ipc socket at `ipc_path` (both sides derive it)."""
    return ipc_path + ".arenas"


def shm_available() -> bool:
    """True where sealed anonymous shared memory can be created and shared (Linux)."""
    return (hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING") and hasattr(fcntl, "F_GET_SEALS")
            and os.path.isdir("/proc/self/fd"))


def arena_name(name: str) -> str:
    """`name` made safe for memfd_create: letters, digits, ``._-`` only, at most MAX_ARENA_NAME."""
    return _UNSAFE_NAME_CHARS.sub("_", name)[:MAX_ARENA_NAME] or "arena"


#: One entry of an arena's key table: `ARENA_KEY_MAGIC` and a client's key.
ARENA_KEY_ENTRY = len(ARENA_KEY_MAGIC) + ARENA_KEY_BYTES
assert MAX_ARENA_KEYS * ARENA_KEY_ENTRY <= _PAGE


def write_arena_key(fd: int, slots: int, stride: int, key_slot: int, key: bytes | None) -> None:
    """Write `key` (None: erase) into entry `key_slot` of the key table after an arena's last slot."""
    if not 0 <= key_slot < MAX_ARENA_KEYS:
        raise ValueError(f"an arena has key slots 0 to {MAX_ARENA_KEYS - 1}, not {key_slot}")
    entry = ARENA_KEY_MAGIC + key if key is not None else bytes(ARENA_KEY_ENTRY)
    os.pwrite(fd, entry, stride * slots + key_slot * ARENA_KEY_ENTRY)


def create_arena(name: str, slots: int, slot_bytes: int, *, key: bytes | None = None) -> tuple[int, int]:
    """Create a sealed arena of `slots` page-aligned slots; returns (fd, slot stride in bytes).

    The memfd is sized (one page more than the slots), its client's `key` written after the
    last slot, then sealed against shrinking, growing and further sealing, before its fd is
    announced to anyone. `name` (a client may choose part of it) is sanitised.
    """
    if not (isinstance(slots, int) and slots >= 1):
        raise ValueError(f"an arena needs at least one slot, got {slots!r}")
    stride = math.ceil(max(slot_bytes, 1) / _PAGE) * _PAGE
    fd = os.memfd_create(arena_name(name), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, stride * slots + _PAGE)
        if key is not None:
            write_arena_key(fd, slots, stride, 0, key)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
    except OSError:
        os.close(fd)
        raise
    return fd, stride


def open_arena(handle: ArenaHandle, key: bytes, *, writable: bool = True, private: bool = False) -> Arena | None:
    """Map the arena `handle` announces, after checking it is that sealed memfd, holding `key`.

    Returns None when this process may not open the descriptor at all (another user, another
    pid namespace): the caller falls back to frames. Raises `ProtocolError` when what it
    opened is not the announced arena (a regular file, a pipe, a memfd that is not sealed
    against shrinking, the wrong inode, too small, without this stream's key).
    """
    path = handle.path  # built from two integers, never a path the server sent
    try:
        target = os.readlink(path)  # a first look, so nothing but a memfd is ever opened; checked again below
    except OSError:
        return None
    if not target.startswith("/memfd:"):
        raise ProtocolError(f"the shared-memory arena announced as {path} is not a memfd but {target[:120]!r}: "
                            "the server tried to make this client map something else")
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        _check_is_arena(fd, handle, key)
        return Arena.from_fd(fd, handle.slots, handle.stride, writable=writable, path=path, private=private)
    finally:
        os.close(fd)


def receive_arena(channel_path: str, handle: ArenaHandle, key: bytes, *, timeout_s: float, server_uid: int | None,
                  writable: bool = True, private: bool = False) -> Arena | None:
    """Ask the server's arena channel at `channel_path` for the arena `handle` announces, and map it.

    Returns None when there is no channel, it does not answer within `timeout_s`, its listener
    is not `server_uid` (the user that owns the server's ipc socket, as SO_PEERCRED tells), or it
    has no arena for this token. Raises `ProtocolError` when the descriptor it passed is not
    the announced arena (the checks of `open_arena`), or when it passed more than one.
    """
    if not handle.token:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(channel_path)
            uid = socket_peer(sock)[1]
            if server_uid is not None and uid != server_uid:
                return None  # not the server's own channel: a squatter in the socket's folder
            sock.sendall(ARENA_CHANNEL_REQUEST + handle.token.encode("ascii"))
            answer, ancillary, flags, _ = sock.recvmsg(16, socket.CMSG_SPACE(_MAX_PASSED_FDS * 4))
        except OSError:
            return None
    fds = _passed_fds(ancillary)
    try:
        if flags & socket.MSG_CTRUNC or len(fds) > 1:
            raise ProtocolError(f"the shared-memory channel {channel_path} passed {len(fds)} or more descriptors "
                                "for one arena")
        if answer != b"ok" or not fds:
            return None
        fd = fds.pop()
        try:
            _check_is_arena(fd, handle, key, where=f"the shared-memory arena passed by {channel_path}")
            return Arena.from_fd(fd, handle.slots, handle.stride, writable=writable, path=channel_path,
                                 private=private)
        finally:
            os.close(fd)
    finally:
        for extra in fds:
            os.close(extra)


def socket_peer(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a unix socket's peer, as the kernel tells them (pid 0: not in this namespace)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid, gid = array.array("i", creds)
    return pid, uid, gid


def _passed_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
    return fds


def _check_is_arena(fd: int, handle: ArenaHandle, key: bytes, *, where: str | None = None) -> None:
    where = where or f"the shared-memory arena announced as {handle.path}"
    target = os.readlink(f"/proc/self/fd/{fd}")
    if not target.startswith("/memfd:"):
        raise ProtocolError(f"{where} is not a memfd but {target[:120]!r}: the server tried to make this client "
                            "map something else")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolError(f"{where} is not a regular memfd")
    if info.st_ino != handle.inode:
        raise ProtocolError(f"{where} has inode {info.st_ino}, not the announced {handle.inode}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ProtocolError(f"{where} is not a memfd (F_GET_SEALS refused)") from None
        raise ProtocolError(f"{where}: F_GET_SEALS failed ({exc.strerror})") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ProtocolError(f"{where} is not sealed against shrinking (seals {seals:#x}): a truncation could kill "
                            "this trainer with SIGBUS, so it is not mapped")
    needed = handle.slots * handle.stride
    if info.st_size < needed:
        raise ProtocolError(f"{where} holds {info.st_size} bytes, but {handle.slots} slots of {handle.stride} "
                            f"need {needed}")
    entry = os.pread(fd, ARENA_KEY_ENTRY, needed + handle.key_slot * ARENA_KEY_ENTRY)
    if len(key) != ARENA_KEY_BYTES or not hmac.compare_digest(entry, ARENA_KEY_MAGIC + key):
        raise ProtocolError(f"{where} does not hold the key this client gave for its own arena: it is not this "
                            "stream's (another trainer's arena, or a server that does not bind arenas to their "
                            "client), so it is not mapped")


#: /proc/self/pagemap bits (Documentation/admin-guide/mm/pagemap.rst): present in memory, swapped out, a page
#: of a file or shared (not this process's own copy). Readable by the process itself, PFNs hidden.
_PAGE_PRESENT, _PAGE_SWAPPED, _PAGE_OF_FILE = 1 << 63, 1 << 62, 1 << 61


def _holds_private_pages(address: int, size: int) -> bool | None:
    """Whether this process has its own copy of any page of [address, address + size) (page-aligned): a page
    it wrote in a copy-on-write mapping, present or swapped out. None where the kernel cannot tell
    (/proc/self/pagemap not readable here): the caller then assumes it has. Opened on each call: a
    descriptor kept would read the opener's pages in a forked child."""
    count = size // _PAGE
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 8 * count, 8 * (address // _PAGE))
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) != 8 * count:
        return None
    entries = np.frombuffer(raw, np.uint64)
    own = (entries & np.uint64(_PAGE_PRESENT | _PAGE_OF_FILE)) == np.uint64(_PAGE_PRESENT)
    return bool(own.any() or (entries & np.uint64(_PAGE_SWAPPED)).any())


class Arena:
    """A mapping of an arena: `slots` slots of `stride` bytes."""

    def __init__(self, path: str, slots: int, stride: int, *, writable: bool) -> None:
        """Open `path` (a /proc/PID/fd/N path the caller built itself) without the memfd checks.

        Used by the server's own workers, whose parent created the arena; a client uses
        `open_arena`, which checks the descriptor first.
        """
        if not re.fullmatch(r"/proc/[0-9]+/fd/[0-9]+", path):
            raise ProtocolError(f"shared-memory path {path!r} is not a /proc/PID/fd/N path")
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            self._setup(fd, slots, stride, writable, path)
        finally:
            os.close(fd)

    @classmethod
    def from_fd(cls, fd: int, slots: int, stride: int, *, writable: bool, path: str = "",
                private: bool = False) -> Arena:
        """Map `fd` (the caller keeps and closes it). `private`: what this process writes stays its own
        (copy-on-write, until `discard_writes`): the mapping of a share's arena, which every member reads."""
        arena = cls.__new__(cls)
        arena._setup(fd, slots, stride, writable, path, private)
        return arena

    def _setup(self, fd: int, slots: int, stride: int, writable: bool, path: str, private: bool = False) -> None:
        self.path, self.slots, self.stride, self.private = path, slots, stride, private
        size = os.fstat(fd).st_size
        if size < slots * stride:
            raise ProtocolError(f"shared-memory arena {path} holds {size} bytes, expected {slots * stride}")
        if private and stride % _PAGE:
            raise ProtocolError(f"shared-memory arena {path} has slots of {stride} bytes, not a multiple of the "
                                f"{_PAGE}-byte page")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self._map: mmap.mmap | None = mmap.mmap(fd, slots * stride, flags, prot)
        # Where the mapping starts (a transient export: `close` never unmaps, so it stays valid).
        self._address = int(np.frombuffer(self._map, np.uint8, count=1).ctypes.data) if private else 0

    def discard_writes(self, slot: int) -> None:
        """Drop what this process wrote in `slot` of a private mapping (its copy-on-write pages): the slot
        reads the arena's own bytes again, the next batch the server puts there included.

        Only where it wrote: a slot read but not written still maps the arena's own pages, and dropping
        them would cost a fault per page when the slot is read next (1 ms of the trainer's CPU for a
        10 MB batch, against 0.14 ms for asking the kernel, `_holds_private_pages`)."""
        m = self._map
        if not (self.private and m is not None and 0 <= slot < self.slots):
            return
        if _holds_private_pages(self._address + slot * self.stride, self.stride) is False:
            return
        m.madvise(mmap.MADV_DONTNEED, slot * self.stride, self.stride)

    def view(self, slot: int, dtype: Any, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The array of `shape` and `dtype` at the start of `slot`, validated against the slot size."""
        if not (isinstance(slot, int) and 0 <= slot < self.slots):
            raise ProtocolError(f"shared-memory slot {slot!r} is outside 0..{self.slots - 1}")
        if not isinstance(dtype, np.dtype):
            if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
                raise ProtocolError(f"shared-memory dtype {dtype!r} is not allowed")
            dtype = np.dtype(dtype)
        if not (isinstance(shape, (list, tuple)) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise ProtocolError(f"shared-memory shape {shape!r} is not a list of non-negative ints")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.stride:
            raise ProtocolError(f"array of {nbytes} bytes does not fit a {self.stride}-byte slot")
        if self._map is None:
            raise ProtocolError("the shared-memory arena is closed")
        return np.ndarray(tuple(shape), dtype=dtype, buffer=self._map, offset=slot * self.stride)

    def close(self) -> None:
        """Drop this reference to the mapping.

        Never unmap explicitly: numpy arrays made by `view` keep the mmap object as their base
        without holding a buffer export, so an explicit close would leave them dangling. The
        mapping goes away with the last array that uses it.
        """
        self._map = None
