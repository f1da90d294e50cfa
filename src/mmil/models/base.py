"""The interface every MIL model in :mod:`mmil.models` follows.

Conventions (one for the whole package):

* A batch of bags is a padded tensor ``x`` of shape ``(B, N, C)`` with a boolean
  ``mask`` of shape ``(B, N)``; ``True`` marks a real instance (the convention of
  :func:`torch.nn.functional.scaled_dot_product_attention`). ``mask=None`` means
  every instance is real. A single bag may be given as ``(N, C)``.
  :func:`mask_to_bias` is the one way to turn such a mask into an additive bias.
* Three steps, as in timm: :meth:`MILModel.forward_features` gives per-instance
  embeddings ``(B, N, D)``, :meth:`MILModel.forward_head` pools them into bag
  logits (and instance scores, the input to heatmaps, when asked), and
  ``forward`` chains the two. :meth:`MILModel.instance_scores` returns the scores alone.
* ``forward`` always returns a :class:`MILOutput` (a family may return a subclass
  with typed fields its :meth:`~MILModel.loss` reads), whatever flags are set, so
  the arity of the result never changes.
* Instance scores are computed only when ``return_scores=True``; they are
  ``(B, N)`` with zeros at padded positions.
* Per-bag inputs besides ``x`` and ``mask`` (patch ``coords``, precomputed
  ``groups``, a random ``seed``) are keyword arguments of ``forward`` only for the
  models that read them, and :attr:`MILModel.inputs` lists them; callers holding a
  bag pass them through :func:`model_inputs`, never to a model that ignores them.
* ``loss(output, target)`` is cross-entropy on the bag logits, or the family's own
  objective (DSMIL's two streams, CLAM's instance clustering).
* ``init_kwargs`` holds the constructor arguments that rebuild the model through
  its registered builder (what a checkpoint's ``config.json`` stores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import zero_pads

BAG_INPUTS = ("coords", "groups", "seed")


@dataclass
class MILOutput:
    """Result of a MIL model's forward pass.

    Attributes:
        logits: ``(B, n_classes)`` bag logits.
        instance_scores: ``(B, N)`` per-instance importance, or ``None`` unless
            ``return_scores=True`` was passed. Zero at padded positions.
    """

    logits: Tensor
    instance_scores: Tensor | None = None

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


def model_inputs(model: nn.Module, *, coords: Tensor | None = None, groups: Tensor | None = None, seed: int | None = None) -> dict[str, Any]:
    """The per-bag keyword inputs ``model`` reads (its :attr:`MILModel.inputs`), from what the caller holds.

    ``model(x, mask, **model_inputs(model, coords=c, groups=g, seed=s))`` is how a caller
    that has a bag's coordinates, groups and a seed runs any model.
    """
    available = {"coords": coords, "groups": groups, "seed": seed}
    return {name: available[name] for name in model.inputs}


class MILModel(nn.Module):
    """Base class of the MIL models.

    Subclasses implement :meth:`forward_head`, and :meth:`forward_features` unless
    their instance embedding is a module or method called ``embed``; a model that
    reads per-bag inputs overrides ``forward`` with them as keyword arguments and
    lists them in :attr:`inputs`. :meth:`loss` may be extended.

    Constructor arguments shared by all families (where they apply):
    ``in_dim``, ``n_classes``, ``embed_dim``, ``heads``, ``dropout``, ``attn_dropout``.
    """

    inputs: tuple[str, ...] = ()
    """Per-bag keyword inputs of ``forward`` besides ``x`` and ``mask`` (a subset of :data:`BAG_INPUTS`)."""

    def __init__(self, in_dim: int, n_classes: int, **options: Any) -> None:
        super().__init__()
        self.in_dim, self.n_classes = int(in_dim), int(n_classes)
        self.init_kwargs: dict[str, Any] = {"in_dim": self.in_dim, "n_classes": self.n_classes, **options}

    def forward_features(self, x: Tensor, mask: Tensor) -> Tensor:
        """Instance embeddings ``(B, N, D)`` of a padded batch: ``embed`` of the real
        instances (pads zeroed before and after, so no pad value can leak)."""
        return zero_pads(self.embed(zero_pads(x, mask)), mask)

    def forward_head(self, h: Tensor, mask: Tensor, *, return_scores: bool = False) -> MILOutput:  # pragma: no cover - interface
        """Bag logits (and instance scores with ``return_scores``) from the embeddings ``h``."""
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor | None = None, *, return_scores: bool = False) -> MILOutput:
        """``forward_head(forward_features(x))`` for a bag ``(N, C)`` or a padded batch ``(B, N, C)`` + ``mask``."""
        x, mask = as_padded_batch(x, mask)
        return self.forward_head(self.forward_features(x, mask), mask, return_scores=return_scores)

    def instance_scores(self, x: Tensor, mask: Tensor | None = None, **inputs: Any) -> Tensor:
        """Instance scores ``(B, N)`` alone (zero at pads); ``inputs`` as :attr:`inputs` lists."""
        return self(x, mask, return_scores=True, **inputs).instance_scores

    def loss(self, output: MILOutput, target: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """Cross-entropy of the bag logits (subclasses add their auxiliary terms)."""
        return weighted_cross_entropy(output.logits, target, class_weights)


def weighted_cross_entropy(logits: Tensor, target: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """``CE(logits, target)`` in float32 with optional class weights, on the logits' device."""
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    return F.cross_entropy(logits.float(), target.to(logits.device).long(), weight=weight)
