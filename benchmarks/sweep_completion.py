"""Sweeps run to completion under the ordering that used to deadlock (issue 22).

A two-CPU local cluster; another driver holds 0.5 CPU for the whole sweep (as a finished
trial's worker placement group did); a sweep of 3 tiny trials, 2 at a time, must finish.
Before the fix, both trials' drivers and workers took 1.2 CPUs and neither 0.4-CPU data
actor could start. `--repo` measures another checkout (e.g. a worktree of an older commit):
its `run.py tune` is run the same way, and a sweep that has not finished by `--timeout` counts
as hung.

    .venv/bin/python benchmarks/sweep_completion.py [--repeats 5] [--repo PATH] [--timeout 300]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from _common import FULL_STEP, REPO, emit, harness_parser, sets

from mkd_ray.localcluster import cpus_held_by_another_driver, local_cluster

TINY = ["model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32", "model.low_level_channels=16",
        "data.synth.num_train=128", "data.synth.num_val=32", "data.synth.splits=['1_8']", "data.split=1_8",
        "train.iters=8", "train.eval_interval=4", "train.checkpoint_interval=4", "train.log_interval=4",
        "method.rampup_iters=4", FULL_STEP, "scaling.cpus_per_worker=0.5", "scaling.data_cpus=0.4",
        "train.threads=1"]


def one_sweep(repo: Path, cluster, tmp: Path, timeout: float) -> dict:
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": str(repo / "pipelines" / "synthetic.yaml"), "space": {"method.tau_t": {"uniform": [0.8, 0.95]}},
        "tune": {"scheduler": "asha", "grace_period": 4, "num_samples": 3, "max_concurrent_trials": 2}}))
    command = [sys.executable, "run.py", "tune", "--space", str(space), *sets(TINY + [f"data.root={tmp / 'data'}"]),
               "--storage", str(tmp / "runs"), "--address", cluster.gcs]
    env = {**cluster.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
    started = time.monotonic()
    try:
        proc = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=timeout, env=env)
        outcome = "completed" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        outcome = f"no end after {timeout:g} s"
    return {"outcome": outcome, "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    parser = harness_parser(__doc__, repeats=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose run.py to measure")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds after which a sweep counts as hung")
    parser.add_argument("--held", type=float, default=0.5, help="CPUs another driver holds during each sweep")
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="sweep-completion") as tmp, \
                local_cluster(nodes=1, cpus_per_node=2) as cluster, cpus_held_by_another_driver(cluster, args.held):
            runs.append(one_sweep(args.repo.resolve(), cluster, Path(tmp), args.timeout))
    completed = sum(r["outcome"] == "completed" for r in runs)
    emit({"name": "sweep_completion", "ratio": completed / len(runs), "goal": 1.0, "meets_goal": completed == len(runs),
          "smoke": args.smoke, "completed": completed, "started": len(runs), "held_cpus": args.held,
          "repo": str(args.repo), "runs": runs})


if __name__ == "__main__":
    main()
