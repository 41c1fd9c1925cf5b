"""``loader-server simulate``: run the fleet simulation, print what happened and the checks; exit 0
only when every check holds."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .fleet import CHECKS, FleetResult, FleetSpec, simulate

__all__ = ["add_simulate_arguments", "run_simulate", "table_header", "table_row"]

_FLAGS = {  # FleetSpec field -> help
    "hosts": "loader hosts",
    "ranks": "trainer ranks",
    "hosts_per_rank": "loader hosts in each rank's endpoint list (the ranks' sets overlap; each host serves as "
                      "many ranks as the others)",
    "epochs": "epochs every rank trains",
    "steps": "batches of each share per epoch (a rank's epoch: hosts-per-rank x steps batches)",
    "workers": "worker processes per host",
    "build_s": "simulated seconds a worker takes per batch on a normal host",
    "slow_fraction": "fraction of the hosts that are slow",
    "slowdown": "how many times slower a slow host builds",
    "deaths": "hosts killed at random times, each back after a while (default: one host in eight)",
    "timeout_s": "the clients' timeout_s: a silent host is lost after this long",
    "client_prefetch": "the clients' prefetch (batches in transit per stream)",
    "server_prefetch": "the servers' --prefetch per session (default: the server's, max(8, 2 x workers))",
    "step_s": "simulated seconds a trainer computes per batch (0: the loaders are the bottleneck)",
    "seed": "seed of the scenario and of the sampling plan",
    "max_seconds": "fail if the simulation itself takes longer than this (wall time)",
    "max_memory_mb": "fail if the simulation's process peaks above this (resident memory)",
}


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    defaults = FleetSpec()
    for name, text in _FLAGS.items():
        default = getattr(defaults, name)
        if name == "max_seconds":
            default = 60.0
        elif name == "max_memory_mb":
            default = 2048.0
        kind = type(default) if default is not None else (float if name.endswith("_s") else int)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)
    p.add_argument("--sync", action="store_true",
                   help="lockstep data-parallel ranks (every rank takes batch b before any takes b + 1); default: "
                        "each rank trains at the pace its own loaders deliver")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def table_header() -> str:
    return ("| hosts x ranks | batches | simulation wall s | peak RSS MB | events | sim s to first / last rank done "
            "| deaths | batches re-asked | steals | load / capacity (min-max) | returned hosts (min) | delivered / "
            "capacity | wasted |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: FleetResult) -> str:
    s = r.summary()
    return (f"| {s['hosts']} x {s['ranks']} | {s['batches']:,} | {s['wall_s']:.1f} | {s['peak_rss_mb']:.0f} "
            f"| {s['events']:,} | {s['window_s']:.0f} / {s['sim_s']:.0f} | {s['deaths']} | {s['moved']:,} "
            f"| {s['steals']:,} | {s['load_min']:.2f}-{s['load_max']:.2f} | {s['returned_load_min']:.2f} "
            f"| {s['efficiency']:.2f} | {s['wasted']:,} |")


def run_simulate(args: argparse.Namespace) -> int:
    spec = FleetSpec(**{name: getattr(args, name) for name in _FLAGS}, sync=args.sync)
    try:
        spec.validate()
    except ValueError as exc:
        print(f"loader-server simulate: error: {exc}")
        return 2
    result = simulate(spec)
    if args.json:
        print(json.dumps({"spec": dataclasses.asdict(spec), **result.summary()}))
        return 0 if result.ok else 1
    slow = round(spec.hosts * spec.slow_fraction)
    print(f"{spec.hosts} loader hosts ({slow} of them {spec.slowdown:g}x slower), {spec.ranks} ranks reading "
          f"{spec.hosts_per_rank} hosts each, {spec.epochs} epochs of {spec.hosts_per_rank * spec.steps} batches "
          f"per rank, {result.deaths} host deaths and returns, "
          f"{'lockstep ranks' if spec.sync else 'each rank at its own pace'}")
    print(table_header())
    print(table_row(result))
    for name, text in CHECKS.items():
        print(f"  {'FAIL' if result.checks[name] else 'OK  '} {text}")
    for failure in result.failures:
        print(f"  - {failure}")
    print("simulate: OK" if result.ok else "simulate: FAILED")
    return 0 if result.ok else 1
