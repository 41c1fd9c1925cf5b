"""A trainer stand-in run as a separate process by the tests.

    python -m tests.stream_consumer ENDPOINT OUT_JSONL [--state FILE] [--rank R --world-size N] [--batches K]
                                    [--die-after K] [--share NAME] [--step-s S] [--hold]

For every batch it appends {epoch, batch, indices, digest} to OUT_JSONL, then saves the
client's state to --state (atomically), like a trainer checkpointing after each step.
`--die-after K` SIGKILLs this process right after the K-th batch is recorded and saved: a
trainer killed at a point the test knows without reading the saved state. `--hold` keeps every
batch's arrays (a trainer that holds on to them: with shared memory, each one's slot stays its).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import time

from loader_client import LoaderClient


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("endpoint")
    p.add_argument("out")
    p.add_argument("--state", default=None)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--share", default=None, help="join the server's share of this name")
    p.add_argument("--step-s", type=float, default=0.0, help="a training step: sleep this long after each batch")
    p.add_argument("--hold", action="store_true", help="keep every batch's arrays until the end")
    args = p.parse_args()
    state = None
    if args.state and os.path.exists(args.state):
        with open(args.state) as f:
            state = json.load(f)
    kwargs = {"state": state} if state else {"rank": args.rank, "world_size": args.world_size}
    if args.share:
        kwargs["share"] = args.share
    held = []
    with LoaderClient(args.endpoint, timeout_s=args.timeout_s, **kwargs) as client, open(args.out, "a") as out:
        total = args.batches if args.batches is not None else 10**9
        for _, (x, y) in zip(range(total), client, strict=False):
            info = client.last
            assert info is not None
            digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
            out.write(json.dumps({"epoch": info.epoch, "batch": info.batch, "indices": info.indices.tolist(),
                                  "digest": digest}) + "\n")
            out.flush()
            if args.hold:
                held.append((x, y))
            if args.state:
                tmp = args.state + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(client.state_dict(), f)
                os.replace(tmp, args.state)
            if args.die_after is not None and client.batches_taken == args.die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.step_s:
                time.sleep(args.step_s)


if __name__ == "__main__":
    main()
