"""The sample path: the steps one sample goes through in a worker, chosen once from the options.

    cache lookup → read → decode (and crop) → cache store → augment        (then, per batch: finish)

`plan_steps` picks the steps a configuration needs, once per worker (and once more for the
plain stream a client asks for with ``augment=False``); `SamplePath.run` then runs them over
each sample. Every step is built from its own option group (options.py): the read step from
`ReadOptions`, decoding from `DecodeOptions`, augmentations from `AugmentOptions`, user code
from `UserCodeOptions`; nothing here sees the whole configuration.

A cache lookup comes first so that a sample whose record is valid is never read: its version
(``version(i)`` of the data set) is taken before its bytes are, and the record is copied
straight into the batch slot (or into the record-size staging of ``--cache-size``).

``serve`` (batch.py), ``check`` and ``cache build`` all run samples through these steps, so a
sample that passes ``check`` or sits in a cache built ahead is what ``serve`` produces.
Where the next capabilities land: another byte source is another data set (``read``,
``version``); the decoder (decode.py) decodes less where it can: a JPEG at the cheapest M/8
scale that covers the output and, for the SOURCE-stage crop, only what the crop needs, the
crop drawn from the header's size before anything is decoded; a new augmentation is a class
in augment.py.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import AUTO_READ_THREADS, SLOW_READ_S
from ..data.datasets import Dataset, byte_source
from ..data.reading import Version
from ..data.remote import reads_remote
from ..options import AugmentOptions, DecodeOptions, PipelineOptions, ReadOptions, UserCodeOptions
from .augment import Augmenter, parse_augment, sample_rng
from .cache import RecordState, SampleCache
from .decode import Decoder
from .user_code import check_image, load_function

__all__ = ["TRANSFORM_STREAM", "Reader", "Sample", "SamplePath", "Step", "cached_decode_steps", "plan_steps"]

#: User transforms draw apart from augmentations.
TRANSFORM_STREAM = 0x7F
_READ_EMA_WEIGHT = 0.05
_PIPELINE_DEPTH = 32  # PROTOTYPE (pipe26): reads one connection takes at a time (PIPE26_MODE=queue)


class Sample:
    """One sample on its way through the steps (one object per worker, reused)."""

    __slots__ = ("i", "name", "data", "pending", "version", "state", "target", "out", "key", "hit", "drawn", "_rng")

    def __init__(self) -> None:
        self.i = 0
        self.name = ""
        self.data: bytes = b""
        self.pending: Future[bytes] | None = None
        self.version: Version | None = None
        self.state: RecordState | None = None  # the cache record's state, when read ahead found it valid
        self.target: np.ndarray = np.empty(0, np.uint8)  # where decoding writes: the slot, or the record
        self.out: np.ndarray = np.empty(0, np.uint8)  # the batch slot (uint8 HWC)
        self.key = (0, 0)  # (seed, epoch)
        self.hit = False
        self.drawn: list[tuple[str, list[float]]] | None = None  # what the augmentations drew (for a manifest)
        self._rng: np.random.Generator | None = None

    def crop(self, augmenter: Augmenter, width: int, height: int) -> tuple[int, int, int, int]:
        """The SOURCE-stage region of a `width` x `height` image, noted in `drawn` when a manifest is made."""
        box = augmenter.crop_box(width, height, self.rng)
        if self.drawn is not None:
            self.drawn.append((augmenter.source_crop_name or "crop", list(box)))
        return box

    @property
    def rng(self) -> np.random.Generator:
        """The sample's augmentation generator, seeded by (seed, epoch, index) on first use."""
        if self._rng is None:
            self._rng = sample_rng(*self.key, self.i)
        return self._rng


Step = Callable[[Sample], None]


class Reader:
    """The read step's bytes source: ``read(i)`` of the data set, bounded, inline or on read-ahead threads.

    By default reads stay inline, which is cheapest for local disks and the page cache, and a
    pool starts once reads average over `SLOW_READ_S` (slow storage), or at once for objects
    on a store (s3://, https://).
    """

    def __init__(self, options: ReadOptions, dataset: Dataset) -> None:
        source = byte_source(dataset)
        self.read_bytes = source.read
        self.max_bytes = options.max_file_bytes
        self._latency_s = options.simulate_read_latency_ms / 1000
        self._auto = options.read_threads is None
        self._read_ema_s = 0.0
        self.pool: ThreadPoolExecutor | None = None
        if options.read_threads:
            self.pool = ThreadPoolExecutor(options.read_threads, thread_name_prefix="loader-read")
        elif self._auto and reads_remote(dataset):  # every read is a round trip: run ahead from the first
            self.pool = ThreadPoolExecutor(AUTO_READ_THREADS, thread_name_prefix="loader-read")
        # PROTOTYPE (pipe26): PIPE26_READ_CONNS=K reads a batch's remote ranges on K connections, each one
        # thread pipelining its share (HTTP/1.1), instead of one read thread per sample.
        self.pipe: ThreadPoolExecutor | None = None
        self.pipe_conns = int(os.environ.get("PIPE26_READ_CONNS", "0") or 0)
        self._remote_range = getattr(source, "remote_range", None)
        self._storage = getattr(source, "storage", None)
        self._describe = getattr(source, "describe", None)
        if self.pipe_conns > 0 and self.pool is not None and self._remote_range is not None \
                and reads_remote(dataset):
            self.pipe = ThreadPoolExecutor(self.pipe_conns, thread_name_prefix="loader-pipe")
        # PIPE26_MODE=queue: the K threads share one FIFO of reads, each taking up to 32 (the pipeline's depth)
        # at a time, across batches (deeper pipelines when several tasks are read ahead); split: each batch
        # split in K interleaved shares, one pipeline each.
        self._queued = os.environ.get("PIPE26_MODE", "split") == "queue"
        self._queue: queue.SimpleQueue[tuple[int, Future[bytes]]] = queue.SimpleQueue()
        self._takers = 0

    def submit_many(self, indices: list[int]) -> list[Future[bytes]]:
        """Futures of the reads of `indices`: on the read threads, or pipelined on `pipe_conns` connections."""
        if self.pipe is None:
            assert self.pool is not None
            return [self.pool.submit(self.read, i) for i in indices]
        futures: list[Future[bytes]] = [Future() for _ in indices]
        k = self.pipe_conns
        if self._queued:
            for i, fut in zip(indices, futures, strict=True):
                self._queue.put((i, fut))
            while self._takers < k:  # started on first use, each one a connection
                self._takers += 1
                threading.Thread(target=self._take, name="loader-pipe", daemon=True).start()
            return futures
        for g in range(min(k, len(indices))):  # interleaved: every connection's first answer is an early slot
            self.pipe.submit(self._pipelined, indices[g::k], futures[g::k])
        return futures

    def _take(self) -> None:
        while True:
            taken = [self._queue.get()]
            while len(taken) < _PIPELINE_DEPTH:
                try:
                    taken.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._pipelined([i for i, _ in taken], [f for _, f in taken])

    def _pipelined(self, indices: list[int], futures: list[Future[bytes]]) -> None:
        try:
            items: list[tuple[str, int, int, Callable[[int], str], int]] = []
            waiting: list[Future[bytes]] = []
            for i, fut in zip(indices, futures, strict=True):
                try:
                    where = self._remote_range(i, self.max_bytes)  # type: ignore[misc]
                    if where is None:
                        fut.set_result(self.read(i))
                        continue
                except BaseException as exc:
                    fut.set_exception(exc)
                    continue
                items.append((*where, self._describe, i))
                waiting.append(fut)

            def deliver(k: int, result: bytes | Exception) -> None:
                if isinstance(result, Exception):
                    waiting[k].set_exception(result)
                else:
                    waiting[k].set_result(result)

            if items:
                self._storage.read_ranges(items, deliver)  # type: ignore[union-attr]
        except BaseException as exc:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)

    def read(self, i: int) -> bytes:
        if self._latency_s:
            time.sleep(self._latency_s)
        return self.read_bytes(i, self.max_bytes)

    def read_inline(self, i: int) -> bytes:
        """Read on this thread; in auto mode, start the pool once reads average over SLOW_READ_S."""
        if not self._auto:
            return self.read(i)
        started = time.perf_counter()
        data = self.read(i)
        self._read_ema_s += _READ_EMA_WEIGHT * (time.perf_counter() - started - self._read_ema_s)
        if self._read_ema_s > SLOW_READ_S and self.pool is None:
            self.pool = ThreadPoolExecutor(AUTO_READ_THREADS, thread_name_prefix="loader-read")
        return data

    def submit(self, i: int) -> Future[bytes] | None:
        return None if self.pool is None else self.pool.submit(self.read, i)


# ---------------------------------------------------------------------------- the steps
class LookupCache:
    """Copy a valid record into the target (then nothing is read, decoded or stored)."""

    def __init__(self, cache: SampleCache, dataset: Dataset) -> None:
        self.cache, self.version = cache, byte_source(dataset).version

    def __call__(self, s: Sample) -> None:
        if s.version is None:
            s.version = self.version(s.i)
        s.hit = self.cache.lookup(s.i, s.version, s.target, s.state)


class Read:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader

    def __call__(self, s: Sample) -> None:
        if not s.hit:
            s.data = self.reader.read_inline(s.i) if s.pending is None else s.pending.result()


class Decode:
    """Decode and resize straight into the target (a JPEG at the cheapest M/8 scale that covers it)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder

    def __call__(self, s: Sample) -> None:
        if not s.hit:
            self.decoder.decode_into(s.data, s.name, s.target)


class DecodeRegion:
    """Decode only what the region the SOURCE-stage augmentation draws needs (rrc), and resize that region
    into the slot; the region is drawn from the header's size, before decoding (decode.py)."""

    def __init__(self, decoder: Decoder, augmenter: Augmenter) -> None:
        self.decoder, self.augmenter = decoder, augmenter

    def __call__(self, s: Sample) -> None:
        self.decoder.decode_region_into(s.data, s.name, s.out, lambda w, h: s.crop(self.augmenter, w, h))


class Transform:
    """``--transform``: decode, run the user's function on the decoded image, then resize (or crop) into the slot."""

    def __init__(self, decoder: Decoder, options: UserCodeOptions, channels: int, crop: Augmenter | None) -> None:
        assert options.transform is not None
        self.decoder, self.spec, self.channels, self.crop = decoder, options.transform, channels, crop
        self.fn = load_function(options.transform, "transform")

    def __call__(self, s: Sample) -> None:
        img = self.decoder.decode(s.data, s.name, reduce=self.crop is None)  # a crop needs every pixel
        img = check_image(self.fn(img, sample_rng(*s.key, s.i, TRANSFORM_STREAM)), self.spec, self.channels)
        if img.ndim == 2:
            img = img[..., None]
        if self.crop is not None:
            x0, y0, w, h = s.crop(self.crop, img.shape[1], img.shape[0])
            img = img[y0 : y0 + h, x0 : x0 + w]
        self.decoder.resize_into(img, s.out)


class StoreCache:
    """Keep what was decoded as the sample's record (only after a good decode)."""

    def __init__(self, cache: SampleCache) -> None:
        self.cache = cache

    def __call__(self, s: Sample) -> None:
        if not s.hit:
            self.cache.store(s.i, s.version, s.target)


class CropRecord:
    """The SOURCE-stage augmentation on a record (``--cache-size``): its region, resized into the slot."""

    def __init__(self, decoder: Decoder, augmenter: Augmenter) -> None:
        self.decoder, self.augmenter = decoder, augmenter

    def __call__(self, s: Sample) -> None:
        record = s.target
        x0, y0, w, h = s.crop(self.augmenter, record.shape[1], record.shape[0])
        self.decoder.resize_into(record[y0 : y0 + h, x0 : x0 + w], s.out)


class Augment:
    """The OUTPUT-stage augmentations, in place on the slot."""

    def __init__(self, augmenter: Augmenter) -> None:
        self.augmenter = augmenter

    def __call__(self, s: Sample) -> None:
        self.augmenter.apply(s.out, s.rng, s.drawn)


# ---------------------------------------------------------------------------- the plan
class SamplePath:
    """The steps of one configuration, run over one sample at a time by `run`."""

    def __init__(self, steps: list[Step], *, record_shape: tuple[int, int, int] | None,
                 cache: SampleCache | None) -> None:
        self.steps = steps
        self.record: np.ndarray | None = None if record_shape is None else np.empty(record_shape, np.uint8)
        self.cache = cache  # looked up by this path (hits and misses are counted per batch)
        self.sample = Sample()
        self.hits = self.misses = 0

    @property
    def names(self) -> list[str]:
        """The steps, for logs and tests: ``['LookupCache', 'Read', 'Decode', 'StoreCache']``."""
        return [type(step).__name__ for step in self.steps]

    def run(self, i: int, name: str, out: np.ndarray, key: tuple[int, int] = (0, 0),
            pending: Future[bytes] | None = None, version: Version | None = None,
            drawn: list[tuple[str, list[float]]] | None = None, state: RecordState | None = None) -> None:
        """Sample `i` (named `name` in errors) through every step into the uint8 HWC slot `out`; with
        `drawn`, what its augmentations drew is appended there."""
        s = self.sample
        s.i, s.name, s.out, s.key, s.pending, s.version, s.drawn = i, name, out, key, pending, version, drawn
        s.state = state
        s.hit, s._rng = False, None
        s.target = out if self.record is None else self.record
        try:
            for step in self.steps:
                step(s)
        finally:
            if self.cache is not None:
                if s.hit:
                    self.hits += 1
                else:
                    self.misses += 1
            s.data = b""


def plan_steps(options: PipelineOptions | Any, dataset: Dataset, cache: SampleCache | None = None, *,
               augment: bool = False, reader: Reader | None = None) -> SamplePath:
    """The steps a worker runs for each sample of a byte data set under `options`.

    `augment`: the stream asked for augmentations (a validation stream does not). Chosen once;
    nothing is decided per sample.
    """
    opts = PipelineOptions.of(options)
    decode: DecodeOptions = opts.decode
    aug: AugmentOptions = opts.augment
    reader = Reader(opts.read, dataset) if reader is None else reader
    decoder = Decoder(decode)
    augmenter = Augmenter(parse_augment(aug.augment)) if augment and aug.augment else None
    crop = augmenter if augmenter is not None and augmenter.source is not None else None
    tail: list[Step] = [Augment(augmenter)] if augmenter is not None and augmenter.post else []
    steps: list[Step]
    if opts.user_code.transform:  # on the full decoded image: never cached (refused with --cache)
        steps = [Read(reader), Transform(decoder, opts.user_code, decode.channels, crop)]
        return SamplePath(steps + tail, record_shape=None, cache=None)
    if crop is not None and decode.cache_size is not None:  # the crop of a record (cached or not): same pixels
        steps = _cached(cache, dataset, reader, Decoder(decode.for_record()))
        return SamplePath(steps + [CropRecord(decoder, crop)] + tail, record_shape=decode.record_shape,
                          cache=cache)
    if crop is not None:  # every pixel of the source is needed: nothing to cache at the output size
        steps = [Read(reader), DecodeRegion(decoder, crop)]
        return SamplePath(steps + tail, record_shape=None, cache=None)
    if cache is not None and decode.cache_size is None:
        return SamplePath(_cached(cache, dataset, reader, decoder) + tail, record_shape=None, cache=cache)
    steps = [Read(reader), Decode(decoder)]
    return SamplePath(steps + tail, record_shape=None, cache=None)


def cached_decode_steps(options: PipelineOptions | Any, dataset: Dataset, cache: SampleCache) -> SamplePath:
    """The steps that make a sample's record, as serving runs them: lookup, read, decode (at the record size), store.

    ``cache build`` runs these into a record-size buffer; ``serve`` runs the same four (then
    crops and augments) for a cached sample.
    """
    opts = PipelineOptions.of(options)
    return SamplePath(_cached(cache, dataset, Reader(opts.read, dataset), Decoder(opts.decode.for_record())),
                      record_shape=None, cache=cache)


def _cached(cache: SampleCache | None, dataset: Dataset, reader: Reader, decoder: Decoder) -> list[Step]:
    if cache is None:
        return [Read(reader), Decode(decoder)]
    return [LookupCache(cache, dataset), Read(reader), Decode(decoder), StoreCache(cache)]
