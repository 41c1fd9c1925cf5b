"""User transforms and collate hooks, loaded by name into real worker processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loader_client import LoaderClient, ServerError
from loader_server.cli import main

from .conftest import unique_label_list

ARGS = ("--batch-size", "4", "--size", "16x12", "--no-shuffle", "--seed", "2")


@pytest.fixture
def listfile(tmp_path: Path) -> Path:
    return unique_label_list(tmp_path / "data", 12, size=(40, 30))


def first(endpoint: str, count: int = 3) -> list[tuple[np.ndarray, ...]]:
    with LoaderClient(endpoint, timeout_s=20) as client:
        return [tuple(a.copy() for a in client.next()) for _ in range(count)]


def test_transform_runs_on_every_image(start_server: Any, listfile: Path) -> None:
    plain = start_server(listfile, *ARGS, "--workers", "1")
    inverted = start_server(listfile, *ARGS, "--workers", "1", "--transform", "tests.user_code_samples:invert")
    for (xp, yp), (xi, yi) in zip(first(plain.endpoint), first(inverted.endpoint), strict=True):
        np.testing.assert_array_equal(yp, yi)
        # Inverting commutes with a linear resize up to rounding.
        assert np.abs((255 - xp.astype(int)) - xi.astype(int)).max() <= 1


def test_seeded_transform_is_the_same_for_any_worker_count(start_server: Any, listfile: Path) -> None:
    spec = "tests.user_code_samples:noisy_crop"
    a = start_server(listfile, *ARGS, "--workers", "1", "--transform", spec)
    b = start_server(listfile, *ARGS, "--workers", "3", "--transform", spec)
    for (xa, _), (xb, _) in zip(first(a.endpoint, 6), first(b.endpoint, 6), strict=True):
        np.testing.assert_array_equal(xa, xb)


def test_collate_extras_reach_the_trainer_as_tuple_elements(start_server: Any, listfile: Path) -> None:
    server = start_server(listfile, *ARGS, "--workers", "2", "--collate", "tests.user_code_samples:weights")
    for batch in first(server.endpoint):
        x, y, weight, mask = batch
        np.testing.assert_array_equal(weight, (y % 3 + 1).astype(np.float32))
        assert mask.shape == (4, 2, 2) and mask.dtype == np.uint8


@pytest.mark.parametrize(("spec", "message"), [
    ("tests.user_code_samples:wrong_type", "returned list; expected a uint8 image"),
    ("tests.user_code_samples:explode", "ValueError: boom in user code"),
])
def test_errors_in_user_code_reach_the_trainer(start_server: Any, listfile: Path, spec: str, message: str) -> None:
    server = start_server(listfile, *ARGS, "--workers", "1", "--transform", spec)
    with LoaderClient(server.endpoint, timeout_s=20) as client:
        with pytest.raises(ServerError, match=message) as info:
            client.next()
    if "explode" in spec:
        assert 'user_code_samples.py", line' in str(info.value)  # the user's own traceback
    with LoaderClient(server.endpoint, timeout_s=20) as client:  # the server is still serving
        with pytest.raises(ServerError):
            client.next()


def test_bad_specs_fail_at_start_up(listfile: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--data", str(listfile), "--transform", "no_such_module:f", "--print-config"]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    assert main(["serve", "--data", str(listfile), "--collate", "tests.user_code_samples:nothing",
                 "--print-config"]) == 2
    assert "has no function 'nothing'" in capsys.readouterr().err
