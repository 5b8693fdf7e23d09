"""Typed experiment configuration: YAML + dotted overrides, validated once at the door.

Every section is a dataclass. `load_config` reads a pipeline YAML, applies `--set a.b=c`
overrides and builds the dataclasses, checking names, types and ranges on the way, so a
typo or an out-of-range value fails with the dotted field name before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted field and what is valid."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def _range(lo=None, hi=None, lo_open=False, hi_open=False) -> dict:
    return {"range": (lo, hi, lo_open, hi_open)}


# ----------------------------------------------------------------------------- sections


@dataclass
class SynthConfig:
    """The embedded synthetic dataset (see mkd_ray/data/synthetic.py and mkd_ray/data/scenes/)."""

    # "textures": a pixel's class is its local texture (the default benchmark); "glyphs": the
    # shape of the marks around it (a second family, for the generality check); "shapes": an
    # object's outline, which CutMix cuts (the negative case, docs/synthetic.md).
    kind: Literal["textures", "glyphs", "shapes"] = "textures"

    num_train: int = field(default=1024, metadata=_range(16))
    num_val: int = field(default=256, metadata=_range(1))
    image_size: int = field(default=32, metadata=_range(16))
    seed: int = 0
    splits: list[str] = field(default_factory=lambda: ["1_32", "1_16", "1_8", "1_4"])


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "voc", "cityscapes", "folder"] = "synthetic"
    # "folder": image files under `root`; "parquet": `root` is a pack written by
    # `run.py data pack`, a local path or any pyarrow URI (s3://, gs://, file://).
    format: Literal["folder", "parquet"] = "folder"
    root: str = "data/synthetic"
    # A split name under `splits_dir`, or a folder holding labeled.txt / unlabeled.txt.
    split: str = "1_16"
    # Folder of split folders and val.txt; default <root>/splits.
    splits_dir: Optional[str] = None
    num_classes: int = field(default=5, metadata=_range(2))
    class_names: Optional[list[str]] = None
    ignore_index: int = 255
    crop_size: int = field(default=32, metadata=_range(8))
    labeled_batch_size: int = field(default=8, metadata=_range(1))
    unlabeled_batch_size: int = field(default=8, metadata=_range(1))
    val_batch_size: int = field(default=16, metadata=_range(1))
    # Processes that decode and augment the labeled batches beside each Ray training worker,
    # so the step does not wait for them (0: in the training process; `--local` always is).
    labeled_workers: int = field(default=1, metadata=_range(0, 16))
    # Per-channel normalisation of images scaled to [0, 1] (ImageNet by default).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # A labeled or validation sample that cannot be read (or whose mask has a bad class id):
    # "error" stops before training, naming the file; "skip" leaves it out with a warning.
    # Unreadable unlabeled images are always skipped and counted (metric data/skipped).
    bad_samples: Literal["error", "skip"] = "error"
    synth: SynthConfig = field(default_factory=SynthConfig)

    @property
    def names(self) -> list[str]:
        """Class names, or the class ids as text when none are configured."""
        return self.class_names or [str(i) for i in range(self.num_classes)]


@dataclass
class CutMixConfig:
    prob: float = field(default=1.0, metadata=_range(0, 1))
    num_boxes: int = field(default=3, metadata=_range(1, 16))
    # Total fraction of the crop that the boxes cover, sampled uniformly in this range.
    area: tuple[float, float] = (0.25, 0.5)


@dataclass
class StrongAffineConfig:
    """A random affine move of the strong view relative to the weak one; the teacher's
    pseudo-labels are warped the same way. Off by default (prob 0), as in the paper."""

    prob: float = field(default=0.0, metadata=_range(0, 1))
    degrees: float = field(default=0.0, metadata=_range(0, 180))
    scale: tuple[float, float] = (1.0, 1.0)
    # Largest shift, as a fraction of the crop, along each axis.
    translate: float = field(default=0.0, metadata=_range(0, 1))


@dataclass
class AugmentConfig:
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    # Mild photometric distortion on the weak view too.
    weak_photometric: bool = False
    # Strong photometric set: "reference" (one of five ops), "unimatch" (jitter/gray/blur),
    # "mild" (brightness/contrast + noise), "none".
    strong: Literal["reference", "unimatch", "mild", "none"] = "reference"
    # Sigma range of the strong sets' Gaussian blur, in pixels. The reference's 0.1-2.0 was
    # set for 321-512 px crops; on small images it can erase a texture (docs/synthetic.md).
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix: CutMixConfig = field(default_factory=CutMixConfig)
    strong_affine: StrongAffineConfig = field(default_factory=StrongAffineConfig)


@dataclass
class ModelConfig:
    backbone: Literal[
        "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "mobilenet_v3_small"
    ] = "resnet18"
    # Channel multiplier; only for the small backbones (resnet18/34, mobilenets).
    width: float = field(default=1.0, metadata=_range(0.0625, 4, lo_open=False))
    output_stride: Literal[8, 16, 32] = 16
    # ResNets only: false drops the stem's max-pool, halving every stride (small images).
    stem_pool: bool = True
    aspp_channels: int = field(default=256, metadata=_range(8))
    aspp_rates: tuple[int, int, int] = (6, 12, 18)
    aspp_dropout: float = field(default=0.5, metadata=_range(0, 1, hi_open=True))
    low_level_channels: int = field(default=48, metadata=_range(4))
    decoder_channels: int = field(default=256, metadata=_range(8))
    # None (random init), "imagenet" (torchvision weights API), "source" (this layout's
    # backbone pre-trained on the embedded source task, made on first use: `run.py pretrain`)
    # or a path to a state dict.
    pretrained: Optional[str] = None


@dataclass
class MethodConfig:
    # "oracle": one student learning from the unlabeled images' ground truth through the
    # same views and CutMix (the split's unlabeled list must name masks): an upper bound that
    # measures what the augmentations let through, not a method.
    name: Literal["mkd", "supervised", "mean_teacher", "cps", "oracle"] = "mkd"
    # How the two branches start: "independent" random weights everywhere, or
    # "shared_backbone": one random backbone copied into both, heads still distinct, as
    # when both branches load the same pretrained backbone (the paper's setting).
    branch_init: Literal["independent", "shared_backbone"] = "independent"
    ema_decay: float = field(default=0.99, metadata=_range(0, 1, hi_open=True))
    # What happens to BatchNorm running statistics at the teacher update.
    bn_buffers: Literal["ema", "copy", "none"] = "ema"
    tau_t: float = field(default=0.95, metadata=_range(0, 1))
    tau_s: float = field(default=0.0, metadata=_range(0, 1))
    # "fixed" uses tau_t for every class; "class_adaptive" scales it per class by how
    # often the class is confidently predicted (FlexMatch-style), never below the floor.
    threshold_mode: Literal["fixed", "class_adaptive"] = "fixed"
    adaptive_floor: float = field(default=0.5, metadata=_range(0, 1))
    # Multiply the teachers' class probabilities by (labeled class share) / (their running
    # mean on unlabeled pixels) before thresholds and argmax (ReMixMatch's distribution
    # alignment), so a class the teachers under-predict is not taught away. Not in the reference.
    distribution_alignment: bool = False
    # "passed": mean over pixels above threshold (reference); "valid": mean over all
    # valid pixels, so the loss shrinks when few pass (UniMatch).
    loss_norm: Literal["passed", "valid"] = "passed"
    lambda_st: float = field(default=1.5, metadata=_range(0))
    lambda_ss: float = field(default=1.0, metadata=_range(0))
    # Labeled and unlabeled images go through each network in forwards of their own (the
    # reference), so BatchNorm's batch statistics never mix them; false: one concatenated
    # forward, whose statistics shift the labeled images' normalisation.
    split_forward: bool = True
    # Distillation terms also over the labeled images (the reference does this).
    distill_labeled: bool = False
    # Resolution of the maps the distillation terms read, as a fraction of the input: the
    # student's and teacher's logits resized bilinearly, the CutMix box and the valid mask by
    # nearest neighbour. The reference uses half its head's resolution, 1/8 of the input.
    distill_scale: float = field(default=1.0, metadata=_range(0, 1, lo_open=True))
    feature_aug: Literal["isda", "dropout", "none"] = "isda"
    lam_max: float = field(default=1.5, metadata=_range(0))
    isda_teachers: bool = True
    # ISDA as the reference has it (pipelines/voc.yaml): the logit offsets read the classifier
    # weights detached, so ISDA moves the features, not the classifier.
    isda_detach_weights: bool = False
    # The class a student's unlabeled pixel is augmented towards: its training target (the
    # teacher's label) or its own argmax (reference).
    isda_unlabeled_target: Literal["pseudo_label", "own_argmax"] = "pseudo_label"
    # Knowledge selection reads the teacher's confidence before its ISDA (reference) or after.
    select_before_isda: bool = False
    fp_dropout: float = field(default=0.5, metadata=_range(0, 1, hi_open=True))
    # Sigmoid ramp-up of lambda_st / lambda_ss over the first iterations (0 = off).
    rampup_iters: int = field(default=0, metadata=_range(0))
    # Supervised-only warm-up: no distillation before this step; the ramp-up starts here.
    warmup_iters: int = field(default=0, metadata=_range(0))

    @property
    def uses_unlabeled(self) -> bool:
        """Whether the method reads unlabeled images at all (the supervised baseline never does)."""
        return self.name != "supervised"

    def reads_unlabeled(self, step: int) -> bool:
        """Whether training step `step` (1-based) reads unlabeled images: no warm-up step does."""
        return step > self.warmup_iters

    def unlabeled_from(self, steps_done: int) -> int:
        """The step count after which batches read unlabeled images, for a run resumed after
        `steps_done` steps: the unlabeled streams (indexed by step, hence the same batches
        either way) start after the warm-up."""
        return max(steps_done, self.warmup_iters)


@dataclass
class TrainConfig:
    iters: int = field(default=3000, metadata=_range(1))
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = field(default=0.01, metadata=_range(0, lo_open=True))
    momentum: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    weight_decay: float = field(default=1e-4, metadata=_range(0))
    poly_power: float = field(default=0.9, metadata=_range(0))
    # Learning-rate multiplier for the decoder (the paper's x10 on the head).
    head_lr_mult: float = field(default=1.0, metadata=_range(0, lo_open=True))
    eval_interval: int = field(default=500, metadata=_range(1))
    checkpoint_interval: int = field(default=500, metadata=_range(0))
    # End this invocation at this step, after a checkpoint (0 = run to `iters`); starting
    # the run again under the same name continues it. The schedule still spans `iters`.
    stop_at: int = field(default=0, metadata=_range(0))
    log_interval: int = field(default=50, metadata=_range(1))
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Autocast: bf16 on CPU or GPU, fp16 (with a grad scaler) on GPU only.
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    # Torch intra-op threads in the training process (0 = torch's default).
    threads: int = field(default=0, metadata=_range(0))
    # On a CPU with 2+ threads, run the two branches (teacher i and student i forward, then
    # student i's backward) side by side on half the threads each: small kernels use one
    # thread far better than two. Ignored on GPU and for one-student methods.
    parallel_branches: bool = True
    # A Ray run or sweep in which no run reports progress (a log line or an evaluation) for
    # this many seconds stops with an error naming what waits for what (0 = never). Raise it
    # where a log interval or an evaluation takes longer (large images, slow nodes).
    stall_timeout_s: float = field(default=300.0, metadata=_range(0))

    @property
    def last_step(self) -> int:
        """The step this invocation ends at (`stop_at`, else `iters`)."""
        return min(self.iters, self.stop_at or self.iters)

    def checkpoint_due(self, step: int) -> bool:
        interval = self.checkpoint_interval
        return bool(interval and step % interval == 0) or step == self.last_step


@dataclass
class EvalConfig:
    mode: Literal["whole", "center", "sliding"] = "whole"
    # student = S1 (the reference), teacher = T1, ensemble = mean softmax of S1 and S2.
    model: Literal["student", "teacher", "ensemble"] = "student"
    stride_ratio: float = field(default=2 / 3, metadata=_range(0, 1, lo_open=True))


@dataclass
class ScalingConfig:
    num_workers: int = field(default=1, metadata=_range(0))
    cpus_per_worker: float = field(default=1.0, metadata=_range(0, lo_open=True))
    use_gpu: bool = False
    # CPUs each Ray Data augmentation actor reserves (one actor per worker, as far as the
    # cluster's free CPUs go, at least one); below 1 lets several trials of a sweep share a
    # small machine (their workers must leave this much free, or the stream stalls).
    data_cpus: float = field(default=1.0, metadata=_range(0, lo_open=True))
    # Where Ray places the workers: PACK fills a node first; SPREAD / STRICT_SPREAD put them
    # on different nodes (one worker per node with STRICT_SPREAD).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


@dataclass
class ExperimentConfig:
    name: str = "mkd"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for MLflow params."""
        return flatten(self.to_dict())


# ----------------------------------------------------------------------------- building


def _to_plain(value):
    if isinstance(value, Override):
        return value
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and Ellipsis not in args:
            return f"a list of {len(args)} {_describe(args[0])} values"
        return f"a list of {_describe(args[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


@dataclass(frozen=True)
class Override:
    """A --set value: the text as typed and its YAML reading. String fields take the text,
    so `data.split=1_16` stays "1_16" (YAML 1.1 would read the integer 116)."""

    text: str
    parsed: Any


def _wants_text(tp) -> bool:
    if tp is str:
        return True
    origin = typing.get_origin(tp)
    if origin is Literal:
        return all(isinstance(c, str) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_wants_text(a) for a in typing.get_args(tp))
    return False


def _coerce(value, tp, path: str):
    """Check `value` against the annotation `tp`; return it in canonical form."""
    if isinstance(value, Override):
        value = value.text.strip() if _wants_text(tp) and isinstance(value.parsed, (int, float, str)) else value.parsed
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ConfigError(path, f"got {value!r}; expected {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"got {value!r}; expected {_describe(tp)}")
        args = typing.get_args(tp)
        if origin is tuple and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(path, f"got {len(value)} values; expected {_describe(tp)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ConfigError(path, f"got the number {value!r}; expected a string (quote it in YAML: '1_16' unquoted reads as 116)")
    raise ConfigError(path, f"got {value!r} ({type(value).__name__}); expected {_describe(tp)}")


def _check_range(value, spec, path: str) -> None:
    lo, hi, lo_open, hi_open = spec
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(path, f"got {value!r}; expected a value in {left}{lo_s}, {hi_s}{right}")


def unknown_key_error(key: str, known, path: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(known))}"
    return ConfigError(path, f"unknown key {key!r}{hint}")


def _build(cls, data, path: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(str(key), fields, f"{path}.{key}" if path else str(key))
    values = {}
    for name, f in fields.items():
        if name not in data:
            continue
        sub = f"{path}.{name}" if path else name
        value = _coerce(data[name], hints[name], sub)
        if "range" in f.metadata and value is not None:
            _check_range(value, f.metadata["range"], sub)
        values[name] = value
    return cls(**values)


def _check_pair(pair, path: str, lo: float, hi: float) -> None:
    a, b = pair
    if not (lo <= a <= b <= hi):
        raise ConfigError(path, f"got {list(pair)}; expected [min, max] with {lo} <= min <= max <= {hi}")


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Checks that involve more than one field."""
    d, m = cfg.data, cfg.model
    _check_pair(cfg.augment.scale_range, "augment.scale_range", 0.05, 10.0)
    _check_pair(cfg.augment.cutmix.area, "augment.cutmix.area", 0.0, 1.0)
    _check_pair(cfg.augment.blur_sigma, "augment.blur_sigma", 0.01, 20.0)
    _check_pair(cfg.augment.strong_affine.scale, "augment.strong_affine.scale", 0.1, 10.0)
    if d.class_names is not None and len(d.class_names) != d.num_classes:
        raise ConfigError(
            "data.class_names", f"has {len(d.class_names)} names; expected data.num_classes={d.num_classes}"
        )
    if d.dataset == "synthetic" and d.class_names is not None:
        from mkd_ray.data.scenes import class_names

        expected = class_names(d.synth.kind)
        if list(d.class_names) != expected:
            raise ConfigError("data.class_names", f"got {list(d.class_names)}; the {d.synth.kind!r} synthetic "
                              f"scenes have {expected} (set them, or change data.synth.kind)")
    if 0 <= d.ignore_index < d.num_classes:
        raise ConfigError("data.ignore_index", f"{d.ignore_index} collides with a class id (0..{d.num_classes - 1})")
    if m.width != 1.0 and m.backbone in ("resnet50", "resnet101"):
        raise ConfigError("model.width", "a width multiplier is only available for resnet18/34 and the mobilenets")
    if any(r < 1 for r in m.aspp_rates):
        raise ConfigError("model.aspp_rates", f"got {list(m.aspp_rates)}; dilation rates must be >= 1")
    if m.backbone.startswith("mobilenet") and not m.stem_pool:
        raise ConfigError("model.stem_pool", "only ResNet backbones can drop the stem max-pool")
    if m.backbone.startswith("mobilenet") and m.output_stride == 8:
        raise ConfigError("model.output_stride", "mobilenet backbones support output stride 16 or 32")
    _check_pretrained(m)
    if cfg.train.amp == "fp16" and not cfg.scaling.use_gpu and cfg.train.device != "cuda":
        raise ConfigError("train.amp", "fp16 autocast needs a GPU; use 'bf16' on the CPU")
    if cfg.train.device == "cuda" and not cfg.scaling.use_gpu and cfg.scaling.num_workers > 0:
        raise ConfigError("train.device", "device 'cuda' under Ray needs scaling.use_gpu=true")
    return cfg


_NAMED_WEIGHTS = (None, "imagenet", "source")


def _check_pretrained(m: ModelConfig) -> None:
    """Weights are loaded when the model is built, after the dataset check; a wrong
    model.pretrained fails here instead, before any work. The string 'none' is a file name
    like any other: YAML spells "no weights" null."""
    if m.pretrained == "imagenet" and m.width != 1.0:
        raise ConfigError("model.pretrained", "ImageNet weights exist only for model.width=1.0")
    if m.pretrained not in _NAMED_WEIGHTS and not Path(m.pretrained).is_file():
        raise ConfigError("model.pretrained", f"weights file {m.pretrained!r} does not exist; expected a path to an "
                          "existing weights file, 'imagenet', 'source' (the embedded source task's backbone), or null "
                          "for random initialisation (--set model.pretrained=null)")


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", parsed value); values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "an override must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from None
    return key, Override(raw, value)


def apply_overrides(tree: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (in place); intermediate mappings are created."""
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides)
    for key, value in items:
        node = tree
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is {nxt!r}, not a section; cannot set {key}")
            node = nxt
        node[parts[-1]] = value
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level")
    return data


def config_from_dict(tree: dict, overrides: list[str] | dict[str, Any] = ()) -> ExperimentConfig:
    tree = apply_overrides(_to_plain(tree), overrides)
    return validate(_build(ExperimentConfig, tree, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()) -> ExperimentConfig:
    """Pipeline YAML (or the defaults) + dotted overrides -> validated config."""
    tree = read_yaml(path) if path is not None else {}
    return config_from_dict(tree, overrides)


def with_absolute_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """Relative dataset and weight paths resolved against `base` (the driver's working
    directory), so that workers, whose working directory differs, read the same files."""
    base = Path.cwd() if base is None else Path(base)

    def absolute(value: Optional[str]) -> Optional[str]:
        return value if value is None or "://" in value else str((base / value).resolve())

    data = dataclasses.replace(cfg.data, root=absolute(cfg.data.root), splits_dir=absolute(cfg.data.splits_dir))
    if (base / cfg.data.split / "labeled.txt").is_file():
        data = dataclasses.replace(data, split=absolute(cfg.data.split))
    model = cfg.model
    if model.pretrained not in _NAMED_WEIGHTS:
        model = dataclasses.replace(model, pretrained=absolute(model.pretrained))
    return dataclasses.replace(cfg, data=data, model=model)
