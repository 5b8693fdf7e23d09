"""Search spaces (pure Python) and sweeps on a real local Ray cluster with a real MLflow store."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mkd_ray.config import ConfigError, load_config
from mkd_ray.tune.space import load_sweep
from tests.conftest import REPO, TINY

BASE = str(REPO / "pipelines" / "synthetic.yaml")


def write_space(tmp_path: Path, **sections) -> Path:
    spec = {"base": BASE, "space": {"method.tau_t": {"uniform": [0.8, 0.95]}}, **sections}
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# (what the space file holds, --set overrides, the key the error must name, words it must say)
BAD_SPACES = [
    ({"spaces": {}}, [], "spaces", "did you mean 'space'"),
    ({"base": None}, [], "base", "base pipeline"),
    ({"base": "/nowhere/pipeline.yaml"}, [], "base", "does not exist"),
    ({"space": {}}, [], "space", "non-empty"),
    ({"space": {"method.ema_decy": {"uniform": [0.9, 0.99]}}}, [], "space.method.ema_decy", "did you mean 'method.ema_decay'"),
    ({"space": {"method.tau_t": {"normal": [0.8, 0.1]}}}, [], "space.method.tau_t", "unknown key 'normal'"),
    ({"space": {"method.tau_t": 0.9}}, [], "space.method.tau_t", "expected one distribution"),
    ({"space": {"method.tau_t": {"uniform": [0.95, 0.8]}}}, [], "space.method.tau_t", "is empty"),
    ({"space": {"method.tau_t": {"uniform": [0.8]}}}, [], "space.method.tau_t", "[lo, hi]"),
    ({"space": {"train.lr": {"loguniform": [0.0, 0.01]}}}, [], "space.train.lr", "positive bounds"),
    ({"space": {"method.ema_decay": {"uniform": [0.9, 1.0]}}}, [], "space.method.ema_decay", "can produce 1.0"),
    ({"space": {"method.threshold_mode": {"choice": ["fixed", "adaptive"]}}}, [], "space.method.threshold_mode", "'adaptive'"),
    ({"space": {"method.lambda_ss": {"choice": []}}}, [], "space.method.lambda_ss", "at least one value"),
    ({"space": {"train.iters": {"randint": [1.5, 10]}}}, [], "space.train.iters", "integers"),
    ({"space": {"train.lr": {"quniform": [0.001, 0.01, 0]}}}, [], "space.train.lr", "step q"),
    ({"space": {"model.backbone": {"choice": ["resnet18", "resnet50"]}}}, [], "space.model.backbone", "width multiplier"),
    ({"set": {"train.itres": 5}}, [], "set.train.itres", "did you mean 'iters'"),
    ({"tune": {"schedular": "asha"}}, [], "tune.schedular", "did you mean 'scheduler'"),
    ({}, ["tune.scheduler=hyperband"], "tune.scheduler", "'asha'"),
    ({}, ["tune.num_samples=0"], "tune.num_samples", "[1, inf]"),
    ({"tune": {"metric": "accuracy"}}, [], "tune.metric", "val/miou"),
    ({"tune": {"metric": "val/iou/hexagon"}}, [], "tune.metric", "no class 'hexagon'"),
    ({"space": {"train.lr": {"grid": [0.001, 0.01]}}, "tune": {"search": "optuna"}}, [], "space.train.lr", "grid works with"),
    ({}, ["method.ema_decay=1.5"], "method.ema_decay", "[0, 1)"),
    ({"tune": {"scheduler": "pbt", "search": "optuna"}}, [], "tune.search", "use search: random"),
    ({"tune": {"scheduler": "pbt", "perturbation_interval": 300}}, ["train.eval_interval=250"],
     "tune.perturbation_interval", "multiple of train.eval_interval=250"),
    ({"space": {"model.width": {"choice": [0.25, 0.5]}}, "tune": {"scheduler": "pbt"}}, [], "space.model.width",
     "copies weights between trials"),
    ({"tune": {"quantile_fraction": 0.75}}, [], "tune.quantile_fraction", "0.5"),
]


@pytest.mark.parametrize("sections,overrides,key,words", BAD_SPACES, ids=[b[2] + ":" + b[3] for b in BAD_SPACES])
def test_bad_space_files_are_rejected_naming_the_key(tmp_path, sections, overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_sweep(write_space(tmp_path, **sections), overrides)
    assert key in str(info.value) and words in str(info.value)


def test_set_routes_tune_keys_to_the_sweep_and_the_rest_to_the_base(tmp_path):
    space = write_space(tmp_path, tune={"num_samples": 4}, set={"train.iters": 300})
    sweep = load_sweep(space, ["tune.num_samples=8", "tune.max_concurrent_trials=2", "train.eval_interval=100",
                               "data.split=1_8"])
    assert sweep.tune.num_samples == 8 and sweep.tune.max_concurrent_trials == 2
    assert sweep.base.train.iters == 300 and sweep.base.train.eval_interval == 100 and sweep.base.data.split == "1_8"
    trial = sweep.trial_config({"method.tau_t": 0.85})
    assert trial.method.tau_t == 0.85 and trial.train.iters == 300


@pytest.mark.parametrize("name", ["synthetic", "synthetic-quick", "voc", "cityscapes"])
def test_shipped_spaces_load_and_search_the_method_knobs(name):
    sweep = load_sweep(REPO / "tune_spaces" / f"{name}.yaml")
    if name == "synthetic":  # `make tune`'s four trials: a grid over the two levers the evidence found
        assert set(sweep.space) == {"method.lambda_st", "method.distribution_alignment"}
        return
    assert {"method.tau_t", "method.lambda_st", "method.ema_decay", "method.lambda_ss"} <= set(sweep.space)
    if not name.startswith("synthetic"):
        assert {"method.tau_s", "method.lam_max", "train.lr"} <= set(sweep.space)


def test_the_laptop_sweep_runs_the_pipeline_budget_on_the_table_dataset_from_the_source_backbone():
    """`make tune` trials run the pipeline's own 6000 steps: shorter budgets ranked seed noise."""
    sweep = load_sweep(REPO / "tune_spaces" / "synthetic.yaml")
    pipeline = load_config(BASE)
    assert sweep.base.model.pretrained == "source" and sweep.base.train.iters == pipeline.train.iters
    assert sweep.base.data.synth.seed == pipeline.data.synth.seed and sweep.num_trials == 4


@pytest.mark.parametrize("name", ["synthetic", "synthetic-search"])
def test_asha_rungs_come_after_the_longest_warm_up_a_synthetic_sweep_may_sample(name):
    sweep = load_sweep(REPO / "tune_spaces" / f"{name}.yaml")
    searched = sweep.space.get("method.warmup_iters")
    longest = max(searched.args) if searched else sweep.base.method.warmup_iters
    assert longest < sweep.tune.grace_period < sweep.base.train.iters


def test_the_issue_23_search_space_loads_on_the_tuning_seed_from_the_source_backbone():
    sweep = load_sweep(REPO / "tune_spaces" / "synthetic-search.yaml")
    base = sweep.base
    assert base.model.pretrained == "source" and base.data.synth.seed == 100 and base.data.root == "data/synthetic-tune"
    assert {"method.threshold_mode", "method.tau_t", "method.lambda_st", "method.lambda_ss", "method.ema_decay",
            "method.warmup_iters"} == set(sweep.space)


def test_trials_rank_by_their_score_at_the_budget_not_by_a_warm_up_evaluation(tmp_path):
    """A stopped trial's best evaluation can be a supervised-only warm-up step's score; the
    pick is the configuration that scores best at the end of the whole budget."""
    import pandas as pd

    from mkd_ray.tune.runner import _rank

    sweep = load_sweep(write_space(tmp_path))
    table = pd.DataFrame([
        {"trial_id": "stopped", "status": "stopped early", "best val/miou": 33.0, "last val/miou": 30.0},
        {"trial_id": "peaked early", "status": "completed", "best val/miou": 32.5, "last val/miou": 31.0},
        {"trial_id": "ends best", "status": "completed", "best val/miou": 31.5, "last val/miou": 31.5},
        {"trial_id": "failed", "status": "error", "best val/miou": float("nan"), "last val/miou": float("nan")},
    ])
    assert list(_rank(table, sweep)["trial_id"]) == ["ends best", "peaked early", "stopped", "failed"]


def test_pbt_perturbations_stay_inside_the_searched_ranges(tmp_path):
    from mkd_ray.tune.runner import _clip_to_space

    space = write_space(tmp_path, space={"method.ema_decay": {"uniform": [0.95, 0.999]},
                                         "train.lr": {"quniform": [0.001, 0.01, 0.001]},
                                         "data.labeled_batch_size": {"randint": [2, 9]},
                                         "method.threshold_mode": {"choice": ["fixed", "class_adaptive"]}},
                        tune={"scheduler": "pbt"})
    sweep = load_sweep(space)
    perturbed = {"method.ema_decay": 0.999 * 1.2, "train.lr": 0.0123, "data.labeled_batch_size": 1,
                 "method.threshold_mode": "fixed", "train.iters": 7}
    clipped = _clip_to_space(perturbed, sweep.space)
    assert clipped == {"method.ema_decay": 0.999, "train.lr": pytest.approx(0.01), "data.labeled_batch_size": 2,
                       "method.threshold_mode": "fixed", "train.iters": 7}
    sweep.trial_config({k: v for k, v in clipped.items() if k in sweep.space})  # a valid config
    assert sweep.space["method.threshold_mode"].mutation() == ["fixed", "class_adaptive"]


def test_asha_rungs_outlive_the_scheduler_that_recorded_them(tmp_path):
    from types import SimpleNamespace

    from mkd_ray.tune.runner import ResumableASHA

    def scheduler():
        return ResumableASHA(str(tmp_path / "rungs.json"), time_attr="step", metric="val/miou", mode="max",
                             max_t=12, grace_period=4, reduction_factor=2)

    good, poor = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="poor")
    first = scheduler()
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, {"step": 4, "val/miou": 12.0}) == "CONTINUE"
    # A new scheduler (a resumed sweep's) judges the next trial against the first one's score;
    # without the file, the poor trial would be the first at its rung and go on.
    resumed = scheduler()
    resumed.on_trial_add(None, poor)
    assert resumed.on_trial_result(None, poor, {"step": 4, "val/miou": 1.5}) == "STOP"
    (tmp_path / "rungs.json").unlink()
    fresh = scheduler()
    fresh.on_trial_add(None, poor)
    assert fresh.on_trial_result(None, poor, {"step": 4, "val/miou": 1.5}) == "CONTINUE"


def test_asha_judges_others_against_the_baseline_but_never_stops_it(tmp_path):
    """The default configuration runs the whole budget, so the sweep's pick is compared with it
    at the same budget; its scores still sit in the rungs and stop worse trials."""
    from types import SimpleNamespace

    from mkd_ray.tune.runner import ResumableASHA

    asha = ResumableASHA(str(tmp_path / "rungs.json"), baseline={"method.lambda_st": 0.25}, time_attr="step",
                         metric="val/miou", mode="max", max_t=12, grace_period=4, reduction_factor=2)
    better = SimpleNamespace(trial_id="better", config={"method.lambda_st": 1.2})
    default = SimpleNamespace(trial_id="default", config={"method.lambda_st": 0.25})
    worse = SimpleNamespace(trial_id="worse", config={"method.lambda_st": 0.5})
    for trial in (better, default, worse):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, better, {"step": 4, "val/miou": 30.0}) == "CONTINUE"
    assert asha.on_trial_result(None, default, {"step": 4, "val/miou": 25.0}) == "CONTINUE"  # ASHA alone: STOP
    assert asha.on_trial_result(None, worse, {"step": 4, "val/miou": 20.0}) == "STOP"  # below the baseline too
    assert asha.on_trial_result(None, default, {"step": 12, "val/miou": 21.0}) == "STOP"  # the budget's end


def test_resource_plan_fits_whole_trials_and_refuses_impossible_ones(tmp_path):
    from mkd_ray.tune.runner import plan_resources

    sweep = load_sweep(REPO / "tune_spaces" / "synthetic.yaml")  # 0.1 driver + 0.5 worker + 0.4 data
    assert plan_resources(sweep, {"CPU": 2.0}).concurrency == 2
    assert plan_resources(sweep, {"CPU": 8.0}).concurrency == 8
    assert plan_resources(load_sweep(REPO / "tune_spaces" / "synthetic.yaml", ["tune.max_concurrent_trials=1"]),
                          {"CPU": 8.0}).concurrency == 1
    with pytest.raises(ConfigError, match="one run needs 2.1 CPUs"):
        plan_resources(load_sweep(REPO / "tune_spaces" / "synthetic.yaml", ["scaling.cpus_per_worker=1.0",
                                                                            "scaling.data_cpus=1.0"]), {"CPU": 2.0})
    # Two workers: a trial also takes a second actor where CPUs are free; with only one, it runs alone.
    two = load_sweep(REPO / "tune_spaces" / "synthetic.yaml", ["scaling.num_workers=2"])  # 0.1 + 2 x 0.5 + 2 x 0.4
    assert plan_resources(two, {"CPU": 6.0}).concurrency == 3
    assert plan_resources(two, {"CPU": 1.5}).concurrency == 1
    gpu = load_sweep(REPO / "tune_spaces" / "voc.yaml")  # 4 GPU workers x 4 CPUs
    assert plan_resources(gpu, {"CPU": 64.0, "GPU": 8.0}).concurrency == 2
    with pytest.raises(ConfigError, match="need 4 GPUs"):
        plan_resources(gpu, {"CPU": 64.0, "GPU": 2.0})


def test_a_trial_reserves_its_driver_and_data_actors_in_one_request():
    from mkd_ray.tune.runner import plan_resources

    plan = plan_resources(load_sweep(REPO / "tune_spaces" / "synthetic.yaml", ["scaling.num_workers=2"]), {"CPU": 6.0})
    assert plan.trial_resources().bundles == [{"CPU": 0.1}, {"CPU": 0.4}, {"CPU": 0.4}]
    supervised = plan_resources(load_sweep(REPO / "tune_spaces" / "synthetic.yaml", ["method.name=supervised"]),
                                {"CPU": 2.0})
    assert supervised.trial_resources().bundles == [{"CPU": 0.1}] and supervised.concurrency == 3


def test_the_default_configuration_is_the_first_trial_where_the_space_holds_it(tmp_path):
    from mkd_ray.tune.runner import default_values

    sweep = load_sweep(REPO / "tune_spaces" / "synthetic.yaml")
    assert default_values(sweep) == {"method.lambda_st": 0.25, "method.distribution_alignment": False}
    outside = load_sweep(REPO / "tune_spaces" / "synthetic.yaml", ["method.lambda_st=0.5"])  # grid [0.25, 1.2]
    assert default_values(outside) is None


def test_a_grid_sweep_runs_every_grid_point_num_samples_times(tmp_path):
    space = {"method.lambda_st": {"grid": [0.25, 1.2]}, "method.distribution_alignment": {"grid": [False, True]},
             "method.tau_t": {"uniform": [0.8, 0.95]}}
    mixed = load_sweep(write_space(tmp_path, space=space, tune={"num_samples": 3}))
    assert (mixed.num_trials, mixed.search_label) == (12, "grid + random")
    sampled = load_sweep(write_space(tmp_path, space={"method.tau_t": {"uniform": [0.8, 0.95]}}))
    assert (sampled.num_trials, sampled.search_label) == (8, "random")
    assert load_sweep(REPO / "tune_spaces" / "synthetic.yaml").search_label == "grid"


def test_cli_rejects_a_bad_space_before_starting_ray(tmp_path):
    space = write_space(tmp_path, space={"method.ema_decay": {"uniform": [0.9, 1.0]}})
    proc = subprocess.run([sys.executable, "run.py", "tune", "--space", str(space)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "space.method.ema_decay" in proc.stderr and "Started a local Ray instance" not in proc.stderr + proc.stdout


# ----------------------------------------------------------------------------- real sweeps

TINY_TRIAL = {"train.iters": 12, "train.eval_interval": 4, "train.checkpoint_interval": 4, "train.log_interval": 4,
              "scaling.cpus_per_worker": 0.5, "scaling.data_cpus": 0.4, "train.threads": 1}


def _sweep_command(space: Path, tiny_overrides, storage: Path, name: str, *extra) -> list[str]:
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    return [sys.executable, "run.py", "tune", "--space", str(space), *sets, "--storage", str(storage),
            "--name", name, "--experiment", name, *extra]


def _run_sweep(space: Path, tiny_overrides, tmp_path: Path, name: str, env: dict, timeout: float = 900) -> dict:
    """`run.py tune` to the end; its --summary."""
    summary = tmp_path / "summary.json"
    proc = subprocess.run(_sweep_command(space, tiny_overrides, tmp_path / "runs", name, "--summary", str(summary)),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(summary.read_text()), "stdout": proc.stdout, "stderr": proc.stderr}


def _children(parent_id: str) -> list:
    return mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", search_all_experiments=True,
                              output_format="list")


@pytest.fixture
def sweep_env(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    # Each sweep starts its own local cluster; a short temp path keeps Ray's sockets legal.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt", dir="/tmp")}
    return env


FAKE_SECRET = "mkd-fake-secret-5f0c1e"


@pytest.fixture(scope="module")
def concurrent_sweep(synthetic_root, tmp_path_factory):
    """One `run.py tune` whose four trials train at once on two CPUs, all logging to one SQLite
    store, over a dataset with 20 truncated unlabeled images, with fake credentials in the
    environment; the fourth learning rate makes the loss overflow."""
    from tests.test_data import corrupt_copy

    home = tmp_path_factory.mktemp("concurrent")
    root, broken = corrupt_copy(synthetic_root, home, "splits/1_8/unlabeled.txt", 20)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    ray_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": ray_dir, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "MLFLOW_TRACKING_TOKEN": FAKE_SECRET, "HF_TOKEN": FAKE_SECRET}
    # Twenty-odd Ray processes start at once on two cores; on a slow day that alone took CI
    # over the default 300 s without a report, so this sweep's stall limit is longer.
    tiny = {**TINY_TRIAL, "scaling.cpus_per_worker": 0.2, "scaling.data_cpus": 0.2, "train.optimizer": "sgd",
            "train.iters": 8, "train.stall_timeout_s": 900}
    space = write_space(home, set=tiny, space={"train.lr": {"grid": [0.01, 0.008, 0.006, 1.0e+12]}},
                        tune={"scheduler": "fifo", "num_samples": 1, "trial_driver_cpus": 0.1})
    try:
        summary = _run_sweep(space, TINY + [f"data.root={root}"], home, "concurrent", env, timeout=1800)
        yield {**summary, "uri": uri, "home": home, "ray_dir": Path(ray_dir), "broken": broken}
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)  # a short path in /tmp (socket length limit), not in tmp_path


def _trial_runs(sweep) -> dict[float, object]:
    runs = MlflowClient(sweep["uri"]).search_runs(
        [MlflowClient(sweep["uri"]).get_run(sweep["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{sweep['parent_run_id']}'")
    return {float(r.data.params["train.lr"]): r for r in runs}


@pytest.mark.ray
def test_four_concurrent_trials_lose_no_metric(concurrent_sweep):
    sweep, client = concurrent_sweep, MlflowClient(concurrent_sweep["uri"])
    assert "4 at once" in sweep["stdout"]
    assert client.get_run(sweep["parent_run_id"]).info.status == "FINISHED"
    trials = _trial_runs(sweep)
    assert len(trials) == 4
    for lr, run in trials.items():  # every step of every trial is in the store
        if lr > 1:
            continue
        assert run.info.status == "FINISHED"
        for key, steps in (("train/loss", [8]), ("train/lr", [8]), ("data/skipped", [8]),
                           ("val/miou", [4, 8]), ("val/iou/background", [4, 8])):  # log_interval 10, the last step
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == steps, key


@pytest.mark.ray
def test_a_diverging_trial_fails_alone_with_its_reason(concurrent_sweep):
    diverged = _trial_runs(concurrent_sweep)[1.0e+12]
    assert diverged.info.status == "FAILED" and "not finite by step 4" in diverged.data.tags["failure_reason"]
    assert [t["status"] for t in concurrent_sweep["trials"]].count("error") == 1
    assert [t["status"] for t in concurrent_sweep["trials"] if t["train.lr"] == 1.0e+12] == ["error"]
    assert "training diverged" in concurrent_sweep["stdout"] + concurrent_sweep["stderr"]


@pytest.mark.ray
def test_unreadable_unlabeled_images_are_skipped_counted_and_named(concurrent_sweep):
    client = MlflowClient(concurrent_sweep["uri"])
    for lr, run in _trial_runs(concurrent_sweep).items():
        if lr < 1:
            assert client.get_metric_history(run.info.run_id, "data/skipped")[-1].value > 0
    logs = concurrent_sweep["stdout"] + concurrent_sweep["stderr"]
    assert any(f"cannot read image {image}" in logs for image in concurrent_sweep["broken"])


@pytest.mark.ray
def test_a_local_sweep_prints_no_ray_internal_lines(concurrent_sweep):
    # Four trials on two CPUs start many processes at once; Ray's own notices about that (and
    # its start-up banner and token notice) stay off the console of the cluster run.py starts.
    logs = concurrent_sweep["stdout"] + concurrent_sweep["stderr"]
    for internal in ("(raylet)", "worker processes have been started", "Started a local Ray instance",
                     "Token authentication is enabled", "View detailed results here"):
        assert internal not in logs


@pytest.mark.ray
def test_secrets_leak_nowhere_and_the_dashboard_listens_on_localhost(concurrent_sweep):
    sweep, client = concurrent_sweep, MlflowClient(concurrent_sweep["uri"])
    assert FAKE_SECRET not in sweep["stdout"] + sweep["stderr"]
    artifacts = sweep["home"] / "artifacts"
    for run in [client.get_run(sweep["parent_run_id"]), *_trial_runs(sweep).values()]:
        assert FAKE_SECRET not in json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(artifacts / run.info.run_id),
                                            tracking_uri=sweep["uri"])
    written = [*artifacts.rglob("*"), *(sweep["home"] / "runs").rglob("*"), *sweep["ray_dir"].rglob("*")]
    files = [p for p in written if p.is_file() and not p.is_symlink() and not p.name.endswith(".sock")]
    assert len(files) > 50  # artifacts, checkpoints, Tune's state and Ray's logs
    assert [str(p) for p in files if FAKE_SECRET.encode() in p.read_bytes()] == []
    text = "\n".join(p.read_text(errors="replace") for p in sweep["ray_dir"].rglob("dashboard.log"))
    assert re.findall(r"Dashboard head http address: (\S+):\d+", text) == ["127.0.0.1"]


def test_four_processes_writing_one_sqlite_store_lose_no_metric(tmp_path):
    """The tracking store under more write pressure than trials make: four processes each log
    12 metrics at every one of 150 steps, as fast as they can, into one SQLite file."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("pressure")
    runs = [client.create_run(experiment).info.run_id for _ in range(4)]
    writer = ("import sys; from mkd_ray.tracking import RunLogger; log = RunLogger(sys.argv[1], sys.argv[2]);\n"
              "for step in range(1, 151): log.metrics({f'm{k}': step * 100 + k for k in range(12)}, step)")
    procs = [subprocess.Popen([sys.executable, "-c", writer, uri, run], cwd=REPO) for run in runs]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    for run in runs:
        for k in range(12):
            history = client.get_metric_history(run, f"m{k}")
            assert sorted((m.step, m.value) for m in history) == [(s, s * 100 + k) for s in range(1, 151)]


@pytest.fixture(scope="module")
def resumed_asha_sweep(synthetic_root, tmp_path_factory):
    """An ASHA sweep of a good learning rate and then (one trial at a time, so in this order) one
    that cannot learn in 12 steps, whose driver is SIGKILLed (no chance to clean up) once the
    first trial has finished; `--resume` completes it. One sweep serves the ASHA checks and
    the resume checks: each sweep pays a cluster start and two trials."""
    home = tmp_path_factory.mktemp("asha")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    ray_dir = tempfile.mkdtemp(prefix="ra", dir="/tmp")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": ray_dir}
    space = write_space(home, set=TINY_TRIAL, space={"train.lr": {"grid": [0.005, 1.0e-6]}},
                        tune={"scheduler": "asha", "grace_period": 4, "num_samples": 1, "max_concurrent_trials": 1})
    command = _sweep_command(space, TINY + [f"data.root={synthetic_root}"], home / "runs", "resumed")
    client = MlflowClient(uri)
    try:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        finished = []
        while not finished:  # kill the driver once a trial has finished
            assert proc.poll() is None and time.monotonic() < deadline, "sweep ended before it could be interrupted"
            time.sleep(2)
            experiment = client.get_experiment_by_name("resumed")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            finished = [r for r in runs if r.data.tags.get("mkd_ray.role") == "trial" and r.info.status == "FINISHED"]
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        first_pass = {r.data.tags["mkd_ray.trial_id"]: client.get_metric_history(r.info.run_id, "val/miou")
                      for r in finished}
        summary = home / "summary.json"
        resumed = subprocess.run([*command, "--resume", "--summary", str(summary)], cwd=REPO, capture_output=True,
                                 text=True, timeout=900, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        yield {**json.loads(summary.read_text()), "uri": uri, "first_pass": first_pass}
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


@pytest.mark.ray
def test_asha_sweep_logs_a_parent_and_a_child_per_trial_and_stops_poor_trials(resumed_asha_sweep):
    # The hopeless trial sits below the first trial's score at the step-4 rung: ASHA stops it there.
    sweep, client = resumed_asha_sweep, MlflowClient(resumed_asha_sweep["uri"])
    mlflow.set_tracking_uri(sweep["uri"])
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mkd_ray.role"] == "sweep"
    children = _children(sweep["parent_run_id"])
    assert len(children) == 2
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [1e-6, 0.005]
    for child in children:
        stopped = float(child.data.params["train.lr"]) == 1e-6
        assert child.data.tags["mkd_ray.outcome"] == ("stopped early" if stopped else "completed")
        assert child.info.status == ("KILLED" if stopped else "FINISHED")
        assert len(client.get_metric_history(child.info.run_id, "val/miou")) >= 1
    best = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/best_config.yaml"))
    assert best["train"]["lr"] == 0.005 and sweep["best_config"]["train"]["lr"] == 0.005
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/results.csv")
    assert len(table.strip().splitlines()) == 3 and "stopped early" in table


@pytest.mark.ray
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(resumed_asha_sweep):
    """After the SIGKILL and `--resume`, the finished trial trained no step again, MLflow holds
    each run once, and ASHA still judged the next trial against the finished one (its rungs
    survived the restart: the stop above)."""
    sweep, client = resumed_asha_sweep, MlflowClient(resumed_asha_sweep["uri"])
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    parents = [r for r in runs if r.data.tags.get("mkd_ray.role") == "sweep"]
    trials = {float(r.data.params["train.lr"]): r for r in runs if r.data.tags.get("mkd_ray.role") == "trial"}
    assert len(parents) == 1 and parents[0].info.run_id == sweep["parent_run_id"]
    assert len(trials) == 2 and len({r.data.tags["mkd_ray.trial_id"] for r in trials.values()}) == 2  # no duplicates
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials.values())
    assert sweep["first_pass"] and all(trial_id in {r.data.tags["mkd_ray.trial_id"] for r in trials.values()}
                                       for trial_id in sweep["first_pass"])
    for trial_id, history in sweep["first_pass"].items():  # finished trials were not trained again
        run = next(r for r in trials.values() if r.data.tags["mkd_ray.trial_id"] == trial_id)
        assert client.get_metric_history(run.info.run_id, "val/miou") == history


@pytest.mark.ray
def test_pbt_sweep_copies_good_trials_into_poor_ones_and_finishes_every_trial(tmp_path, tiny_overrides, sweep_env):
    # A good and a hopeless learning rate run side by side; at the step-4 evaluation PBT hands
    # the poor trial (the bottom half of two) the good one's checkpoint and a perturbed learning
    # rate. Synchronous, so a busy machine that starts one trial late cannot let the other
    # finish unseen; and each trial waits at the checkpoint for the decision, so neither can
    # finish its 8 steps before it.
    space = write_space(tmp_path, set={**TINY_TRIAL, "train.iters": 8},
                        space={"train.lr": {"grid": [0.005, 1.0e-6]}},
                        tune={"scheduler": "pbt", "num_samples": 1, "max_concurrent_trials": 2, "quantile_fraction": 0.5,
                              "synch": True})
    summary = _run_sweep(space, tiny_overrides, tmp_path, "pbt", sweep_env)
    client = MlflowClient()
    children = _children(summary["parent_run_id"])
    assert len(children) == 2
    assert {c.data.tags["mkd_ray.outcome"] for c in children} == {"completed"}  # every trial reached step 8
    assert summary["stderr"] == ""  # none of Tune's or Ray's own notices
    copied = []
    for child in children:
        assert child.info.status == "FINISHED"
        assert client.get_metric_history(child.info.run_id, "val/miou")
        schedule = client.get_metric_history(child.info.run_id, "pbt/train.lr")
        assert schedule[0].step == 0 and len(schedule) >= 1
        assert all(m.step < 8 for m in schedule)  # no trial was restarted at its last step
        # Paused at step 4 before training on: no step was trained (and evaluated) twice.
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "val/miou")) == [4, 8]
        copied += [m for m in client.get_metric_history(child.info.run_id, "pbt/copied_from_other_trial") if m.value == 1]
    assert copied and all(m.step > 0 for m in copied), "PBT never handed a trial another trial's checkpoint"
    # Under PBT the best configuration is the best trial's last point of its schedule.
    best = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{summary['parent_run_id']}/best_config.yaml"))
    best_run = client.get_run(client.get_run(summary["parent_run_id"]).data.tags["best_run_id"])
    last = max(client.get_metric_history(best_run.info.run_id, "pbt/train.lr"), key=lambda m: (m.step, m.timestamp))
    assert best["train"]["lr"] == pytest.approx(last.value)
