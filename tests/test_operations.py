"""Operating the server: layered configuration, stats, Prometheus metrics, logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from loader_client import LoaderClient, server_stats

from .conftest import free_port, unique_label_list, wait_until


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_settings_from_file_environment_and_flags_in_that_order(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    toml = tmp_path / "loader.toml"
    toml.write_text(f'data = "{listfile}"\nbatch-size = 4\nsize = [32, 16]\nseed = 1\nworkers = 3\n'
                    'mean = [0.5, 0.5, 0.5]\ndtype = "float32"\n')
    result = cli("serve", "--config", str(toml), "--seed", "9", "--print-config",
                 env={"LOADER_SEED": "5", "LOADER_WORKERS": "2", "LOADER_SHUFFLE": "false"})
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    assert lines["batch_size"] == f"4  # file {toml}"
    assert lines["size"] == f'"32x16"  # file {toml}'  # TOML that --config reads back
    assert lines["workers"] == "2  # env LOADER_WORKERS"  # the environment beats the file
    assert lines["seed"] == "9  # flag --seed"  # a flag beats both
    assert lines["shuffle"] == "false  # env LOADER_SHUFFLE"
    assert lines["mean"] == f"[0.5, 0.5, 0.5]  # file {toml}"
    assert "# prefetch = (not set)  # default" in result.stdout.splitlines()  # auto: max(8, 2 x workers)


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("batch_sise = 4\n", {}, "unknown setting 'batch_sise' in --config"),
        ("", {"LOADER_WROKERS": "2"}, "unknown setting 'wrokers' in environment variable LOADER_WROKERS"),
        ("", {"LOADER_BATCH_SIZE": "many"}, "environment variable LOADER_BATCH_SIZE: `batch_size` = 'many'"),
        ("size = \"big\"\n", {}, "`size` must look like WIDTHxHEIGHT"),
        ("workers = 0\n", {}, "`workers` must be >= 1, got 0"),
    ],
)
def test_bad_settings_name_the_key_and_suggest(tmp_path: Path, toml: str, env: dict[str, str],
                                               expected: str) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    path = tmp_path / "loader.toml"
    path.write_text(f'data = "{listfile}"\n' + toml)
    result = cli("serve", "--config", str(path), "--print-config", env=env)
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr
    if "sise" in toml:
        assert "did you mean 'batch_size'?" in result.stderr
    if "WROKERS" in str(env):
        assert "did you mean 'workers'?" in result.stderr


def test_stats_from_client_and_command(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 40)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=20, name="trainer-a") as client:
        for _ in range(12):
            client.next()
        stats = client.stats()
        assert stats["batches_taken"] == 12 and 0 <= stats["stall_fraction"] <= 1 and stats["wait_s"] >= 0
        srv = stats["server"]
        assert srv["batches_sent"] >= 12 and srv["images_sent"] >= 48 and srv["bytes_sent"] > 0
        assert srv["images_per_s"] > 0 and srv["uptime_s"] > 0 and srv["fingerprint"] == client.fingerprint
        assert [c["name"] for c in srv["clients"]] == ["trainer-a"]
        assert len(srv["workers"]) == 2 and all(w["state"] in ("busy", "idle") for w in srv["workers"])
        assert all(0 <= w["busy_fraction"] <= 1 for w in srv["workers"])
        build = srv["batch_build_seconds"]  # each count with its bucket's upper bound, as Prometheus's `le`
        assert len(build["le_s"]) == len(build["counts"]) and build["le_s"][-1] == "+Inf"
        assert build["le_s"][:-1] == sorted(build["le_s"][:-1]) and sum(build["counts"]) >= 12
        result = cli("stats", server.endpoint)
        assert result.returncode == 0
        printed = json.loads(result.stdout)
        assert printed["clients"][0]["name"] == "trainer-a" and printed["batch_build_seconds"]["le_s"][0] == 0.005
    assert server_stats(server.endpoint)["errors_by_reason"] == {}
    missing = cli("stats", f"ipc://{tmp_path}/none.sock", "--timeout-s", "0.5")
    assert missing.returncode == 1 and "no stats answer" in missing.stderr


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_prometheus_metrics(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 40)
    (tmp_path / "data" / "img" / "00002.jpg").write_bytes(b"")  # one bad file, skipped
    port = free_port()
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2", "--on-error", "skip",
                          "--max-bad", "5", "--no-shuffle", "--metrics-port", str(port))
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        for _ in range(10):
            client.next()
        wait_until(lambda: "loader_batches_sent_total 1" in _get(f"http://127.0.0.1:{port}/metrics")[1], 10,
                   "the metrics to show sent batches")
    status, text = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert '# TYPE loader_batches_sent_total counter' in text
    assert 'loader_decode_errors_total{reason="empty"} 1' in text
    assert 'loader_batch_build_seconds_bucket{le="+Inf"}' in text and "loader_batch_build_seconds_count" in text
    assert 'loader_workers_busy_ratio{worker="0"}' in text and "loader_uptime_seconds" in text
    assert _get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
    assert _get(f"http://127.0.0.1:{port}/nothing")[0] == 404


def test_json_logs_and_throughput_lines(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 40)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1", "--log-format", "json",
                          "--log-interval-s", "0.3")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        for _ in range(5):
            client.next()
        wait_until(lambda: "over the last minute" in server.log_text(), 10, "a throughput line")
    server.stop()
    entries = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    assert entries and all({"time", "level", "message"} <= e.keys() for e in entries)
    assert any(e["message"].startswith("serving 40 samples") and "batch_size=4" in e["message"] for e in entries)
    assert any("images/s" in e["message"] for e in entries)


def test_client_logs_one_line_per_epoch(start_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    listfile = unique_label_list(tmp_path / "data", 16)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1")
    with caplog.at_level(logging.INFO, logger="loader_client"):
        with LoaderClient(server.endpoint, timeout_s=20, log_epochs=True) as client:
            for _ in range(2):
                list(client.epoch())
    lines = [r.getMessage() for r in caplog.records if r.name == "loader_client"]
    assert len(lines) == 2 and lines[0].startswith("epoch 0: 4 batches in") and "% stall" in lines[0]


def test_log_epochs_prints_without_logging_configured(start_server: Any, tmp_path: Path) -> None:
    """A script that never configures logging still sees the line it asked for, on stderr."""
    listfile = unique_label_list(tmp_path / "data", 16)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1")
    script = ("import sys\nfrom loader_client import LoaderClient\n"
              "with LoaderClient(sys.argv[1], timeout_s=20, log_epochs=True) as client:\n"
              "    for _ in range(2):\n        list(client.epoch())\n")
    result = subprocess.run([sys.executable, "-c", script, server.endpoint], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loader_client: epoch")]
    assert len(lines) == 2 and lines[1].startswith("loader_client: epoch 1: 4 batches in"), result.stderr
    assert "% stall" in lines[0]


def _snapshot(**overrides: Any) -> dict[str, Any]:
    """A stats snapshot as the server publishes it (the fields the exposition reads)."""
    snap: dict[str, Any] = {
        "batches_sent": 12, "images_sent": 48, "bytes_sent": 4096, "batches_ready": 3,
        "clients": [{"name": "a", "stall": None, "share": None}, {"name": "b", "stall": 0.125, "share": "sweep"}],
        "workers_target": 2, "worker_changes_total": {"up": 2, "down": 1},
        "errors_by_reason": {"empty file": 2, 'odd "quoted"\nreason': 1}, "worker_restarts": {"crashed": 1},
        "workers": [{"id": 0, "busy_fraction": 0.25}, {"id": 1, "busy_fraction": 0.5}], "uptime_s": 7.5,
        "workers_ready": 2, "shm_fallback_batches": 3, "shm_slots_reclaimed": 40,
        "batch_build_seconds": {"counts": [0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], "sum_s": 12.03},
    }
    return {**snap, **overrides}


def test_prometheus_exposition_parses_with_the_expected_names() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from loader_server.metrics import prometheus_text

    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(_snapshot()))}
    assert {name: f.type for name, f in families.items()} == {
        "loader_batches_sent": "counter", "loader_images_sent": "counter", "loader_sent_bytes": "counter",
        "loader_decode_errors": "counter", "loader_worker_restarts": "counter", "loader_batches_ready": "gauge",
        "loader_clients": "gauge", "loader_workers_busy_ratio": "gauge", "loader_uptime_seconds": "gauge",
        "loader_batch_build_seconds": "histogram", "loader_workers": "gauge", "loader_worker_changes": "counter",
        "loader_client_stall_ratio": "gauge", "loader_shm_fallback_batches": "counter",
        "loader_shm_slots_reclaimed": "counter",
    }

    def samples(name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families[name].samples}

    assert samples("loader_batches_sent") == {("loader_batches_sent_total", ()): 12}
    assert samples("loader_shm_fallback_batches") == {("loader_shm_fallback_batches_total", ()): 3}
    assert samples("loader_shm_slots_reclaimed") == {("loader_shm_slots_reclaimed_total", ()): 40}
    assert samples("loader_decode_errors") == {("loader_decode_errors_total", (("reason", "empty file"),)): 2,
                                               ("loader_decode_errors_total", (("reason", 'odd "quoted"\nreason'),)): 1}
    assert samples("loader_worker_restarts") == {("loader_worker_restarts_total", (("cause", "crashed"),)): 1}
    assert samples("loader_workers_busy_ratio") == {("loader_workers_busy_ratio", (("worker", "0"),)): 0.25,
                                                    ("loader_workers_busy_ratio", (("worker", "1"),)): 0.5}
    assert samples("loader_workers") == {("loader_workers", ()): 2}
    assert samples("loader_worker_changes") == {("loader_worker_changes_total", (("direction", "down"),)): 1,
                                                ("loader_worker_changes_total", (("direction", "up"),)): 2}
    # Each client's stall, named by client and share; a client that has not reported one has none.
    assert samples("loader_client_stall_ratio") == {("loader_client_stall_ratio",
                                                     (("client", "b"), ("share", "sweep"))): 0.125}
    build = samples("loader_batch_build_seconds")
    assert build[("loader_batch_build_seconds_bucket", (("le", "0.005"),))] == 0
    assert build[("loader_batch_build_seconds_bucket", (("le", "0.01"),))] == 3  # cumulative
    assert build[("loader_batch_build_seconds_bucket", (("le", "+Inf"),))] == 4
    assert build[("loader_batch_build_seconds_count", ())] == 4 and build[("loader_batch_build_seconds_sum", ())] == 12.03
    # Before any error or restart the series exist, at 0, without a label.
    fresh = {f.name: f for f in text_string_to_metric_families(
        prometheus_text(_snapshot(errors_by_reason={}, worker_restarts={})))}
    assert [(s.labels, s.value) for s in fresh["loader_decode_errors"].samples] == [({}, 0)]
    assert [(s.labels, s.value) for s in fresh["loader_worker_restarts"].samples] == [({}, 0)]


def test_metrics_endpoint_on_the_given_host_and_port() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from loader_server.metrics import serve_metrics

    published: list[dict[str, Any]] = [{}]  # nothing published yet
    httpd = serve_metrics("127.0.0.1", 0, lambda: published[0])
    try:
        host, port = httpd.server_address[:2]
        assert host == "127.0.0.1" and port > 0
        url = f"http://127.0.0.1:{port}"
        assert _get(f"{url}/healthz") == (503, "no ready worker\n")
        assert _get(f"{url}/metrics") == (200, "")  # no snapshot, no series
        published[0] = _snapshot()
        status, text = _get(f"{url}/metrics")
        assert status == 200
        assert {f.name for f in text_string_to_metric_families(text)} >= {"loader_batches_sent", "loader_clients"}
        assert _get(f"{url}/healthz") == (200, "ok\n")
        published[0] = _snapshot(workers_ready=0)
        assert _get(f"{url}/healthz")[0] == 503
        assert _get(f"{url}/nothing")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_process_that_refuses_to_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    from loader_server.launch import ServerProcess, ServerProcessError

    listfile = unique_label_list(tmp_path / "data", 8)
    server = ServerProcess(listfile, "--workers", "0")  # a bad setting: exit 2 before binding
    started = time.monotonic()
    with pytest.raises(ServerProcessError) as info:
        server.wait_ready(30)
    assert time.monotonic() - started < 20  # noticed the exit, did not wait out the deadline
    assert "exited with code 2 before it was ready" in str(info.value)
    assert "`workers` must be >= 1, got 0" in str(info.value)  # the server's own message, from its log
    assert server.stop() == 2 and not server.terminated
    assert "`workers` must be >= 1" in server.log_text()  # kept after its private folder is gone
    assert not server.log.exists()


def test_bench_refuses_unknown_names_and_lists_the_choices() -> None:
    result = cli("bench", "--extras", "stall,nope", "--out", "unused")
    assert result.returncode == 2
    assert "unknown --extras value 'nope'" in result.stderr and "stall" in result.stderr
    assert "curve" in result.stderr and "Traceback" not in result.stderr
    assert not Path("unused").exists()


def test_a_negative_label_is_said_out_loud(start_server: Any, tmp_path: Path) -> None:
    """A -1 label (an unlabelled sample, often) leaves num_classes None: the server says why, naming the file."""
    listfile = unique_label_list(tmp_path / "data", 8)
    lines = listfile.read_text().splitlines()
    lines[5] = lines[5].rsplit(" ", 1)[0] + " -1"
    listfile.write_text("\n".join(lines) + "\n")
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "1")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        assert client.num_classes is None
    warning = [line for line in server.log_text().splitlines() if "negative label" in line]
    assert len(warning) == 1 and "WARNING" in warning[0], server.log_text()
    assert "img/00005.png, label -1" in warning[0] and "1 of 8 samples" in warning[0]
    assert "client.num_classes is None" in warning[0]


def test_the_start_log_names_the_decoders_once(start_server: Any, tmp_path: Path) -> None:
    """Which decoders a server runs is said once at start: the region decoder with the identity of the libjpeg it
    loaded (its SHA-256 and file: a Debian update or LD_LIBRARY_PATH changes it, not the build), simplejpeg's and
    OpenCV's versions; so two servers whose crops differ can be told apart from their logs."""
    import cv2
    import simplejpeg

    from loader_server.pipeline import decode

    listfile = unique_label_list(tmp_path / "data", 8)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2")
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        client.next()
    server.stop()
    lines = [line for line in server.log_text().splitlines() if "decoders: " in line]
    assert len(lines) == 1 and "INFO" in lines[0], server.log_text()
    assert f"simplejpeg {simplejpeg.__version__} (JPEG); OpenCV {cv2.__version__} " in lines[0], lines
    if decode.REGION_DECODER is None:  # (this machine's build: the server's process loads the same library)
        assert "region decoder not built" in lines[0], lines
    else:
        assert isinstance(decode.LOADED_LIBJPEG, decode.LoadedLibrary), decode.LOADED_LIBJPEG
        said = f"region decoder {decode.REGION_DECODER} ({decode.LOADED_LIBJPEG.path});"
        assert said in lines[0] and f"loaded sha256 {decode.LOADED_LIBJPEG.sha256}" in said, lines


def test_the_decoders_line_says_what_a_missing_region_decoder_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    from loader_server.pipeline import decode

    monkeypatch.setattr(decode, "REGION_DECODER", None)
    line = decode.decoders_line()
    assert line.startswith("decoders: region decoder not built (a crop's window is decoded by simplejpeg instead"), line
    assert "about 1.2x the CPU per image" in line, line
    monkeypatch.setattr(decode, "REGION_DECODER", "jpegregion 1 libjpeg 62 libjpeg-turbo 2001005 loaded unidentified: "
                                                  "dladdr() names no shared library providing jpeg_CreateDecompress")
    monkeypatch.setattr(decode, "LOADED_LIBJPEG", "unidentified: dladdr() names no shared library")
    assert decode.decoders_line().startswith("decoders: region decoder jpegregion 1 libjpeg 62 libjpeg-turbo 2001005 "
                                             "loaded unidentified: dladdr() names no shared library providing "
                                             "jpeg_CreateDecompress; simplejpeg ")
