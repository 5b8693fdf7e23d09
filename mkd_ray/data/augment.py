"""Weak geometry, strong photometric views and CutMix boxes, built on torchvision.transforms.v2.

Every random choice comes from a numpy Generator passed in, so a sample's views are a pure
function of (seed, epoch, index) wherever they are computed: in the training process, in a
DataLoader worker or in a Ray Data task. Images are uint8 CHW tensors, masks uint8 HW.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from mkd_ray.config import AugmentConfig, CutMixConfig, StrongAffineConfig


def sample_rng(seed: int, epoch: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index, stream])


def weak_geometry(
    image: torch.Tensor, masks: torch.Tensor, crop: int, cfg: AugmentConfig, rng: np.random.Generator, ignore_index: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, crop with ignore padding, horizontal flip; `masks` is (K, H, W), all moved alike."""
    h, w = image.shape[-2:]
    scale = rng.uniform(*cfg.scale_range)
    size = [max(1, round(h * scale)), max(1, round(w * scale))]
    image = F.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    masks = F.resize(masks, size, interpolation=InterpolationMode.NEAREST_EXACT)
    pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
    if pad_h or pad_w:
        image = F.pad(image, [0, 0, pad_w, pad_h], fill=0)
        masks = F.pad(masks, [0, 0, pad_w, pad_h], fill=ignore_index)
    top = int(rng.integers(0, image.shape[-2] - crop + 1))
    left = int(rng.integers(0, image.shape[-1] - crop + 1))
    image, masks = F.crop(image, top, left, crop, crop), F.crop(masks, top, left, crop, crop)
    if cfg.hflip and rng.random() < 0.5:
        image, masks = F.horizontal_flip(image), F.horizontal_flip(masks)
    return image, masks


def _color_jitter(image: torch.Tensor, rng: np.random.Generator, strength: float = 0.5, hue: float = 0.25) -> torch.Tensor:
    ops = [
        lambda x: F.adjust_brightness(x, rng.uniform(1 - strength, 1 + strength)),
        lambda x: F.adjust_contrast(x, rng.uniform(1 - strength, 1 + strength)),
        lambda x: F.adjust_saturation(x, rng.uniform(1 - strength, 1 + strength)),
        lambda x: F.adjust_hue(x, rng.uniform(-hue, hue)),
    ]
    for i in rng.permutation(len(ops)):
        image = ops[i](image)
    return image


def _blur(image: torch.Tensor, rng: np.random.Generator, sigma_range: tuple[float, float],
          kernel: Optional[int] = None) -> torch.Tensor:
    sigma = rng.uniform(*sigma_range)
    if kernel is None:  # cover +-3 sigma
        kernel = 2 * math.ceil(3 * sigma) + 1
    return F.gaussian_blur(image, [kernel, kernel], [sigma, sigma])


def _mild(image: torch.Tensor, rng: np.random.Generator, strength: float = 0.2, noise: float = 0.02) -> torch.Tensor:
    image = F.adjust_brightness(image, rng.uniform(1 - strength, 1 + strength))
    image = F.adjust_contrast(image, rng.uniform(1 - strength, 1 + strength))
    if noise > 0:
        jitter = torch.from_numpy(rng.normal(0.0, noise * 255, size=image.shape).astype(np.float32))
        image = (image.float() + jitter).clamp(0, 255).to(torch.uint8)
    return image


# The reference draws one op through albumentations 1.x `SomeOf(n=1)`, which normalises the
# ops' `p` into selection weights and then always applies the op drawn: colour jitter 0.3,
# blur 0.5, equalize 0.1, solarize 0.1, grayscale 0.5 (semi-mmseg configs/semi_ablations).
REFERENCE_OP_WEIGHTS = np.array([0.3, 0.5, 0.1, 0.1, 0.5]) / 1.5


def reference_op(rng: np.random.Generator) -> int:
    """Index of the reference set's op for one strong view: 0 jitter, 1 blur, 2 equalize,
    3 solarize, 4 grayscale."""
    return int(rng.choice(len(REFERENCE_OP_WEIGHTS), p=REFERENCE_OP_WEIGHTS))


def _reference_strong(image: torch.Tensor, rng: np.random.Generator, blur_sigma: tuple[float, float]) -> torch.Tensor:
    """The reference implementation's set: one of five photometric operations."""
    op = reference_op(rng)
    if op == 0:
        return _color_jitter(image, rng)
    if op == 1:
        return _blur(image, rng, blur_sigma, kernel=int(rng.choice([3, 5, 7])))
    if op == 2:
        return F.equalize(image)
    if op == 3:
        return F.solarize(image, threshold=128)
    return F.rgb_to_grayscale(image, num_output_channels=3)


def _unimatch_strong(image: torch.Tensor, rng: np.random.Generator, blur_sigma: tuple[float, float]) -> torch.Tensor:
    if rng.random() < 0.8:
        image = _color_jitter(image, rng)
    if rng.random() < 0.2:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if rng.random() < 0.5:
        image = _blur(image, rng, blur_sigma)
    return image


def strong_photometric(image: torch.Tensor, kind: str, rng: np.random.Generator,
                       blur_sigma: tuple[float, float] = AugmentConfig.blur_sigma) -> torch.Tensor:
    """`blur_sigma`: the Gaussian blur's sigma range in pixels (`augment.blur_sigma`)."""
    if kind == "reference":
        return _reference_strong(image, rng, blur_sigma)
    if kind == "unimatch":
        return _unimatch_strong(image, rng, blur_sigma)
    if kind == "mild":
        return _mild(image, rng)
    return image


def weak_photometric(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return _mild(image, rng, strength=0.1, noise=0.0) if rng.random() < 0.5 else image


def cutmix_box_mask(height: int, width: int, cfg: CutMixConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean (H, W): `num_boxes` boxes whose areas add up to a fraction drawn from cfg.area."""
    mask = np.zeros((height, width), dtype=bool)
    if rng.random() >= cfg.prob:
        return mask
    per_box = rng.uniform(*cfg.area) * height * width / cfg.num_boxes
    for _ in range(cfg.num_boxes):
        ratio = rng.uniform(0.3, 1 / 0.3)
        box_h = min(height, max(1, round(math.sqrt(per_box * ratio))))
        box_w = min(width, max(1, round(math.sqrt(per_box / ratio))))
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        mask[top : top + box_h, left : left + box_w] = True
    return mask


IDENTITY_WARP = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)


def strong_affine_theta(cfg: StrongAffineConfig, rng: np.random.Generator) -> np.ndarray:
    """(2, 3) affine in `torch.nn.functional.affine_grid`'s convention (strong-view coordinates
    -> weak-view coordinates, both in [-1, 1]): the strong view is the weak one rotated,
    scaled and shifted; the identity when the draw misses `cfg.prob`."""
    if rng.random() >= cfg.prob:
        return IDENTITY_WARP.copy()
    angle = math.radians(rng.uniform(-cfg.degrees, cfg.degrees))
    scale = rng.uniform(*cfg.scale)
    shift = rng.uniform(-cfg.translate, cfg.translate, size=2) * 2  # the crop spans 2 units
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    inverse = np.array([[cos, sin], [-sin, cos]])  # undoes the rotation and the scale
    return np.concatenate([inverse, -inverse @ shift[:, None]], axis=1).astype(np.float32)


def labeled_views(
    image: np.ndarray, mask: np.ndarray, crop: int, cfg: AugmentConfig, rng: np.random.Generator, ignore_index: int = 255
) -> dict[str, np.ndarray]:
    """A labeled training sample: weak view and its mask."""
    img, masks = weak_geometry(_chw(image), torch.from_numpy(mask)[None], crop, cfg, rng, ignore_index)
    if cfg.weak_photometric:
        img = weak_photometric(img, rng)
    return {"image": img.numpy(), "mask": masks[0].numpy()}


def unlabeled_views(
    image: np.ndarray,
    mask: Optional[np.ndarray],
    crop: int,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    ignore_index: int = 255,
) -> dict[str, np.ndarray]:
    """An unlabeled sample: weak view, strong view (same geometry), padding, CutMix box, the
    affine `warp` the training step applies to the strong view and its targets, and the
    ground truth when the dataset has it (255 otherwise; used only for diagnostics)."""
    h, w = image.shape[:2]
    gt = torch.from_numpy(mask) if mask is not None else torch.full((h, w), ignore_index, dtype=torch.uint8)
    inside = torch.zeros((h, w), dtype=torch.uint8)  # becomes ignore_index where padded
    img, masks = weak_geometry(_chw(image), torch.stack([gt, inside]), crop, cfg, rng, ignore_index)
    if cfg.weak_photometric:
        img = weak_photometric(img, rng)
    strong = strong_photometric(img, cfg.strong, rng, cfg.blur_sigma)
    return {
        "weak": img.numpy(),
        "strong": strong.numpy(),
        "ignore": (masks[1] == ignore_index).numpy(),
        "cutmix": cutmix_box_mask(crop, crop, cfg.cutmix, rng),
        "warp": strong_affine_theta(cfg.strong_affine, rng),  # drawn last: earlier draws keep their values
        "mask": masks[0].numpy(),
    }


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
