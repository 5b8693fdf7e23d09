"""The shapes variant (`data.synth.kind: shapes`): a pixel's class is the outline of the shape it
lies in, nothing else.

Four foreground classes (disk, square, triangle, cross) are drawn on textured, cluttered
backgrounds. Colour, texture, scale, rotation and aspect are drawn independently of the
class, and the background holds distractors (rings, bars, dots, stray strokes) painted
with the same textures, so the only cue that separates the classes is shape. The paper's
photometric augmentations keep labels here, but CutMix does not: a box edge cuts most
objects and its straight edges look like the outlines that define square and cross
(docs/synthetic.md has the measurements). Kept as the negative case.
"""

from __future__ import annotations

import math

import numpy as np

CLASS_NAMES = ["background", "disk", "square", "triangle", "cross"]
# How far a texture's second colour may stray from its first (RGB units): the background's
# patterns stay milder than the objects' outlines, objects stay distinct from what is under them.
BACKGROUND_CONTRAST = 0.3
OBJECT_CONTRAST = 0.25
MIN_OBJECT_DISTANCE = 0.45
# Each class prefers one texture pattern (stripes, checks, blotches, flat) with this
# probability, a hint that colour jitter, grayscale and solarize keep; any pattern also
# appears on the background and on the other classes, so shape stays the deciding cue.
PATTERN_HINT = 0.6
# Objects stand roughly upright (tilt in radians either way), as most objects in photos do.
MAX_TILT = math.radians(25)
CLASS_PATTERNS = {1: 1, 2: 2, 3: 3, 4: 0}
_SQRT3 = math.sqrt(3.0)


# ----------------------------------------------------------------------------- geometry


def _frame(yy, xx, cy, cx, radius, angle, aspect):
    """Image coordinates -> a shape's local frame (unit radius, rotated, stretched)."""
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    c, s = math.cos(angle), math.sin(angle)
    u = c * dx + s * dy
    v = (-s * dx + c * dy) / aspect
    return u, v


def _outline(kind: str, u, v):
    if kind == "disk":
        return u * u + v * v <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if kind == "triangle":  # equilateral, inscribed in the unit circle, scaled to comparable area
        u, v = u * 0.8, v * 0.8 - 0.1
        return (v >= -0.5) & (_SQRT3 * u + v <= 1.0) & (-_SQRT3 * u + v <= 1.0)
    if kind == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 1.0))
    if kind == "ring":  # distractor: a disk's outline without its body
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.45)
    if kind == "bar":
        return (np.abs(v) <= 0.12) & (np.abs(u) <= 1.0)
    raise ValueError(kind)


# ----------------------------------------------------------------------------- appearance


def _texture(rng: np.random.Generator, u, v, kind: int | None = None):
    """A [0, 1] pattern in the given frame: flat, stripes, checks, blotches or a gradient."""
    kind = rng.integers(5) if kind is None else kind
    if kind == 0:
        return np.zeros_like(u)
    if kind == 1:
        theta, freq, phase = rng.uniform(0, math.pi), rng.uniform(1.5, 4.0), rng.uniform(0, 2 * math.pi)
        return 0.5 + 0.5 * np.sin(2 * math.pi * freq * (u * math.cos(theta) + v * math.sin(theta)) / 2 + phase)
    if kind == 2:
        freq = rng.uniform(1.0, 3.0)
        return ((np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)
    if kind == 3:
        waves = sum(
            np.sin(rng.uniform(1, 4) * (u * math.cos(a) + v * math.sin(a)) + rng.uniform(0, 6.3))
            for a in rng.uniform(0, math.pi, size=3)
        )
        return 0.5 + waves / 6
    theta = rng.uniform(0, 2 * math.pi)
    return np.clip(0.5 + 0.5 * (u * math.cos(theta) + v * math.sin(theta)) / 1.5, 0, 1)


def _paint(rng: np.random.Generator, u, v, base=None, contrast: float = 1.0, pattern: int | None = None):
    """(H, W, 3) colours: two colours blended by a texture. `contrast` scales how far the
    second colour may stray from the first; `base` fixes the first colour."""
    a = rng.uniform(0, 1, size=3) if base is None else base
    b = np.clip(a + contrast * rng.uniform(-1, 1, size=3), 0, 1)
    t = _texture(rng, u, v, pattern)[..., None]
    return a * (1 - t) + b * t


def _distinct_colour(rng: np.random.Generator, avoid: np.ndarray, min_distance: float = 0.35) -> np.ndarray:
    """A random colour at least `min_distance` (RGB, L2) from `avoid`, so objects stay visible."""
    for _ in range(20):
        colour = rng.uniform(0, 1, size=3)
        if np.linalg.norm(colour - avoid) >= min_distance:
            return colour
    return 1.0 - avoid


# ----------------------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 float in [0, 1], label HxW uint8) at `hi`; the caller renders at 2x."""
    yy, xx = np.mgrid[0:hi, 0:hi].astype(np.float32) + 0.5
    scale = hi / 4.0
    image = _paint(rng, (xx - hi / 2) / scale, (yy - hi / 2) / scale, contrast=BACKGROUND_CONTRAST)
    label = np.zeros((hi, hi), dtype=np.uint8)

    def place(kind: str, radius: float, class_id: int | None) -> None:
        cy, cx = rng.uniform(0.15, 0.85, size=2) * hi
        angle = rng.uniform(-MAX_TILT, MAX_TILT) if class_id else rng.uniform(0, 2 * math.pi)
        u, v = _frame(yy, xx, cy, cx, radius, angle, rng.uniform(0.8, 1.0))
        inside = _outline(kind, u, v)
        if not inside.any():
            return
        base = _distinct_colour(rng, image[inside].mean(axis=0), MIN_OBJECT_DISTANCE)
        pattern = None
        if class_id and rng.random() < PATTERN_HINT:
            pattern = CLASS_PATTERNS[class_id]
        image[inside] = _paint(rng, u, v, base, OBJECT_CONTRAST, pattern)[inside]
        if class_id is not None:
            label[inside] = class_id

    for _ in range(rng.integers(0, 3)):  # background clutter drawn first
        place(str(rng.choice(["ring", "bar"])), rng.uniform(0.12, 0.25) * hi, None)
    for _ in range(rng.integers(1, 3)):  # objects, later ones occluding earlier ones
        class_id = int(rng.integers(1, len(CLASS_NAMES)))
        place(CLASS_NAMES[class_id], rng.uniform(0.16, 0.28) * hi, class_id)
    if rng.random() < 0.2:  # an occluding bar in front of everything (background)
        place("bar", rng.uniform(0.3, 0.6) * hi, 0)

    # Global photometric nuisance: gain, offset and sensor noise.
    image = image * rng.uniform(0.7, 1.2) + rng.uniform(-0.1, 0.1)
    image = image + rng.normal(0, 0.03, size=image.shape)
    return np.clip(image, 0, 1), label
