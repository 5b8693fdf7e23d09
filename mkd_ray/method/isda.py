"""Implicit semantic data augmentation (Wang et al., 2019) on segmentation features.

Each network keeps a running per-class mean and diagonal covariance of the features that
feed its 1x1 classifier. For a pixel whose (pseudo-)label is y the logits become
    z_j + 0.5 * lam * sum_a (w_ja - w_ya)^2 * sigma^2_ya,
the closed-form upper bound of the expected cross-entropy over Gaussian feature
perturbations along the class's directions of variation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassFeatureStats(nn.Module):
    """Online per-class mean / diagonal variance of D-dimensional features (C x D)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_classes, dim))
        self.register_buffer("var", torch.zeros(num_classes, dim))
        self.register_buffer("count", torch.zeros(num_classes))

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """features (B, D, h, w), labels (B, H, W) at any resolution (resized by nearest);
        labels outside 0..C-1 (the ignore index) are left out."""
        dim = features.shape[1]
        labels = nearest_resize(labels, features.shape[-2:]).reshape(-1)
        feats = features.detach().float().permute(0, 2, 3, 1).reshape(-1, dim)
        # Left-out pixels get an all-zero one-hot row rather than being indexed out: boolean
        # indexing would wait for the device to count them. So do non-finite features (an
        # fp16 overflow, whose step the GradScaler skips): one would poison the statistics
        # for good.
        finite = torch.isfinite(feats.sum(1, keepdim=True))  # as .all(1) of isfinite, and 15x faster on CPU
        feats = feats.where(finite, 0.0)
        onehot = (class_one_hot(labels, self.mean.shape[0]) & finite).to(feats.dtype)  # (N, C)
        n_new = onehot.sum(0)  # (C,)
        sums, sq_sums = (onehot.t() @ torch.cat([feats, feats * feats], 1)).split(dim, 1)  # (C, D) each
        safe = n_new.clamp(min=1)[:, None]
        batch_mean = sums / safe
        batch_var = sq_sums / safe - batch_mean**2
        # Merge two populations: weights by counts; the mean shift adds to the variance.
        w = (n_new / (self.count + n_new).clamp(min=1))[:, None]
        delta = batch_mean - self.mean
        self.var.mul_(1 - w).add_(w * batch_var + w * (1 - w) * delta**2)
        self.mean.add_(w * delta)
        self.count.add_(n_new)

    def logit_offsets(self, weight: torch.Tensor, lam: float, detach_weight: bool = False) -> torch.Tensor:
        """(C, C) matrix A with A[y, j] = 0.5 lam sum_a (w_ja - w_ya)^2 sigma^2_ya; with
        `detach_weight` no gradient reaches the classifier through A."""
        if detach_weight:
            weight = weight.detach()
        weight = weight.reshape(weight.shape[0], -1).float()  # (C, D) from a 1x1 conv
        diff = weight[None, :, :] - weight[:, None, :]  # [y, j, a] = w_ja - w_ya
        return 0.5 * lam * (diff**2 * self.var[:, None, :]).sum(-1)


def augment_logits(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Add the row offsets[y] to the logits of every pixel labelled y; pixels labelled
    outside 0..C-1 (the ignore index) unchanged."""
    # A one-hot product rather than offsets[labels]: same rows, and its backward is a matmul
    # instead of a scatter, about 3x faster on CPU.
    onehot = class_one_hot(labels, offsets.shape[0]).to(offsets.dtype)  # (B, H, W, C)
    return logits + torch.einsum("bhwy,yj->bjhw", onehot, offsets).to(logits.dtype)


def class_one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Boolean one-hot (..., C); a label outside 0..C-1 gets an all-False row. Two tensor
    ops where F.one_hot needs a clamp and a mask to treat the ignore index."""
    return labels[..., None] == torch.arange(num_classes, device=labels.device)


def nearest_resize(labels: torch.Tensor, size) -> torch.Tensor:
    """(B, H, W) labels or masks resized by nearest neighbour, dtype kept. For a whole-number
    ratio that is every k-th pixel, which is what F.interpolate's nearest mode picks, without
    a float round trip."""
    (h, w), (out_h, out_w) = labels.shape[-2:], size
    if h % out_h == 0 and w % out_w == 0:
        return labels[:, :: h // out_h, :: w // out_w]
    return F.interpolate(labels[:, None].float(), size=(out_h, out_w), mode="nearest")[:, 0].to(labels.dtype)
