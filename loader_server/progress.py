"""A one-line progress bar on stderr for long commands (check, demo, bench), without a dependency."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``label [#####.....] done/total rate/s extra`` redrawn in place; `close()` ends the line."""

    def __init__(self, label: str, total: int, unit: str = "") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_draw = 0.0

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if done < self.total and now - self._last_draw < 0.1:
            return  # redraw at most 10 times a second
        self._last_draw = now
        width = 30
        filled = int(width * done / max(1, self.total))
        rate = done / max(1e-9, now - self.started)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                f"{rate:.{0 if rate >= 10 else 2}f}{self.unit}/s{' ' + extra if extra else ''}")
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)
