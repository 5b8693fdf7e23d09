"""step_overhead: MKD iterations/s inside a Ray Train worker (1 worker) divided by the same
step function in this process, on the same in-memory batches with the same threads.

    .venv/bin/python benchmarks/step_overhead.py [--repeats 3] [--steps 60] [--threads 1] [--smoke]

What it isolates is Ray Train's share of a step (the worker process, its session and a
`ray.train.report` every `train.log_interval` steps, as the real loop does); data loading is
out of the picture because both sides cycle the same pre-built batches. The default thread
count, 1, is what a 1-CPU worker runs unless told otherwise; with as many threads as cores
(`--threads 2`, as the default pipeline asks for) the ratio is lower, most likely because
Ray's own processes take their CPU from the step (see the README).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _common import FULL_STEP, REPO, emit, harness_parser, median

GOAL = 0.95
WARMUP = 5


def _batches(cfg, count: int) -> list:
    """`count` training batches of the default pipeline, decoded and augmented once."""
    from mkd_ray.data.sources import ensure_synthetic, resolve_data
    from mkd_ray.data.torch_data import training_streams

    ensure_synthetic(cfg)
    data = resolve_data(cfg)
    labeled, unlabeled = training_streams(data.labeled, data.unlabeled, cfg)
    return [(next(labeled), next(unlabeled)) for _ in range(count)]


def iterations_per_s(cfg_tree: dict, batches: list, steps: int, threads: int, report_every: int = 0) -> float:
    """The timed loop both sides run: train_step over the batches, cycling."""
    import torch

    from mkd_ray.config import config_from_dict
    from mkd_ray.engine import build_method, configure_threads, to_batch
    from mkd_ray.method import build_optimizer, train_step

    cfg = config_from_dict({**cfg_tree, "train": {**cfg_tree["train"], "threads": threads}})
    method = build_method(cfg)
    method.train()
    configure_threads(cfg, method, torch.device("cpu"))  # as the training loop does
    optimizer, scheduler = build_optimizer(method, cfg.train)
    prepared = [to_batch(l, u, cfg, torch.device("cpu")) for l, u in batches]
    report = None
    if report_every:
        import ray.train

        report = ray.train.report
    for step in range(WARMUP + steps):
        if step == WARMUP:
            started = time.perf_counter()
        out = train_step(method, optimizer, scheduler, prepared[step % len(prepared)])
        if report and (step + 1) % report_every == 0:
            report({"step": step + 1, "loss": out.metrics["loss"].item()})
    return steps / (time.perf_counter() - started)


def _worker(config: dict) -> None:
    import ray.train

    rate = iterations_per_s(config["cfg"], config["batches"], config["steps"], config["threads"], config["report_every"])
    with tempfile.TemporaryDirectory() as tmp:  # only reports with a checkpoint reach Result.metrics
        Path(tmp, "rate.json").write_text(json.dumps({"rate": rate}))
        ray.train.report({"rate": rate}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def on_ray_train(cfg, batches: list, steps: int, threads: int) -> float:
    import ray.train
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"cfg": cfg.to_dict(), "batches": batches, "steps": steps, "threads": threads,
                               "report_every": cfg.train.log_interval},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(storage_path=storage, name="step_overhead"),
        )
        return trainer.fit().metrics["rate"]


def main() -> None:
    parser = harness_parser(__doc__)
    parser.add_argument("--steps", type=int, default=60)
    # A 1-CPU worker: Ray sets OMP_NUM_THREADS=1, and torch runs 1 thread unless train.threads says more.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from mkd_ray.config import load_config
    from mkd_ray.train.trainer import connect

    overrides = [f"data.root={REPO / 'data' / 'synthetic'}", FULL_STEP, "train.log_interval=25"]
    if args.smoke:
        overrides += ["model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32"]
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", overrides)
    repeats, steps = (1, 4) if args.smoke else (args.repeats, args.steps)
    batches = _batches(cfg, 4)
    connect()  # a local cluster on 127.0.0.1, as `run.py train` starts it
    local, remote = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both sides
        local.append(iterations_per_s(cfg.to_dict(), batches, steps, args.threads))
        remote.append(on_ray_train(cfg, batches, steps, args.threads))
    ratio = median(remote) / median(local)
    emit({"name": "step_overhead", "ratio": ratio, "goal": GOAL, "meets_goal": ratio >= GOAL, "smoke": args.smoke,
          "unit": "iterations/s", "single_process": local, "ray_train_1_worker": remote, "steps": steps,
          "threads": args.threads})


if __name__ == "__main__":
    main()
