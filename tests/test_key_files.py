"""Keys and the CURVE allow-list against a second local user, for real (user 65534, nobody).

Issue 21: `keygen` followed a symbolic link that another user planted in a folder they own, and
overwrote a root-owned 0600 file (making it 0644); and the allow-list folder's modes were never
checked, so `nobody` added its key to a 0777 folder and was served.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth

from loader_client import AuthenticationError, LoaderClient

from .conftest import free_port, keygen, unique_label_list, wait_until

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root, to act as user 65534 (nobody) for real")


def as_nobody(*cmd: str, stdin: bytes | None = None) -> None:
    subprocess.run(list(cmd), user=NOBODY, group=NOBODY, extra_groups=[], input=stdin, check=True,
                   capture_output=True, timeout=30, cwd="/")


def run_keygen(folder: Path, name: str = "server") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", "keygen", str(folder), "--name", name],
                          capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------- keygen
@as_root
def test_keygen_refuses_a_folder_another_user_owns_and_never_follows_their_links(shared_tree: Path,
                                                                                 tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("root's secret\n")
    victim.chmod(0o600)
    theirs = shared_tree / "keys"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    as_nobody("ln", "-s", str(victim), str(theirs / "server.key"))  # planted by nobody, in nobody's folder
    result = run_keygen(theirs)
    assert result.returncode == 2, result.stderr
    assert f"{theirs} belongs to uid {NOBODY}" in result.stderr and "another user could plant links" in \
        result.stderr, result.stderr
    assert victim.read_text() == "root's secret\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    writable = shared_tree / "open"
    writable.mkdir()
    writable.chmod(0o777)  # ours, but anyone can plant a link there
    result = run_keygen(writable)
    assert result.returncode == 2 and "has mode 0777: group or others can write it" in result.stderr, result.stderr


def test_keygen_never_follows_a_link_in_its_own_folder(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("kept\n")
    target.chmod(0o600)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "server.key").symlink_to(target)  # the public half's name: it was overwritten and made 0644
    result = run_keygen(keys)
    assert result.returncode == 2 and "exists already: keygen never overwrites" in result.stderr, result.stderr
    assert target.read_text() == "kept\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not (keys / "server.key_secret").exists()
    result = run_keygen(keys, "trainer")  # a fresh name in the same folder: written, readable by pyzmq
    assert result.returncode == 0, result.stderr
    public, secret = zmq.auth.load_certificate(str(keys / "trainer.key_secret"))
    assert secret and zmq.auth.load_certificate(str(keys / "trainer.key"))[0] == public
    assert stat.S_IMODE((keys / "trainer.key_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "trainer.key").stat().st_mode) == 0o644


# ---------------------------------------------------------------------------- the allow-list
def curve_layout(where: Path) -> tuple[Path, Path]:
    """DIR with server keys and DIR/clients holding trainer.key; returns (DIR, trainer's secret)."""
    keys = where / "server-keys"
    keygen(keys, "server")
    keygen(where / "trainer", "trainer")
    (keys / "clients").mkdir(mode=0o700)
    shutil.copy(where / "trainer" / "trainer.key", keys / "clients" / "trainer.key")
    (keys / "clients" / "trainer.key").chmod(0o644)
    return keys, where / "trainer" / "trainer.key_secret"


@as_root
def test_an_allow_list_folder_another_user_can_write_is_refused_at_start(shared_tree: Path) -> None:
    """nobody adds its own key to a 0777 allow-list folder: the server refuses to start, naming the
    folder, its owner and its mode (before, it started and served nobody)."""
    keys, _ = curve_layout(shared_tree)
    keys.chmod(0o755)
    (keys / "clients").chmod(0o777)
    public, _ = zmq.curve_keypair()
    as_nobody("sh", "-c", f"cat > {keys / 'clients' / 'nobody.key'}",
              stdin=b'curve\n    public-key = "' + public + b'"\n')
    listfile = unique_label_list(shared_tree / "data", 8)
    result = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--data", str(listfile), "--batch-size",
                             "4", "--workers", "1", "--bind", f"tcp://127.0.0.1:{free_port()}", "--curve-dir",
                             str(keys)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"the CURVE allow-list {keys / 'clients'} is not private" in result.stderr
    assert f"{keys / 'clients'} (owner uid 0) has mode 0777: group or others can write it" in result.stderr


def test_an_allow_list_key_another_user_owns_or_a_link_is_refused(tmp_path: Path) -> None:
    from loader_client.contract.errors import ConfigError
    from loader_server.runtime.allow_list import read_allow_list

    keys, _ = curve_layout(tmp_path)
    clients = keys / "clients"
    assert len(read_allow_list(str(clients))) == 1
    (clients / "linked.key").symlink_to(tmp_path / "trainer" / "trainer.key")
    with pytest.raises(ConfigError, match="a symbolic link is refused"):
        read_allow_list(str(clients))
    (clients / "linked.key").unlink()
    (clients / "trainer.key").chmod(0o666)
    with pytest.raises(ConfigError, match="no one else may write it"):
        read_allow_list(str(clients))
    (clients / "trainer.key").chmod(0o644)
    if os.getuid() == 0:
        os.chown(clients / "trainer.key", NOBODY, NOBODY)
        with pytest.raises(ConfigError, match=f"belongs to uid {NOBODY}"):
            read_allow_list(str(clients))


def test_an_allow_list_that_becomes_writable_by_others_refuses_every_connection(start_server: Any,
                                                                                  tmp_path: Path) -> None:
    keys, secret = curve_layout(tmp_path)
    listfile = unique_label_list(tmp_path / "data", 8)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1", "--curve-dir", str(keys),
                          endpoint=endpoint)

    def connect() -> LoaderClient:
        return LoaderClient(endpoint, timeout_s=10, server_public_key=str(keys / "server.key"),
                            client_keys=str(secret))

    with connect() as client:
        client.next()
    (keys / "clients").chmod(0o777)
    with pytest.raises(AuthenticationError):
        connect()
    wait_until(lambda: "has mode 0777: group or others can write it" in server.log_text(), 10, "the refusal logged")
    (keys / "clients").chmod(0o700)
    with connect() as client:
        client.next()


def test_a_mistyped_or_wrong_key_file_is_a_config_error_naming_the_setting_and_file(tmp_path: Path) -> None:
    """Raised before anything is sent, as every client setting: a typo in a key file's name was a bare
    ValueError ("too many values to unpack" for client_keys), outside the LoaderError hierarchy."""
    from loader_client import ConfigError, LoaderError

    keygen(tmp_path, "server")
    keygen(tmp_path, "trainer1")
    (tmp_path / "garbage.key").write_text("not a certificate\n")
    server, secret = str(tmp_path / "server.key"), str(tmp_path / "trainer1.key_secret")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cases = [
        (dict(server_public_key=str(tmp_path / "server.kye"), client_keys=secret),
         f"`server_public_key` '{tmp_path}/server.kye': no such file (the server's .key file"),
        (dict(server_public_key=server, client_keys=str(tmp_path / "trainer1.key_secert")),
         f"`client_keys` '{tmp_path}/trainer1.key_secert': no such file (this client's .key_secret file"),
        (dict(server_public_key=server, client_keys=str(tmp_path / "trainer1.key")),
         f"`client_keys` '{tmp_path}/trainer1.key' holds no secret key: pass the .key_secret file"),
        (dict(server_public_key=str(tmp_path / "garbage.key"), client_keys=secret),
         f"`server_public_key` '{tmp_path}/garbage.key' is not a key file of `loader-server keygen`"),
        (dict(server_public_key="x" * 39, client_keys=secret),
         "`server_public_key`: a CURVE key is 40 characters of Z85 text or a key file, got 39 bytes"),
        (dict(server_public_key=server, client_keys=("a" * 40,)),
         "`client_keys` must be a .key_secret file or a (public, secret) pair of Z85 keys, got tuple"),
        (dict(client_keys=secret), "`client_keys` need `server_public_key` too"),
    ]
    for keys, expected in cases:
        with pytest.raises(ConfigError) as err:
            LoaderClient(endpoint, timeout_s=2, **keys)  # type: ignore[arg-type]
        assert isinstance(err.value, LoaderError) and str(err.value).startswith(expected), (keys, str(err.value))
