"""Pruning criteria people compare against, all ending in `torch.nn.utils.prune` masks.

Every criterion gives one score per prunable weight; :func:`global_masks` keeps the
``ceil((1 - sparsity) * D)`` highest scores over all layers together (ties broken by position, so
the count is exact), and :func:`apply_masks` installs them with ``prune.custom_from_mask``.

- ``magnitude``: |w| (one-shot global magnitude pruning; with l1-trained weights this is LOMP).
- ``random``: i.i.d. uniform scores from a seeded generator.
- ``snip`` (Lee et al., 2019): |w * dL/dw| on one batch at initialisation.
- ``synflow`` (Tanaka et al., 2020): |w * dR/dw| with R = 1' f_|w|(1) the output of the network with
  absolute weights on an all-ones input; pruned iteratively (exponential schedule) so no layer collapses.
  Data-free by construction: only the input *shape* is used.
- IMP (Frankle & Carbin, 2019; with rewinding, Frankle et al., 2020) is a training procedure, built in
  :mod:`prunelimit.compare` from these pieces (:func:`global_masks` on magnitudes and :func:`rewind`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import prune

from .errors import PruneLimitError
from .params import prunable_modules

Scores = list[torch.Tensor]  # one score tensor per prunable module, shaped like its weight


def _weights(model: nn.Module) -> list[torch.Tensor]:
    """The current effective weights (masked where masks exist), one per prunable module."""
    return [getattr(m, "weight") for m, _ in prunable_modules(model)]


def global_masks(scores: Scores, sparsity: float, previous: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """0/1 masks keeping the k = ceil((1 - sparsity) D) highest scores over all tensors together.

    Weights already removed by ``previous`` masks get score -inf, so they stay removed.
    """
    if not 0.0 <= sparsity < 1.0:
        raise PruneLimitError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = torch.cat([s.detach().reshape(-1).double() for s in scores])
    if previous is not None:
        flat = flat.masked_fill(torch.cat([p.reshape(-1) for p in previous]) == 0, -math.inf)
    keep = math.ceil(round((1.0 - sparsity) * flat.numel(), 9))
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat)
    mask[order[:keep]] = 1.0
    out, start = [], 0
    for s in scores:
        out.append(mask[start:start + s.numel()].reshape(s.shape).to(s.dtype))
        start += s.numel()
    return out


@torch.no_grad()
def unmask(model: nn.Module) -> nn.Module:
    """Drop every pruning mask of the prunable modules and give back the unmasked weights (``weight_orig``)."""
    for module, name in prunable_modules(model):
        if hasattr(module, f"{name}_mask"):
            original = getattr(module, f"{name}_orig").detach().clone()
            prune.remove(module, name)
            getattr(module, name).copy_(original)
    return model


def apply_masks(model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
    """Install ``masks`` as `torch.nn.utils.prune` masks on the prunable modules, replacing any present."""
    modules = prunable_modules(model)
    if len(masks) != len(modules):
        raise PruneLimitError(f"{len(masks)} masks for {len(modules)} prunable layers")
    unmask(model)
    for (module, name), mask in zip(modules, masks):
        prune.custom_from_mask(module, name, mask.to(getattr(module, name).device))
    return model


def sparsity_by_layer(model: nn.Module) -> dict[str, float]:
    """Removed fraction of each prunable module's weights, keyed by module name."""
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: float((getattr(m, "weight") == 0).double().mean()) for m, _ in prunable_modules(model)}


def magnitude_scores(model: nn.Module) -> Scores:
    """|w| per weight."""
    return [w.detach().abs() for w in _weights(model)]


def random_scores(model: nn.Module, seed: int) -> Scores:
    """i.i.d. U(0, 1) scores from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(w.shape, generator=gen, dtype=torch.float64) for w in _weights(model)]


def snip_scores(model: nn.Module, loss_fn: Callable, inputs: torch.Tensor, targets: torch.Tensor) -> Scores:
    """SNIP connection sensitivity |w * dL/dw| of the loss on one batch (model in train mode, as at init)."""
    weights = [getattr(m, "weight_orig" if hasattr(m, "weight_orig") else "weight") for m, _ in prunable_modules(model)]
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(inputs), targets)
    grads = torch.autograd.grad(loss, weights)
    return [(w * g).detach().abs() for w, g in zip(weights, grads)]


@torch.no_grad()
def _linearize(model: nn.Module) -> dict[str, torch.Tensor]:
    """Replace every parameter and buffer by its absolute value; return the signs to restore them."""
    signs = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            signs[name] = torch.sign(tensor)
            tensor.abs_()
    return signs


@torch.no_grad()
def _restore(model: nn.Module, signs: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        if name in signs:
            tensor.mul_(signs[name])


def synflow_scores(model: nn.Module, input_shape: Sequence[int]) -> Scores:
    """SynFlow's synaptic saliency |w * dR/dw|, R = sum of f_|theta|(1) over outputs (float64, eval mode).

    No data enters: the input is all ones of ``(1, *input_shape)``; BatchNorm uses its running
    statistics (eval mode), as the method prescribes.
    """
    was_training = model.training
    original_dtype = next(model.parameters()).dtype
    model.eval().double()
    signs = _linearize(model)
    try:
        weights = [getattr(m, "weight_orig" if hasattr(m, "weight_orig") else "weight") for m, _ in prunable_modules(model)]
        ones = torch.ones((1, *input_shape), dtype=torch.float64, device=weights[0].device)
        total = model(ones).sum()
        grads = torch.autograd.grad(total, weights)
        effective = _weights(model)
        scores = [(w * g).detach().abs() for w, g in zip(effective, grads)]
    finally:
        _restore(model, signs)
        model.to(original_dtype).train(was_training)
    return scores


def synflow_masks(model: nn.Module, input_shape: Sequence[int], sparsity: float, rounds: int = 100) -> list[torch.Tensor]:
    """Iterative SynFlow: round r prunes to density (1 - sparsity)^(r / rounds), rescoring each time."""
    masks = None
    try:
        for r in range(1, rounds + 1):
            density = (1.0 - sparsity) ** (r / rounds)
            masks = global_masks(synflow_scores(model, input_shape), 1.0 - density, previous=masks)
            apply_masks(model, masks)
    finally:
        unmask(model)
    return masks


@torch.no_grad()
def rewind(model: nn.Module, early_state: dict[str, torch.Tensor], masks: Sequence[torch.Tensor]) -> nn.Module:
    """Lottery-ticket rewinding: every weight back to its saved early value, then ``masks`` applied.

    ``early_state`` is a ``state_dict()`` taken before pruning (no masks in it).
    """
    unmask(model)
    model.load_state_dict(early_state)
    return apply_masks(model, masks)
