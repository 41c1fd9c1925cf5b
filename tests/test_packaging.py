"""Packaging: the client installs without OpenCV, the server runs on either OpenCV build.

The fresh-venv test installs from the package index (this machine's local mirror, or PyPI)
into a new virtual environment without system site-packages; pip's own cache makes a rerun
quick.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from .conftest import unique_label_list

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 420


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start: text.index("\n## ", start + 1)]


def test_readme_dependencies_section_is_what_pyproject_declares() -> None:
    project = _pyproject()
    base = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    core = base | {_name(r) for r in extras["server-core"]}
    server = core | {_name(r) for r in extras["server"] if _name(r) != "loader-service"}
    section = _readme_section("Dependencies, and why")
    lines = section.splitlines()
    first = next(k for k, line in enumerate(lines) if line.startswith("| "))
    end = next(k for k in range(first, len(lines)) if not lines[k].startswith("|"))  # the first table only
    rows = [line.split("|")[1:-1] for line in lines[first:end] if "---" not in line]
    table = {install.strip(" `"): {p.strip() for p in brings.split(",")} for _, install, brings in rows[1:]}
    parquet = server | {_name(r) for r in extras["parquet"]}
    s3 = server | {_name(r) for r in extras["s3"]}
    assert table == {"python3 -m pip install .": base, 'python3 -m pip install ".[server]"': server,
                     'python3 -m pip install ".[server-core]"': core, 'python3 -m pip install ".[server,parquet]"': parquet,
                     'python3 -m pip install ".[server,s3]"': s3}
    assert len(rows) == 6  # the header and five rows
    assert "botocore" not in server and "botocore" in s3  # only for those who serve from S3
    assert "pyarrow" not in server and "pyarrow" in parquet  # 170 MB: only for those who serve Parquet
    not_deps = re.search(r"Not dependencies, on purpose: (.*)\.", section)
    assert not_deps is not None
    declared = base | {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    for name in not_deps.group(1).split(", "):
        assert name not in declared, f"{name} is declared in pyproject.toml but the README says it is not"
        assert name in section.split("Not dependencies")[1], name
    # The README's first command installs the server.
    assert 'python3 -m pip install ".[server]" && loader-server demo' in (ROOT / "README.md").read_text()


def test_health_stats_and_the_client_never_import_opencv(start_server: Any, tmp_path: Path) -> None:
    server = start_server(unique_label_list(tmp_path / "data", 8), "--batch-size", "4", "--size", "16x16",
                          "--workers", "1")
    code = ("import sys\nfrom loader_server.cli import main\n"
            f"codes = [main(['health', {server.endpoint!r}, '--timeout-s', '20']), "
            f"main(['stats', {server.endpoint!r}, '--timeout-s', '20'])]\n"
            "import loader_client\n"
            "print('codes', codes, 'cv2', 'cv2' in sys.modules)\n")
    deadline_s = 30
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=deadline_s)
    assert "codes [0, 0] cv2 False" in result.stdout, result.stdout + result.stderr + server.log_text()


@pytest.mark.parametrize("command", [["serve", "--data", "{data}", "--print-config"], ["check", "--data", "{data}"],
                                     ["demo", "--images", "8"]])
def test_without_opencv_the_server_commands_exit_2_saying_what_to_install(tmp_path: Path,
                                                                          command: list[str]) -> None:
    listfile = unique_label_list(tmp_path / "data", 4)
    args = [a.format(data=listfile) for a in command]
    code = ("import sys\nsys.modules['cv2'] = None  # import cv2 now raises ImportError, as without OpenCV\n"
            f"from loader_server.cli import main\nsys.exit(main({args!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "loader-service[server]" in result.stderr and "opencv-python" in result.stderr
    assert "Traceback" not in result.stderr


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fresh_venv_with_opencv_python_serves_without_a_second_opencv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 120)  # no --system-site-packages: nothing leaks in
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "opencv-python"], PIP_TIMEOUT_S, env=env)
    # Install from a copy of the sources, so the build leaves nothing in the working tree.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "loader_client", "loader_server", "loader_bench"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name)  # type: ignore[operator]
    _run([*pip, f"{src}[server-core]"], PIP_TIMEOUT_S, env=env)
    installed = _run([python, "-c", "import importlib.metadata as m; "
                                    "print(sorted(d.metadata['Name'].lower() for d in m.distributions()))"],
                     60, env=env).stdout
    assert "'opencv-python'" in installed and "opencv-python-headless" not in installed, installed
    assert "'loader-service'" in installed and "'msgpack'" in installed, installed
    cv2_file = _run([python, "-c", "import cv2; print(cv2.__file__)"], 60, env=env).stdout.strip()
    assert cv2_file.startswith(str(venv)), cv2_file  # the venv's own opencv-python, nothing from outside
    # Serve with that OpenCV and consume one batch with the venv's client.
    listfile = unique_label_list(tmp_path / "data", 8)
    endpoint = f"ipc://{tmp_path}/s.sock"
    log = tmp_path / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(venv / "bin" / "loader-server"), "serve", "--data", str(listfile), "--bind",
                                 endpoint, "--batch-size", "4", "--size", "16x12", "--workers", "1"],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        consume = ("import sys\nfrom loader_client import LoaderClient\n"
                   f"with LoaderClient({endpoint!r}, timeout_s=60) as client:\n"
                   "    x, y = client.next()\n"
                   "print(x.shape, x.dtype, len(y), 'cv2' in sys.modules)\n")
        out = _run([python, "-c", consume], 120, env=env, cwd=tmp_path).stdout
        assert out.strip() == "(4, 12, 16, 3) uint8 4 False", out + log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
