"""Built-in sample data: a small labelled image set written with OpenCV, for the demo and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["example_transform", "write_parquet", "write_sample_images", "write_tar_shards"]


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


def write_tar_shards(dataset: Any, out: Path, per_shard: int, *, prefix: str = "train") -> str:
    """The samples of a byte data set (files, ...) as WebDataset tar shards in `out`: ``KEY.EXT``
    (the image as stored) and ``KEY.cls`` (the label) per sample, `per_shard` samples a shard, in
    the data set's order. Returns the ``--data`` that serves them (a brace range)."""
    import io
    import tarfile

    out.mkdir(parents=True, exist_ok=True)
    count = -(-len(dataset) // per_shard)
    width = max(6, len(str(count - 1)))
    for s in range(count):
        with tarfile.open(out / f"{prefix}-{s:0{width}d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per_shard, min(len(dataset), (s + 1) * per_shard)):
                ext = _extension(dataset.describe(i))
                for name, data in ((f"{i:08d}.{ext}", dataset.read(i)),
                                   (f"{i:08d}.cls", str(int(dataset.labels[i])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"{prefix}-{{{0:0{width}d}..{count - 1:0{width}d}}}.tar")


def write_parquet(dataset: Any, out: Path, rows_per_file: int, *, row_group_size: int = 100,
                  compression: str = "none", prefix: str = "train") -> str:
    """The samples of a byte data set as Parquet files in `out` laid out as Hugging Face datasets
    writes them: ``image`` a struct of ``bytes`` and ``path``, ``label`` int64, and the class names
    (where the data set has them) as a ClassLabel in the schema's ``huggingface`` metadata.
    Returns the ``--data`` that serves them (a glob)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    label: dict[str, Any] = {"dtype": "int64", "_type": "Value"}
    if dataset.class_names:
        label = {"names": list(dataset.class_names), "_type": "ClassLabel"}
    features = {"image": {"_type": "Image"}, "label": label}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    count = -(-len(dataset) // rows_per_file)
    for f in range(count):
        rows = range(f * rows_per_file, min(len(dataset), (f + 1) * rows_per_file))
        images = pa.array([{"bytes": dataset.read(i), "path": os.path.basename(dataset.describe(i))} for i in rows],
                          type=image_type)
        labels = pa.array([int(dataset.labels[i]) for i in rows], type=pa.int64())
        table = pa.table({"image": images, "label": labels}).replace_schema_metadata(meta)
        pq.write_table(table, out / f"{prefix}-{f:05d}-of-{count:05d}.parquet", row_group_size=row_group_size,
                       compression=compression)
    return str(out / f"{prefix}-*.parquet")


def _extension(name: str) -> str:
    ext = os.path.splitext(name)[1].lower().lstrip(".")
    return ext if ext in ("jpg", "jpeg", "png", "webp") else "jpg"
