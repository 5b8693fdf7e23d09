"""Map-style torch datasets over the augmentation functions, for single-process training.

Samplers yield (epoch, index) keys, and each sample's randomness is derived from
(seed, epoch, index), so the views do not depend on worker count or iteration order.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mkd_ray.config import ExperimentConfig
from mkd_ray.data.augment import labeled_views, sample_rng, unlabeled_views
from mkd_ray.data.draws import draw_key, labeled_seed, unlabeled_seed
from mkd_ray.data.io import DatasetError, SampleRef, read_image, read_mask

_log = logging.getLogger(__name__)


class EndlessSampler(Sampler):
    """Seeded reshuffle every epoch, forever: yields (epoch, index), skipping the first
    `start` draws, so a resumed run sees exactly the samples it would have seen."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62

    def __iter__(self) -> Iterator[tuple[int, int]]:
        draw = self.start
        while True:
            yield draw_key(draw, self.size, self.seed)
            draw += 1


class TrainSet(Dataset):
    def __init__(self, refs: list[SampleRef], cfg: ExperimentConfig, labeled: bool,
                 warn: Optional[Callable[[str], None]] = None):
        self.refs, self.cfg, self.labeled = refs, cfg, labeled
        self.stream = 0 if labeled else 1
        # Where a skipped image is reported: this process's log, or the user's console.
        self.warn = warn or _log.warning

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, index = key
        if self.labeled:  # checked before training (sources.checked_data)
            return self._views(epoch, index)
        # An unreadable unlabeled image is replaced by the next readable one of the list and
        # counted: every draw still yields one sample, so the stream stays aligned with the
        # steps and checkpoints (resume and Ray/local equality hold), and training goes on.
        for skipped in range(len(self.refs)):
            position = (index + skipped) % len(self.refs)
            try:
                sample = self._views(epoch, position)
            except DatasetError as exc:
                self.warn(f"warning: skipping unlabeled sample: {exc}")
                continue
            sample["skipped"] = np.int64(skipped)
            return sample
        raise DatasetError(f"none of the {len(self.refs)} unlabeled images can be read")

    def _views(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        ref, d = self.refs[index], self.cfg.data
        rng = sample_rng(self.cfg.train.seed, epoch, index, self.stream)
        image = read_image(ref)
        if self.labeled:
            mask = read_mask(ref, d.num_classes, d.ignore_index)
            return labeled_views(image, mask, d.crop_size, self.cfg.augment, rng, d.ignore_index)
        mask = read_mask(ref, d.num_classes, d.ignore_index) if ref.mask is not None else None
        return unlabeled_views(image, mask, d.crop_size, self.cfg.augment, rng, d.ignore_index)


class EvalSet(Dataset):
    """Validation images at their original size, with their masks and names."""

    def __init__(self, refs: list[SampleRef], cfg: ExperimentConfig):
        self.refs, self.cfg = refs, cfg

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> dict:
        ref, d = self.refs[index], self.cfg.data
        image = read_image(ref)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "mask": torch.from_numpy(read_mask(ref, d.num_classes, d.ignore_index)),
            "name": ref.name,
        }


def endless_loader(refs: list[SampleRef], cfg: ExperimentConfig, labeled: bool, batch_size: int, workers: int = 0,
                   start_step: int = 0, rank: int = 0):
    """Batches forever from step `start_step` on; each rank draws its own seeded sequence."""
    dataset = TrainSet(refs, cfg, labeled)
    seed = labeled_seed(cfg, rank) if labeled else unlabeled_seed(cfg, rank)
    sampler = EndlessSampler(len(refs), seed, start=start_step * batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0)


def training_streams(labeled: list[SampleRef], unlabeled: list[SampleRef] | None, cfg: ExperimentConfig,
                     start_step: int = 0) -> tuple[Iterator[dict], Iterator[dict] | None]:
    """The single-process loop's two batch streams from step `start_step` on, the unlabeled
    one from the end of the warm-up; no unlabeled stream when `unlabeled` is None (a method
    that uses labels only)."""
    d = cfg.data
    labeled_batches = iter(endless_loader(labeled, cfg, True, d.labeled_batch_size, start_step=start_step))
    if unlabeled is None:
        return labeled_batches, None
    first = cfg.method.unlabeled_from(start_step)
    return labeled_batches, iter(endless_loader(unlabeled, cfg, False, d.unlabeled_batch_size, start_step=first))


def eval_batches(refs: list[SampleRef], cfg: ExperimentConfig, batch_size: int) -> Iterator[dict]:
    """Batches of consecutive same-size validation images (VOC sizes vary; synthetic ones do not)."""
    dataset = EvalSet(refs, cfg)
    pending: list[dict] = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if pending and (len(pending) == batch_size or sample["image"].shape != pending[0]["image"].shape):
            yield _stack(pending)
            pending = []
        pending.append(sample)
    if pending:
        yield _stack(pending)


def _stack(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "name": [s["name"] for s in samples],
    }
