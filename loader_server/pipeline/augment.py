"""Training augmentations, run in the workers and reproducible per sample.

A spec such as ``"rrc(scale=0.08-1),flip,jitter(0.4),rotate(10),cutout(0.25)"`` becomes a
pipeline. Every random choice comes from a generator seeded by (seed, epoch, sample index),
so the same run gives the same pixels whatever the worker count or a resume, and another
epoch gives other augmentations.

**One class per operation**, registered by `@augmentation`, declaring its `stage`:

* `Stage.SOURCE`: it chooses the region of the full-size source that the resize takes
  (`region`); the decode step resizes only that region, straight into the batch slot. At most
  one per pipeline (random resized crop);
* `Stage.OUTPUT`: it changes the resized sample in place (`apply`), and returns the numbers it
  drew (a batch manifest lists them: ``flip`` [1], ``rotate`` [-3.2], ...).

A new augmentation is one class in this file: nothing else names operations.
"""

from __future__ import annotations

import enum
import math
import re
from typing import Any, ClassVar

import cv2
import numpy as np

from loader_client.contract.errors import ConfigError

__all__ = ["Augmentation", "Augmenter", "Stage", "augmentation", "parse_augment", "sample_rng"]

_AUG_STREAM = 0xA06  # keeps augmentation draws apart from any other use of (seed, epoch, index)


class Stage(enum.Enum):
    """Where an augmentation runs in the sample path."""

    SOURCE = "source"  # on the full-size source: chooses the region the resize takes
    OUTPUT = "output"  # after the resize, in place on the output slot


class Augmentation:
    """One operation: its name in ``--augment``, its parameters with their defaults, its stage."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    defaults: ClassVar[dict[str, Any]]  # a tuple default is a range written ``a-b``
    positional: ClassVar[str | None] = None  # the parameter a bare value sets: ``rotate(10)``; "*": all of them
    #: Each parameter's range (low, high, whether low itself is refused), checked when the spec is parsed: a
    #: value outside it would fail in the workers mid-epoch (``cutout(2)``: "high <= 0") or draw nothing.
    bounds: ClassVar[dict[str, tuple[float, float, bool]]] = {}

    def __init__(self, **params: Any) -> None:
        self.params = {**self.defaults, **params}

    def __repr__(self) -> str:
        return f"{self.name}({self.params})"

    def region(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """SOURCE stage: the region (x, y, w, h) of a `width` x `height` source that the resize takes."""
        raise NotImplementedError

    def apply(self, out: np.ndarray, rng: np.random.Generator) -> list[float]:
        """OUTPUT stage: change the (H, W, C) uint8 slot `out` in place; return what was drawn (for a manifest)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Augmentation]] = {}


def augmentation(cls: type[Augmentation]) -> type[Augmentation]:
    """Register an operation under its `name` (the class decorator of every operation)."""
    _REGISTRY[cls.name] = cls
    return cls


@augmentation
class RandomResizedCrop(Augmentation):
    """torchvision's RandomResizedCrop draw: a region of `scale` of the area and `ratio` of aspect."""

    name = "rrc"
    stage = Stage.SOURCE
    defaults = {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}
    bounds = {"scale": (0.0, 1.0, True), "ratio": (0.0, 1000.0, True)}

    def region(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = width * height
        lo, hi = self.params["scale"]
        rlo, rhi = self.params["ratio"]
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            ratio = math.exp(rng.uniform(math.log(rlo), math.log(rhi)))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        side = min(width, height)  # fall back to the centre square, as torchvision does
        return (width - side) // 2, (height - side) // 2, side, side


@augmentation
class Flip(Augmentation):
    name = "flip"
    stage = Stage.OUTPUT
    defaults = {"p": 0.5}
    positional = "p"
    bounds = {"p": (0.0, 1.0, False)}

    def apply(self, out: np.ndarray, rng: np.random.Generator) -> list[float]:
        if rng.random() < self.params["p"]:
            cv2.flip(out, 1, dst=out)  # in place; numpy's out[:, ::-1] copy is about 30x slower
            return [1]
        return [0]


@augmentation
class Jitter(Augmentation):
    """Brightness, contrast and saturation factors in [1 - f, 1 + f]; ``jitter(0.4)`` sets all three."""

    name = "jitter"
    stage = Stage.OUTPUT
    defaults = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}
    positional = "*"
    bounds = {"brightness": (0.0, 1.0, False), "contrast": (0.0, 1.0, False), "saturation": (0.0, 1.0, False)}

    def apply(self, out: np.ndarray, rng: np.random.Generator) -> list[float]:
        p = self.params
        return _jitter(out, rng, p["brightness"], p["contrast"], p["saturation"])


@augmentation
class Rotate(Augmentation):
    name = "rotate"
    stage = Stage.OUTPUT
    defaults = {"degrees": 10.0}
    positional = "degrees"
    bounds = {"degrees": (0.0, 180.0, False)}

    def apply(self, out: np.ndarray, rng: np.random.Generator) -> list[float]:
        angle = rng.uniform(-self.params["degrees"], self.params["degrees"])
        h, w = out.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        rotated = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out[...] = rotated.reshape(out.shape)
        return [float(angle)]


@augmentation
class Cutout(Augmentation):
    name = "cutout"
    stage = Stage.OUTPUT
    defaults = {"size": 0.25, "p": 0.5}
    positional = "size"
    bounds = {"size": (0.0, 1.0, True), "p": (0.0, 1.0, False)}

    def apply(self, out: np.ndarray, rng: np.random.Generator) -> list[float]:
        if rng.random() < self.params["p"]:
            h, w = out.shape[:2]
            ch, cw = max(1, int(h * self.params["size"])), max(1, int(w * self.params["size"]))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            out[y : y + ch, x : x + cw] = 0
            return [x, y, cw, ch]
        return []


def parse_augment(spec: str) -> tuple[Augmentation, ...]:
    """Parse ``name(key=value,...)`` items separated by commas; ranges are written ``a-b``."""
    ops: list[Augmentation] = []
    for m in re.finditer(r"\s*([a-z]+)\s*(?:\(([^)]*)\))?\s*(?:,|$)", spec):
        if not m.group(0).strip():
            continue
        name, args = m.group(1), m.group(2) or ""
        cls = _REGISTRY.get(name)
        if cls is None:
            raise ConfigError(f"`augment`: unknown operation {name!r} in {spec!r}; choose from {', '.join(_REGISTRY)}")
        params = dict(cls.defaults)
        items = [a.strip() for a in args.split(";" if ";" in args else ",") if a.strip()]
        if cls.positional == "*" and len(items) == 1 and "=" not in items[0]:
            params = {k: _number(items[0], spec) for k in params}  # jitter(0.4): the same strength for all
            items = []
        for item in items:
            key, _, value = item.partition("=")
            if not value:  # a bare value: the positional parameter ("*" with others named: the first)
                key, value = (next(iter(cls.defaults)) if cls.positional == "*" else cls.positional or ""), key
            if key not in params:
                raise ConfigError(f"`augment`: {name} has no parameter {key!r} (has {', '.join(params)})")
            params[key] = _range(value, spec) if isinstance(params[key], tuple) else _number(value, spec)
        _check_bounds(cls, params, spec)
        ops.append(cls(**params))
    if not ops and spec.strip():
        raise ConfigError(f"`augment`: cannot parse {spec!r}; example: \"rrc(scale=0.08-1),flip,jitter(0.4)\"")
    sources = [op.name for op in ops if op.stage is Stage.SOURCE]
    if len(sources) > 1:
        raise ConfigError(f"`augment`: {' and '.join(sources)} both choose the region of the source; keep one")
    return tuple(ops)


def _check_bounds(cls: type[Augmentation], params: dict[str, Any], spec: str) -> None:
    for key, (low, high, open_low) in cls.bounds.items():
        value = params[key]
        for v in value if isinstance(value, tuple) else (value,):
            if not (low < v <= high if open_low else low <= v <= high):  # NaN fails both
                shown = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
                raise ConfigError(f"`augment`: {cls.name} {key} must be in {shown}, got {v:g} in {spec!r}")


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
    """A parsed pipeline split by stage: `crop_box` (the SOURCE op) runs before the resize, `apply` after."""

    def __init__(self, ops: tuple[Augmentation, ...]) -> None:
        self.ops = ops
        #: The operation that chooses the source region (rrc), or None: then the plain resize applies.
        self.source = next((op for op in ops if op.stage is Stage.SOURCE), None)
        self.post = [op for op in ops if op.stage is Stage.OUTPUT]

    @property
    def source_crop_name(self) -> str | None:
        return self.source.name if self.source is not None else None

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The region (x, y, w, h) of the source that the SOURCE-stage operation draws."""
        assert self.source is not None
        return self.source.region(width, height, rng)

    def apply(self, out: np.ndarray, rng: np.random.Generator,
              drawn: list[tuple[str, list[float]]] | None = None) -> None:
        """The OUTPUT-stage operations, in order, in place on an (H, W, C) uint8 slot; with `drawn`, each
        one's name and the numbers it drew are appended there."""
        for op in self.post:
            values = op.apply(out, rng)
            if drawn is not None:
                drawn.append((op.name, values))

def _jitter(out: np.ndarray, rng: np.random.Generator, b: float, c: float, s: float) -> list[float]:
    """Brightness, contrast and saturation factors in [1 - f, 1 + f], in place with saturating uint8 ops;
    returns the three factors.

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
    return [float(fb), float(fc), float(fs)]
