"""The single-process training loop: the method core driven without Ray.

`train_local` is what `python run.py train --local` runs and what tests and the
framework-overhead benchmark compare Ray Train against; the distributed loop reuses
`build_method`, `to_batch`, `run_evaluation` and `ProgressMeter` from here.
"""

from __future__ import annotations

import inspect
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mkd_ray import checkpoint as ckpt
from mkd_ray.config import ExperimentConfig
from mkd_ray.console import TrainingDiverged
from mkd_ray.data.sources import ExperimentData, checked_data, ensure_synthetic
from mkd_ray.data.torch_data import eval_batches, training_streams
from mkd_ray.data.io import mask_png
from mkd_ray.evaluate import center_box, evaluate, normalize
from mkd_ray.method import Batch, MutualKD, build_optimizer, train_step
from mkd_ray.metrics import MeanIoU
from mkd_ray.models import build_model
from mkd_ray.models.pretrain import torch_threads, with_source_backbone


def resolve_device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and cfg.scaling.use_gpu and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_method(cfg: ExperimentConfig) -> MutualKD:
    def make_model(branch: int):
        model = build_model(cfg.model, cfg.data.num_classes, seed=cfg.train.seed * 1000 + branch)
        if branch and cfg.method.branch_init == "shared_backbone":
            first = build_model(cfg.model, cfg.data.num_classes, seed=cfg.train.seed * 1000)
            model.backbone.load_state_dict(first.backbone.state_dict())
        return model

    return MutualKD(cfg.method, make_model, cfg.data.num_classes, cfg.train.iters, cfg.data.ignore_index)


_DDP_OPTIONS = inspect.signature(DistributedDataParallel.__init__).parameters


def configure_threads(cfg: ExperimentConfig, method: MutualKD, device: torch.device) -> None:
    """Torch threads for this training process (`train.threads`, else torch's default), and
    whether the two branches of a step run side by side (`train.parallel_branches`)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    threads = torch.get_num_threads()
    if cfg.train.parallel_branches and device.type == "cpu" and len(method.students) == 2 and threads >= 2:
        method.branches.parallel(threads // 2)


def distribute_students(method: MutualKD, device: torch.device) -> None:
    """Wrap each student in DDP. Students whose backwards run side by side (see
    `configure_threads`) each all-reduce in a process group of their own: on one group, ranks
    could issue the two students' collectives in different orders. Every rank decides alike
    (same config, same CPUs per worker), as `new_group` must be called on all of them."""
    groups = iter([dist.new_group() if method.branches.is_parallel else None for _ in method.students])
    method.wrap_students(lambda student: distributed_student(student, device, next(groups)))


def distributed_student(student: torch.nn.Module, device: torch.device,
                        process_group: Optional[dist.ProcessGroup] = None) -> DistributedDataParallel:
    """A student under DDP, set up for the cost of a step: gradients live in DDP's buckets
    (no copy in and out), and BatchNorm statistics are not broadcast before every forward.
    In training mode BatchNorm normalises by the batch, so only the running statistics drift
    apart between ranks; the distributed loop copies rank 0's to every rank before each
    evaluation and checkpoint. Measured on 2 cores: 121 -> 113 ms per MKD step (1 thread per
    rank; 100 ms without DDP)."""
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers (both keep the sync at start).
    no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                       else {"broadcast_buffers": False})
    device_ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=device_ids, gradient_as_bucket_view=True,
                                   process_group=process_group, **no_forward_sync)


def is_report_step(step: int, cfg: ExperimentConfig) -> bool:
    """Steps that log, evaluate or checkpoint: the only ones that read values off the device."""
    t = cfg.train
    return step % t.log_interval == 0 or step % t.eval_interval == 0 or t.checkpoint_due(step)


def to_batch(labeled: dict, unlabeled: Optional[dict], cfg: ExperimentConfig, device: torch.device) -> Batch:
    """Collated uint8/bool tensors -> a normalised Batch on `device`."""
    mean, std = cfg.data.mean, cfg.data.std
    x_l = normalize(labeled["image"].to(device, non_blocking=True), mean, std)
    y_l = labeled["mask"].to(device, non_blocking=True).long()
    if unlabeled is None:
        return Batch.labeled_only(x_l, y_l)
    return Batch(
        x_l=x_l,
        y_l=y_l,
        x_w=normalize(unlabeled["weak"].to(device, non_blocking=True), mean, std),
        x_s=normalize(unlabeled["strong"].to(device, non_blocking=True), mean, std),
        ignore_u=unlabeled["ignore"].to(device, non_blocking=True),
        cutmix=unlabeled["cutmix"].to(device, non_blocking=True),
        y_u=unlabeled["mask"].to(device, non_blocking=True).long(),
        # Without a strong affine every warp is the identity: skip the resampling.
        warp=unlabeled["warp"].to(device, non_blocking=True) if cfg.augment.strong_affine.prob > 0 else None,
    )


def run_evaluation(method: MutualKD, cfg: ExperimentConfig, batches, device, on_prediction=None) -> MeanIoU:
    method.eval()
    try:
        return evaluate(
            method.predictor(cfg.eval.model),
            batches,
            cfg.data.num_classes,
            cfg.data.mean,
            cfg.data.std,
            mode=cfg.eval.mode,
            crop=cfg.data.crop_size,
            stride_ratio=cfg.eval.stride_ratio,
            ignore_index=cfg.data.ignore_index,
            device=device,
            on_prediction=on_prediction,
        )
    finally:
        method.train()


# Step metrics a step may leave undefined (nan): accuracy of the kept pseudo-labels when the
# threshold kept no pixel.
_UNDEFINED_SOME_STEPS = ("pseudo_acc", "pseudo_acc_kept")


@dataclass
class ProgressMeter:
    """Images/s, ETA and averaged step metrics between log lines; .item() only here."""

    total_iters: int
    start_step: int = 0
    # Ranks stepping in lockstep: images/s counts the whole group's.
    ranks: int = 1
    _t0: float = field(default_factory=time.perf_counter)
    _last_t: float = field(default_factory=time.perf_counter)
    _last_step: int = 0
    _sums: dict = field(default_factory=dict)
    _counts: dict = field(default_factory=dict)
    _n: int = 0
    _images: int = 0
    # Stays a tensor (no host sync per step); read at report steps through `finite_flag()`.
    _finite: Optional[torch.Tensor] = None
    # Unreadable unlabeled images the stream replaced (a CPU count, read from the batches).
    skipped: int = 0

    def __post_init__(self):
        self._last_step = self.start_step

    def add(self, metrics: dict[str, torch.Tensor], images: int = 0) -> None:
        """One step's metrics and the images it read on this rank (warm-up steps read no
        unlabeled ones)."""
        self._images += images
        for key, value in metrics.items():
            value = value.detach()
            if key in _UNDEFINED_SOME_STEPS:  # averaged over the steps that defined it
                defined = torch.isfinite(value)
                self._counts[key] = self._counts.get(key, 0) + defined
                value = torch.where(defined, value, torch.zeros_like(value))
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._n += 1
        finite = torch.isfinite(metrics["loss"].detach())
        self._finite = finite if self._finite is None else self._finite & finite

    def count_skipped(self, unlabeled_batch: Optional[dict]) -> None:
        if unlabeled_batch is not None:
            self.skipped += int(unlabeled_batch["skipped"].sum())

    def finite_flag(self) -> torch.Tensor:
        """1 while every loss since the start of this invocation was finite, else 0 (a tensor)."""
        return torch.ones(()) if self._finite is None else self._finite.float().cpu()

    def summary(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        rate = steps / max(now - self._last_t, 1e-9)
        out = {k: float(v) / max(self._n, 1) for k, v in self._sums.items()}
        for key, count in self._counts.items():  # nan where no step defined it
            out[key] = float(self._sums[key]) / float(count) if float(count) else float("nan")
        out["images_per_s"] = self._images * self.ranks / max(now - self._last_t, 1e-9)
        out["seconds_per_iter"] = 1.0 / rate
        out["eta_s"] = (self.total_iters - step) / rate
        # Peak resident memory of this process so far (Linux reports KiB).
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self._sums, self._counts, self._n, self._images, self._last_t, self._last_step = {}, {}, 0, 0, now, step
        return out

    @staticmethod
    def line(step: int, total: int, values: dict[str, float]) -> str:
        keys = ("loss", "loss_sup", "loss_st", "loss_ss", "mask_ratio", "pseudo_acc", "pseudo_acc_kept", "data_wait_fraction")
        parts = [f"{k}={values[k]:.3f}" if math.isfinite(values[k]) else f"{k}=-" for k in keys if k in values]
        return (
            f"step {step}/{total}  " + "  ".join(parts)
            + f"  {values['images_per_s']:.1f} img/s  eta {values['eta_s'] / 60:.1f} min"
        )


# For loops run inside a caller's process: `configure_threads` sets the process's torch threads
# (`train.threads`, half of them with the branches side by side); put them back after.
@torch_threads()
def train_local(
    cfg: ExperimentConfig,
    log: Callable[[str], None] = print,
    on_metrics: Optional[Callable[[int, dict[str, float]], None]] = None,
    data: Optional[ExperimentData] = None,
    checkpoint_dir: Optional[Path] = None,
) -> dict:
    """Train in this process; returns final validation metrics and timing.

    With `checkpoint_dir`, a checkpoint is written every `train.checkpoint_interval` steps
    and at the end, and a run started again on the same directory resumes from it
    (`train.stop_at` ends an invocation early, as an interruption would).
    """
    torch.manual_seed(cfg.train.seed)
    ensure_synthetic(cfg, log)
    data = data or checked_data(cfg, log)
    cfg = with_source_backbone(cfg, log)  # after the checks: pre-training takes minutes
    device = resolve_device(cfg)
    method = build_method(cfg).to(device)
    configure_threads(cfg, method, device)
    if cfg.train.channels_last:
        method.to(memory_format=torch.channels_last)
    method.train()
    optimizer, scheduler = build_optimizer(method, cfg.train)
    start_step = 0
    if checkpoint_dir is not None and (Path(checkpoint_dir) / ckpt.FILENAME).is_file():
        state = ckpt.load_state(checkpoint_dir)
        ckpt.check_compatible(ckpt.checkpoint_config(state), cfg, str(checkpoint_dir))
        start_step = ckpt.restore(state, method, optimizer, scheduler, cfg.train)
        log(f"resumed from {checkpoint_dir} at step {start_step}")
    scaler = torch.amp.GradScaler() if cfg.train.amp == "fp16" else None
    labeled, unlabeled = training_streams(data.labeled, data.unlabeled if method.uses_unlabeled else None, cfg,
                                          start_step)
    meter = ProgressMeter(cfg.train.iters, start_step)
    history: list[dict] = []
    result: dict = {}
    start = time.perf_counter()
    last_step = cfg.train.last_step
    for step in range(start_step + 1, last_step + 1):
        unlabeled_batch = next(unlabeled) if unlabeled and cfg.method.reads_unlabeled(step) else None
        meter.count_skipped(unlabeled_batch)
        batch = to_batch(next(labeled), unlabeled_batch, cfg, device)
        out = train_step(method, optimizer, scheduler, batch, cfg.train.amp, scaler)
        meter.add(out.metrics, batch.num_images)
        if is_report_step(step, cfg) and not meter.finite_flag():
            raise TrainingDiverged.at(step, optimizer.param_groups[0]["lr"])
        if step % cfg.train.log_interval == 0 or step == cfg.train.iters:
            values = meter.summary(step)
            log(ProgressMeter.line(step, cfg.train.iters, values))
            history.append({"step": step, **values, "data/skipped": meter.skipped})
            if on_metrics:
                on_metrics(step, {**{f"train/{k}": v for k, v in values.items()}, "data/skipped": meter.skipped})
        if step % cfg.train.eval_interval == 0 or step == cfg.train.iters:
            meter_iou = run_evaluation(method, cfg, eval_batches(data.val, cfg, cfg.data.val_batch_size), device)
            result = {"val/miou": meter_iou.miou(), "val/iou": meter_iou.per_class(), "step": step}
            log(f"step {step}: val mIoU {result['val/miou']:.2f}")
            if on_metrics:
                on_metrics(step, {"val/miou": result["val/miou"]})
        if checkpoint_dir is not None and cfg.train.checkpoint_due(step):
            ckpt.save_checkpoint(checkpoint_dir, cfg, method, optimizer, scheduler)
    result["seconds"] = time.perf_counter() - start
    result["seconds_per_iter"] = result["seconds"] / max(last_step - start_step, 1)
    result["history"] = history
    result["method"] = method
    return result


def evaluate_checkpoint(state: dict, cfg: ExperimentConfig, keep_predictions: bool = False,
                        data: Optional[ExperimentData] = None) -> tuple[dict, dict[str, bytes]]:
    """Score a checkpoint on the validation split of `cfg`: (metrics, predictions), where
    predictions (if kept) map each image name to a palette PNG at the image's original size
    (outside a centre crop: 255) holding the class ids the metric used."""
    method = build_method(cfg)
    ckpt.restore(state, method)
    device = resolve_device(cfg)
    method.to(device)
    data = data or checked_data(cfg)
    predictions: dict[str, bytes] = {}

    def keep(batch, pred):
        for name, mask, p in zip(batch["name"], batch["mask"], pred.cpu().numpy()):
            full = np.full(mask.shape, cfg.data.ignore_index, dtype=np.uint8)
            top, left, h, w = center_box(*mask.shape, cfg.data.crop_size) if cfg.eval.mode == "center" else (0, 0, *mask.shape)
            full[top : top + h, left : left + w] = p
            predictions[name] = mask_png(full)

    batches = eval_batches(data.val, cfg, cfg.data.val_batch_size)
    meter = run_evaluation(method, cfg, batches, device, keep if keep_predictions else None)
    names = cfg.data.names
    result = {"val/miou": meter.miou(), **{f"val/iou/{n}": v for n, v in zip(names, meter.per_class())}, "step": int(state["step"])}
    return result, predictions
