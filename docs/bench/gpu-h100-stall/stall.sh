#!/bin/bash
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
for rep in 1 2 3; do
  for cache in "" "--cache memory"; do
    echo "=== workers 15 cache '$cache' rep $rep"
    timeout 100 python3 -m loader_server bench --data .gpu/corpus/train.txt --systems service --rounds 1 --workers 15 \
      --batch-size 256 --images 81920 --extras stall --serve-args "$cache" --out "/tmp/stall-$rep${cache:+-cache}" 2>&1 | tr '\r' '\n' | grep -aE "^round|^stall"
  done
done
