"""The TorchTrainer around `train_loop_per_worker`, and connecting to (or starting) Ray."""

from __future__ import annotations

import functools
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import ray
import ray.train
from ray._private import services  # Ray's own cluster lookup (ray.init uses the same)
from ray.train.torch import TorchTrainer
from ray.util.placement_group import placement_group, remove_placement_group

from mkd_ray import checkpoint as ckpt
from mkd_ray import console, storage, tracking
from mkd_ray.train.resources import RunResources, plan_run
from mkd_ray.config import ExperimentConfig, with_absolute_paths
from mkd_ray.data.sources import ExperimentData, checked_data, ensure_synthetic
from mkd_ray.console import TrainingDiverged
from mkd_ray.engine import default_run_name, evaluate_checkpoint
from mkd_ray.models.pretrain import with_source_backbone
from mkd_ray.train.callbacks import DivergenceWatch, RunPlacement, latest_step, unlabeled_from_latest_checkpoint
from mkd_ray.train.loop import load_checkpoint, train_loop_per_worker

# A sweep on a small machine starts a dozen processes at once by design (fractional CPUs: a
# trial's driver, controller, worker, data actor and helpers); the raylet otherwise expects
# as many concurrent starts as CPUs and warns on every console at 4x, 5x, ... that.
_LOCAL_SYSTEM_CONFIG = {"worker_maximum_startup_concurrency": 16}


def connect(address: Optional[str] = None) -> None:
    """Join the cluster at `address` (`auto`, `ray://...`, a GCS address). Without one, Ray's
    own lookup: RAY_ADDRESS (set inside a submitted job), then a cluster `ray start` left on
    this machine, else a new local instance (its dashboard on 127.0.0.1)."""
    console.quiet_ray()
    if ray.is_initialized():
        return
    # Workers' and Ray's own output stays in the session's log files unless asked for: the
    # driver prints each run's progress itself (mkd_ray.console).
    # Without Ray's own handler on its driver logger (configure_logging=False), what Ray logs
    # here reaches the console only at WARNING and above (Python's last-resort handler): its
    # "Connecting to existing Ray cluster" notices stay off, its warnings do not.
    quiet = {"log_to_driver": console.verbose(), "configure_logging": console.verbose()}
    # Ray's own lookup decides whether this joins a cluster (a submitted job's RAY_ADDRESS, a
    # `ray start` left here) or starts one; only a new instance takes a system config.
    if address or services.canonicalize_bootstrap_address(None) is not None:
        ray.init(address=address, **quiet)
    else:
        # The dashboard serves the State API that Ray Train uses to release finished placement
        # groups; it listens on 127.0.0.1 only. (Ray 2.60 replaces a node IP of 127.0.0.1 given
        # to ray.init by the machine's address, so its other servers cannot be kept on loopback
        # from here: README, "Secrets and addresses".)
        ray.init(dashboard_host="127.0.0.1", _system_config=_LOCAL_SYSTEM_CONFIG, **quiet)


def fit_trainer(trainer: TorchTrainer) -> ray.train.Result:
    """`trainer.fit()`, raising TrainingDiverged itself (not Ray's wrapper) when the loss diverged."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        cause = getattr(exc, "controller_failure", None)
        if isinstance(cause, TrainingDiverged):
            raise TrainingDiverged(str(cause)) from None
        raise


def build_trainer(
    cfg: ExperimentConfig, data: ExperimentData, name: str, storage_path: str, placement: RunPlacement,
    mlflow_run: Optional[dict] = None, max_failures: int = 2, callbacks: tuple = (),
    initial_checkpoint: Optional[ray.train.Checkpoint] = None, decision_gate=None,
) -> TorchTrainer:
    """Wire the datasets, scaling and run config (Ray must be connected: datasets are built here).

    `initial_checkpoint` starts a new run from another run's state (PBT hands trials each
    other's weights); a run's own checkpoints, once it has any, take precedence, as Ray's do.
    With a `decision_gate` (a Ray Queue), the workers wait after each checkpointed report
    until the caller puts one token per worker in it (PBT's decisions: see the loop).
    """
    storage_path = storage.resolve(storage_path)  # a shared filesystem path or an object-store URI
    initial_step = checkpoint_step(initial_checkpoint) if initial_checkpoint is not None else 0
    datasets = {}
    if data.unlabeled and cfg.method.uses_unlabeled:
        datasets["unlabeled"] = functools.partial(
            unlabeled_from_latest_checkpoint, cfg, data.unlabeled, storage.join(storage_path, name), initial_step,
            placement)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data": data, "mlflow": mlflow_run,
                           "initial_checkpoint": initial_checkpoint, "board": placement.board,
                           "run_label": placement.label, "decision_gate": decision_gate},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[DivergenceWatch(), *callbacks],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=_split_between_workers(cfg, datasets),
                                            execution_options=_ordered_ingest()),
    )


def _split_between_workers(cfg: ExperimentConfig, datasets: dict) -> list[str]:
    """The streams each worker takes a shard of. A lone worker reads its stream whole: a
    split would only add a coordinator actor, whose start (a process importing Ray Data)
    delayed the first batch of every one-worker run by seconds."""
    return list(datasets) if cfg.scaling.num_workers > 1 else []


def checkpoint_step(checkpoint: ray.train.Checkpoint) -> int:
    return int(load_checkpoint(checkpoint, mmap=True)["step"])


def _ordered_ingest():
    """Ray Train's ingest defaults, keeping block order: a run's stream is then reproducible."""
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _check_resumable(cfg: ExperimentConfig, run_dir: str) -> None:
    """A run started again must fit its checkpoint: name the differing keys before Ray starts."""
    step = latest_step(run_dir)
    if step:
        at = storage.join(run_dir, f"step_{step:08d}")
        saved = ckpt.checkpoint_config(load_checkpoint(ray.train.Checkpoint(at), mmap=True))
        ckpt.check_compatible(saved, cfg, f"run {run_dir.rsplit('/', 1)[-1]} ({at})")


def fit(
    cfg: ExperimentConfig,
    name: Optional[str] = None,
    storage_path: str = "runs",
    address: Optional[str] = None,
    experiment: Optional[str] = None,
):
    """Train on Ray, recorded as one MLflow run; a run started again with the same `name`
    resumes from its last checkpoint and continues the same MLflow run.

    Returns (Ray Train Result, MLflow run id).
    """
    name = name or default_run_name(cfg)
    cfg = with_absolute_paths(cfg)
    ensure_synthetic(cfg)
    data = checked_data(cfg)  # every listed file exists and reads: fail here, before Ray starts
    cfg = with_source_backbone(cfg)  # after the checks: pre-training takes minutes
    _check_resumable(cfg, storage.join(storage.resolve(storage_path), name))
    tracking.store_client()  # an MLflow store this MLflow cannot use fails here, before Ray starts
    connect(address)
    resources = plan_run(cfg, ray.cluster_resources())  # a run that cannot fit fails here, before anything starts
    logger = tracking.open_run(cfg, experiment or cfg.name, name)
    try:
        with reserved(resources, cfg.train.stall_timeout_s) as group:
            placement = RunPlacement(resources, group, console.new_board())
            mlflow_run = {"uri": tracking.tracking_uri(), "run_id": logger.run_id}
            with console.Console(placement.board, cfg.train.stall_timeout_s, what=f"run {name}") as watch:
                result = _fit_watched(build_trainer(cfg, data, name, storage_path, placement, mlflow_run), watch)
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as directory:
                tracking.log_final_model(logger, Path(directory) / ckpt.FILENAME, cfg, int(result.metrics["step"]))
    except BaseException as exc:
        tracking.close_run(logger, exc)
        raise
    tracking.close_run(logger)
    return result, logger.run_id


def _fit_watched(trainer: TorchTrainer, watch: console.Console) -> ray.train.Result:
    """`fit_trainer`, raising the console's Stalled error where its watch stopped the run."""
    try:
        result = fit_trainer(trainer)
    except (KeyboardInterrupt, SystemExit, ray.train.TrainingFailedError, ray.exceptions.RayActorError):
        if watch.stalled:
            raise watch.stalled from None
        raise
    if watch.stalled:
        raise watch.stalled
    return result


@contextmanager
def reserved(resources: RunResources, timeout_s: float):
    """The placement group of a `train` run's data actors (None where it has none), taken
    before the workers start and released at the end; a reservation the cluster cannot grant
    within the stall timeout is a Stalled error naming what waits."""
    bundles = resources.reserved_bundles()
    if not bundles:
        yield None
        return
    group = placement_group(bundles, strategy="SPREAD")
    try:
        if not group.wait(timeout_s or None):
            raise console.Stalled(f"the data actors' reservation ({resources.describe()}) was not granted in "
                                  f"{timeout_s:g} s: {console.waiting_for_resources()}")
        yield group
    finally:
        remove_placement_group(group)


def evaluate_on_ray(state: dict, cfg: ExperimentConfig, address: Optional[str] = None,
                    keep_predictions: bool = False) -> tuple[dict, dict[str, bytes]]:
    """`engine.evaluate_checkpoint` as a Ray task with one training worker's resources, so
    `run.py eval` scores on the cluster's CPUs or GPU; predictions come back as PNG bytes."""
    cfg = with_absolute_paths(cfg)
    data = checked_data(cfg)  # a bad dataset fails here, before Ray starts
    connect(address)
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0)
    return ray.get(task.remote(state, cfg, keep_predictions, data))
