"""Built-in sample data: a small labelled image set written with OpenCV, for the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

__all__ = ["example_transform", "write_sample_images"]


def example_transform(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An example `--transform`: a random crop of up to an eighth of each side, seeded per sample.

    ``loader-server serve --data ... --transform loader_server.sample_data:example_transform``
    """
    h, w = image.shape[:2]
    y, x = int(rng.integers(0, h // 8 + 1)), int(rng.integers(0, w // 8 + 1))
    return image[y:, x:]


def write_sample_images(
    root: str | Path, count: int, *, classes: int = 4, seed: int = 0, min_side: int = 160, max_side: int = 480
) -> Path:
    """Write `count` JPEG/PNG images into ``root/class_k/`` folders and return `root`.

    Each image is a smooth gradient with a few shapes, of random size between `min_side` and
    `max_side`, so that decoding costs about what real photos of that size cost.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        k = i % classes
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200.0
        img = (base + rng.integers(0, 55, size=3)).astype(np.uint8)
        for _ in range(4):
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            color = tuple(int(c) for c in rng.integers(0, 256, size=3))
            cv2.circle(img, center, int(rng.integers(5, max(6, min(w, h) // 3))), color, -1)
        ext = ".png" if i % 8 == 7 else ".jpg"
        ok, buf = cv2.imencode(ext, img)
        if not ok:  # pragma: no cover
            raise RuntimeError(f"OpenCV could not encode sample image {i}")
        (root / f"class_{k}" / f"{i:06d}{ext}").write_bytes(buf.tobytes())
    return root
