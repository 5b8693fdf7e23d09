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


class DistributionAligner(nn.Module):
    """Distribution alignment of the teachers' pseudo-labels (ReMixMatch-style).

    A teacher that under-predicts a class on unlabeled images teaches the students to
    under-predict it further, until the class collapses. Each pixel's class probabilities
    are multiplied by (class share in the labeled masks, shared by all teachers) / (that
    teacher's running mean probability on unlabeled pixels) and renormalised, so the
    pseudo-labels' class distribution is pulled towards the labeled one before confidence
    and argmax are read.
    """

    def __init__(self, num_classes: int, num_teachers: int = 1, momentum: float = 0.99):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("label_counts", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("predicted_mean", torch.zeros(num_teachers, num_classes))

    @torch.no_grad()
    def observe_labels(self, labels: torch.Tensor) -> None:
        """Count the labeled pixels per class (ids outside 0..C-1, e.g. ignore, are skipped)."""
        num_classes = self.label_counts.numel()
        known = labels[(labels >= 0) & (labels < num_classes)]
        self.label_counts += torch.bincount(known, minlength=num_classes).to(self.label_counts)

    @torch.no_grad()
    def align(self, t: int, probs: torch.Tensor, valid: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Teacher t's probs (B, C, H, W) -> aligned probs; its running mean reads the `valid`
        pixels' probabilities before alignment (first call: their mean, then an EMA).
        Teachers may call this side by side: each touches only its own row."""
        mean = self.predicted_mean[t]
        seen = bool(mean.any())
        if update and self.training and valid.any():
            m = self.momentum if seen else 0.0
            mean.mul_(m).add_((1 - m) * probs.movedim(1, -1)[valid].mean(dim=0))
            seen = True
        if not seen or not bool(self.label_counts.any()):
            return probs  # nothing to align to yet
        prior = (self.label_counts / self.label_counts.sum()).to(probs)
        ratio = prior / mean.clamp(min=1e-6)
        aligned = probs * ratio.view(1, -1, *[1] * (probs.dim() - 2))
        return aligned / aligned.sum(dim=1, keepdim=True).clamp(min=1e-12)
