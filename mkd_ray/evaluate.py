"""Inference modes (whole image, centre crop, sliding window) and mIoU evaluation."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from mkd_ray.method.losses import class_argmax
from mkd_ray.metrics import MeanIoU

Predictor = Callable[[torch.Tensor], torch.Tensor]  # normalised images -> class probabilities


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, scaled to [0, 1] and standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def center_box(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    h, w = min(height, crop), min(width, crop)
    top, left = (height - h) // 2, (width - w) // 2
    return top, left, h, w


def sliding_window(predict: Predictor, images: torch.Tensor, crop: int, stride_ratio: float, num_classes: int) -> torch.Tensor:
    """Softmax summed over windows of crop x crop, stride = stride_ratio * crop, then averaged."""
    b, _, height, width = images.shape
    stride = max(1, math.ceil(crop * stride_ratio))
    pad_h, pad_w = max(crop - height, 0), max(crop - width, 0)
    padded = F.pad(images, [0, pad_w, 0, pad_h]) if pad_h or pad_w else images
    ph, pw = padded.shape[-2:]
    probs = padded.new_zeros(b, num_classes, ph, pw)
    counts = padded.new_zeros(1, 1, ph, pw)
    rows = range(0, max(ph - crop, 0) + stride, stride)
    cols = range(0, max(pw - crop, 0) + stride, stride)
    for top in rows:
        for left in cols:
            top_, left_ = min(top, ph - crop), min(left, pw - crop)
            window = padded[..., top_ : top_ + crop, left_ : left_ + crop]
            probs[..., top_ : top_ + crop, left_ : left_ + crop] += predict(window)
            counts[..., top_ : top_ + crop, left_ : left_ + crop] += 1
    return (probs / counts)[..., :height, :width]


def predict_probs(predict: Predictor, images: torch.Tensor, mode: str, crop: int, stride_ratio: float, num_classes: int) -> torch.Tensor:
    if mode == "whole":
        return predict(images)
    if mode == "center":
        top, left, h, w = center_box(*images.shape[-2:], crop)
        return predict(images[..., top : top + h, left : left + w])
    return sliding_window(predict, images, crop, stride_ratio, num_classes)


@torch.no_grad()
def evaluate(
    predict: Predictor,
    batches: Iterable[dict],
    num_classes: int,
    mean,
    std,
    mode: str = "whole",
    crop: int = 0,
    stride_ratio: float = 2 / 3,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
    on_prediction: Callable[[dict, torch.Tensor], None] | None = None,
) -> MeanIoU:
    """Confusion matrix over the batches; `on_prediction(batch, pred)` sees each prediction."""
    meter = MeanIoU(num_classes, ignore_index, device=device)
    for batch in batches:
        images = normalize(batch["image"].to(device), mean, std)
        masks = batch["mask"].to(device)
        probs = predict_probs(predict, images, mode, crop, stride_ratio, num_classes)
        if mode == "center":
            top, left, h, w = center_box(*masks.shape[-2:], crop)
            masks = masks[..., top : top + h, left : left + w]
        pred = class_argmax(probs)
        meter.update(pred, masks)
        if on_prediction is not None:
            on_prediction(batch, pred)
    return meter
