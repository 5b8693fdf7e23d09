"""Which samples an experiment trains and validates on, resolved from the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mkd_ray.config import ExperimentConfig
from mkd_ray.data import synthetic
from mkd_ray.data.io import DatasetError, SampleRef, load_mask, read_split_file


@dataclass
class ExperimentData:
    labeled: list[SampleRef]
    unlabeled: list[SampleRef]
    val: list[SampleRef]


def ensure_synthetic(cfg: ExperimentConfig, log=print) -> None:
    """Generate the synthetic dataset on first use (or when its generator settings changed)."""
    if cfg.data.dataset != "synthetic":
        return
    root = Path(cfg.data.root)
    if synthetic.is_generated(root, cfg.data.synth):
        return
    if root.exists() and any(root.iterdir()) and not (root / "synthetic.json").is_file():
        raise DatasetError(f"data.root {root} exists and is not a synthetic dataset; refusing to write into it")
    log(f"generating the synthetic dataset in {root} ...")
    info = synthetic.generate(root, cfg.data.synth)
    log(f"  {cfg.data.synth.num_train} train + {cfg.data.synth.num_val} val images in {info['seconds']} s")


def resolve_data(cfg: ExperimentConfig) -> ExperimentData:
    """Read and check the split lists; every listed file must exist."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DatasetError(f"data.root {root} does not exist")
    split = cfg.split_dir
    if not (split / "labeled.txt").is_file():
        raise DatasetError(
            f"data.split {cfg.data.split!r}: no labeled.txt in {split} "
            f"(give a split name under {cfg.splits_dir} or a folder holding labeled.txt and unlabeled.txt)"
        )
    labeled = read_split_file(split / "labeled.txt", root)
    unlabeled = read_split_file(split / "unlabeled.txt", root, need_masks=False) if (split / "unlabeled.txt").is_file() else []
    if not unlabeled and cfg.method.name != "supervised":
        raise DatasetError(f"{split / 'unlabeled.txt'} is missing or empty; method {cfg.method.name!r} needs unlabeled images")
    val = read_split_file(cfg.splits_dir / "val.txt", root)
    return ExperimentData(labeled, unlabeled, val)


def check_masks(cfg: ExperimentConfig, data: ExperimentData) -> None:
    """Read every labeled and validation mask once, so a bad class id stops the run before
    any training starts (unlabeled masks are only diagnostics and are checked as they stream)."""
    for ref in [*data.labeled, *data.val]:
        load_mask(ref.mask, cfg.data.num_classes, cfg.data.ignore_index)
