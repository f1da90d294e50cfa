"""The interface every MIL model in :mod:`mmil.models` follows.

Conventions (one for the whole package):

* A batch of bags is a padded tensor ``x`` of shape ``(B, N, C)`` with a boolean
  ``mask`` of shape ``(B, N)``; ``True`` marks a real instance (the convention of
  :func:`torch.nn.functional.scaled_dot_product_attention`). ``mask=None`` means
  every instance is real. A single bag may be given as ``(N, C)``.
* ``forward`` always returns a :class:`MILOutput`, whatever flags are set, so the
  arity of the result never changes.
* Instance scores (the input to heatmaps) are computed only when
  ``return_scores=True``; they are ``(B, N)`` with zeros at padded positions.
* ``loss(output, target)`` is cross-entropy on the bag logits plus whatever
  auxiliary loss the model defines (DSMIL's instance loss, CLAM's clustering loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MILOutput:
    """Result of a MIL model's forward pass.

    Attributes:
        logits: ``(B, n_classes)`` bag logits.
        instance_scores: ``(B, N)`` per-instance importance, or ``None`` unless
            ``return_scores=True`` was passed. Zero at padded positions.
        extras: model-specific tensors needed by :meth:`MILModel.loss`
            (e.g. instance logits); never needed by callers.
    """

    logits: Tensor
    instance_scores: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def probs(self) -> Tensor:
        """Softmax class probabilities, ``(B, n_classes)``."""
        return torch.softmax(self.logits.float(), dim=-1)

    @property
    def preds(self) -> Tensor:
        """Arg-max class, ``(B,)``."""
        return self.logits.argmax(dim=-1)


def as_padded_batch(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Normalise model input to ``(x (B, N, C), mask (B, N) bool)``.

    Accepts a single bag ``(N, C)`` or a batch ``(B, N, C)``. Raises ``ValueError``
    on wrong ranks, mismatched mask shapes, or bags with no real instance.
    """
    if x.dim() == 2:
        x = x.unsqueeze(0)
        if mask is not None and mask.dim() == 1:
            mask = mask.unsqueeze(0)
    if x.dim() != 3:
        raise ValueError(f"expected bag features of shape (N, C) or (B, N, C), got {tuple(x.shape)}")
    B, N, _ = x.shape
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=x.device)
    else:
        if mask.shape != (B, N):
            raise ValueError(f"mask must have shape {(B, N)} to match x, got {tuple(mask.shape)}")
        mask = mask.to(device=x.device, dtype=torch.bool)
    if N == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError("every bag needs at least one instance (found an empty bag)")
    return x, mask


def mask_to_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Turn a boolean keep-mask into an additive attention bias.

    ``bias = 0`` where ``mask`` is True and ``-inf`` (the dtype's lowest value, to
    keep fully-masked rows finite) where it is False.
    """
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill(~mask, torch.finfo(dtype).min)


def masked_fill_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Zero instance scores at padded positions."""
    return scores.masked_fill(~mask, 0.0)


class MILModel(nn.Module):
    """Base class: subclasses implement :meth:`forward`; :meth:`loss` may be extended.

    Constructor arguments shared by all families (where they apply):
    ``in_dim``, ``n_classes``, ``embed_dim``, ``heads``, ``dropout``, ``attn_dropout``.
    """

    in_dim: int
    n_classes: int

    def forward(  # pragma: no cover - interface
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        coords: Tensor | None = None,
        groups: Tensor | None = None,
        seed: int | None = None,
        return_scores: bool = False,
    ) -> MILOutput:
        raise NotImplementedError

    def loss(self, output: MILOutput, target: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """Cross-entropy of the bag logits (subclasses add their auxiliary terms)."""
        weight = None if class_weights is None else class_weights.to(output.logits.device, torch.float32)
        return F.cross_entropy(output.logits.float(), target.to(output.logits.device).long(), weight=weight)
