"""Server logging: readable lines by default, one JSON object per line for log collectors; no URL's
password or presigned signature in either (`redaction.redact`)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .redaction import redact

__all__ = ["LINES_PER_KIND_PER_MINUTE", "Throttle", "setup_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(level: str, fmt: str) -> None:
    """Send the server's log to stderr as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s loader-server %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


#: Lines of one kind logged per minute, whoever causes them; the rest are counted in one line.
LINES_PER_KIND_PER_MINUTE = 60


class Throttle:
    """At most `per_minute` lines of each kind per minute, across every peer and connection.

    A kind is a short name the caller gives (one per kind of event: a refused key, a closed
    connection, a reconnect, ...). Lines over the budget are counted, and the count is logged
    once the minute is over (at the next line of that kind, or at `flush`). Thread-safe.
    """

    def __init__(self, logger: logging.Logger, per_minute: int = LINES_PER_KIND_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.per_minute = per_minute
        self.clock = clock
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, lines, suppressed]
        self._lock = threading.Lock()

    def allow(self, kind: str) -> bool:
        """Whether a line of `kind` may be logged now (counts it either way)."""
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window[0] >= 60:
                if window is not None and window[2]:
                    self._summary(kind, int(window[2]))
                window = self._windows[kind] = [now, 0, 0]
            window[1] += 1
            if window[1] <= self.per_minute:
                return True
            window[2] += 1
            if window[2] == 1:
                self.logger.warning("more than %d log lines of kind %r this minute: the rest are counted, not logged",
                                    self.per_minute, kind)
            return False

    def log(self, level: int, kind: str, fmt: str, *args: Any) -> None:
        if self.allow(kind):
            self.logger.log(level, fmt, *args)

    def warning(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.WARNING, kind, fmt, *args)

    def info(self, kind: str, fmt: str, *args: Any) -> None:
        self.log(logging.INFO, kind, fmt, *args)

    def flush(self) -> None:
        """Log the counts of windows that are over (call now and then: a kind may go quiet)."""
        now = self.clock()
        with self._lock:
            for kind, window in list(self._windows.items()):
                if now - window[0] >= 60:
                    if window[2]:
                        self._summary(kind, int(window[2]))
                    del self._windows[kind]

    def _summary(self, kind: str, suppressed: int) -> None:
        self.logger.warning("%d more log line(s) of kind %r were not logged in the last minute (at most %d of a "
                            "kind per minute)", suppressed, kind, self.per_minute)
