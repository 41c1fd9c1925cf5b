"""The command line, the demo (the README's main job), and the public surface of both packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import loader_client
import loader_server
from loader_server.cli import build_parser


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}  # one help entry per line
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_serve_help_lists_every_flag_with_its_default() -> None:
    out = run("serve", "--help").stdout
    for flag in ("--data", "--batch-size", "--size", "--workers", "--seed", "--bind", "--prefetch", "--mode",
                 "--no-shuffle", "--drop-last", "--keep-last", "--steps-per-epoch", "--unordered", "--resize",
                 "--interpolation", "--pad-value", "--color", "--dtype", "--layout", "--mean", "--std"):
        assert flag in out, flag
    assert "(default: tcp://127.0.0.1:5555)" in out
    assert "(default: 224x224)" in out


def test_default_bind_is_loopback_and_workers_leave_a_core() -> None:
    args = build_parser().parse_args(["serve", "--data", "x"])
    assert args.bind == "tcp://127.0.0.1:5555"
    assert args.workers >= 1


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = run("demo", "--images", "96", "--batch-size", "16", "--size", "32x32", "--workers", "2",
                 "--out", str(tmp_path / "imgs"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "demo: epoch 0:" in out and "demo: epoch 1:" in out
    assert out.count("96 samples exactly once, 0 repeated") == 2
    assert "images/s" in out and out.rstrip().endswith("demo: OK")


def test_client_package_never_imports_opencv() -> None:
    code = "import sys, loader_client; assert 'cv2' not in sys.modules, 'cv2 imported'; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_public_names() -> None:
    assert set(loader_client.__all__) == {
        "LoaderClient", "BatchInfo", "batches", "health", "server_stats", "PROTOCOL_VERSION", "LoaderError", "LoaderTimeoutError", "AuthenticationError",
        "ProtocolError", "ProtocolVersionError", "ServerError", "BadSampleError", "WorkerCrashedError",
        "ConfigError", "EndpointError", "ServerStoppedError", "ClientOptions", "BatchTuple",
        "endpoints_from_env", "client_options_from_env", "from_env", "local_server", "LocalServer",
    }
    assert set(loader_server.__all__) == {"ServerConfig", "DatasetIndex", "load_index", "load_dataset", "Server"}
    for module in (loader_client, loader_server):
        for name in module.__all__:
            assert hasattr(module, name), name
    assert issubclass(loader_client.LoaderTimeoutError, TimeoutError)
    assert issubclass(loader_client.BadSampleError, loader_client.ServerError)


def test_bench_smoke_run_writes_its_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run("bench", "--quick", "--systems", "percore,service,classic", "--extras", "stall,float32,ttfb,stages",
                 "--batch-size", "16", "--size", "32x32", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    data = json.loads((out / "results.json").read_text())
    assert set(data["summary"]) == {"percore", "service", "classic"}
    assert all(v["median"] > 0 for v in data["summary"].values())
    service = data["summary"]["service"]
    for key in ("next_p50_ms", "next_p99_ms", "time_to_first_batch_s", "peak_pss_mb"):
        assert service[key] > 0, key
    assert data["stall"]["stall_pct"] >= 0 and data["float32"]["ratio_to_uint8"] > 0
    # Both step models, paced at the capacity measured in the same run.
    assert data["stall"]["step_model"] == "sleep" and data["stall_cpu"]["step_model"] == "cpu"
    assert data["stall_cpu"]["step_ms"] == data["stall"]["step_ms"] > 0 and data["stall_cpu"]["load"] > 0
    assert data["ttfb_million"]["time_to_first_batch_s"] > 0
    assert {"read", "decode", "resize", "collate", "send (Python side)"} <= set(data["stages_cpu_ms_per_image"])
    table = (out / "results.md").read_text()
    assert "| service |" in table and "ratio to 2 x per-core" in table
    assert "the trainer computes without the GIL" in table


def test_bench_cache_probe_reports_fill_paced_latency_and_where_filling_goes(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run("bench", "--quick", "--systems", "service", "--extras", "cache", "--batch-size", "16", "--size",
                 "32x32", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    cache = json.loads((out / "results.json").read_text())["cache"]
    assert set(cache["fill_profile"]) == {"256", "32"}  # records at 256 and at the output's shorter side
    for key in ("plain", "rrc_flip", "rrc_flip_32"):
        summary = cache[key]  # medians over the rounds (one with --quick)
        assert summary["rounds"] == len(summary["fill_cost_all"]) == 1, key
        assert summary["hit_ratio"] > 0 and summary["later_images_per_s"] > 0, key
        paced = summary["runs"][0]["cached"]["paced"]  # a step at 80% of the cached rate, beside next() unpaced
        assert paced["step_ms"] > 0 and paced["batches"] > 0 and 0 <= paced["stall_pct"] < 100, key
        assert paced["next_p50_ms"] <= paced["next_p99_ms"] and summary["paced"]["step_ms"] == paced["step_ms"], key
    for key in ("rrc_flip", "rrc_flip_32"):  # uncached with the same --cache-size, and from the full original
        assert cache[key]["uncached_images_per_s"] > 0 and cache[key]["original_images_per_s"] > 0, key
        assert len(cache[key]["fill_cost_vs_original_all"]) == 1 and cache[key]["speedup_vs_original"] > 0, key
    assert "fill_cost_vs_original" not in cache["plain"]
    profile = cache["fill_profile"]["256"]
    assert profile["record_shape"] == [256, 256, 3] and profile["fill"] > 0 and profile["uncached"] > 0
    assert profile["stages"]["resize to the record (miss only)"] > 0
    table = (out / "results.md").read_text()
    assert "| --augment rrc,flip --cache-size 256 |" in table and "Where filling goes" in table


def test_bench_train_probe_feeds_a_real_training_loop_three_ways(tmp_path: Path) -> None:
    """The train extra (run on a GPU box for docs/benchmarks.md) checked here on the CPU with a tiny model."""
    pytest.importorskip("torch")
    out = tmp_path / "bench"
    result = run("bench", "--quick", "--systems", "service", "--extras", "train", "--train-models", "tiny",
                 "--train-device", "cpu", "--batch-size", "16", "--size", "32x32", "--workers", "1", "--out", str(out),
                 timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    train = json.loads((out / "results.json").read_text())["train"]
    assert train["device"] == "the CPU"
    tiny = train["models"]["tiny"]
    assert tiny["model_only"]["images_per_s"] > 0
    for feed in ("service", "service_pinned_copy", "torch", "service_cached"):
        assert tiny[feed]["images_per_s"] > 0 and 0 <= tiny[feed]["stall_pct"] <= 100, feed
        assert tiny[feed]["of_ceiling"] == pytest.approx(tiny[feed]["images_per_s"] / tiny["model_only"]["images_per_s"])
    assert "| tiny |" in (out / "results.md").read_text()
