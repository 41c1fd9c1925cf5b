"""Counters of what the server does, a stats snapshot, and a Prometheus text endpoint.

The server's event loop owns a `Metrics` and updates it; every tick it publishes an
immutable snapshot, which the stats request and the HTTP thread read without locks.
Names follow Prometheus conventions with base units (`_total`, `_seconds`, `_bytes`).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Metrics", "serve_metrics", "BUILD_BUCKETS_S"]

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

    def rates(self) -> tuple[float, float]:
        """(images/s, batches/s) over the last minute (or the uptime, if shorter)."""
        now = time.monotonic()
        while self._window and now - self._window[0][0] > _WINDOW_S:
            self._window.popleft()
        span = min(_WINDOW_S, max(1e-9, now - self.started))
        return sum(n for _, n in self._window) / span, len(self._window) / span


def prometheus_text(snap: dict[str, Any]) -> str:
    """The Prometheus text exposition of a stats snapshot."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("loader_batches_sent_total", "counter", "Batches sent to clients.", [("", snap["batches_sent"])])
    metric("loader_images_sent_total", "counter", "Images sent to clients.", [("", snap["images_sent"])])
    metric("loader_sent_bytes_total", "counter", "Array bytes delivered to clients.", [("", snap["bytes_sent"])])
    metric("loader_decode_errors_total", "counter", "Bad samples and failed batches, by reason.",
           [(f'{{reason="{_escape(r)}"}}', n) for r, n in sorted(snap["errors_by_reason"].items())] or [("", 0)])
    metric("loader_worker_restarts_total", "counter", "Workers replaced, by cause.",
           [(f'{{cause="{c}"}}', n) for c, n in sorted(snap["worker_restarts"].items())] or [("", 0)])
    metric("loader_batches_ready", "gauge", "Batches built and waiting for client credit.",
           [("", snap["batches_ready"])])
    metric("loader_clients", "gauge", "Connected clients.", [("", len(snap["clients"]))])
    metric("loader_workers_busy_ratio", "gauge", "Fraction of its life each worker spent building batches.",
           [(f'{{worker="{w["id"]}"}}', round(w["busy_fraction"], 4)) for w in snap["workers"]])
    metric("loader_uptime_seconds", "gauge", "Seconds since the server started.", [("", round(snap["uptime_s"], 3))])
    hist = snap["batch_build_seconds"]
    samples, total = [], 0
    for bound, count in zip([*BUILD_BUCKETS_S, "+Inf"], hist["counts"]):
        total += count
        samples.append((f'_bucket{{le="{bound}"}}', total))
    lines.append("# HELP loader_batch_build_seconds Time a worker took to build one batch.")
    lines.append("# TYPE loader_batch_build_seconds histogram")
    lines.extend(f"loader_batch_build_seconds{labels} {value}" for labels, value in samples)
    lines.append(f"loader_batch_build_seconds_sum {hist['sum_s']}")
    lines.append(f"loader_batch_build_seconds_count {total}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def serve_metrics(port: int, snapshot: Any) -> ThreadingHTTPServer:
    """Serve /metrics (Prometheus text) and /healthz on 127.0.0.1:`port` from a daemon thread.

    `snapshot` is a callable returning the latest stats snapshot (published by the loop).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            if self.path in ("/metrics", "/"):
                body, ctype = prometheus_text(snapshot()).encode(), "text/plain; version=0.0.4"
            elif self.path == "/healthz":
                ok = snapshot().get("workers_ready", 0) > 0
                body, ctype = (b"ok\n" if ok else b"no ready worker\n"), "text/plain"
                if not ok:
                    self.send_response(503)
                    self.send_header("Content-Type", ctype)
                    self.end_headers()
                    self.wfile.write(body)
                    return
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="loader-metrics", daemon=True).start()
    log.info("metrics on http://127.0.0.1:%d/metrics", port)
    return httpd
