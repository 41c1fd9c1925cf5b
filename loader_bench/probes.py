"""The one-off measurements of ``--extras``, each a `Probe` in `PROBES`.

A probe runs once after the side-by-side rounds, prints one line, returns the entries it adds
to results.json, and says which rows (`rows`) or tables (`tables`) it adds to results.md. A new
measurement is a new entry in `PROBES`; the order of `PROBES` is the order of the run and of
the report.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loader_client import LoaderClient, server_stats

from .context import Bench
from .floods import flood_tables, floods
from .kinds import index_probe, index_tables, kinds_probe, kinds_tables
from .remote_probe import s3_probe, s3_tables
from .sharing import autoscale_probe, autoscale_rows, share_probe, share_tables
from .systems import CLIENT_TIMEOUT_S, STEP_MODELS, PssSampler, curve_keys, measure_service, served, simulate_step
from .train import train_probe, train_tables

__all__ = ["PROBES", "Probe"]

Results = dict[str, Any]

#: Batches consumed before the stall is measured: the pipeline fills up first.
_STALL_WARMUP_BATCHES = 16
#: Batches per server consumed before a multi-server run is timed (more than the server prefetch).
_MULTI_WARMUP_BATCHES = 10
#: Batches consumed before float32 is timed: every shared-memory slot has been used once.
_FLOAT32_WARMUP_BATCHES = 32


def _no_rows(_: Results) -> list[tuple[str, str]]:
    return []


def _no_tables(_: Results) -> list[str]:
    return []


@dataclass(frozen=True)
class Probe:
    """One measurement of ``--extras``."""

    run: Callable[[Bench], Results]  # measures, prints a line, returns its results.json entries
    rows: Callable[[Results], list[tuple[str, str]]] = _no_rows  # (measurement, result) rows of results.md
    tables: Callable[[Results], list[str]] = _no_tables  # markdown lines of tables of its own
    needs_capacity: bool = False  # compares against the service's rate: skipped without --systems service
    default: bool = True  # part of the default --extras


def _say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------- strict
def _strict(b: Bench) -> Results:
    res = measure_service(b, extra=[*b.serve_extra, "--no-reduced-decode"])
    _say(f"service, reduced decoding off: {res['images_per_s']:.0f} images/s")
    return {"service_no_reduced_decode": res}


def _strict_rows(results: Results) -> list[tuple[str, str]]:
    if "service_no_reduced_decode" not in results:
        return []
    r = results["service_no_reduced_decode"]
    percore = results["summary"].get("percore", {}).get("median")
    workers = results["settings"]["workers"]
    return [("service, --no-reduced-decode", f"{r['images_per_s']:.0f} images/s"
             + (f" ({r['images_per_s'] / (workers * percore):.2f} of {workers} x per-core)" if percore else ""))]


# ---------------------------------------------------------------------------- stall
#: Paced runs of each step model, alternated (the median is reported, with the spread).
_STALL_REPEATS = 3
#: Seconds each paced run lasts at least: at 40,000 images/s the default 8192 images are 0.25 s,
#: in which one 5 ms scheduling hiccup of a shared machine is 2% of wall time.
_STALL_MIN_WALL_S = 3.0


def _median_run(runs: list[Results]) -> Results:
    """The run of median stall, with every run's stall, p50 and p99 (spread)."""
    ordered = sorted(runs, key=lambda r: r["stall_pct"])
    return {**ordered[(len(ordered) - 1) // 2], "runs": len(runs),
            "stall_pct_all": [r["stall_pct"] for r in runs], "next_p50_ms_all": [r["next_p50_ms"] for r in runs],
            "next_p99_ms_all": [r["next_p99_ms"] for r in runs], "load_all": [r["load"] for r in runs]}


def _stall(b: Bench) -> Results:
    """The data stall at 80% of the loader's capacity, for each step model (systems.STEP_MODELS)."""
    repeats, min_wall = (1, 0.0) if b.quick else (_STALL_REPEATS, _STALL_MIN_WALL_S)
    runs: dict[str, list[Results]] = {model: [] for model in STEP_MODELS}
    for _ in range(repeats):
        for model in STEP_MODELS:  # alternated, so that a slow minute of the machine hits both
            # No PSS sampling here: that thread would take the GIL from the trainer loop it measures.
            runs[model].append(measure_service(b, step_fraction=0.8, warmup=_STALL_WARMUP_BATCHES, sample_pss=False,
                                               step_model=model, min_wall_s=min_wall))
    out = {"stall" if model == "sleep" else f"stall_{model}": _median_run(r) for model, r in runs.items()}
    for key, res in out.items():
        _say(f"{key} at 80% load ({res['step_model']} step of {res['step_ms']:.2f} ms): {res['stall_pct']:.2f}% of "
             f"wall time (median of {res['runs']}: {', '.join(f'{v:.2f}' for v in res['stall_pct_all'])}), "
             f"next() p50 {res['next_p50_ms']:.3f} ms, p99 {res['next_p99_ms']:.3f} ms")
    return out


_STEP_TEXT = {"sleep": "the trainer waits (GPU)", "cpu": "the trainer computes without the GIL (CPU)"}


def _stall_rows(results: Results) -> list[tuple[str, str]]:
    rows = []
    for key in ("stall", *(f"stall_{m}" for m in STEP_MODELS if m != "sleep")):
        if key not in results:
            continue
        r = results[key]
        model = r.get("step_model", "sleep")
        spread = r.get("stall_pct_all", [r["stall_pct"]])
        rows.append((f"data stall, training step {r['step_ms']:.1f} ms (80% of loader capacity; "
                     f"{_STEP_TEXT.get(model, model)})",
                     f"{r['stall_pct']:.2f}% of wall time (median of {len(spread)}: "
                     f"{min(spread):.2f}–{max(spread):.2f}); "
                     f"next() p50 {r['next_p50_ms']:.3f} ms, p99 {r['next_p99_ms']:.3f} ms; load reached "
                     f"{r.get('load') or 0:.2f}"))
    return rows


# ---------------------------------------------------------------------------- float32
def _float32(b: Bench) -> Results:
    assert b.capacity
    # Warm up past the first use of every shared-memory slot: a fresh page costs a fault.
    out: Results = {}
    res = measure_service(b, n=b.quick_n, warmup=_FLOAT32_WARMUP_BATCHES, extra=[*b.serve_extra, "--dtype", "float32"])
    out["float32"] = {**res, "ratio_to_uint8": res["images_per_s"] / b.capacity}
    _say(f"float32 on the server: {res['images_per_s']:.0f} images/s ({res['images_per_s'] / b.capacity:.2f}x uint8)")
    res = measure_service(b, n=b.quick_n, warmup=_FLOAT32_WARMUP_BATCHES, client_kwargs={"normalize": True})
    out["float32_client"] = {**res, "ratio_to_uint8": res["images_per_s"] / b.capacity}
    _say(f"float32 on the client (uint8 on the wire): {res['images_per_s']:.0f} images/s "
         f"({res['images_per_s'] / b.capacity:.2f}x uint8)")
    return out


def _float32_rows(results: Results) -> list[tuple[str, str]]:
    rows = []
    for key, what in (("float32", "float32 made by the workers (--dtype float32)"),
                      ("float32_client", "float32 made by the client (normalize=True, uint8 on the wire)")):
        if key in results:
            r = results[key]
            rows.append((what, f"{r['images_per_s']:.0f} images/s = {r['ratio_to_uint8']:.2f}x uint8"))
    return rows


# ---------------------------------------------------------------------------- slow storage
def _slow(b: Bench) -> Results:
    assert b.capacity
    slow_args = ["--simulate-read-latency-ms", str(b.read_latency_ms), "--read-threads", "64"]
    res = measure_service(b, n=b.quick_n, extra=[*b.serve_extra, *slow_args])
    _say(f"slow storage (+{b.read_latency_ms:g} ms per read): {res['images_per_s']:.0f} images/s "
         f"({res['images_per_s'] / b.capacity:.2f}x)")
    return {"slow_storage": {**res, "read_latency_ms": b.read_latency_ms,
                             "ratio_to_no_latency": res["images_per_s"] / b.capacity}}


def _slow_rows(results: Results) -> list[tuple[str, str]]:
    if "slow_storage" not in results:
        return []
    r = results["slow_storage"]
    return [(f"slow storage, +{r['read_latency_ms']:g} ms per read, 64 read threads",
             f"{r['images_per_s']:.0f} images/s = {r['ratio_to_no_latency']:.2f}x no latency")]


# ---------------------------------------------------------------------------- augment, transform
def _pipeline_variant(key: str, flag: str, spec: str, label: str, row_label: str) -> Probe:
    """The service with one more pipeline stage (`flag spec`), against the plain service."""

    def run(b: Bench) -> Results:
        assert b.capacity
        res = measure_service(b, n=b.quick_n, extra=[*b.serve_extra, flag, spec])
        _say(f"{label} {spec}: {res['images_per_s']:.0f} images/s ({res['images_per_s'] / b.capacity:.2f}x plain)")
        return {key: {**res, "spec": spec, "ratio_to_plain": res["images_per_s"] / b.capacity}}

    def rows(results: Results) -> list[tuple[str, str]]:
        if key not in results:
            return []
        r = results[key]
        return [(f"{row_label} `{r['spec']}`",
                 f"{r['images_per_s']:.0f} images/s = {r['ratio_to_plain']:.2f}x plain")]

    return Probe(run, rows, needs_capacity=True)


# ---------------------------------------------------------------------------- arrays
def _arrays(b: Bench) -> Results:
    """Rows per second from a memory-mapped dense .npy and from ragged sequences."""
    rng = np.random.default_rng(0)
    root = Path(b.scratch) / "arrays"
    root.mkdir(exist_ok=True)
    rows, shape, maxlen = 20_000, (32, 32), 200
    np.save(root / "x.npy", rng.normal(size=(rows, *shape)).astype(np.float32))
    np.save(root / "y.npy", rng.integers(0, 10, rows))
    lengths = rng.integers(10, 400, rows)
    np.save(root / "values.npy", rng.integers(1, 30_000, int(lengths.sum())).astype(np.int32))
    np.save(root / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    out: Results = {"row_shape": list(shape), "maxlen": maxlen}
    n = b.quick_n * 8
    for name, data, extra in (
        ("dense", root / "x.npy", ["--labels", str(root / "y.npy")]),
        ("ragged", root / "values.npy", ["--offsets", str(root / "offsets.npy"), "--labels", str(root / "y.npy"),
                                         "--maxlen", str(maxlen)]),
    ):
        with served(b, str(data), extra, size="8x8", ready=True) as server, \
                LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S) as client:
            it = iter(client)
            for _ in range(4):
                next(it)
            got, started = 0, time.perf_counter()
            while got < n:
                got += len(next(it)[0])
            out[f"{name}_rows_per_s"] = got / (time.perf_counter() - started)
    _say(f"array data sets: {out['dense_rows_per_s']:.0f} rows/s dense float32 {out['row_shape']}, "
         f"{out['ragged_rows_per_s']:.0f} rows/s ragged int32 padded to {out['maxlen']}")
    return {"arrays": out}


def _arrays_rows(results: Results) -> list[tuple[str, str]]:
    if "arrays" not in results:
        return []
    r = results["arrays"]
    return [(f"array data set, dense float32 rows of {r['row_shape']} (memory-mapped .npy)",
             f"{r['dense_rows_per_s']:.0f} rows/s"),
            (f"array data set, ragged int32 sequences padded to {r['maxlen']}", f"{r['ragged_rows_per_s']:.0f} rows/s")]


# ---------------------------------------------------------------------------- curve
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _curve(b: Bench) -> Results:
    # Over TCP without shared memory, so that every byte crosses the socket: with and without CURVE.
    curve_dir, curve_client = curve_keys(b.scratch)
    plain = measure_service(b, n=b.quick_n, extra=[*b.serve_extra, "--no-shm"],
                            endpoint=f"tcp://127.0.0.1:{_free_port()}")
    secured = measure_service(b, n=b.quick_n, extra=[*b.serve_extra, "--no-shm", "--curve-dir", curve_dir],
                              endpoint=f"tcp://127.0.0.1:{_free_port()}", client_kwargs=curve_client)
    out = {"tcp_images_per_s": plain["images_per_s"], "curve_images_per_s": secured["images_per_s"],
           "ratio": secured["images_per_s"] / plain["images_per_s"]}
    _say(f"tcp without shm: {plain['images_per_s']:.0f} images/s; with CURVE: {secured['images_per_s']:.0f} "
         f"({out['ratio']:.2f}x)")
    return {"curve": out}


def _curve_rows(results: Results) -> list[tuple[str, str]]:
    if "curve" not in results:
        return []
    r = results["curve"]
    return [("CurveZMQ encryption (tcp loopback, no shared memory)",
             f"{r['curve_images_per_s']:.0f} against {r['tcp_images_per_s']:.0f} images/s = {r['ratio']:.2f}x")]


# ---------------------------------------------------------------------------- multiserver
def _merged_rate(b: Bench, servers: int, extra: list[str], n: int) -> float:
    """Images/s from `servers` servers on separate loopback addresses, merged by one client."""
    with ExitStack() as stack:
        procs = [stack.enter_context(served(b, b.data, extra, endpoint=f"tcp://127.0.0.{2 + i}:{_free_port()}",
                                            ready=True)) for i in range(servers)]
        with LoaderClient([p.endpoint for p in procs], timeout_s=CLIENT_TIMEOUT_S, prefetch=4) as client:
            it = iter(client)
            for _ in range(_MULTI_WARMUP_BATCHES * servers):  # drain what was built while starting
                next(it)
            got, started = 0, time.perf_counter()
            while got < n:
                got += len(next(it)[0])
            return got / (time.perf_counter() - started)


def _multiserver(b: Bench) -> Results:
    # Latency-bound workers (slow storage, reads inline): one host's CPUs are not the limit.
    slow = [*b.serve_extra, "--simulate-read-latency-ms", str(b.read_latency_ms), "--read-threads", "0"]
    n = 4 * b.batch_size if b.quick else 16 * b.batch_size
    one, two = _merged_rate(b, 1, slow, n), _merged_rate(b, 2, slow, n)
    out = {"one": one, "two": two, "ratio": two / one, "read_latency_ms": b.read_latency_ms}
    _say(f"latency-bound: 1 server {one:.0f} images/s, 2 servers {two:.0f} ({out['ratio']:.2f}x)")
    return {"multiserver": out}


def _multiserver_rows(results: Results) -> list[tuple[str, str]]:
    if "multiserver" not in results:
        return []
    r = results["multiserver"]
    return [(f"two servers (127.0.0.2, 127.0.0.3), latency-bound (+{r['read_latency_ms']:g} ms per read, inline)",
             f"{r['two']:.0f} against {r['one']:.0f} images/s from one = {r['ratio']:.2f}x")]


# ---------------------------------------------------------------------------- hosts
#: The client timeout of the kill measurement: a lost server is noticed after this much silence.
_HOSTS_TIMEOUT_S = 2.0
#: The kill measurement ends at the latest after this long (it waits for the epoch of the kill to end).
_HOSTS_MAX_S = 180.0


def _hosts_servers(b: Bench, stack: ExitStack, latencies: list[float]) -> list[Any]:
    """Latency-bound servers (reads inline, + latency ms each) on 127.0.0.2, .3, ..."""
    return [stack.enter_context(served(b, b.data, [*b.serve_extra, "--simulate-read-latency-ms", str(ms),
                                                   "--read-threads", "0"],
                                       endpoint=f"tcp://127.0.0.{2 + i}:{_free_port()}", ready=True))
            for i, ms in enumerate(latencies)]


def _timed_rate(client: LoaderClient, n: int, warmup_batches: int) -> float:
    for _ in range(warmup_batches):
        client.next()
    got, started = 0, time.perf_counter()
    while got < n:
        got += len(client.next()[0])
    return got / (time.perf_counter() - started)


def _kill_run(b: Bench, servers: int) -> Results:
    """`servers` servers, one SIGKILLed mid-run: rates before and after, the stall, exactly once."""
    with ExitStack() as stack:
        procs = _hosts_servers(b, stack, [b.read_latency_ms] * servers)
        with LoaderClient([p.endpoint for p in procs], timeout_s=_HOSTS_TIMEOUT_S, prefetch=4) as client:
            seen: dict[int, list[int]] = {}  # sample indices of each epoch, from the very first batch

            def take() -> int:
                x = client.next()[0]
                info = client.last
                assert info is not None
                seen.setdefault(info.epoch, []).extend(info.indices.tolist())
                return len(x)

            for _ in range(_MULTI_WARMUP_BATCHES * servers):
                take()
            marks: list[tuple[float, int]] = []  # (time, images) of each batch
            started = time.perf_counter()
            killed_at = started + (2.0 if b.quick else 4.0)
            stop_at = killed_at + 2 * _HOSTS_TIMEOUT_S + (3.0 if b.quick else 6.0)
            give_up = started + _HOSTS_MAX_S
            victim, kill_epoch = procs[-1], None
            # Until the measurement window is over and the epoch of the kill is complete.
            while ((now := time.perf_counter()) < stop_at or kill_epoch is None
                   or client.position[0] <= kill_epoch) and now < give_up:
                if kill_epoch is None and now >= killed_at:
                    victim.proc.kill()
                    victim.proc.wait(10)
                    killed_at, kill_epoch = time.perf_counter(), client.position[0]
                images = take()
                marks.append((time.perf_counter(), images))
            lost = [loss["endpoint"] for loss in getattr(client, "lost", [])]
            steps, batch = client.steps_per_epoch, client.batch_size
    # Throughput is back when batches flow again: at the end of the longest gap after the kill.
    times = [killed_at, *(t for t, _ in marks if t >= killed_at)]
    longest, gap_end = max(((b2 - a, b2) for a, b2 in zip(times, times[1:], strict=False)),
                           default=(0.0, killed_at))
    before = sum(n for t, n in marks if t < killed_at) / (killed_at - started)
    window = [(t, n) for t, n in marks if gap_end + 0.5 <= t <= stop_at]
    after = sum(n for _, n in window) / max(1e-9, window[-1][0] - (gap_end + 0.5)) if window else 0.0
    repeated = sum(len(v) - len(set(v)) for v in seen.values())
    complete = [e for e, v in seen.items() if len(v) == steps * batch == len(set(v))]
    return {"servers": servers, "images_per_s_before": before, "images_per_s_after": after,
            "longest_gap_s": longest, "recovered_after_s": gap_end - killed_at, "timeout_s": _HOSTS_TIMEOUT_S,
            "repeated_samples": repeated, "complete_epochs_checked": len(complete),
            "kill_epoch_complete_and_once": kill_epoch in complete, "lost": lost}


def _hosts(b: Bench) -> Results:
    n = 4 * b.batch_size if b.quick else 24 * b.batch_size
    rates = {}
    for servers in (1, 2, 3):
        with ExitStack() as stack:
            procs = _hosts_servers(b, stack, [b.read_latency_ms] * servers)
            endpoints = [p.endpoint for p in procs]
            with LoaderClient(endpoints if servers > 1 else endpoints[0], timeout_s=CLIENT_TIMEOUT_S,
                              prefetch=4) as client:
                rates[servers] = _timed_rate(client, n, _MULTI_WARMUP_BATCHES * servers)
        _say(f"hosts: {servers} latency-bound server(s): {rates[servers]:.0f} images/s")
    kill = _kill_run(b, 3)
    _say(f"hosts: 3 servers, one killed: {kill['images_per_s_before']:.0f} images/s before, "
         f"{kill['images_per_s_after']:.0f} after; batches again {kill['recovered_after_s']:.1f} s after the kill "
         f"(timeout_s {kill['timeout_s']:g}); {kill['repeated_samples']} samples repeated, the epoch of the kill "
         f"{'complete, every sample once' if kill['kill_epoch_complete_and_once'] else 'NOT complete or not once'}")
    merges = {}
    slow = [b.read_latency_ms, 2 * b.read_latency_ms]  # one of two at half speed
    # Longer than the rest: what the servers built ahead (their prefetch, stolen shares' streams)
    # must not count; --quick numbers are a smoke test only.
    long_n, warmup = (n, _MULTI_WARMUP_BATCHES * 2) if b.quick else (4 * n, 4 * _MULTI_WARMUP_BATCHES)
    for merge in ("ordered", "balanced"):
        with ExitStack() as stack:
            procs = _hosts_servers(b, stack, slow)
            with LoaderClient([p.endpoint for p in procs], timeout_s=CLIENT_TIMEOUT_S, prefetch=4,
                              merge=merge) as client:
                merges[merge] = _timed_rate(client, long_n, warmup)
    ratio = merges["balanced"] / merges["ordered"]
    _say(f"hosts: one of two servers at half speed: ordered (round-robin) {merges['ordered']:.0f} images/s, "
         f"balanced {merges['balanced']:.0f} ({ratio:.2f}x)")
    return {"hosts": {"rates": rates, "kill": kill, "half_speed": {**merges, "ratio": ratio},
                      "read_latency_ms": b.read_latency_ms}}


def _hosts_rows(results: Results) -> list[tuple[str, str]]:
    if "hosts" not in results:
        return []
    r = results["hosts"]
    k, h = r["kill"], r["half_speed"]
    rates = ", ".join(f"{s}: {v:.0f}" for s, v in r["rates"].items())
    return [(f"loader hosts, latency-bound (+{r['read_latency_ms']:g} ms per read, inline), images/s by servers",
             rates),
            ("3 hosts, one SIGKILLed (client timeout_s 2)",
             f"{k['images_per_s_before']:.0f} -> {k['images_per_s_after']:.0f} images/s, batches again after "
             f"{k['recovered_after_s']:.1f} s, {k['repeated_samples']} repeated"),
            ("2 hosts, one at half speed: balanced against ordered merge",
             f"{h['balanced']:.0f} against {h['ordered']:.0f} images/s = {h['ratio']:.2f}x")]


# ---------------------------------------------------------------------------- scaling
def _scaling(b: Bench) -> Results:
    out: dict[int, Results] = {}
    for w in b.scaling:
        res = measure_service(b, n=b.quick_n, workers=w)
        out[w] = res
        _say(f"scaling: {w} workers {res['images_per_s']:.0f} images/s")
    return {"scaling": out}


def _scaling_tables(results: Results) -> list[str]:
    if "scaling" not in results:
        return []
    lines = ["", "| workers | images/s | peak PSS MB |", "|---|---|---|"]
    for w, r in results["scaling"].items():
        lines.append(f"| {w} | {r['images_per_s']:.0f} | {r['peak_pss_mb']:.0f} |")
    return lines


# ---------------------------------------------------------------------------- ttfb
def _ttfb(b: Bench) -> Results:
    """Time from starting the server to the first batch, with a list file of a million lines."""
    lines = 20_000 if b.quick else 1_000_000
    listfile = Path(b.scratch) / "million.txt"
    with open(listfile, "wb") as f:
        rel = [os.fsencode(b.index.path(i)) for i in range(len(b.index))]
        for i in range(lines):
            f.write(rel[i % len(rel)] + b" %d\n" % b.index.labels[i % len(rel)])
    with served(b, str(listfile), []) as server:
        pss = PssSampler(server.pid)
        try:
            with LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S) as client:
                next(iter(client))
                ttfb = time.perf_counter() - server.started
                for _ in range(20):
                    client.next()
        finally:
            server.stop()
            peak = pss.stop()
    _say(f"time to first batch with {lines} lines: {ttfb:.2f} s")
    return {"ttfb_million": {"lines": lines, "time_to_first_batch_s": ttfb, "peak_pss_mb": peak}}


def _ttfb_rows(results: Results) -> list[tuple[str, str]]:
    if "ttfb_million" not in results:
        return []
    r = results["ttfb_million"]
    return [(f"time to first batch, {r['lines']:,}-line list file",
             f"{r['time_to_first_batch_s']:.2f} s; peak PSS {r['peak_pss_mb']:.0f} MB")]


# ---------------------------------------------------------------------------- stages
def _stages(b: Bench) -> Results:
    """CPU milliseconds per image of each stage, measured on its own in this process."""
    import cv2
    import zmq

    from loader_client.contract import protocol

    n, size, batch_size = (128 if b.quick else 512), b.size, b.batch_size
    cv2.setNumThreads(1)
    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
    paths = b.paths(n)

    def cpu_ms(fn: Callable[[], Any], count: int) -> float:
        fn()
        t = time.process_time()
        fn()
        return (time.process_time() - t) * 1000 / count

    def read_all() -> list[bytes]:
        out = []
        for p in paths:
            with open(p, "rb") as f:
                out.append(f.read())
        return out

    blobs = read_all()
    imgs = [img for blob in blobs if (img := cv2.imdecode(np.frombuffer(blob, np.uint8), flag)) is not None]
    batch = np.empty((batch_size, size[1], size[0], 3), np.uint8)
    out: dict[str, float] = {}
    out["read"] = cpu_ms(read_all, n)
    out["decode"] = cpu_ms(lambda: [cv2.imdecode(np.frombuffer(blob, np.uint8), flag) for blob in blobs], n)
    out["resize"] = cpu_ms(lambda: [cv2.resize(im, size, dst=batch[i % batch_size]) for i, im in enumerate(imgs)], n)
    labels = b.index.labels
    idx = np.arange(batch_size) % len(b.index)
    out["collate"] = cpu_ms(lambda: [labels[idx] for _ in range(n // batch_size)], n)
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    endpoint = f"ipc://{b.scratch}/stages.sock"
    pull.bind(endpoint)
    push.connect(endpoint)
    head = protocol.pack("batch", arrays=protocol.describe_arrays({"x": batch}))
    batches = max(4, n // batch_size)
    done = threading.Event()
    recv_cpu: list[float] = []

    def receiver() -> None:
        t = time.thread_time()
        for _ in range(batches):
            frames = pull.recv_multipart(copy=False)
            protocol.build_arrays(protocol.unpack(frames[0])["arrays"], frames[1:])
        recv_cpu.append(time.thread_time() - t)
        done.set()

    thread = threading.Thread(target=receiver)
    thread.start()
    t, wall = time.thread_time(), time.perf_counter()
    for _ in range(batches):
        push.send_multipart([head, batch], copy=False)  # type: ignore[list-item]  # a buffer, as the workers send
    send_cpu = time.thread_time() - t
    done.wait(60)
    wall = time.perf_counter() - wall
    thread.join(60)
    push.close(0)
    pull.close(0)
    ctx.term()
    images = batches * batch_size
    out["send (Python side)"] = send_cpu * 1000 / images
    out["receive (Python side)"] = (recv_cpu[0] if recv_cpu else float("nan")) * 1000 / images
    # ZeroMQ's I/O threads copy the bytes through the kernel: the wall time of a transfer shows
    # what the shared-memory path (no copy at all) saves per image.
    out["socket transfer over ipc (wall, frames path only)"] = wall * 1000 / images
    return {"stages_cpu_ms_per_image": out}


def _stages_tables(results: Results) -> list[str]:
    if "stages_cpu_ms_per_image" not in results:
        return []
    st = results["stages_cpu_ms_per_image"]
    return ["", "| stage | CPU ms per image |", "|---|---|", *(f"| {k} | {v:.3f} |" for k, v in st.items())]


# ---------------------------------------------------------------------------- cache
#: Images timed over the cached epochs (epoch 2 onwards) of each cache measurement, at least.
_CACHE_TIMED_IMAGES = 4096
_CACHE_RRC = ["--augment", "rrc,flip", "--cache-size", "256"]
#: The paced measurement of the cached epochs: a training step at this fraction of the cached rate...
_CACHE_PACE_FRACTION = 0.8
#: ... for at least this many seconds.
_CACHE_PACED_MIN_S = 2.0
#: Rounds of the cache probe (each: every pipeline uncached, then cached).
_CACHE_REPEATS = 3


def _memcpy_bytes_per_s(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """This machine's memory-copy bandwidth: the best of `repeats` np.copyto of `nbytes`."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _epochs(b: Bench, extra: list[str], min_images: int, paced: bool = False) -> Results:
    """Serve (ready), then time epoch 1 from the client's first request, and the epochs after it (at least
    `min_images`); next() latencies of the later epochs.

    `paced`: then more epochs (at least `_CACHE_PACED_MIN_S`, 0.2 s with --quick) with a simulated training step (a
    sleep, as the stall probe's) at 80% of the rate just measured: next() latency and stall as a
    trainer sees them, where the never-pausing consumer only measures how long the workers take.
    """
    with served(b, b.data, extra, ready=True) as server, \
            LoaderClient(server.endpoint, timeout_s=CLIENT_TIMEOUT_S, prefetch=4) as client:
        per_epoch = client.steps_per_epoch * b.batch_size
        later = max(2, -(-min_images // per_epoch))
        rates: list[tuple[int, float]] = []
        latencies: list[tuple[int, float]] = []
        touched = 0
        for epoch in range(1 + later):  # epoch 1 counts from the first request: the same start-up for all
            got, started = 0, time.perf_counter()
            for _ in range(client.steps_per_epoch):
                t0 = time.perf_counter()
                x = client.next()[0]
                latencies.append((epoch, time.perf_counter() - t0))
                touched += int(x.reshape(-1)[-1])
                got += len(x)
            rates.append((got, time.perf_counter() - started))
        first = rates[0][0] / rates[0][1]
        rest = sum(g for g, _ in rates[1:]) / sum(w for _, w in rates[1:])
        pace: Results = {}
        if paced:
            step_s = b.batch_size / (_CACHE_PACE_FRACTION * rest)
            min_s = 0.2 if b.quick else _CACHE_PACED_MIN_S
            epochs = max(later, -(-int(min_s * _CACHE_PACE_FRACTION * rest) // per_epoch))
            waits: list[float] = []
            started = time.perf_counter()
            for _ in range(epochs * client.steps_per_epoch):
                t0 = time.perf_counter()
                x = client.next()[0]
                waits.append(time.perf_counter() - t0)
                touched += int(x.reshape(-1)[-1])
                del x  # as a trainer's step is done with its batch
                simulate_step(step_s)
            wall = time.perf_counter() - started
            ms = np.array(waits) * 1000
            pace = {"step_ms": step_s * 1000, "batches": len(waits), "stall_pct": 100 * float(np.sum(waits)) / wall,
                    "next_p50_ms": float(np.percentile(ms, 50)), "next_p99_ms": float(np.percentile(ms, 99)),
                    "load": len(waits) * b.batch_size / wall / rest}
        stats = server_stats(server.endpoint, timeout_s=10).get("cache", {})
    later_ms = np.array([dt for e, dt in latencies if e > 0]) * 1000
    out: Results = {"epoch1_images_per_s": first, "later_images_per_s": rest, "later_epochs": later,
                    "next_p50_ms": float(np.percentile(later_ms, 50)),
                    "next_p99_ms": float(np.percentile(later_ms, 99)),
                    "hit_ratio": stats.get("hit_ratio"), "cache_bytes": stats.get("bytes")}
    if pace:
        out["paced"] = pace
    return out


def _fill_profile(b: Bench, cache_size: int) -> Results:
    """CPU ms per image of the rrc,flip pipeline in this process, one thread: a worker's whole batch
    uncached, filling a fresh memory cache of records at shorter side `cache_size` and from it;
    and the stages that make the difference."""
    import cv2

    from loader_server.config import ServerConfig
    from loader_server.data.datasets import FileDataset, load_dataset
    from loader_server.pipeline.augment import Augmenter, parse_augment, sample_rng
    from loader_server.pipeline.batch import BatchBuilder
    from loader_server.pipeline.cache import open_cache, record_decoder
    from loader_server.pipeline.decode import Decoder, read_file

    cv2.setNumThreads(1)
    settings: dict[str, Any] = {"data": b.data, "batch_size": b.batch_size, "size": b.size,
                                "augment": _CACHE_RRC[1]}
    plain_config = ServerConfig(**settings)
    cached_config = ServerConfig(**settings, cache="memory", cache_size=cache_size)
    index = load_dataset(plain_config)
    if not isinstance(index, FileDataset):
        raise TypeError(f"the cache probe reads image files; {index.source} is not a data set of files")
    n = min(len(index), 128 if b.quick else 512) // b.batch_size * b.batch_size
    batches = [np.arange(lo, lo + b.batch_size) for lo in range(0, n, b.batch_size)]
    out: Results = {"images": n, "record_shape": None}

    def cpu_ms(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        return best * 1000 / n

    plain = BatchBuilder(plain_config, index)
    x = plain.allocate()
    plain.build(batches[0], x, key=(0, 1), augment=True)  # warm
    out["uncached"] = cpu_ms(lambda: [plain.build(i, x, key=(0, 1), augment=True) for i in batches])
    same = BatchBuilder(ServerConfig(**settings, cache_size=cache_size), index)
    same.build(batches[0], x, key=(0, 1), augment=True)  # warm
    out["uncached_same_pixels"] = cpu_ms(lambda: [same.build(i, x, key=(0, 1), augment=True) for i in batches])
    fills: list[float] = []
    hits: list[float] = []
    for _ in range(3):  # each fill on a fresh cache
        cache = open_cache(cached_config, index)
        try:
            builder = BatchBuilder(cached_config, index, cache=cache)
            for runs in (fills, hits):
                t = time.process_time()
                for i in batches:
                    builder.build(i, x, key=(0, 1), augment=True)
                runs.append((time.process_time() - t) * 1000 / n)
            out["record_shape"] = list(cache.layout.shape)
        finally:
            cache.close()
    out["fill"], out["hit"] = min(fills), min(hits)
    # The stages: what a miss does beyond the uncached path, and what it saves.
    decoder, maker = Decoder(plain_config), record_decoder(cached_config)
    augmenter = Augmenter(parse_augment(_CACHE_RRC[1]))
    paths = [index.path(i) for i in range(n)]
    blobs = [read_file(p) for p in paths]
    stats = [index.version(i) for i in range(n)]
    images = [decoder.decode(blob, p, reduce=False) for blob, p in zip(blobs, paths, strict=True)]
    record = np.empty(tuple(out["record_shape"]), np.uint8)
    records = []
    for blob, p in zip(blobs, paths, strict=True):
        maker.decode_into(blob, p, record)
        records.append(record.copy())
    slot = x[0]

    def crop(sources: list[np.ndarray]) -> None:
        for i, src in enumerate(sources):
            x0, y0, w, h = augmenter.crop_box(src.shape[1], src.shape[0], sample_rng(0, 1, i))
            decoder.resize_into(src[y0 : y0 + h, x0 : x0 + w], slot)

    def decode_full() -> None:
        for blob, p in zip(blobs, paths, strict=True):
            decoder.decode(blob, p, reduce=False)

    def decode_record() -> None:
        for blob, p in zip(blobs, paths, strict=True):
            maker.decode(blob, p)

    def resize_record() -> None:
        for img in images:
            maker.resize_into(img, record)

    def store() -> None:
        for i, (st, rec) in enumerate(zip(stats, records, strict=True)):
            cache.store(i, st, rec)

    def flip() -> None:
        for i in range(n):
            augmenter.apply(slot, sample_rng(0, 1, i))

    stages: dict[str, Callable[[], None]] = {
        "decode, full size (both)": decode_full,
        "decode for the record (reduced where it may)": decode_record,
        "resize to the record (miss only)": resize_record,
        "store the record (miss only)": store,
        "crop + resize from the original (uncached)": lambda: crop(images),
        "crop + resize from the record (miss and hit)": lambda: crop(records),
        "flip (both)": flip,
    }
    cache = open_cache(cached_config, index)
    try:
        out["stages"] = {name: cpu_ms(fn) for name, fn in stages.items()}
    finally:
        cache.close()
    _say(f"cache fill profile, records {'x'.join(map(str, out['record_shape']))}, CPU ms per image in one process: "
         f"uncached {out['uncached']:.3f} (from the original), {out['uncached_same_pixels']:.3f} (the same "
         f"--cache-size, the same pixels), filling {out['fill']:.3f} "
         f"({100 * (out['fill'] / out['uncached_same_pixels'] - 1):+.0f}% against the same pixels, "
         f"{100 * (out['fill'] / out['uncached'] - 1):+.0f}% against the original), from the cache {out['hit']:.3f}; "
         + ", ".join(f"{k} {v:.3f}" for k, v in out["stages"].items()))
    return out


def _cache(b: Bench) -> Results:
    """The decoded-sample cache (--cache memory) against the same service uncached: plain, and rrc,flip with
    records at shorter side 256 and at the output's shorter side (the cost of filling against the crop's room).

    `_CACHE_REPEATS` rounds (1 with --quick), each running every pipeline uncached then cached, so
    that the fill cost compares neighbours in time; medians are reported, with the spread.
    """
    sample_bytes = b.size[0] * b.size[1] * 3
    memcpy = _memcpy_bytes_per_s()
    sizes = sorted({int(_CACHE_RRC[3]), min(b.size)}, reverse=True)
    out: Results = {"memcpy_bytes_per_s": memcpy, "sample_bytes": sample_bytes,
                    "fill_profile": {str(size): _fill_profile(b, size) for size in sizes}}
    # (results key, the uncached pipeline's flags, the cached one's). The uncached rrc,flip runs
    # with the same --cache-size (the same pixels: the cache only adds the store); crops of the
    # full original (other pixels) are run once a round as well, for the fill cost against them.
    pipelines: list[tuple[str, list[str], list[str]]] = [("plain", [], [])]
    pipelines += [(_rrc_key(size), [*_CACHE_RRC[:3], str(size)], [*_CACHE_RRC[:3], str(size)]) for size in sizes]
    timed = 4 * b.batch_size if b.quick else _CACHE_TIMED_IMAGES
    runs: dict[str, list[Results]] = {name: [] for name, _, _ in pipelines}
    for _ in range(1 if b.quick else _CACHE_REPEATS):
        original = _epochs(b, [*b.serve_extra, *_CACHE_RRC[:2]], timed // 2)
        for name, plain, pipeline in pipelines:
            uncached = _epochs(b, [*b.serve_extra, *plain], timed // 2)
            cached = _epochs(b, [*b.serve_extra, *pipeline, "--cache", "memory"], timed, paced=True)
            run = {"uncached": uncached, "cached": cached,
                   "speedup": cached["later_images_per_s"] / uncached["later_images_per_s"],
                   "fill_cost": 1 - cached["epoch1_images_per_s"] / uncached["epoch1_images_per_s"]}
            if plain:
                run["original"] = original
                run["fill_cost_vs_original"] = 1 - cached["epoch1_images_per_s"] / original["epoch1_images_per_s"]
                run["speedup_vs_original"] = cached["later_images_per_s"] / original["later_images_per_s"]
            runs[name].append(run)
    for name, _, pipeline in pipelines:
        out[name] = r = _cache_summary(runs[name], pipeline, sample_bytes, memcpy)
        if "fill_cost_vs_original" in r:
            _say(f"cache {name}: against rrc,flip from the full original (other pixels, "
                 f"{r['original_images_per_s']:.0f} images/s): fill cost {100 * r['fill_cost_vs_original']:+.0f}% "
                 f"({_spread(r['fill_cost_vs_original_all'], 100, '.0f')}), speedup {r['speedup_vs_original']:.2f}x")
        _say(f"cache {name} (median of {len(runs[name])}): uncached {r['uncached_images_per_s']:.0f} images/s; "
             f"cached epoch 1 (fill) {r['epoch1_images_per_s']:.0f} ({100 * r['fill_cost']:+.0f}% cost, "
             f"{_spread(r['fill_cost_all'], 100, '.0f')}), epochs >= 2 {r['later_images_per_s']:.0f} = "
             f"{r['speedup']:.2f}x; {r['delivered_bytes_per_s'] / 1e9:.2f} GB/s delivered = "
             f"{r['ratio_to_memcpy']:.3f} of memcpy {memcpy / 1e9:.1f} GB/s; next() p50 {r['next_p50_ms']:.3f} ms "
             f"never pausing, {r['paced']['next_p50_ms']:.3f} ms (p99 {r['paced']['next_p99_ms']:.3f}, stall "
             f"{r['paced']['stall_pct']:.2f}%) with a {r['paced']['step_ms']:.2f} ms step at 80% of it")
    return {"cache": out}


def _cache_summary(runs: list[Results], pipeline: list[str], sample_bytes: int, memcpy: float) -> Results:
    """Medians (and every value) over the rounds of one pipeline."""
    import statistics

    def med(get: Callable[[Results], float]) -> float:
        return statistics.median(get(r) for r in runs)

    later = med(lambda r: r["cached"]["later_images_per_s"])
    paced = {k: med(lambda r, k=k: r["cached"]["paced"][k])  # type: ignore[misc]
             for k in ("step_ms", "next_p50_ms", "next_p99_ms", "stall_pct", "load")}
    return {"serve_args": pipeline, "rounds": len(runs), "runs": runs,
            "uncached_images_per_s": med(lambda r: r["uncached"]["later_images_per_s"]),
            "uncached_epoch1_images_per_s": med(lambda r: r["uncached"]["epoch1_images_per_s"]),
            "epoch1_images_per_s": med(lambda r: r["cached"]["epoch1_images_per_s"]),
            "later_images_per_s": later, "speedup": med(lambda r: r["speedup"]),
            "fill_cost": med(lambda r: r["fill_cost"]), "fill_cost_all": [r["fill_cost"] for r in runs],
            **({"fill_cost_vs_original": med(lambda r: r["fill_cost_vs_original"]),
                "fill_cost_vs_original_all": [r["fill_cost_vs_original"] for r in runs],
                "speedup_vs_original": med(lambda r: r["speedup_vs_original"]),
                "original_images_per_s": med(lambda r: r["original"]["later_images_per_s"])}
               if "original" in runs[0] else {}),
            "speedup_all": [r["speedup"] for r in runs],
            "next_p50_ms": med(lambda r: r["cached"]["next_p50_ms"]),
            "paced": paced, "paced_next_p50_ms_all": [r["cached"]["paced"]["next_p50_ms"] for r in runs],
            "paced_stall_pct_all": [r["cached"]["paced"]["stall_pct"] for r in runs],
            "hit_ratio": med(lambda r: r["cached"]["hit_ratio"] or 0.0),
            "delivered_bytes_per_s": later * sample_bytes, "ratio_to_memcpy": later * sample_bytes / memcpy}


def _spread(values: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    return f"{scale * min(values):{fmt}} to {scale * max(values):{fmt}}" if len(values) > 1 else "one round"


def _rrc_key(cache_size: int) -> str:
    """results.json key of rrc,flip from records at shorter side `cache_size`: ``rrc_flip`` for 256, as before."""
    return "rrc_flip" if cache_size == int(_CACHE_RRC[3]) else f"rrc_flip_{cache_size}"


def _cache_tables(results: Results) -> list[str]:
    if "cache" not in results:
        return []
    r = results["cache"]
    lines = ["", f"Decoded-sample cache (--cache memory), memcpy bandwidth {r['memcpy_bytes_per_s'] / 1e9:.1f} GB/s; "
             "medians of the rounds (min to max):",
             "", ("| pipeline | uncached images/s | cached epoch 1 (fill) | cached epochs >= 2 | speedup | fill cost "
                  "| GB/s delivered (of memcpy) | next() p50 ms, never pausing | paced at 80%: step ms, next() p50 / "
                  "p99 ms, stall |"), "|---|---|---|---|---|---|---|---|---|"]
    for p in r.values():
        if not (isinstance(p, dict) and "paced" in p):
            continue
        label = " ".join(p["serve_args"]) or "plain"
        lines.append(f"| {label} | {p['uncached_images_per_s']:.0f} | {p['epoch1_images_per_s']:.0f} | "
                     f"{p['later_images_per_s']:.0f} | {p['speedup']:.2f}x | {100 * p['fill_cost']:.0f}% "
                     f"({_spread(p['fill_cost_all'], 100, '.0f')}) | {p['delivered_bytes_per_s'] / 1e9:.2f} "
                     f"({p['ratio_to_memcpy']:.3f}) | {p['next_p50_ms']:.3f} | {_paced_text(p['paced'])} "
                     f"(p50 {_spread(p['paced_next_p50_ms_all'], 1, '.3f')}) |")
    originals = [p for p in r.values() if isinstance(p, dict) and "fill_cost_vs_original" in p]
    if originals:
        lines += ["", "The uncached rrc,flip rows above use the same --cache-size (the same pixels). Against "
                  "rrc,flip from the full original (other pixels):", "",
                  "| pipeline | uncached from the original, images/s | fill cost against it | speedup against it |",
                  "|---|---|---|---|"]
        lines += [f"| {' '.join(p['serve_args'])} | {p['original_images_per_s']:.0f} | "
                  f"{100 * p['fill_cost_vs_original']:.0f}% ({_spread(p['fill_cost_vs_original_all'], 100, '.0f')}) | "
                  f"{p['speedup_vs_original']:.2f}x |" for p in originals]
    for fp in r.get("fill_profile", {}).values():
        same = fp.get("uncached_same_pixels")
        lines += ["", f"Where filling goes (`rrc,flip`, records {'x'.join(map(str, fp['record_shape']))}; CPU ms per "
                  f"image in one process, {fp['images']} images, best of 3): a worker's batch uncached "
                  f"{fp['uncached']:.3f} from the original"
                  + (f", {same:.3f} with the same --cache-size (the same pixels)" if same else "")
                  + f", filling {fp['fill']:.3f} ("
                  + (f"{100 * (fp['fill'] / same - 1):+.0f}% against the same pixels, " if same else "")
                  + f"{100 * (fp['fill'] / fp['uncached'] - 1):+.0f}% against the original), "
                  f"from the cache {fp['hit']:.3f}.", "", "| stage | CPU ms per image |", "|---|---|",
                  *(f"| {k} | {v:.3f} |" for k, v in fp["stages"].items())]
    return lines


def _paced_text(p: Results | None) -> str:
    if not p:
        return "–"
    return f"{p['step_ms']:.2f}: {p['next_p50_ms']:.3f} / {p['next_p99_ms']:.3f}, {p['stall_pct']:.2f}%"


#: name -> probe, in the order they run and appear in results.md.
PROBES: dict[str, Probe] = {
    "strict": Probe(_strict, _strict_rows, default=False),
    "stall": Probe(_stall, _stall_rows, needs_capacity=True),
    "float32": Probe(_float32, _float32_rows, needs_capacity=True),
    "slow": Probe(_slow, _slow_rows, needs_capacity=True),
    "augment": _pipeline_variant("augment", "--augment", "rrc(scale=0.08-1),flip,jitter(0.4),rotate(10),cutout(0.25)",
                                 "augmented", "augmentations"),
    "transform": _pipeline_variant("transform", "--transform", "loader_server.sample_data:example_transform",
                                   "user transform", "user transform"),
    "arrays": Probe(_arrays, _arrays_rows),
    "curve": Probe(_curve, _curve_rows),
    "multiserver": Probe(_multiserver, _multiserver_rows),
    "hosts": Probe(_hosts, _hosts_rows, default=False),
    "scaling": Probe(_scaling, tables=_scaling_tables),
    "ttfb": Probe(_ttfb, _ttfb_rows),
    "stages": Probe(_stages, tables=_stages_tables),
    "cache": Probe(_cache, tables=_cache_tables, default=False),
    "floods": Probe(floods, tables=flood_tables, default=False),
    "kinds": Probe(kinds_probe, tables=kinds_tables, default=False),
    "index": Probe(index_probe, tables=index_tables, default=False),
    "s3": Probe(s3_probe, tables=s3_tables, default=False),
    "train": Probe(train_probe, tables=train_tables, default=False),
    "share": Probe(share_probe, tables=share_tables, default=False),
    "autoscale": Probe(autoscale_probe, autoscale_rows, default=False),
}
