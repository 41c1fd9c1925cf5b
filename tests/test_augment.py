"""Augmentations: parsed specs, and pixels reproducible per (seed, epoch, sample) across workers and resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import ConfigError, LoaderClient
from loader_server.pipeline.augment import Augmenter, parse_augment, sample_rng

from .conftest import unique_label_list

SPEC = "rrc(scale=0.3-1),flip,jitter(0.4),rotate(10),cutout(0.25)"
ARGS = ("--batch-size", "4", "--size", "24x24", "--seed", "6")


def test_spec_parsing() -> None:
    ops = parse_augment("rrc(scale=0.08-1;ratio=0.75-1.33),flip(p=0.3),jitter(0.2),rotate(15),cutout(size=0.1)")
    params = {op.name: op.params for op in ops}
    assert params["rrc"] == {"scale": (0.08, 1.0), "ratio": (0.75, 1.33)}
    assert params["flip"] == {"p": 0.3} and params["rotate"] == {"degrees": 15.0}
    assert params["jitter"] == {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2}
    assert params["cutout"] == {"size": 0.1, "p": 0.5}
    with pytest.raises(ConfigError, match="unknown operation 'blur'"):
        parse_augment("flip,blur")
    with pytest.raises(ConfigError, match="rrc has no parameter 'zoom'"):
        parse_augment("rrc(zoom=2)")
    with pytest.raises(ConfigError, match="runs backwards"):
        parse_augment("rrc(scale=1-0.5)")


@pytest.mark.parametrize(("spec", "expected"), [
    ("cutout(2)", "cutout size must be in (0, 1], got 2 in 'cutout(2)'"),  # was "high <= 0" in a worker
    ("cutout(size=0.2;p=1.5)", "cutout p must be in [0, 1], got 1.5"),
    ("rrc(ratio=0-1)", "rrc ratio must be in (0, 1000], got 0"),  # was log(0) in a worker
    ("rrc(scale=2-3)", "rrc scale must be in (0, 1], got 2"),  # could never be drawn: always the centre square
    ("rrc(scale=0-0)", "rrc scale must be in (0, 1], got 0"),
    ("jitter(-1)", "jitter brightness must be in [0, 1], got -1"),
    ("jitter(brightness=0.2;saturation=1.5)", "jitter saturation must be in [0, 1], got 1.5"),
    ("flip(2)", "flip p must be in [0, 1], got 2"),
    ("rotate(nan)", "rotate degrees must be in [0, 180], got nan"),
])
def test_a_parameter_out_of_its_range_is_refused_when_parsed(spec: str, expected: str) -> None:
    """Before the server starts, naming the operation, the parameter and its range; not mid-epoch in a worker."""
    with pytest.raises(ConfigError) as err:
        parse_augment(spec)
    assert str(err.value).startswith(f"`augment`: {expected}"), str(err.value)
    parse_augment("rrc(scale=1-1;ratio=1-1),flip(0),flip(1),jitter(0),jitter(1),rotate(0),rotate(180),cutout(1)")


def test_ops_are_a_pure_function_of_the_generator() -> None:
    aug = Augmenter(parse_augment(SPEC))
    img = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    a, b, c = img.copy(), img.copy(), img.copy()
    aug.apply(a, sample_rng(1, 0, 5))
    aug.apply(b, sample_rng(1, 0, 5))
    aug.apply(c, sample_rng(1, 1, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)  # another epoch, other augmentations
    box = aug.crop_box(400, 300, sample_rng(1, 0, 5))
    x, y, w, h = box
    assert 0 <= x and x + w <= 400 and 0 <= y and y + h <= 300 and w * h >= 0.3 * 400 * 300 * 0.99


def batches(endpoint: str, count: int, **kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    with LoaderClient(endpoint, timeout_s=20, **kwargs) as client:
        out = []
        for _ in range(count):
            x, y = client.next()
            out.append((x.copy(), y.copy()))
        return out


def test_same_pixels_for_any_worker_count_and_resume(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 16, size=(60, 40))
    one = start_server(listfile, *ARGS, "--workers", "1", "--augment", SPEC)
    three = start_server(listfile, *ARGS, "--workers", "3", "--augment", SPEC)
    a, b = batches(one.endpoint, 10), batches(three.endpoint, 10)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    with LoaderClient(three.endpoint, timeout_s=20) as client:
        for _ in range(3):
            client.next()
        state = client.state_dict()
    resumed = batches(three.endpoint, 7, state=state)
    for (xa, _), (xr, _) in zip(a[3:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xr)


def test_epochs_differ_and_validation_streams_are_plain(start_server: Any, tmp_path: Path) -> None:
    listfile = unique_label_list(tmp_path / "data", 8, size=(60, 40))
    aug = start_server(listfile, *ARGS, "--workers", "2", "--augment", SPEC, "--no-shuffle")
    plain = start_server(listfile, *ARGS, "--workers", "2", "--no-shuffle")
    two_epochs = batches(aug.endpoint, 4)  # 2 batches per epoch, file order: same samples each epoch
    np.testing.assert_array_equal(two_epochs[0][1], two_epochs[2][1])
    assert not np.array_equal(two_epochs[0][0], two_epochs[2][0])  # other epoch, other pixels
    val = batches(aug.endpoint, 2, augment=False)
    ref = batches(plain.endpoint, 2)
    for (xv, _), (xr, _) in zip(val, ref, strict=True):
        np.testing.assert_array_equal(xv, xr)
    assert not np.array_equal(val[0][0], two_epochs[0][0])


def test_bad_spec_exits_2(tmp_path: Path) -> None:
    from loader_server.cli import main

    listfile = unique_label_list(tmp_path / "data", 4)
    assert main(["serve", "--data", str(listfile), "--augment", "flip,warp", "--print-config"]) == 2
