"""User functions the tests load into real workers with --transform and --collate."""

from __future__ import annotations

import os
import time

import numpy as np


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - image


def noisy_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop: depends on the seeded generator only."""
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h // 4 + 1)), int(rng.integers(0, w // 4 + 1))
    return image[y:, x:]


def wrong_type(image: np.ndarray, rng: np.random.Generator) -> list[int]:
    return [1, 2, 3]


def explode(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    raise ValueError("boom in user code")


def weights(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A per-sample weight and a per-sample mask, as extra arrays."""
    n = len(arrays["y"])
    return {"sample_weight": (arrays["y"] % 3 + 1).astype(np.float32),
            "mask": np.ones((n, 2, 2), dtype=np.uint8)}


def slow(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image as it is, after SLOW_TRANSFORM_S seconds (0.5 by default): a slow batch, whatever the machine."""
    time.sleep(float(os.environ.get("SLOW_TRANSFORM_S", "0.5")))
    return image
