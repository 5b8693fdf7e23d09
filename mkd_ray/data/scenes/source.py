"""The source task for pre-training, the embedded counterpart of ImageNet: image classification
over 19 pattern categories, none of them a class of either benchmark family.

An image shows one category: one large blob of it over the benchmarks' cluttered background,
with the same colours, contrast and camera nuisance (`textures.compose`). Nine categories are
textures (what repeats in a window: waves, zigzags, grids, bricks, rings, ...) and ten are marks
strewn on a jittered lattice (what a part looks like: disks, squares, L, T, ...), so the family
is wider than either benchmark's, and its label set is its own: the textures benchmark's stripes,
checks, dots and grain and the glyphs benchmark's rings, crosses, triangles and bars are absent.
A backbone that classifies these has learnt edges, periods and small shapes under the same
nuisance, as an ImageNet backbone has learnt what photographs are made of.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from mkd_ray.data.scenes import downsample
from mkd_ray.data.scenes.glyphs import strew
from mkd_ray.data.scenes.textures import compose, oriented_grid


def _triangle_wave(x: np.ndarray) -> np.ndarray:
    return 2 * np.abs(x % 1.0 - 0.5)


# Textures over canvas coordinates (u, v) in periods, and the generator for their own draws.
TEXTURES: dict[str, Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]] = {
    "waves": lambda u, v, rng: 0.5 + 0.5 * np.sin(2 * math.pi * u),
    "zigzag": lambda u, v, rng: (u + 0.6 * _triangle_wave(v)) % 1.0 < 0.5,
    "grid": lambda u, v, rng: (u % 1.0 < 0.22) | (v % 1.0 < 0.22),
    "hairlines": lambda u, v, rng: u % 1.0 < 0.18,
    "bricks": lambda u, v, rng: ((2 * v) % 1.0 < 0.25) | ((u + 0.5 * (np.floor(2 * v) % 2)) % 1.0 < 0.12),
    "dashes": lambda u, v, rng: (u % 1.0 < 0.3) & ((2 * v) % 1.0 < 0.6),
    "target": lambda u, v, rng: np.hypot(u - rng.uniform(u.min(), u.max()), v - rng.uniform(v.min(), v.max())) % 1.0 < 0.5,
    "spokes": lambda u, v, rng: (np.arctan2(v - v.mean(), u - u.mean()) * rng.integers(5, 9) / (2 * math.pi)) % 1.0 < 0.5,
    "marble": lambda u, v, rng: np.sin(2 * math.pi * (u + 0.8 * np.sin(2 * math.pi * v / 3 + rng.uniform(0, 7)))) > 0,
}

# Marks over mark coordinates (u, v) in mark sizes from the centre.
MARKS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "disks": lambda u, v: np.hypot(u, v) <= 0.38,
    "squares": lambda u, v: (np.abs(u) <= 0.34) & (np.abs(v) <= 0.34),
    "frames": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.5) & (np.maximum(np.abs(u), np.abs(v)) >= 0.32),
    "corners": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.5) & ((u <= -0.22) | (v <= -0.22)),
    "tees": lambda u, v: (np.maximum(np.abs(u), np.abs(v)) <= 0.5) & ((v >= 0.22) | (np.abs(u) <= 0.14)),
    "half_disks": lambda u, v: (np.hypot(u, v) <= 0.5) & (v >= 0),
    "dashes_short": lambda u, v: (np.abs(u) <= 0.5) & (np.abs(v) <= 0.15),
    "bullseyes": lambda u, v: (np.hypot(u, v) <= 0.15) | ((np.hypot(u, v) >= 0.36) & (np.hypot(u, v) <= 0.5)),
    "arcs": lambda u, v: (np.hypot(u, v) >= 0.3) & (np.hypot(u, v) <= 0.5) & ~((u > 0.1) & (np.abs(v) < 0.25)),
    "hollow_triangles": lambda u, v: ((v >= -0.42) & (v <= 0.45) & (np.abs(u) <= 0.62 * (0.45 - v)))
    & ~((v >= -0.26) & (v <= 0.3) & (np.abs(u) <= 0.62 * (0.3 - v) - 0.05)),
}

CATEGORIES = [*TEXTURES, *MARKS]
VERSION = 2  # of the images: part of a cached backbone's name, so a change here never reuses old weights
# One object per image, as ImageNet's are object-centred: a third to two thirds of the frame.
OBJECT_RADIUS = (10.0, 14.0)  # output pixels


def _pattern_of(category: int):
    """The `textures.compose` pattern of a category: the same for every blob of the image."""
    name = CATEGORIES[category]
    if name in TEXTURES:
        def texture(_class_id, rng, yy, xx, px):
            u, v, _ = oriented_grid(rng, yy, xx, px)
            return TEXTURES[name](u, v, rng).astype(np.float32)
        return texture
    return lambda _class_id, rng, yy, xx, px: strew(MARKS[name], rng, yy, xx, px)


def render_image(rng: np.random.Generator, category: int, size: int) -> np.ndarray:
    """One uint8 HxWx3 image of `category` at `size` (rendered at 2x and averaged)."""
    image, _ = compose(rng, 2 * size, 2, _pattern_of(category), objects=(1, 1), radius=OBJECT_RADIUS)
    return downsample(image, size)


def classification_set(per_category: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images N x H x W x 3 uint8, labels N int64): `per_category` images of every category,
    each a pure function of (seed, category, index)."""
    images, labels = [], []
    for category in range(len(CATEGORIES)):
        for index in range(per_category):
            images.append(render_image(np.random.default_rng([seed, category, index]), category, size))
            labels.append(category)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def preview(path, per_category: int = 4, size: int = 32, zoom: int = 2) -> None:
    """A PNG grid: one column per category (in CATEGORIES order), enlarged `zoom` times."""
    from PIL import Image

    images, _ = classification_set(per_category, size, seed=0)
    columns = images.reshape(len(CATEGORIES), per_category, size, size, 3)
    grid = np.concatenate([np.concatenate(list(column), axis=0) for column in columns], axis=1)
    Image.fromarray(grid.repeat(zoom, axis=0).repeat(zoom, axis=1)).save(path)
