"""docker/: static validation, and the compose services' exact commands run as local processes.

No Docker engine runs in CI, so the commands of compose.yaml are read from the file and run
as plain processes with the same arguments and environment: the file and this test cannot
drift apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import color_classes, free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run the README's test command, which installs it"
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), "--failure-threshold", "warning", str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_validates(tmp_path: Path) -> None:
    env = {**os.environ, "DATASET_DIR": str(tmp_path)}
    result = subprocess.run([tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    missing = subprocess.run([tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "DATASET_DIR"})
    assert missing.returncode != 0 and "set DATASET_DIR" in missing.stderr  # a required variable
    schema = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(DOCKER / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert schema.returncode == 0, schema.stdout + schema.stderr


def test_compose_has_what_a_training_box_needs() -> None:
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    loader, trainer = spec["services"]["loader"], spec["services"]["trainer"]
    assert loader["init"] is True and loader["restart"] and loader["shm_size"]
    assert loader["healthcheck"]["test"][0] == "CMD"
    assert any(v.get("read_only") for v in loader["volumes"])
    assert trainer["depends_on"]["loader"]["condition"] == "service_healthy"
    assert trainer["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "LOADER_ENDPOINT" in trainer["environment"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M) and 'HEALTHCHECK' in dockerfile
    assert re.search(r'^ENTRYPOINT \["loader-server"\]$', dockerfile, re.M)


_VAR = re.compile(r"\$\{(\w+)(?::([-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise AssertionError(f"required variable {name}: {arg}")
        return arg if op == "-" else ""

    return _VAR.sub(sub, value)


def test_compose_commands_train_as_local_processes(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data = color_classes(tmp_path / "dataset", 16, size=24)
    env = {**os.environ, "DATASET_DIR": str(data), "BATCH_SIZE": "16", "IMAGE_SIZE": "32x32",
           "LOADER_WORKERS": "2", "EPOCHS": "2"}
    spec = interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), env)
    loader, trainer = spec["services"]["loader"], spec["services"]["trainer"]
    port = free_port()
    mounts = {v["target"]: v["source"] for v in loader["volumes"]}

    def local(args: list[str]) -> list[str]:
        """Container paths and addresses to this machine's: the mounts, the network, the image."""
        out = []
        for a in args:
            for target, source in mounts.items():
                if a == target or a.startswith(target + "/"):
                    a = source + a[len(target):]
            a = a.replace("/app/", f"{ROOT}/")
            a = re.sub(r"tcp://(0\.0\.0\.0|127\.0\.0\.1|loader):5555", f"tcp://127.0.0.1:{port}", a)
            out.append(a)
        return out

    loader_cmd = [sys.executable, "-m", "loader_server", *local(loader["command"])]  # ENTRYPOINT loader-server
    health_cmd = local(loader["healthcheck"]["test"][1:])
    health_cmd = [sys.executable, "-m", "loader_server", *health_cmd[1:]]
    trainer_env = {**env, **{k: local([v])[0] for k, v in trainer["environment"].items()}}
    trainer_cmd = [sys.executable if a == "python" else a for a in local(trainer["command"])]
    assert "0.0.0.0" not in " ".join(loader_cmd)
    server = subprocess.Popen(loader_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(health_cmd, capture_output=True, timeout=30).returncode != 0:  # depends_on: healthy
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "the loader never became healthy"
            time.sleep(0.2)
        result = subprocess.run(trainer_cmd, env=trainer_env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "epoch 1: loss" in result.stdout and "epoch 2: loss" in result.stdout
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert server.returncode == 0, out
