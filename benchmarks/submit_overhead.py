"""submit_overhead: seconds from `run.py submit` to the job's first training step, against
the same training started directly on the cluster (`run.py train --address`).

    .venv/bin/python benchmarks/submit_overhead.py [--repeats 3] [--smoke]

Both run the default synthetic pipeline on a local 1-node cluster (2 CPUs, real `ray start`
with the job server) and log every step; the clock stops at the first "step 1/" line. The
job's share is the upload of the project, the job driver's start and its connection.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from _common import REPO, emit, harness_parser, median, sets

from mkd_ray.localcluster import local_cluster

SHORT = ["train.iters=2", "train.log_interval=1", "train.eval_interval=2", "train.checkpoint_interval=2",
         "scaling.cpus_per_worker=1", "scaling.data_cpus=0.5"]


def seconds_to_first_step(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, output = None, []
    for line in proc.stdout:
        output.append(line)
        if first is None and "step 1/" in line:
            first = time.perf_counter() - started
    if proc.wait() != 0 or first is None:
        tail = "".join(output[-40:])
        raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}) or logged no step; its output ended:\n{tail}")
    return first


def main() -> None:
    parser = harness_parser(__doc__)
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    direct, submitted = [], []
    # Its own store and run folder (a fixed path in /tmp outlived the MLflow that wrote it),
    # unless the caller names a store, as the smoke run does.
    with local_cluster(nodes=1, cpus_per_node=2) as cluster, tempfile.TemporaryDirectory() as tmp:
        store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp}/mlflow.db"
        env = {**cluster.env, "MLFLOW_TRACKING_URI": store}
        train = ["train", *sets(SHORT), "--storage", f"{tmp}/runs"]
        for _ in range(repeats):
            direct.append(seconds_to_first_step([sys.executable, "run.py", *train, "--address", cluster.gcs], env))
            submitted.append(seconds_to_first_step(
                [sys.executable, "run.py", "submit", "--address", cluster.jobs, "--", *train], env))
    emit({"name": "submit_overhead", "ratio": median(submitted) / median(direct), "goal": None,
          "overhead_s": median(submitted) - median(direct), "smoke": args.smoke, "unit": "s to first step",
          "submit_to_first_step_s": submitted, "direct_train_to_first_step_s": direct})


if __name__ == "__main__":
    main()
