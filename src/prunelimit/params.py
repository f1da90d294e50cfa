"""The prunable weights: which tensors are regularized, pruned and differentiated.

One definition of the prunable set keeps D (the number of prunable weights) the same
for l1 training, magnitude pruning and the Hessian (the released code mixed three sets).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import PruneLimitError

__all__ = [
    "PRUNABLE_LAYER_TYPES",
    "prunable_modules",
    "prunable_parameters",
    "resolve_params",
    "parameter_slots",
    "num_weights",
    "weights_vector",
]

# Weights of these layers are prunable by default; biases and normalization layers are not.
PRUNABLE_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weight_slot(module: nn.Module) -> str:
    # After torch.nn.utils.prune the trainable tensor is `weight_orig`; `weight` is then a
    # plain attribute recomputed as weight_orig * weight_mask on every forward.
    return "weight_orig" if isinstance(getattr(module, "weight_orig", None), nn.Parameter) else "weight"


def prunable_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every Linear and Conv1d/2d/3d layer of `model`, in module order.

    Shared modules appear once. Raises PruneLimitError when there is none.
    """
    if not isinstance(model, nn.Module):
        raise PruneLimitError(f"expected a torch.nn.Module, got {type(model).__name__}")
    slots = [(module, "weight") for module in model.modules() if isinstance(module, PRUNABLE_LAYER_TYPES)]
    slots = [(m, name) for m, name in slots if isinstance(getattr(m, _weight_slot(m), None), nn.Parameter)]
    if not slots:
        raise PruneLimitError(
            f"model {type(model).__name__} has no Linear or Conv layer weight to prune; "
            "pass params=[...] with the tensors to prune"
        )
    return slots


def prunable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The default prunable set: weights of all Linear and Conv layers (no biases, no norm layers).

    For a model that already carries `torch.nn.utils.prune` masks this is `weight_orig`.
    """
    return [getattr(module, _weight_slot(module)) for module, _ in prunable_modules(model)]


def resolve_params(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> list[nn.Parameter]:
    """`params` validated against `model`, or the default prunable set when None.

    Every tensor must be a parameter of `model` (by identity), listed once, and all must
    share one dtype and device.
    """
    if params is None:
        return prunable_parameters(model)
    params = list(params)
    if not params:
        raise PruneLimitError("params is empty: pass at least one parameter, or params=None for the default set")
    owned = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or id(p) not in owned:
            raise PruneLimitError(f"params[{i}] is not a parameter of the model; pass tensors from model.parameters()")
        if id(p) in seen:
            raise PruneLimitError(f"params[{i}] is listed twice; list each parameter once")
        seen.add(id(p))
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise PruneLimitError(
            f"params mix dtypes {sorted(map(str, dtypes))} / devices {sorted(map(str, devices))}; "
            "convert the model with model.to(dtype, device) first"
        )
    return params


def parameter_slots(model: nn.Module, params: Sequence[torch.Tensor] | None = None) -> list[tuple[nn.Module, str]]:
    """(module, attribute name) owning each tensor of `params` (default: prunable_modules)."""
    if params is None:
        return prunable_modules(model)
    params = resolve_params(model, params)
    where: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            where.setdefault(id(p), (module, name[: -len("_orig")] if name.endswith("_orig") else name))
    return [where[id(p)] for p in params]


def num_weights(params: Sequence[torch.Tensor]) -> int:
    """D: the total number of elements of `params`."""
    return int(sum(p.numel() for p in params))


def weights_vector(model_or_params: nn.Module | Sequence[torch.Tensor] | np.ndarray | torch.Tensor,
                   params: Sequence[torch.Tensor] | None = None) -> np.ndarray:
    """The prunable weights as one float64 numpy vector (module order, row-major within a tensor)."""
    if isinstance(model_or_params, nn.Module):
        tensors = resolve_params(model_or_params, params)
    elif isinstance(model_or_params, np.ndarray):
        return np.asarray(model_or_params, dtype=np.float64).reshape(-1)
    elif isinstance(model_or_params, torch.Tensor):
        tensors = [model_or_params]
    else:
        tensors = list(model_or_params)
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            return np.asarray(tensors, dtype=np.float64).reshape(-1)
    if not tensors:
        raise PruneLimitError("no weights given")
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()
