"""CPU per image of an `rrc` crop's decode alone: simplejpeg down to one MCU row below the crop (the path
where the region decoder is not built) against the region decoder (`_jpegregion`: the window only).

    PYTHONPATH=TREE python docs/bench/decode-less/region.py DATA [SIZE]

DATA is a folder of baseline JPEGs (or a train.txt beside them). Each image gets the server's own
`rrc` draw for (seed 0, epoch 0, its index) at SIZE x SIZE (224), decoded at the crop's scale
(`decode_scale`) to RGB; before timing, every window is checked bitwise against the same region
of a whole decode at that scale. One core, 3 interleaved passes (CPU ms per image of each),
page cache warm. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import simplejpeg
from floor import files_of  # (this folder: where Python finds a script's neighbours)

from loader_server.options import DecodeOptions
from loader_server.pipeline import decode as decode_module
from loader_server.pipeline.augment import Augmenter, parse_augment, sample_rng
from loader_server.pipeline.decode import Decoder, decode_scale, jpeg_info, stored_box


def main(data: str, side: int = 224) -> None:
    region = decode_module._jpegregion
    assert region is not None, "loader_server.pipeline._jpegregion is not built (setup.py)"
    blobs = [p.read_bytes() for p in files_of(data)]
    rrc = Augmenter(parse_augment("rrc"))
    with_binding = Decoder(DecodeOptions(size=(side, side)))
    jobs = []
    for i, b in enumerate(blobs):
        info = jpeg_info(b)
        assert info is not None and info.single_scan, "baseline JPEGs only"
        box = rrc.crop_box(*info.size, sample_rng(0, 0, i))
        m = decode_scale(box[2], box[3], (side, side))
        stored = stored_box(box, info.orientation, info.width, info.height)
        got = with_binding._region(b, info, m, stored, 3)
        whole = simplejpeg.decode_jpeg(b, "RGB", min_width=-(-info.width * m // 8),
                                       min_height=-(-info.height * m // 8))
        x, y, w, h = stored
        s = m / 8
        y0, y1 = decode_module._span(y, h, s, whole.shape[0])
        x0, x1 = decode_module._span(x, w, s, whole.shape[1])
        assert np.array_equal(got, whole[y0:y1, x0:x1]), f"image {i}: the window differs from a whole decode"
        jobs.append((b, info, box, m, stored))

    def binding() -> None:
        for b, info, _, m, stored in jobs:
            with_binding._region(b, info, m, stored, 3)

    without = Decoder(DecodeOptions(size=(side, side)))

    def shortened() -> None:
        decode_module._jpegregion = None
        try:
            for b, info, box, _, _ in jobs:
                without._turbo(b, info, box, None, True)
        finally:
            decode_module._jpegregion = region

    passes: dict[str, list[float]] = {"simplejpeg_below_crop": [], "region_window": []}
    load0 = os.getloadavg()[0]
    for _ in range(3):
        for name, fn in (("simplejpeg_below_crop", shortened), ("region_window", binding)):
            t = time.process_time()
            fn()
            passes[name].append(round((time.process_time() - t) * 1000 / len(jobs), 3))
    scales: dict[str, int] = {}
    for *_, m, _ in jobs:
        scales[f"{m}/8"] = scales.get(f"{m}/8", 0) + 1
    print(json.dumps({"images": len(jobs), "scales": scales, "cpu_ms_per_image": passes,
                      "ratio_of_best": round(min(passes["simplejpeg_below_crop"]) / min(passes["region_window"]), 3),
                      "load": round((load0 + os.getloadavg()[0]) / 2, 2)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 224)
