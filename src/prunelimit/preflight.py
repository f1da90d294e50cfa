"""Checks made before any step computes or writes: the device, the data, the model on that data.

A run that would fail on its input fails here, in one line, with nothing written: the dataset
is loaded (its factory called), the model built (its factory called) and run forward on two
training samples, and data-dependent sizes (the epsilon batch) are compared with the data.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import PruneLimitError
from .factories import first_line


def check_device(text: str, where: str = "--device") -> None:
    """``text`` names a torch device that exists here (cpu, an available cuda[:N], mps)."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise PruneLimitError(f"{where} {text!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise PruneLimitError(f"{where} {text}: CUDA is not available on this machine ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise PruneLimitError(f"{where} {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise PruneLimitError(f"{where} {text}: Apple MPS is not available on this machine; use --device cpu")
        return
    raise PruneLimitError(f"{where} {text!r}: prunelimit runs on cpu, cuda, cuda:N or mps, not {device.type}")


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
