"""``loader-server bench``: side-by-side throughput of loader-service and the usual alternatives.

One run measures, interleaved and repeated in rounds so that drift hits every system alike, the
*systems* (`systems.SYSTEMS`: per-core limit, the service, the classic generator, torch
DataLoader), then once each the *probes* chosen with ``--extras`` (`probes.PROBES`: data stall,
float32, slow storage, augmentations, ..., the CPU cost of each stage), and writes the *report*
(`report`: results.json, results.md and, with matplotlib, results.png).

A new measurement is one `Probe` in `probes.PROBES`: its function, and the rows it adds to the
markdown report. ``loader-server bench ARGS`` loads this package by name and calls `main` with
ARGS: the product never imports its benchmark.
"""

from __future__ import annotations

from .cli import add_bench_arguments, main, run_bench

__all__ = ["add_bench_arguments", "main", "run_bench"]
