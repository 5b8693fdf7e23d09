"""Knowledge selection: which pseudo-labelled pixels a student learns from."""

from __future__ import annotations

import torch
from torch import nn


class KnowledgeSelector(nn.Module):
    """A confidence threshold per class.

    "fixed": tau for every class. "class_adaptive" (FlexMatch-style): each class's
    threshold is tau scaled by how often that class is confidently predicted relative to
    the most confident class, mapped by x / (2 - x) and never below `floor`, so classes the
    teacher is still learning get more pseudo-labels.
    """

    def __init__(self, num_classes: int, tau: float, mode: str = "fixed", floor: float = 0.5, momentum: float = 0.99):
        super().__init__()
        self.tau, self.mode, self.floor, self.momentum = tau, mode, floor, momentum
        self.register_buffer("confident_share", torch.zeros(num_classes))

    def thresholds(self) -> torch.Tensor:
        if self.mode == "fixed":
            return torch.full_like(self.confident_share, self.tau)
        beta = self.confident_share / self.confident_share.max().clamp(min=1e-12)
        return (self.tau * beta / (2.0 - beta)).clamp(min=min(self.floor, self.tau))

    def select(self, conf: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the pixels to learn from; updates the class statistics in training."""
        passed = valid & (conf >= self.thresholds()[label])
        if self.mode == "class_adaptive" and self.training:
            self._update(conf, label, valid)
        return passed

    @torch.no_grad()
    def _update(self, conf: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> None:
        confident = valid & (conf >= self.tau)
        counts = torch.zeros_like(self.confident_share).scatter_add_(0, label.reshape(-1), confident.reshape(-1).float())
        share = counts / valid.sum().clamp(min=1)
        self.confident_share.mul_(self.momentum).add_((1 - self.momentum) * share)
