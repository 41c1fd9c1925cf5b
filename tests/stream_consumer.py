"""A trainer stand-in run as a separate process by the tests.

    python -m tests.stream_consumer ENDPOINT OUT_JSONL [--state FILE] [--rank R --world-size N] [--batches K]
                                    [--die-after K] [--share NAME] [--step-s S] [--hold] [--fork-hold FILE]

For every batch it appends {epoch, batch, indices, digest} to OUT_JSONL, then saves the
client's state to --state (atomically), like a trainer checkpointing after each step.
`--die-after K` SIGKILLs this process right after the K-th batch is recorded and saved: a
trainer killed at a point the test knows without reading the saved state. `--hold` keeps every
batch's arrays (a trainer that holds on to them: with shared memory, each one's slot stays its).
`--fork-hold FILE`, with --die-after: right before it is killed, it forks a child that keeps the batches
held (a data-loader worker forked after connecting: it inherits the mapping and the connection, and uses
neither's socket), writes its pid to FILE.pid, and exits once FILE exists (at most 120 s).
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
    p.add_argument("--fork-hold", default=None, help="fork a child holding the batches before --die-after")
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
                if args.fork_hold:
                    child = os.fork()
                    if child == 0:  # holds `held`, touches nothing of the client's
                        devnull = os.open(os.devnull, os.O_RDWR)
                        for fd in (0, 1, 2):  # (the test waits for its parent's output to end)
                            os.dup2(devnull, fd)
                        deadline = time.monotonic() + 120
                        while not os.path.exists(args.fork_hold) and time.monotonic() < deadline:
                            time.sleep(0.05)
                        os._exit(0 if held else 1)
                    with open(args.fork_hold + ".pid.tmp", "w") as f:
                        f.write(str(child))
                    os.replace(args.fork_hold + ".pid.tmp", args.fork_hold + ".pid")
                os.kill(os.getpid(), signal.SIGKILL)
            if args.step_s:
                time.sleep(args.step_s)


if __name__ == "__main__":
    main()
