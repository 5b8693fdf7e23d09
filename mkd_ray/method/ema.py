"""Mean-teacher updates: theta_T <- a * theta_T + (1 - a) * theta_S with a warm-up on a."""

from __future__ import annotations

import torch
from torch import nn


def ema_decay_at(step: int, ema_decay: float) -> float:
    """a = min(1 - 1/(step + 1), ema_decay): early teachers follow their students closely."""
    return min(1.0 - 1.0 / (step + 1), ema_decay)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, bn_buffers: str = "ema") -> None:
    """Blend student parameters into the teacher; BatchNorm buffers follow `bn_buffers`.

    "ema" blends float buffers like parameters, "copy" takes the student's buffers,
    "none" leaves the teacher's own (the teacher then normalises with batch statistics).
    """
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    if bn_buffers == "none":
        return
    pairs = list(zip(teacher.buffers(), student.buffers()))
    blended = [(t, s) for t, s in pairs if bn_buffers == "ema" and t.is_floating_point()]
    copied = [(t, s) for t, s in pairs if not (bn_buffers == "ema" and t.is_floating_point())]
    if blended:  # one multi-tensor op instead of a kernel launch per buffer
        torch._foreach_lerp_([t for t, _ in blended], [s for _, s in blended], 1.0 - decay)
    if copied:
        torch._foreach_copy_([t for t, _ in copied], [s for _, s in copied])
