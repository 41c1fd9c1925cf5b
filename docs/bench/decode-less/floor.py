"""Why a plain resize cannot be decoded much faster: the scale each path picks, and the CPU per image of a
whole-image decode at each M/8 scale, down to 1/8 (DC coefficients only: almost no inverse DCT, so
what is left is the entropy (Huffman) decoding that every decoder must do).

    PYTHONPATH=TREE python docs/bench/decode-less/floor.py DATA [SIZE]

DATA is a folder of JPEGs (or a train.txt beside them), SIZE the output's side (224). On one core
(OpenCV's threads off), best of 3 interleaved passes over every image, page cache warm:

* ``scale``: how many images each path decodes at which M/8: the release before issue 25
  (OpenCV's IMREAD_REDUCED_COLOR_{2,4,8}, `Decoder.reduction`) and this one (`decode_scale`);
* ``decode_ms``: simplejpeg's whole-image decode to RGB at 8/8, 4/8, 2/8 and 1/8, and OpenCV's
  decode as the release before does it (its reduction flag);
* ``rest_ms``: what a worker does besides decoding, for each image: read the file, resize the
  image decoded at the chosen scale to SIZE x SIZE into a slot (cv2.resize, linear);
* ``bound``: the most any decoder that still entropy-decodes the whole image could gain over the
  release before on a plain resize: (rest + OpenCV's decode) / (rest + the 1/8 decode).

Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from loader_server.options import DecodeOptions
from loader_server.pipeline.decode import Decoder, decode_scale, jpeg_info

SCALES = (8, 4, 2, 1)


def files_of(data: str) -> list[Path]:
    root = Path(data)
    root = root.parent if root.is_file() else root
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def main(data: str, side: int = 224) -> None:
    cv2.setNumThreads(1)
    paths = files_of(data)
    blobs = [p.read_bytes() for p in paths]
    infos = [jpeg_info(b) for b in blobs]
    assert all(i is not None and i.scalable for i in infos), "baseline or progressive 8-bit JPEGs only"
    dec = Decoder(DecodeOptions(size=(side, side)))
    base_f = [dec.reduction(*i.size) for i in infos]  # type: ignore[union-attr]
    new_m = [decode_scale(*i.size, (side, side)) for i in infos]  # type: ignore[union-attr]
    slot = np.empty((side, side, 3), np.uint8)

    def sj(m: int) -> None:
        for b, i in zip(blobs, infos, strict=True):
            assert i is not None
            simplejpeg.decode_jpeg(b, "RGB", min_width=-(-i.width * m // 8), min_height=-(-i.height * m // 8))

    def opencv() -> None:
        for b, f in zip(blobs, base_f, strict=True):
            cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB | {1: 0, 2: 16, 4: 32, 8: 64}[f])

    scaled = [simplejpeg.decode_jpeg(b, "RGB", min_width=-(-i.width * m // 8),  # type: ignore[union-attr]
                                     min_height=-(-i.height * m // 8)) for b, i, m in zip(blobs, infos, new_m,
                                                                                          strict=True)]

    def rest() -> None:
        for p, img in zip(paths, scaled, strict=True):
            p.read_bytes()
            cv2.resize(img, (side, side), dst=slot, interpolation=cv2.INTER_LINEAR)

    passes: dict[str, list[float]] = {}
    runs = {**{f"{m}/8": (lambda m=m: sj(m)) for m in SCALES}, "opencv_before": opencv, "rest": rest}
    load0 = os.getloadavg()[0]
    for _ in range(3):
        for name, fn in runs.items():
            t = time.process_time()
            fn()
            passes.setdefault(name, []).append((time.process_time() - t) * 1000 / len(blobs))
    best = {k: round(min(v), 3) for k, v in passes.items()}
    bound = (best["rest"] + best["opencv_before"]) / (best["rest"] + best["1/8"])
    print(json.dumps({
        "images": len(blobs),
        "short_side_px": [min(min(i.size) for i in infos if i), max(min(i.size) for i in infos if i)],  # type: ignore[union-attr]
        "scale": {"before (OpenCV 1/f)": {f"{8 // f}/8": n for f, n in sorted(Counter(base_f).items())},
                  "now (decode_scale)": {f"{m}/8": n for m, n in sorted(Counter(new_m).items())}},
        "decode_ms": {k: best[k] for k in [*(f"{m}/8" for m in SCALES), "opencv_before"]},
        "decode_ms_median_of_passes": {k: round(statistics.median(v), 3) for k, v in passes.items()},
        "rest_ms": best["rest"],
        "bound": round(bound, 3),
        "load": round((load0 + os.getloadavg()[0]) / 2, 2),
    }, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 224)
