"""tune_efficiency: an ASHA sweep against the same trials run to completion (FIFO): the
trial-iterations each used, and whether ASHA picks a configuration that is as good (within
1 val mIoU of the best, as judged by the run-to-completion sweep).

    .venv/bin/python benchmarks/tune_efficiency.py [--space tune_spaces/synthetic.yaml] [--smoke]

Both sweeps sample the same configurations (random search, same seed). ratio = ASHA's
trial-iterations / FIFO's. A full run takes about 45 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, emit, sets

SMOKE = ["train.iters=8", "train.eval_interval=4", "train.checkpoint_interval=4", "train.log_interval=4",
         "model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32", "tune.num_samples=2",
         "tune.grace_period=4", "data.synth.num_train=128", "data.synth.num_val=32", "data.synth.splits=['1_8']"]


def sweep(space: str, overrides: list[str], tmp: Path, name: str) -> dict:
    summary = tmp / f"{name}.json"
    command = [sys.executable, "run.py", "tune", "--space", space, *sets(overrides), "--name", name,
               "--storage", str(tmp / "runs"), "--experiment", name, "--summary", str(summary)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default="tune_spaces/synthetic.yaml")
    parser.add_argument("--smoke", action="store_true", help="a tiny sweep pair, to check the harness runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        extra = SMOKE + [f"data.root={tmp}/data"] if args.smoke else []
        asha = sweep(args.space, extra + ["tune.scheduler=asha"], Path(tmp), "asha")
        fifo = sweep(args.space, extra + ["tune.scheduler=fifo"], Path(tmp), "fifo")
    metric = "best val/miou"
    searched = [k for k in asha["trials"][0] if "." in k]  # dotted config keys are the sampled values
    fifo_by_config = {tuple(t[k] for k in searched): t for t in fifo["trials"]}
    asha_pick = tuple(asha["trials"][0][k] for k in searched)
    fifo_best = fifo["trials"][0][metric]
    pick_in_fifo = fifo_by_config.get(asha_pick, {}).get(metric)
    used = {name: sum(t["steps"] for t in s["trials"]) for name, s in (("asha", asha), ("fifo", fifo))}
    emit({"name": "tune_efficiency", "ratio": used["asha"] / used["fifo"], "goal": None, "smoke": args.smoke,
          "trial_iterations": used, "seconds": {"asha": asha["seconds"], "fifo": fifo["seconds"]},
          "fifo_best_miou": fifo_best, "asha_pick_miou_when_run_to_completion": pick_in_fifo,
          "same_best_within_1_miou": pick_in_fifo is not None and fifo_best - pick_in_fifo <= 1.0,
          "asha_pick": dict(zip(searched, asha_pick))})


if __name__ == "__main__":
    main()
