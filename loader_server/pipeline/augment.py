"""Training augmentations, run in the workers and reproducible per sample.

A spec such as ``"rrc(scale=0.08-1),flip,jitter(0.4),rotate(10),cutout(0.25)"`` becomes a
pipeline. Every random choice comes from a generator seeded by (seed, epoch, sample index),
so the same run gives the same pixels whatever the worker count or a resume, and another
epoch gives other augmentations.

Random resized crop is fused with decoding: the crop is chosen in source coordinates and only
that region is resized, straight into the batch slot. The other operations work on the small
output image in place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from loader_client.contract.errors import ConfigError

__all__ = ["Augmenter", "parse_augment", "sample_rng"]

_OPS: dict[str, dict[str, Any]] = {
    "rrc": {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)},
    "flip": {"p": 0.5},
    "jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
    "rotate": {"degrees": 10.0},
    "cutout": {"size": 0.25, "p": 0.5},
}
_POSITIONAL = {"jitter": "brightness", "rotate": "degrees", "cutout": "size", "flip": "p"}
_AUG_STREAM = 0xA06  # keeps augmentation draws apart from any other use of (seed, epoch, index)


@dataclass(frozen=True)
class Op:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_augment(spec: str) -> tuple[Op, ...]:
    """Parse ``name(key=value,...)`` items separated by commas; ranges are written ``a-b``."""
    ops = []
    for m in re.finditer(r"\s*([a-z]+)\s*(?:\(([^)]*)\))?\s*(?:,|$)", spec):
        if not m.group(0).strip():
            continue
        name, args = m.group(1), m.group(2) or ""
        if name not in _OPS:
            raise ConfigError(f"`augment`: unknown operation {name!r} in {spec!r}; choose from {', '.join(_OPS)}")
        params = dict(_OPS[name])
        if name == "jitter" and args and "=" not in args:  # jitter(0.4): the same strength for all three
            params = {k: _number(args, spec) for k in params}
        else:
            for item in filter(None, (a.strip() for a in args.split(";" if ";" in args else ","))):
                key, _, value = item.partition("=")
                if not value:
                    key, value = _POSITIONAL.get(name, ""), key
                if key not in params:
                    raise ConfigError(f"`augment`: {name} has no parameter {key!r} (has {', '.join(params)})")
                params[key] = _range(value, spec) if isinstance(params[key], tuple) else _number(value, spec)
        ops.append(Op(name, params))
    if not ops and spec.strip():
        raise ConfigError(f"`augment`: cannot parse {spec!r}; example: \"rrc(scale=0.08-1),flip,jitter(0.4)\"")
    return tuple(ops)


def _number(text: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"`augment`: {text!r} is not a number in {spec!r}") from None


def _range(text: str, spec: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    lo, hi = _number(low, spec), _number(high, spec) if sep else _number(low, spec)
    if lo > hi:
        raise ConfigError(f"`augment`: range {text!r} runs backwards in {spec!r}")
    return lo, hi


def sample_rng(seed: int, epoch: int, index: int, stream: int = _AUG_STREAM) -> np.random.Generator:
    """The generator of one sample's augmentations (or, with another `stream`, its user transform)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index, stream])))


class Augmenter:
    """Applies a parsed pipeline; `crop_box` (for rrc) runs before the resize, `apply` after."""

    def __init__(self, ops: tuple[Op, ...]) -> None:
        self.ops = ops
        self.rrc = next((op for op in ops if op.name == "rrc"), None)
        self.post = [op for op in ops if op.name != "rrc"]

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random resized crop (x, y, w, h) of the source, as torchvision draws it."""
        assert self.rrc is not None
        area = width * height
        lo, hi = self.rrc.params["scale"]
        rlo, rhi = self.rrc.params["ratio"]
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            ratio = math.exp(rng.uniform(math.log(rlo), math.log(rhi)))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        side = min(width, height)  # fall back to the centre square, as torchvision does
        return (width - side) // 2, (height - side) // 2, side, side

    def apply(self, out: np.ndarray, rng: np.random.Generator) -> None:
        """Flip, jitter, rotate and cut out, in place on an (H, W, C) uint8 slot."""
        for op in self.post:
            p = op.params
            if op.name == "flip":
                if rng.random() < p["p"]:
                    cv2.flip(out, 1, dst=out)  # in place; numpy's out[:, ::-1] copy is about 30x slower
            elif op.name == "jitter":
                _jitter(out, rng, p["brightness"], p["contrast"], p["saturation"])
            elif op.name == "rotate":
                angle = rng.uniform(-p["degrees"], p["degrees"])
                h, w = out.shape[:2]
                m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
                rotated = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
                out[...] = rotated.reshape(out.shape)
            elif op.name == "cutout":
                if rng.random() < p["p"]:
                    h, w = out.shape[:2]
                    ch, cw = max(1, int(h * p["size"])), max(1, int(w * p["size"]))
                    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                    out[y : y + ch, x : x + cw] = 0


def _jitter(out: np.ndarray, rng: np.random.Generator, b: float, c: float, s: float) -> None:
    """Brightness, contrast and saturation factors in [1 - f, 1 + f], in place with saturating uint8 ops.

    Brightness and contrast fold into one pass: x' = (x fb - m') fc + m' with m' = fb * mean(x).
    """
    fb = rng.uniform(max(0.0, 1 - b), 1 + b) if b else 1.0
    fc = rng.uniform(max(0.0, 1 - c), 1 + c) if c else 1.0
    fs = rng.uniform(max(0.0, 1 - s), 1 + s) if s else 1.0
    if fb != 1.0 or fc != 1.0:
        mean = float(np.mean(cv2.mean(out)[: out.shape[2]])) * fb
        cv2.convertScaleAbs(out, dst=out, alpha=fb * fc, beta=mean * (1 - fc))
    if fs != 1.0 and out.shape[2] == 3:
        gray = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        cv2.addWeighted(out, fs, gray, 1 - fs, 0, dst=out)
