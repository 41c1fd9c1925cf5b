#!/bin/bash
# Alternated A/B on ../shared/corpus: main (old) against path23 (new), the service alone;
# the order inside a pair alternates (new first on odd pairs).
cd /tmp/p23/ab
for i in $(seq 1 $1); do
  if [ $((i % 2)) -eq 1 ]; then order="new old"; else order="old new"; fi
  for who in $order; do
    tree=/work/wt/path23; [ $who = old ] && tree=/work/main
    out=$(cd $tree && PYTHONPATH=$tree timeout 600 python -m loader_server bench --data /work/shared/corpus/train.txt --systems service --rounds 1 --extras none --out /tmp/p23/ab/out-$who-$i 2>&1 | grep -o "round 1/1 service *[0-9]* images/s")
    echo "$i $who load=$(cut -d' ' -f1 /proc/loadavg) $out"
  done
done
