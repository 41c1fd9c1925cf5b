"""The ``share`` and ``autoscale`` probes: one decode for several trainers, and workers that follow the stall.

**share**: simulated trainers (`loader_bench.trainers`, one process each) on one server, in four
runs alternated round after round (the machine is shared and noisy; medians are reported):

* ``lone``: one trainer;
* ``independent``: four trainers, each its own stream;
* ``shared``: four trainers in one share (``share="bench"``);
* ``shared_pause``: the same, one of them pausing `_PAUSE_S` seconds in the middle.

Every trainer takes a step of the same length after each batch, paced at `_PACE` of the rate one
trainer gets from this server when it never waits (measured first), so that the server keeps up
with one stream and with one share, not with four streams. Reported: the CPU seconds of the
server's workers per image delivered to trainers (from /proc, over the timed window), each
trainer's images/s against the lone trainer's, and the other members' images/s while one pauses
and catches up, against the same window of the run without a pause.

**autoscale**: one trainer on a ``--workers auto`` server whose reads wait
``--simulate-read-latency-ms`` (inline, so that each worker is latency-bound and more workers
help even on 2 cores). Its step is `_AUTO_STEPS`: one length, then 3x faster (the loader must
follow), then slower again (workers should be released). Reported: how long after the speed-up
the trainer's stall (its own, over 2 s) is back under the target for good, the worker counts,
the changes the server logged, and a plot of workers and stall over time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loader_client import server_stats

from .context import Bench
from .systems import CLIENT_TIMEOUT_S, cpu_s, served

__all__ = ["autoscale_probe", "autoscale_rows", "share_probe", "share_tables"]

Results = dict[str, Any]

_TRAINERS = 4
#: Each trainer's pace: this share of the images/s one never-waiting trainer gets.
_PACE = 0.25
_RUN_S = 26.0
_WARMUP_S = 3.0
_PAUSE_AT_S, _PAUSE_S = 5.0, 10.0
_ROUNDS = 3
_RUNS = ("lone", "independent", "shared", "shared_pause")


def _say(line: str) -> None:
    print(line, flush=True)


def _workers_cpu_s(server_pid: int) -> float:
    from loader_server.launch import children_of

    return sum(cpu_s(p) for p in children_of(server_pid))


def _load() -> float:
    return os.getloadavg()[0]


def _trainers(endpoint: str, scratch: Path, n: int, *, share: str | None, seconds: float, steps: str,
              pause: tuple[float, float] | None = None, pause_one: bool = False) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i in range(n):
        args = [sys.executable, "-m", "loader_bench.trainers", endpoint, str(scratch / f"trainer-{i}.json"),
                "--seconds", str(seconds), "--steps", steps, "--timeout-s", str(CLIENT_TIMEOUT_S),
                "--name", f"trainer-{i}"]
        if share:
            args += ["--share", share]
        if pause is not None and (i == 0 or not pause_one):
            args += ["--pause-at-s", str(pause[0]), "--pause-s", str(pause[1])]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
    return procs


def _collect(procs: list[subprocess.Popen[bytes]], scratch: Path, timeout_s: float) -> list[dict[str, Any]]:
    out = []
    for i, proc in enumerate(procs):
        code = proc.wait(timeout_s)
        if code != 0:
            raise RuntimeError(f"simulated trainer {i} exited with code {code}")
        out.append(json.loads((scratch / f"trainer-{i}.json").read_text()))
    return out


def _rate(trainer: dict[str, Any], t0: float, t1: float) -> float:
    """Images/s a trainer received between monotonic times t0 and t1."""
    images: int = trainer["images"]
    return sum(1 for t in trainer["times"] if t0 <= t < t1) * images / (t1 - t0)


def _one_run(b: Bench, kind: str, step_ms: float) -> Results:
    """One run of `kind` (module doc): per trainer images/s, worker CPU per delivered image, the load."""
    n = 1 if kind == "lone" else _TRAINERS
    share = "bench" if kind.startswith("shared") else None
    pause = (_PAUSE_AT_S, _PAUSE_S) if kind == "shared_pause" else None
    scratch = Path(b.scratch) / f"share-{kind}"
    scratch.mkdir(exist_ok=True)
    with served(b, b.data, [*b.serve_extra], ready=True) as server:
        procs = _trainers(server.endpoint, scratch, n, share=share, seconds=_RUN_S, steps=f"{step_ms:.3f}@0",
                          pause=pause, pause_one=True)
        started = time.monotonic()
        time.sleep(_WARMUP_S)
        cpu0, t0, load0 = _workers_cpu_s(server.pid), time.monotonic(), _load()
        time.sleep(max(1.0, _RUN_S - _WARMUP_S - 1.0))
        cpu1, t1 = _workers_cpu_s(server.pid), time.monotonic()
        trainers = _collect(procs, scratch, _RUN_S + 120)
        shares = server_stats(server.endpoint, timeout_s=10).get("shares", [])
    rates = [_rate(t, t0, t1) for t in trainers]
    delivered = sum(r * (t1 - t0) for r in rates)
    out: Results = {"kind": kind, "trainers": n, "images_per_s": rates, "worker_cpu_s": cpu1 - cpu0,
                    "worker_cpu_ms_per_image": 1000 * (cpu1 - cpu0) / max(1.0, delivered),
                    "load": (load0 + _load()) / 2, "window_s": t1 - t0,
                    "shared_memory": all(t["shared_memory"] for t in trainers), "share_stats": shares}
    if kind.startswith("shared"):
        # The others, from the pause to the end: the window a pause and its catch-up can slow them in.
        p0 = started + _PAUSE_AT_S
        out["others_images_per_s"] = statistics.mean(_rate(t, p0, t1) for t in trainers[1:])
        out["paused_images_per_s"] = _rate(trainers[0], p0, t1)
    return out


def _capacity(b: Bench) -> float:
    """Images/s one never-waiting trainer gets from the server (a short run)."""
    scratch = Path(b.scratch) / "share-capacity"
    scratch.mkdir(exist_ok=True)
    with served(b, b.data, [*b.serve_extra], ready=True) as server:
        (trainer,) = _collect(_trainers(server.endpoint, scratch, 1, share=None, seconds=8.0, steps="0@0"), scratch,
                              120)
    times = trainer["times"]
    t0 = times[0] + 2.0
    return _rate(trainer, t0, times[-1])


def share_probe(b: Bench) -> Results:
    capacity = _capacity(b)
    step_ms = 1000 * b.batch_size / (_PACE * capacity)
    _say(f"share: one never-waiting trainer gets {capacity:.0f} images/s; every trainer steps {step_ms:.1f} ms "
         f"({_PACE:g} of that)")
    rounds = 1 if b.quick else _ROUNDS
    runs: dict[str, list[Results]] = {k: [] for k in _RUNS}
    for r in range(rounds):
        for kind in _RUNS:  # alternated: a slow minute of the machine hits every kind
            res = _one_run(b, kind, step_ms)
            runs[kind].append(res)
            _say(f"share round {r + 1}/{rounds} {kind}: images/s per trainer "
                 f"{', '.join(f'{v:.0f}' for v in res['images_per_s'])}; worker CPU "
                 f"{res['worker_cpu_ms_per_image']:.3f} ms per delivered image; load {res['load']:.1f}")
    med = statistics.median
    lone = med(r["images_per_s"][0] for r in runs["lone"])
    cpu = {k: med(r["worker_cpu_ms_per_image"] for r in v) for k, v in runs.items()}
    member_min = {k: med(min(r["images_per_s"]) / lone for r in runs[k]) for k in ("independent", "shared")}
    slowdown = med(1 - p["others_images_per_s"] / s["others_images_per_s"]
                   for p, s in zip(runs["shared_pause"], runs["shared"], strict=True))
    out: Results = {
        "capacity_images_per_s": capacity, "step_ms": step_ms, "pace": _PACE, "trainers": _TRAINERS,
        "rounds": rounds, "runs": runs, "lone_images_per_s": lone, "worker_cpu_ms_per_image": cpu,
        "cpu_ratio_shared_to_independent": cpu["shared"] / cpu["independent"],
        "slowest_member_to_lone": member_min, "pause_s": _PAUSE_S,
        "others_slowdown_by_pause": slowdown,
        "others_slowdown_all": [1 - p["others_images_per_s"] / s["others_images_per_s"]
                                for p, s in zip(runs["shared_pause"], runs["shared"], strict=True)],
        "load": med(r["load"] for v in runs.values() for r in v),
        "load_all": [round(r["load"], 2) for v in runs.values() for r in v],
    }
    _say(f"share (medians of {rounds}): worker CPU per delivered image {cpu['shared']:.3f} ms shared against "
         f"{cpu['independent']:.3f} ms independent = {out['cpu_ratio_shared_to_independent']:.2f}x; slowest member "
         f"{member_min['shared']:.2f}x a lone trainer ({member_min['independent']:.2f}x as independent streams); "
         f"a member paused {_PAUSE_S:g} s slows the others by {100 * slowdown:.1f}%; load average {out['load']:.1f}")
    return {"share": out}


def share_tables(results: Results) -> list[str]:
    if "share" not in results:
        return []
    r = results["share"]
    cpu, member = r["worker_cpu_ms_per_image"], r["slowest_member_to_lone"]
    return ["", f"{r['trainers']} simulated trainers, each stepping {r['step_ms']:.1f} ms per batch ({r['pace']:g} "
            f"of the {r['capacity_images_per_s']:.0f} images/s one never-waiting trainer gets); medians of "
            f"{r['rounds']} alternated rounds, load average {r['load']:.1f} (each run: "
            f"{', '.join(map(str, r['load_all']))}):", "",
            "| run | worker CPU ms per delivered image | slowest trainer against a lone trainer |", "|---|---|---|",
            f"| lone trainer | {cpu['lone']:.3f} | 1.00 ({r['lone_images_per_s']:.0f} images/s) |",
            f"| {r['trainers']} independent streams | {cpu['independent']:.3f} | {member['independent']:.2f} |",
            f"| {r['trainers']} trainers in one share | {cpu['shared']:.3f} "
            f"(= {r['cpu_ratio_shared_to_independent']:.2f}x independent) | {member['shared']:.2f} |",
            f"| the share, one member paused {r['pause_s']:g} s | {cpu['shared_pause']:.3f} | the others "
            f"{100 * r['others_slowdown_by_pause']:.1f}% slower than without the pause (each round: "
            f"{', '.join(f'{100 * v:.1f}%' for v in r['others_slowdown_all'])}) |"]


# ---------------------------------------------------------------------------- autoscale
#: (from second, step ms) of the autoscale probe's trainer: slow, 3x faster, slow again.
_AUTO_PHASES = ((0.0, 1.0), (25.0, 3.0), (50.0, 1.0))
_AUTO_RUN_S = 80.0
_AUTO_LATENCY_MS = 20.0
_AUTO_MAX_WORKERS = 10
_AUTO_TARGET = 0.02
_AUTO_INTERVAL_S = 3.0
_STALL_WINDOW_S = 2.0


def _stall_series(trainer: dict[str, Any], start: float, end: float, window_s: float,
                  every_s: float = 0.5) -> list[tuple[float, float]]:
    """(seconds since `start`, the trainer's stall over the `window_s` before) every `every_s`."""
    times, waits = trainer["times"], trainer["waits"]
    out = []
    t = start + window_s
    while t <= end:
        waited = sum(w for ti, w in zip(times, waits, strict=True) if t - window_s <= ti < t)
        out.append((t - start, waited / window_s))
        t += every_s
    return out


def autoscale_probe(b: Bench) -> Results:
    """One trainer whose step gets 3x faster, then slower, on a --workers auto server (module doc)."""
    latency = b.read_latency_ms if b.read_latency_ms else _AUTO_LATENCY_MS
    # The step that keeps about two latency-bound workers busy, then a third of it.
    per_worker = 1000 / (b.batch_size * latency)  # batches/s of one worker that waits on every read
    base_ms = 1000 / (1.6 * per_worker)
    extra = [*b.serve_extra, "--workers", "auto", "--workers-min", "1", "--workers-max", str(_AUTO_MAX_WORKERS),
             "--simulate-read-latency-ms", str(latency), "--read-threads", "0", "--target-stall", str(_AUTO_TARGET),
             "--scale-interval-s", str(_AUTO_INTERVAL_S), "--log-level", "INFO"]
    run_s = 30.0 if b.quick else _AUTO_RUN_S
    phases = [(at * run_s / _AUTO_RUN_S, speed) for at, speed in _AUTO_PHASES]
    steps = ",".join(f"{base_ms / speed:.2f}@{at:g}" for at, speed in phases)
    scratch = Path(b.scratch) / "autoscale"
    scratch.mkdir(exist_ok=True)
    samples: list[tuple[float, int, float | None]] = []  # (monotonic time, workers, the server's view of the stall)
    stop = threading.Event()
    with served(b, b.data, extra, workers=1, ready=True) as server:
        def poll() -> None:
            while not stop.wait(0.5):
                try:
                    s = server_stats(server.endpoint, timeout_s=5)
                except Exception:  # the server stops at the end: the last poll may miss it
                    continue
                stall = max((c["stall"] for c in s["clients"] if c.get("stall") is not None), default=None)
                samples.append((time.monotonic(), s["workers_target"], stall))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        load0 = _load()
        (proc,) = _trainers(server.endpoint, scratch, 1, share=None, seconds=run_s, steps=steps)
        (trainer,) = _collect([proc], scratch, run_s + 120)
        stop.set()
        poller.join(10)
        final = server_stats(server.endpoint, timeout_s=10)
        log_lines = [line for line in server.log_text().splitlines() if "workers " in line and " -> " in line]
    start = trainer["times"][0]
    end = trainer["times"][-1]
    series = _stall_series(trainer, start, end, _STALL_WINDOW_S)
    fast_at, slow_at = phases[1][0], phases[2][0]
    # Back under the target for good: the end of the last 2-s window after the speed-up whose stall is
    # over the target (0: never over it).
    after = [(t, s) for t, s in series if fast_at < t <= slow_at]
    over = [t for t, s in after if s > _AUTO_TARGET]
    back = fast_at + 0.0 if not over else (max(over) + 0.5 if max(over) < slow_at else None)
    workers = [(t - start, n) for t, n, _ in samples]

    def count(lo: float, hi: float, pick: Callable[[list[int]], int]) -> int | None:
        values = [n for t, n in workers if lo <= t < hi]
        return pick(values) if values else None

    out: Results = {
        "read_latency_ms": latency, "base_step_ms": base_ms, "phases": phases, "target": _AUTO_TARGET,
        "interval_s": _AUTO_INTERVAL_S, "max_workers": _AUTO_MAX_WORKERS,
        "back_under_target_s": None if back is None else back - fast_at,
        "peak_stall_after_speedup": max((s for _, s in after), default=0.0),
        "workers_slow": count(fast_at - 5, fast_at, max), "workers_fast_peak": count(fast_at, slow_at, max),
        "workers_end": count(end - start - 3, end - start + 1, min), "changes": final["worker_changes"],
        "log": log_lines, "stall_series": series, "workers_series": workers, "load": (load0 + _load()) / 2,
        "server_stall_series": [(t - start, s) for t, _, s in samples],
        "stall_fast_phase_after_back": statistics.mean([s for t, s in after if back is not None and t >= back] or [0]),
    }
    out["plot"] = _autoscale_plot(out, Path(b.out) / "autoscale.png")
    _say(f"autoscale: step {base_ms:.0f} ms -> {base_ms / 3:.0f} ms at {fast_at:g} s -> {base_ms:.0f} ms at "
         f"{slow_at:g} s; workers {out['workers_slow']} -> {out['workers_fast_peak']} -> {out['workers_end']}; stall "
         f"at most {100 * out['peak_stall_after_speedup']:.1f}% (2 s windows) after the speed-up, back under "
         f"{100 * _AUTO_TARGET:g}% {out['back_under_target_s']} s after it; "
         f"{len(out['changes'])} changes; load {out['load']:.1f}")
    return {"autoscale": out}


def _autoscale_plot(r: Results, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    ts, ns = zip(*r["workers_series"], strict=True) if r["workers_series"] else ((), ())
    ax.step(ts, ns, where="post", color="#2a7", label="workers")
    ax.set_xlabel("seconds")
    ax.set_ylabel("workers", color="#2a7")
    ax.set_ylim(0, r["max_workers"] + 1)
    ax2 = ax.twinx()
    st, sv = zip(*r["stall_series"], strict=True) if r["stall_series"] else ((), ())
    ax2.plot(st, [100 * v for v in sv], color="#c66", label="trainer's stall (2 s window)")
    ax2.axhline(100 * r["target"], ls="--", color="#c66", lw=1)
    ax2.set_ylabel("stall, % of step time", color="#c66")
    ax2.set_ylim(0, 100)
    for at, speed in r["phases"]:
        ax.axvline(at, color="k", lw=0.8, ls=":")
        ax.text(at, r["max_workers"] + 0.3, f" step {r['base_step_ms'] / speed:.0f} ms", fontsize=8)
    ax.set_title(f"--workers auto: one trainer, reads +{r['read_latency_ms']:g} ms, target stall "
                 f"{100 * r['target']:g}%, interval {r['interval_s']:g} s")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def autoscale_rows(results: Results) -> list[tuple[str, str]]:
    if "autoscale" not in results:
        return []
    r = results["autoscale"]
    back = r["back_under_target_s"]
    return [(f"--workers auto, one trainer, reads +{r['read_latency_ms']:g} ms inline, step "
             f"{r['base_step_ms']:.0f} ms, 3x faster at {r['phases'][1][0]:g} s, slower again at "
             f"{r['phases'][2][0]:g} s",
             f"workers {r['workers_slow']} -> {r['workers_fast_peak']} -> {r['workers_end']}; after the speed-up the "
             f"stall (2 s windows) peaks at {100 * r['peak_stall_after_speedup']:.1f}% and is back under "
             f"{100 * r['target']:g}% {'never' if back is None else f'{back:.1f} s'} after it; "
             f"{len(r['changes'])} changes; load {r['load']:.1f}")]
