"""Ray Data pipeline for the unlabeled stream.

The stream is a sequence of draw numbers: draw g is sample `draw_key(g)` of the same seeded
endless shuffle the single-process loop uses, so a one-worker Ray run sees exactly the
images the local loop sees, and a resumed run starts at the draw where it stopped.
Decoding and all augmentation (weak view, strong view, CutMix box, padding mask) run in
`map_batches` on a pool of actors (one per training worker, as far as the CPUs go) on
CPUs the training workers do not reserve.
"""

from __future__ import annotations

import math
import numpy as np
import ray

from mkd_ray.config import ExperimentConfig, config_from_dict
from mkd_ray.data.io import SampleRef
from mkd_ray.data.draws import draw_key, unlabeled_seed

VIEW_COLUMNS = ("weak", "strong", "ignore", "cutmix", "warp", "mask", "skipped")
RANGES_PER_BLOCK = 16


class _ViewMaker:
    """Draw ranges -> decoded, augmented unlabeled samples, one per draw.

    A callable class on an actor pool rather than a function on tasks: each Ray Data task
    ran in a fresh worker process on a small node (the idle one was reaped between tasks)
    and spent seconds importing torch and validating the config before its first image.
    An actor does that once and keeps the dataset."""

    def __init__(self, refs: list[SampleRef], config: dict, seed: int, board=None, run_label: str = ""):
        # A skipped image is the user's business: it goes to the console through the run's board.
        warn = (lambda text: board.post.remote(run_label, text, progress=False)) if board is not None else None
        from mkd_ray.data.torch_data import TrainSet  # here, not above: the controller that builds the pipeline needs no torch

        self.dataset = TrainSet(refs, config_from_dict(config), labeled=False, warn=warn)
        self.size, self.seed = len(refs), seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        draws = np.concatenate([np.arange(f, f + c, dtype=np.int64) for f, c in zip(batch["first"], batch["count"])])
        samples = [self.dataset[draw_key(g, self.size, self.seed)] for g in draws]
        out = {col: np.stack([s[col] for s in samples]) for col in VIEW_COLUMNS}
        # Booleans travel as uint8 (Arrow tensor columns); the training loop turns them back.
        out["ignore"] = out["ignore"].astype(np.uint8)
        out["cutmix"] = out["cutmix"].astype(np.uint8)
        out["draw"] = draws
        return out


def draws_per_step(cfg: ExperimentConfig) -> int:
    """Unlabeled draws the whole worker group consumes per step."""
    return max(cfg.scaling.num_workers, 1) * cfg.data.unlabeled_batch_size


def unlabeled_dataset(cfg: ExperimentConfig, refs: list[SampleRef], start_draw: int, num_draws: int,
                      actors: int = 1, placement_group=None, board=None, run_label: str = "") -> "ray.data.Dataset":
    """Draws [start_draw, start_draw + num_draws) of the unlabeled stream, decoded and augmented
    by a fixed pool of `actors` actors, placed in `placement_group`'s bundles where given (the
    run's reservation, see mkd_ray.train.resources), so they never wait for free CPUs; they
    report unreadable images to the run's progress `board` (mkd_ray.console) where given.

    The source is a list of small draw ranges built in this process (`from_items`), not
    `ray.data.range` or `from_numpy`, whose read and conversion tasks each hold a whole CPU:
    on a small machine shared by a sweep's trials that CPU is never free.

    A fixed pool, not an autoscaling one: the training step, not augmentation, is the
    bottleneck, so an autoscaling pool stays at one actor, and on a cluster of small nodes
    that actor's node then decodes for every worker and its worker becomes the slowest rank
    (2 nodes of 1 CPU: the other node sat 65% idle)."""
    # The training loop reports its own progress; Ray Data's bars would interleave with it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    chunk = max(cfg.data.unlabeled_batch_size, 16)
    end = start_draw + num_draws
    ranges = [{"first": g, "count": min(chunk, end - g)} for g in range(start_draw, end, chunk)]
    # Ray 2.60 deprecates **ray_remote_args but names no parameter for a placement group yet
    # (deferred by ray-project/ray#65227): the strategy goes through them until it does.
    placement = {}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=-1)
    return ray.data.from_items(ranges, override_num_blocks=max(1, math.ceil(len(ranges) / RANGES_PER_BLOCK))).map_batches(
        _ViewMaker,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.scaling.data_cpus,
        fn_constructor_kwargs={"refs": list(refs), "config": cfg.to_dict(), "seed": unlabeled_seed(cfg),
                               "board": board, "run_label": run_label},
        **placement,
    )
