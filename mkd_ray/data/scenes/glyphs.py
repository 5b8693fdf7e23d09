"""A second benchmark family: a pixel's class is the shape of the marks around it.

Each foreground class is a region strewn with small marks of one shape (rings, crosses,
triangles, bars), every mark turned its own way and placed on a jittered lattice that all
classes share, over the textures benchmark's cluttered background. The classes do not
differ in arrangement, spacing or amount of ink, only in the shape of a mark a few pixels
wide: where the textures benchmark asks what repeats in a window, this one asks what a
part looks like, as a wheel or an eye does in a photograph. A pasted box keeps whole marks,
and so its pixels' labels; colour, contrast, mark size, spacing and rotation are nuisance.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from mkd_ray.data.scenes.textures import compose

CLASS_NAMES = ["background", "rings", "crosses", "triangles", "bars"]
MARK_SIZE = (5.0, 7.0)  # output pixels across a mark
SPACING = (1.15, 1.45)  # lattice step, in mark sizes


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 float in [0, 1], label HxW uint8) at `size`; the caller renders at 2x."""
    return compose(rng, size, len(CLASS_NAMES), _marks)


def _marks(class_id: int, rng: np.random.Generator, yy, xx, px: float) -> np.ndarray:
    """1 on the marks of `class_id` over the whole canvas, 0 between them."""
    return strew(lambda u, v: _shape(class_id, u, v), rng, yy, xx, px)


def strew(shape: Callable[[np.ndarray, np.ndarray], np.ndarray], rng: np.random.Generator, yy, xx, px: float) -> np.ndarray:
    """1 where `shape(u, v)` (mark coordinates, in mark sizes from its centre) holds, over the
    whole canvas: one mark per cell of a lattice at a random orientation, each shifted within
    its cell and turned at random."""
    mark = rng.uniform(*MARK_SIZE) * px
    step = mark * rng.uniform(*SPACING)
    angle = rng.uniform(0, math.pi)
    a = (xx * math.cos(angle) + yy * math.sin(angle)) / step + rng.uniform(0, 1)
    b = (-xx * math.sin(angle) + yy * math.cos(angle)) / step + rng.uniform(0, 1)
    i, j = np.floor(a).astype(int), np.floor(b).astype(int)
    i, j = i - i.min(), j - j.min()
    cells = (i.max() + 1, j.max() + 1)
    slack = (step - mark) / (2 * step)  # how far a mark may move and stay inside its cell
    shift_a, shift_b = rng.uniform(-slack, slack, size=(2, *cells))
    turn = rng.uniform(0, 2 * math.pi, size=cells)[i, j]
    # Mark coordinates: the offset from the mark's centre, in mark sizes, turned by its angle.
    da = (a - np.floor(a) - 0.5 - shift_a[i, j]) * step / mark
    db = (b - np.floor(b) - 0.5 - shift_b[i, j]) * step / mark
    u = da * np.cos(turn) + db * np.sin(turn)
    v = -da * np.sin(turn) + db * np.cos(turn)
    return shape(u, v).astype(np.float32)


def _shape(class_id: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether (u, v), in mark sizes from the centre, lies on the mark. Every shape inks 44-47%
    of its unit square, so no class is told by the amount of ink."""
    box = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    if class_id == 1:  # ring
        r = np.hypot(u, v)
        return (r >= 0.33) & (r <= 0.5)
    if class_id == 2:  # cross
        return box & ((np.abs(u) <= 0.13) | (np.abs(v) <= 0.13))
    if class_id == 3:  # solid triangle, apex along +v
        return (v >= -0.42) & (v <= 0.45) & (np.abs(u) <= 0.62 * (0.45 - v))
    return box & (np.abs(np.abs(v) - 0.27) <= 0.11)  # bars: two parallel strokes
