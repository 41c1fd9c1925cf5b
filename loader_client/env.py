"""Client settings from the environment, so that a manifest or a batch script, not the code, names
the loader hosts and this process's share.

    LOADER_ENDPOINTS=tcp://loader-0.loader:5555,tcp://loader-1.loader:5555   # or LOADER_ENDPOINT=...
    LOADER_SERVER_PUBLIC_KEY=/keys/server.key                                # CURVE servers only
    LOADER_CLIENT_KEYS=/keys/trainer1.key_secret

Where this process stands in a data-parallel job (`placement_from_env`) comes, in falling
precedence, from

* ``LOADER_RANK`` / ``LOADER_WORLD_SIZE`` / ``LOADER_LOCAL_RANK`` (set them to override a launcher);
* torchrun: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``GROUP_RANK`` is the node's);
* Slurm, inside a job step (``srun``): ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` /
  ``SLURM_NODEID``, and ``SLURM_JOB_NODELIST`` in Slurm's hostlist syntax (``gpu-[01-04],cpu1``).
  The batch script itself is not a step (Slurm sets ``SLURM_PROCID=0`` and the job's
  ``SLURM_NTASKS`` there too): a trainer started there without srun is one process, rank 0 of 1.

torchrun under srun (one torchrun per node) sets both; torchrun's ranks are the trainers', so
they win over Slurm's.

An endpoint may name nodes: ``{node}`` is this task's node (``SLURMD_NODENAME``, else the short
host name), so ``LOADER_ENDPOINT=ipc:///tmp/loader-{node}.sock`` reads this node's loader; an
endpoint with ``{host}`` stands for one endpoint per host of ``LOADER_HOSTS`` (a hostlist), or of
``SLURM_JOB_NODELIST`` when that is unset: ``LOADER_ENDPOINTS=tcp://{host}:5555`` with
``LOADER_HOSTS=cpu[1-4]`` is four loader hosts.

``from_env(**kwargs)`` returns the `LoaderClient` all this describes (several endpoints: the
merged, fail-over stream of `loader_client.hosts`); `kwargs` add to or override it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .contract.errors import ConfigError
from .hostlist import expand_hostlist

__all__ = [
    "CLIENT_VARIABLES",
    "Placement",
    "client_options_from_env",
    "endpoints_from_env",
    "from_env",
    "placement_from_env",
]

ENDPOINTS_VARIABLE = "LOADER_ENDPOINTS"
ENDPOINT_VARIABLE = "LOADER_ENDPOINT"
HOSTS_VARIABLE = "LOADER_HOSTS"
#: The LOADER_* variables that configure the client; `loader-server` ignores them in its environment.
CLIENT_VARIABLES = frozenset({ENDPOINTS_VARIABLE, ENDPOINT_VARIABLE, HOSTS_VARIABLE, "LOADER_SERVER_PUBLIC_KEY",
                              "LOADER_CLIENT_KEYS", "LOADER_RANK", "LOADER_WORLD_SIZE", "LOADER_LOCAL_RANK"})

# (rank, world size, local rank, node rank) variables of each source, in falling precedence
_SOURCES = (
    ("LOADER_*", ("LOADER_RANK", "LOADER_WORLD_SIZE", "LOADER_LOCAL_RANK", None)),
    ("torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK")),
    ("Slurm", ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")),
)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Placement:
    """Where this process stands: its rank of `world_size`, its rank on its node, its node.

    `source` says which variables decided it ("LOADER_*", "torchrun", "Slurm", or "none": one
    process). `nodes` is the job's node list (``SLURM_JOB_NODELIST`` expanded; empty outside Slurm).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node_rank: int = 0
    node: str = ""
    nodes: tuple[str, ...] = ()
    source: str = "none"


def placement_from_env(environ: Mapping[str, str] | None = None) -> Placement:
    """This process's `Placement`, from LOADER_*, torchrun's or Slurm's variables (module doc).

    Raises `ConfigError` naming the variable when one is not a number, is out of range, or
    comes without its partner (a rank without a world size).
    """
    env = os.environ if environ is None else environ
    in_step = bool(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "")).strip())
    nodes = _job_nodes(env)
    source, rank, world, local, node_rank = "none", 0, 1, None, None
    for name, (rank_var, world_var, local_var, node_var) in _SOURCES:
        if name == "Slurm" and not in_step:
            continue
        if rank_var not in env and world_var not in env:
            continue
        if rank_var not in env or world_var not in env:
            given, missing = (rank_var, world_var) if rank_var in env else (world_var, rank_var)
            raise ConfigError(f"{given} is set but {missing} is not: set both (this process's rank and the number "
                              "of ranks), or neither")
        rank, world = _int(env, rank_var, 0), _int(env, world_var, 1)
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"{rank_var}={rank} and {world_var}={world}: need {world_var} >= 1 and "
                              f"0 <= {rank_var} < {world_var}")
        source = name
        if local_var in env:
            local = _int(env, local_var, 0)
        if node_var is not None and node_var in env:
            node_rank = _int(env, node_var, 0)
        break
    if local is None:  # LOADER_RANK alone says nothing of the node: take the launcher's
        local = next((_int(env, v, 0) for v in ("LOADER_LOCAL_RANK", "LOCAL_RANK") if v in env),
                     _int(env, "SLURM_LOCALID", 0) if in_step and "SLURM_LOCALID" in env else 0)
    if node_rank is None:
        node_rank = next((_int(env, v, 0) for v in ("GROUP_RANK",) if v in env),
                         _int(env, "SLURM_NODEID", 0) if "SLURM_NODEID" in env and nodes else 0)
    if local < 0 or node_rank < 0:
        raise ConfigError(f"the local rank ({local}) and node rank ({node_rank}) must not be negative")
    node = env.get("SLURMD_NODENAME", "").strip()
    if not node and nodes and "SLURM_NODEID" in env:
        slurm_node = _int(env, "SLURM_NODEID", 0)
        if not 0 <= slurm_node < len(nodes):
            raise ConfigError(f"SLURM_NODEID={slurm_node} is outside SLURM_JOB_NODELIST ({len(nodes)} nodes)")
        node = nodes[slurm_node]
    node = node or socket.gethostname().split(".")[0]
    return Placement(rank, world, local, node_rank, node, tuple(nodes), source)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} is not a whole number") from None


def _job_nodes(env: Mapping[str, str]) -> list[str]:
    text = env.get("SLURM_JOB_NODELIST", "").strip()
    if not text:
        return []
    try:
        return expand_hostlist(text)
    except ValueError as exc:
        raise ConfigError(f"SLURM_JOB_NODELIST: {exc}") from None


def endpoints_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The endpoints in ``LOADER_ENDPOINTS`` (comma-separated), else the one in ``LOADER_ENDPOINT``,
    with ``{node}`` and ``{host}`` expanded (module doc).

    Raises `ConfigError` naming the variable when neither is set, an item is empty, an endpoint
    is not tcp:// or ipc://, a placeholder is unknown, or an endpoint is listed twice.
    """
    env = os.environ if environ is None else environ
    name = ENDPOINTS_VARIABLE if env.get(ENDPOINTS_VARIABLE, "").strip() else ENDPOINT_VARIABLE
    text = env.get(name, "").strip()
    if not text:
        raise ConfigError(f"set {ENDPOINTS_VARIABLE} to the loader servers' endpoints, comma-separated "
                          "(e.g. tcp://loader-0.loader:5555,tcp://loader-1.loader:5555), or "
                          f"{ENDPOINT_VARIABLE} to one endpoint")
    endpoints: list[str] = []
    for item in (item.strip() for item in text.split(",")):
        expanded = _expand(item, name, text, env)
        for endpoint in expanded:
            if not endpoint.startswith(("tcp://", "ipc://")) or len(endpoint) <= len("tcp://"):
                raise ConfigError(f"{name}={text!r}: {endpoint!r} is not an endpoint: each must be tcp://HOST:PORT "
                                  "or ipc://PATH, separated by commas")
        endpoints.extend(expanded)
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"{name}={text!r} lists an endpoint twice: each server once")
    return endpoints


def _expand(item: str, name: str, text: str, env: Mapping[str, str]) -> list[str]:
    """One endpoint of the list with its placeholders filled in (several for ``{host}``)."""
    fields = set(_PLACEHOLDER.findall(item))
    unknown = fields - {"node", "host"}
    if unknown:
        raise ConfigError(f"{name}={text!r}: unknown placeholder {{{sorted(unknown)[0]}}}: use {{node}} (this task's "
                          "node) or {host} (one endpoint per host of LOADER_HOSTS or SLURM_JOB_NODELIST)")
    if "node" in fields:
        item = item.replace("{node}", placement_from_env(env).node)
    if "host" not in fields:
        return [item]
    source = HOSTS_VARIABLE if env.get(HOSTS_VARIABLE, "").strip() else "SLURM_JOB_NODELIST"
    hostlist = env.get(source, "").strip()
    if not hostlist:
        raise ConfigError(f"{name}={text!r} uses {{host}}: set {HOSTS_VARIABLE} to the loader hosts (a Slurm "
                          "hostlist, e.g. cpu[1-4]), or run inside a Slurm job")
    try:
        hosts = expand_hostlist(hostlist)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return [item.replace("{host}", host) for host in hosts]


def client_options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``endpoint`` (a list when several), the CURVE keys, and ``rank``/``world_size`` when a launcher
    set them, as `LoaderClient` keyword arguments."""
    env = os.environ if environ is None else environ
    endpoints = endpoints_from_env(env)
    options: dict[str, Any] = {"endpoint": endpoints if len(endpoints) > 1 else endpoints[0]}
    server_key, client_keys = env.get("LOADER_SERVER_PUBLIC_KEY", ""), env.get("LOADER_CLIENT_KEYS", "")
    if bool(server_key) != bool(client_keys):
        raise ConfigError("LOADER_SERVER_PUBLIC_KEY and LOADER_CLIENT_KEYS go together: a CURVE server needs the "
                          "server's public key file and this trainer's .key_secret file")
    if server_key:
        options.update(server_public_key=server_key, client_keys=client_keys)
    placement = placement_from_env(env)
    if placement.source != "none":
        options.update(rank=placement.rank, world_size=placement.world_size)
    return options


def from_env(**kwargs: Any) -> Any:
    """A `LoaderClient` on the endpoints, keys and share of the environment; `kwargs` add to or override them."""
    from .client import LoaderClient

    return LoaderClient(**{**client_options_from_env(), **kwargs})
