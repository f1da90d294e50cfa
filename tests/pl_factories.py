"""Tiny user factories for `prunelimit --model/--dataset package.module:factory` tests (good and broken ones)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

NOT_CALLABLE = 42


def tiny_mlp(in_shape, num_classes):
    """A good factory: one linear layer on the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


class _NaNLogits(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) * float("nan")


def nan_model(in_shape, num_classes):
    """Right shapes, but every logit is NaN: training fails with a non-finite loss."""
    return _NaNLogits(math.prod(in_shape), num_classes)


def raises(in_shape, num_classes):
    raise RuntimeError("boom from the model factory")


def needs_depth(in_shape, num_classes, depth):
    return tiny_mlp(in_shape, num_classes)


def returns_int(in_shape, num_classes):
    return 42


def wrong_shape(in_shape, num_classes):
    """A module that does not fit the data (3 input features)."""
    return nn.Linear(3, num_classes)


def blobs(seed=0):
    """A good dataset factory: 3 Gaussian blobs in 8 dimensions, 240 train / 60 test samples."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(3, 8, generator=g)
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 8, generator=g)
    return TensorDataset(x[:240], y[:240]), TensorDataset(x[240:], y[240:])


def data_raises():
    raise ValueError("no data here")


def data_wrong_type(seed):
    return "not a dataset"


def data_wrong_signature(seed, split):
    return blobs(seed)


def small_mlp(in_shape, num_classes):
    """A good two-layer factory (for `prunelimit compare` tests): 64-16-C on digits."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), 16), nn.ReLU(), nn.Linear(16, num_classes))
