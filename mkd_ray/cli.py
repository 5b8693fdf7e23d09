"""Command line: parses arguments, loads and validates the config, calls one layer."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from mkd_ray.checkpoint import CheckpointError
from mkd_ray.console import VERBOSE_ENV, Stalled, TrainingDiverged, quiet_libraries
from mkd_ray.config import ConfigError, SynthConfig, load_config
from mkd_ray.data.io import DatasetError
from mkd_ray.jobs import JobsError
from mkd_ray.models.pretrain import SourceTask
from mkd_ray.storage import StorageError
from mkd_ray.tracking import TrackingError

DEFAULT_PIPELINE = "pipelines/synthetic.yaml"
DEFAULT_SPACE = "tune_spaces/synthetic.yaml"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="pipeline YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set method.ema_decay=0.999 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description="Semi-supervised segmentation with Mutual Knowledge Distillation")
    parser.add_argument("--verbose", action="store_true",
                        help=f"show Ray's and MLflow's own logs and Tune's tables on the console (or set {VERBOSE_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one configuration")
    _add_config_args(train)
    train.add_argument("--local", action="store_true",
                       help="single-process loop, no Ray; records nothing in MLflow (its checkpoint goes under --storage)")
    train.add_argument("--name", help="run name; a run started again with the same name resumes (default: <config name>-<time>)")
    train.add_argument("--storage", default="runs",
                       help="where runs and checkpoints live: a folder every node reaches, or a URI such as s3://bucket/runs "
                       "(default: %(default)s)")
    train.add_argument("--address", help="Ray cluster to join (auto, ray://..., host:port); default: start a local one")
    train.add_argument("--experiment", help="MLflow experiment (default: the config's name)")
    train.add_argument("--summary", type=Path, help="write final metrics as JSON here")

    evaluate = commands.add_parser("eval", help="score a checkpoint on the validation split")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory or file, or an MLflow run id")
    evaluate.add_argument("--pipeline", help="evaluate with this pipeline's data settings (default: the checkpoint's own config)")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--mode", choices=["whole", "center", "sliding"], help="inference mode (default: the config's)")
    evaluate.add_argument("--local", action="store_true", help="score in this process, without Ray")
    evaluate.add_argument("--address", help="Ray cluster to score on (default: start a local one)")
    evaluate.add_argument("--save-predictions", type=Path, help="write one palette PNG per validation image here")
    evaluate.add_argument("--summary", type=Path, help="write the metrics as JSON here")

    sweep = commands.add_parser("tune", help="hyperparameter search on Ray Tune (one TorchTrainer per trial)")
    sweep.add_argument("--space", type=Path, default=Path(DEFAULT_SPACE), help="search-space YAML (default: %(default)s)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="tune.<key>=... sets a sweep setting, any other key the base pipeline (repeatable)")
    sweep.add_argument("--name", help="sweep name (default: <space>-<time>; with --resume: the latest sweep of this space)")
    sweep.add_argument("--storage", default="runs",
                       help="where sweeps and trial checkpoints live: a shared folder or a URI (default: %(default)s)")
    sweep.add_argument("--experiment", help="MLflow experiment (default: the base config's name)")
    sweep.add_argument("--address", help="Ray cluster to join; default: start a local one")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep without re-running finished trials")
    sweep.add_argument("--summary", type=Path, help="write the results table, best config and run ids as JSON here")

    cmp = commands.add_parser("compare", help="rank MLflow runs and plot them (metric vs hyperparameters, curves, per-class IoU)")
    cmp.add_argument("--experiment", action="append", required=True,
                     help="MLflow experiment to compare (repeat to compare across experiments)")
    cmp.add_argument("--metric", default="val/miou", help="ranking metric (default: %(default)s)")
    cmp.add_argument("--sweep", help="only the trials of this sweep (its name or parent run id); plots go to its parent run")
    cmp.add_argument("--top", type=int, default=5, help="runs in the learning-curve and IoU plots (default: %(default)s)")
    cmp.add_argument("--out", type=Path, default=Path("compare"), help="folder for the PNGs and runs.csv (default: %(default)s)")

    address_help = "the head's job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"
    submit = commands.add_parser("submit", help="run a run.py command on a Ray cluster as a job and follow it",
                                 description="e.g. run.py submit --address http://HEAD:8265 -- tune --space tune_spaces/voc.yaml")
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help=address_help)
    submit.add_argument("--working-dir", default=".", help="project folder shipped with the job (default: %(default)s)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable of the job, e.g. MLFLOW_TRACKING_URI=http://mlflow:5000 (repeatable)")
    submit.add_argument("--pip", action="append", default=[], metavar="PACKAGE", help="extra pip package for the job (repeatable)")
    submit.add_argument("--num-cpus", type=float, default=0.0, help="CPUs reserved for the job's driver")
    submit.add_argument("--num-gpus", type=float, default=0.0, help="GPUs reserved for the job's driver")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the logs")
    submit.add_argument("job", nargs=argparse.REMAINDER, help="-- then the run.py command, e.g. -- train --pipeline P")

    jobs = commands.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    jobs.add_argument("action", choices=["list", "status", "logs", "stop"])
    jobs.add_argument("job_id", nargs="?", help="the job's submission id (all but list)")
    jobs.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"), help=address_help)
    jobs.add_argument("--follow", action="store_true", help="logs: keep streaming until the job ends")

    pretrain = commands.add_parser("pretrain", help="pre-train the pipeline's backbone on the embedded source task "
                                "(19 pattern categories, the counterpart of ImageNet) for model.pretrained")
    _add_config_args(pretrain)
    pretrain.add_argument("--out", type=Path, help="weights file (default: data/pretrained/<backbone and settings>.pt)")
    pretrain.add_argument("--iters", type=int, default=SourceTask.iters, help="training iterations (default: %(default)s)")
    pretrain.add_argument("--per-category", type=int, default=SourceTask.per_category,
                          help="training images per category (default: %(default)s)")
    pretrain.add_argument("--seed", type=int, default=SourceTask.seed)

    data = commands.add_parser("data", help="dataset tools")
    tools = data.add_subparsers(dest="tool", required=True)
    synth = tools.add_parser("synth", help="write the synthetic dataset (VOC layout + split lists)")
    synth.add_argument("--out", type=Path, default=Path("data/synthetic"))
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-train", type=int, default=SynthConfig.num_train)
    synth.add_argument("--num-val", type=int, default=SynthConfig.num_val)
    synth.add_argument("--image-size", type=int, default=SynthConfig.image_size)
    synth.add_argument("--kind", choices=["textures", "glyphs", "shapes"], default=SynthConfig.kind,
                       help="textures: a pixel's class is its local texture (default); glyphs: the shape of the "
                            "marks around it; shapes: an object's outline")
    synth.add_argument("--preview", type=Path, metavar="PNG",
                       help="also write a grid of sample images and their masks to this PNG")

    pack = tools.add_parser("pack", help="write a pipeline's dataset as Parquet shards (local path or pyarrow URI)")
    _add_config_args(pack)
    pack.add_argument("--out", required=True, help="new folder or URI for the pack, e.g. data/voc-pack or s3://bucket/voc")
    pack.add_argument("--rows-per-file", type=int, default=256)
    pack.add_argument("--rows-per-group", type=int, default=1,
                      help="samples per Parquet row group; 1 makes each sample one ranged read (default)")

    splits = tools.add_parser("splits", help="write seeded labeled/unlabeled split lists")
    splits.add_argument("--dataset", choices=["voc", "cityscapes", "folder"], required=True)
    splits.add_argument("--root", type=Path, required=True, help="dataset root")
    splits.add_argument("--list", type=Path, help="folder datasets: a '<image> <mask>' list of all training samples")
    splits.add_argument("--val-list", type=Path, help="folder datasets: the validation list")
    splits.add_argument("--labeled", nargs="+", required=True, help="fractions like 1_16 or counts like 92")
    splits.add_argument("--out", type=Path, help="output folder (default <root>/splits)")
    splits.add_argument("--seed", type=int, default=0)
    splits.add_argument("--aug", action="store_true", help="VOC: train_aug set with SegmentationClassAug masks")
    return parser


def cmd_train(args) -> int:
    from mkd_ray.engine import train_local

    cfg = load_config(args.pipeline, args.overrides)
    if args.local:
        from mkd_ray.engine import default_run_name

        checkpoint = Path(args.storage) / (args.name or default_run_name(cfg))
        result = train_local(cfg, checkpoint_dir=checkpoint)
        summary = {k: result.get(k) for k in ("val/miou", "val/iou", "seconds", "seconds_per_iter", "step")}
        summary.update({f"val/iou/{n}": v for n, v in zip(cfg.data.names, result.get("val/iou") or [])})
        summary["checkpoint"] = str(checkpoint)
    else:
        from mkd_ray.train.trainer import fit

        result, run_id = fit(cfg, name=args.name, storage_path=args.storage, address=args.address, experiment=args.experiment)
        summary = {**result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None, "mlflow_run_id": run_id}
    _print_train_summary(summary, cfg, args.experiment or cfg.name)
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _print_train_summary(summary: dict, cfg, experiment: str) -> None:
    """Final mIoU and per-class IoU, where the weights are, and where the record is."""
    if summary.get("val/miou") is None:
        return
    print(f"final val mIoU {summary['val/miou']:.2f} ({cfg.eval.model}, {cfg.eval.mode})")
    _print_class_ious(summary, cfg.data.names)
    print(f"checkpoint: {summary.get('checkpoint')}")
    if summary.get("mlflow_run_id"):
        from mkd_ray.tracking import ui_hint

        print(f"MLflow run {summary['mlflow_run_id']} (experiment {experiment}); see it with:\n"
              f"  {ui_hint(summary['mlflow_run_id'])}")
    else:
        print("not recorded in MLflow (--local runs record nothing; train without --local to record a run)")


def _print_class_ious(metrics: dict, names: list[str]) -> None:
    """One line per class with its `val/iou/<class>`, as `train` and `eval` end."""
    for name in names:
        if f"val/iou/{name}" in metrics:
            print(f"  {name:>16s} {metrics[f'val/iou/{name}']:6.2f}")


def cmd_eval(args) -> int:
    import tempfile

    from mkd_ray import checkpoint as ckpt
    from mkd_ray.config import config_from_dict

    source = Path(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if not source.exists():
            if not re.fullmatch(r"[0-9a-f]{32}", args.checkpoint):
                raise ckpt.CheckpointError(f"checkpoint {args.checkpoint} does not exist (and is not an MLflow run id)")
            from mkd_ray.tracking import download_checkpoint

            source = download_checkpoint(args.checkpoint, Path(tmp))
        state = ckpt.load_state(source)
    saved = ckpt.checkpoint_config(state)
    overrides = list(args.overrides) + ([f"eval.mode={args.mode}"] if args.mode else [])
    cfg = load_config(args.pipeline, overrides) if args.pipeline else config_from_dict(saved.to_dict(), overrides)
    ckpt.check_compatible(saved, cfg, str(args.checkpoint))
    keep = args.save_predictions is not None
    if args.local:
        from mkd_ray.engine import evaluate_checkpoint

        result, predictions = evaluate_checkpoint(state, cfg, keep)
    else:
        from mkd_ray.train.trainer import evaluate_on_ray

        result, predictions = evaluate_on_ray(state, cfg, args.address, keep)
    if keep:
        args.save_predictions.mkdir(parents=True, exist_ok=True)
        for name, png in predictions.items():
            (args.save_predictions / f"{name}.png").write_bytes(png)
    print(f"val mIoU {result['val/miou']:.2f} ({cfg.eval.mode}, {cfg.eval.model}, step {result['step']})")
    _print_class_ious(result, cfg.data.names)
    if args.summary:
        args.summary.write_text(json.dumps({**result, "checkpoint": str(args.checkpoint)}, indent=2))
    return 0


def cmd_tune(args) -> int:
    import time

    from mkd_ray.tune.space import load_sweep

    sweep = load_sweep(args.space, args.overrides)  # every error before Ray starts
    from mkd_ray.tune.runner import latest_sweep, run_sweep

    name = args.name
    if name is None:
        name = latest_sweep(args.storage, args.space.stem) if args.resume else f"{args.space.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_sweep(sweep, name, args.storage, args.experiment, args.address, args.resume)
    table, metric = summary.table, sweep.tune.metric
    shown = ["trial_id", "status", "steps", f"last {metric}", f"best {metric}", *sweep.space]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(table) else "no trials ran")
    counts = table["status"].value_counts() if len(table) else {}
    print(f"{len(table)} trials ({counts.get('completed', 0)} completed, {counts.get('stopped early', 0)} stopped early, "
          f"{counts.get('error', 0)} failed) in {summary.seconds / 60:.1f} min")
    if counts.get("unfinished", 0):
        print(f"interrupted with {counts['unfinished']} trials unfinished; continue with: "
              f"python run.py tune --space {args.space} --resume --name {name}")
    if summary.best_config is not None:
        _print_sweep_answer(summary, sweep, name, args.experiment or sweep.base.name)
    if args.summary:
        args.summary.write_text(json.dumps({
            "name": name, "parent_run_id": summary.parent_run_id, "seconds": summary.seconds, "path": summary.path,
            "trials": table.to_dict(orient="records"), "best_config": summary.best_config,
        }, indent=2, default=str))
    return 0


def _print_sweep_answer(summary, sweep, name: str, experiment: str) -> None:
    """The best trial against the default configuration at the same budget, what early
    stopping saved, and where to look."""
    from mkd_ray.tracking import ui_hint
    from mkd_ray.tune.runner import is_default

    table, metric = summary.table, sweep.tune.metric
    last = f"last {metric}"
    best = table.iloc[0]
    print(f"best: trial {best['trial_id']}, {metric} {best[last]:.2f} at step {best['steps']}")
    for key in sweep.space:
        print(f"  {key}: {best[key]}")
    defaults = [row for _, row in table.iterrows() if is_default(row, summary.default)]
    if defaults:
        row = defaults[0]
        budget = ("at the same budget" if row["steps"] == best["steps"]
                  else f"at step {best['steps']} against the default's step {row['steps']}")
        print(f"default configuration ({', '.join(f'{k}={v}' for k, v in summary.default.items())}): "
              f"{metric} {row[last]:.2f} (trial {row['trial_id']}, {row['status']}), "
              f"so the best is {best[last] - row[last]:+.2f} {budget}")
    full = summary.iters * len(table)
    if full:
        print(f"compute: the trials ran {int(table['steps'].sum()):,} of {full:,} steps "
              f"({table['steps'].sum() / full:.0%} of running every trial to the end)")
    print(f"best config: {summary.path}/best_config.yaml (also on MLflow parent run {summary.parent_run_id}, "
          f"experiment {experiment})")
    print(f"look at it:\n  python run.py compare --experiment {experiment} --sweep {name}\n"
          f"  {ui_hint(summary.parent_run_id)}")


def cmd_compare(args) -> int:
    from mkd_ray.compare import compare

    result = compare(args.experiment, args.metric, args.out, args.sweep, args.top)
    with_values = result.table.drop(columns=["run_id"])
    print(with_values.to_string(index=False, float_format=lambda v: f"{v:.4g}", max_colwidth=40))
    print(f"{len(result.table)} runs; plots in {args.out}: {', '.join(p.name for p in result.plots)}; "
          f"logged to MLflow run {result.logged_to}")
    return 0


def _job_command(args) -> list[str]:
    """The run.py command to run remotely, parsed (and its config validated) here first, so a
    typo fails before anything is uploaded."""
    command = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not command or command[0] in ("submit", "jobs"):
        raise ConfigError("submit", "give the run.py command to run after --, e.g. -- train --pipeline pipelines/voc.yaml")
    try:
        inner = build_parser().parse_args(command)
    except SystemExit:
        raise ConfigError("submit", f"not a valid run.py command: {' '.join(command)}") from None
    if inner.command == "train":
        load_config(inner.pipeline, inner.overrides)
    elif inner.command == "tune":
        from mkd_ray.tune.space import load_sweep

        load_sweep(inner.space, inner.overrides)
    return command


def _job_client(address):
    from mkd_ray import jobs

    if not address:
        raise ConfigError("--address", "name the head's job server, e.g. --address http://HEAD:8265 "
                          "(or set RAY_API_SERVER_ADDRESS)")
    return jobs.connect(address)


def cmd_submit(args) -> int:
    from mkd_ray import jobs

    submission = jobs.Submission(_job_command(args), args.working_dir, jobs.parse_env(args.env), args.pip,
                                 args.num_cpus, args.num_gpus)
    if not Path(args.working_dir, "run.py").is_file():
        raise ConfigError("--working-dir", f"{args.working_dir} does not hold run.py; give the project folder")
    if "MLFLOW_TRACKING_URI" not in submission.runtime_env()["env_vars"]:
        print("note: no MLFLOW_TRACKING_URI given, so the job logs to a SQLite file in its own working directory on "
              "the cluster; pass --env MLFLOW_TRACKING_URI=<a tracking server every node reaches>", file=sys.stderr)
    client = _job_client(args.address)
    job_id = jobs.submit(client, submission)
    print(f"submitted job {job_id}: {submission.entrypoint()}", file=sys.stderr)
    if args.no_wait:
        print(job_id)
        return 0
    return jobs.follow(client, job_id, args.address)


def cmd_jobs(args) -> int:
    from mkd_ray import jobs

    client = _job_client(args.address)
    if args.action == "list":
        rows = jobs.list_jobs(client)
        for row in rows:
            print(f"{row['id']:<28} {row['status']:<10} {row['started']:<20} {row['entrypoint']}")
        print(f"{len(rows)} jobs")
        return 0
    if not args.job_id:
        raise ConfigError("job_id", f"`jobs {args.action}` needs a job id (see `run.py jobs list`)")
    if args.action == "status":
        info = jobs.job_info(client, args.job_id)
        print(f"{args.job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
        return 0
    if args.action == "stop":
        jobs.stop(client, args.job_id)
        print(f"stop requested for {args.job_id}")
        return 0
    jobs.job_info(client, args.job_id)
    if args.follow:
        return jobs.follow(client, args.job_id, args.address)
    print(client.get_job_logs(args.job_id), end="")
    return 0


def cmd_data(args) -> int:
    from mkd_ray.data import io, splits, synthetic

    if args.tool == "synth":
        cfg = SynthConfig(kind=args.kind, num_train=args.num_train, num_val=args.num_val, image_size=args.image_size,
                          seed=args.seed)
        info = synthetic.generate(args.out, cfg)
        print(f"wrote {cfg.num_train} train + {cfg.num_val} val images to {args.out} in {info['seconds']} s")
        if args.preview:
            synthetic.preview(args.preview, cfg)
            print(f"wrote a preview of the first {cfg.kind} scenes to {args.preview}")
        return 0
    if args.tool == "pack":
        return _pack(args)
    out = args.out or args.root / "splits"
    if args.dataset == "voc":
        train = io.voc_samples(args.root, "train_aug" if args.aug else "train", aug_masks=args.aug)
        val = io.voc_samples(args.root, "val")
    elif args.dataset == "cityscapes":
        train, val = io.cityscapes_samples(args.root, "train"), io.cityscapes_samples(args.root, "val")
    else:
        if args.list is None or args.val_list is None:
            raise DatasetError("folder datasets need --list and --val-list")
        train, val = io.read_split_file(args.list, args.root), io.read_split_file(args.val_list, args.root)
    io.write_split_file(out / "val.txt", val, args.root)
    for folder in splits.write_splits(train, args.labeled, out, args.root, seed=args.seed):
        print(f"wrote {folder}/labeled.txt and unlabeled.txt")
    return 0


def cmd_pretrain(args) -> int:
    from mkd_ray.models.pretrain import CACHE, MIN_ITERS, cache_path, pretrain

    cfg = load_config(args.pipeline, args.overrides)
    for flag, value, least in (("--iters", args.iters, MIN_ITERS), ("--per-category", args.per_category, 1)):
        if value < least:
            raise ConfigError(flag, f"must be at least {least}, got {value}")
    task = SourceTask(iters=args.iters, per_category=args.per_category, seed=args.seed)
    out = args.out or cache_path(CACHE, cfg.model, task)
    if out.is_file() and args.out is None:
        print(f"already pre-trained: {out}")
    else:
        report = pretrain(cfg.model, task, cfg.data.mean, cfg.data.std, out)
        print(f"wrote {out} in {report['seconds']:.0f} s (held-out accuracy {report['heldout_accuracy']:.3f} "
              f"over {len(report['categories'])} categories)")
    print(f"train from it with --set model.pretrained={out}")
    return 0


def _pack(args) -> int:
    from mkd_ray.data import packed
    from mkd_ray.data.sources import ensure_synthetic, splits_location

    cfg = load_config(args.pipeline, args.overrides)
    if cfg.data.format != "folder":
        raise ConfigError("data.format", "the source of a pack must be a folder dataset (data.format=folder)")
    for flag, value in (("--rows-per-file", args.rows_per_file), ("--rows-per-group", args.rows_per_group)):
        if value < 1:
            raise DatasetError(f"{flag} must be at least 1, got {value}")
    ensure_synthetic(cfg)
    info = packed.write_pack(Path(cfg.data.root), Path(splits_location(cfg)), args.out, args.rows_per_file, args.rows_per_group)
    print(f"packed {info['rows']} samples from {cfg.data.root} into {len(info['files'])} Parquet files at {args.out} "
          f"in {info['seconds']} s; train on it with --set data.format=parquet --set data.root={args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by this process and, through the environment, by Ray's
    quiet_libraries()
    handler = {"train": cmd_train, "eval": cmd_eval, "tune": cmd_tune, "compare": cmd_compare, "data": cmd_data,
               "submit": cmd_submit, "jobs": cmd_jobs, "pretrain": cmd_pretrain}[args.command]
    try:
        return handler(args)
    except FileNotFoundError as exc:
        if exc.filename is None:  # not a path the user gave (e.g. a vanished working directory): keep the traceback
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, DatasetError, CheckpointError, StorageError, JobsError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, Stalled) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
