"""DeepLabV3+ (Chen et al., 2018) on torchvision backbones.

The forward pass returns the logits at input resolution and the decoder features that
feed the final 1x1 classifier, which feature augmentation (ISDA) needs. With
`fp_dropout > 0` it also decodes a second stream from channel-dropped backbone features
(UniMatch's feature perturbation) in the same call, so DDP sees one forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from mkd_ray.config import ModelConfig
from mkd_ray.models.backbones import build_backbone, imagenet_weights


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeepLabV3Plus(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(
            cfg.backbone, cfg.output_stride, cfg.width, _torchvision_weights(cfg), cfg.stem_pool
        )
        low_ch, high_ch = _channels(self.backbone)
        self.aspp = ASPP(high_ch, list(cfg.aspp_rates), cfg.aspp_channels)
        self.aspp.project[-1].p = cfg.aspp_dropout  # torchvision fixes it at 0.5
        self.reduce = _conv_bn_relu(low_ch, cfg.low_level_channels, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(cfg.aspp_channels + cfg.low_level_channels, cfg.decoder_channels, 3),
            _conv_bn_relu(cfg.decoder_channels, cfg.decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(cfg.decoder_channels, num_classes, 1)
        if cfg.pretrained == "source":
            raise ValueError("model.pretrained: 'source' names a file that run.py resolves before building a model "
                             "(mkd_ray.models.pretrain.with_source_backbone)")
        if cfg.pretrained not in (None, "imagenet"):
            load_backbone_weights(self.backbone, cfg.pretrained)

    def decode(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """Backbone features -> the features that feed the classifier (stride 4)."""
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([high, self.reduce(low)], dim=1))

    def forward(self, x: torch.Tensor, fp_dropout: float = 0.0) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        low, high = self.backbone(x)
        features = self.decode(low, high)
        out = {"features": features, "logits": self.upsample(self.classifier(features), size)}
        if fp_dropout > 0:
            fp = self.decode(F.dropout2d(low, fp_dropout, True), F.dropout2d(high, fp_dropout, True))
            out["logits_fp"] = self.upsample(self.classifier(fp), size)
        return out

    @staticmethod
    def upsample(logits: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def head_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


def _channels(backbone: nn.Module) -> tuple[int, int]:
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        low, high = backbone(torch.zeros(1, 3, 64, 64))
    backbone.train(was_training)
    return low.shape[1], high.shape[1]


def _torchvision_weights(cfg: ModelConfig):
    if cfg.pretrained != "imagenet":
        return None
    if cfg.width != 1.0:
        raise ValueError("model.pretrained: ImageNet weights exist only for model.width=1.0")
    return imagenet_weights(cfg.backbone)


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """Load a classification checkpoint (torchvision key names) into the backbone, safely."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained: weights file {path!r} does not exist")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = backbone.state_dict()
    renamed = {_backbone_key(k): v for k, v in state.items()}
    matched = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise ValueError(f"model.pretrained: no tensor in {path!r} matches the {type(backbone).__name__} layout")
    backbone.load_state_dict(matched, strict=False)


def _backbone_key(key: str) -> str:
    """torchvision ResNet names (conv1, bn1, layerN) -> this backbone's names (stem.N, layerN)."""
    key = key.removeprefix("module.").removeprefix("backbone.")
    for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def build_model(cfg: ModelConfig, num_classes: int, seed: int | None = None) -> DeepLabV3Plus:
    """A fresh network; `seed` makes the random initialisation reproducible and distinct per branch."""
    if seed is None:
        return DeepLabV3Plus(cfg, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DeepLabV3Plus(cfg, num_classes)
