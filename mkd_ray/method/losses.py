"""Loss pieces: thresholded cross-entropy, pseudo-labels, ramps. Pure tensor functions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pseudo_labels(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, label) per pixel: max softmax and argmax over the class dimension."""
    return class_max(logits.detach().float().softmax(dim=1))


def class_argmax(logits: torch.Tensor) -> torch.Tensor:
    return class_max(logits)[1]


def class_max(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, first index of the max) over the class dimension 1, as `scores.max(1)` gives.

    On CPU a reduction over the channel dimension with indices is slow (`max(1)` about 2x
    and `argmax(1)` about 15x slower than this), while `amax` is fast: so take the max, then
    the first class that reaches it, by weighting each match with (C - class) and taking
    the largest weight. A pixel with no match (NaN scores) gets the last class.
    """
    num_classes = scores.shape[1]
    top = scores.amax(dim=1, keepdim=True)
    first_wins = torch.arange(num_classes, 0, -1, dtype=torch.int32, device=scores.device)
    weight = ((scores == top) * first_wins.view(1, -1, *[1] * (scores.dim() - 2))).amax(dim=1)
    return top.squeeze(1), (num_classes - weight).long().clamp(max=num_classes - 1)


def masked_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, norm: str = "passed"
) -> torch.Tensor:
    """Cross-entropy over the pixels in `keep`.

    norm="passed": mean over the kept pixels (the reference marks the rest as ignore);
    norm="valid":  sum over kept pixels / number of valid pixels (UniMatch), which shrinks
    the loss when few pixels pass the threshold.
    """
    return masked_nll(logits.float().log_softmax(dim=1), target, keep, valid, norm)


def masked_nll(
    log_probs: torch.Tensor, target: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, norm: str = "passed"
) -> torch.Tensor:
    """`masked_cross_entropy` from log-probabilities, so that the loss terms of one network
    share one log-softmax (and its backward) over its logits."""
    per_pixel = F.nll_loss(log_probs, target.clamp(min=0, max=log_probs.shape[1] - 1), reduction="none")
    kept = keep.to(per_pixel.dtype)
    denom = kept.sum() if norm == "passed" else valid.to(per_pixel.dtype).sum()
    return (per_pixel * kept).sum() / denom.clamp(min=1.0)


def supervised_nll(log_probs: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    return masked_nll(log_probs, target, valid, valid, "passed")


def sigmoid_rampup(step: int, rampup_iters: int) -> float:
    """exp(-5 (1 - t)^2), the usual mean-teacher ramp; 1 once t >= 1 or with no ramp."""
    if rampup_iters <= 0 or step >= rampup_iters:
        return 1.0
    t = max(step, 0) / rampup_iters
    return math.exp(-5.0 * (1.0 - t) ** 2)


def cosine_rampup(step: int, total_iters: int, maximum: float) -> float:
    """0 -> maximum along half a cosine over the whole run (ISDA's lambda schedule)."""
    t = min(max(step / max(total_iters, 1), 0.0), 1.0)
    return maximum * 0.5 * (1.0 - math.cos(math.pi * t))
