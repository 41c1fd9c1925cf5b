"""The comparison table of docs/benchmarks.md ("Pipelined range reads") from `loader-server bench --extras s3` runs.

    python docs/bench/s3-cpu/pipe26b/table.py main1=docs/bench/s3-cpu/pipe26b/main1.md b1=.../b1.md ...

Each cell: a run's ratio to local disk (the median of its rounds) and, in brackets, the loader's CPU ms per image.
"""

from __future__ import annotations

import re
import sys

ROWS = ["s3 +0 ms", "s3 +20 ms", "s3 +100 ms", "s3 +100 ms, recommended", "s3 +100 ms, cache"]


def main(runs: list[str]) -> None:
    print("| run (UTC, load) | local CPU ms/image | " + " | ".join(f"{x}: ratio (CPU ms/image)" for x in ROWS)
          + " | requests/s +20 ms | bytes on the link +20 / +100 ms, mean / max |")
    print("|---" * (len(ROWS) + 4) + "|")
    for run in runs:
        name, path = run.split("=", 1)
        text = open(path).read()
        when = re.search(r"2026-12-07 (\d\d:\d\d)", text)
        cells = {}
        for line in text.splitlines():
            if line.startswith(("| local", "| s3")):
                c = [x.strip() for x in line.split("|")[1:-1]]
                cells[c[0]] = c
        loads = [float(c[-1]) for c in cells.values()]
        print(f"| {name} ({when.group(1) if when else '?'}, load {min(loads):.1f}-{max(loads):.1f}) | "
              f"{cells['local'][5]} | " + " | ".join(f"{cells[x][3]} ({cells[x][5]})" for x in ROWS)
              + f" | {cells['s3 +20 ms'][6]} | {cells['s3 +20 ms'][7]} / {cells['s3 +100 ms'][7]} |")


if __name__ == "__main__":
    main(sys.argv[1:])
