"""The same-host shared-memory path: identical batches, zero copies, no leaks, safe fallbacks."""

from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, handshake
from loader_client.endpoints import same_host

from .conftest import unique_label_list, wait_until

N = 40


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", N)


def take(client: LoaderClient, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    it = iter(client)
    for _ in range(count):
        x, y = next(it)
        assert client.last is not None
        out.append((x, y, client.last.indices))
    return out


def test_shared_memory_and_socket_give_identical_batches(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=20) as shm, \
         LoaderClient(server.endpoint, timeout_s=20, shared_memory=False) as sock:
        assert shm.shared_memory and not sock.shared_memory
        a, b = take(shm, 25), take(sock, 25)
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b, strict=True):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(ia, ya)  # label i is sample i
            assert xa.flags.writeable
    assert "shared memory" in server.log_text() and "frames over the socket" in server.log_text()


def test_no_shm_flag_and_tcp_remote_style_use_the_socket(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1", "--no-shm")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert not client.shared_memory
        assert len(take(client, 3)) == 3
    assert same_host("tcp://127.0.0.1:5555") and same_host("ipc:///tmp/x")
    assert same_host("tcp://[::1]:5555") and same_host("tcp://localhost:1")
    assert not same_host("tcp://10.0.0.7:5555")


def test_held_batches_fall_back_to_frames_and_outlive_the_client(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2", "--prefetch", "3")
    with LoaderClient(server.endpoint, timeout_s=20, prefetch=2) as client:
        assert client.shared_memory
        held = take(client, 30)  # far more than the arena's slots: the server must not stall
        assert any(isinstance(x.base, mmap.mmap) for x, _, _ in held)
        assert any(not isinstance(x.base, mmap.mmap) for x, _, _ in held)  # frames once slots ran out
        for _, y, idx in held:
            np.testing.assert_array_equal(y, idx)
        contents = [x.copy() for x, _, _ in held]
        more = take(client, 10)  # still flowing
    # Arrays stay valid after the client closed: the mapping lives as long as they do.
    for x, c in zip([h[0] for h in held], contents, strict=True):
        np.testing.assert_array_equal(x, c)
    del held, more, x
    gc.collect()


def test_slots_are_recycled_when_arrays_are_released(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2", "--prefetch", "3")
    with LoaderClient(server.endpoint, timeout_s=20, prefetch=2) as client:
        it = iter(client)
        via_slot = 0
        for _ in range(60):  # each batch dropped at once: nearly every one comes through a slot
            x, y = next(it)
            via_slot += isinstance(x.base, mmap.mmap)  # a view of the arena: not a copy, not a frame
        del x, y
    # A release races with the next scheduling now and then (the batch then uses frames).
    assert via_slot >= 50


def test_fallback_when_the_arena_cannot_be_opened(start_server: Any, listfile: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1")
    monkeypatch.setattr(handshake, "open_arena", lambda handle, key, **kw: None)  # as for another user...
    monkeypatch.setattr(handshake, "receive_arena", lambda *a, **kw: None)  # ...outside the server's group
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert not client.shared_memory
        for x, y, idx in take(client, 12):
            np.testing.assert_array_equal(y, idx)
            assert x.shape == (4, 12, 16, 3)


def _memfd_maps(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for line in f if "memfd:loader-" in line)
    except OSError:
        return 0


def _memfds(pid: int) -> int:
    """Open arenas (memfd files) of a process."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += "memfd:loader-" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return count


def test_sessions_leave_no_arena_behind(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        take(client, 2)
    wait_until(lambda: len(server.workers()) == 2, 10, "2 workers")
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    for _ in range(15):
        with LoaderClient(server.endpoint, timeout_s=20) as client:
            assert client.shared_memory
            assert _memfds(server.proc.pid) >= 1  # this session's arena, open while it lasts
            take(client, 3)
    wait_until(lambda: _memfds(server.proc.pid) == 0, 10, "the server to close finished sessions' arenas")
    wait_until(lambda: all(_memfd_maps(w) <= 1 for w in server.workers()), 10,
               "workers to unmap finished sessions' arenas")
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) == shm_before  # memfd arenas have no name to leak


def test_fallback_does_not_mix_up_the_abandoned_stream(start_server: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from loader_client import BadSampleError

    listfile = unique_label_list(tmp_path / "data", 8)
    (tmp_path / "data" / "img" / "00001.jpg").write_bytes(b"not an image")  # the first batch fails at once
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1", "--no-shuffle")
    monkeypatch.setattr(handshake, "open_arena", lambda handle, key, **kw: None)  # as for another user...
    monkeypatch.setattr(handshake, "receive_arena", lambda *a, **kw: None)  # ...outside the server's group
    for _ in range(5):
        client = LoaderClient(server.endpoint, timeout_s=20)  # the first stream's error must not land here
        try:
            assert not client.shared_memory
            with pytest.raises(BadSampleError, match="00001.jpg"):
                client.next()
        finally:
            client.close()


def test_an_arena_that_runs_dry_again_warns_once_then_logs_info(start_server: Any, listfile: Path) -> None:
    """A trainer that keeps batches alive (Keras's fit keeps a few) runs its arena dry again and again: one
    warning (on a local_server trainer's stderr), then info lines, and every such batch still counted."""
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert client.shared_memory
        for _ in range(3):  # hold more batches than the arena has slots, then let them go: three dry spells
            held = take(client, 25)
            del held
            gc.collect()
        fallbacks = client.stats()["server"]["shm_fallback_batches"]
    lines = [line for line in server.log_text().splitlines() if "no free slot in its shared-memory arena" in line]
    warnings = [line for line in lines if " WARNING " in line]
    assert len(warnings) == 1 and warnings[0].endswith("; later times are logged at INFO"), lines
    assert len(lines) >= 3 and all(" INFO " in line for line in lines if line not in warnings), lines
    assert fallbacks >= len(lines)


def _private_arena_steps() -> list[object]:
    """A share member's copy-on-write mapping of a 3-slot arena the 'server' writes through its own shared
    mapping: what `_holds_private_pages` says and what the member reads, step by step."""
    from loader_client.contract.shm import _PAGE, Arena, _holds_private_pages

    fd = os.memfd_create("cow-test")
    try:
        size = 4 * _PAGE
        os.ftruncate(fd, 3 * size)
        server = mmap.mmap(fd, 3 * size, mmap.MAP_SHARED)
        server[:] = b"\1" * (3 * size)
        arena = Arena.from_fd(fd, 3, size, writable=True, private=True)
    finally:
        os.close(fd)
    read, written = arena.view(0, "|u1", [size]), arena.view(1, "|u1", [size])
    steps: list[object] = [int(read.sum()), _holds_private_pages(arena._address, size)]  # read only: not its own
    written[10] = 7
    steps += [_holds_private_pages(arena._address + size, size), server[size + 10]]  # its own copy; the server's 1
    arena.discard_writes(0)  # nothing written there: its pages stay the arena's
    arena.discard_writes(1)
    steps += [_holds_private_pages(arena._address + size, size), int(written[10])]  # the arena's page again
    server[10], server[size + 10] = 5, 9  # the server's next batches in both slots
    return [*steps, int(read[10]), int(written[10])]


def test_a_share_members_slot_is_discarded_only_where_it_wrote_and_reads_the_servers_next_batch() -> None:
    """A member maps a share's arena copy-on-write and drops its own pages of a slot before giving it back.
    Pages it only read are kept (dropping them costs a fault a page on the next read, about 1 ms a 10 MB
    batch), which the kernel tells an unprivileged process too (pagemap's flags; its PFNs are hidden)."""
    expected = [4 * mmap.PAGESIZE, False, True, 1, False, 1, 5, 9]
    assert _private_arena_steps() == expected
    if os.getuid() != 0:
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            import ctypes

            os.setgid(65534)
            os.setuid(65534)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as a process started by that user is
            os.write(write_end, repr(_private_arena_steps()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and said == repr(expected), said
