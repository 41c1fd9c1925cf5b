"""The ``loader-server bench`` flags and the run: systems in interleaved rounds, then the probes, then the report."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .context import Bench
from .probes import PROBES
from .report import machine, markdown, plot, summarize
from .systems import SYSTEMS

__all__ = ["add_bench_arguments", "main", "run_bench"]

EXIT_USAGE = 2


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    default_extras = ",".join(name for name, probe in PROBES.items() if probe.default)
    p.add_argument("--data", default=None,
                   help="image folder or list file (default: generated sample data); try ../shared/corpus")
    p.add_argument("--images", type=int, default=8192, help="images timed per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the side-by-side systems")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    p.add_argument("--size", default="224x224", help="output WIDTHxHEIGHT")
    p.add_argument("--workers", type=int, default=2, help="workers of the service and of torch DataLoader")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    p.add_argument("--extras", default=default_extras,
                   help=f"one-off measurements to add: {','.join(PROBES)} (or none)")
    p.add_argument("--scaling", default="1,2,4,8", help="worker counts for the scaling table")
    p.add_argument("--read-latency-ms", type=float, default=20.0, help="simulated storage latency (slow extra)")
    p.add_argument("--train-models", default="resnet50,resnet18",
                   help="torchvision models trained by the train extra, comma-separated (tiny: a two-layer CNN)")
    p.add_argument("--train-device", default="cuda", help="where the train extra trains: cuda (skipped without "
                   "one) or cpu")
    p.add_argument("--serve-args", default="", help="extra `serve` flags for every service run, quoted")
    p.add_argument("--out", default="bench-results", help="folder for results.json, results.md, results.png")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: tiny data, 1 round, few images")


def main(argv: Sequence[str], prog: str = "loader-server bench") -> int:
    """The benchmark's command line (`loader-server bench` hands it every word after ``bench``)."""
    from loader_server.arguments import HelpFormatter

    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description="Benchmark the service against the per-core limit, the classic "
                                                 "generator and torch DataLoader; write JSON, a markdown table and "
                                                 "a plot.")
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))


def _choices(text: str, known: dict[str, Any], flag: str) -> list[str] | None:
    """The comma-separated names of `text`, or None (after saying so) if one is unknown."""
    names = [] if text in ("", "none") else [v for v in text.split(",") if v]
    for name in names:
        if name not in known:
            print(f"loader-server bench: unknown {flag} value {name!r}; choose from {', '.join(known)}",
                  file=sys.stderr)
            return None
    return names


def run_bench(args: argparse.Namespace) -> int:
    from loader_server.config import parse_size

    size = parse_size(args.size)
    systems = _choices(args.systems, SYSTEMS, "--systems")
    extras = _choices(args.extras, PROBES, "--extras")
    if systems is None or extras is None:
        return EXIT_USAGE
    try:
        scaling = [int(v) for v in args.scaling.split(",") if v]
    except ValueError:
        print(f"loader-server bench: --scaling must be comma-separated worker counts, got {args.scaling!r}",
              file=sys.stderr)
        return EXIT_USAGE
    n, rounds = args.images, args.rounds
    if args.quick:
        n, rounds = min(n, 256), 1
    scratch = tempfile.mkdtemp(prefix="loader-bench-")
    try:
        data = args.data
        if data is None:
            from loader_server.sample_data import write_sample_images

            count = 128 if args.quick else 1024
            data = str(write_sample_images(Path(scratch) / "images", count, min_side=96 if args.quick else 300,
                                           max_side=160 if args.quick else 560))
        dataset = _load(data, args.serve_args.split())
        if dataset.build == "gather":  # array data sets: only the service reads them; the rest decode files
            for name in [s for s in systems if s != "service"]:
                print(f"{name}: skipped (it decodes image files; {data} is an array data set)", flush=True)
            systems = [s for s in systems if s == "service"]
            for name in [e for e in extras if e not in _ARRAY_PROBES]:
                print(f"{name}: skipped (it needs image files; {data} is an array data set)", flush=True)
            extras = [e for e in extras if e in _ARRAY_PROBES]
        bench = Bench(index=dataset, data=data, scratch=scratch, n=n, rounds=rounds, size=size,
                      batch_size=args.batch_size, workers=args.workers, serve_extra=args.serve_args.split(),
                      quick=args.quick, read_latency_ms=args.read_latency_ms, scaling=scaling,
                      train_models=[m for m in args.train_models.split(",") if m], train_device=args.train_device)
        results: dict[str, Any] = {"rounds": {s: [] for s in systems}}
        with tqdm(total=rounds * len(systems), desc="bench", unit="run") as progress:
            for r in range(rounds):
                for s in systems:
                    res = SYSTEMS[s](bench)
                    progress.update()
                    if res is not None:
                        results["rounds"][s].append(res)
                        progress.write(f"round {r + 1}/{rounds} {s:8s} {res['images_per_s']:8.0f} images/s",
                                       file=sys.stdout)
        sys.stdout.flush()
        results["summary"] = {s: summarize(v) for s, v in results["rounds"].items() if v}
        bench.capacity = results["summary"].get("service", {}).get("median")
        for name in (name for name in PROBES if name in extras):
            probe = PROBES[name]
            if probe.needs_capacity and not bench.capacity:
                print(f"{name}: skipped (it compares against the service: add it to --systems)", flush=True)
                continue
            results.update(probe.run(bench))
        results["machine"] = machine()
        results["command"] = "loader-server bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
        results["settings"] = {"data": data if args.data else "generated sample data", "images": len(bench.index),
                               "batch_size": args.batch_size, "size": args.size, "workers": args.workers,
                               "timed_images": n, "rounds": rounds, "serve_args": args.serve_args}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
        table = markdown(results)
        (out / "results.md").write_text(table)
        print(table)
        if plot(results, out / "results.png"):
            print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
        else:
            print(f"wrote {out / 'results.json'}, {out / 'results.md'} (install matplotlib for the plot)")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


#: Probes that work on any data set the service reads (the others decode image files themselves).
_ARRAY_PROBES = frozenset({"stall", "scaling", "curve", "arrays"})


def _load(data: str, serve_args: list[str]) -> Any:
    """The data set as `serve` opens it, with the data settings among --serve-args (labels, subset, ...)."""
    from loader_server.arguments import explicit_serve_flags
    from loader_server.data.datasets import load_dataset
    from loader_server.layered import resolve

    flags = explicit_serve_flags(["--data", data, *serve_args])
    return load_dataset(resolve(flags, None, {})[0])
