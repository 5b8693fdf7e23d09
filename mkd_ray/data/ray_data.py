"""Ray Data pipeline for the unlabeled stream.

The stream is a sequence of draw numbers: draw g is sample `draw_key(g)` of the same seeded
endless shuffle the single-process loop uses, so a one-worker Ray run sees exactly the
images the local loop sees, and a resumed run starts at the draw where it stopped.
Decoding and all augmentation (weak view, strong view, CutMix box, padding mask) run in
`map_batches` tasks on CPUs the training workers do not reserve.
"""

from __future__ import annotations

import math

import numpy as np
import ray

from mkd_ray.config import ExperimentConfig, config_from_dict
from mkd_ray.data.io import SampleRef
from mkd_ray.data.torch_data import TrainSet, draw_key, unlabeled_seed

VIEW_COLUMNS = ("weak", "strong", "ignore", "cutmix", "warp", "mask", "skipped")
RANGES_PER_BLOCK = 16


class _LastTrainSet:
    """The TrainSet of the last call in this process. A map task calls `_views` once per row of
    its block with the same `refs` and `config` objects; validating the config once per task
    instead of once per call saves about 5% of the decoding time."""

    key: tuple = ()
    value: TrainSet

    @classmethod
    def get(cls, refs: list[SampleRef], config: dict) -> TrainSet:
        if not (cls.key and cls.key[0] is refs and cls.key[1] is config):
            cls.key, cls.value = (refs, config), TrainSet(refs, config_from_dict(config), labeled=False)
        return cls.value


def _views(batch: dict[str, np.ndarray], refs: list[SampleRef], config: dict, seed: int) -> dict[str, np.ndarray]:
    """Rows of draw ranges (first, count) -> one decoded, augmented unlabeled sample per draw."""
    dataset = _LastTrainSet.get(refs, config)
    draws = np.concatenate([np.arange(f, f + c, dtype=np.int64) for f, c in zip(batch["first"], batch["count"])])
    samples = [dataset[draw_key(g, len(refs), seed)] for g in draws]
    out = {col: np.stack([s[col] for s in samples]) for col in VIEW_COLUMNS}
    # Booleans travel as uint8 (Arrow tensor columns); the training loop turns them back.
    out["ignore"] = out["ignore"].astype(np.uint8)
    out["cutmix"] = out["cutmix"].astype(np.uint8)
    out["draw"] = draws
    return out


def unlabeled_dataset(cfg: ExperimentConfig, refs: list[SampleRef], start_draw: int, num_draws: int) -> "ray.data.Dataset":
    """Draws [start_draw, start_draw + num_draws) of the unlabeled stream, decoded and augmented.

    The source is a list of small draw ranges built in this process (`from_items`), not
    `ray.data.range` or `from_numpy`, whose read and conversion tasks each hold a whole CPU:
    on a small machine shared by a sweep's trials that CPU is never free."""
    # The training loop prints its own progress; Ray Data's bars would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    chunk = max(cfg.data.unlabeled_batch_size, 16)
    end = start_draw + num_draws
    ranges = [{"first": g, "count": min(chunk, end - g)} for g in range(start_draw, end, chunk)]
    return ray.data.from_items(ranges, override_num_blocks=max(1, math.ceil(len(ranges) / RANGES_PER_BLOCK))).map_batches(
        _views,
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.scaling.data_cpus,
        fn_kwargs={"refs": list(refs), "config": cfg.to_dict(), "seed": unlabeled_seed(cfg)},
    )
