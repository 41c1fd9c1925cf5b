"""A simulated trainer, run as its own process by the ``share`` and ``autoscale`` probes.

    python -m loader_bench.trainers ENDPOINT OUT_JSON [--share NAME] [--seconds T]
                                    [--steps MS@S,MS@S,...] [--pause-at-s S --pause-s D]

It takes batches for `--seconds` seconds (from its first batch), touching one byte of each, with
a simulated training step after each (a sleep: a GPU trainer's thread waits in the device sync,
leaving the CPU to the loader). ``--steps 80@0,27@20`` is the step schedule: 80 ms from second 0,
27 ms from second 20. ``--pause-at-s``/``--pause-s`` stop taking batches for a while (a trainer
evaluating or checkpointing). It writes OUT_JSON: the monotonic time (``time.monotonic()``, the
same clock in every process of the host) at which each batch arrived, the seconds waited for it,
and the images in it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from loader_client import LoaderClient

__all__ = ["main", "parse_steps"]


def parse_steps(text: str) -> list[tuple[float, float]]:
    """``MS@S,...`` -> [(from second, step seconds), ...] in time order."""
    out = []
    for item in text.split(","):
        ms, _, at = item.partition("@")
        out.append((float(at or 0), float(ms) / 1000))
    return sorted(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loader_bench.trainers")
    p.add_argument("endpoint")
    p.add_argument("out")
    p.add_argument("--share", default=None)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--steps", default="0@0", help="step schedule: MS@SECOND,... (module doc)")
    p.add_argument("--pause-at-s", type=float, default=None)
    p.add_argument("--pause-s", type=float, default=0.0)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--name", default=None, help="how the server's log and stats name this trainer")
    args = p.parse_args(argv)
    steps = parse_steps(args.steps)
    times: list[float] = []
    waits: list[float] = []
    images = 0
    touched = 0
    with LoaderClient(args.endpoint, share=args.share, prefetch=args.prefetch, timeout_s=args.timeout_s,
                      name=args.name) as client:
        started = None
        paused = False
        while True:
            t0 = time.monotonic()
            x = client.next()[0]
            t1 = time.monotonic()
            started = t1 if started is None else started
            times.append(t1)
            waits.append(t1 - t0)
            images = len(x)
            touched += int(x.reshape(-1)[0])
            del x
            elapsed = t1 - started
            if elapsed >= args.seconds:
                break
            if args.pause_at_s is not None and not paused and elapsed >= args.pause_at_s:
                paused = True
                time.sleep(args.pause_s)
                continue
            step = next((s for at, s in reversed(steps) if elapsed >= at), 0.0)
            if step:
                time.sleep(step)
        stats = client.stats(server=False)
    with open(args.out, "w") as f:
        json.dump({"times": times, "waits": waits, "images": images, "share": args.share,
                   "stall_fraction": stats["stall_fraction"], "shared_memory": client.shared_memory}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
