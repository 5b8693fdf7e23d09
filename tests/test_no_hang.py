"""Runs and sweeps never hang silently (issue 22): a sweep completes while another tenant
holds the CPUs that used to be its slack, a run that cannot get its CPUs stops with an
error naming what waits for what, and the console shows each progress line once and none
of Ray's internal dumps. A real two-CPU Ray cluster, a real MLflow store."""

import json
import re
import subprocess
import sys
import time

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mkd_ray.localcluster import cpus_held_by_another_driver, local_cluster
from tests.conftest import REPO

pytestmark = pytest.mark.ray

TINY_RUN = ["train.iters=8", "train.eval_interval=4", "train.checkpoint_interval=4", "train.log_interval=4",
            "scaling.cpus_per_worker=0.5", "scaling.data_cpus=0.4", "train.threads=1"]


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=1, cpus_per_node=2) as started:
        yield started


@pytest.fixture
def env(cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return {**cluster.env, "MLFLOW_TRACKING_URI": uri}


def _sets(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_a_sweep_completes_with_its_slack_taken_and_prints_each_line_once(cluster, env, tiny_overrides, tmp_path):
    # The old failure: two trials' drivers and workers took 1.2 of 2 CPUs, 0.5 more were held
    # elsewhere (a finished trial's placement group), and neither trial's data actor (0.4)
    # could ever start. Each trial now takes its driver and data actor in one reservation.
    # Two trials are enough to recreate that.
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": str(REPO / "pipelines" / "synthetic.yaml"), "set": {"method.rampup_iters": 4},
        "space": {"method.tau_t": {"uniform": [0.8, 0.95]}},
        "tune": {"scheduler": "asha", "grace_period": 4, "num_samples": 2}}))
    summary = tmp_path / "summary.json"
    with cpus_held_by_another_driver(cluster, 0.5):
        proc = subprocess.run([sys.executable, "run.py", "tune", "--space", str(space), *_sets(tiny_overrides + TINY_RUN),
                               "--storage", str(tmp_path / "runs"), "--name", "slack", "--experiment", "slack",
                               "--address", cluster.gcs, "--summary", str(summary)],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = json.loads(summary.read_text())["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"completed", "stopped early"}

    out = proc.stdout + proc.stderr
    progress = [line for line in out.splitlines() if re.match(r"\[trial \d+\] step \d+/8 ", line)]
    assert len(progress) >= 4 and len(progress) == len(set(progress))  # each run's line once
    for dump in ("Reporting training result", "TrainingReport(", "core_worker.cc", "Setting up process group",
                 "Progress bars disabled", "Trial status:", "RayDeprecationWarning", "Connecting to existing Ray cluster"):
        assert dump not in out
    assert "pseudo_acc_kept=nan" not in out
    # The summary answers the user's question and says where to look.
    assert "(the default configuration)" in out and re.search(r"default configuration \(method\.tau_t=0\.9\): val/miou", out)
    assert re.search(r"compute: the trials ran \d+ of 16 steps", out)
    assert f"{tmp_path / 'runs' / 'slack' / 'best_config.yaml'}" in out and (tmp_path / "runs/slack/best_config.yaml").is_file()
    assert "run.py compare --experiment slack --sweep slack" in out and "--host 127.0.0.1" in out
    assert re.search(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}\?workflowType=machine_learning", out)

    # A stopped trial's run ends when the trial did, not when the sweep closed it.
    client = MlflowClient()
    parent_id = json.loads(summary.read_text())["parent_run_id"]
    for trial in trials:
        run = client.get_run(trial["mlflow_run_id"])
        last_logged = max(m.timestamp for m in client.get_metric_history(run.info.run_id, "val/miou"))
        assert run.info.end_time <= last_logged + 5000
    assert client.get_run(parent_id).info.status == "FINISHED"


def _train(cluster, env, tiny_overrides, tmp_path, name: str, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", "train", *_sets(tiny_overrides + TINY_RUN + list(extra)),
                           "--storage", str(tmp_path / "runs"), "--name", name, "--experiment", name,
                           "--address", cluster.gcs],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def _failed_run(name: str):
    runs = mlflow.search_runs(experiment_names=[name], output_format="list")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.parametrize("held, waiting", [
    (1.7, r"placement group \w+ waits for 0\.4 CPU"),  # the data actors' reservation cannot be granted
    (1.3, r"placement group \w+ waits for 0\.5 CPU"),  # reserved 0.4 of the 0.7 left; the workers' 0.5 cannot be granted
], ids=["data-stream", "workers"])
def test_a_run_that_cannot_get_its_cpus_stops_with_an_error_naming_what_waits(cluster, env, tiny_overrides, tmp_path,
                                                                               held, waiting):
    with cpus_held_by_another_driver(cluster, held):
        proc = _train(cluster, env, tiny_overrides, tmp_path, "stalled", "train.stall_timeout_s=20")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert re.search(waiting, errors[0]) and "free 0.3 of 2 CPUs" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    run = _failed_run("stalled")
    assert run.info.status == "FAILED" and "waits for" in run.data.tags["failure_reason"]


def test_a_run_that_cannot_fit_the_cluster_is_refused_before_anything_starts(cluster, env, tiny_overrides, tmp_path):
    proc = _train(cluster, env, tiny_overrides, tmp_path, "too-big", "scaling.num_workers=2", "scaling.cpus_per_worker=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: scaling: one run needs 2.4 CPUs (2 worker(s) x scaling.cpus_per_worker 1 + 1 data actor(s) x "
        "scaling.data_cpus 0.4); the cluster has 2. Lower scaling.num_workers, scaling.cpus_per_worker or "
        "scaling.data_cpus, or add CPUs to the cluster")
    assert mlflow.search_runs(experiment_names=["too-big"], output_format="list") == []


def test_steps_between_log_lines_are_progress_but_print_nothing():
    """A slow machine's 500-step log interval can outlast the stall timeout: the workers' beats,
    not only their lines, keep the watch from calling a run that makes steps stalled."""
    from mkd_ray.console import Heartbeat, ProgressBoard

    board = ProgressBoard()
    time.sleep(0.2)
    assert board.drain()[1] >= 0.2
    board.beat()
    lines, idle = board.drain()
    assert lines == [] and idle < 0.2

    now = [0.0]
    sent = []
    beat = Heartbeat(lambda: sent.append(now[0]), every_s=10.0, clock=lambda: now[0])
    for now[0] in (1.0, 9.9, 10.0, 15.0, 20.5, 31.0):
        beat()
    assert sent == [10.0, 20.5, 31.0]  # at most one beat per 10 s, however many steps
