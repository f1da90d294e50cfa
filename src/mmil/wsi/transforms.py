"""Patch image transforms in plain torch (no torchvision): to-tensor, resize, normalise.

Semantics match torchvision's ``ToTensor``, ``Resize(size, antialias=True)`` on
tensors (bilinear) and ``Normalize``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image) -> Tensor:
    """``(H, W, 3)`` uint8 image (array or PIL) -> ``(3, H, W)`` float32 in ``[0, 1]``: ``x / 255``."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).to(torch.float32).div_(255.0)


def resize(x: Tensor, size: int) -> Tensor:
    """Resize ``(C, H, W)`` or ``(B, C, H, W)`` to ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    batched = x.dim() == 4
    y = x if batched else x.unsqueeze(0)
    y = F.interpolate(y, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y if batched else y.squeeze(0)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std`` on ``(..., C, H, W)``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


@dataclass
class PatchTransform:
    """uint8 RGB patch -> normalised ``(3, size, size)`` tensor; ``size=None`` keeps the patch size."""

    size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image) -> Tensor:
        x = to_tensor(image)
        if self.size is not None:
            x = resize(x, self.size)
        return normalize(x, self.mean, self.std)
