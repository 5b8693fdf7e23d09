"""benchmark_validity: can the synthetic benchmark answer the semi-supervised question? Measured
with supervised runs and an oracle only, never with the methods being compared.

    .venv/bin/python benchmarks/benchmark_validity.py [--pipeline P] [--seeds 0 1 2] [--smoke]

Properties, at the pipeline's budget, mean +- std over --seeds (paired by training seed):
- label-hungry: supervised on all labels beats supervised on the split (>= 15 mIoU at 1/8,
  more at 1/16): there is a gap for unlabeled images to close;
- converged: supervised on the split given twice the iterations gains <= 1.5 mIoU, so an
  equal-iteration table does not measure the budget;
- label-preserving augmentation: the oracle (one student learning from the unlabeled images'
  ground truth through the pipeline's weak view, strong view and CutMix) recovers >= 80% of
  the gap: the augmentations the methods rely on keep the labels;
- the null-distillation control: MKD's whole step with its unsupervised loss weights zero
  (only the students' supervised losses train) against supervised, paired per seed: the
  two-branch step must cost nothing before a pseudo-label is used (|mean| within the spread);
- generation time of the dataset (<= 10 s).
Runs are `run.py train --local`, kept under --out/runs for resuming (see _runs.py).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _common import REPO, emit, harness_parser
from _runs import ORACLE, Run, add_run_options, paired, prepared_base, run_all, summary

SUPERVISED, UPPER, LONGER, ORACLE_ROW = "supervised", "supervised, all labels", "supervised, 2x iterations", "oracle"
CONTROL = "{method}, distillation off"


def plan(splits: list[str], seeds: list[int], iters: int, controls: list[str]) -> list[Run]:
    runs = [Run(UPPER, "all", seed, ("method.name=supervised",)) for seed in seeds]
    for split in splits:
        for seed in seeds:
            runs += [Run(SUPERVISED, split, seed, ("method.name=supervised",)),
                     Run(LONGER, split, seed, ("method.name=supervised", f"train.iters={2 * iters}",
                                               f"train.eval_interval={2 * iters}", f"train.checkpoint_interval={2 * iters}")),
                     Run(ORACLE_ROW, split, seed, tuple(ORACLE))]
    # The control at the last split: the whole step runs (teachers, unlabeled forwards,
    # selection) with the unsupervised loss weights zero.
    runs += [Run(CONTROL.format(method=m), splits[-1], seed, (f"method.name={m}", "method.lambda_st=0", "method.lambda_ss=0"))
             for m in controls for seed in seeds]
    return runs


def generation_seconds(cfg) -> float:
    from mkd_ray.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        generate(Path(tmp), cfg.data.synth)
        return time.perf_counter() - started


def properties(results: list[dict], splits: list[str], controls: list[str]) -> dict:
    upper = summary(results, UPPER, "all")
    out = {"upper_bound": upper, "splits": {}}
    for split in splits:
        sup = summary(results, SUPERVISED, split)
        gap = paired(results, UPPER, SUPERVISED, "all", split)
        oracle = summary(results, ORACLE_ROW, split)
        out["splits"][split] = {
            "supervised": sup,
            "label_hungry_gap": gap,
            "budget_gain_2x": paired(results, LONGER, SUPERVISED, split),
            "oracle": oracle,
            "oracle_gap_recovered": (oracle["mean"] - sup["mean"]) / gap["mean"],
        }
    last = splits[-1]
    out["controls"] = {m: {**summary(results, CONTROL.format(method=m), last),
                           "vs_supervised": paired(results, CONTROL.format(method=m), SUPERVISED, last)}
                       for m in controls}
    return out


def checks(props: dict, splits: list[str], seconds: float) -> dict[str, bool]:
    s = props["splits"]
    result = {
        "label_hungry": s["1_8"]["label_hungry_gap"]["mean"] >= 15 if "1_8" in s else None,
        "label_hungry_more_at_1_16": (s["1_16"]["label_hungry_gap"]["mean"] > s["1_8"]["label_hungry_gap"]["mean"]
                                      if {"1_8", "1_16"} <= s.keys() else None),
        "converged": all(v["budget_gain_2x"]["mean"] <= 1.5 for v in s.values()),
        "oracle_recovers_80pct": all(v["oracle_gap_recovered"] >= 0.8 for v in s.values()),
        "generation_under_10s": seconds <= 10,
    }
    for method, control in props["controls"].items():
        spread = max(control["vs_supervised"]["std"], props["splits"][splits[-1]]["supervised"]["std"])
        result[f"control_{method}_within_spread"] = abs(control["vs_supervised"]["mean"]) <= spread
    return result


def main() -> None:
    parser = harness_parser(__doc__, repeats=1)
    add_run_options(parser, "benchmark-validity")
    parser.add_argument("--splits", nargs="+", default=["1_16", "1_8"])
    parser.add_argument("--controls", nargs="*", default=["mkd"], help="methods whose null-distillation control runs")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/benchmark_validity (temporary with --smoke)")
    args = parser.parse_args()
    if args.smoke:
        args.seeds = [0]
        args.out = args.out or Path(tempfile.mkdtemp(prefix="benchmark_validity_smoke"))
    args.out = args.out or REPO / "benchmarks" / "results" / "benchmark_validity"
    args.out.mkdir(parents=True, exist_ok=True)
    base, cfg = prepared_base(args, args.out)
    seconds = generation_seconds(cfg)

    done = run_all(plan(args.splits, args.seeds, cfg.train.iters, args.controls), base, args, args.out)
    props = properties(list(done.values()), args.splits, args.controls)
    passed = checks(props, args.splits, seconds)
    (args.out / "benchmark_validity.json").write_text(json.dumps({"properties": props, "checks": passed,
                                                                  "runs": list(done.values())}, indent=2))
    last = props["splits"][args.splits[-1]]
    emit({"name": "benchmark_validity", "ratio": last["oracle_gap_recovered"],
          "goal": ">= 0.8 (oracle's share of the supervised -> all-labels gap); see checks",
          "smoke": args.smoke, "pipeline": str(args.pipeline), "overrides": args.overrides, "seeds": args.seeds,
          "generation_s": seconds, "checks": passed, "properties": props})


if __name__ == "__main__":
    main()
