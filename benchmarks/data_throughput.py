"""data_throughput: the Ray Data unlabeled pipeline (decode, weak view, strong view, CutMix
box, padding mask) against a torch DataLoader running the same transforms with the same
number of CPU processes, in images/s; and the data-wait share of step time in training.

    .venv/bin/python benchmarks/data_throughput.py [--repeats 3] [--images 8192] [--procs 2] [--smoke]

Both sides produce the same samples (draw g of the seeded stream; tests/test_ray_train.py
checks they are equal). Ray Data runs on a local cluster of `--procs` CPUs with a pool of
`--procs` augmenting actors of one CPU each; the DataLoader uses `--procs` worker processes.
The training figure is `train/data_wait_fraction` of a short `run.py train` (Ray Train,
1 worker, defaults), one per repeat.
"""

from __future__ import annotations

import time

from _common import FULL_STEP, REPO, emit, harness_parser, median, train

GOAL_RATIO, GOAL_WAIT = 1.0, 0.05


def torch_images_per_s(cfg, refs, images: int, procs: int) -> float:
    from mkd_ray.data.torch_data import endless_loader

    batch = cfg.data.unlabeled_batch_size
    loader = iter(endless_loader(refs, cfg, False, batch, workers=procs))
    next(loader)  # worker start-up is not throughput
    started = time.perf_counter()
    for _ in range(images // batch):
        next(loader)
    return (images // batch) * batch / (time.perf_counter() - started)


def ray_images_per_s(cfg, refs, images: int, procs: int) -> float:
    from mkd_ray.data.ray_data import unlabeled_dataset

    batch = cfg.data.unlabeled_batch_size
    stream = unlabeled_dataset(cfg, refs, 0, images + batch, actors=procs)
    batches = iter(stream.iter_torch_batches(batch_size=batch, drop_last=True))
    next(batches)
    started = time.perf_counter()
    for _ in range(images // batch):
        next(batches)
    return (images // batch) * batch / (time.perf_counter() - started)


def main() -> None:
    parser = harness_parser(__doc__)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args()
    import ray

    from mkd_ray.config import load_config
    from mkd_ray.data.sources import ensure_synthetic, resolve_data

    root = f"data.root={REPO / 'data' / 'synthetic'}"
    cfg = load_config(REPO / "pipelines" / "synthetic.yaml", [root, "scaling.data_cpus=1"])
    ensure_synthetic(cfg)
    refs = resolve_data(cfg).unlabeled
    repeats, images = (1, 64) if args.smoke else (args.repeats, args.images)
    ray.init(num_cpus=args.procs, _node_ip_address="127.0.0.1", include_dashboard=False)
    loader, ray_data = [], []
    for _ in range(repeats):
        loader.append(torch_images_per_s(cfg, refs, images, args.procs))
        ray_data.append(ray_images_per_s(cfg, refs, images, args.procs))
    ray.shutdown()
    iters = 20 if args.smoke else 300
    schedule = [root, FULL_STEP, f"train.iters={iters}", f"train.log_interval={iters // 2}", f"train.eval_interval={iters}",
                f"train.checkpoint_interval={iters}"]
    waits = [train(schedule, {}, "--experiment", "data-throughput")["train/data_wait_fraction"] for _ in range(repeats)]
    ratio, wait = median(ray_data) / median(loader), median(waits)
    emit({"name": "data_throughput", "ratio": ratio, "goal": GOAL_RATIO, "meets_goal": ratio >= GOAL_RATIO and wait <= GOAL_WAIT,
          "smoke": args.smoke, "unit": "images/s", "ray_data": ray_data, "torch_dataloader": loader, "procs": args.procs,
          "images": images, "train_data_wait_fraction": wait, "train_data_wait_fractions": waits, "wait_goal": GOAL_WAIT})


if __name__ == "__main__":
    main()
