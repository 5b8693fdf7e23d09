"""The embedded synthetic benchmark: shapes whose class is their outline, nothing else.

Four foreground classes (disk, square, triangle, cross) are drawn on textured, cluttered
backgrounds. Colour, texture, scale, rotation and aspect are drawn independently of the
class, and the background holds distractors (rings, bars, dots, stray strokes) painted
with the same textures, so the only cue that separates the classes is shape. That keeps
the paper's strong augmentations (colour jitter, grayscale, blur, solarize, equalize)
label-preserving, and it makes the task need many examples to learn the invariances:
few labels over-fit to appearance, many labels generalise, which is the gap unlabeled
data can close (see ../shared/CALIBRATION.md for the trial runs that led here).

Scenes are rendered at twice the output size and averaged 2x2; a pixel whose 2x2 block
mixes labels becomes 255 (ignore), the synthetic counterpart of VOC's boundary band.
Written in VOC layout: JPEGImages/, SegmentationClass/ (palette PNG), ImageSets/, plus
UniMatch split lists under splits/.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from mkd_ray.config import SynthConfig
from mkd_ray.data.io import SampleRef, save_mask, write_split_file
from mkd_ray.data.splits import write_splits

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


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8, mask HxW uint8) pair at `size`, rendered at 2x and averaged."""
    hi = 2 * size
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
    return _downsample(np.clip(image, 0, 1), label)


def _downsample(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = image.shape[0] // 2
    img = image.reshape(h, 2, h, 2, 3).mean(axis=(1, 3))
    blocks = label.reshape(h, 2, h, 2).transpose(0, 2, 1, 3).reshape(h, h, 4)
    mask = blocks[..., 0].copy()
    mask[(blocks != blocks[..., :1]).any(-1)] = 255
    return (img * 255 + 0.5).astype(np.uint8), mask


# ----------------------------------------------------------------------------- on disk


def generate(out: Path, cfg: SynthConfig) -> dict:
    """Write the dataset in VOC layout with split lists; returns its description."""
    start = time.perf_counter()
    out = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sets = {"train": [], "val": []}
    for index in range(cfg.num_train + cfg.num_val):
        subset = "train" if index < cfg.num_train else "val"
        name = f"{subset}_{index:06d}"
        image, mask = render_scene(np.random.default_rng([cfg.seed, index]), cfg.image_size)
        ref = SampleRef(out / "JPEGImages" / f"{name}.jpg", out / "SegmentationClass" / f"{name}.png")
        Image.fromarray(image).save(ref.image, quality=95, subsampling=0)
        save_mask(mask, ref.mask)
        sets[subset].append(ref)
    for subset, refs in sets.items():
        (out / "ImageSets" / "Segmentation" / f"{subset}.txt").write_text("\n".join(r.name for r in refs) + "\n")
    write_split_file(out / "splits" / "val.txt", sets["val"], out)
    write_splits(sets["train"], list(cfg.splits), out / "splits", out, seed=cfg.seed)
    # "all": every training image labeled, the supervised upper bound.
    write_split_file(out / "splits" / "all" / "labeled.txt", sets["train"], out)
    write_split_file(out / "splits" / "all" / "unlabeled.txt", sets["train"], out)
    info = {
        "classes": CLASS_NAMES,
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "synthetic.json").write_text(json.dumps(info, indent=2))
    return info


def settings(cfg: SynthConfig) -> dict:
    """The generator settings as synthetic.json records them."""
    return json.loads(json.dumps(asdict(cfg)))


def recorded_settings(root: Path) -> Optional[dict]:
    """The settings `root`'s synthetic.json records; None when it has none (or no readable one)."""
    meta = Path(root) / "synthetic.json"
    if not meta.is_file():
        return None
    try:
        recorded = json.loads(meta.read_text()).get("config")
    except (json.JSONDecodeError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def is_generated(root: Path, cfg: SynthConfig) -> bool:
    """True when `root` holds a dataset generated with this exact SynthConfig."""
    return recorded_settings(root) == settings(cfg)
