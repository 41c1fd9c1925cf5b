"""A fleet of loader hosts and trainer ranks in one process, and the checks its run must pass.

`FleetSpec` describes the fleet; `simulate(spec)` builds the hosts (`hosts.SimHost`: real
sessions and sampling plan) and ranks (`ranks.SimRank`: the real fail-over plan and balanced
merge), schedules random host deaths and returns, runs the simulated clock until every rank has
trained its epochs, and returns a `FleetResult`: what happened, the checks, and what the
simulation itself cost (wall time, peak memory).

Each rank reads from `hosts_per_rank` hosts (its endpoint list, `merge="balanced"`), chosen so
that every host serves the same number of ranks and the ranks' host sets overlap. A quarter of
the hosts (by default) are `slowdown` times slower. Deaths never take a rank's last live host
(its client would then raise, as documented, rather than fail over). Each rank trains as fast as
its loaders deliver (plus `step_s`); `sync` makes the ranks step together, as DDP's all-reduce.

The checks (`CHECKS`): exactly once per rank per epoch and every sample once across ranks;
the dead hosts' batches handed to survivors; load following capacity (`_check_load`); and the
simulation's own wall time and peak memory within the budgets given.
"""

from __future__ import annotations

import random
import resource
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime.sessions import StreamFacts
from ..sampling import SamplingPlan
from .clock import Clock
from .hosts import Payload, SimHost, Wire
from .ranks import SimRank

__all__ = ["CHECKS", "FleetResult", "FleetSpec", "simulate"]

#: The checks of a run, and what each asserts.
CHECKS = {
    "exactly_once": "exactly once per rank per epoch, and every sample once across ranks",
    "nothing_lost": "nothing lost on a death: the dead hosts' batches went to survivors",
    "load": "load within the tolerance of each host's capacity",
    "budget": "the simulation's own time and memory within budget",
}


@dataclass(frozen=True)
class FleetSpec:
    """The simulated fleet (times in simulated seconds)."""

    hosts: int = 64
    ranks: int = 256
    hosts_per_rank: int = 4
    epochs: int = 2
    steps: int = 32  # batches of each share per epoch
    batch_size: int = 4
    workers: int = 8
    build_s: float = 1.0  # seconds per batch per worker on a normal host
    slow_fraction: float = 0.25
    slowdown: float = 2.0
    jitter: float = 0.2
    latency_s: float = 0.0005
    transfer_s: float = 0.02
    deaths: int | None = None  # default: one host in eight
    timeout_s: float = 10.0
    client_prefetch: int = 4
    server_prefetch: int | None = None  # default: the server's, max(8, 2 x workers)
    step_s: float = 0.0  # the trainer's compute per batch (0: the loaders are the bottleneck)
    sync: bool = False  # data-parallel: every rank takes batch b before any takes b + 1
    seed: int = 0
    tolerance: float = 0.10  # load within this fraction of each host's capacity
    max_seconds: float | None = None  # budgets of the simulation itself (wall time, peak memory)
    max_memory_mb: float | None = None

    def validate(self) -> None:
        if self.hosts < 1 or self.ranks < 1 or self.epochs < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("hosts, ranks, epochs, steps and batch size must be at least 1")
        if not 1 <= self.hosts_per_rank <= self.hosts:
            raise ValueError(f"hosts per rank must be between 1 and the {self.hosts} hosts, got {self.hosts_per_rank}")


@dataclass
class FleetResult:
    spec: FleetSpec
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    events: int = 0
    sim_s: float = 0.0  # simulated time until the last rank finished
    window_s: float = 0.0  # simulated time until the first rank finished
    batches: int = 0
    deaths: int = 0
    losses: int = 0  # host losses the ranks' clients detected
    moved: int = 0  # batches handed to survivors after a loss
    lost_in_flight: int = 0  # batches in transit from a host when it died
    lost_on_hosts: int = 0  # batches queued, being built or waiting for credit on a host when it died
    steals: int = 0
    wasted: int = 0  # built and never delivered (a closed stream's, a stolen tail's prefetch, an ended session's)
    #: per host: batches delivered / its capacity's share of its ranks' batches (`_check_load`)
    load: list[float] = field(default_factory=list)
    efficiency: float = 0.0  # batches delivered / what the fleet's capacity could build until the last rank finished
    rejoin_wait_s: float = 0.0  # host time alive after a return before any rank rejoined it
    returned: set[int] = field(default_factory=set)  # hosts that died (and came back)
    #: what failed, per check (CHECKS); an empty list: the check holds
    checks: dict[str, list[str]] = field(default_factory=lambda: {name: [] for name in CHECKS})

    @property
    def failures(self) -> list[str]:
        return [f for found in self.checks.values() for f in found]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        steady = [v for h, v in enumerate(self.load) if h not in self.returned] or [0.0]
        return {"hosts": self.spec.hosts, "ranks": self.spec.ranks, "wall_s": round(self.wall_s, 2),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "events": self.events, "batches": self.batches,
                "sim_s": round(self.sim_s, 1), "deaths": self.deaths, "losses": self.losses, "moved": self.moved,
                "lost_in_flight": self.lost_in_flight, "lost_on_hosts": self.lost_on_hosts, "steals": self.steals,
                "wasted": self.wasted, "load_min": round(min(steady), 3), "load_max": round(max(steady), 3),
                "returned_load_min": round(min((self.load[h] for h in self.returned), default=1.0), 3),
                "efficiency": round(self.efficiency, 3), "rejoin_wait_s": round(self.rejoin_wait_s, 1),
                "window_s": round(self.window_s, 1),
                "ok": self.ok, "failures": self.failures}


class Fleet:
    """The hosts, the ranks, the clock and the records of one run."""

    def __init__(self, spec: FleetSpec) -> None:
        spec.validate()
        self.spec, self.world_size, self.steps = spec, spec.ranks, spec.steps
        self.clock = Clock()
        self.rng = random.Random(spec.seed)
        shares = spec.ranks * spec.hosts_per_rank
        samples = shares * spec.steps * spec.batch_size + shares - 1  # a remainder that drop-last leaves out
        self.plan = SamplingPlan(samples, spec.batch_size)
        self.samples = samples
        prefetch = spec.server_prefetch or max(8, 2 * spec.workers)
        facts = StreamFacts(batch_size=spec.batch_size, num_samples=samples, default_seed=spec.seed,
                            fingerprint="simulated", prefetch=prefetch, in_order=True, augment_available=False)
        self.wire = Wire(spec.latency_s, spec.transfer_s)
        slow = set(self.rng.sample(range(spec.hosts), round(spec.hosts * spec.slow_fraction)))
        self.hosts = [SimHost(h, workers=spec.workers, build_s=spec.build_s * (spec.slowdown if h in slow else 1.0),
                              jitter=spec.jitter, clock=self.clock, plan=self.plan, facts=facts, wire=self.wire,
                              rng=random.Random(self.rng.random())) for h in range(spec.hosts)]
        for host in self.hosts:
            host.on_death = self._host_died
        self.ranks = [SimRank(self, r, [self.hosts[h] for h in hosts])
                      for r, hosts in enumerate(_assign(spec.ranks, spec.hosts, spec.hosts_per_rank, self.rng))]
        self.users: dict[int, list[SimRank]] = defaultdict(list)
        for rank in self.ranks:
            for host in rank.hosts:
                self.users[host.index].append(rank)
        self.got = [np.zeros((spec.epochs, rank.servers, spec.steps), np.uint8) for rank in self.ranks]
        self.indices: list[list[np.ndarray]] = [[] for _ in range(spec.epochs)]
        self.by_host: list[dict[int, int]] = [defaultdict(int) for _ in self.ranks]  # per rank: batches per host
        self.done = 0
        self.step = self.arrived = 0  # the all-reduce: global step, ranks that took its batch
        self.first_done: float | None = None
        self.steals = self.losses = self.moved = self.lost_in_flight = self.discarded = self.deaths = 0

    # ------------------------------------------------------------------ events the parts report
    def record(self, rank: SimRank, share: int, batch: int, payload: Payload) -> None:
        self.got[rank.rank][rank.epoch, share, batch] += 1
        self.indices[rank.epoch].append(payload.indices)
        self.by_host[rank.rank][payload.host] += 1

    def took(self) -> None:
        """A rank took its batch of the current step; when all have, every rank goes on."""
        self.arrived += 1
        if self.arrived == len(self.ranks):
            self.step, self.arrived = self.step + 1, 0
            for rank in self.ranks:
                self.clock.after(self.spec.step_s, rank.want)

    def rank_done(self, rank: SimRank) -> None:
        self.done += 1
        if self.first_done is None:
            self.first_done = self.clock.now

    def _host_died(self, host: SimHost, streams: list[Any]) -> None:
        for stream in streams:  # each client notices the silence after its timeout
            self.clock.after(self.spec.timeout_s, stream.rank.stream_failed, stream)

    # ------------------------------------------------------------------ the scenario
    def schedule_deaths(self) -> None:
        """Deaths at random times in the first 60% of the expected run, each back after 5-25% of it."""
        work = sum(r.servers for r in self.ranks) * self.steps * self.spec.epochs
        expected = work / sum(h.capacity for h in self.hosts)
        count = self.spec.hosts // 8 if self.spec.deaths is None else self.spec.deaths
        for _ in range(count):
            when, downtime = self.rng.uniform(0.05, 0.6) * expected, self.rng.uniform(0.05, 0.25) * expected
            self.clock.at(when, self._kill_one, downtime)

    def _kill_one(self, downtime: float) -> None:
        candidates = [h for h in self.hosts if h.alive and all(
            sum(other.alive for other in rank.hosts if other is not h) >= 1 for rank in self.users[h.index])]
        if not candidates or self.done == len(self.ranks):
            return
        host = self.rng.choice(candidates)
        self.deaths += 1
        host.die()
        self.clock.after(downtime, host.revive)


def _assign(ranks: int, hosts: int, per_rank: int, rng: random.Random) -> list[list[int]]:
    """Each rank's hosts: distinct, every host used by as many ranks as possible, sets overlapping."""
    out: list[list[int]] = []
    pool: list[int] = []
    for _ in range(ranks):
        mine: list[int] = []
        while len(mine) < per_rank:
            if not pool:
                pool = rng.sample(range(hosts), hosts)
            pick = next((h for h in pool if h not in mine), None)
            if pick is None:  # what is left of the pool is already this rank's: take from a fresh round
                pick = next(h for h in rng.sample(range(hosts), hosts) if h not in mine)
            else:
                pool.remove(pick)
            mine.append(pick)
        out.append(mine)
    return out


def simulate(spec: FleetSpec) -> FleetResult:
    """Run the fleet (module doc) and check it; the result says what failed, if anything."""
    started = time.perf_counter()
    fleet = Fleet(spec)
    fleet.schedule_deaths()
    for rank in fleet.ranks:
        rank.start()
    budget = 200 * spec.ranks * spec.hosts_per_rank * spec.steps * spec.epochs + 10_000
    fleet.clock.run(lambda: fleet.done == len(fleet.ranks), budget)
    result = FleetResult(spec, wall_s=time.perf_counter() - started, events=fleet.clock.events)
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _check(fleet, result)
    return result


def _check(fleet: Fleet, result: FleetResult) -> None:
    spec, checks = fleet.spec, result.checks
    fail = checks["exactly_once"].append
    unfinished = [r.rank for r in fleet.ranks if r.done_at is None]
    if unfinished:
        fail(f"ranks {unfinished[:10]} never finished their {spec.epochs} epochs (the fleet stalled)")
    for rank, got in zip(fleet.ranks, fleet.got, strict=True):  # exactly once per rank per epoch
        if (got != 1).any():
            epoch, share, batch = (int(v) for v in np.argwhere(got != 1)[0])
            fail(f"rank {rank.rank} epoch {epoch}: share {share} batch {batch} arrived "
                 f"{got[epoch, share, batch]} times")
            break
    per_epoch = spec.ranks * spec.hosts_per_rank * spec.steps * spec.batch_size
    for epoch, arrays in enumerate(fleet.indices):  # and every sample once across ranks
        indices = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        if len(indices) != per_epoch or len(np.unique(indices)) != per_epoch:
            fail(f"epoch {epoch}: {len(indices)} samples delivered, {len(np.unique(indices))} distinct, "
                 f"expected {per_epoch} distinct")
    result.sim_s = fleet.clock.now
    result.window_s = fleet.first_done or fleet.clock.now
    result.batches = sum(r.delivered for r in fleet.ranks)
    result.deaths, result.losses, result.moved, result.steals = fleet.deaths, fleet.losses, fleet.moved, fleet.steals
    result.lost_in_flight = fleet.lost_in_flight
    result.lost_on_hosts = sum(h.lost for h in fleet.hosts)
    result.wasted = sum(h.dropped for h in fleet.hosts) + fleet.discarded
    if result.deaths and not result.moved:
        checks["nothing_lost"].append(f"{result.deaths} hosts died but no batch was handed to a survivor: the "
                                      "deaths tested nothing")
    _check_load(fleet, result)
    if spec.max_seconds is not None and result.wall_s > spec.max_seconds:
        checks["budget"].append(f"the simulation took {result.wall_s:.1f} s, over its budget of {spec.max_seconds:g} s")
    if spec.max_memory_mb is not None and result.peak_rss_mb > spec.max_memory_mb:
        checks["budget"].append(f"the simulation's process peaked at {result.peak_rss_mb:.0f} MB, over its budget of "
             f"{spec.max_memory_mb:g} MB")


def _check_load(fleet: Fleet, result: FleetResult) -> None:
    """Load follows capacity: each rank's batches split among its hosts as their capacities while
    that rank ran (a host that was down counts for the time it was up and in use), summed per host.

    A host's ratio is the batches it delivered over what that split gives it. Hosts that died are
    reported apart (`returned`): each rank takes a returned host back at its own next epoch
    boundary, so its load lags its capacity for up to an epoch by design.
    """
    spec = fleet.spec
    delivered, expected = np.zeros(spec.hosts), np.zeros(spec.hosts)
    for rank, counts in zip(fleet.ranks, fleet.by_host, strict=True):
        done = rank.done_at if rank.done_at is not None else fleet.clock.now
        usable = np.array([host.capacity * host.up_time(done) for host in rank.hosts])
        total = sum(counts.values())
        for host, share in zip(rank.hosts, usable / max(usable.sum(), 1e-9), strict=True):
            expected[host.index] += total * share
        for host_index, n in counts.items():
            delivered[host_index] += n
    result.load = [float(v) for v in delivered / np.maximum(expected, 1e-9)]
    capacity = sum(host.capacity * host.up_time(result.sim_s) for host in fleet.hosts)
    result.efficiency = result.batches / max(capacity, 1e-9)
    result.rejoin_wait_s = sum(host.rejoin_wait(result.sim_s) for host in fleet.hosts)
    result.returned = {host.index for host in fleet.hosts if len(host.up_periods) > 1}
    outside = [(h, round(v, 3)) for h, v in enumerate(result.load)
               if h not in result.returned and abs(v - 1) > spec.tolerance]
    if outside:
        result.checks["load"].append(
            f"{len(outside)} hosts delivered a share of their ranks' batches not within {spec.tolerance:.0%} of "
            f"their share of those ranks' capacity (host, delivered/expected): {outside[:8]}")
