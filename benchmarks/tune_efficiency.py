"""tune_efficiency: an ASHA sweep against the same trials run to completion (FIFO): the
trial-iterations each used, and whether ASHA picks a configuration that is as good (within
1 val mIoU of the best, as judged by the run-to-completion sweep).

    .venv/bin/python benchmarks/tune_efficiency.py [--space tune_spaces/synthetic-quick.yaml] [--repeats 1] [--seed 0] [--smoke]

Both sweeps of a pair sample the same configurations (random search, same tune.seed). A
pair is deterministic (two runs with one seed gave the same trials, scores and picks), so
each repeat samples new configurations: repeat k uses tune.seed = --seed + k. ratio = ASHA's
trial-iterations / FIFO's, the median over the pairs; `same_best_within_1_miou` counts the
pairs in which it held. A pair takes about 25 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import REPO, emit, harness_parser, median, sets

SMOKE = ["train.iters=8", "train.eval_interval=4", "train.checkpoint_interval=4", "train.log_interval=4",
         "model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32", "tune.num_samples=2",
         "tune.grace_period=4", "data.synth.num_train=128", "data.synth.num_val=32", "data.synth.splits=['1_8']",
         "model.pretrained=null"]  # smoke checks the harness, not the weights: no source pre-training


def sweep(space: str, overrides: list[str], tmp: Path, name: str) -> dict:
    summary = tmp / f"{name}.json"
    command = [sys.executable, "run.py", "tune", "--space", space, *sets(overrides), "--name", name,
               "--storage", str(tmp / "runs"), "--experiment", name, "--summary", str(summary)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(summary.read_text())


def compare(space: str, extra: list[str]) -> dict:
    """One ASHA sweep and one FIFO sweep of the same sampled configurations."""
    with tempfile.TemporaryDirectory() as tmp:
        asha = sweep(space, extra + ["tune.scheduler=asha"], Path(tmp), "asha")
        fifo = sweep(space, extra + ["tune.scheduler=fifo"], Path(tmp), "fifo")
    metric = "last val/miou"  # the sweep ranks trials by it
    searched = [k for k in asha["trials"][0] if "." in k]  # dotted config keys are the sampled values
    fifo_by_config = {tuple(t[k] for k in searched): t for t in fifo["trials"]}
    asha_pick = tuple(asha["trials"][0][k] for k in searched)
    fifo_best = fifo["trials"][0][metric]
    pick_in_fifo = fifo_by_config.get(asha_pick, {}).get(metric)
    used = {name: sum(t["steps"] for t in s["trials"]) for name, s in (("asha", asha), ("fifo", fifo))}
    return {"ratio": used["asha"] / used["fifo"], "trial_iterations": used,
            "seconds": {"asha": asha["seconds"], "fifo": fifo["seconds"]},
            "fifo_best_miou": fifo_best, "asha_pick_miou_when_run_to_completion": pick_in_fifo,
            "same_best_within_1_miou": pick_in_fifo is not None and fifo_best - pick_in_fifo <= 1.0,
            "asha_pick": dict(zip(searched, asha_pick))}


def main() -> None:
    parser = harness_parser(__doc__, repeats=1)
    parser.add_argument("--space", default="tune_spaces/synthetic-quick.yaml")
    parser.add_argument("--seed", type=int, default=0, help="tune.seed of the first pair; repeat k uses seed + k")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        extra = SMOKE + [f"data.root={data}/data"] if args.smoke else []
        seeds = [args.seed + k for k in range(1 if args.smoke else args.repeats)]
        runs = [compare(args.space, extra + [f"tune.seed={seed}"]) | {"tune_seed": seed} for seed in seeds]
    emit({"name": "tune_efficiency", "ratio": median([r["ratio"] for r in runs]), "goal": None, "smoke": args.smoke,
          "same_best_within_1_miou": sum(r["same_best_within_1_miou"] for r in runs), "repeats": len(runs),
          "runs": runs})


if __name__ == "__main__":
    main()
