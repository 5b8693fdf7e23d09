"""What a run's Ray Train controller unpickles: its callbacks and the unlabeled stream's factory.

The controller is a fresh process for every run, and before it starts the workers it imports
every module these objects come from. Kept free of torch, torchvision and MLflow (about 8 s of
imports on a 2-core machine), this module lets the workers start that much sooner.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional

import ray
import ray.train
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import PlacementGroup
from ray.util.queue import Queue

from mkd_ray import storage
from mkd_ray.config import ExperimentConfig
from mkd_ray.console import TrainingDiverged
from mkd_ray.data.io import SampleRef
from mkd_ray.data.ray_data import draws_per_step, unlabeled_dataset
from mkd_ray.train.resources import RunResources

DIVERGED = "diverged"  # the report key that carries a divergence's message to the driver
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints


@dataclass
class RunPlacement:
    """Where a run's pieces go: its resources, the placement group reserved for its data
    actors (see mkd_ray.train.resources), and the board its progress lines go to."""

    resources: RunResources
    placement_group: Optional[PlacementGroup] = None
    board: Optional[ray.actor.ActorHandle] = None
    label: str = ""


def latest_step(run_dir: str) -> int:
    """The step of the checkpoint Ray Train will restore for this run (0 if none), read from
    the checkpoint manager's snapshot: the same record `ray.train.get_checkpoint()` uses, so
    the unlabeled stream and the restored weights agree, also after a worker-group restart.
    `run_dir` is a local path or a URI (a cluster's shared storage)."""
    snapshot = storage.join(run_dir, _SNAPSHOT)
    if not storage.exists(snapshot):
        return 0
    latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}
    match = _STEP_DIR.match(latest.get("checkpoint_dir_name", ""))
    return int(match.group(1)) if match else 0


def unlabeled_from_latest_checkpoint(cfg: ExperimentConfig, refs: list[SampleRef], run_dir: str, initial_step: int,
                                     placement: RunPlacement) -> "ray.data.Dataset":
    """The run's unlabeled stream from the draw of the checkpoint the workers restore. Ray Train
    calls it (a dataset factory) each time the worker group starts, so a group restarted after
    a failure streams from its checkpoint's draw, not from the run's beginning."""
    start = cfg.method.unlabeled_from(latest_step(run_dir) or initial_step)
    per_step = draws_per_step(cfg)
    return unlabeled_dataset(cfg, refs, start_draw=start * per_step, num_draws=max(cfg.train.iters - start, 1) * per_step,
                             actors=placement.resources.data_actors, placement_group=placement.placement_group,
                             board=placement.board, run_label=placement.label)


class DivergenceWatch(ray.train.UserCallback):
    """Ends the run when the workers report a non-finite loss. Raising here, in Ray Train's
    controller, fails the run without a retry: restarting from the last checkpoint would
    only diverge again."""

    def after_report(self, run_context, metrics, checkpoint):
        if DIVERGED in metrics[0]:
            raise TrainingDiverged(metrics[0][DIVERGED])


class EvaluationsToTune(TuneReportCallback):
    """Forward to Tune only the reports that carry the sweep's metric (the evaluations)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class CheckpointsToTune(ray.train.UserCallback):
    """PBT's channel: each evaluation that comes with a checkpoint goes to the trial function,
    which reports both to Tune (TuneReportCallback carries metrics only, and PBT needs the
    checkpoint to copy a good trial into a poor one)."""

    def __init__(self, metric: str, reports: Queue):
        self.metric, self.reports = metric, reports

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None and self.metric in metrics[0]:
            self.reports.put((metrics[0], checkpoint))
