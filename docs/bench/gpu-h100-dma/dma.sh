#!/bin/bash
# Device check of the DMA path: the GPU test (bitwise), then the train probe with both service feeds.
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
echo "=== GPU tests"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_torch_gpu.py 2>&1 | tail -8
echo "=== train probe: service (DMA from the registered arena) vs pinned copy"
timeout 300 python3 -m loader_server bench --data .gpu/corpus/train.txt --systems service --rounds 1 --workers 15 \
  --batch-size 256 --images 20480 --extras train --train-models resnet18,resnet50 --out "$OUT/gpu" 2>&1 \
  | tr '\r' '\n' | grep -aEv "^bench:|^\s*$" | tail -30
