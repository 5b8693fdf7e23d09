"""ssl_table: the method evidence. Supervised, mean teacher, CPS, MKD and three MKD ablations
on the synthetic pipeline at equal iteration budgets, over several seeds and splits, beside two
references: supervised on all labels (the upper bound) and supervised at MKD's wall-clock.

    .venv/bin/python benchmarks/ssl_table.py [--splits 1_16 1_8] [--seeds 0 1 2] [--rows MKD ...] [--parallel 2] [--smoke]

Every run is `run.py train --local`; each is logged as a child run of the table's one MLflow
parent run in --experiment (default ssl-table), with its params, val mIoU, per-class IoU and
time. The table (mean +- std val mIoU, and the share of the supervised -> upper-bound gap each
row recovers) and a plot go to --out and to that parent run. Each finished run leaves
--out/runs/<key>.json, so a table that was interrupted resumes where it stopped, under the same
parent run; --rows runs only the rows named (the upper bound always; the wall-clock reference
is a row of its own), so the rows that decide a question can go first; the table and the plot
show every run in --out, whichever invocation ran it. The full table (2 splits x 3 seeds, 51
runs) takes 4 to 8 hours on 2 cores.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from _common import REPO, emit, harness_parser
from _runs import ORACLE, Run, add_run_options, prepared_base, recorded, run_all, summary

# Row -> overrides of the pipeline. Every row shares the pipeline's budget and schedule.
ROWS = {
    "supervised": ["method.name=supervised"],
    "mean teacher": ["method.name=mean_teacher"],
    "CPS": ["method.name=cps"],
    "MKD": ["method.name=mkd"],
    "MKD w/o feature aug": ["method.name=mkd", "method.feature_aug=none"],
    "MKD w/o L_ss": ["method.name=mkd", "method.lambda_ss=0"],
    "MKD w/o L_st": ["method.name=mkd", "method.lambda_st=0"],
    "oracle (ground-truth targets)": ORACLE,
}
UPPER = "supervised, all labels"
WALL_CLOCK = "supervised, MKD's wall-clock"
TABLE_ROWS = [*ROWS, WALL_CLOCK]  # the table's order; the wall-clock reference is planned after MKD


def plan(splits: list[str], seeds: list[int], rows: list[str]) -> list[Run]:
    """The equal-budget runs of `rows`; the wall-clock references are planned once MKD's times are known."""
    runs = [Run(row, split, seed, tuple(ROWS[row])) for split in splits for seed in seeds for row in rows]
    return runs + [Run(UPPER, "all", seed, ("method.name=supervised",)) for seed in seeds]


def wall_clock_runs(splits: list[str], seeds: list[int], done: dict[str, dict], iters: int) -> list[Run]:
    """Supervised for as long as MKD took: its iterations scaled by MKD's time over supervised's,
    medians over the seeds of a split (one run slowed by a busy machine must not set the budget)."""
    runs = []
    for split in splits:
        seconds = {row: statistics.median(done[Run(row, split, seed, ()).key]["seconds"] for seed in seeds)
                   for row in ("MKD", "supervised")}
        scaled = max(1, round(iters * seconds["MKD"] / seconds["supervised"]))
        budget = ("method.name=supervised", f"train.iters={scaled}", f"train.eval_interval={scaled}",
                  f"train.checkpoint_interval={scaled}")
        runs += [Run(WALL_CLOCK, split, seed, budget) for seed in seeds]
    return runs


def labeled_fraction(split: str) -> float:
    """The order of a table's splits: "1_16" before "1_8"; a count of labeled images by value."""
    numerator, _, denominator = split.partition("_")
    try:
        return float(numerator) / float(denominator or 1)
    except ValueError:  # a split named otherwise goes last
        return float("inf")


def table(results: list[dict], splits: list[str]) -> dict[tuple[str, str], dict]:
    """(split, row) -> mean +- std over seeds, and the share of the supervised -> upper-bound gap
    recovered; rows without results are left out."""
    upper = summary(results, UPPER, "all")
    rows = {}
    for split in splits:
        supervised = summary(results, "supervised", split)["mean"]
        for row in TABLE_ROWS:
            if not any(r["row"] == row and r["split"] == split for r in results):
                continue
            r = summary(results, row, split)
            rows[split, row] = {**r, "gap_recovered": (r["mean"] - supervised) / (upper["mean"] - supervised)}
    rows["all", UPPER] = {**upper, "gap_recovered": 1.0}
    return rows


def present(rows: dict[tuple[str, str], dict]) -> list[str]:
    """The table's row names that have results, in the table's order."""
    return [name for name in TABLE_ROWS if any(row == name for _, row in rows)]


def markdown(rows: dict[tuple[str, str], dict], splits: list[str]) -> str:
    lines = ["| method | " + " | ".join(f"{s} mIoU | {s} gap recovered" for s in splits) + " |",
             "| --- |" + " --- | --- |" * len(splits)]
    for row in present(rows):
        cells = []
        for split in splits:
            r = rows.get((split, row))
            if r is None:
                cells += ["not run", ""]
                continue
            seeds = f"{r['seeds']} seed{'s' * (r['seeds'] > 1)}"
            cells += [f"{r['mean']:.1f} +- {r['std']:.1f} ({seeds})", f"{100 * r['gap_recovered']:+.0f}%"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    upper = rows["all", UPPER]
    lines.append(f"| {UPPER} (upper bound) | " + " | ".join([f"{upper['mean']:.1f} +- {upper['std']:.1f}", "100%"] * len(splits)) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict[tuple[str, str], dict], splits: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = present(rows)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(splits)
    for k, split in enumerate(splits):
        picked = [rows.get((split, n), {"mean": 0.0, "std": 0.0}) for n in names]
        ax.bar([i + k * width for i in range(len(names))], [r["mean"] for r in picked], width,
               yerr=[r["std"] for r in picked], label=f"split {split}", capsize=3)
    ax.axhline(rows["all", UPPER]["mean"], color="black", linestyle="--", label=UPPER)
    ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(names))], names, rotation=25, ha="right")
    ax.set_ylabel("val mIoU (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(experiment: str, out: Path, results: list[dict], class_names: list[str], splits: list[str],
                  seeds: list[int]) -> str:
    """One parent run per table folder, holding the table and the plot, and a child run (role
    "ssl_table_run") per training run. A resumed table reuses its parent and adds only the runs
    it has not logged, so an invocation per group of rows still leaves one table in MLflow."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from mkd_ray.tracking import git_commit, tracking_uri

    client = MlflowClient(tracking_uri())
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"mkd_ray.role": "ssl_table", "mkd_ray.table": str(out.resolve()), "git_commit": git_commit()}
    parent = table_parent_run(client, experiment_id, tags)
    # Tags, not params: a resumed table may name other splits.
    client.log_batch(parent, tags=[RunTag(k, v) for k, v in {**tags, "splits": ",".join(splits),
                                                             "seeds": ",".join(map(str, seeds))}.items()])
    for name in ("ssl_table.md", "ssl_table.json", "ssl_table.png"):
        client.log_artifact(parent, str(out / name))
    children = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10_000)
    logged = {child.info.run_name for child in children}
    for r in results:
        run_name = f"{r['split']} {r['row']} seed {r['seed']}"
        if run_name in logged:
            continue
        child = client.create_run(experiment_id, run_name=run_name,
                                  tags={**tags, "mkd_ray.role": "ssl_table_run", "mlflow.parentRunId": parent,
                                        "method": r["row"]}).info.run_id
        params = {"row": r["row"], "data.split": r["split"], "train.seed": r["seed"], "train.iters": r["iters"],
                  "overrides": " ".join(r["overrides"])}
        metrics = {"val/miou": r["miou"], "seconds": r["seconds"],
                   **{f"val/iou/{name}": value for name, value in zip(class_names, r["iou"])}}
        client.log_batch(child, params=[Param(k, str(v)) for k, v in params.items()],
                         metrics=[Metric(k, float(v), 0, r["iters"]) for k, v in metrics.items()])
        client.set_terminated(child)
    client.set_terminated(parent)
    return parent


def table_parent_run(client, experiment_id: str, tags: dict[str, str]) -> str:
    """The parent run of the table in tags["mkd_ray.table"], created on the table's first log."""
    found = client.search_runs([experiment_id], f"tags.`mkd_ray.role` = 'ssl_table' and "
                                                f"tags.`mkd_ray.table` = '{tags['mkd_ray.table']}'", max_results=1)
    return found[0].info.run_id if found else client.create_run(experiment_id, run_name="ssl-table", tags=tags).info.run_id


def main() -> None:
    parser = harness_parser(__doc__, repeats=1)
    add_run_options(parser, "ssl-table")
    parser.add_argument("--splits", nargs="+", default=["1_16", "1_8"])
    parser.add_argument("--rows", nargs="+", choices=TABLE_ROWS, default=TABLE_ROWS, metavar="ROW",
                        help=f"rows to run (default all): {', '.join(map(repr, TABLE_ROWS))}")
    parser.add_argument("--out", type=Path, help="default benchmarks/results/ssl_table (a temporary folder with --smoke)")
    args = parser.parse_args()
    if "supervised" not in args.rows:
        parser.error("--rows must include 'supervised': every row is read against it")
    if WALL_CLOCK in args.rows and "MKD" not in args.rows:
        parser.error(f"--rows: {WALL_CLOCK!r} needs 'MKD' too: its budget is MKD's measured time")
    if args.smoke:
        args.splits, args.seeds = ["1_8"], [0]
        args.out = args.out or Path(tempfile.mkdtemp(prefix="ssl_table_smoke"))
    args.out = args.out or REPO / "benchmarks" / "results" / "ssl_table"
    args.out.mkdir(parents=True, exist_ok=True)
    base, cfg = prepared_base(args, args.out)

    done = run_all(plan(args.splits, args.seeds, [r for r in args.rows if r in ROWS]), base, args, args.out)
    if WALL_CLOCK in args.rows:
        done.update(run_all(wall_clock_runs(args.splits, args.seeds, done, cfg.train.iters), base, args, args.out))
    # The table is the folder's: every run in it, also those of earlier invocations (other rows or splits).
    results = recorded(args.out)
    splits = sorted({r["split"] for r in results} - {"all"}, key=labeled_fraction)
    rows = table(results, splits)
    (args.out / "ssl_table.md").write_text(markdown(rows, splits))
    (args.out / "ssl_table.json").write_text(json.dumps({"rows": list(rows.values()), "runs": results}, indent=2))
    plot(rows, splits, args.out / "ssl_table.png")
    seeds = sorted({r["seed"] for r in results})
    run_id = log_to_mlflow(args.experiment, args.out, results, cfg.data.class_names, splits, seeds)
    mkd, supervised = rows.get((splits[-1], "MKD")), rows[splits[-1], "supervised"]
    emit({"name": "ssl_table", "ratio": mkd["mean"] / supervised["mean"] if mkd else None,
          "goal": "> 1 (MKD above supervised)",
          "smoke": args.smoke, "pipeline": str(args.pipeline), "overrides": args.overrides, "rows": list(rows.values()),
          "mlflow_run_id": run_id, "table": str(args.out / "ssl_table.md")})


if __name__ == "__main__":
    main()
