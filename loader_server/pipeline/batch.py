"""Collating a batch: read, decode and resize each sample straight into the batch buffer.

Pure work over files and arrays, no sockets: the worker process calls `BatchBuilder.build`
and sends what it returns. File reads can run ahead on a thread pool (`read_threads`), so
that waiting on slow storage (NFS, object stores) overlaps with decoding; reads and OpenCV
both release the GIL. By default reads stay inline, which is cheapest for local disks and the
page cache, and the pool starts once reads average over `SLOW_READ_S`.

With a decoded-sample cache (cache.py), a sample whose record is valid is one copy from the
record into the batch slot and its file is not read; any other is read and decoded as without
the cache, then stored as its record. Augmentations apply after the record, as before; with
`cache_size`, records are larger than the output and the random resized crop is taken from them.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from loader_client.contract.normalize import Normalization
from loader_client.contract.sampling import substitute_sources

from ..config import AUTO_READ_THREADS, SLOW_READ_S, ServerConfig
from ..data.batch_spec import BatchSpec, batch_spec
from ..data.datasets import Dataset
from .augment import Augmenter, parse_augment, sample_rng
from .cache import SampleCache, record_decoder, record_shape
from .decode import DecodeError, Decoder, read_file
from .user_code import check_extras, check_image, load_function

__all__ = ["AUTO_READ_THREADS", "SLOW_READ_S", "BatchBuilder", "Reads"]

_TRANSFORM_STREAM = 0x7F  # user transforms draw apart from augmentations
_COLLATE_STREAM = 0xC0

_READ_EMA_WEIGHT = 0.05

#: Paths of a batch with their reads (a future per file when reads run ahead, else None) and, with a
#: cache, each file's stat taken before its read (None when the file cannot be stat'ed, or no cache).
Reads = list[tuple[str, "Future[bytes] | None", "os.stat_result | None"]]


class BatchBuilder:
    """Builds the arrays of one batch (``x``, ``y``, ``index``) from sample indices.

    Shapes and dtypes come from `spec` (derived from `config` and `index` when not given);
    `config` gives how to decode, resize and augment.
    """

    def __init__(self, config: ServerConfig, index: Dataset, spec: BatchSpec | None = None,
                 cache: SampleCache | None = None) -> None:
        self.config = config
        self.index = index
        self.spec = batch_spec(config, index) if spec is None else spec
        self.decoder = Decoder(config)
        w, h = config.size
        self._hwc_shape = (h, w, config.channels)
        self._latency_s = config.simulate_read_latency_ms / 1000
        self._auto = config.read_threads is None
        self._read_ema_s = 0.0
        self._pool: ThreadPoolExecutor | None = None
        if config.read_threads:
            self._pool = ThreadPoolExecutor(config.read_threads, thread_name_prefix="loader-read")
        self._scratch: np.ndarray | None = None  # uint8 HWC staging for float32 or CHW output
        self.skip_bad = config.on_error == "skip"
        self.augmenter = Augmenter(parse_augment(config.augment)) if config.augment else None
        self.transform = load_function(config.transform, "transform") if config.transform else None
        self.collate = load_function(config.collate, "collate") if config.collate else None
        self.last_bad: list[tuple[str, str, str]] = []  # (path, code, reason) replaced in the last batch
        self._norm = None
        if config.dtype == "float32":
            self._norm = Normalization(config.channels, config.layout, config.mean, config.std)
        self.cache = cache if self.spec.build == "decode" else None
        self.cache_hits = self.cache_misses = 0  # of the last batch
        self._record: np.ndarray | None = None  # staging of one large record (cache_size)
        self._record_decoder: Decoder | None = None
        if config.cache_size is not None and self.spec.build == "decode":  # with or without a cache
            self._record_decoder = record_decoder(config)
            self._record = np.empty(record_shape(config), dtype=np.uint8)

    def allocate(self, batch_size: int | None = None) -> np.ndarray:
        """A fresh output buffer ``x`` for `batch_size` samples (default: a full batch) as the spec says."""
        return self.spec.allocate(batch_size)

    def read_ahead(self, indices: np.ndarray) -> Reads:
        """Start reading the files of a batch on the read threads (no-op without them)."""
        if self.spec.build == "gather":
            return []
        path = self.index.path  # type: ignore[attr-defined]
        paths = [path(int(i)) for i in indices]
        if self.cache is not None:  # stat before reading; a file whose record is valid is not read at all
            stats = [_stat(p) for p in paths]
            if self._pool is None:
                return [(p, None, st) for p, st in zip(paths, stats, strict=True)]
            return [(p, None if self.cache.valid(int(i), st) else self._pool.submit(self._read, p), st)
                    for i, p, st in zip(indices, paths, stats, strict=True)]
        if self._pool is None:
            return [(p, None, None) for p in paths]
        return [(p, self._pool.submit(self._read, p), None) for p in paths]

    def _read(self, path: str) -> bytes:
        if self._latency_s:
            time.sleep(self._latency_s)
        return read_file(path, self.config.max_file_bytes)

    def _read_inline(self, path: str) -> bytes:
        """Read on this thread; in auto mode, start the pool once reads average over SLOW_READ_S."""
        if not self._auto:
            return self._read(path)
        started = time.perf_counter()
        data = self._read(path)
        self._read_ema_s += _READ_EMA_WEIGHT * (time.perf_counter() - started - self._read_ema_s)
        if self._read_ema_s > SLOW_READ_S and self._pool is None:
            self._pool = ThreadPoolExecutor(AUTO_READ_THREADS, thread_name_prefix="loader-read")
        return data

    def build(self, indices: np.ndarray, x: np.ndarray, reads: Reads | None = None,
              key: tuple[int, int] = (0, 0), augment: bool = False) -> dict[str, np.ndarray]:
        """Fill `x` (from `allocate`, at least ``len(indices)`` long) and return the batch arrays.

        `reads` comes from `read_ahead` for the same indices; `key` is (seed, epoch), which seeds
        augmentations (when `augment`) and user code. Raises DecodeError naming the file of the
        first sample that fails.
        """
        n = len(indices)
        x = x[:n]
        if self.spec.build == "gather":  # rows copied as stored, no decoding
            self.last_bad = []
            self.index.gather(indices, x)  # type: ignore[attr-defined]
            return {"x": x, "y": np.ascontiguousarray(self.index.labels[indices]),
                    "index": np.array(indices, dtype=np.int64)}
        direct = self.config.dtype == "uint8" and self.config.layout == "hwc"
        staging = x if direct else self._staging(n)
        bad: list[tuple[int, DecodeError]] = []
        # Through a record: a cached sample, or a random resized crop from the record-size region
        # (`cache_size`), which is the same with and without a cache.
        cropped = (self._record is not None and augment and self.augmenter is not None
                   and self.augmenter.rrc is not None)
        through_record = cropped or (self.cache is not None and self._record is None)
        self.cache_hits = self.cache_misses = 0
        for slot, (path, pending, st) in enumerate(self.read_ahead(indices) if reads is None else reads):
            try:
                index_i = int(indices[slot])
                if through_record:
                    self._from_record(index_i, path, pending, st, staging[slot], key, augment)
                    continue
                data = self._read_inline(path) if pending is None else pending.result()
                if self.transform is not None:
                    img = self.decoder.decode(data, path, reduce=not (augment and self.augmenter and
                                                                      self.augmenter.rrc))
                    img = check_image(self.transform(img, sample_rng(*key, index_i, _TRANSFORM_STREAM)),
                                      self.config.transform or "", self.config.channels)
                else:
                    img = None
                if not augment or self.augmenter is None:
                    if img is None:
                        self.decoder.decode_into(data, path, staging[slot])
                    else:
                        self.decoder.resize_into(img if img.ndim == 3 else img[..., None], staging[slot])
                else:
                    self._augmented(data, path, staging[slot], sample_rng(*key, index_i), img)
            except DecodeError as exc:
                if not self.skip_bad:
                    raise
                bad.append((slot, exc))
        labels = self.index.labels[indices]
        index = np.array(indices, dtype=np.int64)
        self.last_bad = [(exc.path, exc.code, exc.reason) for _, exc in bad]
        if bad:
            _substitute([slot for slot, _ in bad], staging, labels, index, bad[0][1])
        if not direct:
            self._finish(staging, x)
        arrays = {"x": x, "y": labels, "index": index}
        if self.collate is not None:
            rng = sample_rng(*key, int(index[0]) if len(index) else 0, _COLLATE_STREAM)
            arrays.update(check_extras(self.collate(dict(arrays), rng), self.config.collate or "", n))
        return arrays

    def _from_record(self, i: int, path: str, pending: Future[bytes] | None, st: os.stat_result | None,
                    out: np.ndarray, key: tuple[int, int], augment: bool) -> None:
        """Sample `i` into `out` from its record: the cached one when valid, else decoded (and
        stored, with a cache); then augmented. Without a cache (`cache_size` alone) the record is
        decoded every time, so the pixels are those a cache would give.

        The file is stat'ed before it is read, so the record is tagged with what was read or
        older (never newer): a file changed meanwhile is decoded again next time.
        """
        cache = self.cache
        if cache is not None and st is None and pending is None:
            st = _stat(path)
        record = out if self._record is None else self._record
        if cache is not None and cache.lookup(i, st, record):
            self.cache_hits += 1
        else:
            self.cache_misses += cache is not None
            data = self._read_inline(path) if pending is None else pending.result()
            (self.decoder if self._record_decoder is None else self._record_decoder).decode_into(data, path, record)
            if cache is not None:
                cache.store(i, st, record)  # only after a good decode: a bad file never gets a record
        if not augment or self.augmenter is None:
            return
        rng = sample_rng(*key, i)
        if self._record is not None:  # random resized crop of the (larger) record, as of a decoded image
            x0, y0, w, h = self.augmenter.crop_box(record.shape[1], record.shape[0], rng)
            self.decoder.resize_into(record[y0 : y0 + h, x0 : x0 + w], out)
        self.augmenter.apply(out, rng)

    def _augmented(self, data: bytes, path: str, out: np.ndarray, rng: np.random.Generator,
                   img: np.ndarray | None = None) -> None:
        """Decode (unless `img` is given), random-resized-crop into `out` (or resize), then the in-place ops."""
        assert self.augmenter is not None
        if self.augmenter.rrc is None:
            if img is None:
                self.decoder.decode_into(data, path, out)
            else:
                self.decoder.resize_into(img if img.ndim == 3 else img[..., None], out)
        else:  # the crop needs full resolution: no reduced-size decoding here
            if img is None:
                img = self.decoder.decode(data, path, reduce=False)
            x0, y0, w, h = self.augmenter.crop_box(img.shape[1], img.shape[0], rng)
            self.decoder.resize_into(img[y0 : y0 + h, x0 : x0 + w], out)
        self.augmenter.apply(out, rng)

    def _staging(self, n: int) -> np.ndarray:
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = np.empty((max(n, self.spec.batch_size), *self._hwc_shape), dtype=np.uint8)
        return self._scratch[:n]

    def _finish(self, hwc: np.ndarray, x: np.ndarray) -> None:
        """Convert the uint8 HWC staging batch to the output dtype and layout in one pass each."""
        src = hwc.transpose(0, 3, 1, 2) if self.config.layout == "chw" else hwc
        if self._norm is None:
            np.copyto(x, src)
        else:
            self._norm.apply(src, out=x)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # the read that follows reports it as a bad file
        return None


def _substitute(bad: list[int], staging: np.ndarray, labels: np.ndarray, index: np.ndarray,
                first: DecodeError) -> None:
    """Replace each bad sample by the next good one of the same batch (cyclically).

    Deterministic: it depends only on the batch, so any worker count gives the same result.
    `index` then names the sample really delivered in each place.
    """
    try:
        sources = substitute_sources(bad, len(labels))  # the rule the client checks the indices against
    except ValueError:
        raise DecodeError(first.path, f"{first.reason}; and every other sample of its batch is bad too",
                          "all_bad") from None
    for slot, j in sources.items():
        staging[slot] = staging[j]
        labels[slot] = labels[j]
        index[slot] = index[j]
