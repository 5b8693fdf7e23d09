"""MLflow at the edge: one run per `train`, written through MlflowClient with explicit run ids.

The driver creates (or, for a resumed run name, reopens) the run and logs the config; rank 0
of the training workers logs metric histories and evaluation artifacts into it by id; the
driver closes it as FINISHED or FAILED. No global "active run" state is used anywhere.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml
from mlflow.entities import LoggedModelOutput, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mkd_ray.config import ExperimentConfig

RUN_NAME_TAG = "mkd_ray.run_name"
_BATCH = 100  # MLflow's limit on params per log_batch call


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the working directory (absolute, so every
    process of a local cluster writes to the same file)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names it."""


def store_client(uri: Optional[str] = None) -> MlflowClient:
    """A client of the store at `uri` (the tracking URI by default), opened now: a store this
    MLflow cannot use (an SQLite file of another schema version, say) is a TrackingError that
    names it, before any run starts, instead of MLflow's traceback at the first write."""
    uri = uri or tracking_uri()
    try:
        return MlflowClient(tracking_uri=uri)
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {uri} cannot be opened: {str(exc).splitlines()[0]} (a store written by "
                            "a newer MLflow needs that version; or set MLFLOW_TRACKING_URI to another store)") from None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


class RunLogger:
    """Logs into one MLflow run by id; cheap to create in any process."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if _finite(v)]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file)



def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def find_run(client: MlflowClient, experiment: str, run_name: str):
    """The run of `experiment` created under `run_name` (our tag, not MLflow's display name), or None."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    return runs[0] if runs else None


def reopen_or_create(client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str]):
    """(run id, created?) of the run named `run_name`, reopened as RUNNING if it exists."""
    existing = find_run(client, experiment, run_name)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id, False
    experiment_id = model_training_experiment(client, experiment)
    tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name, "git_commit": git_commit(), **tags}
    return client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id, True


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def model_training_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created if needed, marked as model training: MLflow 3's UI
    opens an experiment without a kind in its GenAI view (traces, evaluation runs)."""
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    return found.experiment_id


def open_run(cfg: ExperimentConfig, experiment: str, run_name: str, uri: Optional[str] = None,
             tags: Optional[dict[str, str]] = None) -> RunLogger:
    """The MLflow run for `run_name`: reopened if a run of that name exists (a resume), else new,
    with the flattened config as params and tags for commit, dataset, split and method (plus
    `tags`, e.g. `mlflow.parentRunId` for a sweep's trial)."""
    uri = uri or tracking_uri()
    client = store_client(uri)
    run_tags = {"dataset": cfg.data.dataset, "split": cfg.data.split, "method": cfg.method.name, **(tags or {})}
    run_id, created = reopen_or_create(client, experiment, run_name, run_tags)
    if not created:
        return RunLogger(uri, run_id)
    run = client.get_run(run_id)
    params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
    for i in range(0, len(params), _BATCH):
        client.log_batch(run.info.run_id, params=params[i : i + _BATCH])
    client.log_text(run.info.run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    return RunLogger(uri, run.info.run_id)


def close_run(logger: RunLogger, error: Optional[BaseException] = None) -> None:
    if error is None:
        logger.client.set_terminated(logger.run_id, RunStatus.to_string(RunStatus.FINISHED))
        return
    reason = f"{type(error).__name__}: {error}"[:5000]
    logger.client.log_batch(logger.run_id, tags=[RunTag("failure_reason", reason)])
    logger.client.set_terminated(logger.run_id, RunStatus.to_string(RunStatus.FAILED))


def iou_table(class_names: list[str], ious: list[float]) -> str:
    lines = ["class,iou"] + [f"{name},{iou:.4f}" for name, iou in zip(class_names, ious)]
    return "\n".join(lines) + "\n"


def overlay_grid(images: np.ndarray, preds: np.ndarray, masks: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Rows of (image | prediction | ground truth) for a few validation images, as uint8 HxWx3."""
    rows = []
    for image, pred, mask in zip(images, preds, masks):
        rows.append(np.concatenate([image.transpose(1, 2, 0), palette[pred], palette[mask]], axis=1))
    return np.concatenate(rows, axis=0)



MODEL_FILES = ("state.pt", "config.yaml")  # the checkpoint (weights-only loadable) and its config


MLFLOW_UI_PORT = 5000  # `mlflow ui`'s default


def ui_hint(run_id: str, uri: Optional[str] = None) -> str:
    """How to look at a run: the `mlflow ui` command for a local store (bound to 127.0.0.1),
    and the run's address in the model-training view (MLflow 3.17's UI opens experiments in
    its GenAI view unless the address asks for `workflowType=machine_learning`)."""
    uri = uri or tracking_uri()
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    page = f"#/experiments/{run.info.experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then open "
            f"http://127.0.0.1:{MLFLOW_UI_PORT}/{page}")


def log_final_model(logger: RunLogger, checkpoint_file: Path, cfg: ExperimentConfig, step: int) -> str:
    """The run's final weights as an MLflow logged model (MLflow 3's Models tab), linked to the
    run as its output at `step`: the checkpoint file and the config. The run holds its metrics
    (logging them again for the model would add a second point to the run's histories).
    Returns the model id."""
    client = logger.client
    run = client.get_run(logger.run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=cfg.name, source_run_id=logger.run_id, model_type="semantic-segmentation",
        tags={"dataset": cfg.data.dataset, "method": cfg.method.name, "backbone": cfg.model.backbone})
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(checkpoint_file, Path(tmp) / MODEL_FILES[0])
        (Path(tmp) / MODEL_FILES[1]).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(logger.run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def download_checkpoint(run_id: str, destination: Path, uri: Optional[str] = None) -> Path:
    """The final checkpoint of an MLflow run: its logged model's, or the `model/state.pt`
    artifact of a run recorded before runs logged models."""
    import mlflow.artifacts

    uri = uri or tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs else []
    source = (f"{client.get_logged_model(models[-1].model_id).artifact_location}/{MODEL_FILES[0]}" if models
              else f"runs:/{run_id}/model/state.pt")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination), tracking_uri=uri))
