"""`loader_client.from_env()` under schedulers: Slurm's and torchrun's variables, LOADER_* winning,
Slurm's hostlist syntax, and endpoints that name nodes. No scheduler needed: environments as dicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from loader_client import client_options_from_env, endpoints_from_env
from loader_client.contract.errors import ConfigError
from loader_client.env import CLIENT_VARIABLES, Placement, placement_from_env
from loader_client.hostlist import expand_hostlist
from loader_server.layered import resolve

SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_JOB_NODELIST": "gpu-[01-04]", "SLURMD_NODENAME": "gpu-03"}
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1"}
MAX_HOSTS = 1_000_000  # README (schedulers): "at most 1,000,000 hosts" in one hostlist; never the code's constant


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu-[01-04],cpu1", ["gpu-01", "gpu-02", "gpu-03", "gpu-04", "cpu1"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[1-2]-x,b[3]", ["a1-x", "a2-x", "b3"]),
    ("node[1,3]-ib", ["node1-ib", "node3-ib"]),
])
def test_hostlists_expand_as_scontrol_show_hostnames(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-1000000]", "n[1-1000]m[1-1000]", "n[1-999999],x"])
def test_a_hostlist_of_exactly_the_documented_most_hosts_is_accepted(text: str) -> None:
    hosts = expand_hostlist(text)
    assert len(hosts) == MAX_HOSTS and hosts[0] in ("n1", "n1m1") and hosts[-1] in ("n1000000", "n1000m1000", "x")


@pytest.mark.parametrize("text, problem", [
    ("", "no host"), ("n[1-3", "'[' without ']'"), ("n1-3]", "']' without '['"), ("n[3-1]", "backwards"),
    ("n[a-b]", "not a number"), ("n[]", "not a number"), ("n1,,n2", "empty item"), ("n[[1]]", "nest"),
    ("n[0-99999999]", "1,000,000"), ("n[1-1000]m[1-1001]", "1,000,000"),
    ("n[1-1000001]", "more than 1,000,000 hosts"), ("n[1-1000]m[1-1000],x", "more than 1,000,000 hosts"),
])
def test_bad_hostlists_are_refused_naming_the_list(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="hostlist") as err:
        expand_hostlist(text)
    assert problem in str(err.value)


def test_nothing_set_is_one_process() -> None:
    p = placement_from_env({})
    assert (p.rank, p.world_size, p.local_rank, p.node_rank, p.nodes, p.source) == (0, 1, 0, 0, (), "none")
    assert p.node  # the host name


def test_slurm_step() -> None:
    assert placement_from_env(SRUN) == Placement(5, 8, 1, 2, "gpu-03", ("gpu-01", "gpu-02", "gpu-03", "gpu-04"),
                                                 "Slurm")
    without_name = {k: v for k, v in SRUN.items() if k != "SLURMD_NODENAME"}
    assert placement_from_env(without_name).node == "gpu-03"  # SLURM_NODEID indexes the node list


def test_the_batch_script_itself_is_not_a_step() -> None:
    batch = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}  # sbatch sets PROCID=0, NTASKS=job's
    p = placement_from_env(batch)
    assert (p.rank, p.world_size, p.source) == (0, 1, "none")
    assert placement_from_env({**batch, "SLURM_STEPID": "3"}).world_size == 8  # the older name of the step id


def test_torchrun_wins_over_slurm_and_loader_variables_over_both() -> None:
    p = placement_from_env({**SRUN, **TORCHRUN})  # torchrun started by srun, one per node
    assert (p.rank, p.world_size, p.local_rank, p.node_rank, p.source) == (3, 4, 1, 1, "torchrun")
    assert p.node == "gpu-03" and len(p.nodes) == 4
    p = placement_from_env({**SRUN, **TORCHRUN, "LOADER_RANK": "0", "LOADER_WORLD_SIZE": "2"})
    assert (p.rank, p.world_size, p.local_rank, p.source) == (0, 2, 1, "LOADER_*")  # local rank: torchrun's
    p = placement_from_env({**SRUN, "LOADER_RANK": "1", "LOADER_WORLD_SIZE": "2", "LOADER_LOCAL_RANK": "0"})
    assert (p.rank, p.world_size, p.local_rank, p.node_rank) == (1, 2, 0, 2)


@pytest.mark.parametrize("env, problem", [
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"LOADER_WORLD_SIZE": "2"}, "LOADER_WORLD_SIZE is set but LOADER_RANK is not"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "0 <= RANK < WORLD_SIZE"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE >= 1"),
    ({"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not a whole number"),
    ({**SRUN, "SLURM_JOB_NODELIST": "gpu-[01-"}, "SLURM_JOB_NODELIST"),
    ({**{k: v for k, v in SRUN.items() if k != "SLURMD_NODENAME"}, "SLURM_NODEID": "9"}, "SLURM_NODEID=9"),
])
def test_bad_placements_name_the_variable(env: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        placement_from_env(env)
    assert problem in str(err.value)


def test_client_options_carry_the_share_only_when_a_launcher_set_one() -> None:
    assert client_options_from_env({"LOADER_ENDPOINT": "tcp://a:1"}) == {"endpoint": "tcp://a:1"}
    assert client_options_from_env({"LOADER_ENDPOINT": "tcp://a:1", **TORCHRUN}) == {
        "endpoint": "tcp://a:1", "rank": 3, "world_size": 4}
    assert client_options_from_env({"LOADER_ENDPOINT": "tcp://a:1", **SRUN})["rank"] == 5


def test_endpoints_name_this_node_or_every_host() -> None:
    assert endpoints_from_env({"LOADER_ENDPOINT": "ipc:///tmp/loader-{node}.sock", **SRUN}) == [
        "ipc:///tmp/loader-gpu-03.sock"]
    assert endpoints_from_env({"LOADER_ENDPOINTS": "tcp://{host}:5555", "LOADER_HOSTS": "cpu[1-2]", **SRUN}) == [
        "tcp://cpu1:5555", "tcp://cpu2:5555"]
    assert endpoints_from_env({"LOADER_ENDPOINTS": "tcp://{host}:5555,tcp://extra:1", **SRUN}) == [
        *(f"tcp://gpu-0{i}:5555" for i in range(1, 5)), "tcp://extra:1"]  # SLURM_JOB_NODELIST by default
    for env, problem in [({"LOADER_ENDPOINTS": "tcp://{host}:1"}, "set LOADER_HOSTS"),
                         ({"LOADER_ENDPOINTS": "tcp://{hots}:1"}, "unknown placeholder {hots}"),
                         ({"LOADER_ENDPOINTS": "tcp://{host}:1", "LOADER_HOSTS": "a[1-"}, "LOADER_HOSTS"),
                         ({"LOADER_ENDPOINTS": "tcp://{host}:1,tcp://a1:1", "LOADER_HOSTS": "a[1-2]"}, "twice")]:
        with pytest.raises(ConfigError) as err:
            endpoints_from_env(env)
        assert problem in str(err.value), env


def test_the_server_ignores_the_clients_variables(tmp_path: Path) -> None:
    """A batch job hands one environment to its loader and trainer steps alike."""
    env = {name: "x" for name in CLIENT_VARIABLES} | {"LOADER_BATCH_SIZE": "4"}
    config, sources = resolve({"data": str(tmp_path)}, None, env)
    assert config.batch_size == 4 and sources["batch_size"] == "env LOADER_BATCH_SIZE"
    with pytest.raises(ConfigError, match="LOADER_WORKRES"):
        resolve({"data": str(tmp_path)}, None, {"LOADER_WORKRES": "2"})


def test_loader_server_uid_is_taken_by_every_client_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-user layouts set LOADER_SERVER_UID for the trainer: a script that creates its client with
    nothing but an endpoint trusts that uid's ipc server too; a bad value is named."""
    from loader_client import ClientOptions, ConfigError

    monkeypatch.setenv("LOADER_SERVER_UID", "10001")
    assert ClientOptions().server_uid == 10001
    assert ClientOptions(server_uid=7).server_uid == 7  # the keyword wins
    monkeypatch.setenv("LOADER_SERVER_UID", "loader")
    with pytest.raises(ConfigError, match="LOADER_SERVER_UID must be a user id \\(a whole number\\), got 'loader'"):
        ClientOptions()
    monkeypatch.setenv("LOADER_SERVER_UID", "4294967295")
    with pytest.raises(ConfigError, match="server_uid"):
        ClientOptions()
