"""docker/: static checks, and the README's training-box steps on a real Docker engine.

The static checks (hadolint, `docker-compose config`, the compose-spec schema) run anywhere.
The rest needs an engine: `.ci/provision` installs Debian's docker.io, docker-compose and
debootstrap, and the `engine` fixture starts dockerd when none answers (and stops it after).
Under CI=true a missing engine fails these tests; elsewhere they skip with the reason. They are
marked `docker`: `python3 -m pytest -m "not docker"` runs the suite without them. The commands come from the README's "Deploying on a training box" block itself, so
the two cannot drift; tests/docker_support.py holds the test machinery (the stand-in base
image, a `docker` shim for `docker compose` on docker-compose 1.29, the loopback wheel server).

Measured on the 2-core machine (shared with other work): this module takes about 2 min 20 s from
nothing (debootstrap of the stand-in and both image builds about 95 s, the engine tests about
40 s), about 45 s when the images are cached, about 1 min 40 s when the package's code changed.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import docker_support
from .conftest import free_port, unique_label_list

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
ENGINE_TIMEOUT_S = 900  # a first run debootstraps the stand-in base (about 65 s) and builds both images
UID = 10001  # the server image's user
TRAINER_UID = 10002  # the trainer image's user: another trust domain


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run the README's test command, which installs it"
    return path


# --- static checks --------------------------------------------------------------------------

def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "warning", str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_validate(tmp_path: Path) -> None:
    env = {**os.environ, "DATASET_DIR": str(tmp_path)}
    for files in (["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]):
        args = [a for f in files for a in ("-f", str(DOCKER / f))]
        result = subprocess.run([tool("docker-compose"), *args, "config", "-q"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    missing = subprocess.run([tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "DATASET_DIR"})
    assert missing.returncode != 0 and "set DATASET_DIR" in missing.stderr  # a required variable
    for name in ("compose.yaml", "compose.gpu.yaml"):
        schema = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                                 str(DOCKER / name)], capture_output=True, text=True, timeout=120)
        assert schema.returncode == 0, schema.stdout + schema.stderr


def test_compose_has_what_a_training_box_needs() -> None:
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    loader, trainer = spec["services"]["loader"], spec["services"]["trainer"]
    # Every service that is built names its stage: the default would be the last one.
    assert loader["build"]["target"] == "server" and trainer["build"]["target"] == "trainer"
    assert loader["init"] is True and loader["stop_grace_period"]
    assert re.fullmatch(r"on-failure:\d", loader["restart"])  # bounded: exit 2 is never retried in a loop
    assert loader["healthcheck"]["test"][:3] == ["CMD", "loader-server", "health"]
    assert not any(re.search(r"://", a) for a in loader["healthcheck"]["test"])  # follows the bind setting
    assert any(v.get("read_only") and v["target"] == "/data" for v in loader["volumes"] if isinstance(v, dict))
    assert trainer["depends_on"]["loader"]["condition"] == "service_healthy"
    # Two trust domains: the trainer has its own uid and PID namespace, and reaches the loader's
    # 0660 socket as a member of its group; the arena comes over the socket's arena channel.
    assert "pid" not in trainer and trainer["user"] == f"{TRAINER_UID}:{TRAINER_UID}" != f"{UID}:{UID}"
    assert trainer["group_add"] == [str(UID)] and "LOADER_IPC_MODE=0660" in loader["environment"]
    assert f"LOADER_SERVER_UID={UID}" in trainer["environment"]  # the client trusts the loader's uid by name
    assert "loader-run:/run/loader" in loader["volumes"] and "loader-run:/run/loader" in trainer["volumes"]
    assert "checkpoints:/checkpoints" in trainer["volumes"] and "CHECKPOINT_DIR=/checkpoints" in trainer["environment"]
    assert set(spec["volumes"]) == {"loader-run", "checkpoints"}
    assert "deploy" not in trainer  # a box without a GPU runs the base file; the GPU is an override
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())["services"]["trainer"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(rf"^USER {UID}:{UID}$", dockerfile, re.M) and "HEALTHCHECK" in dockerfile
    assert re.search(rf"^USER {TRAINER_UID}:{TRAINER_UID}$", dockerfile, re.M) and not re.search(r"^EXPOSE", dockerfile, re.M)
    stages = re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.M)
    assert stages[-1] == "server", "a plain `docker build` builds the last stage: it must be the server"


def test_health_asks_where_serve_binds(start_server: Any, tmp_path: Path) -> None:
    """`loader-server health` without an endpoint resolves `bind` as `serve` does (file, then env)."""
    from loader_server.cli import _endpoint, build_parser

    data = unique_label_list(tmp_path / "data", 8)
    server = start_server(data, "--batch-size", "4", "--workers", "1")
    config = tmp_path / "loader.toml"
    config.write_text(f'bind = "{server.endpoint}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADER_")}
    ask = [sys.executable, "-m", "loader_server", "health", "--timeout-s", "10"]
    deadline = time.monotonic() + 60
    while True:
        by_file = subprocess.run([*ask, "--config", str(config)], capture_output=True, text=True, timeout=30, env=env)
        if by_file.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert by_file.returncode == 0, by_file.stderr
    by_env = subprocess.run(ask, capture_output=True, text=True, timeout=30, env={**env, "LOADER_BIND": server.endpoint})
    assert by_env.returncode == 0, by_env.stderr
    nowhere = subprocess.run([*ask[:-1], "1"], capture_output=True, text=True, timeout=30,
                             env={**env, "LOADER_BIND": f"ipc://{tmp_path}/nobody.sock"})
    assert nowhere.returncode == 1 and "nobody.sock" in nowhere.stderr
    parser = build_parser()
    for bind, asked in (("tcp://0.0.0.0:6001", "tcp://127.0.0.1:6001"), ("tcp://*:6001", "tcp://127.0.0.1:6001"),
                        ("tcp://[::]:6001", "tcp://[::1]:6001"), ("ipc:///run/loader/l.sock", "ipc:///run/loader/l.sock")):
        config.write_text(f'bind = "{bind}"\ninsecure = true\n')
        assert _endpoint(parser.parse_args(["health", "--config", str(config)])) == asked
    assert _endpoint(parser.parse_args(["health", "tcp://10.0.0.1:1"])) == "tcp://10.0.0.1:1"  # as given


def test_the_docker_tests_can_be_skipped_with_a_marker() -> None:
    """`pytest -m "not docker"` (the README's way to run the suite without Docker) leaves out every test
    that needs the engine, and only those; `.ci/run` selects no marker, so it runs them all."""
    def collected(*args: str) -> set[str]:
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 *args, str(Path(__file__))], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode in (0, 5), result.stdout + result.stderr
        return {line.split("::", 1)[1] for line in result.stdout.splitlines() if "::" in line}

    everything, without, only = collected(), collected("-m", "not docker"), collected("-m", "docker")
    needs_engine = {name for name, fn in globals().items() if name.startswith("test_") and callable(fn)
                    and {"engine", "built", "box"} & set(inspect.signature(fn).parameters)}
    assert needs_engine and only == needs_engine and without == everything - needs_engine, (only, needs_engine)
    assert "test_compose_files_validate" in without and "test_the_docker_tests_can_be_skipped_with_a_marker" in without
    readme = (ROOT / "README.md").read_text()
    assert 'python3 -m pytest -m "not docker"' in readme, "the README says how to skip the Docker tests"
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"python3 -m pytest(.*)$", ci, re.M)
    assert command and "-m" not in command.group(1).split() and "docker" not in command.group(1), ci


# --- on a real engine -----------------------------------------------------------------------

def readme_steps() -> list[str]:
    """The shell lines of the README's compose block, comments stripped."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deploying on a training box, step by step"):]
    section = section[:section.index("\n## ", 1)]
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "docker compose" in b]
    assert len(blocks) == 1, "the section has one block of docker commands"
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in blocks[0].splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def unavailable(exc: docker_support.NoEngine) -> None:
    """Under CI=true a missing engine (or what it needs) is a failure; elsewhere a skip with the reason."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs a Docker engine: {exc}")
    pytest.skip(str(exc))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The engine: the one that answers, or a dockerd started here and stopped after this module."""
    started = docker_support.start_engine_if_needed(tmp_path_factory.mktemp("dockerd") / "dockerd.log")
    try:
        try:
            cli = docker_support.docker()
            docker_support.compose()
            docker_support.buildkit_cli()
        except docker_support.NoEngine as exc:
            unavailable(exc)
        yield cli
    finally:
        docker_support.stop_engine(started)


class Box:
    """The README's commands, run as a user types them, in one compose project of their own."""

    def __init__(self, folder: Path, dataset: Path, **env: str) -> None:
        self.project = f"loadertest{uuid.uuid4().hex[:10]}"
        steps = readme_steps()
        exports = dict(re.fullmatch(r"export (\w+)=(\S+)", s).groups() for s in steps if s.startswith("export "))  # type: ignore[union-attr]
        assert set(exports) == {"DATASET_DIR", "COMPOSE_FILE"}, exports
        self.steps = [s for s in steps if not s.startswith("export ")]
        # Only what the test sets: none of this shell's LOADER_*, COMPOSE_* or TORCH_* variables.
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LOADER_", "COMPOSE_", "TORCH_"))}
        self.env = docker_support.env(folder / "bin", clean, COMPOSE_FILE=exports["COMPOSE_FILE"],
                                      COMPOSE_PROJECT_NAME=self.project, DATASET_DIR=str(dataset), **env)
        self.docker = docker_support.docker()

    def step(self, starts: str) -> str:
        """The one README step that begins with `starts`."""
        found = [s for s in self.steps if s.startswith(starts)]
        assert len(found) == 1, f"one README step starts with {starts!r}: {self.steps}"
        return found[0]

    def sh(self, line: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", line], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, line: str, timeout: float = 300) -> str:
        result = self.sh(line, timeout)
        assert result.returncode == 0, f"{line} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def container(self, service: str) -> str:
        ids = self.ok(f"docker compose ps --all --quiet {service}", 60).split()
        assert len(ids) == 1, (service, ids)
        return ids[0]

    def inspect(self, ref: str) -> dict[str, Any]:
        out = subprocess.run([self.docker, "inspect", ref], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout)[0]  # type: ignore[no-any-return]

    def logs(self, container: str) -> str:
        out = subprocess.run([self.docker, "logs", container], capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr

    def wait_healthy(self, container: str, timeout_s: float = 90) -> None:
        deadline = time.monotonic() + timeout_s
        while (state := self.inspect(container)["State"]).get("Health", {}).get("Status") != "healthy":
            assert state["Status"] in ("created", "running") and time.monotonic() < deadline, (state, self.logs(container))
            time.sleep(0.5)

    def remove(self) -> None:
        subprocess.run([*docker_support.compose(), "down", "--volumes", "--timeout", "5"], cwd=ROOT, env=self.env,
                       capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def built(engine: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Both images, built by the README's build step, with torch's CPU wheel from this machine."""
    folder = tmp_path_factory.mktemp("docker")
    try:
        docker_support.ensure_base_image()
    except docker_support.NoEngine as exc:  # no debootstrap to make the stand-in base
        unavailable(exc)
    with docker_support.serve_folder(docker_support.find_links()) as wheels:
        box = Box(folder, folder, TORCH_REQUIREMENT="torch==2.13.0+cpu", TORCH_FIND_LINKS=wheels)
        box.ok(box.step("docker compose build"), timeout=ENGINE_TIMEOUT_S - 120)
    return {"server": "loader-service:latest", "trainer": "loader-trainer:latest"}


@pytest.fixture
def box(built: dict[str, str], tmp_path: Path) -> Iterator[Box]:
    made: list[Box] = []

    def make(dataset: Path, **env: str) -> Box:
        made.append(Box(tmp_path, dataset, **env))
        return made[-1]

    yield make  # type: ignore[misc]
    for b in made:
        b.remove()


def inspect_image(ref: str) -> dict[str, Any]:
    out = subprocess.run([docker_support.docker(), "image", "inspect", ref], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    return json.loads(out)[0]  # type: ignore[no-any-return]


def volume_path(box: Box, name: str) -> Path:
    """Where the compose project's volume `name` lies on this host (the engine runs here)."""
    out = subprocess.run([box.docker, "volume", "inspect", f"{box.project}_{name}"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return Path(json.loads(out)[0]["Mountpoint"])


def zombies_in(box: Box, container: str) -> list[str]:
    script = ("import os\nfor p in os.listdir('/proc'):\n if p.isdigit():\n  try: s=open(f'/proc/{p}/stat').read()\n"
              "  except OSError: continue\n  if s.rsplit(')',1)[1].split()[0]=='Z': print(s)")
    out = subprocess.run([box.docker, "exec", container, "python", "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.splitlines()


def processes_of(container_id: str) -> list[int]:
    """Host processes still in the container's cgroup."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if container_id in Path(f"/proc/{entry}/cgroup").read_text():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.docker
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_readme_steps_train_zero_copy_between_containers(box: Any, tmp_path: Path) -> None:
    dataset = unique_label_list(tmp_path / "dataset", 96).parent  # label = sample number
    b: Box = box(dataset, LOADER_DATA="/data/train.txt", LOADER_BATCH_SIZE="16", LOADER_SIZE="32x32",
                 LOADER_WORKERS="2", EPOCHS="2")
    assert [s.split()[:3] for s in b.steps] == [
        ["docker", "compose", "build"], ["docker", "compose", "run"], ["docker", "compose", "up"],
        ["docker", "wait", '"$(docker'], ["docker", "compose", "logs"], ["docker", "compose", "down"]]

    smoke = b.ok(b.step("docker compose run"))  # the trainer image's client, through the shared socket
    assert "shared memory True" in smoke, smoke
    assert smoke.count("each of 96 samples exactly once") == 2, smoke

    b.ok(b.step("docker compose up"))
    loader = b.container("loader")
    b.wait_healthy(loader)
    exit_code = b.sh(b.step("docker wait"), timeout=300)
    assert exit_code.stdout.strip() == "0", (exit_code.stdout, exit_code.stderr)
    trained = b.ok(b.step("docker compose logs"))
    assert re.search(r"epoch 1: loss [\d.]+, 6 steps", trained) and "epoch 2: loss" in trained, trained
    log = b.logs(loader)
    assert log.count("starting at epoch 0 batch 0, shared memory") == 2, log  # smoke test and trainer
    assert "starting at epoch 0 batch 0, frames over the socket" not in log, log  # both sessions mapped the arena
    assert zombies_in(b, loader) == []
    # Zero copy across two trust domains: another uid, and no PID namespace of the loader's.
    trainer = b.inspect(b.container("trainer"))
    assert trainer["Config"]["User"] == f"{TRAINER_UID}:{TRAINER_UID}" and trainer["HostConfig"]["PidMode"] == ""
    assert trainer["HostConfig"]["GroupAdd"] == [str(UID)]
    # The checkpoints: written by the trainer's uid into its volume, one per epoch, the last kept.
    checkpoints = volume_path(b, "checkpoints")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt"], list(checkpoints.iterdir())
    assert (checkpoints / "last.pt").stat().st_uid == TRAINER_UID and (checkpoints / "last.pt").stat().st_size > 1000
    assert "epoch 2: checkpoint /checkpoints/last.pt" in trained, trained
    socket = volume_path(b, "loader-run") / "loader.sock"
    assert socket.is_socket() and socket.stat().st_uid == UID and oct(socket.stat().st_mode & 0o777) == "0o660"
    # Any container of that group that trusts the loader's uid gets shared memory, PID namespace or
    # not; a uid outside the group cannot even connect (the socket is 0660, its folder 0750).
    def consume(*user: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([b.docker, "run", "--rm", *user, "-v", f"{b.project}_loader-run:/run/loader",
                               "loader-trainer:latest", "python", "/app/examples/consume.py", "--epochs", "1", "--check",
                               "--timeout-s", "10"], capture_output=True, text=True, timeout=180)

    apart = consume("--group-add", str(UID), "-e", f"LOADER_SERVER_UID={UID}")  # it trusts the loader's uid
    assert apart.returncode == 0 and "shared memory True" in apart.stdout, apart.stdout + apart.stderr
    stranger = consume("--user", "10003:10003")
    assert stranger.returncode != 0 and "shared memory" not in stranger.stdout, stranger.stdout + stranger.stderr

    grace_s = float(yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["loader"]["stop_grace_period"][:-1])
    loader_id = b.inspect(loader)["Id"]
    waiter = subprocess.Popen([b.docker, "wait", loader], stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    b.ok(b.step("docker compose down"), timeout=120)
    took = time.monotonic() - started
    out, _ = waiter.communicate(timeout=60)
    assert out.strip() == "0", f"the loader exited {out.strip()} on SIGTERM:\n{log}"
    assert took < grace_s, f"`down` took {took:.1f} s, the grace period is {grace_s:g} s"
    left = subprocess.run([b.docker, "ps", "--all", "--quiet", "--filter", f"label=com.docker.compose.project={b.project}"],
                          capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert left == [] and processes_of(loader_id) == []
    assert not socket.exists(), "the server leaves its ipc socket behind"
    assert not Path(f"{socket}.arenas").exists(), "the server leaves its arena channel behind"


@pytest.mark.docker
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_settings_reach_the_container_and_health_follows_the_bind(box: Any, tmp_path: Path) -> None:
    """A mounted TOML file and LOADER_* variables; a TCP bind on another port: frames, still healthy."""
    dataset = unique_label_list(tmp_path / "dataset", 48).parent
    config = tmp_path / "settings.toml"
    config.write_text('data = "/data/train.txt"\nbatch_size = 8\nsize = "32x32"\nworkers = 2\ninsecure = true\n')
    b: Box = box(dataset, LOADER_CONFIG=str(config), LOADER_SEED="7", LOADER_BIND="tcp://0.0.0.0:6123",
                 LOADER_ENDPOINT="tcp://loader:6123", LOADER_METRICS_PORT="9464")
    smoke = b.ok(b.step("docker compose run").replace("--check", "--epochs 1 --check"))
    assert "6 steps of 8, shared memory False" in smoke and "each of 48 samples exactly once" in smoke, smoke
    loader = b.container("loader")
    b.wait_healthy(loader)  # `loader-server health --config ...` asked tcp://127.0.0.1:6123
    log = b.logs(loader)
    assert "on tcp://0.0.0.0:6123" in log and " seed=7 " in log and " batch_size=8 " in log, log
    assert "frames over the socket" in log, log
    metrics = subprocess.run([b.docker, "exec", loader, "python", "-c", "import urllib.request; print(urllib.request"
                              ".urlopen('http://127.0.0.1:9464/metrics', timeout=10).read().decode())"],
                             capture_output=True, text=True, timeout=60)
    assert "loader_batches_sent_total" in metrics.stdout, metrics.stdout + metrics.stderr


@pytest.mark.docker
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_unreadable_data_exits_2_without_a_restart_loop(box: Any, tmp_path: Path) -> None:
    if os.getuid() == UID:
        pytest.skip(f"the test user is uid {UID}, the container's: it can read its own folder")
    dataset = unique_label_list(tmp_path / "secret", 16).parent
    dataset.chmod(0o700)  # the owner only: not uid 10001
    b: Box = box(dataset, LOADER_DATA="/data/train.txt", LOADER_BATCH_SIZE="8", LOADER_WORKERS="1")
    b.ok("docker compose up --detach loader")
    loader = b.container("loader")
    deadline, seen = time.monotonic() + 120, None
    while True:  # settled: exited, not restarting, and the same restart count twice in a row
        state = b.inspect(loader)
        now = (state["State"]["Status"], state["State"]["Restarting"], state["RestartCount"])
        if now[0] == "exited" and not now[1] and now == seen:
            break
        assert time.monotonic() < deadline, f"still {now} after 120 s: a restart loop?"
        seen = now
        time.sleep(3)
    max_retries = int(yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["loader"]["restart"].split(":")[1])
    assert state["RestartCount"] <= max_retries
    code, log = state["State"]["ExitCode"], b.logs(loader)
    assert code == 2, log
    assert str(UID) in log and "Traceback" not in log, log


@pytest.mark.docker
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_images_are_slim_and_the_default_build_is_the_server(built: dict[str, str], tmp_path: Path) -> None:
    cli = docker_support.docker()
    server = inspect_image(built["server"])
    assert server["Config"]["User"] == f"{UID}:{UID}" and server["Config"]["Entrypoint"] == ["loader-server"]
    assert "health" in server["Config"]["Healthcheck"]["Test"] and "5555" not in " ".join(server["Config"]["Healthcheck"]["Test"])
    size_mb = server["Size"] / 1e6
    base_mb = inspect_image(docker_support.BASE_IMAGE)["Size"] / 1e6
    # The default image serves every kind from every store (EXTRAS=server,s3,parquet): OpenCV and numpy
    # (258 MB), pyarrow and botocore (README, "Images"); --build-arg EXTRAS=server leaves the last two out.
    assert size_mb - base_mb < 600, f"the server adds {size_mb - base_mb:.0f} MB to its base"
    stores = subprocess.run([cli, "run", "--rm", "--entrypoint", "python", built["server"], "-c",
                             "import botocore, pyarrow, pyarrow.parquet, cv2; print(botocore.__version__, "
                             "pyarrow.__version__)"], capture_output=True, text=True, timeout=120)
    assert stores.returncode == 0 and len(stores.stdout.split()) == 2, stores.stdout + stores.stderr
    # The Dockerfile's own first line: a plain build is the server (BuildKit reuses every layer).
    readme_build = next(line for line in (DOCKER / "Dockerfile").read_text().splitlines() if "# the server" in line)
    command = shlex.split(readme_build.lstrip("# ").split("  #")[0])
    assert command[:2] == ["docker", "build"] and "--target" not in command
    tag = f"loader-default-build:{uuid.uuid4().hex[:8]}"
    command = [c if c != "loader-service" else tag for c in command]
    env = docker_support.env(tmp_path / "bin", dict(os.environ))
    subprocess.run([command[0], command[1], "--network", "host", *command[2:]], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    try:
        default = inspect_image(tag)
        assert default["Id"] == server["Id"]
    finally:
        subprocess.run([cli, "rmi", tag], capture_output=True, timeout=60)
    probe = ("for c in gcc cc g++ c++ clang make; do command -v $c; done; ls -A /root/.cache/pip /tmp/pip-* 2>/dev/null; "
             "find / -xdev -name '*.whl' -path '*/wheels/*' 2>/dev/null | head -3")
    for image in built.values():
        found = subprocess.run([cli, "run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", probe],
                               capture_output=True, text=True, timeout=120)
        assert found.returncode in (0, 1) and found.stdout.strip() == "", f"{image}: {found.stdout}"
        user, writable = (UID, "/run/loader") if image == built["server"] else (TRAINER_UID, "/checkpoints")
        me = subprocess.run([cli, "run", "--rm", "--entrypoint", "sh", image, "-c",
                             f"id -u && touch {writable}/probe && rm {writable}/probe"],
                            capture_output=True, text=True, timeout=120)
        assert me.returncode == 0 and me.stdout.strip() == str(user), me.stdout + me.stderr
    print(f"server image {size_mb:.0f} MB (base {base_mb:.0f} MB)")


@pytest.mark.docker
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_the_image_serves_no_network_by_default(built: dict[str, str], tmp_path: Path) -> None:
    """`docker run -p 5555:5555 loader-service`: the baked-in settings bind an ipc socket, not the port."""
    cli = docker_support.docker()
    image = inspect_image(built["server"])
    assert not image["Config"].get("ExposedPorts"), image["Config"].get("ExposedPorts")
    dataset = unique_label_list(tmp_path / "dataset", 16).parent
    port, name = free_port(), f"loader-default-{uuid.uuid4().hex[:8]}"
    data = ["-v", f"{dataset}:/data:ro", "-e", "LOADER_DATA=/data/train.txt", "-e", "LOADER_WORKERS=1", "-e",
            "LOADER_BATCH_SIZE=4"]
    subprocess.run([cli, "run", "--detach", "--init", "--name", name, "-p", f"127.0.0.1:{port}:5555", *data,
                    built["server"]], capture_output=True, text=True, timeout=120, check=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # healthy: its own health check asks where the baked-in settings bind
            state = json.loads(subprocess.run([cli, "inspect", name], capture_output=True, text=True, timeout=60,
                                              check=True).stdout)[0]["State"]
            if state.get("Health", {}).get("Status") == "healthy":
                break
            assert state["Status"] == "running" and time.monotonic() < deadline, state
            time.sleep(0.5)
        logs = subprocess.run([cli, "logs", name], capture_output=True, text=True, timeout=60)
        log = logs.stdout + logs.stderr
        assert "on ipc:///run/loader/loader.sock" in log and "WITHOUT encryption" not in log, log
        asked = subprocess.run([sys.executable, "-m", "loader_server", "health", f"tcp://127.0.0.1:{port}",
                                "--timeout-s", "3"], capture_output=True, text=True, timeout=60)
        assert asked.returncode == 1, f"the published port answered: {asked.stdout}{asked.stderr}"
    finally:
        subprocess.run([cli, "rm", "--force", name], capture_output=True, timeout=60)
    # A TCP bind without keys is refused with what to do, unless insecure is asked for by name.
    tcp = subprocess.run([cli, "run", "--rm", *data, "-e", "LOADER_BIND=tcp://0.0.0.0:5555", built["server"]],
                         capture_output=True, text=True, timeout=120)
    assert tcp.returncode == 2 and "--curve-dir" in tcp.stderr and "--insecure" in tcp.stderr, tcp.stderr


@pytest.mark.docker
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_the_box_prometheus_scrapes_the_loader(box: Any, tmp_path: Path) -> None:
    """LOADER_METRICS_PORT and LOADER_METRICS_HOST, and the port published on the box's loopback."""
    port = free_port()
    override = tmp_path / "prometheus.yaml"
    override.write_text(f'services:\n  loader:\n    ports: ["127.0.0.1:{port}:9464"]\n')
    dataset = unique_label_list(tmp_path / "dataset", 16).parent
    b: Box = box(dataset, LOADER_DATA="/data/train.txt", LOADER_BATCH_SIZE="8", LOADER_WORKERS="1",
                 LOADER_METRICS_PORT="9464", LOADER_METRICS_HOST="0.0.0.0")
    b.env["COMPOSE_FILE"] += f":{override}"
    b.ok("docker compose up --detach loader")
    loader = b.container("loader")
    b.wait_healthy(loader)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert b"loader_batches_sent_total" in answer.read()
