"""Every value the server produces fits every schema it passes through, and every setting has a finite range.

Issue 21: one valid hello at the last batch of epoch 2**31-1 made the next task's epoch 2**31,
which the worker's schema refuses: the worker exited, again and again, and the crashes were
charged to whichever batch it held, another trainer's. And NaN or huge settings were taken:
``heartbeat_s = nan`` gave a traceback, ``client_timeout_s = nan`` turned dead-client detection
off, ``--prefetch 10**30`` hung the loop and ``workers = 100000`` was accepted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from loader_client import LoaderClient
from loader_client.contract import protocol
from loader_client.contract.errors import ConfigError
from loader_client.contract.messages import Batch, Hello
from loader_client.contract.sampling import SamplingPlan
from loader_server.config import RANGES, ServerConfig, _shown
from loader_server.runtime.outgoing import OutOfRange, checked, error_message
from loader_server.runtime.sessions import Session, StreamFacts, open_session
from loader_server.runtime.worker_messages import Task

from .conftest import unique_label_list

V = protocol.PROTOCOL_VERSION
README = Path(__file__).resolve().parent.parent / "README.md"
MAX_EPOCH = 2**31 - 1  # README: "a stream ends after the last batch of epoch 2**31 − 1" (not the code's constant)
INT32_MAX = 2**31 - 1  # README: "positions below 2**31" ("epochs are 32-bit on the wire")


# ---------------------------------------------------------------------------- the epoch edge
def test_a_session_never_schedules_past_the_last_epoch() -> None:
    plan = SamplingPlan(40, 4)
    facts = StreamFacts(batch_size=4, num_samples=40, default_seed=0, fingerprint="a-b", prefetch=8, in_order=True,
                        augment_available=False)
    opened = open_session(Hello(epoch=MAX_EPOCH, batch=7, credit=8), "c", steps_for=plan.steps_per_epoch,
                          facts=facts, now=0.0)
    assert isinstance(opened, Session)
    positions = opened.to_build()
    assert [opened.place(p) for p in positions] == [(MAX_EPOCH, 7), (MAX_EPOCH, 8), (MAX_EPOCH, 9)]  # and no more
    assert max(opened.place(p)[0] for p in positions) <= INT32_MAX
    for p in positions:
        opened.built(p, object())
    while (item := opened.sendable()) is not None:
        assert not opened.finished
        opened.sent(item[0], 0.0)
    assert opened.finished and opened.to_build() == []


def test_a_task_or_batch_out_of_its_schema_is_never_built() -> None:
    ok = Task(id=1, indices=b"\0" * 8, seed=0, epoch=INT32_MAX, augment=False)
    assert checked(ok) is ok
    with pytest.raises(OutOfRange, match="field 'epoch' must be between 0 and 2147483647, got 2147483648"):
        checked(Task(id=1, indices=b"\0" * 8, seed=0, epoch=INT32_MAX + 1, augment=False))
    with pytest.raises(OutOfRange, match="'steps'"):
        checked(Batch(epoch=0, batch=0, steps=2**31, arrays=[]))
    cut = error_message("server", "x" * 100_000, path="p" * 10_000, exit_code=1000)
    assert len(cut.message) <= 1 << 16 and len(cut.path or "") <= 4096 and cut.exit_code is None
    assert checked(cut) is cut


@pytest.mark.parametrize("share", [None, "edge"], ids=["own-stream", "share"])
def test_the_epoch_edge_ends_the_stream_and_charges_nobody(start_server: Any, tmp_path: Path,
                                                            share: str | None) -> None:
    """15 hellos at the last batch of epoch 2**31-1, while a trainer is served: each gets that batch and
    then an error naming the limit; no worker dies, and the trainer never sees a crash. With a share
    (Hello.share): two members join it at the edge each round, and the share's one build of each
    batch stops at the edge just the same."""
    listfile = unique_label_list(tmp_path / "data", 40)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2", "--no-shuffle")
    errors: list[BaseException] = []
    got = [0]

    def trainer() -> None:
        try:
            with LoaderClient(server.endpoint, timeout_s=30) as client:
                for _ in range(60):
                    client.next()
                    got[0] += 1
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=trainer)
    t.start()
    ctx = zmq.Context()
    hello = {"v": V, "t": "hello", "epoch": INT32_MAX, "batch": 9, "credit": 8, "shm": False,
             **({"share": share} if share else {})}
    try:
        for _ in range(15 if share is None else 8):
            members = []
            for _ in range(1 if share is None else 2):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(server.endpoint)
                s.send(msgpack.packb(hello))
                members.append(s)
            for s in members:
                seen = []
                while len(seen) < 3 and s.poll(20_000):
                    header = protocol.unpack(s.recv_multipart()[0])
                    if header["t"] != "heartbeat":
                        seen.append(header)
                assert [h["t"] for h in seen] == ["welcome", "batch", "error"], seen
                assert seen[0].get("share") == share, seen[0]
                assert (seen[1]["epoch"], seen[1]["batch"]) == (INT32_MAX, 9)
                assert seen[2]["kind"] == "config" and "the end of epoch 2147483647" in seen[2]["message"]
            for s in members:
                s.close(linger=0)
    finally:
        ctx.term()
        t.join(120)
    assert not errors, errors
    assert got[0] == 60
    assert "died with exit code" not in server.log_text()
    assert "worker" not in " ".join(line for line in server.log_text().splitlines() if " ERROR " in line)


# ---------------------------------------------------------------------------- settings ranges
def test_every_numeric_setting_has_a_finite_range_documented_in_the_readme() -> None:
    text = README.read_text()
    numeric = [f.name for f in dataclasses.fields(ServerConfig)
               if re.search(r"\b(int|float)\b", str(f.type)) and "tuple" not in str(f.type) and "Literal" not in
               str(f.type)]
    assert sorted(numeric) == sorted(RANGES), set(numeric) ^ set(RANGES)
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    for name, (low, high) in RANGES.items():
        assert math.isfinite(low) and math.isfinite(high) and low <= high
        flag = "--" + name.replace("_", "-")
        span = f"| {_shown(low)} to {_shown(high)} |"
        assert any(f"`{flag}`" in row and span in row for row in rows), f"no README row says {flag} {span}"


@pytest.mark.parametrize(("settings", "message"), [
    ({"heartbeat_s": math.nan}, "`heartbeat_s` must be a finite number from 0.01 to 3600, got nan"),
    ({"client_timeout_s": math.nan}, "`client_timeout_s` must be a finite number"),
    ({"client_timeout_s": math.inf}, "`client_timeout_s` must be a finite number"),
    ({"prefetch": 10**30}, "`prefetch` must be <= 1000, got 1000000000000000000000000000000 (its range: 1 to 1000)"),
    ({"workers": 100_000}, "`workers` must be <= 1024, got 100000"),
    ({"batch_size": 2**21}, "`batch_size` must be <= 1048576"),
    ({"max_bad": math.nan}, "`max_bad` must be a finite number"),
    ({"simulate_read_latency_ms": math.inf}, "`simulate_read_latency_ms` must be a finite number"),
    ({"batch_timeout_s": math.nan}, "`batch_timeout_s` must be a finite number"),
    ({"log_interval_s": -math.inf}, "`log_interval_s` must be a finite number"),
    ({"max_message_bytes": 2**41}, "`max_message_bytes` must be <= 1099511627776"),
    ({"steps_per_epoch": 2**31, "mode": "random"}, "`steps_per_epoch` must be <= 2147483647"),
    ({"max_clients": 10**6}, "`max_clients` must be <= 4096"),
    ({"heartbeat_s": True}, "`heartbeat_s` must be a finite number"),
    ({"dtype": "float32", "mean": (math.nan, 0.5, 0.5), "std": (1.0, 1.0, 1.0)}, "`mean` values must be finite"),
])
def test_out_of_range_settings_are_refused_naming_setting_rule_and_value(settings: dict[str, Any],
                                                                         message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(data="unused", **settings)
    assert message in str(info.value)


def test_ranges_hold_at_both_ends() -> None:
    """Both ends of each range are accepted, and the next value past the top is refused."""
    needs = {"heartbeat_s": lambda v: {"client_timeout_s": max(30.0, v * 2)},
             "client_timeout_s": lambda v: {"heartbeat_s": min(1.0, v / 2)},
             "steps_per_epoch": lambda v: {"mode": "random"},
             "val_fraction": lambda v: {"subset": "train"} if 0 < v < 1 else {},
             "cache_size": lambda v: {"size": (1, 1), "augment": "rrc"},
             "workers_min": lambda v: {"workers": "auto", "workers_max": 1024},
             "workers_max": lambda v: {"workers": "auto"}}
    for name, (low, high) in RANGES.items():
        integer = isinstance(ServerConfig.__dataclass_fields__[name].default, int) or name in (
            "workers", "prefetch", "maxlen", "read_threads", "steps_per_epoch", "metrics_port", "cache_size",
            "workers_min", "workers_max", "share_window")
        for value in (low, high):
            value = int(value) if integer else float(value)
            extra = needs.get(name, lambda v: {})(value)
            if name == "val_fraction" and value in (0.0, 1.0):
                if value == 1.0:
                    continue  # 1 is the range's end; --subset needs it below 1 (tested with the subsets)
            ServerConfig(data="unused", **{name: value}, **extra)
        over = int(high) + 1 if integer else float(high) * 1.5 + 1
        with pytest.raises(ConfigError, match=f"`{name}` must be"):
            ServerConfig(data="unused", **{name: over}, **needs.get(name, lambda v: {})(high))


def refused_at_start(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `loader-server serve ...`, which must exit at once (a server that starts is stopped, and fails the test)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        pytest.fail(f"the server started with {args[5:]} instead of refusing the setting")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize(("where", "value"), [("env", "nan"), ("flag", "nan"), ("toml", "nan"), ("env", "1e400")])
def test_nan_and_huge_values_from_every_layer_are_a_clear_error(tmp_path: Path, where: str, value: str) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    env = {**os.environ}
    args = [sys.executable, "-m", "loader_server", "serve", "--data", str(listfile), "--bind",
            f"ipc://{tmp_path}/s.sock", "--batch-size", "4", "--workers", "1"]
    if where == "env":
        env["LOADER_HEARTBEAT_S"] = value
    elif where == "flag":
        args += ["--heartbeat-s", value]
    else:
        (tmp_path / "s.toml").write_text(f"heartbeat_s = {value}\n")
        args += ["--config", str(tmp_path / "s.toml")]
    result = refused_at_start(args, env)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert "`heartbeat_s` must be a finite number from 0.01 to 3600" in result.stderr, result.stderr[-2000:]


def test_a_huge_prefetch_is_refused_before_the_loop_starts(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    result = refused_at_start([sys.executable, "-m", "loader_server", "serve", "--data", str(listfile), "--bind",
                               f"ipc://{tmp_path}/s.sock", "--batch-size", "4", "--workers", "1", "--prefetch",
                               str(10**30)], dict(os.environ))
    assert result.returncode == 2 and "`prefetch` must be <= 1000" in result.stderr, result.stderr


def test_the_welcome_of_every_accepted_config_fits_its_schema(tmp_path: Path) -> None:
    """The fields a welcome takes from the settings (heartbeat, size bound, batch size) at their extremes."""
    from loader_client.contract.messages import Welcome

    for heartbeat, size, batch in ((0.01, 1, 1), (3600.0, 1 << 40, 1 << 20)):
        config = ServerConfig(data="unused", heartbeat_s=heartbeat, client_timeout_s=heartbeat * 2,
                              max_message_bytes=size, batch_size=batch)
        checked(Welcome(num_samples=10, num_classes=None, batch_size=config.batch_size, steps_per_epoch=1, rank=0,
                        world_size=1, seed=config.seed, epoch=0, batch=0, mode=config.mode, in_order=True,
                        drop_last=True, shuffle=config.shuffle, x_shape=[224, 224, 3], x_dtype="uint8", layout="hwc", color="rgb",
                        class_names=None, fingerprint="a-b", heartbeat_s=config.heartbeat_s,
                        max_message_bytes=config.max_message_bytes))
    assert np.iinfo(np.int32).max == INT32_MAX
