"""The PyTorch GPU path: shared-memory arenas registered with CUDA, batches copied by DMA.

The bookkeeping runs everywhere (CUDA's runtime and events faked, the server and its arena real);
the copy itself runs where a CUDA device exists (a GPU box: see docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from loader_client import LoaderClient  # noqa: E402

from .conftest import unique_label_list  # noqa: E402


class _FakeCudart:
    """torch.cuda.cudart() for a box without CUDA: records registrations; can refuse them."""

    class cudaError:  # the name torch's binding uses
        success = 0

    def __init__(self, refuse: bool = False) -> None:
        self.refuse, self.registered, self.unregistered = refuse, [], []

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:
        if self.refuse:
            return 1
        self.registered.append((address, size))
        return 0

    def cudaHostUnregister(self, address: int) -> int:
        self.unregistered.append(address)
        return 0


class _FakeEvent:
    done = False

    def record(self, stream: Any) -> None:
        pass

    def query(self) -> bool:
        return _FakeEvent.done

    def synchronize(self) -> None:
        pass


def test_shared_memory_batches_are_registered_once_and_their_slots_held_until_the_copy_is_done(
        start_server: Any, tmp_path: Path, monkeypatch: Any) -> None:
    """The GPU path's bookkeeping, on the CPU: CUDA's runtime and events are fakes, the server,
    its shared-memory arena and the slots are real (the GPU itself is checked on a GPU box)."""
    import gc

    from loader_client.torch import PinnedArenas

    listfile = unique_label_list(tmp_path / "data", 16)
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    registry = PinnedArenas(max_in_flight=3)
    with LoaderClient(server.endpoint, timeout_s=30, prefetch=2) as client:
        assert client.shared_memory
        for i in range(4):
            x, _ = client.next()
            assert registry.registered(x)
            registry.hold(x, stream=None)
            del x
            gc.collect()
            assert len(registry._in_flight) == min(i + 1, 3)  # held (slots not released) until done or 3 queued
        assert len(cudart.registered) == 1  # one arena, registered once
        address, size = cudart.registered[0]
        assert size >= 4 * 8 * 8 * 3 * 3  # the whole arena, not a slot
        _FakeEvent.done = True
        x, _ = client.next()
        registry.hold(x, stream=None)
        assert len(registry._in_flight) == 0  # every copy done: every slot may go back to the server
        for _ in range(8):  # and the server keeps sending into the released slots
            client.next()
        assert not registry.registered(np.zeros(4, np.uint8))  # not shared memory: the pinned copy
        registry.close()
        assert cudart.unregistered == [address]
    _FakeEvent.done = False
    refused = PinnedArenas()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(refuse=True))
    with LoaderClient(server.endpoint, timeout_s=30) as client:
        x, _ = client.next()
        with pytest.warns(RuntimeWarning, match="batches are copied into pinned memory instead"):
            assert not refused.registered(x)
        assert not refused.registered(x) and refused.failed  # one warning, then the copy for good


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU box)")
def test_batches_copied_to_the_gpu_from_registered_shared_memory_are_the_stream_bitwise(
        start_server: Any, tmp_path: Path) -> None:
    from loader_client.torch import _PINNED, tensors

    listfile = unique_label_list(tmp_path / "data", 64)
    server = start_server(listfile, "--batch-size", "8", "--size", "64x48", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=30) as reference:
        expected = [reference.next()[0].copy() for _ in range(3 * reference.steps_per_epoch)]
    before = _PINNED.copies
    with LoaderClient(server.endpoint, timeout_s=30, prefetch=2) as client:
        got = [x.cpu().numpy() for x, _ in tensors(client, epochs=3, device="cuda")]
    assert _PINNED.copies - before == len(expected)  # every batch by DMA from the registered arena
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
