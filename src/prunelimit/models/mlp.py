"""Fully connected nets of the paper: FC5, FC12 and LeNet-300-100.

The first layer's width is the flattened input size and the last the number of
classes, so the same names serve CIFAR (3072 inputs), MNIST (784) and digits (64).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .registry import register_model

FC5_HIDDEN = (1000, 600, 300, 100)
# The paper names FC12 without listing its widths here; these decrease from 1000 to 100 like FC5's.
FC12_HIDDEN = (1000, 900, 800, 750, 700, 650, 600, 500, 400, 300, 100)
LENET300_HIDDEN = (300, 100)


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU`` for each hidden width, then a ``Linear`` head."""

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int):
        super().__init__()
        widths = [int(in_features), *[int(h) for h in hidden]]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], int(num_classes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_num_parameters(in_features: int, hidden: Sequence[int], num_classes: int) -> tuple[int, int]:
    """Closed form: (weights, biases) = (sum_l n_{l-1} n_l, sum_l n_l) over widths n_0..n_L."""
    widths = [in_features, *hidden, num_classes]
    weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return weights, sum(widths[1:])


@register_model("fc5", family="mlp", uses_conv=False, default_lam=5e-5)
def fc5(in_shape: Sequence[int], num_classes: int) -> MLP:
    """FC5: inputs-1000-600-300-100-classes (3072-...-10 on CIFAR-10)."""
    return MLP(math.prod(in_shape), FC5_HIDDEN, num_classes)


@register_model("fc12", family="mlp", uses_conv=False, default_lam=5e-5)
def fc12(in_shape: Sequence[int], num_classes: int) -> MLP:
    """FC12: twelve Linear layers, inputs-1000-900-...-300-100-classes."""
    return MLP(math.prod(in_shape), FC12_HIDDEN, num_classes)


@register_model("lenet300", family="mlp", uses_conv=False, default_lam=5e-5)
def lenet300(in_shape: Sequence[int], num_classes: int) -> MLP:
    """LeNet-300-100: inputs-300-100-classes."""
    return MLP(math.prod(in_shape), LENET300_HIDDEN, num_classes)
