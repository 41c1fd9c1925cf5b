"""Option groups: every setting in exactly one; the fingerprint and the cache key follow the groups,
so a setting that changes the pixels changes the cache key by construction; augmentations are
one class each, recognised by their stage, never by their name."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_server.config import ServerConfig
from loader_server.data.datasets import load_dataset
from loader_server.options import GROUPS, DecodeOptions, PipelineOptions, check_partition
from loader_server.pipeline import augment
from loader_server.pipeline.batch import BatchBuilder
from loader_server.pipeline.cache import cache_key

from .conftest import unique_label_list

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_exactly_one_group() -> None:
    names = [f.name for f in dataclasses.fields(ServerConfig)]
    check_partition(names)  # what config.py runs at import
    with pytest.raises(RuntimeError, match="in no group \\['brand_new'\\]"):
        check_partition([*names, "brand_new"])
    owners = {f.name: g.__name__ for g in GROUPS for f in dataclasses.fields(g)}
    assert owners["max_pixels"] == owners["color"] == owners["cache_size"] == "DecodeOptions"
    assert owners["cache"] == "CacheOptions" and owners["seed"] == "ServeOptions"


#: Which groups the fingerprint that guards a resume hashes ("shapes batches" in options.py's table), and the
#: one the cache key hashes, written out: a flag flipped in the code must fail here, not move its settings
#: from one parametrised test below to the other.
SHAPES_BATCHES = {
    "DataOptions": False, "SamplingOptions": True, "DecodeOptions": True, "AugmentOptions": True,
    "UserCodeOptions": True, "OutputOptions": True, "ErrorOptions": True, "ReadOptions": False,
    "CacheOptions": False, "ServeOptions": False, "LogOptions": False,
}


def test_the_groups_that_shape_batches_are_the_documented_ones() -> None:
    assert {g.__name__: g.shapes_batches for g in GROUPS} == SHAPES_BATCHES
    base = ServerConfig(data="x")
    for group, shapes in SHAPES_BATCHES.items():  # the flag is what the fingerprint follows
        field = {"DataOptions": ("subset", "val"), "SamplingOptions": ("batch_size", 16),
                 "DecodeOptions": ("color", "bgr"), "AugmentOptions": ("augment", "flip"),
                 "UserCodeOptions": ("collate", "tests.user_code_samples:weights"),
                 "OutputOptions": ("layout", "chw"), "ErrorOptions": ("on_error", "skip"),
                 "ReadOptions": ("read_threads", 4), "CacheOptions": ("cache", "memory"),
                 "ServeOptions": ("prefetch", 3), "LogOptions": ("log_level", "DEBUG")}[group]
        extra = {"val_fraction": 0.5} if group == "DataOptions" else {}
        changed = ServerConfig(data="x", **dict([field]), **extra)
        assert (changed.fingerprint() != base.fingerprint()) == shapes, group


#: A valid other value of every setting of a group that shapes batches (the defaults are 224x224, ...).
OTHER = {
    "batch_size": 16, "mode": "random", "shuffle": False, "drop_last": False, "steps_per_epoch": None,
    "size": (200, 224), "resize": "crop", "interpolation": "area", "pad_value": 7, "color": "bgr",
    "reduced_decode": False, "max_pixels": 1_000_000, "cache_size": None,
    "augment": "flip", "transform": "loader_server.sample_data:example_transform",
    "collate": "tests.user_code_samples:weights", "dtype": "float32", "layout": "chw", "mean": None, "std": None,
    "on_error": "skip",
}
#: Settings whose other value needs a companion to be valid.
COMPANIONS: dict[str, dict[str, Any]] = {
    "steps_per_epoch": {"mode": "random", "steps_per_epoch": 5}, "cache_size": {"augment": "rrc", "cache_size": 256},
    "mean": {"dtype": "float32", "mean": (0.5, 0.5, 0.5)}, "std": {"dtype": "float32", "std": (0.2, 0.2, 0.2)},
}


def _changed(name: str) -> dict[str, Any]:
    return COMPANIONS.get(name, {name: OTHER.get(name)})


@pytest.mark.parametrize("name", [f.name for g in GROUPS if g.shapes_batches for f in dataclasses.fields(g)])
def test_each_setting_that_shapes_batches_changes_the_fingerprint(name: str) -> None:
    base = ServerConfig(data="x")
    assert ServerConfig(data="x", **_changed(name)).fingerprint() != base.fingerprint(), name


@pytest.mark.parametrize("name", [f.name for g in GROUPS if not g.shapes_batches and g.__name__ != "DataOptions"
                                  for f in dataclasses.fields(g)])
def test_settings_that_do_not_shape_batches_leave_the_fingerprint(name: str) -> None:
    other = {"workers": 5, "seed": 9, "bind": "tcp://127.0.0.1:6000", "curve_dir": "/k", "insecure": True,
             "prefetch": 3, "in_order": False, "shm": False, "max_clients": 3, "max_clients_per_peer": 2,
             "max_connections_per_host": 9,
             "max_message_bytes": 1 << 28, "batch_timeout_s": 9.0, "heartbeat_s": 2.0, "client_timeout_s": 40.0,
             "max_bad": 5, "log_level": "DEBUG", "log_format": "json", "log_interval_s": 3.0, "metrics_port": 9999,
             "metrics_host": "0.0.0.0", "max_file_bytes": 1 << 20, "read_threads": 4, "read_connections": 0,
             "simulate_read_latency_ms": 2.0, "cache": "memory", "ipc_mode": "0660", "scan": True,
             "workers_min": {"workers": "auto", "workers_min": 2}, "workers_max": {"workers": "auto", "workers_max": 9},
             "target_stall": 0.1, "scale_interval_s": 7.0, "share_window": 3, "read_ahead_tasks": 6}
    changed = other[name] if isinstance(other[name], dict) else {name: other[name]}
    assert ServerConfig(data="x", **changed).fingerprint() == ServerConfig(data="x").fingerprint()


class _Fixed:
    """A data set stand-in for the cache key: only its fingerprint and length count."""

    def fingerprint(self) -> str:
        return "0123456789abcdef"

    def location(self) -> str:
        return "files under /data"

    def __len__(self) -> int:
        return 10


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DecodeOptions)])
def test_every_decode_setting_changes_the_cache_key(name: str) -> None:
    """The decode step is built from DecodeOptions alone; the key hashes all of them: no pixel setting is left out."""
    base = ServerConfig(data="x")
    changed = ServerConfig(data="x", **_changed(name))  # cache_size comes with rrc, which is after the cache
    assert cache_key(changed, _Fixed()) != cache_key(base, _Fixed()), name  # type: ignore[arg-type]


def test_settings_after_the_decode_leave_the_cache_key() -> None:
    base = ServerConfig(data="x")
    for name in ("batch_size", "dtype", "layout", "augment", "on_error", "workers", "seed", "cache", "max_file_bytes",
                 "read_connections"):
        other = ServerConfig(data="x", **{name: OTHER.get(name, {"workers": 5, "seed": 3, "cache": "memory",
                                                                    "max_file_bytes": 9, "read_connections": 0}.get(name))})
        assert cache_key(other, _Fixed()) == cache_key(base, _Fixed()), name  # type: ignore[arg-type]


def test_a_worker_gets_the_pipeline_groups_not_the_configuration() -> None:
    import inspect

    from loader_server.runtime.worker import worker_main

    assert inspect.signature(worker_main).parameters["options"].annotation in ("PipelineOptions", PipelineOptions)
    opts = PipelineOptions.of(ServerConfig(data="x", color="gray", augment="flip"))
    assert opts.decode.channels == 1 and opts.augment.augment == "flip" and not hasattr(opts, "bind")


def test_no_operation_is_recognised_by_its_name_outside_its_class() -> None:
    """`rrc` (or any operation's name) appears in code only in augment.py, where its class declares it."""
    names = list(augment._REGISTRY)
    assert names == ["rrc", "flip", "jitter", "rotate", "cutout"]
    offenders = []
    for path in (ROOT / "loader_server").rglob("*.py"):
        if path.name == "augment.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            for name in names:
                if re.search(rf"[\"']{name}[\"'(]|[\"']{name}\b(?![ -]?[a-z(])", code) and "help=" not in code:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert offenders == []


def test_a_new_augmentation_is_one_class(tmp_path: Path) -> None:
    """Registered in one place, with its stage: the parser, the validation and the steps take it as it is."""

    @augment.augmentation
    class Invert(augment.Augmentation):
        name = "invert"
        stage = augment.Stage.OUTPUT
        defaults = {"p": 1.0}
        positional = "p"

        def apply(self, out: np.ndarray, rng: np.random.Generator) -> None:
            if rng.random() < self.params["p"]:
                np.subtract(255, out, out=out)

    @augment.augmentation
    class TopHalf(augment.Augmentation):  # a SOURCE-stage crop: it replaces the resize
        name = "tophalf"
        stage = augment.Stage.SOURCE
        defaults: dict[str, Any] = {}

        def region(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
            return 0, 0, width, max(1, height // 2)

    try:
        listfile = unique_label_list(tmp_path / "data", 4, size=(40, 30))
        for spec in ("invert", "tophalf,invert(1)"):
            plain_cfg = ServerConfig(data=str(listfile), batch_size=4, size=(20, 10))
            config = ServerConfig(data=str(listfile), batch_size=4, size=(20, 10), augment=spec)
            ds = load_dataset(config)
            plain = BatchBuilder(plain_cfg, ds).build(np.arange(4), BatchBuilder(plain_cfg, ds).allocate())["x"]
            builder = BatchBuilder(config, ds)
            got = builder.build(np.arange(4), builder.allocate(), augment=True)["x"]
            if spec == "invert":
                assert builder.steps(True) == ["Read", "Decode", "Augment"]
                np.testing.assert_array_equal(got, 255 - plain)
            else:
                assert builder.steps(True) == ["Read", "DecodeRegion", "Augment"]
                assert not np.array_equal(got, 255 - plain)
        with pytest.raises(Exception, match="tophalf replaces the resize"):
            ServerConfig(data="x", augment="tophalf", resize="crop")
        with pytest.raises(Exception, match="rrc and tophalf both choose the region"):
            ServerConfig(data="x", augment="rrc,tophalf")
    finally:
        augment._REGISTRY.pop("invert", None)
        augment._REGISTRY.pop("tophalf", None)


def test_the_steps_of_each_configuration(tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 4)
    cases = [
        ({}, False, ["Read", "Decode"]),
        ({"augment": "rrc,flip"}, True, ["Read", "DecodeRegion", "Augment"]),
        ({"augment": "rrc,flip"}, False, ["Read", "Decode"]),
        ({"augment": "rrc,flip", "cache_size": 30}, True, ["Read", "Decode", "CropRecord", "Augment"]),
        ({"transform": "loader_server.sample_data:example_transform", "augment": "flip"}, True,
         ["Read", "Transform", "Augment"]),
    ]
    for settings, aug, steps in cases:
        config = ServerConfig(data=str(listfile), batch_size=2, size=(24, 24), **settings)
        assert BatchBuilder(config, load_dataset(config)).steps(aug) == steps, settings


# ---------------------------------------------------------------------------- the groups' helpers, written out
def test_check_partition_names_each_kind_of_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    import loader_server.options as options

    names = [f.name for f in dataclasses.fields(ServerConfig)]
    with pytest.raises(RuntimeError, match=r"^settings and option groups disagree \(loader_server/options.py\): "
                                           r"in no group \[\], in several \{\}, not a setting \['color'\]$"):
        check_partition([n for n in names if n != "color"])  # a group names a setting that is gone

    @dataclasses.dataclass(frozen=True)
    class Twice:
        color: str = "rgb"

    monkeypatch.setattr(options, "GROUPS", (*GROUPS, Twice))
    with pytest.raises(RuntimeError, match=r"in no group \[\], in several \{'color': \['DecodeOptions', 'Twice'\]\}, "
                                           r"not a setting \[\]$"):
        options.check_partition(names)


def test_a_workers_pipeline_options_hold_each_groups_settings() -> None:
    config = ServerConfig(data="x", color="gray", max_file_bytes=1000, read_threads=3, augment="flip",
                          collate="tests.user_code_samples:weights", dtype="float32", layout="chw", on_error="skip")
    opts = PipelineOptions.of(config)
    assert (opts.decode.color, opts.read.max_file_bytes, opts.read.read_threads, opts.augment.augment,
            opts.user_code.collate, opts.output.dtype, opts.output.layout, opts.errors.on_error) == \
        ("gray", 1000, 3, "flip", "tests.user_code_samples:weights", "float32", "chw", "skip")
    assert PipelineOptions.of(opts) is opts


def test_a_record_is_decoded_as_a_centre_crop_at_the_cache_size() -> None:
    plain = DecodeOptions(size=(200, 100), resize="letterbox")
    assert plain.for_record() is plain and plain.record_shape == (100, 200, 3)  # no --cache-size: the output
    sized = DecodeOptions(size=(200, 100), resize="letterbox", cache_size=150, color="gray")
    assert sized.record_shape == (150, 300, 1)  # the output's 2:1 at shorter side 150
    assert sized.for_record() == DecodeOptions(size=(300, 150), resize="crop", color="gray", cache_size=None)
    tall = DecodeOptions(size=(100, 300), cache_size=120)
    assert tall.record_shape == (360, 120, 3) and tall.for_record().size == (120, 360)
