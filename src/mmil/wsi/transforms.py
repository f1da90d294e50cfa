"""Patch image transforms in plain torch (no torchvision): to-tensor, resize, normalise.

Semantics match torchvision's ``ToTensor``, ``Resize(size, antialias=True)`` on
tensors (bilinear) and ``Normalize``.
"""
from __future__ import annotations

import math
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


def resize(x: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Resize ``(C, H, W)`` or ``(B, C, H, W)`` to ``size`` x ``size`` (``mode`` bilinear or bicubic, antialiased when shrinking).

    Bicubic results are clamped to ``[0, 1]``, as PIL's bicubic resize of a uint8 image is.
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"resize mode must be 'bilinear' or 'bicubic', got {mode!r}")
    batched = x.dim() == 4
    y = x if batched else x.unsqueeze(0)
    y = F.interpolate(y, size=(size, size), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        y = y.clamp_(0.0, 1.0)
    return y if batched else y.squeeze(0)


def center_crop(x: Tensor, size: int) -> Tensor:
    """The central ``size`` x ``size`` window of ``(..., H, W)``: top = ``round((H - size) / 2)`` (torchvision's CenterCrop)."""
    h, w = x.shape[-2], x.shape[-1]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Per-channel ``(x - mean) / std`` on ``(..., C, H, W)``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


@dataclass
class PatchTransform:
    """uint8 RGB patch -> normalised ``(3, size, size)`` tensor; ``size=None`` keeps the patch size.

    ``interpolation`` is the resize's (bilinear or bicubic); ``crop_pct < 1`` is timm's centre crop:
    resize to ``floor(size / crop_pct)``, then keep the central ``size`` (``Resize(256), CenterCrop(224)``
    is ``crop_pct = 224 / 256``).
    """

    size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __call__(self, image) -> Tensor:
        x = to_tensor(image)
        if self.size is not None and self.crop_pct < 1.0:
            x = center_crop(resize(x, int(math.floor(self.size / self.crop_pct)), self.interpolation), self.size)
        elif self.size is not None:
            x = resize(x, self.size, self.interpolation)
        return normalize(x, self.mean, self.std)
