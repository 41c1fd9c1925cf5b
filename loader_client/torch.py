"""PyTorch adapters: batches as tensors, optionally channels-first, pinned or on a device.

Import this module only where torch is installed (``import loader_client.torch``); the rest
of the client never imports torch.

Do not wrap these in a ``torch.utils.data.DataLoader`` with ``num_workers > 0``: every
DataLoader worker would open its own stream and the trainer would see each batch several
times. The loader server already does the parallel work; `LoaderDataset` refuses to run
inside a DataLoader worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .client import LoaderClient

__all__ = ["accelerator_present", "pins", "to_tensors", "tensors", "LoaderDataset"]


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


def to_tensors(
    x: Any, y: Any, *, channels_first: bool = False, pin_memory: bool | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap one numpy batch as tensors without a copy (pinning or moving to a device copies once).

    `channels_first` turns an HWC batch into NCHW as a view; serve with ``--layout chw`` to
    get contiguous NCHW memory instead. Pinning (see `pins`) is skipped on a box without an
    accelerator, so the same code runs on a CPU box and a GPU box.
    """
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    if channels_first:
        tx = tx.permute(0, 3, 1, 2)
    pinned = pins(pin_memory, device)
    if pinned:
        tx, ty = tx.pin_memory(), ty.pin_memory()
    if device is not None:
        tx, ty = tx.to(device, non_blocking=pinned), ty.to(device, non_blocking=pinned)
    return tx, ty


def tensors(
    client: LoaderClient, *, epochs: int | None = None, channels_first: bool = False,
    pin_memory: bool | None = None, device: str | torch.device | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` tensors from `client`: `epochs` whole epochs, or forever if None."""
    source = iter(client) if epochs is None else (b for _ in range(epochs) for b in client.epoch())
    for x, y in source:
        yield to_tensors(x, y, channels_first=channels_first, pin_memory=pin_memory, device=device)


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
                 device: str | torch.device | None = None, **client_kwargs: Any) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.options: dict[str, Any] = {"channels_first": channels_first, "pin_memory": pin_memory, "device": device}
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
            self._client.close()
            self._client = None
