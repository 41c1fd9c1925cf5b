"""What each libjpeg-turbo binding costs here, per scale and for a random resized crop (CPU ms per image).

    python docs/bench/decode-less/bindings.py ../shared/corpus-large [200]

simplejpeg always; PyTurboJPEG when it imports (1.x with Debian's libturbojpeg0: 2.x needs a
libturbojpeg 3.0 that neither PyPI nor Debian 12 ships). Best of 3 passes over the first N
JPEGs of the folder, in this process (CPU time: insensitive to other jobs' share of the machine).
The per-scale costs relative to M = 8 are `SCALE_COST` in loader_server/pipeline/decode.py.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from loader_server.pipeline.augment import Augmenter, parse_augment, sample_rng


def best_ms(fn: Callable[[int], object], count: int) -> float:
    best = math.inf
    for _ in range(3):
        started = time.process_time()
        for k in range(count):
            fn(k)
        best = min(best, (time.process_time() - started) / count)
    return best * 1000


def main(folder: str, count: int) -> None:
    cv2.setNumThreads(1)
    files = [p.read_bytes() for p in sorted(Path(folder).rglob("*.jp*g"))[:count]]
    count = len(files)
    sizes = [simplejpeg.decode_jpeg_header(d)[:2] for d in files]  # (height, width)
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        turbo: TurboJPEG | None = TurboJPEG()
    except (ImportError, RuntimeError, OSError) as exc:
        print(f"PyTurboJPEG: not measured ({exc})")
        turbo = None
    print("| M/8 | simplejpeg ms | relative | PyTurboJPEG ms |")
    print("|---|---|---|---|")
    full = best_ms(lambda k: simplejpeg.decode_jpeg(files[k]), count)
    for m in range(1, 9):
        def sj(k: int, m: int = m) -> object:
            h, w = sizes[k]
            return simplejpeg.decode_jpeg(files[k], min_width=-(-w * m // 8), min_height=-(-h * m // 8))

        ms = best_ms(sj, count)
        pt = "–"
        if turbo is not None:
            factor = (Fraction(m, 8).numerator, Fraction(m, 8).denominator)
            pt = f"{best_ms(lambda k, sf=factor: turbo.decode(files[k], TJPF_RGB, scaling_factor=sf), count):.3f}"
        print(f"| {m}/8 | {ms:.3f} | {ms / full:.2f} | {pt} |")
    rrc = Augmenter(parse_augment("rrc"))
    boxes = [rrc.crop_box(w, h, sample_rng(0, 0, k)) for k, (h, w) in enumerate(sizes)]
    out = np.empty((224, 224, 3), np.uint8)

    def smallest(w: int, h: int) -> int:
        return next((m for m in range(1, 9) if w * m >= 8 * 224 and h * m >= 8 * 224), 8)

    def whole_at_crop_scale(k: int) -> None:
        x, y, w, h = boxes[k]
        m = smallest(w, h)
        H, W = sizes[k]
        img = simplejpeg.decode_jpeg(files[k], min_width=-(-W * m // 8), min_height=-(-H * m // 8))
        s = m / 8
        cv2.resize(img[int(y * s) : math.ceil((y + h) * s), int(x * s) : math.ceil((x + w) * s)], (224, 224), dst=out)

    print(f"\nrrc at 224, whole photo decoded at the crop's smallest M/8 by simplejpeg, then cropped: "
          f"{best_ms(whole_at_crop_scale, count):.3f} ms")
    if turbo is not None:
        def lossless_crop_first(k: int) -> None:
            x, y, w, h = boxes[k]
            x0, y0 = x // 16 * 16, y // 16 * 16
            cropped = turbo.crop(files[k], x0, y0, x + w - x0, y + h - y0)
            f = Fraction(smallest(w, h), 8)
            img = turbo.decode(cropped, TJPF_RGB, scaling_factor=(f.numerator, f.denominator))
            s = f.numerator / f.denominator
            ax, ay = int((x - x0) * s), int((y - y0) * s)
            cv2.resize(img[ay : ay + int(h * s), ax : ax + int(w * s)], (224, 224), dst=out)

        print(f"rrc at 224, PyTurboJPEG lossless MCU-aligned crop (tjTransform) then decode at the crop's scale: "
              f"{best_ms(lossless_crop_first, count):.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200)
