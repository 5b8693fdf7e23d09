"""Ray Data pipeline for the unlabeled stream.

The stream is a range of draw numbers: draw g is sample `draw_key(g)` of the same seeded
endless shuffle the single-process loop uses, so a one-worker Ray run sees exactly the
images the local loop sees, and a resumed run starts at the draw where it stopped.
Decoding and all augmentation (weak view, strong view, CutMix box, padding mask) run in
`map_batches` tasks on CPUs the training workers do not reserve.
"""

from __future__ import annotations

import numpy as np
import ray

from mkd_ray.config import ExperimentConfig, config_from_dict
from mkd_ray.data.io import SampleRef
from mkd_ray.data.torch_data import TrainSet, draw_key, unlabeled_seed

VIEW_COLUMNS = ("weak", "strong", "ignore", "cutmix", "mask")


def _views(batch: dict[str, np.ndarray], refs: list[SampleRef], config: dict, seed: int, offset: int) -> dict[str, np.ndarray]:
    """Rows of draw numbers (relative to `offset`) -> decoded, augmented unlabeled samples."""
    cfg = config_from_dict(config)
    dataset = TrainSet(refs, cfg, labeled=False)
    draws = np.asarray(batch["id"], dtype=np.int64) + offset
    samples = [dataset[draw_key(g, len(refs), seed)] for g in draws]
    out = {col: np.stack([s[col] for s in samples]) for col in VIEW_COLUMNS}
    # Booleans travel as uint8 (Arrow tensor columns); the training loop turns them back.
    out["ignore"] = out["ignore"].astype(np.uint8)
    out["cutmix"] = out["cutmix"].astype(np.uint8)
    out["draw"] = draws
    return out


def unlabeled_dataset(cfg: ExperimentConfig, refs: list[SampleRef], start_draw: int, num_draws: int) -> "ray.data.Dataset":
    """Draws [start_draw, start_draw + num_draws) of the unlabeled stream, decoded and augmented."""
    return ray.data.range(num_draws).map_batches(
        _views,
        batch_size=max(cfg.data.unlabeled_batch_size, 16),
        batch_format="numpy",
        fn_kwargs={"refs": list(refs), "config": cfg.to_dict(), "seed": unlabeled_seed(cfg), "offset": start_draw},
    )
