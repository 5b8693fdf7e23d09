"""Ray Tune sweeps: a function trainable per trial that builds and fits one TorchTrainer.

The trial function is the TorchTrainer's driver (the current Ray pattern; `Tuner(trainer)`
is deprecated). Its trainer forwards each evaluation to Tune, so ASHA decides at
evaluations, with the training step as its clock. MLflow: the sweep is a parent run, each
trial a child run that rank 0 fills exactly like a plain `train` run.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
import ray
import yaml
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from ray import tune
from ray.train import UserCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.queue import Queue

from mkd_ray import storage as storage_paths
from mkd_ray import tracking
from mkd_ray.config import ConfigError, ExperimentConfig, config_from_dict, with_absolute_paths
from mkd_ray.data.sources import ExperimentData, checked_data, ensure_synthetic
from mkd_ray.train.trainer import build_trainer, checkpoint_step, connect, fit_trainer
from mkd_ray.tune.space import Sweep

ROLE_TAG = "mkd_ray.role"  # "sweep" on the parent run, "trial" on each child
SWEEP_TAG = "mkd_ray.sweep"
TRIAL_TAG = "mkd_ray.trial_id"
SEARCHED_TAG = "mkd_ray.searched"  # comma-separated searched keys, on the parent
STOPPED_EARLY_TAG = "mkd_ray.stopped_early"


class EvaluationsToTune(TuneReportCallback):
    """Forward to Tune only the reports that carry the sweep's metric (the evaluations)."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


class CheckpointsToTune(UserCallback):
    """PBT's channel: each evaluation that comes with a checkpoint goes to the trial function,
    which reports both to Tune (TuneReportCallback carries metrics only, and PBT needs the
    checkpoint to copy a good trial into a poor one)."""

    def __init__(self, metric: str, reports: Queue):
        self.metric, self.reports = metric, reports

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is not None and self.metric in metrics[0]:
            self.reports.put((metrics[0], checkpoint))


def run_trial(sampled: dict, base: dict, base_data: ExperimentData, sweep_name: str, metric: str,
              parent_run_id: str, experiment: str, uri: str, storage: str, pbt_interval: int = 0) -> None:
    """One trial: the base config with the sampled values, trained by a TorchTrainer whose
    checkpoints live under `storage/<run name>` (so a restored sweep resumes the trial).
    With `pbt_interval`, it checkpoints at each of PBT's decision steps and hands Tune each one.
    `base_data` is the base config's checked dataset, used unless the trial searches data keys."""
    trial_id = tune.get_context().get_trial_id()
    cfg = config_from_dict(base, dict(sampled))
    data = base_data if cfg.data == config_from_dict(base).data else checked_data(cfg)
    if pbt_interval:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_interval=pbt_interval))
    logger = tracking.open_run(cfg, experiment, f"{sweep_name}-{trial_id}", uri, tags={
        "mlflow.parentRunId": parent_run_id, ROLE_TAG: "trial", SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id,
    })
    mlflow_run = {"uri": uri, "run_id": logger.run_id}
    try:
        if pbt_interval:
            _train_for_pbt(cfg, data, sampled, trial_id, metric, storage, mlflow_run)
        else:
            fit_trainer(build_trainer(cfg, data, trial_id, storage, mlflow_run,
                                      callbacks=[EvaluationsToTune(metric)]))
    except SystemExit:  # Tune stopping or pausing the trial: the driver settles its run
        raise
    except BaseException as exc:
        tracking.close_run(logger, exc)
        raise
    tracking.close_run(logger)


def _train_for_pbt(cfg: ExperimentConfig, data: ExperimentData, sampled: dict, trial_id: str, metric: str,
                   storage: str, mlflow_run: dict) -> None:
    """Fit in a helper thread and report each checkpointed evaluation to Tune from this one.

    The run starts from Tune's checkpoint: this trial's own after a restored sweep, or the
    one PBT copied from a better trial, which may be of any step, so each invocation is a
    new Ray Train run. When PBT pauses the trial, Tune ends this process, and the trainer
    it owns goes with it.
    """
    start = tune.get_checkpoint()
    step = checkpoint_step(start) if start is not None else 0
    # The hyperparameters in force from this step on (PBT turns them into schedules), and
    # whether the weights came from another trial.
    own_dir = Path(tune.get_context().get_trial_dir()).name
    copied = start is not None and Path(start.path).parent.name != own_dir
    values = {f"pbt/{k}": v for k, v in sampled.items() if isinstance(v, (int, float))}
    tracking.RunLogger(**mlflow_run).metrics({**values, "pbt/copied_from_other_trial": float(copied)}, step)
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, data, f"{trial_id}-{uuid.uuid4().hex[:8]}", storage, mlflow_run,
                            callbacks=[CheckpointsToTune(metric, reports)], initial_checkpoint=start)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            fit_trainer(trainer)
        except BaseException as exc:  # handed to the trial's thread below
            failure.append(exc)
        finally:
            reports.put(None)

    threading.Thread(target=fit, name=f"fit-{trial_id}", daemon=True).start()
    while (item := reports.get()) is not None:
        metrics, saved = item
        tune.report(metrics, checkpoint=tune.Checkpoint(saved.path, filesystem=saved.filesystem))
    if failure:
        raise failure[0]


@dataclass
class Plan:
    """How many trials run at once, and the resources of each trial's driver."""

    concurrency: int
    trial_cpus: float


def plan_resources(sweep: Sweep, cluster: dict) -> Plan:
    """Fit whole trials into the cluster: each needs its driver, its training workers and at
    least one Ray Data actor's CPUs free at once, or its stream (or its worker group) waits
    forever. Concurrency counts the actor per worker that a trial takes where CPUs are free
    (`data.ray_data`), so that those actors do not take the CPUs planned for another trial."""
    s, t = sweep.base.scaling, sweep.tune
    workers = max(s.num_workers, 1)
    need = t.trial_driver_cpus + workers * s.cpus_per_worker + s.data_cpus
    cpus = cluster.get("CPU", 0)
    if need > cpus + 1e-9:
        raise ConfigError("scaling", f"one trial needs {need:g} CPUs (driver {t.trial_driver_cpus:g} + {workers} x "
                          f"cpus_per_worker {s.cpus_per_worker:g} + data_cpus {s.data_cpus:g}); the cluster has {cpus:g}")
    with_an_actor_per_worker = need + (workers - 1) * s.data_cpus
    fits = max(1, math.floor((cpus + 1e-9) / with_an_actor_per_worker))
    if s.use_gpu:
        gpus = cluster.get("GPU", 0)
        if gpus < workers:
            raise ConfigError("scaling.use_gpu", f"one trial needs {workers} GPUs; the cluster has {gpus:g}")
        fits = min(fits, math.floor(gpus / workers))
    concurrency = min(fits, t.max_concurrent_trials) if t.max_concurrent_trials else fits
    return Plan(max(concurrency, 1), t.trial_driver_cpus)


def _scheduler(sweep: Sweep):
    t, train = sweep.tune, sweep.base.train
    if t.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    if t.scheduler == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="step", perturbation_interval=pbt_interval(sweep),
            hyperparam_mutations={key: dim.mutation() for key, dim in sweep.space.items()},
            quantile_fraction=t.quantile_fraction, resample_probability=t.resample_probability,
            custom_explore_fn=functools.partial(_clip_to_space, space=sweep.space))
    return tune.schedulers.ASHAScheduler(
        time_attr="step", max_t=train.iters, grace_period=t.grace_period or min(train.eval_interval, train.iters),
        reduction_factor=t.reduction_factor)


def pbt_interval(sweep: Sweep) -> int:
    """Steps between PBT's decisions (0 when the scheduler is not PBT)."""
    if sweep.tune.scheduler != "pbt":
        return 0
    return sweep.tune.perturbation_interval or sweep.base.train.eval_interval


def _clip_to_space(config: dict, space: dict) -> dict:
    """PBT scales values by 0.8 or 1.2: keep each inside its searched range (and the config valid)."""
    return {key: space[key].clip(value) if key in space else value for key, value in config.items()}


def _search(sweep: Sweep, concurrency: int):
    """The search algorithm, limited to `concurrency` trials in flight (Tune applies
    max_concurrent_trials only to Searchers; the random generator takes its own limit)."""
    t = sweep.tune
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=t.seed), max_concurrent=concurrency)
    return tune.search.BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


def _open_parent(sweep: Sweep, experiment: str, name: str, uri: str) -> str:
    client = MlflowClient(tracking_uri=uri)
    run_id, created = tracking.reopen_or_create(client, experiment, name, {
        ROLE_TAG: "sweep", SWEEP_TAG: name, SEARCHED_TAG: ",".join(sweep.space),
        "scheduler": sweep.tune.scheduler, "search": sweep.tune.search,
        "dataset": sweep.base.data.dataset, "split": sweep.base.data.split, "method": sweep.base.method.name,
    })
    if created:
        params = [Param(f"tune.{k}", str(v)) for k, v in vars(sweep.tune).items()]
        params += [Param(f"space.{k}", d.describe()) for k, d in sweep.space.items()]
        client.log_batch(run_id, params=params)
        client.log_text(run_id, sweep.source.read_text(), f"space/{sweep.source.name}")
        client.log_text(run_id, yaml.safe_dump(sweep.base_tree, sort_keys=False), "space/base_config.yaml")
    return run_id


def latest_sweep(storage: str, prefix: str) -> str:
    """The most recent restorable sweep under `storage` whose name starts with `prefix` (names
    end in a sortable time stamp)."""
    location = storage_paths.resolve(storage)
    candidates = [name for name in storage_paths.children(location)
                  if name.startswith(f"{prefix}-") and tune.Tuner.can_restore(storage_paths.join(location, name))]
    if not candidates:
        raise ConfigError("--resume", f"no sweep named {prefix}-* to resume under {storage}; give --name")
    return candidates[-1]


@dataclass
class SweepSummary:
    parent_run_id: str
    table: pd.DataFrame  # one row per trial, best first
    best_config: Optional[dict]
    seconds: float
    path: str


_CREDENTIALS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def _keep_credentials_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credentials into every trial's runtime env, and Ray's
    runtime-env agent writes runtime envs to its log in plain text. Trials on this machine
    inherit the environment anyway; cluster nodes should hold their own credentials."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - _CREDENTIALS


def run_sweep(sweep: Sweep, name: str, storage: str = "runs", experiment: Optional[str] = None,
              address: Optional[str] = None, resume: bool = False) -> SweepSummary:
    """Run (or, with `resume`, continue) the sweep `name` under `storage/<name>`."""
    started = time.perf_counter()
    base_cfg = with_absolute_paths(sweep.base)
    ensure_synthetic(base_cfg)
    base_data = checked_data(base_cfg)  # a bad dataset fails here, before Ray starts
    base = yaml.safe_load(yaml.safe_dump(base_cfg.to_dict()))
    storage = storage_paths.resolve(storage)  # a shared filesystem path or an object-store URI
    sweep_dir = storage_paths.join(storage, name)
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise ConfigError("--resume", f"no sweep to resume at {sweep_dir}; run it first without --resume")
    if not resume and storage_paths.exists(sweep_dir):
        raise ConfigError("--name", f"sweep {name!r} already exists at {sweep_dir}; pass --resume to continue it")
    uri = tracking.tracking_uri()
    experiment = experiment or sweep.base.name
    parent_id = _open_parent(sweep, experiment, name, uri)
    client = MlflowClient(tracking_uri=uri)
    _keep_credentials_out_of_trial_runtime_envs()
    try:
        connect(address)
        plan = plan_resources(sweep, ray.cluster_resources())
        trainable = tune.with_resources(
            functools.partial(run_trial, base=base, base_data=base_data, sweep_name=name, metric=sweep.tune.metric,
                              parent_run_id=parent_id, experiment=experiment, uri=uri,
                              storage=storage_paths.join(sweep_dir, "trials"), pbt_interval=pbt_interval(sweep)),
            {"CPU": plan.trial_cpus})
        if resume:
            tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: dim.to_tune() for key, dim in sweep.space.items()},
                tune_config=tune.TuneConfig(
                    metric=sweep.tune.metric, mode=sweep.tune.mode, scheduler=_scheduler(sweep),
                    search_alg=_search(sweep, plan.concurrency), num_samples=sweep.tune.num_samples,
                    time_budget_s=sweep.tune.time_budget_s or None),
                run_config=tune.RunConfig(name=name, storage_path=storage,
                                          failure_config=tune.FailureConfig(max_failures=sweep.tune.max_failures),
                                          # PBT may copy any live trial's checkpoint a while after
                                          # it was reported: keep them all.
                                          checkpoint_config=tune.CheckpointConfig(
                                              num_to_keep=None if sweep.tune.scheduler == "pbt" else 2)),
            )
        print(f"sweep {name}: {sweep.tune.num_samples} trials, up to {plan.concurrency} at once, "
              f"{sweep.tune.scheduler} + {sweep.tune.search}; MLflow parent run {parent_id}", flush=True)
        grid = tuner.fit()
        table = _trial_table(grid, sweep, client, experiment, name)
        best = _best_config(table, sweep, base)
        _finish_parent(client, parent_id, table, best, sweep.tune.metric)
    except BaseException as exc:
        tracking.close_run(tracking.RunLogger(uri, parent_id), exc)
        raise
    return SweepSummary(parent_id, table, best, time.perf_counter() - started, str(sweep_dir))


def _trial_table(grid, sweep: Sweep, client: MlflowClient, experiment: str, name: str) -> pd.DataFrame:
    """One row per trial: its (last) hyperparameters, the step Tune last saw, its best and last
    metric from its MLflow run (PBT's restarts truncate Tune's own result files) and its
    outcome; the trials' MLflow runs are closed to match (Tune ends a trial's process at its
    last result, before the trial function could close its run)."""
    metric, iters = sweep.tune.metric, sweep.base.train.iters
    trials = tune.ExperimentAnalysis(grid.experiment_path).trials
    rows = []
    for trial, result in zip(trials, _results_by_trial(grid, trials)):
        run = tracking.find_run(client, experiment, f"{name}-{trial.trial_id}")
        history = sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: (m.step, m.timestamp)) if run else []
        # A trial that had finished when a killed driver last saved the sweep's state is run
        # again on --resume: it restores its final checkpoint and reports nothing new, so the
        # step it reached is read from its MLflow run too.
        steps = max(int((trial.last_result or {}).get("step", 0)), max((m.step for m in history), default=0))
        if trial.status == "ERROR":
            status = "error"
        elif trial.status != "TERMINATED":
            status = "unfinished"  # the sweep was interrupted: `--resume` continues it
        else:
            status = "completed" if steps >= iters else "stopped early"
        values = [m.value for m in history]
        best = (max(values) if sweep.tune.mode == "max" else min(values)) if values else float("nan")
        rows.append({"trial_id": trial.trial_id, "status": status, "steps": steps, f"best {metric}": best,
                     f"last {metric}": values[-1] if values else float("nan"),
                     **{key: trial.config.get(key) for key in sweep.space},
                     "mlflow_run_id": run.info.run_id if run else None})
        if run is not None:
            _close_trial_run(client, run, status, steps, result.error if result is not None else None)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"best {metric}", ascending=sweep.tune.mode == "min", na_position="last")
    return table.reset_index(drop=True)


_RUN_STATUS = {"completed": RunStatus.FINISHED, "stopped early": RunStatus.KILLED, "error": RunStatus.FAILED,
               "unfinished": RunStatus.KILLED}


def _results_by_trial(grid, trials) -> list:
    """The ResultGrid entry of each trial (None for a trial that never reported)."""
    by_path = {Path(result.path).name: result for result in grid if result.path}
    return [by_path.get(Path(trial.path).name) if trial.path else None for trial in trials]


def _close_trial_run(client: MlflowClient, run, status: str, steps: int, error) -> None:
    tags = [RunTag(STOPPED_EARLY_TAG, f"true (at step {steps})" if status == "stopped early" else "false"),
            RunTag("mkd_ray.outcome", status)]
    if error is not None and "failure_reason" not in run.data.tags:
        tags.append(RunTag("failure_reason", f"{type(error).__name__}: {error}"[:5000]))
    client.log_batch(run.info.run_id, tags=tags)
    client.set_terminated(run.info.run_id, RunStatus.to_string(_RUN_STATUS[status]))


def _best_config(table: pd.DataFrame, sweep: Sweep, base: dict) -> Optional[dict]:
    scored = table.dropna(subset=[f"best {sweep.tune.metric}"])
    if scored.empty:
        return None
    sampled = {key: scored.iloc[0][key] for key in sweep.space}
    return config_from_dict(base, {k: (v.item() if hasattr(v, "item") else v) for k, v in sampled.items()}).to_dict()


def _finish_parent(client: MlflowClient, parent_id: str, table: pd.DataFrame, best: Optional[dict], metric: str) -> None:
    """Results table, best config and counts on the sweep's run; FINISHED, or KILLED (tagged
    `interrupted`) when trials are left for `--resume`."""
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    client.log_text(parent_id, buffer.getvalue(), "results.csv")
    counts = table["status"].value_counts() if len(table) else pd.Series(dtype=int)
    unfinished = int(counts.get("unfinished", 0))
    tags = [RunTag("trials", str(len(table))), RunTag("trials_stopped_early", str(int(counts.get("stopped early", 0)))),
            RunTag("interrupted", "true" if unfinished else "false")]
    if best is not None:
        client.log_text(parent_id, yaml.safe_dump(best, sort_keys=False), "best_config.yaml")
        top = table.iloc[0]
        tags.append(RunTag("best_trial", str(top["trial_id"])))
        if top["mlflow_run_id"]:
            tags.append(RunTag("best_run_id", str(top["mlflow_run_id"])))
        client.log_metric(parent_id, f"best/{metric}", float(top[f"best {metric}"]))
    client.log_batch(parent_id, tags=tags)
    client.set_terminated(parent_id, RunStatus.to_string(RunStatus.KILLED if unfinished else RunStatus.FINISHED))
