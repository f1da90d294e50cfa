"""Seeded work that leaves the caller's random state alone.

Library calls that seed torch's global generator (model initialisation, dropout) run
inside :func:`private_rng`: a fork of the global state, restored on the way out, so
``torch.rand`` after a call to :func:`mmil.train.train_fold` draws what it would have
drawn without it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch


def derived_seed(*parts: int) -> int:
    """A 31-bit seed determined by ``parts`` (NumPy's ``SeedSequence`` hash)."""
    return int(np.random.SeedSequence([int(p) % (2**32) for p in parts]).generate_state(1)[0] % (2**31 - 1))


def _cuda_index(device: torch.device | None) -> list[int]:
    if device is None or device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def seed_global_rng(seed: int, device: torch.device | None = None) -> None:
    """Seed the CPU generator, and ``device``'s when it is a GPU (the ones a pass on ``device`` draws from)."""
    torch.default_generator.manual_seed(int(seed))
    for index in _cuda_index(device):
        with torch.cuda.device(index):
            torch.cuda.manual_seed(int(seed))


@contextlib.contextmanager
def private_rng(seed: int | None = None, device: torch.device | None = None) -> Iterator[None]:
    """Run the block on a copy of the global RNG state (the CPU's, and ``device``'s when it is a
    GPU), seeded with ``seed`` when given; the caller's state is restored afterwards."""
    with torch.random.fork_rng(devices=_cuda_index(device)):
        if seed is not None:
            seed_global_rng(seed, device)
        yield
