"""A PyTorch DDP trainer for the batch scripts of this folder: its share from the environment, and
it survives a loader that dies and is restarted.

    srun python deploy/slurm/train.py --epochs 2        # or: torchrun --nproc-per-node 4 train.py

Nothing in it is about ranks: `placement_from_env()` reads torchrun's or Slurm's variables for
torch.distributed, and `client_options_from_env()` gives the loader client the endpoints
(LOADER_ENDPOINT or LOADER_ENDPOINTS, set by the batch script), the CURVE keys, and this rank's
share. torch.distributed needs MASTER_ADDR and MASTER_PORT (the batch scripts export them).

With several loader hosts, a host that dies is failed over by the client itself: its batches are
asked of the others, exactly once. When every loader is gone (a pool of one node whose loader
step died), the client raises `LoaderError`; this trainer then waits for a loader to answer
`health` again (the batch script restarts a dead loader step) and resumes from `state_dict()`:
the rest of the epoch, nothing repeated, nothing skipped.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from loader_client import LoaderError, client_options_from_env, health
from loader_client.env import placement_from_env
from loader_client.torch import LoaderDataset


class ResumingDataset:
    """`LoaderDataset` that, when every loader is gone, waits for one and resumes where it was."""

    def __init__(self, device: torch.device, timeout_s: float, wait_s: float) -> None:
        self.options: dict[str, Any] = client_options_from_env()
        self.device, self.timeout_s, self.wait_s = device, timeout_s, wait_s
        self.dataset = self._open(None)

    def _open(self, state: dict[str, Any] | None) -> LoaderDataset:
        return LoaderDataset(**self.options, channels_first=True, device=self.device, timeout_s=self.timeout_s,
                             state=state)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch, across any number of loader restarts."""
        while True:
            try:
                yield from self.dataset
                return
            except LoaderError as exc:
                state = self.dataset.state_dict()
                self.dataset.close()
                print(f"rank {state['rank']}: {exc}; waiting for a loader to answer", flush=True)
                self._wait_for_a_loader()
                self.dataset = self._open(state)
                print(f"rank {state['rank']}: resumed at epoch {state['epoch']} batch {state['batch']}", flush=True)

    def _wait_for_a_loader(self) -> None:
        endpoint = self.options["endpoint"]
        endpoints = endpoint if isinstance(endpoint, list) else [endpoint]
        keys = {k: self.options[k] for k in ("server_public_key", "client_keys") if k in self.options}
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            for endpoint in endpoints:
                try:
                    if health(endpoint, timeout_s=2, **keys).get("ok"):
                        return
                except LoaderError:
                    pass
            time.sleep(1)
        raise LoaderError(f"no loader of {endpoints} answered within {self.wait_s:g} s")

    @property
    def num_classes(self) -> int:
        return self.dataset.client.num_classes or 1000

    def close(self) -> None:
        self.dataset.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="a loader silent this long is lost")
    parser.add_argument("--wait-s", type=float, default=600.0, help="how long to wait for a restarted loader")
    args = parser.parse_args()
    where = placement_from_env()  # torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else srun's SLURM_* (LOADER_* win)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=where.rank, world_size=where.world_size)
    device = torch.device("cuda", where.local_rank) if cuda else torch.device("cpu")
    train = ResumingDataset(device, args.timeout_s, args.wait_s)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(16, train.num_classes)).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        steps, total = 0, 0.0
        for x, y in train:  # this rank's share of the epoch: the same number of batches on every rank
            loss = torch.nn.functional.cross_entropy(model(x.float().div_(255)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps, total = steps + 1, total + loss.item()
        print(f"rank {where.rank}/{where.world_size} on {where.node}: epoch {epoch} loss {total / max(steps, 1):.3f}"
              f" over {steps} steps", flush=True)
    train.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
