"""memory: peak resident memory of a training worker on the default synthetic pipeline.

    .venv/bin/python benchmarks/memory.py [--repeats 3] [--iters 300] [--smoke]

Rank 0 reports its process's peak RSS as `train/peak_rss_mb` at each log step (the Ray
Train worker, not the driver); the harness reads the last value of a `run.py train`.
ratio is that peak in MiB (no goal was set).
"""

from __future__ import annotations


from _common import FULL_STEP, REPO, emit, harness_parser, median, train


def main() -> None:
    parser = harness_parser(__doc__)
    parser.add_argument("--iters", type=int, default=300)
    args = parser.parse_args()
    repeats, iters = (1, 10) if args.smoke else (args.repeats, args.iters)
    schedule = [f"data.root={REPO / 'data' / 'synthetic'}", FULL_STEP, f"train.iters={iters}", f"train.log_interval={iters // 2}",
                f"train.eval_interval={iters}", f"train.checkpoint_interval={iters}"]
    peaks = [train(schedule, {})["train/peak_rss_mb"] for _ in range(repeats)]
    emit({"name": "memory", "ratio": median(peaks), "goal": None, "unit": "MiB peak RSS of the training worker",
          "smoke": args.smoke, "peak_rss_mb": peaks, "iters": iters})


if __name__ == "__main__":
    main()
