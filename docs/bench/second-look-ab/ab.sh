#!/bin/bash
# Side by side: the previous release (BASE, a `git worktree add` of its commit) and this tree (NEW),
# alternated, each with its own PYTHONPATH. Prints one line a run: throughput medians of
# `loader-server bench` (3 rounds each), then CPU time per batch (cpu_per_batch.py), with the load.
#   BASE=/work/wt/client24-base NEW=$PWD CORPUS=/work/shared/corpus RUNS=8 docs/bench/second-look-ab/ab.sh
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
for i in $(seq 1 "${RUNS:-8}"); do
  for side in base new; do
    tree=$BASE; [ $side = new ] && tree=$NEW
    load=$(cut -d' ' -f1 /proc/loadavg)
    (cd "$tree" && PYTHONPATH=$tree timeout 600 python -m loader_server bench --data "$CORPUS/train.txt" \
        --systems service --rounds 3 --extras none --out "$OUT/$side-$i" > "$OUT/$side-$i.log" 2>&1)
    echo "bench $i $side $(python3 -c "import json; print(round(json.load(open('$OUT/$side-$i/results.json'))['summary']['service']['median']))") load=$load"
  done
done
for i in $(seq 1 "${RUNS:-8}"); do
  for side in base new; do
    tree=$BASE; [ $side = new ] && tree=$NEW
    echo "cpu $i $side $(cd /tmp && PYTHONPATH=$tree CORPUS=$CORPUS timeout 300 python "$HERE/cpu_per_batch.py" 150)"
  done
done
rm -rf "$OUT"
