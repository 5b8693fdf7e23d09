"""Backbones for DeepLabV3+: torchvision ResNets and MobileNetV3, returning (low, high) features.

`low` is the stride-4 feature map the decoder fuses; `high` is the last stage at the
requested output stride. ResNet-50/101 are dilated with torchvision's own switch;
torchvision's BasicBlock refuses dilation, so ResNet-18/34 are dilated by turning the
strides of their last stages into dilations after construction.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], "ResNet18_Weights"),
    "resnet34": (BasicBlock, [3, 4, 6, 3], "ResNet34_Weights"),
    "resnet50": (Bottleneck, [3, 4, 6, 3], "ResNet50_Weights"),
    "resnet101": (Bottleneck, [3, 4, 23, 3], "ResNet101_Weights"),
}


def _stages_to_dilate(output_stride: int) -> list[bool]:
    """Which of layer2..layer4 trade their stride for dilation."""
    return {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}[output_stride]


def _dilate_stage(stage: nn.Sequential, dilation: int) -> None:
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride == (2, 2):
                module.stride = (1, 1)
            if module.kernel_size == (3, 3):
                module.dilation = (dilation, dilation)
                module.padding = (dilation, dilation)


class _NarrowResNet(ResNet):
    """A torchvision ResNet whose channel counts are scaled by `width` (64 * width at the stem)."""

    def __init__(self, block, layers: list[int], width: float):
        super().__init__(block, layers)
        base = max(8, int(round(64 * width)))
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        self.fc = nn.Identity()


class ResNetBackbone(nn.Module):
    def __init__(self, name: str, output_stride: int, width: float = 1.0, weights=None, stem_pool: bool = True):
        super().__init__()
        block, layers, _ = _RESNETS[name]
        dilate = _stages_to_dilate(output_stride)
        if width != 1.0:
            net = _NarrowResNet(block, layers, width)
        elif block is Bottleneck:
            net = getattr(models, name)(weights=weights, replace_stride_with_dilation=dilate)
        else:
            net = getattr(models, name)(weights=weights)
        if block is BasicBlock:
            dilation = 1
            for stage, on in zip((net.layer2, net.layer3, net.layer4), dilate):
                if on:
                    dilation *= 2
                    _dilate_stage(stage, dilation)
        # Without the max-pool every stage runs at twice the resolution (for tiny images).
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool if stem_pool else nn.Identity())
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.layer1(self.stem(x))
        return low, self.layer4(self.layer3(self.layer2(low)))


class MobileNetV3Backbone(nn.Module):
    def __init__(self, name: str, output_stride: int, width: float = 1.0, weights=None):
        super().__init__()
        net = getattr(models, name)(weights=weights, width_mult=width, dilated=output_stride == 16)
        features = net.features
        # Blocks marked _is_cn downsample; the stride-4 stage ends just before the second one.
        downsampling = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
        split = downsampling[1]
        self.low = features[:split]
        self.high = features[split:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = self.low(x)
        return low, self.high(low)


def imagenet_weights(name: str):
    """torchvision's ImageNet weights enum for a backbone (downloaded on first use)."""
    enum_name = _RESNETS[name][2] if name in _RESNETS else {
        "mobilenet_v3_large": "MobileNet_V3_Large_Weights",
        "mobilenet_v3_small": "MobileNet_V3_Small_Weights",
    }[name]
    return getattr(models, enum_name).DEFAULT


def build_backbone(name: str, output_stride: int, width: float = 1.0, weights=None, stem_pool: bool = True) -> nn.Module:
    if name in _RESNETS:
        return ResNetBackbone(name, output_stride, width, weights, stem_pool)
    return MobileNetV3Backbone(name, output_stride, width, weights)
