"""Search-space files: a base pipeline, the dotted config keys to search, the sweep settings.

    base: ../pipelines/voc.yaml          # relative to this file
    set: {train.iters: 8000}             # overrides of the base, for every trial
    space:
      method.ema_decay: {uniform: [0.98, 0.999]}
      train.lr: {loguniform: [5.0e-4, 5.0e-3]}
      method.lambda_ss: {choice: [0.0, 0.5, 1.0]}
    tune: {scheduler: asha, num_samples: 16}

Everything is checked here, before Ray starts: unknown keys anywhere, malformed or empty
ranges, log scales over non-positive values, and any value a distribution can produce that
the config would reject (each range's ends and every choice are built into a full config).
Pure Python: Ray's distribution objects are made only in `to_tune`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mkd_ray.checkpoint import ARCHITECTURE_KEYS
from mkd_ray.config import (
    ConfigError,
    ExperimentConfig,
    _build,
    _range,
    apply_overrides,
    config_from_dict,
    flatten,
    parse_override,
    read_yaml,
    unknown_key_error,
)
from mkd_ray.models.pretrain import LAYOUT_KEYS, SOURCE

# name -> number of arguments (None: a non-empty list of values)
DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None}
TOP_KEYS = ("base", "set", "space", "tune")


@dataclass
class TuneSettings:
    """The `tune:` block of a space file (overridable as `--set tune.<key>=...`)."""

    metric: str = "val/miou"
    mode: Literal["max", "min"] = "max"
    # asha: stop poor trials at evaluations; fifo: run every trial to the end; pbt: Population
    # Based Training, which copies the weights of good trials into poor ones and perturbs
    # their hyperparameters, so values such as the EMA decay become schedules.
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    search: Literal["random", "optuna"] = "random"
    # Trials to sample; with `grid` dimensions, samples of the whole grid (as in Ray Tune).
    num_samples: int = field(default=8, metadata=_range(1))
    # Trials running at once; 0 = as many as the cluster's CPUs (or GPUs) fit.
    max_concurrent_trials: int = field(default=0, metadata=_range(0))
    # ASHA: no trial stops before this step (0 = its first evaluation); rungs grow by this factor.
    grace_period: int = field(default=0, metadata=_range(0))
    reduction_factor: float = field(default=2.0, metadata=_range(1, lo_open=True))
    # PBT: steps between exploit/explore decisions (0 = every evaluation); a multiple of
    # train.eval_interval. The bottom `quantile_fraction` of trials copy the top ones.
    perturbation_interval: int = field(default=0, metadata=_range(0))
    quantile_fraction: float = field(default=0.25, metadata=_range(0, 0.5, lo_open=True))
    resample_probability: float = field(default=0.25, metadata=_range(0, 1))
    # PBT: decide only once every trial has reached the decision step (Ray's synchronous PBT),
    # so a trial that started late is still compared with the others; the early ones wait.
    synch: bool = False
    # Stop the whole sweep after this many seconds (0 = no limit).
    time_budget_s: float = field(default=0.0, metadata=_range(0))
    # CPU held by each trial's driver (it only starts and watches its TorchTrainer).
    trial_driver_cpus: float = field(default=0.1, metadata=_range(0, lo_open=True))
    # Trials that end in an error are retried this many times (Ray Tune FailureConfig).
    max_failures: int = field(default=0, metadata=_range(0))
    seed: int = 0


@dataclass(frozen=True)
class Dimension:
    """One searched key: a distribution name and its arguments."""

    key: str
    kind: str
    args: tuple

    def extremes(self) -> list:
        """Every value at the edge of what the distribution can produce."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":  # upper bound exclusive, as in Ray
            return [self.args[0], self.args[1] - 1]
        if self.kind == "quniform":
            lo, hi, q = self.args
            return [round(lo / q) * q, round(hi / q) * q]
        return list(self.args)

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def mutation(self):
        """What PBT perturbs: the values themselves for choice and grid (it steps to a
        neighbour), the distribution otherwise (it scales by 0.8 or 1.2, or resamples)."""
        from ray import tune

        if self.kind in ("choice", "grid"):
            values = list(dict.fromkeys(self.args))  # neighbours are distinct values, in order
            return sorted(values) if all(_is_number(v) for v in values) else values
        return getattr(tune, self.kind)(*self.args)

    def clip(self, value):
        """A perturbed value brought back inside the range, since x 1.2 can leave it."""
        if self.kind in ("choice", "grid"):
            return value
        lo, hi = self.extremes()
        value = min(max(value, lo), hi)
        if self.kind == "quniform":
            value = round(value / self.args[2]) * self.args[2]
        return int(value) if self.kind == "randint" else value

    def contains(self, value) -> bool:
        """Whether the distribution can produce `value`."""
        if self.kind in ("choice", "grid"):
            return value in self.args
        if not _is_number(value):
            return False
        lo, hi = self.extremes()
        return lo <= value <= hi

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"


@dataclass
class Sweep:
    source: Path
    base_tree: dict  # the validated base config with `set` and --set applied, as plain data
    base: ExperimentConfig
    space: dict[str, Dimension]
    tune: TuneSettings

    @property
    def grids(self) -> list[Dimension]:
        """The dimensions Tune walks point by point rather than samples."""
        return [d for d in self.space.values() if d.kind == "grid"]

    @property
    def num_trials(self) -> int:
        """How many trials the sweep runs: Tune samples the whole grid `num_samples` times."""
        return self.tune.num_samples * math.prod(len(d.args) for d in self.grids)

    @property
    def search_label(self) -> str:
        """How trials are chosen, for the console: Tune's random generator walks a grid in order."""
        if len(self.grids) == len(self.space):
            return "grid"
        return f"grid + {self.tune.search}" if self.grids else self.tune.search

    def trial_config(self, sampled: dict[str, Any]) -> ExperimentConfig:
        return config_from_dict(self.base_tree, dict(sampled))

    def to_dict(self) -> dict:
        """Plain data, for shipping to trial processes and for MLflow."""
        return {
            "source": str(self.source),
            "base": self.base_tree,
            "space": {k: {d.kind: list(d.args)} for k, d in self.space.items()},
            "tune": dataclasses.asdict(self.tune),
        }


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read and check a space file; `--set tune.*` goes to the sweep settings, any other
    `--set` to the base pipeline."""
    path = Path(path)
    data = read_yaml(path)
    for key in data:
        if key not in TOP_KEYS:
            raise unknown_key_error(str(key), TOP_KEYS, f"{path}: {key}")
    base_tree = _base_tree(path, data)
    tune_tree = data.get("tune") or {}
    if not isinstance(tune_tree, dict):
        raise ConfigError("tune", f"expected a mapping of sweep settings, got {tune_tree!r}")
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("tune."):
            apply_overrides(tune_tree, {key[len("tune."):]: value})
        else:
            apply_overrides(base_tree, {key: value})
    base = config_from_dict(base_tree)
    base_tree = base.to_dict()  # complete and plain from here on
    settings = _build(TuneSettings, tune_tree, "tune")
    space = _dimensions(data.get("space"), base_tree)
    _check_settings(settings, space, base)
    _check_one_backbone(space, base)
    return Sweep(path, base_tree, base, space, settings)


def _check_one_backbone(space: dict, base: ExperimentConfig) -> None:
    """`model.pretrained: source` is resolved once, for the base's layout: trials of another
    layout would load only the tensors whose shapes happen to match."""
    searched = [key for key in space if key in LAYOUT_KEYS]
    if base.model.pretrained == SOURCE and searched:
        raise ConfigError(f"space.{searched[0]}", "the sweep loads one source-task backbone (model.pretrained=source) "
                          "for every trial, so it cannot search the backbone's layout; search it with "
                          "model.pretrained=null, or fix the layout")


def _base_tree(path: Path, data: dict) -> dict:
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError("base", "name the base pipeline YAML, e.g. `base: ../pipelines/voc.yaml` (relative to the space file)")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if not base_path.is_file():
        raise ConfigError("base", f"pipeline {base_path} does not exist")
    tree = read_yaml(base_path)
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise ConfigError("set", f"expected a mapping of dotted keys to values, got {fixed!r}")
    try:
        config_from_dict(tree, fixed)
    except ConfigError as exc:
        raise ConfigError(f"set.{exc.path}" if exc.path else "set", str(exc).split(": ", 1)[-1]) from None
    return apply_overrides(tree, fixed)


def _dimensions(space, base_tree: dict) -> dict[str, Dimension]:
    if not isinstance(space, dict) or not space:
        raise ConfigError("space", "expected a non-empty mapping of dotted config keys to distributions, "
                          "e.g. `method.tau_t: {uniform: [0.8, 0.97]}`")
    known = set(flatten(ExperimentConfig().to_dict()))
    dims = {}
    for key, spec in space.items():
        key = str(key)
        where = f"space.{key}"
        if key not in known:
            raise unknown_key_error(key, known, where)
        dim = _dimension(key, spec, where)
        for value in dim.extremes():
            try:
                config_from_dict(base_tree, {key: value})
            except ConfigError as exc:
                raise ConfigError(where, f"{dim.describe()} can produce {value!r}, which the config rejects ({exc})") from None
        dims[key] = dim
    return dims


def _dimension(key: str, spec, where: str) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(where, f"expected one distribution, e.g. {{uniform: [lo, hi]}}; got {spec!r} "
                          f"(distributions: {', '.join(DISTRIBUTIONS)})")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise unknown_key_error(str(kind), DISTRIBUTIONS, where)
    if not isinstance(args, list):
        raise ConfigError(where, f"{kind} takes a list, got {args!r}")
    if DISTRIBUTIONS[kind] is None:
        if not args:
            raise ConfigError(where, f"{kind} needs at least one value")
        return Dimension(key, kind, tuple(args))
    if len(args) != DISTRIBUTIONS[kind] or not all(_is_number(a) for a in args):
        shape = "[lo, hi, q]" if kind == "quniform" else "[lo, hi]"
        raise ConfigError(where, f"{kind} takes {shape} as numbers, got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(where, f"{kind} [{lo}, {hi}] is empty; the low end must be below the high end")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(where, f"loguniform needs positive bounds, got [{lo}, {hi}] (use uniform for ranges that reach 0)")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(where, f"randint takes integers [lo, hi) , got {args!r}")
    if kind == "quniform" and args[2] <= 0:
        raise ConfigError(where, f"quniform's step q must be positive, got {args[2]}")
    return Dimension(key, kind, tuple(float(a) if kind != "randint" else a for a in args))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(settings: TuneSettings, space: dict[str, Dimension], base: ExperimentConfig) -> None:
    if not settings.metric.startswith(("val/", "train/")):
        raise ConfigError("tune.metric", f"got {settings.metric!r}; expected a reported metric such as 'val/miou', "
                          "'val/iou/<class>' or 'train/loss'")
    if settings.metric.startswith("val/iou/") and settings.metric[len("val/iou/"):] not in base.data.names:
        raise ConfigError("tune.metric", f"no class {settings.metric[len('val/iou/'):]!r}; classes: {', '.join(base.data.names)}")
    grids = [k for k, d in space.items() if d.kind == "grid"]
    if grids and settings.search != "random":
        raise ConfigError(f"space.{grids[0]}", f"grid works with tune.search=random, not {settings.search!r}; use choice")
    if settings.grace_period > base.train.iters:
        raise ConfigError("tune.grace_period", f"{settings.grace_period} exceeds train.iters={base.train.iters}")
    if settings.scheduler == "pbt":
        _check_pbt(settings, space, base)


def _check_pbt(settings: TuneSettings, space: dict[str, Dimension], base: ExperimentConfig) -> None:
    """PBT explores by itself, decides only where a trial has just been evaluated, and copies
    weights between trials, so they must share one architecture."""
    for key in space:
        if key.startswith(ARCHITECTURE_KEYS):
            raise ConfigError(f"space.{key}", "pbt copies weights between trials, so it cannot search a key that "
                              f"changes the networks ({', '.join(ARCHITECTURE_KEYS)}); use asha or fifo")
    if settings.search != "random":
        raise ConfigError("tune.search", f"pbt samples its starting points at random and then explores on its own; "
                          f"use search: random, not {settings.search!r}")
    interval, train = settings.perturbation_interval or base.train.eval_interval, base.train
    if interval % train.eval_interval or interval >= train.iters:
        raise ConfigError("tune.perturbation_interval", f"{interval} must be a multiple of train.eval_interval="
                          f"{train.eval_interval} and below train.iters={train.iters}")
