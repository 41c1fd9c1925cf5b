"""CPU per image of ``--resize crop`` (no augmentation): the whole JPEG decoded at its scale, then the
centre cut (the decoder before this change, `_jpegregion` switched off), against the centre's window
alone decoded by the region decoder.

    PYTHONPATH=TREE python docs/bench/decode-less/centre.py DATA [SIZE]

DATA is a folder of JPEGs (or a train.txt beside them). Every output is first checked bitwise equal
between the two paths. One core, 3 interleaved passes (CPU ms per image, best of each), page cache warm.
Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from floor import files_of  # (this folder: where Python finds a script's neighbours)

from loader_server.options import DecodeOptions
from loader_server.pipeline import decode as decode_module
from loader_server.pipeline.decode import Decoder


def _pass(dec: Decoder, blobs: list[bytes], out: np.ndarray) -> float:
    started = time.process_time()
    for b in blobs:
        dec.decode_into(b, "x.jpg", out)
    return (time.process_time() - started) * 1000 / len(blobs)


def main(data: str, side: int = 224) -> None:
    region = decode_module._jpegregion
    assert region is not None, "loader_server.pipeline._jpegregion is not built (setup.py)"
    blobs = [p.read_bytes() for p in files_of(data)]
    dec = Decoder(DecodeOptions(size=(side, side), resize="crop"))
    out = np.empty((side, side, 3), np.uint8)
    other = out.copy()
    for b in blobs:  # bitwise the same output, window or whole
        dec.decode_into(b, "x.jpg", out)
        decode_module._jpegregion = None
        dec.decode_into(b, "x.jpg", other)
        decode_module._jpegregion = region
        assert np.array_equal(out, other)
    whole, window = [], []
    for _ in range(3):
        decode_module._jpegregion = None
        whole.append(_pass(dec, blobs, out))
        decode_module._jpegregion = region
        window.append(_pass(dec, blobs, out))
    print(json.dumps({"data": data, "images": len(blobs), "size": side, "load": os.getloadavg()[0],
                      "whole_ms": round(min(whole), 3), "window_ms": round(min(window), 3),
                      "speedup": round(min(whole) / min(window), 3)}))


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
