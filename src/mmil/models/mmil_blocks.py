"""The building blocks of the MMIL-Transformer (``docs/method/mmil.md §1.5, §2``).

* :class:`SubbagAttention`: the release's multi-head self-attention (no
  normalisation), one fused :func:`~torch.nn.functional.scaled_dot_product_attention`
  call per step, with a folded form for the last layer where only a few queries
  reach the logits.
* :class:`MMILLayer`: one layer, a sub-bag attention and a message attention.
* :class:`SubbagLayout` / :func:`build_subbag_layout`: where every instance and
  every sub-bag of a batch sits in the one padded ``(S, Lmax)`` sub-bag tensor
  (a stable sort and one ``index_copy``; no Python loop over sub-bags).

Masks follow the package convention (bool, True = a key that may be attended
to) and become additive biases through the shared :func:`~mmil.models.base.mask_to_bias`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import mask_to_bias

__all__ = ["SubbagAttention", "MMILLayer", "SubbagLayout", "build_subbag_layout"]


def _key_bias(key_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``(S, L)`` keep-mask -> ``(S, 1, 1, L)`` additive bias for every head and query (None: no mask)."""
    return None if key_mask is None else mask_to_bias(key_mask, dtype)[:, None, None, :]


class SubbagAttention(nn.Module):
    """Multi-head self-attention without normalisation, as in the release.

    ``softmax(q k^T * head_dim^-0.5) v`` per head with ``q, k, v = qkv(x)``
    (``Linear(D -> 3 h dh, bias=False)``, chunks in q, k, v order, heads ``(h dh)``
    contiguous), then ``out`` (``Linear(h dh -> D)``) and dropout. Returns the
    update only (the caller adds the residual).

    When only the first few positions are queried (``num_queries``: the message
    tokens in the last layer), keys and values are never projected. Because
    ``qkv`` has no bias, ``q_h . k_j = (W_k,h^T q_h) . x_j`` and
    ``sum_j p_j v_j = W_v,h (sum_j p_j x_j)``: each head's query is mapped into
    feature space and attends over the raw ``x`` (all heads as rows of one
    attention call with head width D). This costs O(h * L * D) per sequence
    instead of O(L * D * h * dh) for projecting every key and value.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, attn_dropout: float, proj_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Linear(inner, dim)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def _split_heads(self, t: Tensor) -> Tensor:
        S, L, _ = t.shape
        return t.view(S, L, self.heads, self.head_dim).transpose(1, 2)

    def _merge_out(self, o: Tensor) -> Tensor:
        """``(S, h, Lq, dh)`` -> output projection and dropout, ``(S, Lq, D)``."""
        S, _, Lq, _ = o.shape
        return self.proj_drop(self.out(o.transpose(1, 2).reshape(S, Lq, self.heads * self.head_dim)))

    def _folded_queries(self, x: Tensor, num_queries: int) -> Tensor:
        """Queries of the first ``num_queries`` positions mapped through the key
        weights: ``(S, num_queries * h, D)``, row ``i * h + head``."""
        S, _, D = x.shape
        inner = self.heads * self.head_dim
        wq, wk = self.qkv.weight[:inner], self.qkv.weight[inner : 2 * inner]
        q = F.linear(x[:, :num_queries], wq).view(S, num_queries, self.heads, self.head_dim)
        qk = torch.einsum("sqhe,hed->sqhd", q, wk.view(self.heads, self.head_dim, D))
        return qk.reshape(S, num_queries * self.heads, D)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, num_queries: int | None = None) -> Tensor:
        """Attention update for ``x`` ``(S, L, D)``: one fused attention call.

        Args:
            key_mask: ``(S, L)`` bool, True at keys that may be attended to, or None.
            num_queries: if given, only the first ``num_queries`` positions are
                queried and the result is ``(S, num_queries, D)`` (folded form, see class doc).
        """
        p = self.attn_dropout if self.training else 0.0
        if num_queries is None:
            q, k, v = (self._split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            return self._merge_out(F.scaled_dot_product_attention(q, k, v, attn_mask=_key_bias(key_mask, q.dtype), dropout_p=p))
        S, _, D = x.shape
        inner = self.heads * self.head_dim
        qk = self._folded_queries(x, num_queries).unsqueeze(1)  # (S, 1, nq h, D)
        xs = x.unsqueeze(1)
        bias = _key_bias(key_mask, qk.dtype)
        ctx = F.scaled_dot_product_attention(qk, xs, xs, attn_mask=bias, dropout_p=p, scale=self.head_dim**-0.5)
        ctx = ctx.view(S, num_queries, self.heads, D)
        wv = self.qkv.weight[2 * inner :].view(self.heads, self.head_dim, D)
        o = torch.einsum("sqhd,hed->shqe", ctx, wv)  # (S, h, nq, dh)
        return self._merge_out(o)

    def attention_weights(self, x: Tensor, key_mask: Tensor | None = None, num_queries: int | None = None) -> Tensor:
        """Explicit softmax attention weights ``(S, heads, Lq, L)`` in float32 (no dropout).

        Used only for instance scores; the forward pass stays on the fused kernel.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            S, L, D = x.shape
            xs = x.to(dtype)
            nq = L if num_queries is None else num_queries
            inner = self.heads * self.head_dim
            w = self.qkv.weight.to(dtype)
            q = F.linear(xs[:, :nq], w[:inner]).view(S, nq, self.heads, self.head_dim)
            qk = torch.einsum("sqhe,hed->shqd", q, w[inner : 2 * inner].view(self.heads, self.head_dim, D))
            scores = torch.matmul(qk, xs.unsqueeze(1).transpose(-1, -2)) * self.head_dim**-0.5
            if key_mask is not None:
                scores = scores + _key_bias(key_mask, dtype)
            return torch.softmax(scores, dim=-1)


class MMILLayer(nn.Module):
    """One layer: sub-bag attention (shared by all sub-bags) and message attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, attn_dropout: float, proj_dropout: float) -> None:
        super().__init__()
        self.subbag_attn = SubbagAttention(dim, heads, head_dim, attn_dropout, proj_dropout)
        self.msg_attn = SubbagAttention(dim, heads, head_dim, attn_dropout, proj_dropout)


@dataclass
class SubbagLayout:
    """Where every instance and every sub-bag sits in the padded sub-bag tensor.

    Attributes:
        num_slots: S, the number of (kept) sub-bags in the batch.
        max_len: Lmax, the largest sub-bag.
        src: ``(M,)`` flat indices into ``(B * N)`` of the M placed instances.
        dest: ``(M,)`` flat indices into ``(S * Lmax)`` where they go.
        lengths: ``(S,)`` instances per sub-bag.
        key_mask: ``(S, Lmax)`` bool, True at real instances (None if all real).
        slot_msg_index: ``(S,)`` row of each sub-bag in the ``(B * Gm)`` message grid.
        msg_valid: ``(B, Gm)`` bool, which message-grid cells hold a sub-bag.
    """

    num_slots: int
    max_len: int
    src: Tensor
    dest: Tensor
    lengths: Tensor
    key_mask: Tensor | None
    slot_msg_index: Tensor
    msg_valid: Tensor


def build_subbag_layout(ids: Tensor, valid: Tensor) -> SubbagLayout:
    """Vectorised layout of sub-bags (no loop over sub-bags).

    Sub-bag ``(b, g)`` with ``valid[b, g]`` becomes slot ``s`` (row-major order over
    ``(b, g)``); its instances fill ``[s, 0 : n_s]`` in stored order. In the message
    grid ``(B, Gm)`` the sub-bags of bag b sit at columns ``0 .. m_b - 1``.

    Args:
        ids: ``(B, N)`` int64 sub-bag ids, -1 for instances not placed.
        valid: ``(B, G)`` bool, sub-bags that exist (possibly empty).
    """
    B, N = ids.shape
    device = ids.device
    valid_flat = valid.flatten()
    slot_of = (torch.cumsum(valid_flat.long(), 0) - 1).view(valid.shape)
    num_slots = int(valid_flat.sum())
    placed = ids >= 0
    inst_slot = torch.where(placed, torch.gather(slot_of, 1, ids.clamp(min=0)), num_slots).flatten()
    order = torch.argsort(inst_slot, stable=True)
    counts = torch.bincount(inst_slot, minlength=num_slots + 1)
    lengths = counts[:num_slots]
    num_placed = int(placed.sum())
    max_len = int(lengths.max()) if num_slots > 0 else 0
    src = order[:num_placed]
    sorted_slot = inst_slot[src]
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(num_placed, device=device) - starts[sorted_slot]
    dest = sorted_slot * max_len + pos
    key_mask = torch.arange(max_len, device=device).view(1, -1) < lengths.view(-1, 1)
    if bool(key_mask.all()):
        key_mask = None
    per_bag = valid.sum(dim=1)
    grid_width = int(per_bag.max())
    col = torch.cumsum(valid.long(), dim=1) - 1  # column of each valid sub-bag
    bag_of = torch.arange(B, device=device).view(B, 1).expand_as(valid)
    slot_msg_index = (bag_of * grid_width + col)[valid]
    msg_valid = torch.arange(grid_width, device=device).view(1, -1) < per_bag.view(-1, 1)
    return SubbagLayout(num_slots, max_len, src, dest, lengths, key_mask, slot_msg_index, msg_valid)
