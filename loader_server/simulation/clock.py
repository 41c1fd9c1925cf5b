"""A simulated clock: events at simulated times, run in time order (ties in the order they were set)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["Clock"]


class Clock:
    """`at`/`after` schedule a call; `run` makes them, advancing `now` to each one's time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._queue: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()

    def at(self, when: float, call: Callable[..., Any], *args: Any) -> None:
        heapq.heappush(self._queue, (max(when, self.now), next(self._order), call, args))

    def after(self, delay: float, call: Callable[..., Any], *args: Any) -> None:
        self.at(self.now + delay, call, *args)

    def run(self, done: Callable[[], bool], max_events: int) -> None:
        """Make the calls in time order until `done()` or nothing is left; raises past `max_events`."""
        queue, pop = self._queue, heapq.heappop
        while queue and not done():
            self.now, _, call, args = pop(queue)
            call(*args)
            self.events += 1
            if self.events > max_events:
                raise RuntimeError(f"the simulation made more than {max_events:,} events without finishing: "
                                   "a livelock in the fleet logic, or a fleet too large for this bound")
