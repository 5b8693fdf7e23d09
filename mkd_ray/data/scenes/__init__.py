"""Scene renderers of the embedded synthetic benchmark, one module per kind.

Each renders at twice the output size; `render` averages 2x2 blocks, and a pixel whose
block mixes labels becomes 255 (ignore), the synthetic counterpart of VOC's boundary band.
"""

from __future__ import annotations

import numpy as np

from mkd_ray.data.scenes import glyphs, shapes, textures

KINDS = {"textures": textures, "glyphs": glyphs, "shapes": shapes}


def class_names(kind: str) -> list[str]:
    return list(KINDS[kind].CLASS_NAMES)


def render(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8, mask HxW uint8) pair of `kind` at `size`."""
    image, label = KINDS[kind].render_scene(rng, 2 * size)
    blocks = label.reshape(size, 2, size, 2).transpose(0, 2, 1, 3).reshape(size, size, 4)
    mask = blocks[..., 0].copy()
    mask[(blocks != blocks[..., :1]).any(-1)] = 255
    return downsample(image, size), mask


def downsample(image: np.ndarray, size: int) -> np.ndarray:
    """A float [0, 1] image rendered at 2 * size -> uint8 at size, each pixel its 2x2 block's mean."""
    return (image.reshape(size, 2, size, 2, 3).mean(axis=(1, 3)) * 255 + 0.5).astype(np.uint8)
