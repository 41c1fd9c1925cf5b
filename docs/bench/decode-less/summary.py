"""Medians of an ab.sh log: CPU ms per image and wall images/s per side, and new against base.

    python docs/bench/decode-less/summary.py ab.log
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict


def main(path: str) -> None:
    cpu: dict[tuple[str, str, str], list[dict[str, float]]] = defaultdict(list)
    e2e: dict[tuple[str, str, str], list[dict[str, float]]] = defaultdict(list)
    for line in open(path):
        parts = line.split(maxsplit=5)
        if parts and parts[0] == "cpu" and len(parts) == 6 and parts[5].startswith("{"):
            cpu[(parts[2], parts[3], parts[4])].append(json.loads(parts[5]))
        elif parts and parts[0] == "e2e":
            m = dict(re.findall(r"(\w+)=([\d.]+)", line))
            e2e[(parts[2], parts[3], parts[4])].append({k: float(v) for k, v in m.items()})
    print("| corpus | augment | CPU ms per image, base (runs) | new (runs) | base/new (median of runs' ratios) "
          "| wall images/s in-process, base / new | load (1 min) |")
    print("|---|---|---|---|---|---|---|")
    for corpus, aug in sorted({(c, a) for c, a, _ in cpu}):
        b, n = cpu[(corpus, aug, "base")], cpu[(corpus, aug, "new")]
        ratios = [x["cpu_ms"] / y["cpu_ms"] for x, y in zip(b, n, strict=False)]
        loads = [r["load"] for r in b + n]
        runs_b = ", ".join(f"{r['cpu_ms']:.2f}" for r in b)
        runs_n = ", ".join(f"{r['cpu_ms']:.2f}" for r in n)
        print(f"| {corpus} | {aug} | {statistics.median(r['cpu_ms'] for r in b):.3f} "
              f"({runs_b}) | {statistics.median(r['cpu_ms'] for r in n):.3f} "
              f"({runs_n}) | **{statistics.median(ratios):.2f}x** "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {statistics.median(r['images_per_s'] for r in b):.0f} / "
              f"{statistics.median(r['images_per_s'] for r in n):.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    if e2e:
        print()
        print("| corpus | augment | service base | service new | torch (OpenCV) | torchvision-style (Pillow) "
              "| load (1 min) |")
        print("|---|---|---|---|---|---|---|")
        for corpus, aug in sorted({(c, a) for c, a, _ in e2e}):
            b, n = e2e[(corpus, aug, "base")], e2e[(corpus, aug, "new")]

            def col(rows: list[dict[str, float]], key: str) -> str:
                v = [r[key] for r in rows if key in r]
                return ", ".join(f"{x:.0f}" for x in v) or "–"

            print(f"| {corpus} | {aug} | {col(b, 'service')} | {col(n, 'service')} | {col(n, 'torch')} | "
                  f"{col(n, 'torchvision')} | {col(b + n, 'load')} |")


if __name__ == "__main__":
    main(sys.argv[1])
