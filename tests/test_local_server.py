"""One script: `loader_client.local_server` starts the server from the training script and ties its life to it.

Real processes throughout: the server is the `loader-server serve` command, the trainers that
die are real processes killed with SIGKILL, and what must be gone (server, workers, socket) is
looked up in /proc and on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import loader_client
from loader_client import ConfigError, LoaderClient, LoaderError, health
from loader_server.launch import alive, children_of

from .conftest import unique_label_list, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _children() -> set[int]:
    return {pid for pid in children_of(os.getpid()) if alive(pid)}


def test_ready_before_the_first_batch_and_gone_after_the_block(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 24)
    before = _children()
    with loader_client.local_server(data=listfile, batch_size=4, size="16x12", workers=2, shuffle=False) as endpoint:
        assert health(endpoint, timeout_s=5)["ok"] is True  # ready: a worker waits for the first batch
        server = next(iter(_children() - before))
        workers = [pid for pid in children_of(server) if alive(pid)]
        assert len(workers) == 2
        socket_file = Path(endpoint.removeprefix("ipc://"))
        assert socket_file.is_socket() and socket_file.parent.stat().st_mode & 0o777 == 0o700
        with LoaderClient(endpoint, timeout_s=20) as client:
            labels = [int(v) for _, y in client.epoch() for v in y]
            assert client.shared_memory  # the private ipc socket: shared memory
    assert labels == list(range(24))  # shuffle=False reached the server
    assert not alive(server) and not any(alive(pid) for pid in workers)
    assert not socket_file.parent.exists()
    assert _children() == before


def test_every_serve_setting_is_a_keyword(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 10)
    settings = dict(batch_size=4, size=(8, 6), workers=1, seed=7, drop_last=False, dtype="float32",
                    mean=(0.5, 0.5, 0.5), std=[0.25, 0.25, 0.25], layout="chw", heartbeat_s=0.2)
    with loader_client.local_server(data=str(listfile), **settings) as endpoint, \
            LoaderClient(endpoint, timeout_s=20) as client:
        assert (client.batch_size, client.steps_per_epoch, client.seed) == (4, 3, 7)  # --keep-last: 10 = 4 + 4 + 2
        assert client.x_shape == (3, 6, 8) and client.x_dtype == np.float32
        x, _ = client.next()
        assert x.min() >= -2.0 and x.max() <= 2.0  # normalised: (x / 255 - 0.5) / 0.25


@pytest.mark.parametrize(("settings", "expected"), [
    ({"batchsize": 4}, "unknown setting 'batchsize' in local_server(batchsize=...); did you mean 'batch_size'?"),
    ({"batch_size": 0}, "local_server: `batch_size` must be >= 1, got 0"),
    ({"resize": "squash"}, "`resize` must be one of stretch, letterbox, crop; got 'squash'"),
    ({"workers": "many"}, "local_server(workers=...): `workers` must be a whole number or auto, got 'many'"),
    ({"batch_size": {"a": 1}}, "local_server(batch_size={'a': 1}): a setting is text, a number"),
    ({"curve_dir": "keys"}, "local_server serves this host: leave out curve_dir"),
    ({"data": ""}, "local_server needs data=PATH"),
])
def test_a_bad_setting_is_a_config_error_naming_the_keyword(tmp_path: Path, settings: dict[str, object],
                                                            expected: str) -> None:
    listfile = unique_label_list(tmp_path / "data", 4)
    before = _children()
    with pytest.raises(ConfigError) as info:
        loader_client.local_server(**{"data": listfile, "size": "8x8", "workers": 1, **settings})
    assert expected in str(info.value), str(info.value)
    assert _children() == before  # nothing left running


def test_a_server_that_cannot_start_says_why(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=f"data set '{tmp_path}/none.txt' does not exist"):
        loader_client.local_server(data=tmp_path / "none.txt", workers=1)
    assert "LOADER_" not in capfd.readouterr().err  # the server's own line is not repeated in its words
    listfile = unique_label_list(tmp_path / "data", 4)
    with pytest.raises(LoaderError, match=r"exited with code \d+ before it was ready.*its last output"):
        loader_client.local_server(data=listfile, command=[sys.executable, "-c", "import sys; sys.exit(5)"])


def test_the_log_goes_to_a_file_when_asked(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    log = tmp_path / "server.log"
    with loader_client.local_server(data=listfile, size="8x8", batch_size=4, workers=1, log=log,
                                    log_level="INFO") as endpoint:
        with LoaderClient(endpoint, timeout_s=20) as client:
            client.next()
    assert "serving 8 samples" in log.read_text() and "client " in log.read_text()


TRAINER = """
import json, sys, time
import loader_client
server = loader_client.local_server(data=sys.argv[1], batch_size=4, size="16x12", workers=2)
client = loader_client.LoaderClient(server.endpoint, timeout_s=20)
client.next()
print(json.dumps({"server": server.pid, "endpoint": server.endpoint}), flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)  # without stop() or close(): the pipe closes with the process
time.sleep(600)
"""


@pytest.mark.parametrize("end", ["SIGKILL", "exit"])
def test_a_trainer_that_dies_leaves_no_server_and_no_workers(tmp_path: Path, end: str) -> None:
    listfile = unique_label_list(tmp_path / "data", 24)
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    with open(tmp_path / "trainer.err", "w") as err:
        trainer = subprocess.Popen([sys.executable, str(script), str(listfile), "exit" if end == "exit" else "sleep"],
                                   stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp_path)
    server = 0
    try:
        assert trainer.stdout is not None
        line = trainer.stdout.readline()
        assert line, (tmp_path / "trainer.err").read_text()
        started = json.loads(line)
        server = started["server"]
        workers = [pid for pid in children_of(server) if alive(pid)]
        assert alive(server) and len(workers) == 2
        if end == "SIGKILL":
            trainer.send_signal(signal.SIGKILL)
        trainer.wait(60)
        wait_until(lambda: not alive(server) and not any(alive(pid) for pid in workers), 60,
                   f"the server {server} and its workers {workers} to stop")
        socket_file = Path(started["endpoint"].removeprefix("ipc://"))
        wait_until(lambda: not socket_file.exists(), 10, "the socket file to go")
        # and the private folder local_server made for it, which a killed trainer cannot remove
        assert socket_file.parent.name.startswith("loader-local-")
        wait_until(lambda: not socket_file.parent.exists(), 10, "the private folder to go")
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        assert trainer.stdout is not None
        trainer.stdout.close()
        if server and alive(server):  # a failed test leaves nothing behind either
            os.kill(server, signal.SIGKILL)
