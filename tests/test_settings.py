"""Settings: one definition per setting (field metadata), from which the command line is built."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loader_client.contract.errors import ConfigError
from loader_server.cli import build_parser, config_from_args, main, subparser
from loader_server.config import ServerConfig
from loader_server.data.batch_spec import BatchSpec, batch_spec
from loader_server.data.datasets import load_dataset

from .conftest import unique_label_list

#: Every flag the command line had before settings were generated from the config definition.
OLD_FLAGS = (
    "--config", "--print-config", "--data", "--labels", "--offsets", "--maxlen", "--pad", "--truncate",
    "--batch-size", "--size", "--workers", "--seed", "--bind", "--curve-dir", "--insecure", "--prefetch", "--mode",
    "--no-shuffle", "--drop-last", "--keep-last", "--steps-per-epoch", "--unordered", "--resize", "--interpolation",
    "--pad-value", "--color", "--dtype", "--layout", "--augment", "--transform", "--collate", "--no-reduced-decode",
    "--on-error", "--max-bad", "--max-pixels", "--no-shm", "--read-threads", "--simulate-read-latency-ms", "--mean",
    "--std", "--batch-timeout-s", "--heartbeat-s", "--client-timeout-s", "--log-level", "--log-format",
    "--log-interval-s", "--metrics-port",
)


def serve_help() -> str:
    env = {**os.environ, "COLUMNS": "300"}  # one help entry per line
    result = subprocess.run([sys.executable, "-m", "loader_server", "serve", "--help"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def help_entry(text: str, flag: str) -> str:
    """The help entry of `flag`, on one line."""
    for entry in re.split(r"\n(?=  -)", text):
        if re.match(rf"\s+{re.escape(flag)}(?=[\s,])", entry):
            return " ".join(entry.split())
    raise AssertionError(f"{flag} not in --help")


def test_help_shows_what_a_boolean_flag_does_by_default_never_its_settings_value() -> None:
    out = serve_help()
    for flag in OLD_FLAGS + ("--metrics-host", "--subset", "--val-fraction", "--split-seed"):
        help_entry(out, flag)
    assert "(default: True)" not in out and "(default: False)" not in out and "(default: None)" not in out
    for flag, shown in {"--no-shuffle": "off", "--no-shm": "off", "--unordered": "off", "--drop-last": "on",
                        "--keep-last": "off", "--insecure": "off", "--no-reduced-decode": "off"}.items():
        assert help_entry(out, flag).endswith(f"(default: {shown})"), (flag, help_entry(out, flag))
    assert help_entry(out, "--size").endswith("(default: 224x224)")
    assert help_entry(out, "--max-bad").endswith("(default: 0.1%)")
    assert help_entry(out, "--metrics-host").endswith("(default: 127.0.0.1)")


def test_every_setting_has_one_flag_whose_default_is_the_fields() -> None:
    parser = build_parser()
    serve = subparser(parser, "serve")
    dests = {a.dest for a in serve._actions}
    for f in dataclasses.fields(ServerConfig):
        assert f.name in dests, f"setting {f.name} has no flag"
        assert f.metadata["help"] or f.metadata["flags"], f"setting {f.name} has no help"
    # Parsing no flags gives exactly the dataclass's defaults: the CLI has no defaults of its own.
    args = parser.parse_args(["serve", "--data", "x"])
    assert config_from_args(args) == ServerConfig(data="x")
    # Each boolean flag sets its setting; the pair --drop-last/--keep-last stays exclusive.
    flags = {"--no-shuffle": ("shuffle", False), "--no-shm": ("shm", False), "--unordered": ("in_order", False),
             "--keep-last": ("drop_last", False), "--insecure": ("insecure", True),
             "--no-reduced-decode": ("reduced_decode", False)}
    for flag, (name, value) in flags.items():
        assert getattr(config_from_args(parser.parse_args(["serve", "--data", "x", flag])), name) is value
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--data", "x", "--drop-last", "--keep-last"])


def test_no_data_derived_field_in_the_config() -> None:
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    assert not names & {"sample_shape", "sample_dtype", "x_shape", "x_dtype", "batch_bytes"}
    assert not hasattr(ServerConfig, "x_shape") and not hasattr(ServerConfig, "batch_bytes")


def test_batch_spec_of_images_and_of_arrays(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "img", 6)
    config = ServerConfig(data=str(listfile), batch_size=4, size=(32, 16), layout="chw", dtype="float32")
    spec = batch_spec(config, load_dataset(config))
    assert spec == BatchSpec(4, (3, 16, 32), "<f4", "decode", "chw", "rgb", 3)
    assert spec.batch_bytes == 4 * 3 * 16 * 32 * 4 and spec.allocate().shape == (4, 3, 16, 32)
    np.save(tmp_path / "x.npy", np.zeros((10, 5, 2), np.int16))
    np.save(tmp_path / "y.npy", np.arange(10))
    arrays = ServerConfig(data=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), batch_size=3)
    spec = batch_spec(arrays, load_dataset(arrays))
    assert (spec.x_shape, spec.x_dtype, spec.build, spec.channels) == ((5, 2), "<i2", "gather", None)
    assert spec.batch_bytes == 3 * 5 * 2 * 2
    assert arrays == ServerConfig(data=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), batch_size=3)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"dtype": "float32"}, "--dtype apply to images only"),
    ({"layout": "chw", "augment": "flip"}, "--augment, --layout apply to images only"),
    ({"batch_size": 11}, "`batch_size` 11 is larger than the data set (10 samples"),
    ({"max_message_bytes": 50}, "one batch would be 80 bytes, above `max_message_bytes` (50)"),
])
def test_settings_that_do_not_fit_the_data_name_the_setting(tmp_path: Path, settings: dict[str, object],
                                                            expected: str) -> None:
    np.save(tmp_path / "x.npy", np.zeros((10, 5), np.float32))
    np.save(tmp_path / "y.npy", np.arange(10))
    config = ServerConfig(data=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"),
                          **{"batch_size": 4, **settings})  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        batch_spec(config, load_dataset(config))
    assert expected in str(err.value)


@pytest.mark.parametrize(("args", "expected"), [
    (["--labels", "y.npy"], "--labels applies to array data sets only; --data {data} is list file"),
    (["--maxlen", "5", "--pad", "post"], "--maxlen, --pad apply to array data sets only"),
    (["--subset", "val"], "`subset` val needs `val_fraction` between 0 and 1"),
    (["--val-fraction", "0.2"], "`val_fraction` 0.2 needs --subset train or val"),
    (["--metrics-host", "no host!"], "`metrics_host` must be an IP address or a host name"),
    (["--metrics-port", "99999"], "`metrics_port` must be a TCP port"),
    (["--bind", "localhost:5555"], "got 'localhost:5555' (did you mean tcp://localhost:5555?)"),  # as the client says
    # ZeroMQ would bind 99999 as port 34463 (99999 - 65536) while the log said 99999; 0 as a port no log names
    (["--bind", "tcp://127.0.0.1:99999"], "needs a port between 1 and 65535, got '99999'"),
    (["--bind", "tcp://127.0.0.1:0"], "needs a port between 1 and 65535, got '0'"),
    (["--bind", "tcp://127.0.0.1:*"], "needs a port between 1 and 65535, got '*'"),
    (["--bind", "tcp://127.0.0.1"], "`bind` 'tcp://127.0.0.1' names no port"),
    (["--bind", "tcp://:5555"], "`bind` 'tcp://:5555' names no host"),
])
def test_options_that_exclude_each_other_fail_at_start_up(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          args: list[str], expected: str) -> None:
    listfile = unique_label_list(tmp_path, 4)
    code = main(["serve", "--data", str(listfile), "--batch-size", "2", "--bind", f"ipc://{tmp_path}/s.sock",
                 *args])
    assert code == 2
    assert expected.format(data=listfile) in capsys.readouterr().err


def test_metrics_host_comes_from_every_layer(tmp_path: Path) -> None:
    from loader_server.layered import resolve

    assert ServerConfig(data="x").metrics_host == "127.0.0.1"
    config, sources = resolve({}, None, {"LOADER_DATA": "x", "LOADER_METRICS_HOST": "0.0.0.0"})
    assert config.metrics_host == "0.0.0.0" and sources["metrics_host"] == "env LOADER_METRICS_HOST"
    assert ServerConfig(data="x", metrics_host="::").fingerprint() == ServerConfig(data="x").fingerprint()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADER_")}
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


def _settings(printed: str) -> list[str]:
    """The printed lines without their `# source` comments."""
    return [line.rsplit("  # ", 1)[0] for line in printed.splitlines()]


def test_print_config_round_trips_through_config(tmp_path: Path) -> None:
    import tomllib

    listfile = unique_label_list(tmp_path / "data", 10)
    first = _cli("serve", "--data", str(listfile), "--batch-size", "2", "--size", "40x30", "--dtype", "float32",
                 "--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2", "--max-bad", "0.5%", "--no-shuffle",
                 "--keep-last", "--augment", 'flip(0.5),jitter(0.2)', "--subset", "train", "--val-fraction", "0.2",
                 "--split-seed", "7", "--metrics-host", "0.0.0.0", "--log-interval-s", "2.5", "--print-config")
    assert first.returncode == 0, first.stderr
    printed = tomllib.loads(first.stdout)  # valid TOML
    assert printed["size"] == "40x30" and printed["mean"] == [0.5, 0.4, 0.3] and printed["shuffle"] is False
    assert printed["max_bad"] == 0.005 and printed["subset"] == "train" and printed["metrics_host"] == "0.0.0.0"
    assert "labels" not in printed and "# labels = (not set)  # default" in first.stdout.splitlines()
    assert "None" not in first.stdout and "[40, 30]" not in first.stdout
    config = tmp_path / "printed.toml"
    config.write_text(first.stdout)
    second = _cli("serve", "--config", str(config), "--print-config")
    assert second.returncode == 0, second.stderr
    assert _settings(second.stdout) == _settings(first.stdout)  # identical, apart from where each came from
    assert f"batch_size = 2  # file {config}" in second.stdout.splitlines()
    third_file = tmp_path / "again.toml"
    third_file.write_text(second.stdout)
    third = _cli("serve", "--config", str(third_file), "--print-config")
    assert _settings(third.stdout) == _settings(first.stdout)


@pytest.mark.parametrize(("args", "expected"), [
    (["--data", "{tmp}/nope.txt"], "data set '{tmp}/nope.txt' does not exist"),
    (["--data", "{list}", "--batch-size", "50"], "`batch_size` 50 is larger than the data set (10 samples"),
    (["--data", "{list}", "--subset", "val", "--val-fraction", "0.01"], "gives 0 validation samples"),
])
def test_print_config_validates_what_it_prints(tmp_path: Path, args: list[str], expected: str) -> None:
    listfile = unique_label_list(tmp_path / "data", 10)
    fill = {"tmp": tmp_path, "list": listfile}
    result = _cli("serve", *[a.format(**fill) for a in args], "--print-config")
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected.format(**fill) in result.stderr and result.stdout == ""


@pytest.mark.parametrize(("command", "words", "expected"), [
    ("serve", ["--batchsize", "32"], "unrecognized arguments: --batchsize 32; --batchsize: did you mean "
                                     "--batch-size?; `loader-server serve --help` lists every flag"),
    ("serve", ["--no-shufle", "--sede=3"], "--no-shufle: did you mean --no-shuffle?; --sede: did you mean --seed?"),
    ("check", ["--bogus"], "unrecognized arguments: --bogus; `loader-server check --help` lists every flag"),
])
def test_a_mistyped_flag_is_answered_with_the_flag_meant(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        command: str, words: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--data", str(unique_label_list(tmp_path, 4)), *words])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_pattern_the_shell_expanded_is_answered_with_quotes(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`--data shards/train-*.tar` unquoted: the shell passes every shard, and all but the first are not flags."""
    shards = [tmp_path / f"train-{i:06d}.tar" for i in range(3)]
    for shard in shards:
        shard.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["check", "--data", *map(str, shards)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {shards[1]} {shards[2]}; the shell expanded a pattern into several paths: " \
           "quote it, as in --data 'shards/train-*.tar'" in err
    assert "did you mean" not in err and "--help" not in err
