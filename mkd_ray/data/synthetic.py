"""The embedded synthetic benchmark on disk: `run.py data synth` writes it, training generates
it on first use. Scenes come from `mkd_ray.data.scenes` (`data.synth.kind`: "textures", the
default, where a pixel's class is its local texture; "shapes", where it is an object's
outline). Written in VOC layout: JPEGImages/, SegmentationClass/ (palette PNG), ImageSets/,
plus UniMatch split lists under splits/ and "all" (every training image labeled).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from mkd_ray.config import SynthConfig
from mkd_ray.data import scenes
from mkd_ray.data.io import SampleRef, save_mask, voc_palette, write_split_file
from mkd_ray.data.splits import write_splits

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
        image, mask = scenes.render(cfg.kind, np.random.default_rng([cfg.seed, index]), cfg.image_size)
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
        "classes": scenes.class_names(cfg.kind),
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "synthetic.json").write_text(json.dumps(info, indent=2))
    return info


def preview(path: Path, cfg: SynthConfig, columns: int = 8, rows: int = 2, zoom: int = 4) -> None:
    """A PNG grid of the first training scenes of `cfg`: each image above its mask (VOC
    palette; the ignore band white), enlarged `zoom` times without smoothing."""
    size, tiles = cfg.image_size, []
    for index in range(columns * rows):
        image, mask = scenes.render(cfg.kind, np.random.default_rng([cfg.seed, index]), size)
        colours = np.array(voc_palette(), dtype=np.uint8).reshape(-1, 3)[mask]
        colours[mask == 255] = 255
        tiles.append(np.concatenate([image, colours], axis=0))
    gap = np.full((2 * size, 2, 3), 255, dtype=np.uint8)
    lines = [np.concatenate([t for tile in tiles[r * columns:(r + 1) * columns] for t in (tile, gap)], axis=1)
             for r in range(rows)]
    grid = np.concatenate(lines, axis=0).repeat(zoom, axis=0).repeat(zoom, axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


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
