"""Batch manifests: what a batch holds, sample by sample, checked against the batch and given to the trainer.

A client created with ``manifest=True`` asks for one with every batch (`Hello.manifest`); the
server's `Manifest` lists, in batch order, each sample's index, its source (a path,
``shard.tar:member``, ``file.parquet:row``; cut in the middle past
`messages.MAX_MANIFEST_SOURCE_CHARS`, ``client.sources()`` gives it whole) and what each
augmentation drew for it. `checked_manifest` trusts none of it: a manifest this client did not
ask for, a missing one, or one whose epoch, batch or indices are not the batch's own is a
`ProtocolError`. The trainer gets plain values (``client.last.manifest``), ready for a JSON
audit log::

    {"epoch": 0, "batch": 3, "samples": [{"index": 17, "source": "/data/img/17.jpg",
                                          "augment": [["rrc", [12, 4, 180, 150]], ["flip", [1]]]}, ...]}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .contract.errors import ProtocolError
from .contract.messages import Batch, Manifest

__all__ = ["checked_manifest", "plain_manifest"]


def checked_manifest(message: Batch, index: np.ndarray, asked: bool, peer: str) -> dict[str, Any] | None:
    """The manifest of `message` as plain values, once it agrees with the batch; None when none was asked."""
    manifest = message.manifest
    if not asked:
        if manifest is not None:
            raise ProtocolError(f"{peer} sent a batch manifest this client did not ask for")
        return None
    if manifest is None:
        raise ProtocolError(f"{peer} sent epoch {message.epoch} batch {message.batch} without the manifest this "
                            "client asked for")
    if (manifest.epoch, manifest.batch) != (message.epoch, message.batch):
        raise ProtocolError(f"{peer} sent the manifest of epoch {manifest.epoch} batch {manifest.batch} with epoch "
                            f"{message.epoch} batch {message.batch}")
    listed = [s.index for s in manifest.samples]
    if listed != index.tolist():
        raise ProtocolError(f"the manifest from {peer} lists samples {listed[:8]}... that are not the batch's own "
                            f"({index[:8].tolist()}...)")
    return plain_manifest(manifest)


def plain_manifest(manifest: Manifest) -> dict[str, Any]:
    """A manifest as plain, JSON-serialisable values (what ``client.last.manifest`` and ``replay --manifest`` give)."""
    return {"epoch": manifest.epoch, "batch": manifest.batch,
            "samples": [{"index": s.index, "source": s.source, "augment": [[d.op, list(d.values)] for d in s.augment]}
                        for s in manifest.samples]}
