"""What a benchmark run writes: the summary of the rounds, the machine, the markdown table, the plot."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .probes import PROBES
from .systems import SYSTEMS

__all__ = ["machine", "markdown", "plot", "summarize"]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max images/s of one system's rounds, and the medians of its other figures."""
    rates = [r["images_per_s"] for r in runs]
    out: dict[str, Any] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
    for key in ("next_p50_ms", "next_p99_ms", "time_to_first_batch_s", "peak_pss_mb", "cpu_ms_per_image"):
        if key in runs[0]:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def machine() -> dict[str, Any]:
    import cv2

    return {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "opencv": cv2.__version__,
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def markdown(results: dict[str, Any]) -> str:
    """The markdown report of a result dict."""
    s = results["summary"]
    percore = s.get("percore", {}).get("median")
    workers = results["settings"]["workers"]  # the per-core limit times the cores the workers use
    lines = [f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}, "
             f"Python {results['machine']['python']}, OpenCV {results['machine']['opencv']}, "
             f"{results['machine']['date']}.  ",
             f"Command: `{results['command'] or 'loader-server bench'}`  ",
             f"Settings: {json.dumps(results['settings'])}", "",
             f"| system | images/s (median) | min–max | ratio to {workers} x per-core | service ratio to it |",
             "|---|---|---|---|---|"]
    service = s.get("service", {}).get("median")
    for name in SYSTEMS:
        if name not in s:
            continue
        v = s[name]
        vs_core = f"{v['median'] / (workers * percore):.2f}" if percore else "–"
        ratio = f"{service / v['median']:.2f}x" if service and name != "service" else "–"
        lines.append(f"| {name} | {v['median']:.0f} | {v['min']:.0f}–{v['max']:.0f} | {vs_core} | {ratio} |")
    lines.append("")
    if "service" in s:
        v = s["service"]
        lines.append(f"Service: next() p50 {v['next_p50_ms']:.3f} ms, p99 {v['next_p99_ms']:.3f} ms (consumer "
                     f"never pauses, so it waits on the loader); time to first batch "
                     f"{v['time_to_first_batch_s']:.2f} s; peak PSS of server + workers {v['peak_pss_mb']:.0f} MB.")
    rows = [row for probe in PROBES.values() for row in probe.rows(results)]
    if rows:
        lines += ["", "| measurement | result |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    for probe in PROBES.values():
        lines += probe.tables(results)
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """The bar chart of the systems (and the scaling curve); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = results["summary"]
    names = [n for n in SYSTEMS if n in s]
    fig, axes = plt.subplots(1, 2 if "scaling" in results else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0][0]
    med = [s[n]["median"] for n in names]
    err = [[s[n]["median"] - s[n]["min"] for n in names], [s[n]["max"] - s[n]["median"] for n in names]]
    ax.bar(names, med, yerr=err, capsize=4, color=["#999", "#2a7", "#c66", "#68c"][: len(names)])
    if "percore" in s:
        workers = results["settings"]["workers"]
        ax.axhline(workers * s["percore"]["median"], ls="--", color="k", lw=1, label=f"{workers} x per-core limit")
        ax.legend()
    ax.set_ylabel("images/s")
    ax.set_title(f"{results['settings']['workers']} workers, batch {results['settings']['batch_size']}, "
                 f"{results['settings']['size']}")
    if "scaling" in results:
        ax2 = axes[0][1]
        ws = list(results["scaling"])
        ax2.plot([int(w) for w in ws], [results["scaling"][w]["images_per_s"] for w in ws], "o-")
        ax2.set_xlabel("workers")
        ax2.set_ylabel("images/s")
        ax2.set_title(f"scaling on {results['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
