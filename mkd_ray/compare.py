"""Compare runs in MLflow: a ranked table and plots, from mlflow.search_runs.

Works on one experiment (e.g. a sweep's trials), across experiments (MKD against its
baselines), or on one sweep's children (`sweep`: the parent's run id or name). The plots
are saved under `out` and logged to the sweep's parent run, or else to a new `compare` run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from mkd_ray.config import ConfigError
from mkd_ray.tracking import RUN_NAME_TAG, store_client, tracking_uri

ROLE, SEARCHED, PARENT = "tags.mkd_ray.role", "tags.mkd_ray.searched", "tags.mlflow.parentRunId"
# Params that differ between runs without being hyperparameters.
_NOT_HYPERPARAMETERS = ("name", "data.root", "data.splits_dir", "model.pretrained")
_MAX_KEY_COLUMNS = 8


@dataclass
class Comparison:
    table: pd.DataFrame  # ranked runs: name, experiment, status, metric, key hyperparameters
    keys: list[str]  # the hyperparameters shown (searched ones first)
    plots: list[Path] = field(default_factory=list)
    logged_to: Optional[str] = None  # the MLflow run holding the plots


def compare(experiments: list[str], metric: str = "val/miou", out: Path = Path("compare"), sweep: Optional[str] = None,
            top: int = 5, uri: Optional[str] = None) -> Comparison:
    uri = uri or tracking_uri()
    client = store_client(uri)
    mlflow.set_tracking_uri(uri)
    runs = _search(client, experiments)
    parent = _sweep_parent(runs, sweep) if sweep else None
    if parent is not None:
        runs = runs[runs.get(PARENT) == parent["run_id"]]
    else:
        runs = runs[runs.get(ROLE, pd.Series(index=runs.index, dtype=object)) != "sweep"]
    column = f"metrics.{metric}"
    if column not in runs or runs[column].isna().all():
        raise ConfigError("--metric", f"no run of {', '.join(experiments)} has the metric {metric!r}")
    runs = runs.dropna(subset=[column]).sort_values(column, ascending=False)
    keys = _key_hyperparameters(runs, parent)
    table = pd.DataFrame({
        "run": runs.get(f"tags.{RUN_NAME_TAG}", runs.get("tags.mlflow.runName")),
        "experiment": runs["experiment_id"].map(lambda e: client.get_experiment(e).name),
        "status": runs["status"],
        "method": runs.get("params.method.name"),
        metric: runs[column],
        **{key: _numbers_if_possible(runs[f"params.{key}"]) for key in keys},
        "run_id": runs["run_id"],
    }).reset_index(drop=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "runs.csv", index=False)
    result = Comparison(table, keys)
    result.plots = [
        _plot_metric_vs_keys(table, keys, metric, out / "metric_vs_hyperparameters.png"),
        _plot_learning_curves(client, table.head(top), metric, out / "learning_curves.png"),
        _plot_class_iou(runs.head(top), table.head(top), out / "class_iou_heatmap.png"),
    ]
    result.plots = [p for p in result.plots if p is not None]
    result.logged_to = _log(client, result, out, parent, runs)
    return result


def _search(client: MlflowClient, experiments: list[str]) -> pd.DataFrame:
    missing = [name for name in experiments if client.get_experiment_by_name(name) is None]
    if missing:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise ConfigError("--experiment", f"no MLflow experiment named {missing[0]!r} (experiments: {known})")
    runs = mlflow.search_runs(experiment_names=experiments)
    if runs.empty:
        raise ConfigError("--experiment", f"{', '.join(experiments)} holds no runs")
    return runs


def _sweep_parent(runs: pd.DataFrame, sweep: str) -> pd.Series:
    parents = runs[runs.get(ROLE) == "sweep"] if ROLE in runs else runs.iloc[0:0]
    match = parents[(parents["run_id"] == sweep) | (parents.get(f"tags.{RUN_NAME_TAG}") == sweep)]
    if match.empty:
        names = ", ".join(parents.get(f"tags.{RUN_NAME_TAG}", pd.Series(dtype=str)).dropna()) or "none"
        raise ConfigError("--sweep", f"no sweep {sweep!r} in these experiments (sweeps: {names})")
    return match.iloc[0]


def _key_hyperparameters(runs: pd.DataFrame, parent: Optional[pd.Series]) -> list[str]:
    """The sweep's searched keys, then the other params that differ between the runs."""
    searched: list[str] = []
    sources = [parent] if parent is not None else []
    for value in [s.get(SEARCHED) for s in sources]:
        searched += [k for k in str(value).split(",") if k]
    varying = []
    for column in sorted(c for c in runs.columns if c.startswith("params.")):
        key = column[len("params."):]
        if key in searched or key in _NOT_HYPERPARAMETERS:
            continue
        if runs[column].nunique(dropna=False) > 1:
            varying.append(key)
    return [k for k in searched if f"params.{k}" in runs] + varying[: max(0, _MAX_KEY_COLUMNS - len(searched))]


def _numeric(values: pd.Series) -> Optional[pd.Series]:
    converted = pd.to_numeric(values, errors="coerce")
    return converted if converted.notna().all() else None


def _numbers_if_possible(values: pd.Series) -> pd.Series:
    """MLflow params are text; numeric ones become numbers (for sorting and formatting)."""
    numeric = _numeric(values)
    return values if numeric is None else numeric


def _plot_metric_vs_keys(table: pd.DataFrame, keys: list[str], metric: str, path: Path) -> Optional[Path]:
    if not keys:
        return None
    cols = min(len(keys), 3)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        x = _numeric(table[key])
        if x is None:  # categorical: one column of points per value
            categories = sorted(table[key].astype(str).unique())
            x = table[key].astype(str).map({c: i for i, c in enumerate(categories)})
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        elif x.min() > 0 and x.max() / x.min() > 20:
            ax.set_xscale("log")
        ax.scatter(x, table[metric], s=28, alpha=0.8)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"{metric} against each hyperparameter ({len(table)} runs)")
    return _save(fig, path)


def _plot_learning_curves(client: MlflowClient, top: pd.DataFrame, metric: str, path: Path) -> Optional[Path]:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = 0
    for _, row in top.iterrows():
        history = sorted(client.get_metric_history(row["run_id"], metric), key=lambda m: m.step)
        if history:
            ax.plot([m.step for m in history], [m.value for m in history], marker="o", ms=3, label=str(row["run"])[:40])
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"learning curves of the top {drawn} runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_class_iou(runs: pd.DataFrame, top: pd.DataFrame, path: Path) -> Optional[Path]:
    columns = [c for c in runs.columns if c.startswith("metrics.val/iou/")]
    if not columns:
        return None
    order = _class_order(runs)
    columns.sort(key=lambda c: order.get(c[len("metrics.val/iou/"):], len(order)))
    values = runs[columns].to_numpy(dtype=float)
    classes = [c[len("metrics.val/iou/"):] for c in columns]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 1.2 + 0.45 * len(runs)))
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=40, ha="right")
    ax.set_yticks(range(len(runs)), [str(r)[:40] for r in top["run"]])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
    fig.colorbar(image, ax=ax, label="IoU (%)")
    ax.set_title("per-class IoU of the top runs (last evaluation)")
    return _save(fig, path)


def _class_order(runs: pd.DataFrame) -> dict[str, int]:
    """Class name -> its id, from the runs' `data.class_names` param (the config's order)."""
    names = runs.get("params.data.class_names", pd.Series(dtype=object)).dropna()
    try:
        parsed = yaml.safe_load(names.iloc[0]) if len(names) else None
    except yaml.YAMLError:
        parsed = None
    return {str(n): i for i, n in enumerate(parsed)} if isinstance(parsed, list) else {}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log(client: MlflowClient, result: Comparison, out: Path, parent: Optional[pd.Series], runs: pd.DataFrame) -> str:
    """Plots and table go to the sweep's parent run, or to a new `compare` run."""
    if parent is not None:
        run_id = parent["run_id"]
    else:
        experiment_id = runs["experiment_id"].iloc[0]
        name = f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = client.create_run(experiment_id, run_name=name, tags={"mkd_ray.role": "compare"}).info.run_id
    for path in [*result.plots, out / "runs.csv"]:
        client.log_artifact(run_id, str(path), "compare")
    if parent is None:
        client.set_terminated(run_id)
    return run_id
