"""Several servers feeding one trainer, rank shards across servers, and CurveZMQ security."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loader_client import AuthenticationError, LoaderClient, LoaderTimeoutError
from loader_client.hosts import HostsStream

from .conftest import free_port, keygen, unique_label_list

N = 61
ARGS = ("--batch-size", "4", "--size", "16x12", "--workers", "1", "--seed", "3")


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", N)


def two_servers(start_server: Any, listfile: Path) -> list[str]:
    return [start_server(listfile, *ARGS, endpoint=f"tcp://{host}:{free_port()}").endpoint
            for host in ("127.0.0.2", "127.0.0.3")]


def take_epochs(client: LoaderClient, epochs: int) -> list[list[int]]:
    out = []
    for _ in range(epochs):
        seen: list[int] = []
        for _, y in client.epoch():
            seen.extend(y.tolist())
        out.append(seen)
    return out


def test_two_servers_on_separate_addresses_merge_every_sample_once(start_server: Any, listfile: Path) -> None:
    endpoints = two_servers(start_server, listfile)
    with LoaderClient(endpoints, timeout_s=20) as client:
        assert isinstance(client.stream, HostsStream) and client.servers == 2
        # 7 batches of 4 from each server's share of 61 // 2 = 30 samples
        assert client.steps_per_epoch == len(client) == 14
        epochs = take_epochs(client, 2)
        assert client.last is not None and client.last.batch == client.steps_per_epoch - 1
    for seen in epochs:
        assert len(seen) == len(set(seen)) == 56  # disjoint shares of 7 batches of 4, nothing twice
    assert epochs[0] != epochs[1]
    with LoaderClient(endpoints, timeout_s=20) as again:  # the merged order is deterministic
        assert take_epochs(again, 2) == epochs


def test_ranks_times_servers_get_disjoint_shares(start_server: Any, listfile: Path) -> None:
    endpoints = two_servers(start_server, listfile)
    clients = [LoaderClient(endpoints, timeout_s=20, rank=r, world_size=2) for r in range(2)]
    try:
        seen = [take_epochs(c, 1)[0] for c in clients]
    finally:
        for c in clients:
            c.close()
    union = seen[0] + seen[1]
    # 2 ranks x 2 servers: 4 shares of 61 // 4 = 15 samples, 3 batches of 4 each; 6 batches per rank.
    assert len(seen[0]) == len(seen[1]) == 24 and len(union) == len(set(union)) == 48


def test_resume_across_servers(start_server: Any, listfile: Path) -> None:
    endpoints = two_servers(start_server, listfile)
    with LoaderClient(endpoints, timeout_s=20) as client:
        full = [client.next()[1].tolist() for _ in range(20)]
    with LoaderClient(endpoints, timeout_s=20) as client:
        for _ in range(7):
            client.next()
        state = client.state_dict()
    with LoaderClient(endpoints, timeout_s=20, state=state) as client:
        rest = [client.next()[1].tolist() for _ in range(13)]
    assert rest == full[7:]


def test_losing_a_server_raises_or_continues(start_server: Any, listfile: Path) -> None:
    servers = [start_server(listfile, *ARGS, endpoint=f"tcp://{h}:{free_port()}") for h in ("127.0.0.2", "127.0.0.3")]
    endpoints = [s.endpoint for s in servers]
    strict = LoaderClient(endpoints, timeout_s=1.5, on_server_loss="raise")
    lenient = LoaderClient(endpoints, timeout_s=1.5, on_server_loss="continue")
    try:
        strict.next(), lenient.next()
        servers[1].proc.send_signal(signal.SIGKILL)
        servers[1].proc.wait(10)
        with pytest.raises(LoaderTimeoutError, match=endpoints[1].replace(".", r"\.")):
            for _ in range(50):
                strict.next()
        got = [lenient.next()[1] for _ in range(40)]  # goes on with the other server alone
        assert all(len(y) == 4 for y in got)
        assert lenient.lost and lenient.lost[0]["endpoint"] == endpoints[1] and lenient.lost[0]["share"] == 0.5
        assert lenient.steps_per_epoch == (N // 2) // 4
    finally:
        strict.close()
        lenient.close()


# ---------------------------------------------------------------------------- CURVE
@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    server_dir = tmp_path / "server-keys"
    keygen(server_dir, "server")
    keygen(tmp_path / "trainer", "trainer")
    keygen(tmp_path / "stranger", "stranger")
    (server_dir / "clients").mkdir()
    shutil.copy(tmp_path / "trainer" / "trainer.key", server_dir / "clients" / "trainer.key")  # the allow-list
    return {"dir": server_dir, "server": server_dir / "server.key", "trainer": tmp_path / "trainer" / "trainer.key_secret",
            "stranger": tmp_path / "stranger" / "stranger.key_secret"}


def test_curve_admits_the_allowed_key_and_refuses_others(start_server: Any, listfile: Path,
                                                         keys: dict[str, Path]) -> None:
    port = free_port()
    server = start_server(listfile, *ARGS, "--curve-dir", str(keys["dir"]), endpoint=f"tcp://0.0.0.0:{port}")
    endpoint = f"tcp://127.0.0.1:{port}"
    with LoaderClient(endpoint, timeout_s=20, server_public_key=str(keys["server"]),
                      client_keys=str(keys["trainer"])) as client:
        x, y = client.next()
        assert x.shape == (4, 12, 16, 3) and client.shared_memory  # same host: slots, sent encrypted
    with pytest.raises(AuthenticationError, match="authentication failed"):
        LoaderClient(endpoint, timeout_s=10, server_public_key=str(keys["server"]), client_keys=str(keys["stranger"]))
    with pytest.raises(AuthenticationError, match="requires CURVE"):
        LoaderClient(endpoint, timeout_s=10)  # no keys at all
    log = server.log_text()
    assert "CURVE on" in log and "refused a client with CURVE key" in log


def test_network_bind_needs_curve_or_insecure(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--data", str(listfile), "--bind",
                             f"tcp://0.0.0.0:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--curve-dir" in result.stderr and "--insecure" in result.stderr
    port = free_port()
    server = start_server(listfile, *ARGS, "--insecure", endpoint=f"tcp://0.0.0.0:{port}")
    with LoaderClient(f"tcp://127.0.0.1:{port}", timeout_s=20) as client:
        client.next()
    assert "WITHOUT encryption" in server.log_text()


def test_ipc_socket_is_private_to_its_owner(start_server: Any, listfile: Path, tmp_path: Path) -> None:
    server = start_server(listfile, *ARGS)
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        client.next()
    mode = Path(server.endpoint[len("ipc://"):]).stat().st_mode & 0o777
    assert mode == 0o600
