"""The skip policy's bookkeeping: each bad file counted and reported once, and the --max-bad limit.

Pure state: the event loop feeds it the bad files a worker replaced in a batch; it returns the
ones seen for the first time (to log) and, once more distinct files than the limit are bad,
the message every client then gets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["BadFiles"]


class BadFiles:
    """Distinct bad files seen in skip mode; `limit` of them are tolerated, one more is not."""

    def __init__(self, limit: int, data: str) -> None:
        self.limit = limit
        self.data = data
        self.files: dict[str, str] = {}  # path -> reason
        self.too_many = ""  # set once the limit is exceeded: the error every client gets

    def note(self, bad: Iterable[Sequence[str]]) -> list[tuple[str, str, str]]:
        """Record (path, code, reason) entries; returns those not seen before."""
        new = []
        for path, code, reason in bad:
            if path not in self.files:
                self.files[path] = reason
                new.append((path, code, reason))
        if len(self.files) > self.limit and not self.too_many:
            self.too_many = (
                f"{len(self.files)} bad files exceed --max-bad ({self.limit}): the model would train on "
                f"substitutes. Run `loader-server check --data {self.data}` for the list, fix or "
                "remove them, or raise --max-bad"
            )
        return new
