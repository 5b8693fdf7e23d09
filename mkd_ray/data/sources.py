"""Which samples an experiment trains and validates on, resolved from the config."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from mkd_ray.config import ExperimentConfig, SynthConfig
from mkd_ray import storage
from mkd_ray.data import packed, synthetic
from mkd_ray.data.io import DatasetError, SampleRef, read_image, read_mask, read_split_file


@dataclass
class ExperimentData:
    labeled: list[SampleRef]
    unlabeled: list[SampleRef]
    val: list[SampleRef]


def ensure_synthetic(cfg: ExperimentConfig, log=print) -> None:
    """Generate the synthetic dataset on first use, into an absent or empty data.root. A
    dataset already there is never overwritten: one generated with settings other than
    data.synth (`run.py data synth --seed 14`) stops the run, naming them."""
    if cfg.data.dataset != "synthetic" or cfg.data.format != "folder":
        return
    root = Path(cfg.data.root)
    if synthetic.is_generated(root, cfg.data.synth):
        return
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise _occupied_root_error(root, cfg.data.synth)
    log(f"generating the synthetic dataset in {root} ...")
    info = synthetic.generate(root, cfg.data.synth)
    log(f"  {cfg.data.synth.num_train} train + {cfg.data.synth.num_val} val images in {info['seconds']} s")


def _occupied_root_error(root: Path, synth: SynthConfig) -> DatasetError:
    """Why data.root, which holds something, is neither used nor written: it is not a
    synthetic dataset, or it is one generated with other settings (and which overrides match)."""
    recorded = synthetic.recorded_settings(root)
    if recorded is None:
        return DatasetError(f"data.root {root} exists and is not a synthetic dataset; refusing to write into it")
    wanted = synthetic.settings(synth)
    differing = [key for key in sorted(recorded.keys() | wanted.keys()) if recorded.get(key) != wanted.get(key)]
    details = "; ".join(f"{key}: dataset {_as_yaml(recorded.get(key))}, config {_as_yaml(wanted.get(key))}"
                        for key in differing)
    overrides = " ".join("--set " + shlex.quote(f"data.synth.{key}={_as_yaml(recorded[key])}")
                         for key in differing if key in recorded and key in wanted)
    return DatasetError(
        f"data.root {root} holds a synthetic dataset generated with other settings than data.synth ({details}); "
        f"nothing was changed. Train on it with {overrides}, or set data.root to an absent or empty folder "
        "to generate a new one"
    )


def _as_yaml(value) -> str:
    """A setting as --set reads it back (JSON is YAML; quoted split names stay strings)."""
    return json.dumps(value, separators=(",", ":"))


def splits_location(cfg: ExperimentConfig) -> str:
    """The folder (or URI) holding val.txt and the split folders."""
    return cfg.data.splits_dir or storage.join(cfg.data.root, "splits")


def resolve_data(cfg: ExperimentConfig, log=print) -> ExperimentData:
    """Read and check the split lists of a folder dataset or a Parquet pack; every sample
    they name must exist, except the masks of unlabeled images (warned about through `log`)."""
    root = cfg.data.root
    if cfg.data.format == "parquet":
        packed.pack_index(root)  # fails first, and clearly, if root is not a pack
        exists = storage.exists

        def read(location: str, need_masks: bool = True) -> list[SampleRef]:
            return packed.read_split(location, root, need_masks, log)
    else:
        if not Path(root).is_dir():
            raise DatasetError(f"data.root {root} does not exist")

        def exists(location: str) -> bool:
            return Path(location).is_file()

        def read(location: str, need_masks: bool = True) -> list[SampleRef]:
            return read_split_file(Path(location), Path(root), need_masks, log)

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
    if not unlabeled and cfg.method.uses_unlabeled:
        raise DatasetError(f"{unlabeled_at} is missing or empty; method {cfg.method.name!r} needs unlabeled images")
    unmasked = [ref.image for ref in unlabeled if ref.mask is None] if cfg.method.name == "oracle" else []
    if unmasked:
        raise DatasetError(f"method 'oracle' learns from the unlabeled images' masks, but {len(unmasked)} lines of "
                           f"{unlabeled_at} name none (first: {unmasked[0]}); give '<image> <mask>' lines")
    return ExperimentData(read(storage.join(split, "labeled.txt")), unlabeled, read(storage.join(splits, "val.txt")))


def checked_data(cfg: ExperimentConfig, log=print) -> ExperimentData:
    """The split lists with every labeled and validation sample decoded once, so a corrupt
    file or a bad class id stops the run before any training starts (data.bad_samples=error)
    or is left out with a warning naming it (skip). Unlabeled images are checked as they
    stream, where an unreadable one is skipped (see TrainSet). Ends with one `log` line
    saying what was read: every command checks its dataset here once."""
    data = resolve_data(cfg, log)
    labeled, val = _readable(data.labeled, cfg, log), _readable(data.val, cfg, log)
    for kind, kept in (("labeled", labeled), ("validation", val)):
        if not kept:
            raise DatasetError(f"no readable {kind} samples left after skipping the bad ones")
    data = ExperimentData(labeled, data.unlabeled, val)
    log(data_summary(cfg, data))
    return data


def data_summary(cfg: ExperimentConfig, data: ExperimentData) -> str:
    """e.g. "data: voc split 92: 92 labeled, 10,490 unlabeled, 1,449 val images, 21 classes (root /x)"."""
    d = cfg.data
    where = "Parquet pack" if d.format == "parquet" else "root"
    return (f"data: {d.dataset} split {d.split}: {len(data.labeled):,} labeled, {len(data.unlabeled):,} unlabeled, "
            f"{len(data.val):,} val images, {d.num_classes} classes ({where} {d.root})")


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
