#!/bin/bash
# Device check: the README PyTorch session, examples on the GPU, and the train/stall bench.
# Run from the repository root on the GPU box, with ../shared/corpus copied to .gpu/corpus and a
# pyzmq wheel for the box's Python in .gpu/whl (the box has torch, OpenCV, msgpack, numpy).
# The second run (after the dispatch fix) skipped sections 1 and 2.
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
if [ -z "$DRY" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
BENCH="--rounds 2 --batch-size 256 --images 20480 --train-models resnet50,resnet18"
[ -n "$DRY" ] && BENCH="--rounds 1 --batch-size 32 --images 512 --size 32x32 --train-models tiny --train-device cpu"
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m loader_server "$@"\n' > /tmp/bin/loader-server && chmod +x /tmp/bin/loader-server
export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
python3 -c "import sys, torch, torchvision, cv2, zmq, numpy, msgpack; print(sys.version.split()[0], torch.__version__, torchvision.__version__, cv2.__version__, zmq.__version__, numpy.__version__, torch.cuda.is_available())"
echo "=== 1. README PyTorch session (as the test suite runs it)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_readme.py -k "torch" 2>&1 | tail -15
echo "=== 2. examples/torch_loop.py and examples/jax_loop.py on the GPU"
loader-server demo --out /tmp/demo-images --images 512 > /tmp/demo.log 2>&1; tail -2 /tmp/demo.log
loader-server serve --data /tmp/demo-images --size 64x64 --bind tcp://127.0.0.1:5555 > /tmp/serve.log 2>&1 &
SERVER=$!
sleep 3
timeout 90 python3 examples/torch_loop.py --epochs 2 2>&1 | tail -4
timeout 90 python3 examples/jax_loop.py 2>&1 | tail -4
kill -TERM $SERVER; wait $SERVER; echo "server exit $?"; tail -2 /tmp/serve.log
echo "=== 3. bench: side by side, stall at 80% (default workers = CPUs - 1), training on the GPU"
W=$(( $(nproc) - 1 ))
timeout 420 python3 -m loader_server bench --data .gpu/corpus/train.txt --systems percore,service,torch \
  --workers $W $BENCH --extras stall,train --out "$OUT/gpu" 2>&1 \
  | grep -v "^bench:" | tail -60
