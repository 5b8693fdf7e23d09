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
    blended, copied = ([], []), ([], [])  # (teacher, student) buffers; one multi-tensor op each
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        group = blended if bn_buffers == "ema" and t_buf.is_floating_point() else copied
        group[0].append(t_buf)
        group[1].append(s_buf)
    if blended[0]:
        torch._foreach_lerp_(*blended, 1.0 - decay)
    if copied[0]:
        torch._foreach_copy_(*copied)
