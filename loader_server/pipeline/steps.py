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
from ..data.remote import RemoteStorage, reads_remote
from ..options import AugmentOptions, DecodeOptions, PipelineOptions, ReadOptions, UserCodeOptions
from .augment import Augmenter, parse_augment, sample_rng
from .cache import RecordState, SampleCache
from .decode import Decoder
from .user_code import check_image, load_function

__all__ = ["TRANSFORM_STREAM", "Reader", "Sample", "SamplePath", "Step", "cached_decode_steps", "plan_steps"]

#: User transforms draw apart from augmentations.
TRANSFORM_STREAM = 0x7F
_READ_EMA_WEIGHT = 0.05
#: The most reads one pipelining thread takes from the FIFO at a time (one pipeline, or a few when their requests
#: exceed what a connection may send before reading: RemoteStorage.read_ranges).
PIPELINE_DEPTH = 32


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

    Objects on a store are read ahead with HTTP/1.1 pipelining (``--read-connections K``): the
    samples whose bytes are one plain range of an object (tar members, uncompressed Parquet
    values: ``remote_range``) go to one FIFO that K threads drain, each on its own connection,
    taking up to `PIPELINE_DEPTH` reads at a time and sending them back to back
    (`RemoteStorage.read_ranges`): a batch's ranges cost a few round trips and a few thread
    switches instead of one of each per sample. Every other read (a compressed Parquet page, a
    whole object, a read the pipeline left unanswered, with its retries) goes to the read pool.
    `close` stops both.
    """

    def __init__(self, options: ReadOptions, dataset: Dataset) -> None:
        source = byte_source(dataset)
        self.read_bytes = source.read
        self.max_bytes = options.max_file_bytes
        self._latency_s = options.simulate_read_latency_ms / 1000
        self._auto = options.read_threads is None
        self._read_ema_s = 0.0
        self.pool: ThreadPoolExecutor | None = None
        remote = reads_remote(dataset)
        if options.read_threads:
            self.pool = ThreadPoolExecutor(options.read_threads, thread_name_prefix="loader-read")
        elif self._auto and remote:  # every read is a round trip: run ahead from the first
            self.pool = ThreadPoolExecutor(AUTO_READ_THREADS, thread_name_prefix="loader-read")
        # Pipelining needs the pool (for what it leaves) and real latency: --simulate-read-latency-ms sleeps
        # in `read`, which a pipelined read does not call, so that setting turns pipelining off.
        self._remote_range: Callable[[int, int], Any] | None = getattr(source, "remote_range", None)
        self._describe = source.describe
        self.connections = options.read_connections if (
            remote and self.pool is not None and self._remote_range is not None and not self._latency_s) else 0
        self._queue: queue.SimpleQueue[tuple[RemoteStorage, str, int, int, int, Future[bytes]] | None] = \
            queue.SimpleQueue()
        self._takers: list[threading.Thread] = []
        self._closed = False
        self.pipelined = 0  # reads handed to the pipelining threads

    def submit_many(self, indices: list[int]) -> list[Future[bytes]]:
        """Futures of the reads of `indices`: pipelined on `connections` connections where their bytes are one
        range of an object, else on the read threads (`pool`, which must exist)."""
        pool = self.pool
        assert pool is not None
        if self._closed:
            raise RuntimeError("this Reader is closed")
        if not self.connections:
            return [pool.submit(self.read, i) for i in indices]
        futures: list[Future[bytes]] = []
        put, where_of, max_bytes = self._queue.put, self._remote_range, self.max_bytes
        assert where_of is not None
        for i in indices:
            try:
                where = where_of(i, max_bytes)
            except Exception as exc:  # too large for --max-file-bytes: that read's error, as `read` says it
                fut: Future[bytes] = Future()
                fut.set_exception(exc)
            else:
                if where is None:
                    fut = pool.submit(self.read, i)
                else:
                    fut = Future()
                    put((*where, i, fut))
                    self.pipelined += 1
            futures.append(fut)
        if len(self._takers) < self.connections and not self._closed:  # started on first use, one connection each
            for _ in range(self.connections - len(self._takers)):
                taker = threading.Thread(target=self._take, name="loader-pipe", daemon=True)
                taker.start()
                self._takers.append(taker)
        return futures

    def _take(self) -> None:
        """One pipelining thread: take up to PIPELINE_DEPTH queued reads (waiting for the first), read them on this
        thread's connection; stop at the sentinel None (`close`)."""
        get, get_nowait = self._queue.get, self._queue.get_nowait
        storage: RemoteStorage | None = None
        try:
            while True:
                first = get()
                if first is None:
                    return
                taken = [first]
                while len(taken) < PIPELINE_DEPTH:
                    try:
                        more = get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._queue.put(None)  # this thread's sentinel, seen after what was taken is read
                        break
                    taken.append(more)
                storage = taken[0][0]
                self._pipelined(storage, taken)
        finally:
            if storage is not None:
                storage.release_thread()  # this thread's connections: closed with it

    def _pipelined(self, storage: RemoteStorage, taken: list[tuple[RemoteStorage, str, int, int, int,
                                                                      Future[bytes]]]) -> None:
        futures = [t[5] for t in taken]
        try:
            describe = self._describe

            def deliver(k: int, result: bytes | Exception) -> None:
                if futures[k].done():  # (only after a bug below failed them all)
                    return
                if isinstance(result, Exception):
                    futures[k].set_exception(result)
                else:
                    futures[k].set_result(result)

            assert self.pool is not None
            storage.read_ranges([(url, offset, size, describe, i) for _, url, offset, size, i, _ in taken], deliver,
                                self.pool)
        except BaseException as exc:  # a bug: every read still waited on gets it, never a hang
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the pipelining threads (a sentinel each, after what is queued) and the read pool; idempotent."""
        if self._closed:
            return
        self._closed = True
        for _ in self._takers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for taker in self._takers:
            taker.join(max(0.0, deadline - time.monotonic()))
        if self.pool is not None:  # its idle threads end at once; a read under way ends within its deadline
            self.pool.shutdown(wait=False, cancel_futures=True)

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
