"""`run.py compare` on a prepared, real MLflow store: a sweep with trials, and a baseline experiment."""

import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from mkd_ray import cli
from mkd_ray.compare import compare
from mkd_ray.config import ConfigError
from mkd_ray.tracking import RUN_NAME_TAG

CLASSES = ["background", "disk", "square"]


def _run(client, experiment_id, name, params, miou_history, tags=()):
    run = client.create_run(experiment_id, run_name=name, tags={RUN_NAME_TAG: name, **dict(tags)})
    run_id = run.info.run_id
    params = {"data.class_names": str(CLASSES), "method.name": "mkd", **params}
    metrics = [Metric("val/miou", v, 0, step) for step, v in miou_history]
    final = miou_history[-1][1]
    metrics += [Metric(f"val/iou/{c}", final + 10 * i, 0, miou_history[-1][0]) for i, c in enumerate(CLASSES)]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id)
    return run_id


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    sweep_exp = client.create_experiment("sweeps")
    parent = client.create_run(sweep_exp, run_name="s1", tags={
        RUN_NAME_TAG: "s1", "mkd_ray.role": "sweep", "mkd_ray.searched": "method.tau_t,train.lr"}).info.run_id
    for i, (tau, lr, miou) in enumerate([(0.9, 0.002, 41.0), (0.7, 0.004, 35.0), (0.95, 0.001, 44.5)]):
        _run(client, sweep_exp, f"s1-t{i}", {"method.tau_t": tau, "train.lr": lr, "train.seed": 0},
             [(100, miou - 10), (200, miou)], tags={"mlflow.parentRunId": parent, "mkd_ray.role": "trial"})
    base_exp = client.create_experiment("baselines")
    _run(client, base_exp, "supervised", {"method.name": "supervised", "method.tau_t": 0.95, "train.lr": 0.002,
                                          "train.seed": 0}, [(200, 33.0)])
    return client, parent


def test_compare_a_sweep_ranks_its_trials_and_logs_plots_to_the_parent(store, tmp_path, capsys):
    client, parent = store
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--experiment", "sweeps", "--sweep", "s1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[1].split()[0] == "s1-t2" and lines[3].split()[0] == "s1-t1"  # ranked by val/miou
    assert "method.tau_t" in lines[0] and "train.lr" in lines[0]
    pngs = {"metric_vs_hyperparameters.png", "learning_curves.png", "class_iou_heatmap.png"}
    assert pngs <= {p.name for p in out.iterdir()} and all((out / p).stat().st_size > 5000 for p in pngs)
    logged = {a.path for a in client.list_artifacts(parent, "compare")}
    assert {f"compare/{p}" for p in pngs | {"runs.csv"}} <= logged
    assert list(pd.read_csv(out / "runs.csv")["val/miou"]) == [44.5, 41.0, 35.0]


def test_compare_across_experiments_finds_what_differs(store, tmp_path):
    result = compare(["sweeps", "baselines"], out=tmp_path / "cmp")
    assert list(result.table["run"]) == ["s1-t2", "s1-t0", "s1-t1", "supervised"]  # the sweep parent is left out
    assert {"method.name", "method.tau_t", "train.lr"} <= set(result.keys) and "train.seed" not in result.keys
    assert set(result.table["experiment"]) == {"sweeps", "baselines"}
    assert len(result.plots) == 3 and result.logged_to not in set(result.table["run_id"])


def test_compare_names_what_is_missing(store, tmp_path):
    with pytest.raises(ConfigError, match="no MLflow experiment named 'nope'"):
        compare(["nope"], out=tmp_path)
    with pytest.raises(ConfigError, match="metric 'val/acc'"):
        compare(["sweeps"], metric="val/acc", out=tmp_path)
    with pytest.raises(ConfigError, match="no sweep 's9'.*s1"):
        compare(["sweeps"], sweep="s9", out=tmp_path)


def test_experiments_open_in_the_model_training_view(tmp_path):
    from mkd_ray.config import ExperimentConfig
    from mkd_ray.tracking import EXPERIMENT_KIND_TAG, open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    older = client.create_experiment("made-before")  # as by an earlier version: no kind
    for experiment in ("fresh", "made-before"):
        open_run(ExperimentConfig(), experiment, "run", uri)
        assert client.get_experiment_by_name(experiment).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert client.get_experiment_by_name("made-before").experiment_id == older


def test_the_final_model_is_a_logged_model_that_eval_by_run_id_downloads(tmp_path):
    from mkd_ray.config import ExperimentConfig
    from mkd_ray.tracking import download_checkpoint, log_final_model, open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = open_run(ExperimentConfig(name="final"), "final", "run", uri)
    weights = tmp_path / "state.pt"
    weights.write_bytes(b"checkpoint bytes")
    model_id = log_final_model(logger, weights, ExperimentConfig(name="final"), step=30)
    client = MlflowClient(tracking_uri=uri)
    assert [(o.model_id, o.step) for o in client.get_run(logger.run_id).outputs.model_outputs] == [(model_id, 30)]
    assert str(client.get_logged_model(model_id).status) == "READY"
    assert download_checkpoint(logger.run_id, tmp_path / "down", uri).read_bytes() == b"checkpoint bytes"


def test_a_resumed_ssl_table_keeps_one_parent_run_and_logs_each_run_once(tmp_path, monkeypatch):
    """A table made over several invocations (one per group of rows) is one table in MLflow."""
    from tests.conftest import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from ssl_table import log_to_mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    def table_folder(name):
        folder = tmp_path / name
        folder.mkdir()
        for artifact in ("ssl_table.md", "ssl_table.json", "ssl_table.png"):
            (folder / artifact).write_text(artifact)
        return folder

    table = table_folder("table")

    def result(row, split, miou):
        return {"row": row, "split": split, "seed": 0, "iters": 10, "overrides": [], "miou": miou, "seconds": 1.0,
                "iou": [miou] * len(CLASSES)}

    first = [result("supervised", "1_16", 20.0), result("MKD", "1_16", 24.0)]
    parent = log_to_mlflow("tables", table, first, CLASSES, ["1_16"], [0])
    resumed = log_to_mlflow("tables", table, first + [result("MKD", "1_8", 30.0)], CLASSES, ["1_16", "1_8"], [0])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tables").experiment_id
    assert resumed == parent
    assert len(client.search_runs([experiment], "tags.`mkd_ray.role` = 'ssl_table'")) == 1
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.info.run_name for c in children) == ["1_16 MKD seed 0", "1_16 supervised seed 0", "1_8 MKD seed 0"]
    assert client.get_run(parent).data.tags["splits"] == "1_16,1_8"
    assert log_to_mlflow("tables", table_folder("other"), first, CLASSES, ["1_16"], [0]) != parent
