"""Checks made before any step computes or writes: the data, the model on that data.

A run that would fail on its input fails here, in one line, with nothing written: the dataset
is loaded (its factory called), the model built (its factory called) and run forward on two
training samples, and data-dependent sizes (the epsilon batch) are compared with the data.
The device is checked when the run directory is opened (:func:`mmpl.device.resolve_device`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import PruneLimitError
from .factories import first_line


def check_eps_batches(num_train: int, eps_batch_size: int) -> None:
    if num_train <= eps_batch_size:
        raise PruneLimitError(
            f"epsilon is the spread of per-batch losses, but the {num_train} training samples fill only one "
            f"batch of {eps_batch_size}; set a smaller --eps-batch-size"
        )


def check_data_and_model(ctx, steps: Sequence[str]) -> None:
    """Load the data and build the model of ``ctx`` (a pipeline Context) and try them together."""
    from .data import dataset_batch

    cfg = ctx.config
    bundle = ctx.bundle  # loads the data once for the whole invocation (calls a user factory)
    if "spectrum" in steps:
        check_eps_batches(len(bundle.train), cfg.eps_batch_size)
    model = ctx.build_model(bundle.in_shape, bundle.num_classes)
    n = min(2, len(bundle.train))
    try:
        x, _ = dataset_batch(bundle.train, torch.arange(n))
    except Exception as err:
        raise PruneLimitError(f"--dataset {cfg.dataset!r}: cannot read training samples ({type(err).__name__}: "
                              f"{first_line(err)}); each sample must be an (input tensor, integer label) pair") from None
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()
            out = model(x)
    except Exception as err:
        raise PruneLimitError(
            f"--model {cfg.model!r} does not fit --dataset {cfg.dataset!r}: a forward pass on inputs of shape "
            f"{tuple(x.shape)} failed ({type(err).__name__}: {first_line(err)}); the model must map "
            f"(N, *in_shape) inputs to (N, num_classes) logits") from None
    expected = (n, int(bundle.num_classes))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise PruneLimitError(f"--model {cfg.model!r} on --dataset {cfg.dataset!r}: the model returns {got} for "
                              f"{n} samples, expected logits of shape {expected} ({bundle.num_classes} classes)")
