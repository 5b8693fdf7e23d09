"""scaling: MKD images/s of 2 workers on a 2-node local cluster (1 CPU per node, one worker
per node) against 1 worker on a 1-node cluster of 1 CPU, at the same per-worker batch.

    .venv/bin/python benchmarks/scaling.py [--repeats 3] [--iters 300] [--batch-scale 1 2] [--smoke]

Each run is `run.py train` on the default synthetic pipeline; its images/s is the rate over
the last third of the run (the last logging interval), after start-up and the data actors'
warm-up. Both clusters are real `ray start` processes (see mkd_ray/localcluster.py), each
node pinned to its own core, so a node of 1 CPU has one core for training and Ray Data's
decoding together, as a one-core machine would. (Unpinned, the one-node run borrows the
idle second core for decoding and the ratio says nothing about scaling.)

`ratio` is at the first `--batch-scale` (default 1: the default pipeline's per-worker batch,
8 labeled + 8 unlabeled images). More scales add larger per-worker batches, run interleaved,
to show how the ratio moves as the compute per step grows against the all-reduce of the
gradients, whose cost per step is fixed by the model.
"""

from __future__ import annotations

from _common import FULL_STEP, emit, harness_parser, median, train

from mkd_ray.localcluster import local_cluster

GOAL = 1.8
DEFAULT_BATCH = 8  # pipelines/synthetic.yaml: data.labeled_batch_size and data.unlabeled_batch_size
# One core per node: a worker keeps 0.6 CPU and one thread, its Ray Data actor takes the rest.
PER_NODE = ["scaling.cpus_per_worker=0.6", "scaling.data_cpus=0.4", "train.threads=1"]
TINY = ["model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32", "model.low_level_channels=16"]


def schedule(iters: int) -> list[str]:
    return [FULL_STEP, f"train.iters={iters}", f"train.log_interval={iters // 3}", f"train.eval_interval={iters}",
            f"train.checkpoint_interval={iters}"]


def per_worker_batch(scale: int) -> dict:
    return {"labeled": DEFAULT_BATCH * scale, "unlabeled": DEFAULT_BATCH * scale}


def images_per_s(nodes: int, overrides: list[str]) -> float:
    workers = [f"scaling.num_workers={nodes}"] + (["scaling.placement_strategy=STRICT_SPREAD"] if nodes > 1 else [])
    with local_cluster(nodes=nodes, cpus_per_node=1, pin_cores=True) as cluster:
        return train(overrides + workers, cluster.env, "--address", cluster.gcs)["train/images_per_s"]


def main() -> None:
    parser = harness_parser(__doc__)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--batch-scale", type=int, nargs="+", default=[1],
                        help="per-worker batches to measure, as multiples of the default; the first gives `ratio`")
    args = parser.parse_args()
    repeats, iters = (1, 9) if args.smoke else (args.repeats, args.iters)
    base = schedule(iters) + PER_NODE + (TINY if args.smoke else [])
    runs = {scale: {"one_node_one_worker": [], "two_nodes_two_workers": []} for scale in args.batch_scale}
    for _ in range(repeats):  # interleaved, so drifts in the host's speed hit every configuration
        for scale, measured in runs.items():
            batch = per_worker_batch(scale)
            overrides = base + [f"data.labeled_batch_size={batch['labeled']}", f"data.unlabeled_batch_size={batch['unlabeled']}"]
            measured["one_node_one_worker"].append(images_per_s(1, overrides))
            measured["two_nodes_two_workers"].append(images_per_s(2, overrides))
    by_batch = [{"per_worker_batch": per_worker_batch(scale), **measured,
                 "ratio": median(measured["two_nodes_two_workers"]) / median(measured["one_node_one_worker"])}
                for scale, measured in runs.items()]
    ratio = by_batch[0]["ratio"]
    emit({"name": "scaling", "ratio": ratio, "goal": GOAL, "meets_goal": ratio >= GOAL, "smoke": args.smoke,
          "unit": "images/s", **by_batch[0], "iters": iters, "by_batch": by_batch})


if __name__ == "__main__":
    main()
