"""Offline, seeded image-classification tasks for demos, tests and the transfer benchmark.

Why this exists: the SSF story ("pretrain once, adapt cheaply to many tasks") needs a pretraining task and
several *different* downstream tasks, and this project must run with no network access. So we generate them:

* one SOURCE task (``scenes``: one object per image with four labelled factors, shape x fill x hue x background
  texture, and unlabelled nuisances: scale, position, tilt, distractors, clutter) that a small ViT is pretrained on
  (see ``scripts/pretrain_backbone.py``, which streams fresh scenes from :func:`source_stream`), and
* TARGET tasks that ask what the source never labels, in the spirit of VTAB's groups: ``digits`` and ``texture``
  ("natural": real handwritten digits from scikit-learn; texture families like DTD, none of them in the source)
  and ``counting``, ``orientation``, ``position``, ``relation`` ("structured": CLEVR-count, dSprites orientation /
  location and a CLEVR-like spatial relation between two objects). The synthetic targets have about 1,000
  training images each (VTAB-1k's budget); ``digits`` has 1,000 of scikit-learn's 1,797.

Every image is 32x32 RGB, drawn at 64x64 with PIL and box-downsampled (cheap anti-aliasing), on a random
colour-gradient background with faint clutter lines and pixel noise. Generation is pure numpy + PIL and is
deterministic: each (seed, task, split) has its own random stream, so changing ``n_train`` never changes the
validation or test images. The source objects come at any position and scale, with distractors the labels ignore,
so a pretrained backbone is pushed towards features that ignore exactly what ``position``, ``counting`` and
``relation`` ask about: the gap a frozen backbone + linear head leaves, which fine-tuning has to recover.

Augmenting target tasks: a horizontal flip changes the label of ``orientation`` (angle -> 180 - angle),
``position`` (column) and ``digits``, and a shift of a few pixels can move ``position``'s shape to another cell;
fine-tune them without flips and crops.

On disk a task is a ``datasets`` imagefolder: ``<root>/<task>/{train,validation,test}/<class>/<i>.png``.
Class directory names sort in label order, so imagefolder's inferred label ids equal ours.

Typical use::

    from peft_ssf.demo import make_task, load_task
    make_task("counting", "data", seed=0)           # writes data/counting/..., seconds
    ds = load_task("counting", "data")                # datasets.DatasetDict with "image" and "label"
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

if TYPE_CHECKING:  # datasets is only needed by load_task; keep `import peft_ssf.demo` light
    from datasets import DatasetDict

__all__ = [
    "GENERATOR_VERSION",
    "IMAGE_SIZE",
    "SOURCE_TASK",
    "SPLITS",
    "TARGET_TASKS",
    "TASKS",
    "SplitArrays",
    "TaskSpec",
    "digits_partition",
    "generate_task",
    "load_task",
    "make_task",
]

IMAGE_SIZE = 32  # final image side, pixels
GENERATOR_VERSION = 3  # bump when any renderer changes its output; recorded next to generated data
SPLITS = ("train", "validation", "test")

_CANVAS = 2 * IMAGE_SIZE  # render at 2x, then box-downsample
_META_FILE = ".task.json"  # hidden, so imagefolder ignores it
_YY, _XX = np.mgrid[0:_CANVAS, 0:_CANVAS].astype(np.float32) + 0.5  # pixel-centre coordinates of the canvas
_XC, _YC = (_XX - _CANVAS / 2) / _CANVAS, (_YY - _CANVAS / 2) / _CANVAS  # centred, in canvas widths

Renderer = Callable[[np.random.Generator, int], np.ndarray]  # (rng, label) -> uint8 array [32, 32, 3]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its classes (sorted = label order), VTAB-style group and default per-class split sizes."""

    name: str
    group: str  # "source", "natural" or "structured"
    description: str
    classes: tuple[str, ...]
    n_train: int  # default images per class in each split
    n_val: int
    n_test: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sizes(self) -> dict[str, int]:
        """Default total number of images per split."""
        k = self.num_classes
        return {"train": k * self.n_train, "validation": k * self.n_val, "test": k * self.n_test}


@dataclass(frozen=True)
class SplitArrays:
    """One split in memory: ``images`` uint8 [N, 32, 32, 3] and ``labels`` int64 [N].

    ``factors`` (int64 [N, F]) only for the source task: every labelled factor, columns in ``SOURCE_FACTORS`` order
    (column 0, the shape, equals ``labels``).
    """

    images: np.ndarray
    labels: np.ndarray
    factors: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------------
# Drawing primitives (all on the 64x64 PIL canvas, box-downsampled to 32x32 at the end)
# --------------------------------------------------------------------------------------------------------------


def _luma(rgb: np.ndarray) -> float:
    return float(rgb[0] * 0.299 + rgb[1] * 0.587 + rgb[2] * 0.114)


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray, min_diff: float = 70.0) -> np.ndarray:
    """A random RGB colour whose luma differs from ``against``'s by at least ``min_diff`` (0..255 scale)."""
    ref = _luma(against)
    for _ in range(100):
        c = rng.uniform(0, 255, 3)
        if abs(_luma(c) - ref) >= min_diff:
            return c
    return np.full(3, 0.0 if ref > 127 else 255.0)  # practically unreachable


def _background(rng: np.random.Generator, clutter: bool = True) -> tuple[Image.Image, np.ndarray]:
    """A linear colour gradient in a random direction plus 0-3 faint random lines. Returns (canvas, mean colour)."""
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 40, 3), 0, 255).astype(np.float32)
    a = rng.uniform(0, 2 * math.pi)
    t = (_XC * math.cos(a) + _YC * math.sin(a) + 0.5)[..., None]
    canvas = Image.fromarray(np.clip(c0 + (c1 - c0) * t + 0.5, 0, 255).astype(np.uint8))  # RGB, 64x64
    if clutter:
        draw = ImageDraw.Draw(canvas, "RGBA")  # RGBA fill blends onto the RGB canvas
        for _ in range(int(rng.integers(0, 4))):
            xy = [tuple(rng.uniform(0, _CANVAS, 2)), tuple(rng.uniform(0, _CANVAS, 2))]
            colour = (*_rgb(rng.uniform(0, 255, 3)), int(rng.uniform(0.2, 0.5) * 255))
            draw.line(xy, fill=colour, width=int(rng.integers(1, 3)))
    return canvas, (c0 + c1) / 2


def _rgb(colour: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(v))) for v in colour)
    return r, g, b


def _paint(canvas: Image.Image, mask: Image.Image, colour: np.ndarray) -> None:
    """Fill ``canvas`` (in place) with a flat colour where the "L" ``mask`` is set (partial values blend)."""
    canvas.paste(_rgb(colour), (0, 0, _CANVAS, _CANVAS), mask)


def _finish(canvas: Image.Image, rng: np.random.Generator, noise: float = 8.0) -> np.ndarray:
    """Box-downsample the canvas to 32x32 and add Gaussian pixel noise of a random strength in [0, noise]."""
    out = np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.float32)
    out = out + rng.normal(0, rng.uniform(0, noise), out.shape).astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _transform(points: list[tuple[float, float]], cx: float, cy: float, r: float, theta: float) -> list[tuple]:
    """Rotate unit-scale points by ``theta`` (radians, counter-clockwise on screen), scale by ``r``, move."""
    c, s = math.cos(theta), math.sin(theta)
    return [(cx + r * (x * c + y * s), cy + r * (-x * s + y * c)) for x, y in points]


def _disk(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: int) -> None:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _regular(n: int, radius: float = 1.0, phase: float = math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * i / n), -radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "arrow": [(-1, -0.25), (0.15, -0.25), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.25), (-1, 0.25)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "star": [p for i in range(5) for p in (_regular(5)[i], _regular(5, 0.42, math.pi / 2 + math.pi / 5)[i])],
    "tee": [(-0.9, -0.9), (0.9, -0.9), (0.9, -0.45), (0.22, -0.45), (0.22, 0.95), (-0.22, 0.95), (-0.22, -0.45),
            (-0.9, -0.45)],
    "triangle": _regular(3),
}


def _shape_mask(kind: str, cx: float, cy: float, r: float, theta: float) -> Image.Image:
    """A 64x64 "L" mask of one shape of (outer) radius ``r`` centred at (cx, cy), rotated by ``theta``."""
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    if kind in _POLYGONS:
        draw.polygon(_transform(_POLYGONS[kind], cx, cy, r, theta), fill=255)
    elif kind == "circle":
        _disk(draw, cx, cy, 0.9 * r, 255)
    elif kind == "ring":
        _disk(draw, cx, cy, 0.95 * r, 255)
        _disk(draw, cx, cy, 0.55 * r, 0)
    elif kind == "crescent":
        _disk(draw, cx, cy, 0.95 * r, 255)
        (ox, oy), = _transform([(0.45, 0.0)], cx, cy, r, theta)
        _disk(draw, ox, oy, 0.8 * r, 0)
    elif kind == "heart":
        lobes = _transform([(-0.45, -0.35), (0.45, -0.35)], cx, cy, r, theta)
        for lx, ly in lobes:
            _disk(draw, lx, ly, 0.5 * r, 255)
        draw.polygon(_transform([(-0.93, -0.17), (0.93, -0.17), (0.0, 0.95)], cx, cy, r, theta), fill=255)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return mask


def _place(rng: np.random.Generator, r: float) -> tuple[float, float]:
    """A random centre that keeps a radius-``r`` shape inside the canvas."""
    return float(rng.uniform(r, _CANVAS - r)), float(rng.uniform(r, _CANVAS - r))


# --------------------------------------------------------------------------------------------------------------
# Renderers: one per synthetic task, (rng, label) -> uint8 image
# --------------------------------------------------------------------------------------------------------------

SHAPES = ("arrow", "circle", "crescent", "cross", "heart", "ring", "square", "star", "tee", "triangle")


_SMALL = ("circle", "square", "triangle")
MAX_COUNT = 6


def _render_counting(rng: np.random.Generator, label: int) -> np.ndarray:
    """``label + 1`` small non-overlapping objects (mixed kinds and colours)."""
    canvas, bg = _background(rng)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:
        r = float(rng.uniform(4.5, 7))
        cx, cy = _place(rng, r + 1)
        if all((cx - x) ** 2 + (cy - y) ** 2 >= (r + q + 3) ** 2 for x, y, q in placed):
            placed.append((cx, cy, r))
            kind = _SMALL[int(rng.integers(len(_SMALL)))]
            _paint(canvas, _shape_mask(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), _contrasting_colour(rng, bg))
    return _finish(canvas, rng)


N_ANGLES = 16  # orientation bins over 180 degrees (11.25 degrees each, as VTAB's dSprites orientation)
ANGLE_JITTER = 3.0  # degrees either side of a bin's centre


def _render_orientation(rng: np.random.Generator, label: int) -> np.ndarray:
    """One elongated bar or ellipse whose angle (mod 180) is within +-3 degrees of ``label * 11.25``."""
    canvas, bg = _background(rng)
    half_len, half_w = float(rng.uniform(12, 24)), float(rng.uniform(2.5, 4.5))
    theta = math.radians(label * 180.0 / N_ANGLES + rng.uniform(-ANGLE_JITTER, ANGLE_JITTER))
    cx, cy = _place(rng, half_len + 1)
    if rng.random() < 0.5:
        unit = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
    else:
        unit = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]
    pts = _transform([(x * half_len, y * half_w) for x, y in unit], cx, cy, 1.0, theta)
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    _paint(canvas, mask, _contrasting_colour(rng, bg))
    return _finish(canvas, rng)


GRID = 3  # position task: GRID x GRID cells


def _render_position(rng: np.random.Generator, label: int) -> np.ndarray:
    """One small random shape whose centre lies in grid cell ``label`` (row-major, 3x3)."""
    canvas, bg = _background(rng)
    row, col = divmod(label, GRID)
    cell = _CANVAS / GRID
    cx = (col + 0.5 + rng.uniform(-0.25, 0.25)) * cell
    cy = (row + 0.5 + rng.uniform(-0.25, 0.25)) * cell
    r = float(rng.uniform(7, 11))
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    _paint(canvas, _shape_mask(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), _contrasting_colour(rng, bg))
    return _finish(canvas, rng)


RELATIONS = ("above", "below", "left", "right")  # relation task: where the cross is, seen from the ring


def _render_relation(rng: np.random.Generator, label: int) -> np.ndarray:
    """A ring and a cross (random colours, sizes, rotations); the cross lies in direction ``RELATIONS[label]`` of the
    ring, within +-30 degrees of that axis, 14-40 canvas pixels away (a CLEVR-like spatial relation)."""
    canvas, bg = _background(rng)
    direction = {"above": -math.pi / 2, "below": math.pi / 2, "left": math.pi, "right": 0.0}[RELATIONS[label]]
    for _ in range(1000):
        r1, r2 = float(rng.uniform(6, 10)), float(rng.uniform(6, 10))
        angle, dist = direction + rng.uniform(-math.pi / 6, math.pi / 6), float(rng.uniform(max(14, r1 + r2 + 3), 40))
        x1, y1 = _place(rng, r1)
        x2, y2 = x1 + dist * math.cos(angle), y1 + dist * math.sin(angle)  # screen y grows downwards
        if r2 <= x2 <= _CANVAS - r2 and r2 <= y2 <= _CANVAS - r2:
            break
    for kind, x, y, r in (("ring", x1, y1, r1), ("cross", x2, y2, r2)):
        _paint(canvas, _shape_mask(kind, x, y, r, rng.uniform(0, 2 * math.pi)), _contrasting_colour(rng, bg))
    return _finish(canvas, rng)


TEXTURES = ("blotches", "checker", "dots", "grid", "rings", "stripes", "waves", "zigzag")


def _texture_mask(rng: np.random.Generator, kind: str, period: tuple[float, float] = (10, 20)) -> np.ndarray:
    """Boolean 64x64 pattern of family ``kind`` at a random period (canvas pixels, drawn from ``period``; the
    default is 5-10 px in the final image), phase and orientation."""
    p = float(rng.uniform(*period))
    a = rng.uniform(0, math.pi)
    x0, y0 = rng.uniform(0, _CANVAS, 2)
    u = (_XX - x0) * math.cos(a) + (_YY - y0) * math.sin(a)
    v = -(_XX - x0) * math.sin(a) + (_YY - y0) * math.cos(a)
    if kind == "stripes":
        return np.sin(2 * math.pi * u / p) > rng.uniform(-0.4, 0.4)
    if kind == "checker":
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    if kind == "dots":
        du, dv = u % p - p / 2, v % p - p / 2
        return du**2 + dv**2 < (p * rng.uniform(0.2, 0.32)) ** 2
    if kind == "grid":
        w = p * rng.uniform(0.15, 0.25)
        return (u % p < w) | (v % p < w)
    if kind == "rings":
        return np.sin(2 * math.pi * np.sqrt(u**2 + v**2) / p) > 0
    if kind == "waves":
        return np.sin(2 * math.pi * (u + p * rng.uniform(0.3, 0.6) * np.sin(2 * math.pi * v / (2 * p))) / p) > 0
    if kind == "zigzag":
        tri = 2 * np.abs((v / (1.5 * p)) % 1 - 0.5)  # triangle wave in [0, 1]
        return np.sin(2 * math.pi * (u + p * rng.uniform(0.5, 0.9) * tri) / p) > 0
    if kind == "bricks":
        h, w = p * 0.6, p * 0.12  # row height, mortar width
        row = np.floor(v / h)
        return (v % h < w) | ((u + (row % 2) * p / 2) % p < w)
    if kind == "crosses":
        du, dv, arm, w = np.abs(u % p - p / 2), np.abs(v % p - p / 2), p * 0.35, p * 0.1
        return ((du < w) & (dv < arm)) | ((dv < w) & (du < arm))
    if kind == "noise":
        n = int(rng.integers(8, 17))  # random binary cells, 2-4 px in the final image
        return np.asarray(Image.fromarray((rng.random((n, n)) < 0.5).astype(np.uint8) * 255)
                          .resize((_CANVAS, _CANVAS), Image.NEAREST)) > 0
    if kind == "spiral":
        return np.sin(2 * math.pi * np.sqrt(u**2 + v**2) / p + int(rng.integers(1, 4)) * np.arctan2(v, u)) > 0
    if kind == "sunburst":
        return np.sin(int(rng.integers(5, 11)) * np.arctan2(v, u)) > 0
    if kind == "triangles":
        w = p * 0.12
        return np.any([(u * math.cos(t) + v * math.sin(t)) % p < w for t in (0, math.pi / 3, 2 * math.pi / 3)], 0)
    if kind == "blotches":
        n = int(rng.integers(4, 8))
        low = Image.fromarray(rng.uniform(0, 255, (n, n)).astype(np.uint8))
        smooth = np.asarray(low.resize((_CANVAS, _CANVAS), Image.BICUBIC), dtype=np.float32)
        return smooth > np.median(smooth)
    raise ValueError(f"unknown texture {kind!r}")


#: target texture periods in canvas pixels: 3-6 px in the final image, finer than the source backgrounds' 5-10 px
TEXTURE_PERIOD = (6.0, 12.0)


def _render_texture(rng: np.random.Generator, label: int) -> np.ndarray:
    """A full-frame two-colour pattern of family ``label`` at a fine period (``TEXTURE_PERIOD``), random phase,
    orientation and colours."""
    canvas, bg = _background(rng, clutter=False)
    mask = Image.fromarray(_texture_mask(rng, TEXTURES[label], TEXTURE_PERIOD).astype(np.uint8) * 255)
    _paint(canvas, mask, _contrasting_colour(rng, bg, min_diff=50))
    return _finish(canvas, rng)


SOURCE_TEXTURES = ("bricks", "crosses", "noise", "spiral", "sunburst", "triangles")  # none is a target family

# --------------------------------------------------------------------------------------------------------------
# SOURCE: "scenes", one main object with four labelled factors, plus unlabelled nuisances
# --------------------------------------------------------------------------------------------------------------

SCENE_SHAPES = ("arrow", "circle", "crescent", "cross", "ell", "heart", "hourglass", "semicircle", "square", "star",
                "tee", "triangle")
SCENE_FILLS = ("outline", "solid", "striped")
SCENE_HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")  # 60-degree hue bins centred on 0, 60, ...
SCENE_BACKGROUNDS = ("gradient", *SOURCE_TEXTURES)
#: the labelled factors of the source task, in the column order of ``SplitArrays.factors``; "shape" is the primary
#: label (``SplitArrays.labels`` and the imagefolder classes)
SOURCE_FACTORS: dict[str, tuple[str, ...]] = {
    "shape": SCENE_SHAPES, "fill": SCENE_FILLS, "hue": SCENE_HUES, "background": SCENE_BACKGROUNDS,
}
MAX_DISTRACTORS = 3
SCENE_TILT = math.radians(45)  # the main object is rotated by up to +-45 degrees

_POLYGONS.update({
    "ell": [(-0.75, -1), (-0.2, -1), (-0.2, 0.45), (0.75, 0.45), (0.75, 1), (-0.75, 1)],
    "hourglass": [(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1), (-0.12, 0)],
    "semicircle": [(math.cos(t), 0.42 - math.sin(t)) for t in np.linspace(0, math.pi, 17)],
})


def _hue_colour(rng: np.random.Generator, hue_bin: int) -> np.ndarray:
    """A saturated RGB colour (0..255) whose hue lies within +-21 degrees of ``hue_bin * 60``."""
    import colorsys

    h = ((hue_bin + rng.uniform(-0.35, 0.35)) / len(SCENE_HUES)) % 1.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))) * 255


def _far_colour(rng: np.random.Generator, ref: np.ndarray, lo: float, hi: float = 256.0) -> np.ndarray:
    """A random RGB colour whose luma differs from ``ref``'s by at least ``lo`` and less than ``hi``."""
    for _ in range(200):
        c = rng.uniform(0, 255, 3)
        if lo <= abs(_luma(c) - _luma(ref)) < hi:
            return c
    return np.full(3, 0.0 if _luma(ref) > 127 else 255.0)


def _render_scene(rng: np.random.Generator, shape: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """SOURCE: one main object of shape ``shape`` and random fill, hue and background (the labelled factors).

    Unlabelled nuisances: the object's scale (radius 5-11 px), position (anywhere inside the frame), rotation (up to
    +-45 degrees), saturation and brightness; the background's colours, gradient direction and texture period / phase /
    angle; 0-3 small distractor objects of any colour; 0-3 faint clutter lines; pixel noise. Returns the image and
    its factors (shape, fill, hue, background). The object's colour keeps a luma difference of at least 60 to the
    background, so every factor is visible.
    """
    fill, hue, back = (int(rng.integers(len(v))) for v in (SCENE_FILLS, SCENE_HUES, SCENE_BACKGROUNDS))
    colour = _hue_colour(rng, hue)
    c0 = _far_colour(rng, colour, 60)
    c1 = np.clip(c0 + rng.normal(0, 30, 3), 0, 255)
    a = rng.uniform(0, 2 * math.pi)
    t = (_XC * math.cos(a) + _YC * math.sin(a) + 0.5)[..., None]
    canvas = Image.fromarray(np.clip(c0 + (c1 - c0) * t + 0.5, 0, 255).astype(np.uint8))
    if back > 0:  # a low-contrast texture family over the gradient
        tex = Image.fromarray(_texture_mask(rng, SCENE_BACKGROUNDS[back]).astype(np.uint8) * 255)
        for _ in range(200):
            c2 = np.clip(c0 + rng.normal(0, 60, 3), 0, 255)
            if 25 <= abs(_luma(c2) - _luma(c0)) < 70 and abs(_luma(c2) - _luma(colour)) >= 40:
                break
        _paint(canvas, tex, c2)
    draw = ImageDraw.Draw(canvas, "RGBA")
    for _ in range(int(rng.integers(0, 4))):  # faint clutter lines
        xy = [tuple(rng.uniform(0, _CANVAS, 2)), tuple(rng.uniform(0, _CANVAS, 2))]
        draw.line(xy, fill=(*_rgb(rng.uniform(0, 255, 3)), int(rng.uniform(0.2, 0.45) * 255)), width=1)

    r = float(rng.uniform(10, 22))
    cx, cy = _place(rng, r)
    mask = _shape_mask(SCENE_SHAPES[shape], cx, cy, r, rng.uniform(-SCENE_TILT, SCENE_TILT))
    if SCENE_FILLS[fill] == "outline":
        mask = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(7)))
    elif SCENE_FILLS[fill] == "striped":  # dark stripes of the same hue inside the shape
        _paint(canvas, mask, colour * 0.4)
        p, ang = rng.uniform(6, 10), rng.uniform(0, math.pi)
        stripes = np.sin(2 * math.pi * (_XX * math.cos(ang) + _YY * math.sin(ang)) / p) > 0
        mask = ImageChops.multiply(mask, Image.fromarray(stripes.astype(np.uint8) * 255))
    _paint(canvas, mask, colour)

    placed = [(cx, cy, r)]
    for _ in range(int(rng.integers(0, MAX_DISTRACTORS + 1))):
        for _ in range(50):
            q = float(rng.uniform(3.5, 6))
            x, y = _place(rng, q)
            if all((x - px) ** 2 + (y - py) ** 2 >= (q + pr + 3) ** 2 for px, py, pr in placed):
                placed.append((x, y, q))
                kind = _SMALL[int(rng.integers(len(_SMALL)))]
                _paint(canvas, _shape_mask(kind, x, y, q, rng.uniform(0, 2 * math.pi)), rng.uniform(0, 255, 3))
                break
    return _finish(canvas, rng), (shape, fill, hue, back)


def _render_scenes(rng: np.random.Generator, shapes: np.ndarray) -> SplitArrays:
    """Render one scene per entry of ``shapes`` (the primary labels) from ``rng``; factors sampled inside."""
    if len(shapes) == 0:
        return SplitArrays(_empty(), np.zeros(0, np.int64), np.zeros((0, len(SOURCE_FACTORS)), np.int64))
    images, factors = zip(*(_render_scene(rng, int(s)) for s in shapes))
    return SplitArrays(np.stack(images), np.asarray(shapes, dtype=np.int64), np.asarray(factors, dtype=np.int64))


def source_stream(seed: int, chunk: int, n: int) -> SplitArrays:
    """Chunk ``chunk`` (0, 1, 2, ...) of an endless stream of fresh source training scenes, ``n`` per chunk.

    Pretraining draws a new chunk per epoch instead of repeating a fixed train split. Each chunk has its own
    random stream (independent of the validation and test streams of :func:`generate_task`); shapes are balanced
    within a chunk when ``n`` is a multiple of the number of shapes.
    """
    rng = _rng(seed, SOURCE_TASK, f"stream-{chunk}")
    k = len(SCENE_SHAPES)
    shapes = rng.permutation(np.tile(np.arange(k, dtype=np.int64), -(-n // k)))[:n]
    return _render_scenes(rng, shapes)


# --------------------------------------------------------------------------------------------------------------
# digits: the real scikit-learn 8x8 handwritten digits, recoloured and placed on our backgrounds
# --------------------------------------------------------------------------------------------------------------


def _render_digit(rng: np.random.Generator, glyph: np.ndarray) -> np.ndarray:
    """Upscale one 8x8 digit (values 0..16) to 20-28 px, tilt it by up to 10 degrees, colour it, place it near the
    centre (+-3 px). Less nuisance than the synthetic tasks: with 50 real digits per class and heavier scale /
    position jitter every method, full fine-tuning included, stayed near chance (measured)."""
    canvas, bg = _background(rng)
    size = int(rng.integers(40, 57))
    g = Image.fromarray((glyph * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    g = g.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR, expand=True)
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    half = g.size[0] / 2
    cx, cy = (_CANVAS / 2 + rng.uniform(-6, 6, 2)).tolist()
    mask.paste(g, (int(round(cx - half)), int(round(cy - half))))
    _paint(canvas, mask, _contrasting_colour(rng, bg))
    return _finish(canvas, rng)


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 images [8, 8] in 0..16, labels), read straight from its CSV.

    Same arrays as ``sklearn.datasets.load_digits()`` without importing scikit-learn (and SciPy): ~0.1 s, not ~10 s.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'digits' task needs scikit-learn installed (it ships the data; nothing is downloaded)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def digits_partition(seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, np.ndarray]:
    """Indices into scikit-learn's 1,797 digits for each split: per class, a seeded permutation of that class's
    images is cut into ``n_train`` / ``n_val`` / ``n_test`` (images per class), so the splits are disjoint.

    Validation and test come from the end of each permutation, so changing ``n_train`` never changes them.
    """
    _, targets = _load_digits()
    part_rng = _rng(seed, "digits", "partition")
    chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in range(10):
        idx = part_rng.permutation(np.flatnonzero(targets == label))
        need = n_train + n_val + n_test
        if need > len(idx):
            raise ValueError(f"digits has only {len(idx)} images of class {label}; asked for {need} per class")
        chosen["train"] += idx[:n_train].tolist()
        chosen["validation"] += idx[len(idx) - n_val - n_test: len(idx) - n_test].tolist()
        chosen["test"] += idx[len(idx) - n_test:].tolist()
    return {split: np.asarray(v, dtype=np.int64) for split, v in chosen.items()}


def _generate_digits(seed: int, sizes: dict[str, int]) -> dict[str, SplitArrays]:
    images, targets = _load_digits()
    parts = digits_partition(seed, sizes["train"], sizes["validation"], sizes["test"])
    out = {}
    for split in SPLITS:
        rng = _rng(seed, "digits", split)
        idx = parts[split][rng.permutation(len(parts[split]))]
        rendered = np.stack([_render_digit(rng, images[i]) for i in idx]) if len(idx) else _empty()
        out[split] = SplitArrays(rendered, targets[idx].astype(np.int64))
    return out


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("scenes", "source",
                 "SOURCE: one object per scene, 4 labelled factors: 12 shapes x 3 fills x 6 hues x 7 backgrounds "
                 "(gradient or one of 6 texture families); any scale and position, +-45 deg tilt, 0-3 distractors",
                 SCENE_SHAPES, 1000, 50, 100),
        TaskSpec("digits", "natural", "scikit-learn's real 8x8 handwritten digits, upscaled, tilted, recoloured",
                 tuple(str(d) for d in range(10)), 100, 30, 40),  # at most 174 real images per class
        TaskSpec("texture", "natural",
                 "which of 8 two-colour texture families (DTD-like), fine period (3-6 px), any orientation",
                 TEXTURES, 125, 40, 125),
        TaskSpec("counting", "structured", "how many small objects, 1 to 6 (CLEVR-count-like)",
                 tuple(f"count_{n}" for n in range(1, MAX_COUNT + 1)), 167, 50, 167),
        TaskSpec("orientation", "structured", "angle of one elongated bar, 16 bins over 180 degrees (dSprites-like)",
                 tuple(f"deg_{round(k * 180 / N_ANGLES):03d}" for k in range(N_ANGLES)), 63, 20, 63),
        TaskSpec("position", "structured", "which cell of a 3x3 grid holds the one shape (dSprites-like)",
                 tuple(f"r{r}_c{c}" for r in range(GRID) for c in range(GRID)), 111, 33, 111),
        TaskSpec("relation", "structured", "where the cross is relative to the ring: above, below, left or right",
                 RELATIONS, 250, 75, 250),
    )
}
SOURCE_TASK = "scenes"
TARGET_TASKS: tuple[str, ...] = tuple(name for name, spec in TASKS.items() if spec.group != "source")

_RENDERERS: dict[str, Renderer] = {
    "texture": _render_texture,
    "counting": _render_counting,
    "orientation": _render_orientation,
    "position": _render_position,
    "relation": _render_relation,
}

for _spec in TASKS.values():  # imagefolder numbers classes by sorted directory name: keep ours identical
    assert list(_spec.classes) == sorted(_spec.classes), _spec.name


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    """An independent random stream per (seed, task, split); crc32 keeps it stable across Python runs."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())]))


def _empty() -> np.ndarray:
    return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def _spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def _resolve_sizes(spec: TaskSpec, n_train: int | None, n_val: int | None, n_test: int | None) -> dict[str, int]:
    sizes = {
        "train": spec.n_train if n_train is None else n_train,
        "validation": spec.n_val if n_val is None else n_val,
        "test": spec.n_test if n_test is None else n_test,
    }
    if any(n < 0 for n in sizes.values()):
        raise ValueError(f"per-class split sizes must be >= 0, got {sizes}")
    return sizes


def generate_task(
    name: str, seed: int = 0, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None
) -> dict[str, SplitArrays]:
    """Render every split of task ``name`` in memory (no disk I/O).

    ``n_train`` / ``n_val`` / ``n_test`` are images *per class* (defaults from ``TASKS[name]``). Classes are
    interleaved then shuffled; the same arguments always give the same arrays.
    """
    spec = _spec(name)
    sizes = _resolve_sizes(spec, n_train, n_val, n_test)
    if name == "digits":
        return _generate_digits(seed, sizes)
    if name == SOURCE_TASK:
        out = {}
        for split in SPLITS:
            rng = _rng(seed, name, split)
            out[split] = _render_scenes(rng, rng.permutation(np.tile(np.arange(spec.num_classes), sizes[split])))
        return out
    render = _RENDERERS[name]
    out = {}
    for split in SPLITS:
        rng = _rng(seed, name, split)
        labels = rng.permutation(np.tile(np.arange(spec.num_classes, dtype=np.int64), sizes[split]))
        images = np.stack([render(rng, int(y)) for y in labels]) if len(labels) else _empty()
        out[split] = SplitArrays(images, labels)
    return out


def make_task(
    name: str,
    root: str | os.PathLike[str],
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write task ``name`` as an imagefolder under ``<root>/<name>`` and return that directory.

    Reuses an existing directory generated with the same arguments (recorded in a hidden ``.task.json``), so
    calling this twice is cheap. A directory generated with other arguments is replaced; a directory we did not
    create is never touched unless ``overwrite=True``. Files are written to a temporary sibling and renamed, so
    an interrupted run leaves no half-written task behind.
    """
    spec = _spec(name)
    sizes = _resolve_sizes(spec, n_train, n_val, n_test)
    meta = {"task": name, "seed": seed, "per_class": sizes, "classes": list(spec.classes),
            "generator_version": GENERATOR_VERSION, "image_size": IMAGE_SIZE}
    root = Path(root)
    target = root / name
    meta_path = target / _META_FILE
    if target.exists():
        existing = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if existing == meta and not overwrite:
            return target
        if existing is None and not overwrite:
            raise FileExistsError(f"{target} exists and was not made by make_task; pass overwrite=True to replace it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the final task directory should not be
    try:
        for split, arrays in generate_task(name, seed, sizes["train"], sizes["validation"], sizes["test"]).items():
            for cls in spec.classes:
                (tmp / split / cls).mkdir(parents=True)
            for i, (img, y) in enumerate(zip(arrays.images, arrays.labels)):
                Image.fromarray(img).save(tmp / split / spec.classes[y] / f"{i:05d}.png", optimize=False)
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_task(name: str, root: str | os.PathLike[str], cache_dir: str | None = None) -> DatasetDict:
    """Load ``<root>/<name>`` (written by :func:`make_task`) with ``datasets``' imagefolder builder.

    Works offline: imagefolder is packaged inside ``datasets``; set ``HF_HUB_OFFLINE=1`` to be sure nothing is
    looked up. Columns: ``image`` (PIL) and ``label`` (ClassLabel with our class names).
    """
    from datasets import load_dataset

    data_dir = Path(root) / name
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} not found; create it first with make_task({name!r}, {str(root)!r})")
    return load_dataset("imagefolder", data_dir=str(data_dir), cache_dir=cache_dir)
