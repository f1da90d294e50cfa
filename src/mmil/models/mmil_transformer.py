"""MMIL-Transformer (arXiv 2306.05029), batched: spec ``shared/specs/mmil.md`` §1, §2, §4.

The model, per bag of N instances (features ``(N, C)``):

1. ``h = input_proj(x) + instance_bias`` (``input_proj`` is the release's ``fc1``;
   ``instance_bias`` its "absolute position embedding", one learned vector added
   to every instance).
2. Group the instances into G sub-bags (:mod:`mmil.grouping`).
3. Prepend k copies of the message token to every sub-bag; the bag token starts
   from its own learned vector.
4. Each of L layers: ``z <- z + MHSA_a(z)`` inside every sub-bag, then
   ``s <- s + MHSA_m(s)`` over ``[bag token; message tokens of every sub-bag]``.
   No LayerNorm, no feed-forward block.
5. ``logits = head(bag token)`` (the release's ``fc2``).

How it is batched. All sub-bags of all bags of a batch are laid out once per
forward pass in one padded tensor ``(S, k + Lmax, D)`` (S = number of sub-bags in
the batch, Lmax = largest sub-bag) with a key-padding mask; the layout is built by
a stable sort of the instances by sub-bag and one ``index_copy`` (no Python loop
over sub-bags). Each attention step is ONE
:func:`torch.nn.functional.scaled_dot_product_attention` call; on CPU and GPU
this takes the fused (flash) kernel, so memory is O(N) and compute O(N^2 / G).
Because the grouping is fixed during a pass, instances stay in that layout for
all layers and are never gathered back.

In the last layer only the message tokens' sub-bag attention and the bag
token's message attention reach the logits, so only those queries are computed
there, with keys and values left unprojected (``SubbagAttention``'s folded form):
same logits, and the last layer costs O(h N D) instead of O(N^2 / G) + O(N D^2).

Rules we chose where the release is silent or breaks (documented, and followed
by the naive reference in ``tests/reference_mmil.py``):

* Empty sub-bags (a bag with N < G, an empty k-means cluster) keep their message
  tokens; those attend only to the sub-bag's message tokens, and take part in the
  message step like any other sub-bag. (This is what the release computes for an
  empty ``array_split`` chunk.) No attention row is ever fully masked, so no NaN.
* ``grouping="index"``: the distinct labels of a bag are its sub-bags (their
  count may differ from ``num_subbags`` and between the bags of a batch; a bag's
  output does not depend on the other bags of the batch).
* Sub-bag masking (``mask_ratio > 0``, training only): before the first layer,
  ``max(1, int(G * (1 - mask_ratio)))`` sub-bags are kept at random, the others
  vanish for the whole pass (as the release's first layer does).
* ``max_subbag_size`` (off by default): a sub-bag larger than the cap keeps a
  random subset of that size, at training and test time; the number of dropped
  instances is reported in ``extras["num_capped"]``. Nothing is dropped unless
  the cap is set.

Randomness of grouping, masking and cap comes from ``seed`` (a local
:class:`torch.Generator`; the global RNG is untouched); ``seed=None`` uses the
global RNG. Dropout uses torch's global RNG as usual.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MMILInputError
from ..grouping import (
    GROUPINGS,
    cap_subbags,
    drop_subbags,
    index_groups,
    kmeans_groups,
    make_generator,
    random_groups,
    sequential_groups,
)
from .base import MILModel, MILOutput, as_padded_batch
from .registry import register_model

__all__ = [
    "MMILTransformer",
    "SubbagAttention",
    "SubbagLayout",
    "build_subbag_layout",
    "released_checkpoint_filter",
    "load_released_checkpoint",
    "ReleasedImportReport",
]


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
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        p = self.attn_dropout if self.training else 0.0
        if num_queries is None:
            q, k, v = (self._split_heads(t) for t in self.qkv(x).chunk(3, dim=-1))
            return self._merge_out(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p))
        S, _, D = x.shape
        inner = self.heads * self.head_dim
        qk = self._folded_queries(x, num_queries).unsqueeze(1)  # (S, 1, nq h, D)
        xs = x.unsqueeze(1)
        ctx = F.scaled_dot_product_attention(qk, xs, xs, attn_mask=attn_mask, dropout_p=p, scale=self.head_dim**-0.5)
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
                scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
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


class MMILTransformer(MILModel):
    """Multi-level MIL Transformer, batched over bags and sub-bags.

    Args:
        in_dim: instance feature dimension C.
        n_classes: number of classes.
        embed_dim: D (512 in the paper).
        num_subbags: G, sub-bags per bag (ignored by ``grouping="index"``).
        grouping: one of :data:`mmil.grouping.GROUPINGS`.
        num_msg: k, message tokens per sub-bag.
        num_layers: L.
        heads, head_dim: attention heads and their width (release: 8 x 64).
        attn_dropout: dropout on attention weights (release 0.1; 0.0 keeps the
            fused CPU kernel in training).
        proj_dropout: dropout after each attention's output projection.
        mask_ratio: fraction of sub-bags dropped in training (0 = off).
        max_subbag_size: optional cap on instances per sub-bag (None = no cap).
        use_input_proj: apply ``input_proj`` (C -> D). Must be True when C != D.
        kmeans_iters: Lloyd iterations for the k-means groupings.
        dropout: alias of ``proj_dropout`` (the package-wide constructor name).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 512,
        num_subbags: int = 10,
        grouping: str = "random",
        num_msg: int = 1,
        num_layers: int = 2,
        heads: int = 8,
        head_dim: int = 64,
        attn_dropout: float = 0.0,
        proj_dropout: float = 0.1,
        mask_ratio: float = 0.0,
        max_subbag_size: int | None = None,
        use_input_proj: bool = True,
        kmeans_iters: int = 10,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if dropout is not None:
            proj_dropout = dropout
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {grouping!r}; choose one of: {', '.join(GROUPINGS)}")
        for name, value in (("in_dim", in_dim), ("n_classes", n_classes), ("embed_dim", embed_dim), ("num_subbags", num_subbags),
                            ("num_msg", num_msg), ("num_layers", num_layers), ("heads", heads), ("head_dim", head_dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        for name, value in (("attn_dropout", attn_dropout), ("proj_dropout", proj_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if max_subbag_size is not None and (int(max_subbag_size) != max_subbag_size or max_subbag_size < 1):
            raise ValueError(f"max_subbag_size must be a positive integer or None, got {max_subbag_size!r}")
        if kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
        if not use_input_proj and in_dim != embed_dim:
            raise ValueError(f"use_input_proj=False needs in_dim == embed_dim, got in_dim={in_dim}, embed_dim={embed_dim}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.embed_dim = int(embed_dim)
        self.num_subbags = int(num_subbags)
        self.grouping = grouping
        self.num_msg = int(num_msg)
        self.mask_ratio = float(mask_ratio)
        self.max_subbag_size = None if max_subbag_size is None else int(max_subbag_size)
        self.kmeans_iters = int(kmeans_iters)
        self.init_kwargs: dict[str, Any] = dict(
            in_dim=self.in_dim, n_classes=self.n_classes, embed_dim=self.embed_dim, num_subbags=self.num_subbags,
            grouping=grouping, num_msg=self.num_msg, num_layers=int(num_layers), heads=int(heads), head_dim=int(head_dim),
            attn_dropout=float(attn_dropout), proj_dropout=float(proj_dropout), mask_ratio=self.mask_ratio,
            max_subbag_size=self.max_subbag_size, use_input_proj=bool(use_input_proj), kmeans_iters=self.kmeans_iters,
        )
        self.input_proj: nn.Module = nn.Linear(in_dim, embed_dim) if use_input_proj else nn.Identity()
        self.instance_bias = nn.Parameter(torch.zeros(embed_dim))
        self.msg_token = nn.Parameter(torch.zeros(embed_dim))
        self.bag_token = nn.Parameter(torch.randn(embed_dim))
        self.layers = nn.ModuleList(MMILLayer(embed_dim, heads, head_dim, attn_dropout, proj_dropout) for _ in range(num_layers))
        self.head = nn.Linear(embed_dim, n_classes)

    # ----------------------------------------------------------------- grouping
    def assign_subbags(
        self,
        h: Tensor | None,
        mask: Tensor,
        *,
        coords: Tensor | None = None,
        groups: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sub-bag ids ``(B, N)`` (-1 at pads) and the existing sub-bags ``(B, G)`` for
        the configured grouping. ``h`` are the projected features (needed for ``embedding`` only)."""
        B, N = mask.shape
        G = self.num_subbags
        all_valid = torch.ones(B, G, dtype=torch.bool, device=mask.device)
        if self.grouping == "random":
            return random_groups(mask, G, generator), all_valid
        if self.grouping == "sequential":
            return sequential_groups(mask, G), all_valid
        if self.grouping == "embedding":
            if h is None:
                raise ValueError("grouping='embedding' needs the projected features")
            return kmeans_groups(h, mask, G, self.kmeans_iters, generator), all_valid
        if self.grouping == "coords":
            if coords is None:
                raise ValueError("grouping='coords' needs patch coordinates: pass coords (B, N, 2) or use another grouping")
            coords = coords.unsqueeze(0) if coords.dim() == 2 else coords
            if coords.shape[:2] != (B, N):
                raise ValueError(f"coords must have shape {(B, N, 2)}, got {tuple(coords.shape)}")
            return kmeans_groups(coords.to(mask.device), mask, G, self.kmeans_iters, generator), all_valid
        # index
        if groups is None:
            raise ValueError("grouping='index' needs precomputed group labels: pass groups (B, N) or use another grouping")
        groups = groups.unsqueeze(0) if groups.dim() == 1 else groups
        ids, counts = index_groups(groups.to(mask.device), mask)
        width = int(counts.max())
        valid = torch.arange(width, device=mask.device).view(1, -1) < counts.view(-1, 1)
        return ids, valid

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        coords: Tensor | None = None,
        groups: Tensor | None = None,
        seed: int | None = None,
        return_scores: bool = False,
    ) -> MILOutput:
        """Bag logits for a bag ``(N, C)`` or a padded batch ``(B, N, C)`` + ``mask``.

        ``extras`` holds ``subbag_ids`` ``(B, N)`` (the sub-bag of each instance
        after masking and cap, -1 if not used), ``subbag_valid`` ``(B, G)`` (the
        sub-bags that took part) and ``num_capped``. With ``return_scores`` the
        instance scores of spec §4 (see :meth:`_instance_scores`) and
        ``extras["bag_self_weight"]`` ``(B,)`` are returned too.
        """
        x, mask = as_padded_batch(x, mask)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"features have dimension {x.shape[-1]} but the model was built for in_dim={self.in_dim}")
        B, N, _ = x.shape
        generator = make_generator(seed, x.device)
        h_all = None
        if self.grouping == "embedding":
            # Zero the pads so that garbage there (even NaN) reaches neither k-means nor the gradients.
            x_clean = x if bool(mask.all()) else x.masked_fill(~mask.unsqueeze(-1), 0.0)
            h_all = self.input_proj(x_clean) + self.instance_bias
        ids, valid = self.assign_subbags(h_all, mask, coords=coords, groups=groups, generator=generator)
        if self.training and self.mask_ratio > 0:
            ids, valid = drop_subbags(ids, valid, self.mask_ratio, generator)
        num_capped = 0
        if self.max_subbag_size is not None:
            before = ids >= 0
            ids = cap_subbags(ids, valid.shape[1], self.max_subbag_size, generator)
            num_capped = int((before & (ids < 0)).sum())
        layout = build_subbag_layout(ids, valid)
        # Only the instances placed in a sub-bag are projected (pads, dropped and capped ones never are).
        if h_all is not None:
            h = h_all.reshape(B * N, -1)[layout.src]
        else:
            h = self.input_proj(x.reshape(B * N, -1)[layout.src]) + self.instance_bias
        bag, scores, bag_self = self._encode(h, layout, B, N, return_scores)
        logits = self.head(bag)
        extras: dict[str, Any] = {"subbag_ids": ids, "subbag_valid": valid, "num_capped": num_capped}
        if bag_self is not None:
            extras["bag_self_weight"] = bag_self
        return MILOutput(logits=logits, instance_scores=scores, extras=extras)

    def _encode(self, h: Tensor, layout: SubbagLayout, B: int, N: int, return_scores: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Run the L layers on the padded sub-bag layout; return the final bag token ``(B, D)``
        (and the instance scores when asked). ``h`` are the placed instances ``(M, D)``
        in ``layout.src`` order."""
        D = h.shape[-1]
        k, S, Lmax = self.num_msg, layout.num_slots, layout.max_len
        dtype = h.dtype
        inst = h.new_zeros(S * Lmax, D).index_copy(0, layout.dest, h).view(S, Lmax, D)
        key_mask = None
        if layout.key_mask is not None:
            key_mask = torch.cat([layout.key_mask.new_ones(S, k), layout.key_mask], dim=1)
        width = layout.msg_valid.shape[1]
        seq_mask = None
        if not bool(layout.msg_valid.all()):
            seq_mask = torch.cat([layout.msg_valid.new_ones(B, 1), layout.msg_valid.repeat_interleave(k, dim=1)], dim=1)
        msg = self.msg_token.to(dtype).expand(S, k, D)
        bag = self.bag_token.to(dtype).expand(B, 1, D)
        scores = bag_self = None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            z = torch.cat([msg, inst], dim=1)
            if last:
                # Only the message tokens' updates reach the logits from here on.
                msg = msg + layer.subbag_attn(z, key_mask, num_queries=k)
            else:
                z = z + layer.subbag_attn(z, key_mask)
                msg, inst = z[:, :k], z[:, k:]
            grid = msg.new_zeros(B * width, k, D).index_copy(0, layout.slot_msg_index, msg).view(B, width * k, D)
            seq = torch.cat([bag, grid], dim=1)
            if last:
                bag = bag + layer.msg_attn(seq, seq_mask, num_queries=1)
                if return_scores:
                    scores, bag_self = self._instance_scores(layer, z, key_mask, seq, seq_mask, layout, B, N)
            else:
                seq = seq + layer.msg_attn(seq, seq_mask)
                bag = seq[:, :1]
                msg = seq[:, 1:].reshape(B * width, k, D).index_select(0, layout.slot_msg_index)
        return bag[:, 0], scores, bag_self

    def _instance_scores(
        self, layer: MMILLayer, z: Tensor, key_mask: Tensor | None, seq: Tensor, seq_mask: Tensor | None, layout: SubbagLayout, B: int, N: int
    ) -> tuple[Tensor, Tensor]:
        """Instance importance of spec §4, from the last layer.

        ``score_i = sum_j w_(g,j) * a_(g,j)->i`` for instance i of sub-bag g, where
        ``w_(g,j)`` is the bag token's attention to message token j of sub-bag g and
        ``a_(g,j)->i`` that message token's attention to instance i, each averaged
        over heads. The bag token also attends to itself (``bag_self_weight``) and
        message tokens to message tokens, so per bag
        ``sum_i score_i = sum_(g,j) w_(g,j) * (1 - sum_j' a_(g,j)->(g,j')) <= 1 - bag_self_weight``.
        Zero at pads and at instances not placed in a sub-bag.
        """
        k = self.num_msg
        a_sub = layer.subbag_attn.attention_weights(z, key_mask, num_queries=k).mean(dim=1)  # (S, k, k + Lmax)
        a_bag = layer.msg_attn.attention_weights(seq, seq_mask, num_queries=1).mean(dim=1)[:, 0]  # (B, 1 + Gm k)
        w = a_bag[:, 1:].reshape(-1, k).index_select(0, layout.slot_msg_index)  # (S, k)
        slot_scores = torch.einsum("sk,skl->sl", w, a_sub[:, :, k:])
        flat = slot_scores.new_zeros(B * N)
        flat[layout.src] = slot_scores.reshape(-1)[layout.dest]
        return flat.view(B, N), a_bag[:, 0]

    # -------------------------------------------------------------- inference
    @torch.no_grad()
    def predict_proba(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        coords: Tensor | None = None,
        groups: Tensor | None = None,
        seed: int = 0,
        repeats: int = 1,
    ) -> Tensor:
        """Test-time ensemble: class probabilities ``(B, n_classes)`` averaged over
        ``repeats`` groupings drawn with seeds ``seed, seed + 1, ...``.

        Runs in the model's current mode (call ``model.eval()`` first for inference).
        """
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        total = None
        for r in range(repeats):
            p = self.forward(x, mask, coords=coords, groups=groups, seed=seed + r).probs
            total = p if total is None else total + p
        return total / repeats


@register_model("mmil")
def mmil_transformer(in_dim: int, n_classes: int, **kwargs) -> MMILTransformer:
    """MMIL-Transformer (spec defaults: D=512, G=10, 2 layers, 8 heads of 64)."""
    return MMILTransformer(in_dim, n_classes, **kwargs)


# ---------------------------------------------------------- released checkpoints
_RELEASED_LAYER_KEY = re.compile(
    r"^layers\.(\d+)\.(GroupsAttenLayer|GroupsMSGAttenLayer)\.AttenLayer\.attn\.(to_qkv\.weight|to_out\.0\.weight|to_out\.0\.bias)$"
)
_RELEASED_STEP = {"GroupsAttenLayer": "subbag_attn", "GroupsMSGAttenLayer": "msg_attn"}
_RELEASED_PARAM = {"to_qkv.weight": "qkv.weight", "to_out.0.weight": "out.weight", "to_out.0.bias": "out.bias"}
_RELEASED_PLAIN = {"fc1.weight": "input_proj.weight", "fc1.bias": "input_proj.bias", "fc2.weight": "head.weight", "fc2.bias": "head.bias"}
_RELEASED_TOKENS = {"msgcls_token": "bag_token", "msg_tokens": "msg_token", "absolute_pos_embed": "instance_bias"}


@dataclass
class ReleasedImportReport:
    """What :func:`released_checkpoint_filter` did.

    Attributes:
        mapped: ``(released_key, our_key)`` pairs.
        unexpected: released keys it did not recognise (not copied).
        missing: keys the result lacks: our model's keys when a model is given,
            else required keys of the released layout.
        shape_mismatch: ``(our_key, checkpoint_shape, model_shape)`` when a model is given.
    """

    mapped: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.missing or self.shape_mismatch)


def released_checkpoint_filter(state_dict: Mapping[str, Tensor], model: nn.Module | None = None) -> tuple[dict[str, Tensor], ReleasedImportReport]:
    """Map a state dict in the released layout (spec §1.8) to :class:`MMILTransformer`'s.

    ``fc1 -> input_proj``, ``fc2 -> head``, ``msgcls_token (1,1,1,D) -> bag_token (D,)``,
    ``msg_tokens (1,1,1,D) -> msg_token (D,)``, ``absolute_pos_embed (1,1,D) -> instance_bias (D,)``,
    ``layers.i.GroupsAttenLayer.AttenLayer.attn.{to_qkv,to_out.0} -> layers.i.subbag_attn.{qkv,out}``
    and ``GroupsMSGAttenLayer -> msg_attn``. A ``module.`` prefix (DataParallel) is
    stripped. The input is never modified; tensors are copied.

    Args:
        state_dict: the released weights.
        model: optional target; if given, missing keys and shape mismatches are
            reported against its ``state_dict()``.

    Returns:
        ``(new_state_dict, report)``.
    """
    new: dict[str, Tensor] = {}
    report = ReleasedImportReport()
    layer_ids: set[int] = set()
    for key, value in state_dict.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if not isinstance(value, Tensor):
            report.unexpected.append(key)
            continue
        ours: str | None = None
        tensor = value.detach().clone()
        if name in _RELEASED_PLAIN:
            ours = _RELEASED_PLAIN[name]
        elif name in _RELEASED_TOKENS:
            if value.dim() == 0 or value.numel() != value.shape[-1]:
                report.unexpected.append(key)  # e.g. several distinct message tokens: not this architecture
                continue
            ours = _RELEASED_TOKENS[name]
            tensor = tensor.reshape(-1)
        else:
            m = _RELEASED_LAYER_KEY.match(name)
            if m:
                layer_ids.add(int(m.group(1)))
                ours = f"layers.{m.group(1)}.{_RELEASED_STEP[m.group(2)]}.{_RELEASED_PARAM[m.group(3)]}"
        if ours is None:
            report.unexpected.append(key)
            continue
        new[ours] = tensor
        report.mapped.append((key, ours))
    if model is not None:
        target = model.state_dict()
        report.missing = sorted(k for k in target if k not in new)
        extra = sorted(k for k in new if k not in target)
        report.unexpected += [src for src, dst in report.mapped if dst in extra]
        for k, v in new.items():
            if k in target and tuple(v.shape) != tuple(target[k].shape):
                report.shape_mismatch.append((k, tuple(v.shape), tuple(target[k].shape)))
    else:
        required = ["head.weight", "head.bias", "bag_token", "msg_token", "instance_bias"]
        for i in sorted(layer_ids) or [0]:
            for step in ("subbag_attn", "msg_attn"):
                required += [f"layers.{i}.{step}.{p}" for p in ("qkv.weight", "out.weight", "out.bias")]
        if "input_proj.weight" in new or "input_proj.bias" in new:
            required += ["input_proj.weight", "input_proj.bias"]
        report.missing = [k for k in required if k not in new]
    return new, report


def _read_released_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise MMILInputError(f"{path}: no such checkpoint file; pass the path of the released .pth/.pt weights")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip, code objects refused by weights_only
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MMILInputError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({first}); "
            "pass a plain state dict saved with torch.save (pickled modules are refused)"
        ) from None
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise MMILInputError(f"{path}: holds no state dict (found {type(obj).__name__}); pass the released MMIL-Transformer weights")
    return dict(obj)


def load_released_checkpoint(
    path: str | Path,
    *,
    in_dim: int | None = None,
    n_classes: int | None = None,
    embed_dim: int | None = None,
    num_layers: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    **model_kwargs: Any,
) -> MMILTransformer:
    """Build an :class:`MMILTransformer` from a released checkpoint file (spec §1.8).

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``;
    a dict wrapping the weights under ``model``/``state_dict`` is accepted. Shapes
    give ``embed_dim``, ``n_classes``, ``num_layers``, ``in_dim`` (from ``fc1``; with
    no ``fc1`` the release ran 512-d features without projection, so the model is
    built with ``use_input_proj=False`` and ``in_dim = embed_dim``) and ``heads x
    head_dim`` (their product; 8 heads unless ``heads`` or ``head_dim`` is given).
    Values given explicitly must agree with the file. ``model_kwargs`` set the
    other options (``num_subbags``, ``grouping``, ``num_msg``, dropout, ...).

    Returns the model in eval mode; ``model.init_kwargs`` are the constructor
    arguments (for :func:`mmil.checkpoint.save_checkpoint`).

    Raises:
        MMILInputError: naming the file, if it is missing, unreadable, not in the
            released layout, or does not fit the requested configuration.
    """
    path = Path(path)
    state = _read_released_state(path)
    converted, report = released_checkpoint_filter(state)
    if report.missing:
        raise MMILInputError(
            f"{path}: not a released MMIL-Transformer checkpoint (missing {', '.join(report.missing[:4])}"
            f"{', ...' if len(report.missing) > 4 else ''}); expected the key layout fc1/fc2/msgcls_token/msg_tokens/layers.i.GroupsAttenLayer..."
        )
    if report.unexpected:
        raise MMILInputError(
            f"{path}: unexpected keys {', '.join(report.unexpected[:4])}{', ...' if len(report.unexpected) > 4 else ''}; "
            "this checkpoint is not the released MMIL-Transformer architecture"
        )

    def agree(name: str, given: int | None, found: int, where: str) -> int:
        if given is not None and int(given) != found:
            raise MMILInputError(f"{path}: {where} gives {name}={found} but {name}={given} was requested; drop the option or use the matching checkpoint")
        return found

    found_embed = int(converted["head.weight"].shape[1])
    embed = agree("embed_dim", embed_dim, found_embed, f"fc2.weight {tuple(converted['head.weight'].shape)}")
    classes = agree("n_classes", n_classes, int(converted["head.weight"].shape[0]), f"fc2.weight {tuple(converted['head.weight'].shape)}")
    layer_ids = {int(k.split(".")[1]) for k in converted if k.startswith("layers.")}
    layers = agree("num_layers", num_layers, max(layer_ids) + 1, "the layer keys")
    if "input_proj.weight" in converted:
        feat = agree("in_dim", in_dim, int(converted["input_proj.weight"].shape[1]), f"fc1.weight {tuple(converted['input_proj.weight'].shape)}")
        use_proj = True
    else:
        if in_dim is not None and int(in_dim) != embed:
            raise MMILInputError(
                f"{path}: has no fc1 (the release feeds {embed}-d features directly) but in_dim={in_dim} was requested; "
                f"use {embed}-d features or a checkpoint with fc1"
            )
        feat, use_proj = embed, False
    if model_kwargs.get("use_input_proj") is False and use_proj:
        raise MMILInputError(f"{path}: has fc1 weights but use_input_proj=False was requested; drop the option")
    model_kwargs.pop("use_input_proj", None)
    inner = int(converted["layers.0.subbag_attn.qkv.weight"].shape[0]) // 3
    if heads is None and head_dim is None:
        heads = 8 if inner % 8 == 0 else 1
    if heads is not None and head_dim is None:
        head_dim = inner // int(heads) if inner % int(heads) == 0 else -1
    if heads is None:
        heads = inner // int(head_dim) if inner % int(head_dim) == 0 else -1
    if int(heads) * int(head_dim) != inner:
        raise MMILInputError(f"{path}: attention width is {inner} (to_qkv.weight rows / 3), which heads={heads} x head_dim={head_dim} does not give")
    try:
        model = MMILTransformer(
            feat, classes, embed_dim=embed, num_layers=layers, heads=int(heads), head_dim=int(head_dim), use_input_proj=use_proj, **model_kwargs
        )
    except (TypeError, ValueError) as err:
        raise MMILInputError(f"{path}: cannot build the model for this checkpoint: {err}") from None
    _, report = released_checkpoint_filter(state, model)
    if not report.ok:
        raise MMILInputError(
            f"{path}: weights do not fit the model (missing {report.missing[:3]}, unexpected {report.unexpected[:3]}, "
            f"shape mismatch {report.shape_mismatch[:3]}); check --in-dim/heads against the checkpoint"
        )
    model.load_state_dict(converted, strict=True)
    return model.eval()
