"""Test machinery for tests/test_slurm.py: a real 3-node Slurm cluster on this one machine.

Nothing here ships to users. Debian 12's slurm-wlm 22.05 is built with multiple-slurmd support,
so one host runs a controller and three node daemons (n1, n2, n3), all on 127.0.0.1 with their
own ports (17001-17003), pid, spool and log files (``%n`` in slurm.conf), and srun/sbatch
schedule real job steps across them. Everything lives in one folder under /tmp (mode 0755:
munged insists that every folder above its socket be searchable by all):

* a private ``munged`` (as user munge, its own socket, pid, log and seed files), so that a
  system munge, if any, is neither needed nor touched;
* ``slurm.conf`` (``SLURM_CONF`` points every command at it), the controller's state, the
  node daemons' spools and logs.

`start_cluster` starts munged, slurmctld and the three slurmd (in the foreground, as children
of this process) and waits until ``sinfo`` shows the nodes idle; `SlurmCluster.stop` cancels
what is still queued, runs ``scontrol shutdown``, and kills by pid whatever has not exited
after a grace period, munged included. Every process of the cluster (daemons, step daemons,
job tasks) carries ``SLURM_CONF=<this cluster's slurm.conf>`` in its environment, which is how
`SlurmCluster.processes` finds them, on any of the three "nodes".

Run by hand: ``python -m tests.slurm_support up`` (prints the ``export SLURM_CONF=...`` line and
waits for Ctrl-C, then stops everything).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2", "n3")
NODE_PORTS = (17001, 17003)  # the node daemons' ports, one each
CPUS_PER_NODE = 2
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
MUNGE_KEY = Path("/etc/munge/munge.key")


class NoSlurm(Exception):
    """Slurm cannot run here: the message says why and what to install or run."""


def _binaries() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in ("munged", "munge", "slurmctld", "slurmd", "sinfo", "srun", "sbatch", "scancel", "scontrol", "squeue"):
        path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                          None)
        if path is None:
            raise NoSlurm(f"no `{name}`: install Debian's slurm-wlm and munge (`bash .ci/provision` does)")
        found[name] = path
    return found


def check_prerequisites() -> dict[str, str]:
    """The Slurm and munge binaries, or NoSlurm saying what is missing."""
    binaries = _binaries()
    if os.geteuid() != 0:
        raise NoSlurm("the node daemons (slurmd) run as root: run the Slurm tests as root")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        raise NoSlurm("no user `munge` (Debian's munge package creates it): reinstall munge") from None
    busy = [p for p in range(NODE_PORTS[0], NODE_PORTS[1] + 1) if not _port_free(p)]
    if busy:
        raise NoSlurm(f"ports {busy} are taken: the node daemons need {NODE_PORTS[0]}-{NODE_PORTS[1]} "
                      "(another Slurm test cluster may be running on this machine)")
    return binaries


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _ensure_munge_key() -> None:
    """Debian's munge package writes a key; write one (1024 random bytes, munge's, 0400) if it did not."""
    if MUNGE_KEY.is_file():
        return
    munge = pwd.getpwnam("munge")
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        MUNGE_KEY.write_bytes(secrets.token_bytes(1024))
    finally:
        os.umask(old)
    os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)


def slurm_conf(root: Path, *, ctld_port: int, munge_socket: Path, host: str) -> str:
    """The cluster's slurm.conf: 3 nodes on 127.0.0.1, per-node files with %n, quick scheduling."""
    lo, hi = NODE_PORTS
    return f"""\
ClusterName=loadertest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/ctld-state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/spool-%n
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_min_interval=100000
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
KillWait=5
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
NodeName={NODES[0][0]}[1-{len(NODES)}] NodeHostname={host} NodeAddr=127.0.0.1 Port={lo}-{hi} CPUs={CPUS_PER_NODE} RealMemory=6000
PartitionName=main Nodes={NODES[0][0]}[1-{len(NODES)}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@dataclass
class SlurmCluster:
    """A running test cluster: `env` runs Slurm commands against it (SLURM_CONF set)."""

    root: Path
    conf: Path
    binaries: dict[str, str]
    env: dict[str, str]
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # ------------------------------------------------------------------ commands
    def run(self, *args: str, timeout: float = 60, check: bool = True,
            env: Mapping[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """A Slurm command (`args[0]` by name) against this cluster."""
        cmd = [self.binaries.get(args[0], args[0]), *args[1:]]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})}, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                               f"{result.stderr[-3000:]}")
        return result

    def sbatch(self, *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job; returns its id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_state(self, job: str) -> str:
        """PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ... of a job (its first component)."""
        result = self.run("scontrol", "show", "job", "-o", job, check=False)
        m = re.search(r"\bJobState=(\w+)", result.stdout)
        return m.group(1) if m else "UNKNOWN"

    def exit_code(self, job: str) -> str:
        result = self.run("scontrol", "show", "job", "-o", job, check=False)
        m = re.search(r"\bExitCode=(\S+)", result.stdout)
        return m.group(1) if m else "?"

    def wait_job(self, job: str, timeout_s: float, *, until: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
                                                                                   "TIMEOUT", "NODE_FAIL",
                                                                                   "OUT_OF_MEMORY")) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.job_state(job)
            if state in until:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} is still {state} after {timeout_s:.0f} s:\n{self.describe(job)}")
            time.sleep(0.5)

    def steps(self, job: str) -> list[str]:
        """The ids (JOB.STEP) of the job's running steps."""
        out = self.run("squeue", "-h", "-s", "-j", job, "-o", "%i", check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def describe(self, job: str) -> str:
        return (self.run("scontrol", "show", "job", job, check=False).stdout
                + self.run("squeue", "-s", check=False).stdout)

    def processes(self, job: str | None = None) -> list[tuple[int, str]]:
        """(pid, command line) of this cluster's processes still alive, of one job if given.

        Found by their environment: SLURM_CONF=<this cluster's slurm.conf>, which Slurm hands to
        its daemons, the step daemons and every task, on every node; a job's are its step daemons
        (``slurmstepd: [JOB.STEP]``) and the processes with SLURM_JOB_ID=JOB."""
        conf = f"SLURM_CONF={self.conf}".encode()
        job_id = f"SLURM_JOB_ID={job}".encode()
        stepd = f"slurmstepd: [{job}." if job is not None else "slurmstepd: ["
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z" or conf not in environ:
                continue
            if job is None or job_id in environ or cmdline.startswith(stepd):
                found.append((int(entry), cmdline.strip()))
        return found

    # ------------------------------------------------------------------ stopping
    def cancel_all(self, timeout_s: float = 30) -> None:
        """Cancel every job of the cluster and wait until none is left."""
        self.run("scancel", "--partition=main", check=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", check=False).stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> list[str]:
        """Stop everything this cluster started; returns what had to be killed (empty when all exited)."""
        killed: list[str] = []
        if self.daemons.get("slurmctld") is not None and self.daemons["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.cancel_all()
            with contextlib.suppress(Exception):
                self.run("scontrol", "shutdown", check=False, timeout=30)
        deadline = time.monotonic() + STOP_GRACE_S
        for name, proc in self.daemons.items():
            if name == "munged":
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
                killed.append(name)
        ours = {proc.pid for proc in self.daemons.values()}
        for pid, cmdline in self.processes():  # step daemons or tasks that outlived their slurmd
            if pid in ours:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(f"{pid} {cmdline}")
        munged = self.daemons.get("munged")
        if munged is not None and munged.poll() is None:
            munged.terminate()
            try:
                munged.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                munged.kill()
                munged.wait(10)
                killed.append("munged")
        self._kill_munged_by_pid_file()
        return killed

    def _kill_munged_by_pid_file(self) -> None:
        pid_file = self.root / "munge" / "munged.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().split()[0])
            if f"{self.root}/munge/".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        out = []
        for log in sorted(self.root.glob("*.log")) + sorted((self.root / "munge").glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


def start_cluster(root: Path | None = None) -> SlurmCluster:
    """Start munged, slurmctld and slurmd n1..n3 under `root` (a new folder in /tmp by default).

    Raises NoSlurm when Slurm cannot run here; anything it started is stopped again first.
    """
    binaries = check_prerequisites()
    _ensure_munge_key()
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="slurm-cluster-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755, exist_ok=True)
    munge_user = pwd.getpwnam("munge")
    os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
    (root / "ctld-state").mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    host = socket.gethostname().split(".")[0]
    conf.write_text(slurm_conf(root, ctld_port=_free_port(), munge_socket=munge_dir / "munge.sock", host=host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for name in list(env):
        if name.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and name != "SLURM_CONF":
            del env[name]  # a test run inside a Slurm job must not leak that job's settings
    cluster = SlurmCluster(root, conf, binaries, env)
    try:
        with open(munge_dir / "munged.out", "wb") as out:
            cluster.daemons["munged"] = subprocess.Popen(
                [binaries["munged"], "--foreground", f"--socket={munge_dir}/munge.sock",
                 f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                 f"--seed-file={munge_dir}/munged.seed"], stdout=out, stderr=subprocess.STDOUT, env=env,
                user=munge_user.pw_uid, group=munge_user.pw_gid, extra_groups=[])
        _wait(lambda: (munge_dir / "munge.sock").exists(), 20, "munged's socket", cluster)
        for name, cmd in [("slurmctld", [binaries["slurmctld"], "-D"]),
                          *((f"slurmd-{n}", [binaries["slurmd"], "-D", "-N", n]) for n in NODES)]:
            with open(root / f"{name}.out", "wb") as out:
                cluster.daemons[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            if name == "slurmctld":
                _wait(lambda: cluster.run("sinfo", "-h", check=False, timeout=20).returncode == 0, START_TIMEOUT_S,
                      "slurmctld to answer sinfo", cluster)

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=20).stdout.split()
            states = dict(zip(out[::2], out[1::2], strict=False))
            return all(states.get(n) == "idle" for n in NODES)

        _wait(idle, START_TIMEOUT_S, "sinfo to show n1, n2 and n3 idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(predicate: object, timeout_s: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                raise NoSlurm(f"{name} exited with code {proc.returncode} while waiting for {what}:\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise NoSlurm(f"timed out after {timeout_s:.0f} s waiting for {what}:\n{cluster.logs()}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] != ["up"]:
        print(__doc__)
        return 2
    try:
        with running_cluster() as cluster:
            print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except NoSlurm as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
