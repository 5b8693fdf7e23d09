"""Training runs for the harnesses that measure learning (ssl_table, benchmark_validity):
`run.py train --local` in subprocesses, several at a time, each result (and its console, as
`<run>.log`) kept on disk so an interrupted harness resumes where it stopped, and tables of
mean +- std over seeds."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from _common import FULL_STEP, REPO, sets

if TYPE_CHECKING:
    from mkd_ray.config import ExperimentConfig

# A tiny network and dataset: the harnesses' --smoke mode checks that they work, not numbers.
SMOKE = ["train.iters=6", "method.rampup_iters=2", FULL_STEP, "model.width=0.25", "model.aspp_channels=16",
         "model.decoder_channels=16", "model.low_level_channels=8", "data.synth.num_train=64",
         "data.synth.num_val=16", "data.synth.splits=['1_16','1_8']", "data.val_batch_size=16"]
# One student learning from the unlabeled images' ground truth through the pipeline's views
# and CutMix, at full weight from the first step: perfect targets need no ramp.
ORACLE = ["method.name=oracle", "method.lambda_st=1", "method.rampup_iters=0", "method.warmup_iters=0"]


@dataclass(frozen=True)
class Run:
    row: str
    split: str
    seed: int
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.split}-{re.sub(r'[^A-Za-z0-9]+', '_', self.row).strip('_')}-s{self.seed}"


def add_run_options(parser: argparse.ArgumentParser, experiment: str) -> None:
    parser.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "synthetic.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the pipeline for every run (repeatable)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--experiment", default=experiment, help="MLflow experiment of the runs")


def execute(run: Run, base: list[str], args, out: Path) -> dict:
    """One `run.py train --local`, unless its result is already on disk."""
    result_file = out / "runs" / f"{run.key}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    overrides = [*base, f"data.split={run.split}", f"train.seed={run.seed}", f"train.threads={args.threads}",
                 *run.overrides]
    command = [sys.executable, "run.py", "train", "--local", "--pipeline", str(args.pipeline), *sets(overrides),
               "--name", run.key, "--storage", str(out / "checkpoints"), "--experiment", args.experiment,
               "--summary", str(result_file.with_suffix(".tmp"))]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    # The run's console (progress lines: losses, pseudo-label accuracy, kept ratio) beside its result.
    result_file.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.key} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads(result_file.with_suffix(".tmp").read_text())
    result = {"row": run.row, "split": run.split, "seed": run.seed, "overrides": list(run.overrides),
              "miou": summary["val/miou"], "iou": summary["val/iou"], "seconds": summary["seconds"],
              "iters": summary["step"], "wall_s": time.monotonic() - started}
    result_file.write_text(json.dumps(result, indent=2))
    result_file.with_suffix(".tmp").unlink()
    print(f"{run.key}: {result['miou']:.2f} mIoU in {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    return result


def recorded(out: Path) -> list[dict]:
    """Every finished run in `out`, whichever invocation ran it."""
    return [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]


def run_all(runs: list[Run], base: list[str], args, out: Path) -> dict[str, dict]:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        results = list(pool.map(lambda r: execute(r, base, args, out), runs))
    return {run.key: result for run, result in zip(runs, results)}


def prepared_base(args, out: Path) -> tuple[list[str], ExperimentConfig]:
    """The overrides every run shares, and the pipeline's config: the dataset is generated
    once here, before runs start side by side; evaluation and checkpoint at the end only."""
    from mkd_ray.config import load_config
    from mkd_ray.data.sources import ensure_synthetic
    from mkd_ray.models.pretrain import with_source_backbone

    base = list(args.overrides)
    if args.smoke:
        base = SMOKE + [f"data.root={out / 'data'}"] + base
    cfg = load_config(args.pipeline, base)
    ensure_synthetic(cfg, log=lambda *_: None)
    # Pre-trained once here, if the runs ask for it, not by each run at once.
    pin_weights(out, with_source_backbone(cfg).model.pretrained)
    return base + [f"train.eval_interval={cfg.train.iters}", f"train.checkpoint_interval={cfg.train.iters}"], cfg


def pin_weights(out: Path, weights: str | None) -> None:
    """Every run in `out` starts from the same initial weights. The first call records the
    weights file's digest in out/weights.json; a later call with other weights stops before any
    run. Pre-training is deterministic on one kind of CPU only: elsewhere `model.pretrained=source`
    yields other weights under the same cache name, which must not join an existing table."""
    if weights in (None, "imagenet"):  # random initialisation; torchvision's published file
        return
    path = Path(weights).resolve()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    record = out / "weights.json"
    if not record.is_file():
        shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        record.write_text(json.dumps({"path": str(shown), "sha256": digest}, indent=2) + "\n")
        return
    pinned = json.loads(record.read_text())
    if pinned["sha256"] is None:  # a table whose weights were not kept
        raise SystemExit(f"the runs in {out} started from weights that were not kept ({pinned['note']}; "
                         f"{record}); start a new table with another --out")
    if pinned["sha256"] != digest:
        raise SystemExit(f"model.pretrained: {path} (sha256 {digest[:12]}) is not the weights the runs in {out} "
                         f"started from ({pinned['path']}, sha256 {pinned['sha256'][:12]}, recorded in {record}); "
                         f"pass --set model.pretrained={pinned['path']}, or another --out for a new table")


def summary(results: list[dict], row: str, split: str) -> dict:
    """Mean and sample standard deviation of a row's val mIoU over its seeds."""
    values = [r["miou"] for r in results if r["row"] == row and r["split"] == split]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"split": split, "row": row, "mean": statistics.mean(values), "std": std, "seeds": len(values)}


def paired(results: list[dict], row: str, reference: str, split: str, reference_split: str | None = None) -> dict:
    """Per-seed differences `row` on `split` - `reference` on `reference_split` (default the
    same split): mean, sample std and the values."""
    def by_seed(name: str, on: str) -> dict[int, float]:
        return {r["seed"]: r["miou"] for r in results if r["row"] == name and r["split"] == on}

    a, b = by_seed(row, split), by_seed(reference, reference_split or split)
    deltas = [a[seed] - b[seed] for seed in sorted(a) if seed in b]
    std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return {"mean": statistics.mean(deltas), "std": std, "values": deltas}
