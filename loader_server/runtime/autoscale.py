"""``--workers auto``: how many workers keep every trainer's stall under the target, with the fewest.

Pure: the event loop calls `Autoscaler.observe` every tick with what it knows (each trainer's
recent stall, from the reports its client sends with every credit and ping; the seconds the
workers have spent holding tasks; the worker count), and applies the `Change` it returns with
`Supervisor.resize`. The rules:

* **Up** when some trainer's stall is above the target and the workers are busy (at least
  `UP_MIN_BUSY` of their time: idle workers and a stalled trainer mean the limit is elsewhere,
  and more workers would not help). A trainer that waits a fraction ``s`` of its step time gets
  ``1 / (1 - s)`` times the batches it gets now, if workers scale: the count is multiplied by
  that (and `UP_MARGIN`), at least one more, at most the maximum.
* **Up, before any trainer waits**, when the workers were busy `SATURATED_BUSY` of the last
  interval and the trainers took more batches than were built (`DRAINING_RATIO`): a trainer whose
  step got faster drains what was built ahead, for seconds before it waits. The count is
  multiplied by that ratio (and `UP_MARGIN`). Busy workers that build ahead (a prefetch filling
  up) are left alone.
* **Down** when every trainer's stall is under half the target and the workers' busy time
  says fewer would do: the count that would be `DOWN_BUSY` busy, at least the minimum, and at
  most half of the workers go at once.
* **Never faster than `interval_s`**: two changes are at least `interval_s` apart, and each is
  decided on what was measured since the last one (the workers' busy time over the last
  `interval_s`, the trainers' stall over their last 2 s), so the count cannot swing up and
  down faster than every ``2 x interval_s``.

Trainers whose client reports no stall (an older client) are left out; with no trainer at all
the workers' busy time alone decides, so an idle server shrinks to the minimum.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "DOWN_BUSY",
    "DRAINING_RATIO",
    "SATURATED_BUSY",
    "UP_MARGIN",
    "UP_MIN_BUSY",
    "Autoscaler",
    "Change",
    "ScalePolicy",
]

#: Scale up only when the workers held tasks at least this share of the time.
UP_MIN_BUSY = 0.6
#: Scale up by this much more than the stall asks for (the stall estimate is a recent average).
UP_MARGIN = 1.1
#: Workers this busy have no slack: scale up even before a trainer waits ...
SATURATED_BUSY = 0.95
#: ... when the trainers take more batches than are built by this factor (what was built ahead runs out).
DRAINING_RATIO = 1.05
#: Scale down to the count that would be this busy.
DOWN_BUSY = 0.75
#: The stall that counts as total when computing the factor (a trainer waiting 100% gives 10x).
_MAX_STALL = 0.9


@dataclass(frozen=True)
class ScalePolicy:
    """The bounds and the goal: `lo` to `hi` workers, every trainer's stall under `target`."""

    lo: int
    hi: int
    target: float
    interval_s: float

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"need 1 <= min workers <= max workers, got {self.lo} and {self.hi}")
        if not 0 < self.target < 1:
            raise ValueError(f"the target stall is a fraction between 0 and 1, got {self.target}")
        if self.interval_s <= 0:
            raise ValueError(f"the scaling interval must be > 0 s, got {self.interval_s}")


@dataclass(frozen=True)
class Change:
    """Move from `before` to `workers` workers, because of `reason` (a sentence for the log)."""

    before: int
    workers: int
    reason: str

    @property
    def up(self) -> bool:
        return self.workers > self.before


class Autoscaler:
    """Decides worker counts under a `ScalePolicy` (module doc)."""

    def __init__(self, policy: ScalePolicy, now: float) -> None:
        self.policy = policy
        self.last_change = now
        self._samples: deque[tuple[float, float]] = deque()  # (time, busy seconds) since the last change
        self._counts: deque[tuple[float, int, int]] = deque()  # (time, batches used, batches built)
        self.changes = 0

    def observe(self, now: float, stalls: Mapping[str, float | None], busy_s: float, workers: int, *,
                used: int = 0, built: int = 0) -> Change | None:
        """What the loop knows now: each trainer's recent stall (None: not known yet), the workers' total
        busy seconds so far, the count of workers, and (cumulative) the batches `used` (sent to a
        trainer for the first time: a share's batch once) and `built`. Returns the change to make, or None."""
        p = self.policy
        self._samples.append((now, busy_s))
        self._counts.append((now, used, built))
        while len(self._counts) > 2 and self._counts[1][0] <= now - 2 * p.interval_s:
            self._counts.popleft()
        while len(self._samples) > 2 and self._samples[1][0] <= now - 2 * p.interval_s:
            self._samples.popleft()
        if now - self.last_change < p.interval_s:
            return None
        # The workers' busy time over the last interval (all of it since the last change).
        t0, b0 = next(((t, b) for t, b in reversed(self._samples) if t <= now - p.interval_s), self._samples[0])
        t1, b1 = self._samples[-1]
        if t1 - t0 < p.interval_s / 2:
            return None
        busy_workers = max(0.0, (b1 - b0) / (t1 - t0))  # workers busy on average
        busy = busy_workers / max(1, workers)
        known = {name: s for name, s in stalls.items() if s is not None}
        worst_name, worst = max(known.items(), key=lambda kv: kv[1], default=("", 0.0))
        change = None
        if worst > p.target and workers < p.hi and busy >= UP_MIN_BUSY:
            factor = UP_MARGIN / (1 - min(worst, _MAX_STALL))
            n = min(p.hi, max(workers + 1, math.ceil(workers * factor)))
            change = Change(workers, n, f"trainer {worst_name} waits {100 * worst:.1f}% of its step time (target "
                                        f"{100 * p.target:.1f}%) and the workers are {100 * busy:.0f}% busy")
        elif busy >= SATURATED_BUSY and workers < p.hi and \
                (ratio := self._use_over_build(now - (t1 - t0))) > DRAINING_RATIO:
            n = min(p.hi, max(workers + 1, math.ceil(workers * UP_MARGIN * ratio)))
            change = Change(workers, n, f"the workers were {100 * busy:.0f}% busy over the last {t1 - t0:.1f} s and "
                                        f"the trainers used {ratio:.2f} batches for each one built: what was built "
                                        "ahead runs out")
        elif workers > p.lo and worst <= p.target / 2 and t1 - t0 >= p.interval_s:
            n = max(p.lo, math.ceil(busy_workers / DOWN_BUSY), workers - workers // 2)
            if n < workers:
                stall_text = (f"the most waiting trainer ({worst_name}) waits {100 * worst:.1f}%" if known
                              else "no trainer reports waiting")
                change = Change(workers, n, f"the workers are {100 * busy:.0f}% busy: {n} would be "
                                            f"{100 * busy_workers / n:.0f}% busy; {stall_text} (target "
                                            f"{100 * p.target:.1f}%)")
        if change is not None:
            self.last_change = now
            self._samples = deque([(now, busy_s)])
            self.changes += 1
        return change

    def _use_over_build(self, since: float) -> float:
        """Batches used per batch built since `since` (above 1: the built-ahead batches run out)."""
        t0, u0, b0 = next((c for c in reversed(self._counts) if c[0] <= since), self._counts[0])
        _, u1, b1 = self._counts[-1]
        return (u1 - u0) / (b1 - b0) if b1 > b0 else 1.0
