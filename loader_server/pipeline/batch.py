"""Collating a batch: each sample through the steps (steps.py) straight into the batch buffer, then the finish.

Pure work over bytes and arrays, no sockets: the worker process calls `BatchBuilder.build` and
sends what it returns. Byte data sets (files, tar members, Parquet rows) run every sample
through the sample path: cache lookup, read, decode (and crop), cache store, augment; array
data sets gather rows instead. Which of the two is decided once, when the builder is made.
Reads can run ahead on a thread pool (`read_threads`), so that waiting on slow storage
overlaps with decoding; reads and OpenCV both release the GIL.

The finish step, per batch: a bad sample replaced by the next good one (``--on-error skip``),
the uint8 HWC staging converted to ``--dtype``/``--layout`` with the normalisation, and
``--collate``'s extra arrays.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np

from loader_client.contract.messages import MAX_DRAWN_OPS, MAX_MANIFEST_SOURCE_CHARS, Drawn, SampleManifest
from loader_client.contract.normalize import Normalization
from loader_client.contract.sampling import substitute_sources
from loader_client.contract.schema import wire_text

from ..config import AUTO_READ_THREADS, SLOW_READ_S
from ..data.batch_spec import BatchSpec, batch_spec
from ..data.datasets import Dataset, byte_source, row_source
from ..data.reading import BadSamples, Version
from ..options import PipelineOptions
from .augment import sample_rng
from .cache import RecordState, SampleCache
from .decode import DecodeError
from .steps import Reader, SamplePath, plan_steps
from .user_code import check_extras, load_function

__all__ = ["AUTO_READ_THREADS", "SLOW_READ_S", "BatchBuilder", "Reads"]

_COLLATE_STREAM = 0xC0

#: The samples of a batch with their reads (a future per sample when reads run ahead, else None) and,
#: with a cache, each sample's version taken before its read (None when unknown, or no cache) and its
#: record's state when read ahead found it valid (then nothing was read; None otherwise).
Reads = list[tuple["Future[bytes] | None", "Version | None", "RecordState | None"]]


class BatchBuilder:
    """Builds the arrays of one batch (``x``, ``y``, ``index``) from sample indices.

    `options`: the pipeline's option groups (a ServerConfig is cut down to them). Shapes and
    dtypes come from `spec` (derived from a ServerConfig and `index` when not given).
    """

    def __init__(self, options: PipelineOptions | Any, index: Dataset, spec: BatchSpec | None = None,
                 cache: SampleCache | None = None) -> None:
        if spec is None:
            spec = batch_spec(options, index)  # a ServerConfig: PipelineOptions alone do not say the batch size
        self.options = opts = PipelineOptions.of(options)
        self.index = index
        self.spec = spec
        self.skip_bad = opts.errors.on_error == "skip"
        self.collate = load_function(opts.user_code.collate, "collate") if opts.user_code.collate else None
        self.last_bad: list[tuple[str, str, str]] = []  # (sample, code, reason) replaced in the last batch
        self.last_manifest: list[SampleManifest] | None = None  # the last batch's, when it was asked for
        self.cache_hits = self.cache_misses = 0  # of the last batch
        self._scratch: np.ndarray | None = None  # uint8 HWC staging for float32 or CHW output
        self._norm = None
        out = opts.output
        if out.dtype == "float32":
            self._norm = Normalization(opts.decode.channels, out.layout, out.mean, out.std)
        self._direct = out.dtype == "uint8" and out.layout == "hwc"
        w, h = opts.decode.size
        self._hwc_shape = (h, w, opts.decode.channels)
        self.cache = cache if spec.build == "decode" else None
        self._fill = self._gather if spec.build == "gather" else self._decode  # decided once
        self._rows = row_source(index) if spec.build == "gather" else None
        self.reader: Reader | None = None
        self._paths: dict[bool, SamplePath] = {}
        self._drawn: list[list[tuple[str, list[float]]]] | None = None  # per slot, while a manifest is made
        if spec.build == "decode":
            self.reader = Reader(opts.read, index)
            self._paths = {flag: plan_steps(opts, index, self.cache, augment=flag, reader=self.reader)
                           for flag in (False, True)}

    def close(self) -> None:
        """Stop the read threads (read pool, pipelining connections); the builder reads nothing after this."""
        if self.reader is not None:
            self.reader.close()

    def steps(self, augment: bool = False) -> list[str]:
        """The names of the steps each sample goes through (for a stream with or without augmentations)."""
        return self._paths[augment].names if self._paths else ["Gather"]

    def allocate(self, batch_size: int | None = None) -> np.ndarray:
        """A fresh output buffer ``x`` for `batch_size` samples (default: a full batch) as the spec says."""
        return self.spec.allocate(batch_size)

    def read_ahead(self, indices: np.ndarray, augment: bool = False) -> Reads:
        """Start reading the samples of a batch on the read threads (no-op without them).

        With a cache, each sample's version is taken first, and a sample whose record is valid is not read.
        """
        if self.reader is None:
            return []
        path = self._paths[augment]
        cache = path.cache
        if cache is not None:
            version = byte_source(self.index).version
            versions = [version(int(i)) for i in indices]
            if self.reader.pool is None:
                return [(None, v, None) for v in versions]
            states = [cache.check(int(i), v) for i, v in zip(indices, versions, strict=True)]
            wanted = [int(i) for i, state in zip(indices, states, strict=True) if state is None]
            futures = iter(self.reader.submit_many(wanted))  # a valid record: its state, kept for the lookup
            return [(None if state is not None else next(futures), v, state)
                    for v, state in zip(versions, states, strict=True)]
        if self.reader.pool is None:
            return [(None, None, None)] * len(indices)
        return [(f, None, None) for f in self.reader.submit_many([int(i) for i in indices])]

    def build(self, indices: np.ndarray, x: np.ndarray, reads: Reads | None = None,
              key: tuple[int, int] = (0, 0), augment: bool = False, manifest: bool = False) -> dict[str, np.ndarray]:
        """Fill `x` (from `allocate`, at least ``len(indices)`` long) and return the batch arrays.

        `reads` comes from `read_ahead` for the same indices; `key` is (seed, epoch), which seeds
        augmentations (when `augment`) and user code. Raises BadSamples (a DecodeError) naming every
        sample of the batch that fails, unless ``--on-error skip``. With `manifest`, `last_manifest`
        then lists each delivered sample's index, source and augmentation draws, in batch order.
        """
        self._drawn = [[] for _ in range(len(indices))] if manifest else None
        self.last_manifest = None
        arrays = self._fill(indices, x[: len(indices)], reads, key, augment)
        if self._drawn is not None:
            self.last_manifest = self._manifest(arrays["index"], self._drawn)
        return arrays

    def _manifest(self, index: np.ndarray, drawn: list[list[tuple[str, list[float]]]]) -> list[SampleManifest]:
        describe = self.index.describe
        return [SampleManifest(index=int(i), source=wire_text(describe(int(i)), MAX_MANIFEST_SOURCE_CHARS),
                               augment=[Drawn(op=op, values=values) for op, values in d[:MAX_DRAWN_OPS]])
                for i, d in zip(index, drawn, strict=True)]

    def _gather(self, indices: np.ndarray, x: np.ndarray, reads: Reads | None, key: tuple[int, int],
                augment: bool) -> dict[str, np.ndarray]:
        """Rows copied as stored, no decoding."""
        assert self._rows is not None
        self.last_bad = []
        self._rows.gather(indices, x)
        return {"x": x, "y": np.ascontiguousarray(self.index.labels[indices]),
                "index": np.array(indices, dtype=np.int64)}

    def _decode(self, indices: np.ndarray, x: np.ndarray, reads: Reads | None, key: tuple[int, int],
                augment: bool) -> dict[str, np.ndarray]:
        n = len(indices)
        staging = x if self._direct else self._staging(n)
        path = self._paths[augment]
        path.hits = path.misses = 0
        describe = self.index.describe
        bad: list[tuple[int, DecodeError]] = []
        if reads is None:
            reads = self.read_ahead(indices, augment)
        for slot, (pending, version, state) in enumerate(reads):
            i = int(indices[slot])
            try:
                path.run(i, describe(i), staging[slot], key, pending, version,
                         None if self._drawn is None else self._drawn[slot], state)
            except DecodeError as exc:
                if exc.code == "unavailable":  # a store that does not answer: no substitute, no waiting for more
                    raise
                bad.append((slot, exc))
        self.cache_hits, self.cache_misses = path.hits, path.misses
        if bad and not self.skip_bad:  # every bad sample of the batch, not only the first
            raise BadSamples([exc for _, exc in bad], n) from bad[0][1]
        return self._finish(indices, staging, x, bad, key)

    def _finish(self, indices: np.ndarray, staging: np.ndarray, x: np.ndarray, bad: list[tuple[int, DecodeError]],
                key: tuple[int, int]) -> dict[str, np.ndarray]:
        """Replace bad samples, convert to the output dtype and layout, add the collate hook's arrays."""
        labels = self.index.labels[indices]
        index = np.array(indices, dtype=np.int64)
        self.last_bad = [(exc.path, exc.code, exc.reason) for _, exc in bad]
        if bad:
            taken = _substitute([slot for slot, _ in bad], staging, labels, index, bad[0][1])
            if self._drawn is not None:  # a substitute's draws are those of the sample it copies
                for slot, j in taken.items():
                    self._drawn[slot] = list(self._drawn[j])
        if not self._direct:
            src = staging.transpose(0, 3, 1, 2) if self.options.output.layout == "chw" else staging
            if self._norm is None:
                np.copyto(x, src)
            else:
                self._norm.apply(src, out=x)
        arrays = {"x": x, "y": labels, "index": index}
        if self.collate is not None:
            rng = sample_rng(*key, int(index[0]) if len(index) else 0, _COLLATE_STREAM)
            arrays.update(check_extras(self.collate(dict(arrays), rng), self.options.user_code.collate or "",
                                       len(indices)))
        return arrays

    def _staging(self, n: int) -> np.ndarray:
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = np.empty((max(n, self.spec.batch_size), *self._hwc_shape), dtype=np.uint8)
        return self._scratch[:n]


def _substitute(bad: list[int], staging: np.ndarray, labels: np.ndarray, index: np.ndarray,
                first: DecodeError) -> dict[int, int]:
    """Replace each bad sample by the next good one of the same batch (cyclically); returns bad slot -> the
    slot it copies.

    Deterministic: it depends only on the batch, so any worker count gives the same result.
    `index` then names the sample really delivered in each place.
    """
    try:
        sources = substitute_sources(bad, len(labels))  # the rule the client checks the indices against
    except ValueError:
        raise DecodeError(first.path, f"{first.reason}; and every other sample of its batch is bad too",
                          "all_bad") from None
    taken = {}
    for slot, j in sources.items():
        staging[slot] = staging[j]
        labels[slot] = labels[j]
        index[slot] = index[j]
        taken[slot] = j
    return taken
