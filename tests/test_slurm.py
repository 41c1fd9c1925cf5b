"""deploy/slurm/ on a real Slurm cluster: 3 node daemons on this machine (tests/slurm_support.py).

Layout 1 (a loader beside the trainers on every node, ipc + shared memory) trains a tiny model
with 2 nodes x 2 ranks for 2 epochs; layout 2 (a pool of one loader node feeding 2 trainer nodes
over TCP with CURVE) has its loader step killed mid-epoch. In both every rank's samples are
checked exactly once per epoch (tests/record_batches.py records what each rank's client
returned), and `scancel` leaves no process of the job on any node.

The cluster is started once for this module and stopped after it. Under CI=true a missing
Slurm is a failure; elsewhere these tests skip with the reason (`bash .ci/provision` installs it).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loader_client import AuthenticationError, LoaderClient, LoaderError, health

from . import slurm_support
from .conftest import free_port, keygen, wait_until
from .record_batches import check_exactly_once, read_records
from .test_readme import write_listfile

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "slurm"
BATCH = 8
JOB_TIMEOUT_S = 300


def unavailable(exc: slurm_support.NoSlurm) -> None:
    """Under CI=true a missing Slurm is a failure; elsewhere a skip with the reason."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs Slurm: {exc}")
    pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cluster() -> Iterator[slurm_support.SlurmCluster]:
    try:
        started = slurm_support.start_cluster()
    except slurm_support.NoSlurm as exc:
        unavailable(exc)
    try:
        yield started
    finally:
        killed = started.stop()
        shutil.rmtree(started.root, ignore_errors=True)
    assert not [k for k in killed if not k.startswith(("slurmd", "slurmctld", "munged"))], \
        f"processes outlived the cluster: {killed}"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 learnable images: 10 batches of 8 per rank and epoch with 4 ranks."""
    return write_listfile(tmp_path_factory.mktemp("slurm-data"), per_class=80)


def job_env(data: Path, **extra: str) -> dict[str, str]:
    """The loader settings (LOADER_*) and the rendezvous port, as a user exports them to sbatch."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"PATH": path, "LOADER_DATA": str(data), "LOADER_SIZE": "32x32", "LOADER_BATCH_SIZE": str(BATCH),
            "LOADER_WORKERS": "1", "LOADER_HEARTBEAT_S": "0.5", "MASTER_PORT": str(free_port()), **extra}


def trainer(records: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tests" / "record_batches.py"), str(records), str(DEPLOY / "train.py"), *args]


def finish(cluster: slurm_support.SlurmCluster, job: str, out: Path) -> str:
    """Wait for the job to end; its output. Fails with the output unless it completed."""
    state = cluster.wait_job(job, JOB_TIMEOUT_S)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert state == "COMPLETED", f"job {job} ended {state} ({cluster.exit_code(job)}):\n{text[-6000:]}"
    assert_nothing_left(cluster, job)
    return text


def assert_nothing_left(cluster: slurm_support.SlurmCluster, job: str) -> None:
    """No process of the job (step daemons, loaders, their workers, trainers) on any node."""
    try:
        wait_until(lambda: not cluster.processes(job), 30, f"every process of job {job} to exit")
    except AssertionError:
        raise AssertionError(f"job {job} left processes: {cluster.processes(job)}") from None


def step_id(cluster: slurm_support.SlurmCluster, job: str, name: str) -> str | None:
    out = cluster.run("squeue", "-h", "-s", "-j", job, "-o", "%i %j", check=False).stdout
    return next((line.split()[0] for line in out.splitlines() if line.split()[1:] == [name]), None)


def wait_for_batches(records: Path, count: int, cluster: slurm_support.SlurmCluster, job: str, out: Path) -> None:
    def enough() -> bool:
        if cluster.job_state(job) not in ("PENDING", "RUNNING", "CONFIGURING"):
            text = out.read_text(errors="replace")[-6000:] if out.exists() else "(no output)"
            raise AssertionError(f"job {job} ended early:\n{cluster.describe(job)}\n{text}")
        return len(read_records(records)) >= count if records.exists() else False

    wait_until(enough, JOB_TIMEOUT_S, f"{count} batches recorded by the trainers of job {job}")


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_layout1_a_loader_per_node_trains_two_epochs_exactly_once(cluster: slurm_support.SlurmCluster, data: Path,
                                                                    tmp_path: Path) -> None:
    records, out = tmp_path / "records", tmp_path / "job.out"
    job = cluster.sbatch("--nodes=2", "--ntasks-per-node=2", f"--output={out}", f"--chdir={tmp_path}",
                         str(DEPLOY / "loader-per-node.sbatch"), *trainer(records, "--epochs", "2"),
                         env=job_env(data))
    text = finish(cluster, job, out)
    summary = check_exactly_once(records, world_size=4, epochs=2, batch_size=BATCH)
    assert summary["steps"] == 10
    for rank in range(4):  # ranks 0, 1 on n1 and 2, 3 on n2, each on its own node's loader
        assert re.search(rf"rank {rank}/4 on n{rank // 2 + 1}: epoch 1 loss", text), text
    sockets = re.findall(r" on ipc://(\S+)/loader-(n\d)\.sock: ", text)  # "serving N samples ... on ipc://...: "
    assert sorted(node for _, node in sockets) == ["n1", "n2"], text  # one loader per node
    assert text.count("shared memory") == 4, text  # each rank's batches came through shared memory
    assert "stopped after sending" in text  # the loaders were stopped by SIGTERM, not killed
    assert not Path(sockets[0][0]).exists()  # the socket folder is gone


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
def test_layout2_loader_pool_killed_mid_epoch_stays_exactly_once(cluster: slurm_support.SlurmCluster, data: Path,
                                                                 tmp_path: Path) -> None:
    records, out, keys = tmp_path / "records", tmp_path / "job.out", tmp_path / "shared-keys"
    port = free_port()
    job = cluster.sbatch(f"--output={out}", f"--chdir={tmp_path}", str(DEPLOY / "loader-pool.sbatch"),
                         *trainer(records, "--epochs", "2", "--timeout-s", "5"),
                         env=job_env(data, LOADER_KEYS=str(keys), LOADER_PORT=str(port), RECORD_STEP_S="1"))
    wait_for_batches(records, 4 * 2, cluster, job, out)  # every rank is a few batches into epoch 0
    loader = step_id(cluster, job, "loader-n1")
    assert loader is not None, cluster.describe(job)
    killed_at = len(read_records(records))
    cluster.run("scancel", "--signal=KILL", loader)
    endpoint, job_key = f"tcp://127.0.0.1:{port}", keys / "jobs" / job / "trainer.key_secret"

    def restarted() -> bool:
        try:
            return bool(health(endpoint, timeout_s=2, server_public_key=str(keys / "server.key"),
                               client_keys=str(job_key))["ok"])
        except LoaderError:
            return False

    wait_until(restarted, 60, "the restarted loader to answer the job's key")
    keygen(tmp_path / "stranger", "trainer")
    with pytest.raises(AuthenticationError):  # a trainer with another key (another job's, say) gets no data
        LoaderClient(endpoint, timeout_s=10, server_public_key=str(keys / "server.key"),
                     client_keys=str(tmp_path / "stranger" / "trainer.key_secret"))
    text = finish(cluster, job, out)
    check_exactly_once(records, world_size=4, epochs=2, batch_size=BATCH)
    assert killed_at < 4 * 10, "the kill came after epoch 0"
    assert "the loader on n1 exited 137: restart 1 of 3" in text, text
    resumed = re.findall(r"rank (\d): resumed at epoch 0 batch (\d+)", text)
    assert sorted(int(r) for r, _ in resumed) == [0, 1, 2, 3], text  # every rank lost it mid-epoch 0 and resumed
    assert all(0 < int(b) < 10 for _, b in resumed), resumed
    assert not (keys / "jobs" / job).exists()  # the job's allow-list and key went with it


@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("layout", ["loader-per-node", "loader-pool"])
def test_scancel_leaves_nothing_on_any_node(layout: str, cluster: slurm_support.SlurmCluster, data: Path,
                                            tmp_path: Path) -> None:
    records, out = tmp_path / "records", tmp_path / "job.out"
    if layout == "loader-per-node":
        sizes, pool = ["--nodes=2", "--ntasks-per-node=2"], {}
    else:
        sizes, pool = [], {"LOADER_KEYS": str(tmp_path / "keys"), "LOADER_PORT": str(free_port())}
    job = cluster.sbatch(*sizes, f"--output={out}", f"--chdir={tmp_path}", str(DEPLOY / f"{layout}.sbatch"),
                         *trainer(records, "--epochs", "100"), env=job_env(data, RECORD_STEP_S="0.2", **pool))
    wait_for_batches(records, 4, cluster, job, out)  # loaders, trainers, workers: everything runs
    running = cluster.processes(job)
    commands = " ".join(cmd for _, cmd in running)
    assert "loader-server serve" in commands and "record_batches.py" in commands, running
    started = time.monotonic()
    cluster.run("scancel", job)
    assert cluster.wait_job(job, 60) == "CANCELLED"
    assert_nothing_left(cluster, job)
    print(f"{layout}: {len(running)} processes gone {time.monotonic() - started:.1f} s after scancel")
