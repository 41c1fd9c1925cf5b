"""deploy/kubernetes/: schema validation, the exact commands, and the CURVE key layout, without a cluster.

No cluster runs in CI, so: every manifest passes `kubernetes-validate` in strict mode (offline
schemas, pinned version); every loader-server command in them (container and probe) parses
with our CLI; the key Secrets, projected as the StatefulSet projects them, are what
`--curve-dir` reads: a real server starts on them, the probe command of the manifest passes
against it, and a trainer with the Job's key layout and `LOADER_ENDPOINTS` gets batches.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loader_client import client_options_from_env, endpoints_from_env, from_env
from loader_client.contract.errors import ConfigError
from loader_server.cli import build_parser

from .conftest import free_port, unique_label_list

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
#: Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSION = "1.30.0"


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def all_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every container command and exec probe."""
    for path, doc in documents():
        if doc["kind"] not in ("StatefulSet", "Job", "Deployment", "DaemonSet"):
            continue
        for c in containers(doc):
            yield f"{path.name}:{c['name']}", [*c.get("command", []), *c.get("args", [])]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    yield f"{path.name}:{c['name']}:{probe}", c[probe]["exec"]["command"]


def test_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for kust in KUBE.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kust.read_text())
        assert spec["kind"] == "Kustomization"
        for item in spec["resources"]:
            assert (kust.parent / item).is_file(), f"{kust}: {item} does not exist"
            listed.add((kust.parent / item).resolve())
    assert listed == {p.resolve() for p in manifest_files()}


def test_every_manifest_passes_strict_validation() -> None:
    import kubernetes_validate

    versions = sorted(p.name for p in (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema").iterdir())
    assert f"v{KUBERNETES_VERSION}-local-strict" in versions, f"no offline schema for {KUBERNETES_VERSION}: {versions}"
    checked = 0
    for path, doc in documents():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {exc.message} "
                        f"at {list(exc.path)}")
        checked += 1
    assert checked >= 7
    # Strict mode does catch a misspelt field (so a pass above means something).
    bad = yaml.safe_load((KUBE / "statefulset.yaml").read_text())
    bad["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_every_command_parses_with_our_cli() -> None:
    parser = build_parser()
    seen = 0
    for where, argv in all_commands():
        if argv[0] == "loader-server":
            args = parser.parse_args(argv[1:])  # exits 2 (SystemExit) on any unknown flag
            assert args.command in ("serve", "health"), where
            seen += 1
        else:  # the trainer: an example that the image copies to /app/examples/
            assert argv[0] == "python" and argv[1].startswith("/app/examples/"), where
            assert (ROOT / "examples" / argv[1].removeprefix("/app/examples/")).is_file(), where
    assert seen >= 6


def test_loaders_are_locked_down_and_sized() -> None:
    sts = resource("StatefulSet", "loader")
    spec = pod_spec(sts)
    assert spec["securityContext"]["runAsNonRoot"] is True and sts["spec"]["serviceName"] == "loader"
    assert resource("Service", "loader")["spec"]["clusterIP"] == "None"
    (c,) = spec["containers"]
    ctx = c["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/data"]["readOnly"] and volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["readOnly"]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the worker socket's private folder
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    serve = build_parser().parse_args(c["args"])
    assert serve.curve_dir == mounts["/keys"]["mountPath"]
    port = serve.bind.rsplit(":", 1)[1]
    for probe in ("readinessProbe", "livenessProbe"):
        health = build_parser().parse_args(c[probe]["exec"]["command"][1:])
        assert health.endpoint == f"tcp://127.0.0.1:{port}" and health.server_public_key and health.client_keys
    policy = resource("NetworkPolicy", "loader-only-trainers")
    assert policy["spec"]["podSelector"] == sts["spec"]["selector"]
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for name in ("trainer", "trainer-with-loader"):  # the trainers' pods carry the label the policy admits
        assert admitted.items() <= resource("Job", name)["spec"]["template"]["metadata"]["labels"].items()
    assert resource("PodDisruptionBudget", "loader")["spec"]["selector"] == sts["spec"]["selector"]


def test_trainer_job_names_every_statefulset_pod() -> None:
    sts, job = resource("StatefulSet", "loader"), resource("Job", "trainer")
    (c,) = pod_spec(job)["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in c["env"]}
    port = build_parser().parse_args(pod_spec(sts)["containers"][0]["args"]).bind.rsplit(":", 1)[1]
    names = [f"tcp://{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{port}"
             for i in range(sts["spec"]["replicas"])]
    assert endpoints_from_env(env) == names
    options = client_options_from_env(env)
    assert options["endpoint"] == names and options["client_keys"].startswith("/keys/")


def test_one_node_sidecar_shares_socket_pid_namespace_and_user() -> None:
    job = resource("Job", "trainer-with-loader")
    spec = pod_spec(job)
    (loader,), (trainer,) = spec["initContainers"], spec["containers"]
    assert loader["restartPolicy"] == "Always" and spec["shareProcessNamespace"] is True
    for c in (loader, trainer):  # one uid: the 0600 socket and /proc/<pid>/fd of the server's memfd
        assert c["securityContext"].get("runAsUser", spec["securityContext"]["runAsUser"]) == 10001
    bind = build_parser().parse_args(loader["args"]).bind
    assert bind.startswith("ipc:///")
    socket_dir = os.path.dirname(bind.removeprefix("ipc://"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in (loader, trainer):
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == socket_dir]
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert {e["name"]: e["value"] for e in trainer["env"]}["LOADER_ENDPOINTS"] == bind
    assert build_parser().parse_args(loader["startupProbe"]["exec"]["command"][1:]).endpoint == bind


def materialise(volume: dict[str, Any], secrets: dict[str, dict[str, bytes]], where: Path) -> Path:
    """Write what the kubelet would mount for a `secret` or `projected` volume (items, modes)."""
    mode = volume.get("projected", volume.get("secret", {})).get("defaultMode", 0o644)
    sources = ([s["secret"] for s in volume["projected"]["sources"]] if "projected" in volume
               else [{"name": volume["secret"]["secretName"], **volume["secret"]}])
    for source in sources:
        data = secrets[source["name"]]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            target = where / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[item["key"]])
            target.chmod(item.get("mode", mode))
    return where


@pytest.fixture
def kube_keys(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets the README creates: `kubectl create secret generic NAME --from-file=...` (key = file name)."""
    keys = tmp_path / "keys"

    def keygen(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "loader_server", "keygen", *args], check=True, capture_output=True,
                       timeout=60)

    keygen(str(keys))
    keygen(str(keys / "clients"), "--name", "trainer1")

    def secret(*files: Path) -> dict[str, bytes]:
        return {f.name: f.read_bytes() for f in files}

    return {
        "loader-server-key": secret(keys / "server.key", keys / "server.key_secret"),
        "loader-allowed-trainers": secret(keys / "clients" / "trainer1.key"),
        "loader-trainer1-key": secret(keys / "clients" / "trainer1.key_secret", keys / "server.key"),
    }


def test_key_secrets_match_what_curve_dir_reads(start_server: Any, tmp_path: Path,
                                                kube_keys: dict[str, dict[str, bytes]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sts, job = resource("StatefulSet", "loader"), resource("Job", "trainer")
    (c,) = pod_spec(sts)["containers"]
    (keys_mount,) = [m for m in c["volumeMounts"] if m["name"] == "keys"]
    volumes = {v["name"]: v for v in pod_spec(sts)["volumes"]}
    server_keys = materialise(volumes["keys"], kube_keys, tmp_path / "server-mount")
    assert oct(server_keys.joinpath("server.key_secret").stat().st_mode & 0o777) == "0o440"
    # The manifest's own serve arguments, with the mount moved here and a loopback address.
    args = build_parser().parse_args(c["args"])
    data = unique_label_list(tmp_path / "data", 24)
    endpoint = f"tcp://127.0.0.2:{free_port()}"
    server = start_server(data, "--curve-dir", str(server_keys), "--batch-size", "4", "--size", "16x12",
                          "--workers", "1", "--prefetch", str(args.prefetch), endpoint=endpoint)
    # The probe command of the manifest, run as is (paths moved to the materialised mount).
    probe = [part.replace(keys_mount["mountPath"], str(server_keys)).replace("tcp://127.0.0.1:5555", endpoint)
             for part in c["readinessProbe"]["exec"]["command"]]
    result = subprocess.run([sys.executable, "-m", "loader_server", *probe[1:]], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "ok=True" in result.stdout, result.stderr
    without_keys = subprocess.run([sys.executable, "-m", "loader_server", "health", endpoint, "--timeout-s", "1"],
                                  capture_output=True, text=True, timeout=60)
    assert without_keys.returncode == 1  # CURVE is really on
    # The trainer: its Secret mounted as the Job mounts it, its environment as the Job sets it.
    (t,) = pod_spec(job)["containers"]
    (tmount,) = [m for m in t["volumeMounts"] if m["name"] == "keys"]
    tvolumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    trainer_keys = materialise(tvolumes["keys"], kube_keys, tmp_path / "trainer-mount")
    for e in t["env"]:
        value = e["value"].replace(tmount["mountPath"], str(trainer_keys))
        monkeypatch.setenv(e["name"], endpoint if e["name"] == "LOADER_ENDPOINTS" else value)
    assert server.endpoint == endpoints_from_env()[0]
    with from_env(timeout_s=20) as client:
        assert client.endpoint == endpoint and len(client.next()[1]) == 4


@pytest.mark.parametrize("value, problem", [
    ("", "set LOADER_ENDPOINTS"),
    ("tcp://a:1,,tcp://b:2", "is not an endpoint"),
    ("http://a:1", "is not an endpoint"),
    ("tcp://a:1,tcp://a:1", "twice"),
])
def test_endpoints_from_env_refuses_bad_lists(value: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        endpoints_from_env({"LOADER_ENDPOINTS": value})


def test_endpoints_from_env_reads_either_variable() -> None:
    assert endpoints_from_env({"LOADER_ENDPOINTS": " tcp://a:1 , ipc:///run/x.sock"}) == ["tcp://a:1", "ipc:///run/x.sock"]
    assert endpoints_from_env({"LOADER_ENDPOINT": "tcp://a:1"}) == ["tcp://a:1"]
    assert client_options_from_env({"LOADER_ENDPOINT": "tcp://a:1"}) == {"endpoint": "tcp://a:1"}
    with pytest.raises(ConfigError, match="go together"):
        client_options_from_env({"LOADER_ENDPOINT": "tcp://a:1", "LOADER_CLIENT_KEYS": "/k"})


def test_health_with_half_the_curve_keys_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "loader_server", "health", "tcp://127.0.0.1:1",
                             "--server-public-key", "x.key"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "go together" in result.stderr, shlex.join(result.args)
