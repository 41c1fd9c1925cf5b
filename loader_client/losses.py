"""Losing a loader server of several: what counts as a loss, what it does to the epoch, and recovery.

A `LossPolicy` is what ``on_server_loss`` names:

* ``"failover"`` (the default): the lost server's batches not returned yet go to the survivors
  (`EpochPlan.lose`), the others are asked at once whether they still answer, and the lost
  endpoint is probed in the background: one that answers again rejoins at the next epoch.
* ``"raise"``: the first loss raises its error.
* ``"continue"``: the lost server's batches are dropped where they stand (`EpochPlan.drop`), and
  later epochs plan only the shares of the servers left: each epoch is smaller, nothing is
  rebuilt elsewhere (`lost` says which share went).

`Losses` applies the policy for one `HostsStream` and keeps the record (`lost`, who is down, who
is rejoining). What counts as a loss is `is_server_loss`: silence, a goodbye or a broken stream
are, a bad sample or bad settings are not (another server would fail the same way). A new reason
to declare a server lost (a host too slow) is one more caller of `Losses.handle`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .contract.errors import AuthenticationError, BadSampleError, ConfigError, LoaderError, LoaderTimeoutError
from .failover import EpochPlan, Task
from .queries import health

__all__ = ["POLICIES", "Answers", "LossPolicy", "Losses", "Prober", "answers_health", "is_server_loss"]

#: Whether the server at an endpoint answers a health check within a time (CURVE keys given).
Answers = Callable[[str, float, dict[str, Any]], bool]

_log = logging.getLogger("loader_client")
_NOT_A_LOSS = (BadSampleError, ConfigError, AuthenticationError)  # another server would fail the same way
#: The longest a survivor may take to answer the health check made right after a loss.
_SURVIVOR_CHECK_S = 2.0


def is_server_loss(exc: BaseException) -> bool:
    """True for errors that mean this server stopped serving (silence, goodbye, broken stream),
    False for errors another server would raise too (a bad sample, settings, keys)."""
    return isinstance(exc, LoaderError) and not isinstance(exc, _NOT_A_LOSS)


@dataclass(frozen=True)
class LossPolicy:
    """What losing a server does (module doc); one instance per ``on_server_loss`` value."""

    name: str
    #: Every loss raises (else only errors that are not a server loss do).
    raises_all: bool
    #: Losses hand their batches to the survivors (else they are dropped).
    hands_over: bool

    def raises(self, exc: BaseException) -> bool:
        """True when `exc` goes to the trainer as it is, instead of being handled as a loss."""
        return self.raises_all or not is_server_loss(exc)

    def take_over(self, plan: EpochPlan, server: int) -> list[Task]:
        """The unfinished tasks of `server`, handed over or dropped; `LookupError` when none is left."""
        return plan.lose(server) if self.hands_over else plan.drop(server)

    def planned_shares(self, alive: Sequence[int]) -> list[int] | None:
        """The shares an epoch plans (None: all); dropped shares stay out."""
        return None if self.hands_over else list(alive)


POLICIES = {p.name: p for p in (LossPolicy("failover", raises_all=False, hands_over=True),
                                LossPolicy("raise", raises_all=True, hands_over=True),
                                LossPolicy("continue", raises_all=False, hands_over=False))}


class Losses:
    """The losses of one several-server stream: its policy applied, and the record of who is gone."""

    def __init__(self, policy: LossPolicy, endpoints: Sequence[str], timeout_s: float, curve: dict[str, Any],
                 answers: Answers | None = None) -> None:
        self.policy, self.endpoints = policy, list(endpoints)
        self.answers = answers or answers_health
        self.lost: list[dict[str, Any]] = []
        self.down: set[int] = set()
        self.rejoining: set[int] = set()
        self.failure: BaseException | None = None  # the end: no server left (raised again on every take)
        self.prober = Prober(min(max(timeout_s / 2, 0.5), 5.0), min(timeout_s / 2, 2.0), curve, self.answers)
        self._check_s = min(timeout_s, _SURVIVOR_CHECK_S)

    def alive(self) -> list[int]:
        return [s for s in range(len(self.endpoints)) if s not in self.down]

    def handle(self, server: int, exc: BaseException, plan: EpochPlan | None, where: tuple[int, int],
               close: Callable[[int], None]) -> None:
        """`server` failed with `exc` at `where` (epoch, batch): raise it, or lose the server.

        `close(server)` closes its streams. A server that fails while rejoining is lost again
        quietly. Raises the error of the end when no server is left.
        """
        rejoining = server in self.rejoining
        if not rejoining and self.policy.raises(exc):
            raise exc
        self._lose(server, exc, plan, where, close)
        if not rejoining and self.policy.hands_over:  # servers killed together are all found now
            for other in self._silent(self.alive()):
                self._lose(other, LoaderTimeoutError(f"the loader server at {self.endpoints[other]} did not answer "
                                                     f"a health check within {self._check_s:g} s"), plan, where, close)

    def record(self, server: int, exc: BaseException, where: tuple[int, int]) -> None:
        """Note the loss of `server` (before any plan exists: its first contact failed)."""
        self.down.add(server)
        self.rejoining.discard(server)
        entry: dict[str, Any] = {"endpoint": self.endpoints[server], "error": str(exc), "epoch": where[0],
                                 "batch": where[1]}
        if not self.policy.hands_over:
            entry["share"] = 1 / len(self.endpoints)  # of every epoch from now on
        self.lost.append(entry)
        if self.policy.hands_over:
            self.prober.watch(self.endpoints[server])

    def rejoin(self) -> list[int]:
        """At an epoch boundary: the lost servers that answer again are back; returns them."""
        back: list[int] = []
        for endpoint in self.prober.ready():
            self.prober.rejoined(endpoint)
            for server in [s for s in self.down if self.endpoints[s] == endpoint]:
                self.down.discard(server)
                self.rejoining.add(server)
                back.append(server)
        return back

    def all_gone(self) -> LoaderError:
        reasons = "; ".join(f"{loss['endpoint']}: {loss['error']}" for loss in self.lost[-len(self.endpoints):])
        return LoaderError(f"every loader server is gone ({', '.join(self.endpoints)}): {reasons}. Restart them "
                           "(`loader-server health ENDPOINT` says when one answers) and resume from state_dict()")

    def close(self) -> None:
        self.prober.close()

    def _lose(self, server: int, exc: BaseException, plan: EpochPlan | None, where: tuple[int, int],
              close: Callable[[int], None]) -> None:
        self.record(server, exc, where)
        close(server)
        if plan is None:
            return
        try:
            moved = self.policy.take_over(plan, server)
        except LookupError:
            # "continue" with nobody left raises the last server's own error; "failover" names them all
            self.failure = exc if not self.policy.hands_over else self.all_gone()
            if self.failure is exc:
                raise exc from None
            raise self.failure from exc
        if self.policy.hands_over:
            _log.warning("lost loader server %s (%s); %d batch(es) of epoch %d go to %s", self.endpoints[server], exc,
                         sum(t.remaining for t in moved), where[0],
                         ", ".join(sorted({self.endpoints[t.server] for t in moved})) or "nobody (nothing was left)")
        else:
            _log.warning("lost loader server %s (%s); continuing on %d server(s): %.0f%% of each epoch is missing "
                         "from now on", self.endpoints[server], exc, len(self.alive()),
                         100 * len(self.down) / len(self.endpoints))

    def _silent(self, servers: list[int]) -> list[int]:
        """Those of `servers` that do not answer a health check now (asked in parallel, briefly)."""
        answers: dict[int, bool] = {}

        def ask(server: int) -> None:
            answers[server] = self.answers(self.endpoints[server], self._check_s, self.prober.curve)

        threads = [threading.Thread(target=ask, args=(s,), daemon=True) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self._check_s + 1.0)
        return [s for s in servers if not answers.get(s, False)]


class Prober:
    """Asks the lost endpoints for `health` in the background; `ready()` lists those that answer."""

    def __init__(self, interval_s: float, timeout_s: float, curve: dict[str, Any], answers: Answers) -> None:
        self.interval_s, self.timeout_s, self.curve, self.answers = interval_s, timeout_s, curve, answers
        self._lost: set[str] = set()
        self._ready: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, endpoint: str) -> None:
        with self._lock:
            self._lost.add(endpoint)
            self._ready.discard(endpoint)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loader-hosts-prober", daemon=True)
            self._thread.start()

    def ready(self) -> set[str]:
        with self._lock:
            return self._ready & self._lost

    def rejoined(self, endpoint: str) -> None:
        with self._lock:
            self._lost.discard(endpoint)
            self._ready.discard(endpoint)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                lost = sorted(self._lost)
            for endpoint in lost:
                ok = self.answers(endpoint, self.timeout_s, self.curve)
                with self._lock:
                    (self._ready.add if ok else self._ready.discard)(endpoint)

    def close(self) -> None:
        self._stop.set()


def answers_health(endpoint: str, timeout_s: float, curve: dict[str, Any]) -> bool:
    """True when the server at `endpoint` says it is healthy within `timeout_s` (the default `Answers`)."""
    try:
        return bool(health(endpoint, timeout_s=timeout_s, **curve).get("ok"))
    except Exception:  # any failure to answer means "not back yet"; never kill the prober
        return False
