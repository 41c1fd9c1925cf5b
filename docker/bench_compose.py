"""Images/s of the compose pair (TCP frames; ipc socket + shared-memory arena) beside same-host.

    python docker/bench_compose.py --data ../shared/corpus/train.txt --rounds 3

Runs from the repository root after the README's `docker compose build` (tests/test_docker.py
builds the images too). Every round measures three ways, interleaved, with the benchmark's
settings (224x224 uint8, batches of 64, 2 workers): `same-host` (server and examples/consume.py
as processes on this machine, ipc:// and shared memory), `compose ipc+arena` (the compose file
as shipped) and `compose tcp` (LOADER_BIND=tcp://0.0.0.0:5555, frames over the socket). The
consumer takes `--epochs` epochs; the first is warm-up and not counted. Prints a markdown table
of medians over the rounds. Uses tests/docker_support.py for `docker compose` on an engine
without the compose v2 plugin.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import docker_support  # noqa: E402 - test machinery beside this repository


def consumed_rate(output: str) -> tuple[float, bool]:
    """Images/s over every epoch after the first, and whether the client used shared memory."""
    epochs = [(int(n), float(r)) for n, r in re.findall(r"epoch \d+: (\d+) images, (\d+) images/s", output)]
    assert len(epochs) >= 2, output
    timed = epochs[1:]
    images = sum(n for n, _ in timed)
    return images / sum(n / r for n, r in timed), "shared memory True" in output


def same_host(data: Path, settings: dict[str, str], epochs: int) -> tuple[float, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/loader.sock"
        server = subprocess.Popen([sys.executable, "-m", "loader_server", "serve", "--data", str(data),
                                   "--bind", endpoint, "--log-interval-s", "0"],
                                  env={**os.environ, **settings}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            out = subprocess.run([sys.executable, str(ROOT / "examples/consume.py"), "--endpoint", endpoint,
                                  "--epochs", str(epochs)], capture_output=True, text=True, timeout=600, check=True)
        finally:
            server.terminate()
            server.wait(30)
    return consumed_rate(out.stdout)


def compose(data: Path, settings: dict[str, str], epochs: int, tcp: bool, folder: Path) -> tuple[float, bool]:
    extra = {"LOADER_BIND": "tcp://0.0.0.0:5555", "LOADER_ENDPOINT": "tcp://loader:5555"} if tcp else {}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOADER_", "COMPOSE_"))}
    env = docker_support.env(folder, clean, COMPOSE_FILE="docker/compose.yaml", COMPOSE_PROJECT_NAME="loaderbench",
                             DATASET_DIR=str(data.parent), LOADER_DATA=f"/data/{data.name}", **settings, **extra)

    def sh(line: str) -> str:
        return subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=600, check=True).stdout

    try:
        sh("docker compose up --detach loader")
        loader = sh("docker compose ps --all --quiet loader").strip()
        deadline = time.monotonic() + 120
        while sh(f"docker inspect -f '{{{{.State.Health.Status}}}}' {loader}").strip() != "healthy":
            assert time.monotonic() < deadline, "the loader never became healthy"
            time.sleep(0.5)
        out = sh(f"docker compose run --rm trainer python /app/examples/consume.py --epochs {epochs}")
    finally:
        subprocess.run(["bash", "-c", "docker compose down --volumes"], cwd=ROOT, env=env, capture_output=True,
                       timeout=300, check=False)
    return consumed_rate(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/corpus/train.txt",
                        help="a list file; its folder is mounted at /data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="per measurement; the first is warm-up")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--size", default="224x224")
    parser.add_argument("--workers", default="2")
    args = parser.parse_args()
    data = args.data.resolve()
    settings = {"LOADER_BATCH_SIZE": args.batch_size, "LOADER_SIZE": args.size, "LOADER_WORKERS": args.workers}
    results: dict[str, list[float]] = {"same-host (ipc, shared memory)": [], "compose ipc + arena": [], "compose tcp": []}
    shm: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, measure in (
                ("same-host (ipc, shared memory)", lambda: same_host(data, settings, args.epochs)),
                ("compose ipc + arena", lambda: compose(data, settings, args.epochs, False, Path(tmp))),
                ("compose tcp", lambda: compose(data, settings, args.epochs, True, Path(tmp))),
            ):
                rate, shm[name] = measure()
                results[name].append(rate)
                print(f"round {r + 1}: {name}: {rate:.0f} images/s, shared memory {shm[name]}", file=sys.stderr, flush=True)
    base = statistics.median(results["same-host (ipc, shared memory)"])
    print(f"Command: `python docker/bench_compose.py --data {args.data} --rounds {args.rounds} --epochs {args.epochs}`\n")
    print("| how | images/s (median) | min–max | shared memory | ratio to same-host |\n|---|---|---|---|---|")
    for name, rates in results.items():
        median = statistics.median(rates)
        print(f"| {name} | {median:.0f} | {min(rates):.0f}–{max(rates):.0f} | {shm[name]} | {median / base:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
