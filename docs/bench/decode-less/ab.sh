#!/bin/bash
# Side by side: main before issue 25 (BASE, a `git worktree add --detach` of the branch point) and
# this tree (NEW), alternated run by run, each with its own PYTHONPATH.
#   BASE=/tmp/decode25-base NEW=$PWD SHARED=/work/shared RUNS=5 docs/bench/decode-less/ab.sh
# 1. CPU ms per image in one process (cpu_per_image.py), both corpora, plain and --augment rrc,flip.
# 2. End to end: `loader-server bench --systems service` of both trees, and torch DataLoader with
#    OpenCV (`torch`) and with the torchvision-style Pillow decode (`torchvision`), wall images/s.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
for i in $(seq 1 "${RUNS:-5}"); do
  for corpus in corpus-large corpus; do
    n=1024; [ $corpus = corpus ] && n=4096
    for aug in "" "rrc,flip"; do
      for side in base new; do
        tree=$BASE; [ $side = new ] && tree=$NEW
        echo "cpu $i $corpus aug=${aug:-none} $side $(cd /tmp && PYTHONPATH=$tree timeout 900 python \
            "$HERE/cpu_per_image.py" "$SHARED/$corpus/train.txt" "$aug" $n)"
      done
    done
  done
done
for i in $(seq 1 "${E2E_RUNS:-2}"); do
  for corpus in corpus-large corpus; do
    for aug in "" "rrc,flip"; do
      extra=(); [ -n "$aug" ] && extra=(--serve-args "--augment $aug")
      for side in base new; do
        tree=$BASE; systems=service
        [ $side = new ] && tree=$NEW && systems=service,torch,torchvision
        load=$(cut -d' ' -f1 /proc/loadavg)
        (cd "$tree" && PYTHONPATH=$tree timeout 1200 python -m loader_server bench --data "$SHARED/$corpus/train.txt" \
            --systems $systems --rounds 1 --images 2048 --extras none "${extra[@]}" --out "$OUT/$side" \
            > "$OUT/$side.log" 2>&1)
        echo "e2e $i $corpus aug=${aug:-none} $side load=$load $(python3 -c "
import json; s = json.load(open('$OUT/$side/results.json'))['summary']
print(' '.join(f'{k}={round(v[\"median\"])}' for k, v in s.items()))")"
      done
    done
  done
done
rm -rf "$OUT"
