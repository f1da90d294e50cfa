"""The in-memory bag and the padded batch every model and loop uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Bag:
    """One slide (or benchmark bag).

    Attributes:
        slide_id: identifier, unique in a dataset.
        features: ``(N, C)`` float32 instance features.
        label: integer class, or ``None`` when unknown (prediction).
        coords: ``(N, 2)`` level-0 pixel coordinates (x, y) of each patch, or ``None``.
        groups: ``(N,)`` int64 precomputed sub-bag labels (``grouping="index"``), or ``None``.
        case_id: patient identifier for patient-level splits, or ``None``.
    """

    slide_id: str
    features: Tensor
    label: int | None = None
    coords: Tensor | None = None
    groups: Tensor | None = None
    case_id: str | None = None

    @property
    def num_instances(self) -> int:
        return int(self.features.shape[0])


@dataclass
class BagBatch:
    """Bags padded to a common length. ``mask`` is True at real instances."""

    x: Tensor  # (B, N, C)
    mask: Tensor  # (B, N) bool
    coords: Tensor | None  # (B, N, 2) or None
    groups: Tensor | None  # (B, N) int64 or None
    labels: Tensor | None  # (B,) int64 or None
    slide_ids: list[str]

    def to(self, device: torch.device | str) -> "BagBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return BagBatch(move(self.x), move(self.mask), move(self.coords), move(self.groups), move(self.labels), self.slide_ids)


def pad_bags(bags: list[Bag]) -> BagBatch:
    """Collate bags into a :class:`BagBatch` (use as a DataLoader ``collate_fn``).

    Coordinates and groups are kept only when every bag has them. Padded
    features, coordinates and groups are zero.
    """
    if not bags:
        raise ValueError("cannot collate an empty list of bags")
    B = len(bags)
    N = max(b.num_instances for b in bags)
    C = bags[0].features.shape[1]
    x = bags[0].features.new_zeros(B, N, C)
    mask = torch.zeros(B, N, dtype=torch.bool)
    has_coords = all(b.coords is not None for b in bags)
    has_groups = all(b.groups is not None for b in bags)
    coords = torch.zeros(B, N, 2, dtype=torch.float32) if has_coords else None
    groups = torch.zeros(B, N, dtype=torch.long) if has_groups else None
    for i, b in enumerate(bags):
        n = b.num_instances
        x[i, :n] = b.features
        mask[i, :n] = True
        if coords is not None:
            coords[i, :n] = b.coords.float()
        if groups is not None:
            groups[i, :n] = b.groups.long()
    labels = None
    if all(b.label is not None for b in bags):
        labels = torch.tensor([int(b.label) for b in bags], dtype=torch.long)
    return BagBatch(x, mask, coords, groups, labels, [b.slide_id for b in bags])
