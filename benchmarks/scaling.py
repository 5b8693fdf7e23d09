"""scaling: MKD images/s of 2 workers on a 2-node local cluster (1 CPU per node, one worker
per node) against 1 worker on a 1-node cluster of 1 CPU, at the same per-worker batch.

    .venv/bin/python benchmarks/scaling.py [--repeats 3] [--iters 300] [--smoke]

Each run is `run.py train` on the default synthetic pipeline; its images/s is the rate over
the last third of the run (the last logging interval), after start-up and the data actors'
warm-up. Both clusters are real `ray start` processes (see mkd_ray/localcluster.py), each
node pinned to its own core, so a node of 1 CPU has one core for training and Ray Data's
decoding together, as a one-core machine would. (Unpinned, the one-node run borrows the
idle second core for decoding and the ratio says nothing about scaling.)
"""

from __future__ import annotations


from _common import emit, harness_parser, median, train

from mkd_ray.localcluster import local_cluster

GOAL = 1.8
# One core per node: a worker keeps 0.6 CPU and one thread, its Ray Data actor takes the rest.
PER_NODE = ["scaling.cpus_per_worker=0.6", "scaling.data_cpus=0.4", "train.threads=1"]
TINY = ["model.width=0.25", "model.aspp_channels=32", "model.decoder_channels=32", "model.low_level_channels=16"]


def schedule(iters: int) -> list[str]:
    return [f"train.iters={iters}", f"train.log_interval={iters // 3}", f"train.eval_interval={iters}",
            f"train.checkpoint_interval={iters}"]


def main() -> None:
    parser = harness_parser(__doc__)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    repeats, iters = (1, 9) if args.smoke else (args.repeats, args.iters)
    base = schedule(iters) + PER_NODE + (TINY if args.smoke else [])
    one, two = [], []
    for _ in range(repeats):
        with local_cluster(nodes=1, cpus_per_node=1, pin_cores=True) as cluster:
            one.append(train(base + ["scaling.num_workers=1"], cluster.env, "--address", cluster.gcs)["train/images_per_s"])
        with local_cluster(nodes=2, cpus_per_node=1, pin_cores=True) as cluster:
            two.append(train(base + ["scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"], cluster.env,
                             "--address", cluster.gcs)["train/images_per_s"])
    ratio = median(two) / median(one)
    emit({"name": "scaling", "ratio": ratio, "goal": GOAL, "meets_goal": ratio >= GOAL, "smoke": args.smoke,
          "unit": "images/s", "one_node_one_worker": one, "two_nodes_two_workers": two,
          "iters": iters, "per_worker_batch": "data.labeled_batch_size + data.unlabeled_batch_size (pipeline defaults)"})


if __name__ == "__main__":
    main()
