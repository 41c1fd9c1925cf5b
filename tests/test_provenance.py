"""Provenance: from a delivered sample back to its source (`client.sources`), a manifest with every batch
when asked (indices, sources, epoch, the augmentation draws), and `loader-server replay`, which rebuilds a
batch bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import ConfigError, LoaderClient, ProtocolError
from loader_client.contract.messages import Batch, Manifest, SampleManifest, SourcesRequest
from loader_client.contract.sampling import SamplingPlan
from loader_client.manifests import checked_manifest
from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.sample_data import write_parquet, write_tar_shards

from .conftest import unique_label_list

AUGMENT = "rrc(scale=0.3-1),flip,jitter(0.4),rotate(10),cutout(0.3)"
SOURCES_PER_REQUEST = 200  # README: "200 indices a request" (the threat model: "at most 200 indices")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loader_server", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


# ---------------------------------------------------------------------------- client.sources
def test_sources_name_the_file_member_or_row_of_every_kind(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "files", 12)
    files = load_dataset(ServerConfig(data=str(listfile)))
    kinds = {"files": str(listfile), "tar": write_tar_shards(files, tmp_path / "tar", 5),
             "parquet": write_parquet(files, tmp_path / "parquet", 10)}
    expected = {
        "files": [files.describe(i) for i in (0, 7, 11)],
        "tar": [str(tmp_path / "tar" / f"train-{s:06d}.tar:{i:08d}.{e}") for s, i, e in
                ((0, 0, "png"), (1, 7, "jpg"), (2, 11, "jpg"))],
        "parquet": [str(tmp_path / "parquet" / f"train-{f:05d}-of-00002.parquet:{r}") for f, r in
                    ((0, 0), (0, 7), (1, 1))],
    }
    for name, data in kinds.items():
        server = start_server(data, "--batch-size", "4", "--size", "8x8", "--workers", "1")
        with LoaderClient(server.endpoint, timeout_s=20) as client:
            assert client.sources([0, 7, 11]) == expected[name], name
            client.next()
            assert client.last is not None
            delivered = client.sources(client.last.indices)  # what the trainer just trained on
            assert len(delivered) == 4 and all(isinstance(s, str) and s for s in delivered)
            assert len(client.dataset_version) == 16
        server.stop()


def _one_request_of(endpoint: str, n: int) -> None:
    """Ask the server for `n` sources in one request (the client's `sources` splits a longer list)."""
    from loader_client.queries import SOURCES_REPLIES, _ask

    reply = _ask(endpoint, SourcesRequest(indices=list(range(n))), SOURCES_REPLIES, 20.0, {})
    assert len(reply.sources) == n  # type: ignore[attr-defined]


def test_the_data_set_version_follows_its_content_and_bad_indices_are_refused(start_server: Any,
                                                                              tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 300)
    first = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    with LoaderClient(first.endpoint, timeout_s=20) as client:
        version = client.dataset_version
        every = client.sources(range(300))  # more than one request of the documented 200 holds
        assert every == [str(listfile.parent / f"img/{i:05d}.{'png' if i % 5 == 0 else 'jpg'}") for i in range(300)]
        _one_request_of(first.endpoint, SOURCES_PER_REQUEST)  # the documented most, in one request: answered
        with pytest.raises(ProtocolError, match="field .indices. is longer than 200"):
            _one_request_of(first.endpoint, SOURCES_PER_REQUEST + 1)  # one more: refused by the server
        with pytest.raises(ConfigError, match="sample index 300 is outside the data set of 300 samples"):
            client.sources([3, 300])
        with pytest.raises(ConfigError, match="a sample index is an integer >= 0"):
            client.sources([-1])
    lines = listfile.read_text().splitlines()
    lines[3] = lines[3].rsplit(" ", 1)[0] + " 999"  # one label changed: another version of the data set
    listfile.write_text("\n".join(lines) + "\n")
    second = start_server(listfile, "--batch-size", "4", "--size", "8x8", "--workers", "1")
    with LoaderClient(second.endpoint, timeout_s=20) as client:
        assert client.dataset_version != version


# ---------------------------------------------------------------------------- manifests
def test_every_batch_carries_its_manifest_when_asked(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 24)
    server = start_server(listfile, "--batch-size", "4", "--size", "16x12", "--workers", "2", "--augment", AUGMENT)
    with LoaderClient(server.endpoint, timeout_s=20, manifest=True) as client:
        for _ in range(8):  # into the second epoch
            client.next()
            info = client.last
            assert info is not None and info.manifest is not None
            manifest = info.manifest
            assert (manifest["epoch"], manifest["batch"]) == (info.epoch, info.batch)
            assert [s["index"] for s in manifest["samples"]] == info.indices.tolist()
            assert [s["source"] for s in manifest["samples"]] == client.sources(info.indices)
            for sample in manifest["samples"]:
                ops = [op for op, _ in sample["augment"]]
                assert ops == ["rrc", "flip", "jitter", "rotate", "cutout"], ops
                values = dict(sample["augment"])
                x, y, w, h = values["rrc"]
                assert 0 <= x and 0 <= y and 0 < w <= 40 and 0 < h <= 30  # a region of the 40x30 source
                assert values["flip"] in ([0], [1]) and len(values["jitter"]) == 3
                assert -10 <= values["rotate"][0] <= 10 and len(values["cutout"]) in (0, 4)
            json.dumps(manifest)  # plain values, ready for an audit log
    with LoaderClient(server.endpoint, timeout_s=20) as plain:  # not asked: none
        plain.next()
        assert plain.last is not None and plain.last.manifest is None
    with LoaderClient(server.endpoint, timeout_s=20, manifest=True, augment=False) as validation:
        validation.next()
        assert validation.last is not None and validation.last.manifest is not None
        assert all(s["augment"] == [] for s in validation.last.manifest["samples"])


def test_a_manifest_of_two_servers_follows_the_merged_numbering(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 16)
    servers = [start_server(listfile, "--batch-size", "2", "--size", "8x8", "--workers", "1") for _ in range(2)]
    with LoaderClient([s.endpoint for s in servers], timeout_s=20, manifest=True) as client:
        for _ in range(client.steps_per_epoch + 1):
            client.next()
            info = client.last
            assert info is not None and info.manifest is not None
            assert (info.manifest["epoch"], info.manifest["batch"]) == (info.epoch, info.batch)
            assert [s["index"] for s in info.manifest["samples"]] == info.indices.tolist()


def test_the_client_refuses_a_manifest_that_does_not_fit_its_batch() -> None:
    index = np.array([3, 1], np.int64)
    samples = [SampleManifest(index=3, source="a.jpg"), SampleManifest(index=1, source="b.jpg")]
    batch = Batch(epoch=0, batch=2, steps=5, arrays=[], manifest=Manifest(epoch=0, batch=2, samples=samples))
    assert checked_manifest(batch, index, True, "peer") is not None
    with pytest.raises(ProtocolError, match="did not ask for"):
        checked_manifest(batch, index, False, "peer")
    with pytest.raises(ProtocolError, match="without the manifest"):
        checked_manifest(Batch(epoch=0, batch=2, steps=5, arrays=[]), index, True, "peer")
    with pytest.raises(ProtocolError, match="not the batch's own"):
        checked_manifest(batch, np.array([3, 2]), True, "peer")
    other = Batch(epoch=0, batch=2, steps=5, arrays=[], manifest=Manifest(epoch=1, batch=2, samples=samples))
    with pytest.raises(ProtocolError, match="the manifest of epoch 1 batch 2 with epoch 0 batch 2"):
        checked_manifest(other, index, True, "peer")


def test_a_manifest_is_bounded(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 1100)
    server = start_server(listfile, "--batch-size", "1025", "--size", "8x8", "--workers", "1")
    with pytest.raises(ConfigError, match="a batch manifest describes at most 1024 samples"):
        LoaderClient(server.endpoint, timeout_s=20, manifest=True)


# ---------------------------------------------------------------------------- replay
@pytest.mark.parametrize("case", ["augmented", "rank 1 of 2, float32", "plain (augment=False)", "skip a bad file"])
def test_replay_rebuilds_a_batch_bitwise(start_server: Any, tmp_path: Path, case: str) -> None:
    listfile = unique_label_list(tmp_path / "data", 40)
    settings = {"data": str(listfile), "batch_size": 4, "size": "16x12", "augment": AUGMENT, "seed": 11}
    client_kwargs: dict[str, Any] = {}
    where = {"rank": 0, "world_size": 1}
    if case.startswith("rank"):
        settings.update(dtype="float32", mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
        where = {"rank": 1, "world_size": 2}
    elif case.startswith("plain"):
        client_kwargs["augment"] = False
    elif case.startswith("skip"):  # a bad file in the very batch replayed: its substitute is replayed too
        bad = int(SamplingPlan(40, 4).batch(1, 1, seed=11)[2])
        lines = listfile.read_text().splitlines()
        (listfile.parent / lines[bad].split()[0]).write_bytes(b"not an image")
        settings.update(on_error="skip", max_bad=2)
    config = tmp_path / "loader.toml"  # the same file serves and replays
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items()))
    server = start_server(listfile, "--config", str(config))
    with LoaderClient(server.endpoint, timeout_s=20, manifest=True, **where, **client_kwargs) as client:
        for _ in range(client.steps_per_epoch + 2):  # epoch 1, batch 1
            x, y = client.next()
        info = client.last
        assert info is not None and (info.epoch, info.batch) == (1, 1)
    out, manifest = tmp_path / "batch.npz", tmp_path / "batch.json"
    result = _cli("replay", "--config", str(config), "--epoch", "1", "--batch", "1", "--out", str(out),
                  "--rank", str(where["rank"]), "--world-size", str(where["world_size"]), "--manifest", str(manifest),
                  *(["--plain"] if client_kwargs else []))
    assert result.returncode == 0, result.stdout + result.stderr
    with np.load(out) as replayed:
        np.testing.assert_array_equal(replayed["x"], x)  # bitwise: the same dtype and values
        assert replayed["x"].dtype == x.dtype
        np.testing.assert_array_equal(replayed["y"], y)
        np.testing.assert_array_equal(replayed["index"], info.indices)
    assert json.loads(manifest.read_text()) == info.manifest
    if case.startswith("skip"):
        assert bad not in info.indices.tolist() and len(set(info.indices.tolist())) == 3  # a substitute stands there


def test_replay_names_a_batch_outside_the_stream(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8)
    result = _cli("replay", "--data", str(listfile), "--batch-size", "4", "--epoch", "0", "--batch", "2", "--out",
                  str(tmp_path / "b.npz"))
    assert result.returncode == 2 and "has batches 0 to 1" in result.stderr, result.stderr
    result = _cli("replay", "--data", str(listfile), "--batch-size", "4", "--epoch", "0", "--batch", "0", "--out",
                  str(tmp_path / "b.npz"), "--rank", "2", "--world-size", "2")
    assert result.returncode == 2 and "--rank 2 of --world-size 2 is out of range" in result.stderr
