"""Adaptive number of sub-bags for small bags (``docs/method/mmil.md §1.3``).

The release cuts every bag into G sub-bags; a bag of 5 instances then has 5 singleton and 5
empty sub-bags. With a minimum sub-bag size ``m`` the number of sub-bags of bag b is

    G_b = clamp(floor(n_b / m), 1, G),

so the chunked groupings (``random``, ``sequential``) never make a sub-bag smaller than ``m``
(chunk sizes differ by at most one and ``n_b / G_b >= m``), and a bag of fewer than ``m``
instances is one sub-bag. Bags with ``n_b >= G m`` get G sub-bags, exactly as without the
option (same ids for the same seed). The k-means groupings get ``G_b`` clusters (a cluster may
still be smaller than ``m``); ``index`` keeps its labels.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .grouping import Grouping, GroupingFn, GroupingInputs


def adaptive_counts(n: Tensor, num_groups: int, min_size: int) -> Tensor:
    """``G_b = clamp(n_b // min_size, 1, num_groups)`` per bag (``n``: ``(B,)`` instance counts)."""
    if min_size < 1:
        raise ValueError(f"min_subbag_size must be >= 1, got {min_size}")
    return torch.div(n, int(min_size), rounding_mode="floor").clamp(1, int(num_groups))


def _rows(value: Tensor | None, rows: Tensor, batch: int) -> Tensor | None:
    if value is None or value.dim() == 0 or value.shape[0] != batch:
        return value
    return value[rows]


def adaptive_grouping(fn: GroupingFn, inputs: GroupingInputs, min_size: int) -> Grouping:
    """``fn``'s grouping with ``G_b`` sub-bags per bag (:func:`adaptive_counts`); bags sharing a count are grouped together."""
    mask = inputs.mask
    counts = adaptive_counts(mask.sum(dim=1), inputs.num_groups, min_size)
    values = torch.unique(counts).tolist()
    if len(values) == 1:
        return Grouping(fn(replace(inputs, num_groups=int(values[0]))).ids, counts)
    B = mask.shape[0]
    ids = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    for g in values:
        rows = counts == g
        part = replace(inputs, mask=mask[rows], num_groups=int(g), features=_rows(inputs.features, rows, B),
                       coords=_rows(inputs.coords, rows, B), groups=_rows(inputs.groups, rows, B))
        ids[rows] = fn(part).ids
    return Grouping(ids, counts)
