"""Which samples an experiment trains and validates on, resolved from the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mkd_ray.config import ExperimentConfig
from mkd_ray import storage
from mkd_ray.data import packed, synthetic
from mkd_ray.data.io import DatasetError, SampleRef, read_image, read_mask, read_split_file


@dataclass
class ExperimentData:
    labeled: list[SampleRef]
    unlabeled: list[SampleRef]
    val: list[SampleRef]


def ensure_synthetic(cfg: ExperimentConfig, log=print) -> None:
    """Generate the synthetic dataset on first use (or when its generator settings changed)."""
    if cfg.data.dataset != "synthetic" or cfg.data.format != "folder":
        return
    root = Path(cfg.data.root)
    if synthetic.is_generated(root, cfg.data.synth):
        return
    if root.exists() and any(root.iterdir()) and not (root / "synthetic.json").is_file():
        raise DatasetError(f"data.root {root} exists and is not a synthetic dataset; refusing to write into it")
    log(f"generating the synthetic dataset in {root} ...")
    info = synthetic.generate(root, cfg.data.synth)
    log(f"  {cfg.data.synth.num_train} train + {cfg.data.synth.num_val} val images in {info['seconds']} s")


def splits_location(cfg: ExperimentConfig) -> str:
    """The folder (or URI) holding val.txt and the split folders."""
    return cfg.data.splits_dir or storage.join(cfg.data.root, "splits")


def resolve_data(cfg: ExperimentConfig) -> ExperimentData:
    """Read and check the split lists of a folder dataset or a Parquet pack; every sample
    they name must exist."""
    root = cfg.data.root
    if cfg.data.format == "parquet":
        packed.pack_index(root)  # fails first, and clearly, if root is not a pack
        exists = storage.exists

        def read(location: str, need_masks: bool = True) -> list[SampleRef]:
            return packed.read_split(location, root, need_masks)
    else:
        if not Path(root).is_dir():
            raise DatasetError(f"data.root {root} does not exist")

        def exists(location: str) -> bool:
            return Path(location).is_file()

        def read(location: str, need_masks: bool = True) -> list[SampleRef]:
            return read_split_file(Path(location), Path(root), need_masks)

    splits = splits_location(cfg)
    split = cfg.data.split
    if not exists(storage.join(split, "labeled.txt")):
        split = storage.join(splits, split)
    if not exists(storage.join(split, "labeled.txt")):
        raise DatasetError(
            f"data.split {cfg.data.split!r}: no labeled.txt in {split} "
            f"(give a split name under {splits} or a folder holding labeled.txt and unlabeled.txt)"
        )
    unlabeled_at = storage.join(split, "unlabeled.txt")
    unlabeled = read(unlabeled_at, need_masks=False) if exists(unlabeled_at) else []
    if not unlabeled and cfg.method.name != "supervised":
        raise DatasetError(f"{unlabeled_at} is missing or empty; method {cfg.method.name!r} needs unlabeled images")
    return ExperimentData(read(storage.join(split, "labeled.txt")), unlabeled, read(storage.join(splits, "val.txt")))


def checked_data(cfg: ExperimentConfig, log=print) -> ExperimentData:
    """The split lists with every labeled and validation sample decoded once, so a corrupt
    file or a bad class id stops the run before any training starts (data.bad_samples=error)
    or is left out with a warning naming it (skip). Unlabeled images are checked as they
    stream, where an unreadable one is skipped (see TrainSet)."""
    data = resolve_data(cfg)
    labeled, val = _readable(data.labeled, cfg, log), _readable(data.val, cfg, log)
    for kind, kept in (("labeled", labeled), ("validation", val)):
        if not kept:
            raise DatasetError(f"no readable {kind} samples left after skipping the bad ones")
    return ExperimentData(labeled, data.unlabeled, val)


def _readable(refs: list[SampleRef], cfg: ExperimentConfig, log) -> list[SampleRef]:
    kept = []
    for ref in refs:
        try:
            read_image(ref)
            read_mask(ref, cfg.data.num_classes, cfg.data.ignore_index)
        except DatasetError as exc:
            if cfg.data.bad_samples == "error":
                raise DatasetError(f"{exc} (set data.bad_samples=skip to train without it)") from None
            log(f"warning: skipping {exc}")
            continue
        kept.append(ref)
    return kept
