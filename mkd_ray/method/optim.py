"""Optimizer, poly learning-rate schedule and the one-iteration update shared by every loop."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from mkd_ray.config import TrainConfig
from mkd_ray.method.mkd import Batch, MutualKD, StepOutput


def poly_lr_lambda(total_iters: int, power: float):
    """LambdaLR factor (1 - t / T) ** power."""

    def factor(step: int) -> float:
        return max(1.0 - step / total_iters, 0.0) ** power

    return factor


def build_optimizer(method: MutualKD, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """One optimizer over both students; the decoder may get a larger learning rate."""
    backbone, head = [], []
    for student in method.students:
        backbone += list(student.backbone_parameters())
        head += list(student.head_parameters())
    backbone_lr, head_lr = base_learning_rates(cfg)
    groups = [{"params": backbone, "lr": backbone_lr}, {"params": head, "lr": head_lr}]
    # Fused kernels (CPU and CUDA): by default torch loops over the parameters on CPU, which
    # cost a fifth of an MKD step here; fused AdamW is about 6x faster than that loop.
    if cfg.optimizer == "sgd":
        # Except fused SGD under a GradScaler (fp16): on an overflow step the scaler skips it
        # still creates its momentum buffer, unfilled (torch 2.11-2.14), and the next step
        # reads that memory: an early overflow turned every weight NaN.
        fused = cfg.amp != "fp16"
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                    fused=fused, foreach=not fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(cfg.iters, cfg.poly_power))
    return optimizer, scheduler


def base_learning_rates(cfg: TrainConfig) -> list[float]:
    """Of the backbone and the decoder parameter groups, before the poly decay."""
    return [cfg.lr, cfg.lr * cfg.head_lr_mult]


def apply_train_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                       cfg: TrainConfig) -> None:
    """Make a restored optimizer follow `cfg` from here on. A resumed run changes nothing
    (same values); a PBT trial continues another trial's weights under new hyperparameters."""
    scheduler.base_lrs = base_learning_rates(cfg)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group.update(initial_lr=base, lr=base * factor, weight_decay=cfg.weight_decay)
        if "momentum" in group:
            group["momentum"] = cfg.momentum


def autocast_context(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    # No cast cache: a student runs a forward per part (split_forward), and a cached weight
    # cast shared by both would sum their gradients in half precision, or not, depending on
    # whether the cache survived; separate casts make a step's result the same on any thread.
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


def train_step(
    method: MutualKD,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch: Batch,
    amp: str = "off",
    scaler: Optional[torch.amp.GradScaler] = None,
) -> StepOutput:
    """Teacher update, forward, backward and one optimizer step for both students."""
    method.update_teachers()
    with autocast_context(amp, batch.x_l.device):
        out = method.compute_losses(batch)
    optimizer.zero_grad(set_to_none=True)
    # Scaled here, on this thread: the scaler creates its scale on first use.
    parts = [scaler.scale(part) for part in out.backward_parts] if scaler is not None else out.backward_parts
    method.branches.map(torch.Tensor.backward, parts)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    method.iteration += 1
    out.metrics["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return out
