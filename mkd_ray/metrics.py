"""Confusion-matrix mIoU (mmseg's nanmean convention), mergeable across workers."""

from __future__ import annotations

import math

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU per class as float64; NaN where the class has no union (absent and never predicted)."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))


class MeanIoU:
    """Accumulates a confusion matrix; `matrix` can be summed across workers (all-reduce)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device=None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.matrix += confusion_matrix(pred, target.to(pred.device), self.num_classes, self.ignore_index)

    def merge(self, other: "MeanIoU") -> "MeanIoU":
        self.matrix += other.matrix.to(self.matrix.device)
        return self

    def per_class(self) -> list[float]:
        """Per-class IoU in percent (NaN for classes with no union)."""
        return [100.0 * v for v in iou_per_class(self.matrix).tolist()]

    def miou(self) -> float:
        """Mean IoU in percent over the classes whose union is non-zero."""
        return 100.0 * torch.nanmean(iou_per_class(self.matrix)).item()
