"""``loader-server replay``: rebuild one batch of a stream, bitwise, to inspect a step that went wrong.

    loader-server replay --config loader.toml --epoch 3 --batch 117 --out batch.npz

Takes every setting ``serve`` takes (flags, ``--config``, ``LOADER_*``), so the same words that
started the server name the same stream, plus where in it: ``--epoch``, ``--batch``, ``--rank``
and ``--world-size`` (a client's share), and ``--plain`` for a client created with
``augment=False``. The batch's samples come from the same sampling plan and go through the
same steps as in a worker (read, decode, augment with the draws of (seed, epoch, sample),
finish), so ``x`` and ``y`` are bitwise those the client received (``index`` names the
samples, substitutes included under ``--on-error skip``; ``--collate`` arrays follow). What
the client does after receiving (``normalize=True``) is not replayed. ``--seed`` is the
stream's seed: the server's, or the one the client passed. The decoded-sample cache is not
used (it changes the speed, never the pixels). With ``--manifest FILE.json`` the batch's
manifest (each sample's source and draws) is written too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import numpy as np

from loader_client.contract.errors import ConfigError
from loader_client.contract.messages import Manifest
from loader_client.manifests import plain_manifest

from .arguments import HelpFormatter, add_setting_arguments, explicit_setting_flags, require_opencv

__all__ = ["add_replay_arguments", "run_replay"]


def add_replay_arguments(p: argparse.ArgumentParser) -> None:
    """Where in the stream, where to write, and every setting of `serve`."""
    p.add_argument("--epoch", type=int, required=True, help="the batch's epoch (as in client.last.epoch)")
    p.add_argument("--batch", type=int, required=True, help="the batch's number in its epoch (client.last.batch)")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="where to write arrays x, y and index (npz)")
    p.add_argument("--rank", type=int, default=0, help="the client's rank")
    p.add_argument("--world-size", type=int, default=1, help="the client's world size")
    p.add_argument("--plain", action="store_true",
                   help="the batch a client created with augment=False gets (no augmentation)")
    p.add_argument("--manifest", default=None, metavar="FILE.json",
                   help="also write the batch's manifest: each sample's index, source and augmentation draws")
    action = p.add_argument("--config", default=None, metavar="FILE",
                            help="TOML file of settings, as `serve --config` reads it (LOADER_<NAME> variables "
                                 "and flags override it)")
    action.shown_default = ""  # type: ignore[attr-defined]
    add_setting_arguments(p)


def replay_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loader-server replay", formatter_class=HelpFormatter)
    add_replay_arguments(parser)
    return parser


def run_replay(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Rebuild the batch and write it; 0 when written, 1 when its samples cannot be read (2: bad settings)."""
    from loader_client.contract.sampling import SamplingPlan

    from .data.batch_spec import batch_spec
    from .data.datasets import load_dataset
    from .data.reading import DecodeError
    from .layered import resolve
    from .pipeline.batch import BatchBuilder

    config = resolve(explicit_setting_flags(replay_parser(), argv), args.config)[0]
    dataset = load_dataset(config)
    spec = batch_spec(config, dataset)
    if spec.build == "decode":
        require_opencv("replay")
    plan = SamplingPlan(len(dataset), spec.batch_size, mode=config.mode, shuffle=config.shuffle,
                        drop_last=config.drop_last, steps_per_epoch=config.steps_per_epoch)
    if not 0 <= args.rank < args.world_size:
        raise ConfigError(f"--rank {args.rank} of --world-size {args.world_size} is out of range: need 0 <= rank < "
                          "world size")
    steps = plan.steps_per_epoch(args.world_size)
    if not 0 <= args.batch < steps or args.epoch < 0:
        raise ConfigError(f"--epoch {args.epoch} --batch {args.batch} is outside the stream: an epoch of rank "
                          f"{args.rank} of {args.world_size} has batches 0 to {steps - 1}")
    indices = plan.batch(args.epoch, args.batch, seed=config.seed, rank=args.rank, world_size=args.world_size)
    builder = BatchBuilder(config, dataset, spec)  # no cache: it changes the speed, never the pixels
    augment = bool(config.augment) and not args.plain
    try:
        arrays = builder.build(indices, builder.allocate(len(indices)), key=(config.seed, args.epoch),
                               augment=augment, manifest=args.manifest is not None)
    except DecodeError as exc:
        print(f"loader-server replay: epoch {args.epoch} batch {args.batch} cannot be rebuilt: {exc}",
              file=sys.stderr)
        return 1
    finally:
        builder.close()
    np.savez(args.out, **arrays)  # type: ignore[arg-type]  # numpy types **kwargs as its allow_pickle
    if args.manifest is not None:
        manifest = Manifest(epoch=args.epoch, batch=args.batch, samples=builder.last_manifest or [])
        with open(args.manifest, "w") as f:
            json.dump(plain_manifest(manifest), f, indent=1)  # as client.last.manifest gives it
    x, y = arrays["x"], arrays["y"]
    print(f"epoch {args.epoch} batch {args.batch} (rank {args.rank} of {args.world_size}, seed {config.seed}"
          f"{', augmented' if augment else ''}): {len(indices)} samples, x {x.shape} {x.dtype}, y {y.shape} {y.dtype}"
          f" -> {args.out}")
    return 0
