"""Model weights on disk: safetensors (never pickle), written atomically.

JSON and text go through :mod:`mmpl.jsonio` (one NaN policy for the distribution: non-finite -> null).
"""
from __future__ import annotations

import os

import torch
from mmpl.fsio import atomic_path


def save_state_dict(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically (contiguous CPU copies; shared storage is split)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle)."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))
