"""The default synthetic scenes: a pixel's class is the texture around it.

Four foreground classes are textures (stripes, checks, dots, grain) on irregular blobs,
over a cluttered background of flat overlapping patches (edges and corners, no repeating
structure). Everything else is nuisance drawn independently of the class: the two colours
of a texture and their contrast, its orientation and scale, the blob's outline and size,
a global gain, offset and sensor noise. So the class of a pixel is decidable from a small
window around it, as a material or a part is in a photograph: a box cut out of one image
and pasted into another keeps its pixels' labels (CutMix is label-preserving), and colour
jitter, grayscale, contrast and solarize leave the class intact. What makes the task need
labels is the nuisance: a network must see many colours, orientations, scales and contrasts
of each texture before it stops confusing them with each other and with the clutter.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

CLASS_NAMES = ["background", "stripes", "checks", "dots", "grain"]
# In output pixels: the texture's repeat (stripes, checks, dots) or grain size.
PERIOD = (4.5, 7.5)
# How far a texture's second colour strays from its first (RGB, L2 norm).
CONTRAST = (0.45, 0.85)
DOT_RADIUS = 0.35  # of the period
TINT = 0.5  # colour spread of a texture's second colour around a brightness change
BLOB_RADIUS = (4.5, 9.0)  # output pixels
OBJECTS = (1, 3)  # per image, inclusive
BACKGROUND_PATCHES = (4, 10)

# (class_id, rng, yy, xx, render pixels per output pixel) -> a [0, 1] pattern over the canvas.
Pattern = Callable[[int, np.random.Generator, np.ndarray, np.ndarray, float], np.ndarray]


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 float in [0, 1], label HxW uint8) at `size`; the caller renders at 2x."""
    return compose(rng, size, len(CLASS_NAMES), _pattern)


def compose(rng: np.random.Generator, size: int, num_classes: int, pattern: Pattern,
            objects: tuple[int, int] = OBJECTS, radius: tuple[float, float] = BLOB_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """A scene of this family: the cluttered background, `objects` (inclusive range) blobs of
    random classes, each filled with `pattern(class_id, rng, yy, xx, px)` in two colours, then
    the camera. The glyphs family and the pre-training source task share it."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    px = size / 32.0  # render pixels per pixel of a 32 px output: sizes below are in output pixels
    image = background(rng, yy, xx, size, px)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(objects[0], objects[1] + 1)):  # later objects occlude earlier ones
        class_id = int(rng.integers(1, num_classes))
        inside = blob(rng, yy, xx, size, rng.uniform(*radius) * px)
        image[inside] = paint(rng, pattern(class_id, rng, yy, xx, px))[inside]
        label[inside] = class_id
    return camera(rng, image), label


def paint(rng: np.random.Generator, pattern: np.ndarray) -> np.ndarray:
    """Colour a [0, 1] pattern with two colours: any first colour, and a second that is mostly
    a change of brightness (either sign), tinted, as the marks of a material are."""
    first = rng.uniform(0, 1, size=3)
    direction = np.sign(rng.uniform(-1, 1)) + rng.normal(0, TINT, size=3)
    second = np.clip(first + rng.uniform(*CONTRAST) * direction / np.linalg.norm(direction), 0, 1)
    return first * (1 - pattern[..., None]) + second * pattern[..., None]


def camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """A global gain and offset, then sensor noise."""
    image = image * rng.uniform(0.75, 1.2) + rng.uniform(-0.1, 0.1)
    image = image + rng.normal(0, 0.03, size=image.shape)
    return np.clip(image, 0, 1)


def oriented_grid(rng: np.random.Generator, yy, xx, px: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Canvas coordinates (u, v) in periods, at a random period, orientation and phase; and
    the period in render pixels."""
    period = rng.uniform(*PERIOD) * px
    angle = rng.uniform(0, math.pi)
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 1)
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period + rng.uniform(0, 1)
    return u, v, period


def _pattern(class_id: int, rng: np.random.Generator, yy, xx, px: float) -> np.ndarray:
    """A [0, 1] texture over the whole canvas at a random period, orientation and phase."""
    u, v, period = oriented_grid(rng, yy, xx, px)
    if class_id == 1:  # stripes: bars along one direction
        return (u % 1.0 < 0.5).astype(np.float32)
    if class_id == 2:  # checks: alternating squares along two directions
        return ((np.floor(2 * u) + np.floor(2 * v)) % 2).astype(np.float32)
    if class_id == 3:  # dots: disks on a square lattice, a plain field between them
        du, dv = u - np.round(u), v - np.round(v)
        return (du * du + dv * dv <= DOT_RADIUS**2).astype(np.float32)
    # grain: random values on cells half a period wide, irregular where the others repeat
    cell = max(period / 2, 1.0)
    cells = rng.uniform(0, 1, size=(int(yy.shape[0] / cell) + 2, int(yy.shape[1] / cell) + 2))
    return cells[(yy / cell).astype(int), (xx / cell).astype(int)].astype(np.float32)


def blob(rng: np.random.Generator, yy, xx, size: int, radius: float) -> np.ndarray:
    """An irregular star-convex region: a circle whose radius wobbles with the angle."""
    cy, cx = rng.uniform(0.1, 0.9, size=2) * size
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    wobble = sum(rng.uniform(0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4))
    stretch = rng.uniform(0.7, 1.0)
    return np.hypot(dx, dy * stretch) <= radius * (1 + wobble)


def background(rng: np.random.Generator, yy, xx, size: int, px: float) -> np.ndarray:
    """Clutter: a shaded field under overlapping flat discs and rectangles of random colours."""
    gradient = rng.uniform(-0.15, 0.15, size=(2, 3))
    image = rng.uniform(0, 1, size=3) + (yy[..., None] * gradient[0] + xx[..., None] * gradient[1]) / size
    for _ in range(rng.integers(BACKGROUND_PATCHES[0], BACKGROUND_PATCHES[1] + 1)):
        cy, cx = rng.uniform(0, size, size=2)
        half = rng.uniform(2, 9, size=2) * px
        if rng.random() < 0.5:
            inside = ((yy - cy) / half[0]) ** 2 + ((xx - cx) / half[1]) ** 2 <= 1
        else:
            inside = (np.abs(yy - cy) <= half[0]) & (np.abs(xx - cx) <= half[1])
        image[inside] = rng.uniform(0, 1, size=3)
    return image.astype(np.float32)
