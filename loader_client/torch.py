"""PyTorch adapters: batches as tensors, optionally channels-first, pinned or on a device.

Import this module only where torch is installed (``import loader_client.torch``); the rest
of the client never imports torch.

Do not wrap these in a ``torch.utils.data.DataLoader`` with ``num_workers > 0``: every
DataLoader worker would open its own stream and the trainer would see each batch several
times. The loader server already does the parallel work; `LoaderDataset` refuses to run
inside a DataLoader worker.
"""

from __future__ import annotations

import collections
import mmap
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .client import LoaderClient

__all__ = ["LoaderDataset", "PinnedArenas", "accelerator_present", "pins", "tensors", "to_tensors"]


def accelerator_present() -> bool:
    """True when torch sees an accelerator (CUDA, ROCm, MPS, XPU, ...) that pinned memory serves."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None:
        return bool(acc.is_available())
    return bool(torch.cuda.is_available())


def pins(pin_memory: bool | None, device: str | torch.device | None) -> bool:
    """Whether batches get pinned: never without an accelerator (pinning needs one and would raise).

    `pin_memory=None` (the default) pins when `device` is an accelerator device; True pins
    whenever an accelerator exists; False never pins.
    """
    if pin_memory is False or not accelerator_present():
        return False
    if pin_memory is None:
        return device is not None and torch.device(device).type != "cpu"
    return True


class PinnedArenas:
    """Shared-memory arenas registered with CUDA as page-locked memory, so that a batch in one
    goes to the GPU by DMA straight from the server's slot: no copy on the CPU.

    Without this, pinning copies every batch once into pinned memory on the trainer's thread
    (38.5 MB for 256 x 224 x 224 x 3). A registered arena stays registered while batches come
    from it (at most `max_arenas`, least recently used unregistered first); the slot of a batch
    whose copy is in flight is held (its array kept alive) until a CUDA event says the copy is
    done, so the server never overwrites a slot the GPU still reads. If registering fails (no
    CUDA, a driver that refuses), batches fall back to the copy into pinned memory, with one
    warning.
    """

    def __init__(self, max_arenas: int = 8, max_in_flight: int = 16) -> None:
        self.max_arenas, self.max_in_flight = max_arenas, max_in_flight
        self._arenas: collections.OrderedDict[int, tuple[mmap.mmap, int]] = collections.OrderedDict()
        self._in_flight: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
        self.failed = False
        self.copies = 0  # batches that went by DMA from a registered arena

    @staticmethod
    def mapping_of(x: np.ndarray) -> mmap.mmap | None:
        """The shared-memory mapping `x` is a view of, or None."""
        base: Any = x
        while isinstance(base, np.ndarray):
            base = base.base
        return base if isinstance(base, mmap.mmap) else None

    def registered(self, x: np.ndarray) -> bool:
        """Whether `x` lies in an arena registered with CUDA (registering it on first sight)."""
        mapping = self.mapping_of(x)
        if mapping is None or self.failed:
            return False
        key = id(mapping)
        if key in self._arenas:
            self._arenas.move_to_end(key)
            return True
        address = np.ndarray((1,), np.uint8, buffer=mapping).ctypes.data
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        error = cudart.cudaHostRegister(address, len(mapping), 0)
        if error != cudart.cudaError.success:
            self.failed = True
            warnings.warn(f"loader_client.torch: cannot register the shared-memory arena with CUDA ({error}); "
                          "batches are copied into pinned memory instead", RuntimeWarning, stacklevel=3)
            return False
        self._arenas[key] = (mapping, address)
        while len(self._arenas) > self.max_arenas:
            self.wait(len(self._in_flight))  # no copy may still read the one unregistered now
            _, (_, old) = self._arenas.popitem(last=False)
            cudart.cudaHostUnregister(old)
        return True

    def hold(self, x: np.ndarray, stream: Any) -> None:
        """Keep `x` (and so its slot) until the copies queued on `stream` so far are done."""
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        self._in_flight.append((event, x))
        self.copies += 1
        self.wait(len(self._in_flight) - self.max_in_flight)
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()

    def wait(self, n: int) -> None:
        """Wait for the oldest `n` copies and let their slots go."""
        for _ in range(max(0, n)):
            event, _ = self._in_flight.popleft()
            event.synchronize()

    def close(self) -> None:
        """Wait for every copy, unregister every arena."""
        if not self._arenas:
            return
        self.wait(len(self._in_flight))
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        for _, address in self._arenas.values():
            cudart.cudaHostUnregister(address)
        self._arenas.clear()


#: The registry `to_tensors` uses for CUDA devices.
_PINNED = PinnedArenas()


def to_tensors(
    x: Any, y: Any, *, channels_first: bool = False, pin_memory: bool | None = None,
    device: str | torch.device | None = None, register_arenas: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap one numpy batch as tensors without a copy (pinning or moving to a device copies once).

    `channels_first` turns an HWC batch into NCHW as a view; serve with ``--layout chw`` to
    get contiguous NCHW memory instead. Pinning (see `pins`) is skipped on a box without an
    accelerator, so the same code runs on a CPU box and a GPU box. With a CUDA `device` and a
    batch in shared memory, the arena is registered as page-locked memory (`PinnedArenas`;
    `register_arenas=False` copies into pinned memory instead) and the batch goes to the GPU
    with no copy on the CPU.
    """
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if channels_first:
        tx = tx.permute(0, 3, 1, 2)
    pinned = pins(pin_memory, device)
    if pinned and device is not None and register_arenas and torch.device(device).type == "cuda" \
            and isinstance(x, np.ndarray) and _PINNED.registered(x):
        on_device = tx.to(device, non_blocking=True)
        _PINNED.hold(x, torch.cuda.current_stream(torch.device(device)))
        return on_device, ty.pin_memory().to(device, non_blocking=True)
    if pinned:
        tx, ty = tx.pin_memory(), ty.pin_memory()
    if device is not None:
        tx, ty = tx.to(device, non_blocking=pinned), ty.to(device, non_blocking=pinned)
    return tx, ty


def tensors(
    client: LoaderClient, *, epochs: int | None = None, channels_first: bool = False,
    pin_memory: bool | None = None, device: str | torch.device | None = None, register_arenas: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` tensors from `client`: `epochs` whole epochs, or forever if None."""
    source = iter(client) if epochs is None else (b for _ in range(epochs) for b in client.epoch())
    for x, y in source:
        yield to_tensors(x, y, channels_first=channels_first, pin_memory=pin_memory, device=device,
                         register_arenas=register_arenas)


class LoaderDataset(IterableDataset):  # type: ignore[type-arg]
    """An ``IterableDataset`` whose every iteration is one epoch of tensors from a loader server.

    Example::

        dataset = LoaderDataset("tcp://127.0.0.1:5555", channels_first=True)
        for epoch in range(10):
            for x, y in dataset:          # or DataLoader(dataset, batch_size=None)
                ...

    The connection opens on first use and stays open across epochs; `close()` ends it.
    Keyword arguments other than the tensor options go to `LoaderClient`.
    """

    def __init__(self, endpoint: str, *, channels_first: bool = False, pin_memory: bool | None = None,
                 device: str | torch.device | None = None, register_arenas: bool = True,
                 **client_kwargs: Any) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.options: dict[str, Any] = {"channels_first": channels_first, "pin_memory": pin_memory, "device": device,
                                        "register_arenas": register_arenas}
        self.client_kwargs = client_kwargs
        self._client: LoaderClient | None = None

    @property
    def client(self) -> LoaderClient:
        """The underlying client, connected on first use."""
        if get_worker_info() is not None:
            raise RuntimeError(
                "LoaderDataset must not run in a DataLoader worker (num_workers > 0): each worker would "
                "open its own stream and repeat the data. Use DataLoader(dataset, batch_size=None) with "
                "the default num_workers=0; the loader server already decodes in parallel."
            )
        if self._client is None:
            self._client = LoaderClient(self.endpoint, **self.client_kwargs)
        return self._client

    def __len__(self) -> int:
        return self.client.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return tensors(self.client, epochs=1, **self.options)

    def state_dict(self) -> dict[str, Any]:
        return self.client.state_dict()

    def close(self) -> None:
        if self._client is not None:
            if self.options["register_arenas"] and _PINNED.copies:
                _PINNED.close()  # every copy done, arenas unregistered before the mappings may go
            self._client.close()
            self._client = None
