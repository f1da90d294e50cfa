"""Exact statistics across ranks: every sum over data is an explicit all-reduce.

Under `torchrun` each rank holds a shard of the data (`shard`). A data-mean quantity
(loss, gradient, Hessian-vector product) is computed as a local (sum, count) pair, then
both are all-reduced and divided, so every rank gets the single-process value and the same
bits. DDP's gradient hooks do not fire for `torch.autograd.grad`, which is why this is
explicit. Without an initialised process group everything here is a no-op.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world", "all_reduce_sum", "shard", "ShardedData"]

T = TypeVar("T")


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks in place and return it (a no-op in a single process).

    The tensor must live where the backend can reduce it (CPU for gloo, CUDA for nccl).
    All ranks receive the same reduced buffer, so downstream computations stay identical.
    """
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ShardedData(Iterable[T]):
    """Every `world_size`-th batch of `data`, starting at `rank` (re-iterable if `data` is)."""

    def __init__(self, data: Iterable[T], rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Iterator[T]:
        return itertools.islice(iter(self.data), self.rank, None, self.world_size)

    def __len__(self) -> int:
        n = len(self.data)  # type: ignore[arg-type]
        return max(0, math.ceil((n - self.rank) / self.world_size))


def shard(data: Iterable[T], rank: int | None = None, world_size: int | None = None) -> ShardedData[T]:
    """The batches of `data` this rank owns: batches rank, rank + W, rank + 2W, ...

    Defaults to the current process group's rank and size. Batches are dealt round-robin,
    so a data-mean over all shards (weighted by batch size) equals the single-process mean.
    """
    if rank is None or world_size is None:
        r, w = world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    return ShardedData(data, rank, world_size)
