"""Which sample each draw of a seeded endless shuffle is, and the streams' seeds.

Kept apart from the loaders (and from torch): Ray Data's pipeline is built in Ray Train's
controller, which should not import torch to number the draws.
"""

from __future__ import annotations

import functools

import numpy as np

from mkd_ray.config import ExperimentConfig


def draw_key(draw: int, size: int, seed: int) -> tuple[int, int]:
    """The `draw`-th sample of a seeded endless shuffle: (epoch, index into the list)."""
    epoch, position = divmod(int(draw), size)
    return epoch, int(_epoch_order(seed, epoch, size)[position])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(size)


def unlabeled_seed(cfg: ExperimentConfig, rank: int = 0) -> int:
    return (cfg.train.seed * 2 + 1) * 1000 + rank


def labeled_seed(cfg: ExperimentConfig, rank: int = 0) -> int:
    return cfg.train.seed * 2 * 1000 + rank
