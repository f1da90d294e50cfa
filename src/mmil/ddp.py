"""Data-parallel training of one fold under ``torchrun`` (issue 12; ``docs/method/mmil.md`` §3).

``torchrun --nproc_per_node=G mmil train ...`` (with ``--workers 1``, the default) trains
every fold on all ``G`` ranks together:

* every rank draws the same permutation of the epoch's bags (a function of
  ``(seed, epoch)``), pads it cyclically to a multiple of ``G`` (as
  ``torch.utils.data.DistributedSampler`` does) and takes every ``G``-th bag from
  position ``rank`` (:func:`rank_share`);
* an optimiser step consumes ``G * accumulate`` consecutive bags of that order, each rank
  ``accumulate`` of them: the gradients of ``loss / accumulate`` are averaged over the
  ranks by :class:`torch.nn.parallel.DistributedDataParallel` (``gloo`` on CPU, ``nccl``
  on CUDA), so the step equals that of one process accumulating the same ``G * accumulate``
  bags with ``loss / (G * accumulate)``; augmentation and forward seeds use the bag's
  position in the global order, so they match too (dropout masks come from each rank's
  own stream and do not);
* parameters that get no gradient on some bags (e.g. CLAM's instance classifiers of
  the other class) are handled by ``find_unused_parameters=True``: a small cost per step
  for one code path that serves every registered model;
* each rank validates the whole validation set (the same weights and seeds give the same
  numbers, so every rank takes the same early-stopping decision) and the epoch's training
  loss is summed over the ranks; only rank 0 writes checkpoints, resume states and results.
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched_world() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when not launched so)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the running process group, ``(0, 1)`` without one."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_writer() -> bool:
    """Only rank 0 writes."""
    return rank_world()[0] == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group ``torchrun`` describes (``nccl`` for a CUDA ``device``, else ``gloo``).

    Returns whether a group of more than one rank is running; does nothing when not launched
    by torchrun or already initialised.
    """
    if launched_world() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=24))  # ranks wait for each other's folds
    return active()


def barrier() -> None:
    if active():
        dist.barrier()


def rank_share(order: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s bags of an epoch and their positions in the padded global order.

    ``order`` (length ``n``) is extended cyclically to ``ceil(n / world) * world`` entries
    (``padded[i] = order[i mod n]``); the rank takes ``padded[rank::world]``. Returns
    ``(bags, positions)`` with ``positions = rank, rank + world, ...``.
    """
    n = len(order)
    total = -(-n // world) * world
    positions = np.arange(rank, total, world)
    return np.asarray(order)[positions % n], positions


class MILDistributed(DistributedDataParallel):
    """``DistributedDataParallel`` that still answers the MIL model interface callers read
    (``inputs``, ``loss``, ``init_kwargs``) from the wrapped model."""

    @property
    def inputs(self):
        return self.module.inputs

    def loss(self, *args, **kwargs):
        return self.module.loss(*args, **kwargs)


def wrap_model(model: nn.Module, device: torch.device) -> MILDistributed:
    """``model`` (already on ``device``) under DDP, ``find_unused_parameters=True`` (see the module doc)."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return MILDistributed(model, device_ids=ids, find_unused_parameters=True)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (the values themselves without a group)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()
