"""Batches of `(inputs, targets)` for the curvature passes: one loop shared by every pass over the data.

The Hessian operator (gradient pass, double-backprop products) and epsilon all walk the data the
same way: :func:`prepared_batches` yields each batch unpacked, sized and moved to the model's
device and dtype; :func:`batch_loss` runs the model in the caller's context and checks the loss.
The model runs in eval mode (:func:`eval_mode`) over a fixed-order pass (:func:`fixed_batches`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from mmpl.progress import progress as progress_bar_over
from torch import nn

from .errors import PruneLimitError

__all__ = [
    "fixed_batches",
    "check_loss_fn",
    "eval_mode",
    "grad_only_for",
    "finite_or_raise",
    "prepared_batches",
    "batch_loss",
]


def _move(obj: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Batches to `device`; floating tensors to the parameters' dtype (so a float64 model takes float32 data)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point() and obj.dtype != dtype:
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device=device, non_blocking=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, dtype) for k, v in obj.items()}
    return obj


def _batch_size(inputs: Any, targets: Any) -> int:
    for obj in (targets, inputs):
        while isinstance(obj, (list, tuple)) and obj:
            obj = obj[0]
        if isinstance(obj, dict) and obj:
            obj = next(iter(obj.values()))
        if isinstance(obj, torch.Tensor) and obj.ndim >= 1:
            return int(obj.shape[0])
    raise PruneLimitError("cannot tell the batch size: targets or inputs must be tensors with a batch dimension")


def _call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def _unpack(batch: Any, index: int) -> tuple[Any, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) != 2:
        raise PruneLimitError(f"batch {index} is not an (inputs, targets) pair; data must yield (inputs, targets)")
    return batch[0], batch[1]


def fixed_batches(data: Iterable) -> Iterable:
    """`data` as a re-iterable, fixed-order sequence of batches (a one-shot iterator is listed once)."""
    if data is None:
        raise PruneLimitError("data is None: pass an iterable of (inputs, targets) batches")
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise PruneLimitError(
            "the DataLoader shuffles; the Hessian needs a fixed pass over the data: build it with shuffle=False"
        )
    if iter(data) is data:  # a generator/iterator can be walked only once
        data = list(data)
    return data


def check_loss_fn(loss_fn: Callable) -> None:
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise PruneLimitError(
            f"loss_fn has reduction={reduction!r}; it must return the batch mean (reduction='mean')"
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, each module's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def grad_only_for(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """requires_grad on `params` only, so autograd builds no graph for the other parameters."""
    wanted = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def finite_or_raise(value: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(value).all()):
        raise PruneLimitError(
            f"{what} is not finite (NaN or inf); check the model weights, the data and the loss"
        )


def prepared_batches(data: Iterable, device: torch.device, dtype: torch.dtype | None, *, progress: bool = False,
                     desc: str = "") -> Iterator[tuple[int, int, Any, Any]]:
    """`(index, batch size, inputs, targets)` for each batch of `data`, moved to `device` (floats to `dtype`)."""
    for index, batch in enumerate(progress_bar_over(data, progress, desc)):
        inputs, targets = _unpack(batch, index)
        n_b = _batch_size(inputs, targets)
        inputs, targets = _move((inputs, targets), device, dtype)
        yield index, n_b, inputs, targets


def batch_loss(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, index: int) -> torch.Tensor:
    """`loss_fn(model(inputs), targets)`, checked to be a finite scalar (the batch mean)."""
    loss = loss_fn(_call_model(model, inputs), targets)
    if loss.ndim != 0:
        raise PruneLimitError("loss_fn must return a scalar (the batch mean)")
    finite_or_raise(loss.detach(), f"the training loss on batch {index}")
    return loss
