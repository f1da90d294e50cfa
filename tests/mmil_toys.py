"""Tiny MIL models and data helpers for the data/train/evaluate/CLI tests.

The toy model is registered under a test-only name so the one training loop is
exercised independently of the real model families.
"""
from __future__ import annotations

import h5py
import numpy as np
import torch
from torch import nn

from mmil.models import MILModel, MILOutput, as_padded_batch, list_models, register_model

TOY = "toy-attn"


class ToyAttnMIL(MILModel):
    """Attention pooling: ``z = sum_i softmax(a(h_i)) h_i``, ``h_i = tanh(W x_i)``.

    ``instance_drop`` drops instances at random in training, from a generator
    seeded by the forward ``seed`` (so seeding reaches the model);
    ``seed_noise`` adds ``seed_noise * N(0, 1)`` (seeded) to the logits in every
    mode, making evaluation stochastic like random grouping.
    """

    inputs = ("seed",)

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 16, dropout: float = 0.0, instance_drop: float = 0.0, seed_noise: float = 0.0) -> None:
        super().__init__(in_dim, n_classes, hidden=hidden, dropout=dropout, instance_drop=instance_drop, seed_noise=seed_noise)
        self.proj = nn.Linear(in_dim, hidden)
        self.attn = nn.Linear(hidden, 1)
        self.head = nn.Linear(hidden, n_classes)
        self.drop = nn.Dropout(dropout)
        self.instance_drop, self.seed_noise = instance_drop, seed_noise

    def embed(self, x):
        return torch.tanh(self.proj(x))

    def forward(self, x, mask=None, *, seed=None, return_scores=False):
        x, mask = as_padded_batch(x, mask)
        return self.forward_head(self.forward_features(x, mask), mask, seed=seed, return_scores=return_scores)

    def forward_head(self, h, mask, *, seed=None, return_scores=False):
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        if self.training and self.instance_drop > 0:
            keep = torch.rand(mask.shape, generator=gen) >= self.instance_drop
            keep[:, 0] = True
            mask = mask & keep.to(mask.device)
        a = self.attn(h).squeeze(-1).float().masked_fill(~mask, float("-inf"))
        w = torch.softmax(a, dim=1)
        z = (w.unsqueeze(-1).to(h.dtype) * h).sum(1)
        logits = self.head(self.drop(z))
        if self.seed_noise > 0:
            logits = logits + self.seed_noise * torch.randn(logits.shape, generator=gen).to(logits.device, logits.dtype)
        return MILOutput(logits, w if return_scores else None)


def register_toys() -> str:
    """Register the toy model once per process; returns its name."""
    if TOY not in list_models():
        register_model(TOY)(lambda in_dim, n_classes, **kw: ToyAttnMIL(in_dim, n_classes, **kw))
    return TOY


def write_h5(path, features, coords=None, groups=None, **attrs) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        if coords is not None:
            f.create_dataset("coords", data=coords)
        if groups is not None:
            f.create_dataset("groups", data=groups)
        for k, v in attrs.items():
            f.attrs[k] = v


def write_csv(path, header, rows) -> None:
    lines = [",".join(header)] + [",".join(str(c) for c in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def naive_auc(y, s) -> float:
    """Mann-Whitney by a double loop: P(s_pos > s_neg) + 0.5 P(tie)."""
    pos = [si for yi, si in zip(y, s) if yi == 1]
    neg = [si for yi, si in zip(y, s) if yi == 0]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rng_features(seed: int, n: int, c: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c)).astype(np.float32)

