"""VGG16 with batch norm, CIFAR-style head (global average pool, one Linear)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._shapes import image_shape
from .registry import register_model

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """``conv3x3 -> BN -> ReLU`` stacks with 2x2 max pools, then average pool and a linear head.

    A max pool is dropped once the feature map is 1 x 1 (decided from the input size at
    construction), so the same net runs on 8 x 8 digits as on 32 x 32 CIFAR.
    """

    def __init__(self, cfg: Sequence, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, int(image_size)
        for item in cfg:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    size //= 2
                continue
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


@register_model("vgg16", family="vgg", uses_conv=True, default_lam=1e-4)
def vgg16(in_shape: Sequence[int], num_classes: int) -> VGG:
    """VGG16 with batch norm (13 conv layers, CIFAR head)."""
    channels, height, width = image_shape(in_shape, "vgg16")
    return VGG(VGG16_CFG, channels, num_classes, image_size=min(height, width))


VGG_SMALL_CFG = (8, "M", 16, "M", 32, "M")


@register_model("vgg_small", family="vgg", uses_conv=True, default_lam=1e-4)
def vgg_small(in_shape: Sequence[int], num_classes: int) -> VGG:
    """A small VGG-style net with batch norm (8-16-32 conv widths, CIFAR head) for MNIST-size data on a CPU."""
    channels, height, width = image_shape(in_shape, "vgg_small")
    return VGG(VGG_SMALL_CFG, channels, num_classes, image_size=min(height, width))
