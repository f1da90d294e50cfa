"""epsilon: the spread of the per-batch training loss, the loss budget of the predicted threshold."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .batches import batch_loss, check_loss_fn, eval_mode, fixed_batches, prepared_batches
from .distributed import all_reduce_sum, is_distributed
from .errors import PruneLimitError

__all__ = ["loss_epsilon"]


def loss_epsilon(model: nn.Module, loss_fn: Callable, data: Iterable, *, ddof: int = 0,
                 device: torch.device | str | None = None, progress: bool = False,
                 distributed: bool | None = None) -> float:
    """eps = standard deviation of the per-batch training loss over one pass, in eval mode.

    eps = sqrt( sum_b (L_b - mean L)^2 / (B - ddof) ) over the B batches of `data` (the caller
    supplies batches of 128, no augmentation; docs/method/prunelimit.md §3.1). Under
    torch.distributed each rank passes its shard; (sum, count) and then the squared deviations
    are all-reduced, so all ranks get the single-process value.
    """
    check_loss_fn(loss_fn)
    data = fixed_batches(data)
    if device is not None:
        model.to(device)
    params = list(model.parameters())
    dev = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    dtype = params[0].dtype if params else None
    dist_on = is_distributed() if distributed is None else bool(distributed)
    losses = []
    with eval_mode(model), torch.no_grad():
        for index, _, inputs, targets in prepared_batches(data, dev, dtype, progress=progress, desc="loss epsilon"):
            losses.append(batch_loss(model, loss_fn, inputs, targets, index).to(torch.float64))
    local = torch.stack(losses) if losses else torch.zeros(0, dtype=torch.float64, device=dev)
    stats = torch.stack([local.sum(), torch.tensor(float(local.numel()), dtype=torch.float64, device=dev)])
    if dist_on:
        all_reduce_sum(stats)
    count = int(round(float(stats[1])))
    if count - ddof <= 0:
        raise PruneLimitError(f"loss_epsilon needs more than {ddof} batches, got {count}")
    mean = stats[0] / count
    sq = ((local - mean) ** 2).sum().reshape(1)
    if dist_on:
        all_reduce_sum(sq)
    return float(torch.sqrt(sq[0] / (count - ddof)))
