"""Images/s of the compose pair (TCP frames; ipc socket + shared-memory arena) beside same-host.

    python docker/bench_compose.py --data ../shared/corpus/train.txt --rounds 9

Runs from the repository root after the README's `docker compose build` (tests/test_docker.py
builds the images too). Three servers run at once with the benchmark's settings (224x224 uint8,
batches of 64, 2 workers), idle between turns: `same-host` (server and examples/consume.py as
processes on this machine, ipc:// and shared memory), `compose ipc + arena` (the compose file as
shipped; the consumer runs in the trainer container) and `compose tcp` (LOADER_BIND on TCP,
frames over the compose network). Each round gives each way one turn, in rotating order; a turn
consumes `--epochs` epochs on a fresh connection and counts all but the first. On a shared
machine the load changes from second to second, so besides the medians it prints the median of
the per-round ratios to same-host (turns a few seconds apart). Uses tests/docker_support.py for
`docker compose` on an engine without the compose v2 plugin.
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


CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")  # cgroup v1, as on the machine these numbers come from
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


def cpu_ns(groups: list[Path]) -> int | None:
    """CPU time used so far by every process of these v1 cpuacct cgroups, in nanoseconds."""
    try:
        return sum(int((group / "cpuacct.usage").read_text()) for group in groups) if groups else None
    except OSError:
        return None


class SameHost:
    """Server and consumer as processes on this machine (ipc://, shared memory).

    Docker puts every container under one `docker` CPU cgroup, which competes with each other
    process at the top level as a single task of the same weight. On a machine shared with other
    busy processes the pair would get less CPU than the same work run as plain processes. So,
    where it can (root, cgroup v1), the same-host processes run in a cgroup of their own beside
    `docker`, with the same weight: both ways then compete for the CPU alike. The cgroups also
    count the CPU time each way spends, which the load of other processes does not change.
    """

    accounting: Path | None = CPUACCT / "loaderbench-samehost"

    def __init__(self, data: Path, settings: dict[str, str], folder: Path) -> None:
        self.endpoint = f"ipc://{folder}/loader.sock"
        self.cgroup: Path | None = CPU_CGROUPS / "loaderbench-samehost"
        try:
            self.cgroup.mkdir(exist_ok=True)
            (self.cgroup / "cpu.shares").write_text((CPU_CGROUPS / "docker/cpu.shares").read_text())
        except OSError:
            self.cgroup = None
        try:
            self.accounting.mkdir(exist_ok=True)  # type: ignore[union-attr]
        except OSError:
            self.accounting = None
        self.server = subprocess.Popen([sys.executable, "-m", "loader_server", "serve", "--data", str(data),
                                        "--bind", self.endpoint, "--log-interval-s", "0"],
                                       env={**os.environ, **settings}, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, preexec_fn=self._join)

    def _join(self) -> None:
        for group in (self.cgroup, self.accounting):
            if group is not None:
                (group / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_ns(self) -> int | None:
        return cpu_ns([self.accounting] if self.accounting else [])

    def consume(self, epochs: int) -> str:
        return subprocess.run([sys.executable, str(ROOT / "examples/consume.py"), "--endpoint", self.endpoint,
                               "--epochs", str(epochs)], capture_output=True, text=True, timeout=600,
                              check=True, preexec_fn=self._join).stdout

    def stop(self) -> None:
        self.server.terminate()
        self.server.wait(30)
        time.sleep(0.5)  # the workers exit with the server
        for group in (self.cgroup, self.accounting):
            if group is not None:
                try:
                    group.rmdir()
                except OSError as exc:
                    print(f"could not remove {group}: {exc}", file=sys.stderr)


class Compose:
    """The compose pair as shipped (ipc socket + arena), or with LOADER_BIND on TCP (frames)."""


    def __init__(self, data: Path, settings: dict[str, str], folder: Path, tcp: bool) -> None:
        extra = {"LOADER_BIND": "tcp://0.0.0.0:5555", "LOADER_ENDPOINT": "tcp://loader:5555"} if tcp else {}
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOADER_", "COMPOSE_"))}
        self.env = docker_support.env(folder, clean, COMPOSE_FILE="docker/compose.yaml",
                                      COMPOSE_PROJECT_NAME=f"loaderbench{'tcp' if tcp else 'ipc'}",
                                      DATASET_DIR=str(data.parent), LOADER_DATA=f"/data/{data.name}",
                                      **settings, **extra)
        self.sh("docker compose up --detach loader")
        self.loader = self.sh("docker compose ps --all --quiet loader").strip()
        # One trainer container for every turn, each turn a `docker exec` in it: its cgroup then
        # counts the CPU time of all of them, as the host's cgroup does for same-host.
        self.trainer = self.sh("docker compose run --detach trainer sleep infinity").strip().splitlines()[-1]
        self.groups = [CPUACCT / "docker" / self.sh(f"docker inspect -f '{{{{.Id}}}}' {c}").strip()
                       for c in (self.loader, self.trainer)]

    def sh(self, line: str) -> str:
        return subprocess.run(["bash", "-c", line], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=600, check=True).stdout

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 120
        while self.sh(f"docker inspect -f '{{{{.State.Health.Status}}}}' {self.loader}").strip() != "healthy":
            assert time.monotonic() < deadline, "the loader never became healthy"
            time.sleep(0.5)

    def consume(self, epochs: int) -> str:
        return self.sh(f"docker exec {self.trainer} python /app/examples/consume.py --epochs {epochs}")

    def cpu_ns(self) -> int | None:
        return cpu_ns(self.groups)

    def stop(self) -> None:
        subprocess.run(["bash", "-c", f"docker rm --force {self.trainer}"], cwd=ROOT, env=self.env,
                       capture_output=True, timeout=300, check=False)
        subprocess.run(["bash", "-c", "docker compose down --volumes"], cwd=ROOT, env=self.env,
                       capture_output=True, timeout=300, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/corpus/train.txt",
                        help="a list file; its folder is mounted at /data")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--epochs", type=int, default=3, help="per turn; the first is warm-up")
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--size", default="224x224")
    parser.add_argument("--workers", default="2")
    args = parser.parse_args()
    data = args.data.resolve()
    settings = {"LOADER_BATCH_SIZE": args.batch_size, "LOADER_SIZE": args.size, "LOADER_WORKERS": args.workers}
    names = ["same-host (ipc, shared memory)", "compose ipc + arena", "compose tcp"]
    results: dict[str, list[float]] = {name: [] for name in names}
    shm: dict[str, bool] = {}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        ways: dict[str, SameHost | Compose] = {}
        try:  # all three servers up at once, idle between turns, so that turns can alternate quickly
            ways[names[0]] = SameHost(data, settings, Path(tmp))
            ways[names[1]] = Compose(data, settings, Path(tmp) / "bin", tcp=False)
            ways[names[2]] = Compose(data, settings, Path(tmp) / "bin", tcp=True)
            for way in ways.values():
                if isinstance(way, Compose):
                    way.wait_healthy()
            for r in range(args.rounds):
                order = names[r % 3:] + names[:r % 3]  # each way goes first, second and third in turn
                for name in order:
                    before = ways[name].cpu_ns()
                    out = ways[name].consume(args.epochs)
                    after = ways[name].cpu_ns()
                    rate, shm[name] = consumed_rate(out)
                    results[name].append(rate)
                    images = sum(int(n) for n in re.findall(r"epoch \d+: (\d+) images", out))
                    if before is not None and after is not None:
                        cpu[name].append((after - before) / 1e6 / images)
                    print(f"round {r + 1}: {name}: {rate:.0f} images/s, "
                          f"{cpu[name][-1] if cpu[name] else float('nan'):.2f} CPU ms per image, "
                          f"shared memory {shm[name]}", file=sys.stderr, flush=True)
        finally:
            for way in ways.values():
                way.stop()
    base = statistics.median(results["same-host (ipc, shared memory)"])
    print(f"Command: `python docker/bench_compose.py --data {args.data} --rounds {args.rounds} --epochs {args.epochs}`\n")
    print("| how | images/s (median) | min–max | shared memory | ratio of medians | median of per-round ratios "
          "| CPU ms per image (median, whole turn) | its ratio |")
    print("|---|---|---|---|---|---|---|---|")
    base_cpu = statistics.median(cpu[names[0]]) if cpu[names[0]] else float("nan")
    for name, rates in results.items():
        median = statistics.median(rates)
        paired = statistics.median(r / h for r, h in zip(rates, results[names[0]], strict=True))
        ms = statistics.median(cpu[name]) if cpu[name] else float("nan")
        print(f"| {name} | {median:.0f} | {min(rates):.0f}–{max(rates):.0f} | {shm[name]} | {median / base:.2f} "
              f"| {paired:.2f} | {ms:.2f} | {ms / base_cpu:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
