"""Counters of what the server does, a stats snapshot, and a Prometheus endpoint.

The server's event loop owns a `Metrics` and updates it; every tick it publishes an
immutable snapshot, which the stats request and the HTTP thread read without locks.
The exposition is prometheus-client's, built from that snapshot by `SnapshotCollector`
only when scraped. Names follow Prometheus conventions with base units (`_total`,
`_seconds`, `_bytes`).
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import io
import itertools
import logging
import socket
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .logs import Throttle

__all__ = ["BUILD_BUCKETS_S", "HTTP_READ_TIMEOUT_S", "MAX_HTTP_CONNECTIONS", "MAX_HTTP_REQUEST_BYTES", "Metrics",
           "SnapshotCollector", "prometheus_text", "serve_metrics"]

log = logging.getLogger("loader_server")

#: Histogram buckets of the time a worker takes to build one batch.
BUILD_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WINDOW_S = 60.0


class Metrics:
    """Counters updated by the event loop (one thread)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.batches_sent = 0
        self.images_sent = 0
        self.bytes_sent = 0
        self.errors: Counter[str] = Counter()  # reason -> count (bad files, failed batches)
        self.worker_restarts: Counter[str] = Counter()  # "crashed" / "hung"
        self.worker_changes: Counter[str] = Counter()  # --workers auto: "up" / "down"
        self.shm_fallbacks = 0  # batches sent as frames to clients that map an arena: no slot was free
        self.shm_reclaimed = 0  # arena slots of clients that left given back once their processes exited
        self.build_counts = [0] * (len(BUILD_BUCKETS_S) + 1)
        self.build_sum_s = 0.0
        self._window: deque[tuple[float, int]] = deque()  # (time, images) of recent batches
        self.snapshot: dict[str, Any] = {}

    def sent(self, images: int, nbytes: int) -> None:
        now = time.monotonic()
        self.batches_sent += 1
        self.images_sent += images
        self.bytes_sent += nbytes
        self._window.append((now, images))

    def built(self, seconds: float) -> None:
        self.build_counts[bisect.bisect_left(BUILD_BUCKETS_S, seconds)] += 1
        self.build_sum_s += seconds

    def build_histogram(self) -> dict[str, Any]:
        """The batch build times as `stats` reports them: each count with the upper bound of its bucket
        (``le_s``, in seconds, as Prometheus's ``le``; the last bucket is ``"+Inf"``), and their sum."""
        return {"le_s": [*BUILD_BUCKETS_S, "+Inf"], "counts": list(self.build_counts), "sum_s": self.build_sum_s}

    def rates(self) -> tuple[float, float]:
        """(images/s, batches/s) over the last minute (or the uptime, if shorter)."""
        now = time.monotonic()
        while self._window and now - self._window[0][0] > _WINDOW_S:
            self._window.popleft()
        span = min(_WINDOW_S, max(1e-9, now - self.started))
        return sum(n for _, n in self._window) / span, len(self._window) / span


class SnapshotCollector(Collector):
    """The Prometheus metrics of the latest published stats snapshot, built when scraped.

    `snapshot_fn` returns the snapshot the event loop published last; reading it takes no lock
    and costs the loop nothing, so a scrape never touches the batch path.
    """

    def __init__(self, snapshot_fn: Callable[[], dict[str, Any]]) -> None:
        self.snapshot_fn = snapshot_fn

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot_fn()
        if not snap:  # nothing published yet
            return
        yield CounterMetricFamily("loader_batches_sent_total", "Batches sent to clients.", value=snap["batches_sent"])
        yield CounterMetricFamily("loader_images_sent_total", "Images sent to clients.", value=snap["images_sent"])
        yield CounterMetricFamily("loader_sent_bytes_total", "Array bytes delivered to clients.",
                                  value=snap["bytes_sent"])
        yield _by_label("loader_decode_errors_total",
                        "Bad samples and failed batches, by reason.", "reason", snap["errors_by_reason"])
        yield _by_label("loader_worker_restarts_total", "Workers replaced, by cause.", "cause",
                        snap["worker_restarts"])
        yield GaugeMetricFamily("loader_batches_ready", "Batches built and waiting for client credit.",
                                value=snap["batches_ready"])
        yield GaugeMetricFamily("loader_clients", "Connected clients.", value=len(snap["clients"]))
        yield GaugeMetricFamily("loader_workers", "Worker processes serving (not counting retiring ones); with "
                                "--workers auto, the count the autoscaler chose.",
                                value=snap.get("workers_target", len(snap["workers"])))
        yield CounterMetricFamily("loader_shm_fallback_batches_total", "Batches built as frames over the socket for "
                                  "clients that map a shared-memory arena, because no slot of it was free.",
                                  value=snap.get("shm_fallback_batches", 0))
        yield CounterMetricFamily("loader_shm_slots_reclaimed_total", "Shared-memory slots that clients held when "
                                  "they left, reused once their processes had exited.",
                                  value=snap.get("shm_slots_reclaimed", 0))
        yield _by_label("loader_worker_changes_total", "Changes of the worker count by --workers auto, by direction.",
                        "direction", snap.get("worker_changes_total", {}))
        stall = GaugeMetricFamily("loader_client_stall_ratio", "Each client's recent data stall: the share of its "
                                  "step time its trainer waited in next(), as its client reports it.",
                                  labels=["client", "share"])
        for c in snap["clients"]:
            if c.get("stall") is not None:
                stall.add_metric([str(c["name"]), str(c.get("share") or "")], round(c["stall"], 6))
        yield stall
        busy = GaugeMetricFamily("loader_workers_busy_ratio",
                                 "Fraction of its life each worker spent building batches.", labels=["worker"])
        for w in snap["workers"]:
            busy.add_metric([str(w["id"])], round(w["busy_fraction"], 4))
        yield busy
        yield GaugeMetricFamily("loader_uptime_seconds", "Seconds since the server started.",
                                value=round(snap["uptime_s"], 3))
        hist = snap["batch_build_seconds"]
        cumulative = list(itertools.accumulate(hist["counts"]))
        yield HistogramMetricFamily("loader_batch_build_seconds", "Time a worker took to build one batch.",
                                    buckets=[(str(b), c) for b, c in zip([*BUILD_BUCKETS_S, "+Inf"], cumulative,
                                                                         strict=True)],
                                    sum_value=hist["sum_s"])
        if "cache" in snap:
            yield from _cache_metrics(snap["cache"])


def _cache_metrics(cache: dict[str, Any]) -> Iterator[Metric]:
    """The decoded-sample cache: lookups, hit ratio, size and fill progress."""
    lookups = CounterMetricFamily("loader_cache_lookups_total", "Samples looked up in the decoded-sample cache.",
                                  labels=["result"])
    lookups.add_metric(["hit"], cache["hits"])
    lookups.add_metric(["miss"], cache["misses"])
    yield lookups
    yield GaugeMetricFamily("loader_cache_hit_ratio", "Hits over lookups of the decoded-sample cache since start.",
                            value=round(cache["hit_ratio"], 6))
    yield GaugeMetricFamily("loader_cache_size_bytes", "Size of the decoded-sample cache (file or shared memory).",
                            value=cache["bytes"])
    yield GaugeMetricFamily("loader_cache_records", "Records of the decoded-sample cache (one per sample).",
                            value=cache["records"])
    yield GaugeMetricFamily("loader_cache_filled_records", "Valid records of the decoded-sample cache.",
                            value=cache["filled"])
    yield GaugeMetricFamily("loader_cache_fill_ratio", "Share of the decoded-sample cache's records that are valid.",
                            value=round(cache["fill_ratio"], 6))


def _by_label(name: str, help_text: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """One sample per label value; a single unlabelled 0 while there is none (the series exists from the start)."""
    if not counts:
        return CounterMetricFamily(name, help_text, value=0)
    metric = CounterMetricFamily(name, help_text, labels=[label])
    for value, n in sorted(counts.items()):
        metric.add_metric([str(value)], n)
    return metric


def prometheus_text(snap: dict[str, Any]) -> str:
    """The Prometheus text exposition of a stats snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    return generate_latest(registry).decode()


#: HTTP connections served at once. When all are taken, a new one takes the place of the one that has
#: waited longest for its request (a scraper needs one, and a peer holding every place cannot keep it
#: out); when every place is answering a request, the new one is closed at once.
MAX_HTTP_CONNECTIONS = 16
#: Seconds a connection may take, in all, to send its request line and headers (then it is closed,
#: however it drips them); the whole connection, answer included, may last twice that.
HTTP_READ_TIMEOUT_S = 5.0
#: Bytes of a request line and its headers together (a scraper sends a few hundred); more are answered 431.
#: The standard library alone allows 100 headers of 64 KiB: 16 connections sending that grew the server
#: by 300 MB.
MAX_HTTP_REQUEST_BYTES = 16 << 10
#: Seconds the accept loop waits for the place of a connection it closed to be given back.
_EVICT_WAIT_S = 1.0


class _RequestTooLarge(http.client.LineTooLong):
    def __init__(self) -> None:
        Exception.__init__(self, f"the request line and headers are over {MAX_HTTP_REQUEST_BYTES} bytes")


class _BoundedReader:
    """The connection's reader, giving at most `MAX_HTTP_REQUEST_BYTES` in lines; beyond that it raises
    `_RequestTooLarge` (which `parse_request` answers 431, and the handler for the request line)."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.left = MAX_HTTP_REQUEST_BYTES

    def readline(self, limit: int = -1) -> bytes:
        if self.left <= 0:
            raise _RequestTooLarge
        line = self.raw.readline(self.left if limit < 0 else min(limit, self.left))
        self.left -= len(line)
        if self.left <= 0 and not line.endswith(b"\n"):
            raise _RequestTooLarge
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most `MAX_HTTP_CONNECTIONS` at once, each with a deadline.

    A connection must send its request line and headers within `HTTP_READ_TIMEOUT_S` in all (a
    per-read timeout alone let one that sends a byte every few seconds hold its thread for ever,
    and 16 of them locked every scraper out), and may live twice that. The deadlines are checked
    by the accept loop between its polls (`service_actions`), which shuts a late connection's
    socket down: its thread sees the end of the stream and returns. A connection that arrives
    while every place is taken takes the place of the one waiting longest for its request.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_HTTP_CONNECTIONS)
        self._lock = threading.Lock()
        #: socket -> [accepted at (monotonic), answering]: the connections that hold a place, oldest first
        self._live: OrderedDict[socket.socket, list[Any]] = OrderedDict()
        self.refused = 0
        self.evicted = 0
        self.throttle = Throttle(log)
        super().__init__(*args, **kwargs)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One throttled line, never the standard library's traceback on stderr for each failed request (a
        peer that goes away before its answer, or that a deadline cut, wrote 20 lines a time, unbounded)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the peer went away, or was cut: its loss alone, nothing to say
            return
        self.throttle.warning("metrics-error", "metrics endpoint: a request from %s failed: %s: %s",
                              client_address[0] if client_address else "?", type(exc).__name__, exc)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not (self._evict_oldest_waiting() and self._slots.acquire(timeout=_EVICT_WAIT_S)):
                self.refused += 1
                self.shutdown_request(request)
                return
        with self._lock:
            self._live[request] = [time.monotonic(), False]
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        self._forget(request)  # before the close: a deadline never shuts down a reused descriptor
        super().shutdown_request(request)

    def answering(self, request: Any) -> None:
        """`request` sent its request line and headers: it no longer gives its place to a newcomer."""
        with self._lock:
            if request in self._live:
                self._live[request][1] = True

    def service_actions(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [sock for sock, (since, answering) in self._live.items()
                    if now - since > HTTP_READ_TIMEOUT_S * (2 if answering else 1)]
            for sock in late:
                self._cut(sock)

    def _evict_oldest_waiting(self) -> bool:
        with self._lock:
            for sock, (_, answering) in self._live.items():
                if not answering:
                    self._cut(sock)
                    self.evicted += 1
                    return True
        return False

    def _cut(self, sock: socket.socket) -> None:
        """Shut `sock` down (its thread returns and closes it); the caller holds the lock."""
        del self._live[sock]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _forget(self, request: Any) -> None:
        with self._lock:
            self._live.pop(request, None)


def serve_metrics(host: str, port: int, snapshot_fn: Callable[[], dict[str, Any]]) -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus exposition) and /healthz on `host`:`port` from a daemon thread.

    `snapshot_fn` returns the latest stats snapshot (published by the loop). /healthz answers
    200 while a worker is ready, else 503. At most `MAX_HTTP_CONNECTIONS` connections are served
    at once, each given `HTTP_READ_TIMEOUT_S` in all to send its request (`_BoundedHTTPServer`).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot_fn))

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_READ_TIMEOUT_S  # each read's timeout; the server's deadline bounds them all together

        def setup(self) -> None:
            super().setup()
            self.rfile = cast(Any, _BoundedReader(self.rfile))

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except _RequestTooLarge as exc:  # in the request line (parse_request answers one in the headers)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.send_error(431, str(exc))

        def parse_request(self) -> bool:
            done = super().parse_request()  # the request line and headers have been read
            cast(_BoundedHTTPServer, self.server).answering(self.request)
            return done

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/metrics", "/"):
                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                self._answer(200, encoder(registry), ctype)
            elif path == "/healthz":
                ok = snapshot_fn().get("workers_ready", 0) > 0
                self._answer(200 if ok else 503, b"ok\n" if ok else b"no ready worker\n", "text/plain")
            else:
                self.send_error(404)

        def _answer(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server_class = _HTTPServer6 if ":" in host else _BoundedHTTPServer
    httpd = server_class((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, name="loader-metrics", daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics on http://%s:%d/metrics", shown, httpd.server_address[1])
    return httpd


class _HTTPServer6(_BoundedHTTPServer):
    address_family = socket.AF_INET6
