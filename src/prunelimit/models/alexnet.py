"""AlexNet as the paper ran it on CIFAR: inputs upsampled to 224 x 224.

Upsampling costs: at 224 the five conv layers take about 0.7 GFLOP per image
(roughly 100x a native 32 x 32 CIFAR net), and every Hessian-vector product pays it
twice over, so expect AlexNet spectra to be the slowest in the zoo.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._shapes import image_shape
from .registry import register_model


class AlexNet(nn.Module):
    """Five conv layers (64-192-384-256-256) and a 4096-4096 classifier with dropout."""

    def __init__(self, in_channels: int, num_classes: int, input_size: int = 224, dropout: float = 0.5):
        super().__init__()
        self.input_size = int(input_size)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


@register_model("alexnet", family="alexnet", uses_conv=True, default_lam=3e-5)
def alexnet(in_shape: Sequence[int], num_classes: int, input_size: int = 224) -> AlexNet:
    """AlexNet with inputs bilinearly upsampled to 224 x 224 (as in the paper)."""
    channels, _, _ = image_shape(in_shape, "alexnet")
    return AlexNet(channels, num_classes, input_size=input_size)
