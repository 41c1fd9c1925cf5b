"""Test machinery for tests/test_docker.py: a real Docker engine, and a stand-in base image.

Nothing here ships to users. The product's docker/Dockerfile starts `FROM
python:3.11.14-slim-bookworm`, which a user's engine pulls from Docker Hub. CI and the
developers' machines reach no image registry, so when that image is missing the tests build a
**stand-in with the same name**: Debian bookworm (debootstrap, minbase) with the distribution's
python3, pip and venv, laid out like the official image where the Dockerfile can tell (`python`
and `pip` in /usr/local/bin, no EXTERNALLY-MANAGED marker), plus this machine's CA bundle so that
pip inside a build reaches the package index exactly as pip on the host does. The root file
system is cached as a tarball, so a rerun on a machine whose engine lost the image takes seconds
(about 90 s the first time). It stands in for the real image only in tests: the real one is a
different Python build (3.11.14 from source, not Debian's 3.11.2) on the same Debian release.

Run by hand: `python -m tests.docker_support base-image` (builds or reuses the stand-in),
`python -m tests.docker_support engine` (says which engine the tests would use, or why none).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

BASE_IMAGE = "python:3.11.14-slim-bookworm"
SUITE = "bookworm"
CACHE = Path(os.environ.get("LOADER_DOCKER_CACHE", Path.home() / ".cache" / "loader-service-docker"))
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WHEELS_PORT = 47613  # the loopback port of `serve_folder` when it is free


class NoEngine(Exception):
    """No usable Docker engine: the message says why and what to run."""


def run(args: list[str], *, timeout: float, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result  # type: ignore[no-any-return]


def start_engine_if_needed(log: Path) -> subprocess.Popen[bytes] | None:
    """Start dockerd when no engine answers and Debian's dockerd is installed; None otherwise.

    The caller stops what this started (`stop_engine`), so nothing is left running.
    """
    try:
        docker()
        return None  # an engine answers already: not ours to start or stop
    except NoEngine:
        pass
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        return None
    with open(log, "wb") as f:
        proc = subprocess.Popen([dockerd], stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        docker.cache_clear()
        try:
            docker()
            return proc
        except NoEngine:
            time.sleep(0.5)
    stop_engine(proc)
    return None


def stop_engine(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a dockerd that `start_engine_if_needed` started (SIGTERM, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    docker.cache_clear()


@functools.cache
def docker() -> str:
    """The docker CLI that talks to the running engine (any client from 20.10 on negotiates the API).

    Raises NoEngine with the reason when there is no CLI or no engine answers.
    """
    candidates = [p for p in (shutil.which("docker"), "/usr/bin/docker") if p and os.access(p, os.X_OK)]
    if not candidates:
        raise NoEngine("no docker CLI: install Debian's docker.io (.ci/run does)")
    errors = []
    for cli in dict.fromkeys(candidates):
        try:
            result = run([cli, "version", "--format", "{{.Server.Version}}"], timeout=30, check=False)
        except subprocess.TimeoutExpired:
            errors.append(f"{cli}: no answer in 30 s")
            continue
        if result.returncode == 0 and result.stdout.strip():
            return cli
        errors.append(f"{cli}: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    raise NoEngine("no Docker engine answers (start dockerd; .ci/run does): " + "; ".join(errors))


@functools.cache
def compose() -> list[str]:
    """`docker compose` (v2 plugin) when the CLI has it, else Debian's `docker-compose` 1.29."""
    cli = docker()
    if run([cli, "compose", "version"], timeout=30, check=False).returncode == 0:
        return [cli, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    raise NoEngine("neither `docker compose` nor `docker-compose`: install Debian's docker-compose (.ci/run does)")


@functools.cache
def buildkit_cli() -> str:
    """A docker CLI that builds with BuildKit, which skips the stages a target does not need.

    The legacy builder builds every stage before the target: the server image would build the
    trainer stage (and download torch) first. A CLI with the buildx plugin builds with BuildKit;
    so does Debian's 20.10 CLI with DOCKER_BUILDKIT=1, which a newer CLI without buildx cannot.
    """
    cli = docker()
    if run([cli, "buildx", "version"], timeout=30, check=False).returncode == 0:
        return cli
    for other in (shutil.which("docker"), "/usr/bin/docker"):
        if other and os.access(other, os.X_OK):
            version = run([other, "version", "--format", "{{.Client.Version}}"], timeout=30, check=False).stdout
            if version.startswith(("19.", "20.", "21.", "22.")):
                return other
    raise NoEngine(f"no docker CLI builds with BuildKit: add the buildx plugin to {cli}, or install Debian's docker.io")


def shim_folder(folder: Path) -> Path:
    """A `docker` command for scripts that type `docker compose` and `docker build`, as users do.

    `docker compose` runs the compose v2 plugin where the CLI has it, else Debian's docker-compose
    1.29; `docker build` runs the BuildKit CLI; everything else the CLI that talks to the engine.
    Put `folder` first in PATH, with COMPOSE_DOCKER_CLI_BUILD=1 and DOCKER_BUILDKIT=1 (`env`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "docker"
    compose_cmd = " ".join(compose())
    shim.write_text(
        "#!/bin/sh\n# test machinery from tests/docker_support.py\n"
        f'if [ "$1" = compose ]; then shift; exec {compose_cmd} "$@"; fi\n'
        f'if [ "$1" = build ]; then exec {buildkit_cli()} "$@"; fi\n'
        f'exec {docker()} "$@"\n'
    )
    shim.chmod(0o755)
    return folder


def env(folder: Path, base: dict[str, str], **extra: str) -> dict[str, str]:
    """`base` plus what the README's docker commands need in tests (see `shim_folder`)."""
    return {**base, "PATH": f"{shim_folder(folder)}:{base.get('PATH', os.defpath)}", "COMPOSE_DOCKER_CLI_BUILD": "1",
            "DOCKER_BUILDKIT": "1", "BUILD_NETWORK": "host", **extra}


def debian_mirror() -> str:
    """The Debian mirror that apt on this machine is configured with, for `SUITE`."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if SUITE in fields.get("Suites", "").split() and fields.get("Types", "deb").split()[0] == "deb":
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *(sorted(sources.glob("*.list")) if sources.is_dir() else [])]:
        if path.is_file():
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", path.read_text(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def _debootstrap_rootfs(tarball: Path) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        raise NoEngine(f"{BASE_IMAGE} is missing and debootstrap is not installed to build its stand-in "
                       "(install Debian's debootstrap; .ci/run does)")
    with tempfile.TemporaryDirectory(prefix="stand-in-", dir=CACHE) as tmp:
        root = Path(tmp) / "root"
        run([debootstrap, "--variant=minbase", "--include=python3,python3-venv,python3-pip,ca-certificates",
             SUITE, str(root), debian_mirror()], timeout=900)
        for name, target in (("python", "/usr/bin/python3"), ("python3", "/usr/bin/python3"),
                             ("pip", "/usr/bin/pip3"), ("pip3", "/usr/bin/pip3")):
            link = root / "usr/local/bin" / name
            link.unlink(missing_ok=True)
            link.symlink_to(target)
        for marker in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        if HOST_CA_BUNDLE.is_file():
            bundle = root / HOST_CA_BUNDLE.relative_to("/")
            bundle.unlink(missing_ok=True)  # a symlink in some layouts: replace it with the file
            shutil.copyfile(HOST_CA_BUNDLE, bundle)
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], timeout=300)
        partial.rename(tarball)


def ensure_base_image() -> str:
    """Make sure `BASE_IMAGE` exists in the engine: the real one, or the cached stand-in.

    Returns how it got there ("present", "imported the cached stand-in", "built the stand-in").
    """
    cli = docker()
    if run([cli, "image", "inspect", BASE_IMAGE], timeout=60, check=False).returncode == 0:
        return "present"
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"{BASE_IMAGE.replace(':', '-')}.tar"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time, even across pytest runs
        if run([cli, "image", "inspect", BASE_IMAGE], timeout=60, check=False).returncode == 0:
            return "present"
        how = "imported the cached stand-in"
        if not tarball.is_file():
            _debootstrap_rootfs(tarball)
            how = "built the stand-in"
        with open(tarball, "rb") as f:
            subprocess.run([cli, "import", "--change", "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                            "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", BASE_IMAGE],
                           stdin=f, check=True, capture_output=True, timeout=300)
    return how


def find_links() -> Path:
    """pip's configured find-links folder on this machine (where the CPU build of torch lies)."""
    configured = os.environ.get("PIP_FIND_LINKS")
    if not configured:
        result = run([sys.executable, "-m", "pip", "config", "list"], timeout=60, check=False)
        m = re.search(r"find-links='([^']+)'", result.stdout)
        configured = m.group(1) if m else "/opt/wheels"
    return Path(configured.split()[0].removeprefix("file://"))


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` read-only on a loopback HTTP port; yields its URL (builds use --network host)."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(folder), **kw)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    try:  # the same URL every run, so that the build argument holding it keeps BuildKit's cache valid
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), Handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["base-image"]:
            print(f"{BASE_IMAGE}: {ensure_base_image()}")
        elif argv[:1] == ["engine"]:
            print(docker(), " ".join(compose()))
        else:
            print(__doc__)
            return 2
    except NoEngine as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
