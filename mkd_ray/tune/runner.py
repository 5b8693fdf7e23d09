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
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import ray
import yaml
from mlflow.entities import Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.queue import Queue

from mkd_ray import storage as storage_paths
from mkd_ray import tracking
from mkd_ray.config import ConfigError, ExperimentConfig, config_from_dict, with_absolute_paths
from mkd_ray.data.sources import ExperimentData, checked_data, ensure_synthetic
from mkd_ray.console import Console, Stalled, new_board, verbose
from mkd_ray.models.pretrain import with_source_backbone
from mkd_ray.train.resources import RunResources, plan_run, runs_that_fit
from mkd_ray.train.callbacks import CheckpointsToTune, EvaluationsToTune, RunPlacement
from mkd_ray.train.trainer import build_trainer, checkpoint_step, connect, fit_trainer
from mkd_ray.tune.space import Sweep

ROLE_TAG = "mkd_ray.role"  # "sweep" on the parent run, "trial" on each child
SWEEP_TAG = "mkd_ray.sweep"
TRIAL_TAG = "mkd_ray.trial_id"
SEARCHED_TAG = "mkd_ray.searched"  # comma-separated searched keys, on the parent
STOPPED_EARLY_TAG = "mkd_ray.stopped_early"


def run_trial(sampled: dict, base: dict, base_data: ExperimentData, sweep_name: str, metric: str,
              parent_run_id: str, experiment: str, uri: str, storage: str, resources: RunResources, board,
              pbt_interval: int = 0) -> None:
    """One trial: the base config with the sampled values, trained by a TorchTrainer whose
    checkpoints live under `storage/<run name>` (so a restored sweep resumes the trial).
    Its data actors run in the bundles Tune reserved for the trial together with this
    function (see mkd_ray.train.resources); its progress lines go to the sweep's `board`.
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
    placement = RunPlacement(resources, ray.util.get_current_placement_group(), board, trial_id)
    try:
        if pbt_interval:
            _train_for_pbt(cfg, data, sampled, trial_id, metric, storage, mlflow_run, placement)
        else:
            fit_trainer(build_trainer(cfg, data, trial_id, storage, placement, mlflow_run,
                                      callbacks=[EvaluationsToTune(metric)]))
    except SystemExit:  # Tune stopping or pausing the trial: the driver settles its run
        raise
    except BaseException as exc:
        tracking.close_run(logger, exc)
        raise
    tracking.close_run(logger)


def _train_for_pbt(cfg: ExperimentConfig, data: ExperimentData, sampled: dict, trial_id: str, metric: str,
                   storage: str, mlflow_run: dict, placement: RunPlacement) -> None:
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
    reports, gate = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, data, f"{trial_id}-{uuid.uuid4().hex[:8]}", storage, placement, mlflow_run,
                            callbacks=[CheckpointsToTune(metric, reports)], initial_checkpoint=start,
                            decision_gate=gate)
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
        # Returns once Tune lets the trial go on (a trial it pauses ends here): the workers
        # waiting at this checkpoint may then train on.
        tune.report(metrics, checkpoint=tune.Checkpoint(saved.path, filesystem=saved.filesystem))
        gate.put_nowait_batch([True] * cfg.scaling.num_workers)
    if failure:
        raise failure[0]


@dataclass
class Plan:
    """How many trials run at once, and what each holds."""

    concurrency: int
    trial: RunResources

    def trial_resources(self) -> tune.PlacementGroupFactory:
        """Tune's request for a trial: its driver and its data actors, granted together or not
        at all (the workers get a placement group of Ray Train's own, see mkd_ray.train.resources)."""
        return tune.PlacementGroupFactory(self.trial.reserved_bundles(), strategy="SPREAD")


def plan_resources(sweep: Sweep, cluster: dict) -> Plan:
    """Admit only as many trials as fit whole: each trial's driver, workers and data actors
    (one per worker, as far as the CPUs go) against the cluster's CPUs (and GPUs)."""
    trial = plan_run(sweep.base, cluster, driver_cpus=sweep.tune.trial_driver_cpus)
    fits = runs_that_fit(trial, cluster)
    limit = sweep.tune.max_concurrent_trials
    return Plan(min(fits, limit) if limit else fits, trial)


def _scheduler(sweep: Sweep, rungs_file: str):
    """Tune's scheduler for the sweep; ASHA keeps its rungs in `rungs_file`."""
    t, train = sweep.tune, sweep.base.train
    if t.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    if t.scheduler == "pbt":
        return BudgetAwarePBT(
            train.iters, time_attr="step", perturbation_interval=pbt_interval(sweep),
            hyperparam_mutations={key: dim.mutation() for key, dim in sweep.space.items()},
            quantile_fraction=t.quantile_fraction, resample_probability=t.resample_probability, synch=t.synch,
            custom_explore_fn=functools.partial(_clip_to_space, space=sweep.space))
    return ResumableASHA(
        rungs_file, baseline=default_values(sweep), time_attr="step", max_t=train.iters,
        grace_period=t.grace_period or min(train.eval_interval, train.iters), reduction_factor=t.reduction_factor)


class BudgetAwarePBT(tune.schedulers.PopulationBasedTraining):
    """PBT that leaves a trial alone at its last step (`max_t`): pausing it there, or copying
    another trial's weights into it, would only restart a run with no step left to train."""

    def __init__(self, max_t: int, **kwargs):
        super().__init__(**kwargs)
        self.max_t = max_t

    def on_trial_result(self, tune_controller, trial, result):
        if result.get(self._time_attr, 0) >= self.max_t:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class ResumableASHA(tune.schedulers.ASHAScheduler):
    """ASHA whose rungs survive `--resume`, and which never stops the baseline.

    Tune restores a sweep's searcher but builds its scheduler afresh, so a resumed ASHA would
    judge new trials only against the trials that report again. The rungs (milestone -> trial
    -> score) are written to `rungs_file` after each decision and read back on first use.
    The baseline (the trial whose searched values are `baseline`, the default configuration)
    has its scores recorded at every rung, so the others are judged against it, but runs the
    whole budget: the sweep compares its pick with the defaults at the same budget."""

    def __init__(self, rungs_file: str, baseline: Optional[dict] = None, **kwargs):
        super().__init__(**kwargs)
        self.rungs_file, self.baseline, self._loaded = rungs_file, baseline, False

    def on_trial_add(self, tune_controller, trial):
        if not self._loaded:
            self._loaded = True
            if storage_paths.exists(self.rungs_file):
                self._set_rungs(json.loads(storage_paths.read_text(self.rungs_file)))
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs()
        spare = self.baseline is not None and result.get(self._time_attr, 0) < self._max_t
        if action == self.STOP and spare and is_default(trial.config, self.baseline):
            return self.CONTINUE
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        super().on_trial_complete(tune_controller, trial, result)
        self._save_rungs()

    def _save_rungs(self) -> None:
        rungs = [{str(milestone): recorded for milestone, recorded in bracket._rungs} for bracket in self._brackets]
        storage_paths.write_bytes(self.rungs_file, json.dumps(rungs).encode())

    def _set_rungs(self, saved: list) -> None:
        for bracket, rungs in zip(self._brackets, saved):
            for milestone, recorded in bracket._rungs:
                recorded.update(rungs.get(str(milestone), {}))


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
    max_concurrent_trials only to Searchers; the random generator takes its own limit). Its
    first trial is the default configuration, where that lies in the space."""
    t = sweep.tune
    default = default_values(sweep)
    first = [default] if default and not sweep.grids else None
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=t.seed, points_to_evaluate=first), max_concurrent=concurrency)
    return tune.search.BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency, points_to_evaluate=first)


def _open_parent(client: MlflowClient, sweep: Sweep, experiment: str, name: str) -> str:
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
    table: pd.DataFrame  # one row per trial, best first (`_rank`)
    best_config: Optional[dict]
    seconds: float
    path: str
    default: Optional[dict]  # the searched keys' default values, where the sweep evaluated them
    iters: int  # a trial's full budget


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
    base_cfg = with_source_backbone(base_cfg)  # after the checks: pre-training takes minutes
    base = yaml.safe_load(yaml.safe_dump(base_cfg.to_dict()))
    storage = storage_paths.resolve(storage)  # a shared filesystem path or an object-store URI
    sweep_dir = storage_paths.join(storage, name)
    if resume and not tune.Tuner.can_restore(sweep_dir):
        raise ConfigError("--resume", f"no sweep to resume at {sweep_dir}; run it first without --resume")
    if not resume and storage_paths.exists(sweep_dir):
        raise ConfigError("--name", f"sweep {name!r} already exists at {sweep_dir}; pass --resume to continue it")
    uri = tracking.tracking_uri()
    experiment = experiment or sweep.base.name
    client = tracking.store_client(uri)  # an unusable MLflow store fails here, before Ray starts
    parent_id = _open_parent(client, sweep, experiment, name)
    _keep_credentials_out_of_trial_runtime_envs()
    try:
        connect(address)
        plan = plan_resources(sweep, ray.cluster_resources())  # a trial that cannot fit fails here
        board = new_board()
        trainable = tune.with_resources(
            functools.partial(run_trial, base=base, base_data=base_data, sweep_name=name, metric=sweep.tune.metric,
                              parent_run_id=parent_id, experiment=experiment, uri=uri,
                              storage=storage_paths.join(sweep_dir, "trials"), resources=plan.trial, board=board,
                              pbt_interval=pbt_interval(sweep)),
            plan.trial_resources())
        watch = Console(board, sweep.base.train.stall_timeout_s, label=lambda trial: f"[{_short(trial)}] ",
                        what=f"sweep {name}")
        if resume:
            tuner = tune.Tuner.restore(sweep_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={key: dim.to_tune() for key, dim in sweep.space.items()},
                tune_config=tune.TuneConfig(
                    metric=sweep.tune.metric, mode=sweep.tune.mode,
                    scheduler=_scheduler(sweep, storage_paths.join(sweep_dir, "asha_rungs.json")),
                    search_alg=_search(sweep, plan.concurrency), num_samples=sweep.tune.num_samples,
                    time_budget_s=sweep.tune.time_budget_s or None),
                run_config=tune.RunConfig(name=name, storage_path=storage, verbose=2 if verbose() else 0,
                                          callbacks=[SweepStatus(sweep, watch.say)],
                                          failure_config=tune.FailureConfig(max_failures=sweep.tune.max_failures),
                                          # PBT may copy any live trial's checkpoint a while after
                                          # it was reported: keep them all.
                                          checkpoint_config=tune.CheckpointConfig(
                                              num_to_keep=None if sweep.tune.scheduler == "pbt" else 2)),
            )
        print(f"sweep {name}: {sweep.num_trials} trials, up to {plan.concurrency} at once, each "
              f"{plan.trial.describe()} CPUs; {sweep.tune.scheduler} + {sweep.search_label}; "
              f"MLflow parent run {parent_id}", flush=True)
        with watch:
            grid = tuner.fit()
        failure = str(watch.stalled) if watch.stalled else None
        table = _trial_table(grid, sweep, client, experiment, name, failure)
        best = _best_config(table, sweep, base)
        if best is not None:
            storage_paths.write_bytes(storage_paths.join(sweep_dir, "best_config.yaml"),
                                      yaml.safe_dump(best, sort_keys=False).encode())
        _finish_parent(client, parent_id, table, best, sweep.tune.metric, failure)
    except BaseException as exc:
        tracking.close_run(tracking.RunLogger(uri, parent_id), exc)
        raise
    if watch.stalled:
        raise Stalled(f"{watch.stalled}; the sweep's state is saved: continue it with --resume --name {name}")
    return SweepSummary(parent_id, table, best, time.perf_counter() - started, str(sweep_dir),
                        default_values(sweep), sweep.base.train.iters)


def _short(trial_id: str) -> str:
    """`0e541_00003` -> `trial 00003`: the sweep's trials share the prefix."""
    return f"trial {trial_id.rsplit('_', 1)[-1]}"


class SweepStatus(tune.Callback):
    """The sweep's own console in the driver (Tune's is off unless --verbose): a line when a
    trial starts, ends or fails, and a short status table every `every_s` seconds."""

    def __init__(self, sweep: Sweep, say: Callable[[str], None] = print, every_s: float = 120.0):
        self.metric, self.iters, self.keys, self.every_s = sweep.tune.metric, sweep.base.train.iters, list(sweep.space), every_s
        self.say = say
        self.default = default_values(sweep)
        self._last_table = time.monotonic()

    def __getstate__(self) -> dict:
        # Tune saves its callbacks with the sweep's state; the console lives in this driver only
        # (a resumed sweep prints its events directly).
        return {**self.__dict__, "say": print}

    def on_trial_start(self, iteration, trials, trial, **info):
        values = {k: trial.config.get(k) for k in self.keys}
        note = " (the default configuration)" if is_default(values, self.default) else ""
        self.say(f"[{_short(trial.trial_id)}] started{note}: " + "  ".join(
            f"{k.split('.')[-1]}={_fmt(v)}" for k, v in values.items()))

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        step = int(result.get("step", 0))
        how = "finished" if step >= self.iters else f"stopped early by the scheduler at step {step}"
        score = f": {self.metric} {result[self.metric]:.2f}" if self.metric in result else ""
        self.say(f"[{_short(trial.trial_id)}] {how}{score}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(f"[{_short(trial.trial_id)}] failed; its error is in {trial.path or 'its trial folder'}")

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last_table < self.every_s:
            return
        self._last_table = time.monotonic()
        counts = pd.Series([t.status.lower() for t in trials]).value_counts()
        rows = [f"  {_short(t.trial_id):>12}  {t.status.lower():<10} step {int((t.last_result or {}).get('step', 0)):>6}"
                f"  {self.metric} {_fmt((t.last_result or {}).get(self.metric))}" for t in trials
                if t.status in ("RUNNING", "TERMINATED", "ERROR")]
        self.say("status: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n" + "\n".join(rows))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def default_values(sweep: Sweep) -> Optional[dict]:
    """The base configuration's value of each searched key, where every one lies in its
    searched range (then the sweep evaluates it first, as a baseline at the same budget)."""
    flat = sweep.base.flat()
    values = {key: flat[key] for key in sweep.space}
    return values if all(dim.contains(values[key]) for key, dim in sweep.space.items()) else None


def is_default(values, default: Optional[dict]) -> bool:
    """Whether a trial's values (its config, or a results-table row) are the default ones."""
    return default is not None and all(values.get(key) == value for key, value in default.items())


def _trial_table(grid, sweep: Sweep, client: MlflowClient, experiment: str, name: str,
                 failure: Optional[str] = None) -> pd.DataFrame:
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
            error = result.error if result is not None else None
            _close_trial_run(client, run, status, steps, error, history[-1].timestamp if history else None,
                             failure if status == "unfinished" else None)
    return _rank(pd.DataFrame(rows), sweep)


def _rank(table: pd.DataFrame, sweep: Sweep) -> pd.DataFrame:
    """Best first: trials that completed the budget ahead of those stopped or cut short, each
    by its metric at its last evaluation, the score a trial's configuration reaches at that
    budget (as `run.py compare` ranks runs). Not by its best evaluation: in a sweep with a
    warm-up that would credit a configuration with a supervised-only step's score."""
    if not len(table):
        return table
    metric = f"last {sweep.tune.metric}"
    ranked = table.assign(_full=table["status"] == "completed").sort_values(
        ["_full", metric], ascending=[False, sweep.tune.mode == "min"], na_position="last")
    return ranked.drop(columns="_full").reset_index(drop=True)


_RUN_STATUS = {"completed": RunStatus.FINISHED, "stopped early": RunStatus.KILLED, "error": RunStatus.FAILED,
               "unfinished": RunStatus.KILLED}


def _results_by_trial(grid, trials) -> list:
    """The ResultGrid entry of each trial (None for a trial that never reported)."""
    by_path = {Path(result.path).name: result for result in grid if result.path}
    return [by_path.get(Path(trial.path).name) if trial.path else None for trial in trials]


def _close_trial_run(client: MlflowClient, run, status: str, steps: int, error, last_logged_ms: Optional[int],
                     failure: Optional[str]) -> None:
    """Close a trial's run with its outcome, ending when the trial last logged (Tune ends a
    stopped trial's process before it could close its run; closing it now would stretch its
    duration to the sweep's end). `failure`: why an unfinished trial's sweep stopped."""
    tags = [RunTag(STOPPED_EARLY_TAG, f"true (at step {steps})" if status == "stopped early" else "false"),
            RunTag("mkd_ray.outcome", status)]
    reason = failure or (f"{type(error).__name__}: {error}" if error is not None else None)
    if reason and "failure_reason" not in run.data.tags:
        tags.append(RunTag("failure_reason", reason[:5000]))
    client.log_batch(run.info.run_id, tags=tags)
    state = RunStatus.FAILED if failure else _RUN_STATUS[status]
    ended = last_logged_ms if status in ("completed", "stopped early") else None
    client.set_terminated(run.info.run_id, RunStatus.to_string(state), end_time=ended)


def _best_config(table: pd.DataFrame, sweep: Sweep, base: dict) -> Optional[dict]:
    scored = table.dropna(subset=[f"last {sweep.tune.metric}"])
    if scored.empty:
        return None
    sampled = {key: scored.iloc[0][key] for key in sweep.space}
    return config_from_dict(base, {k: (v.item() if hasattr(v, "item") else v) for k, v in sampled.items()}).to_dict()


def _finish_parent(client: MlflowClient, parent_id: str, table: pd.DataFrame, best: Optional[dict], metric: str,
                   failure: Optional[str] = None) -> None:
    """Results table, best config and counts on the sweep's run; FINISHED, or KILLED (tagged
    `interrupted`) when trials are left for `--resume`, or FAILED with the reason when the
    sweep stalled."""
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
        client.log_metric(parent_id, f"best/{metric}", float(top[f"last {metric}"]))
    if failure:
        tags.append(RunTag("failure_reason", failure[:5000]))
    client.log_batch(parent_id, tags=tags)
    state = RunStatus.FAILED if failure else RunStatus.KILLED if unfinished else RunStatus.FINISHED
    client.set_terminated(parent_id, RunStatus.to_string(state))
