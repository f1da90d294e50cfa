"""MMIL-Transformer (arXiv 2306.05029), batched: ``docs/method/mmil.md §1, §2, §4``.

The model, per bag of N instances (features ``(N, C)``):

1. ``h = input_proj(x) + instance_bias`` (``input_proj`` is the release's ``fc1``;
   ``instance_bias`` its "absolute position embedding", one learned vector added
   to every instance): :meth:`MMILTransformer.forward_features`.
2. Group the instances into G sub-bags (:mod:`mmil.grouping`, by registered name).
3. Prepend k copies of the message token to every sub-bag; the bag token starts
   from its own learned vector.
4. Each of L layers: ``z <- z + MHSA_a(z)`` inside every sub-bag, then
   ``s <- s + MHSA_m(s)`` over ``[bag token; message tokens of every sub-bag]``.
   No LayerNorm, no feed-forward block.
5. ``logits = head(bag token)`` (the release's ``fc2``).

Steps 2-5 are :meth:`MMILTransformer.forward_head`. How it is batched: all
sub-bags of all bags of a batch are laid out once per forward pass in one padded
tensor ``(S, k + Lmax, D)`` with a key-padding mask (:mod:`.mmil_blocks`); each
attention step is ONE :func:`torch.nn.functional.scaled_dot_product_attention`
call (the fused kernel on CPU and GPU: memory O(N), compute O(N^2 / G)). Because
the grouping is fixed during a pass, instances stay in that layout for all
layers. In the last layer only the message tokens' and the bag token's queries
reach the logits, so only those are computed (``SubbagAttention``'s folded form).

Rules we chose where the release is silent or breaks (documented, and followed
by the naive reference in ``tests/reference_mmil.py``):

* Empty sub-bags (a bag with N < G, an empty k-means cluster) keep their message
  tokens; those attend only to the sub-bag's message tokens, and take part in the
  message step like any other sub-bag. No attention row is ever fully masked.
* ``grouping="index"``: the distinct labels of a bag are its sub-bags (their
  count may differ from ``num_subbags`` and between the bags of a batch).
* ``min_subbag_size`` (16 for the registered ``mmil``; ``None``, the class default, = the release's fixed G): a bag gets
  ``clamp(n // min_subbag_size, 1, G)`` sub-bags (:mod:`mmil.grouping_adaptive`), so small
  bags are not cut into singleton and empty sub-bags; bags of at least ``G * min_subbag_size``
  instances are grouped exactly as released.
* Sub-bag masking (``mask_ratio > 0``, training only; 0.6 for the registered ``mmil``, the paper's CAMELYON16 setting): before the first layer,
  ``max(1, int(G * (1 - mask_ratio)))`` sub-bags are kept at random (``docs/method/mmil.md §1.7``).
* ``max_subbag_size`` (off by default): a sub-bag larger than the cap keeps a
  random subset of that size, at training and test time; the number of dropped
  instances is reported in :attr:`MMILOutput.num_capped`.

Randomness of grouping, masking and cap comes from ``seed`` (a local
:class:`torch.Generator`; the global RNG is untouched); ``seed=None`` uses the
global RNG. Dropout uses torch's global RNG as usual. Released checkpoints are
mapped by :mod:`.mmil_released` and read by :func:`mmil.checkpoint.load_released_checkpoint`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..grouping import Grouping, GroupingInputs, cap_subbags, drop_subbags, get_grouping, make_generator
from ..grouping_adaptive import adaptive_grouping
from .base import MILModel, MILOutput, as_padded_batch
from .mmil_blocks import MMILLayer, SubbagLayout, build_subbag_layout
from .registry import register_model

__all__ = ["MMILTransformer", "MMILOutput"]

#: Defaults of the registered ``mmil`` (the class's own defaults are the release's: 0.0 and None).
DEFAULT_MASK_RATIO = 0.6
DEFAULT_MIN_SUBBAG_SIZE = 16


@dataclass(kw_only=True)
class MMILOutput(MILOutput):
    """:class:`MILOutput` plus the sub-bags of the pass.

    Attributes:
        subbag_ids: ``(B, N)`` sub-bag of each instance after masking and cap, -1 if not used.
        subbag_valid: ``(B, G)`` bool, the sub-bags that took part.
        num_capped: instances dropped by ``max_subbag_size`` (0 unless it is set).
        bag_self_weight: ``(B,)`` the bag token's attention to itself in the last
            layer (with ``return_scores``; ``docs/method/mmil.md §4``), else None.
    """

    subbag_ids: Tensor
    subbag_valid: Tensor
    num_capped: int = 0
    bag_self_weight: Tensor | None = None


@dataclass
class _Subbags:
    """The sub-bags of one pass: ids and kept sub-bags after masking and cap, and their layout."""

    ids: Tensor
    valid: Tensor
    num_capped: int
    layout: SubbagLayout


def _check_options(in_dim, n_classes, embed_dim, num_subbags, grouping, num_msg, num_layers, heads, head_dim,
                   attn_dropout, proj_dropout, mask_ratio, max_subbag_size, use_input_proj, kmeans_iters, min_subbag_size=None) -> None:
    """``ValueError`` naming the first bad constructor option of :class:`MMILTransformer`."""
    get_grouping(grouping)
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
    if min_subbag_size is not None and (int(min_subbag_size) != min_subbag_size or min_subbag_size < 1):
        raise ValueError(f"min_subbag_size must be a positive integer or None, got {min_subbag_size!r}")
    if kmeans_iters < 0:
        raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}")
    if not use_input_proj and in_dim != embed_dim:
        raise ValueError(f"use_input_proj=False needs in_dim == embed_dim, got in_dim={in_dim}, embed_dim={embed_dim}")


class MMILTransformer(MILModel):
    """Multi-level MIL Transformer, batched over bags and sub-bags.

    Args:
        in_dim: instance feature dimension C.
        n_classes: number of classes.
        embed_dim: D (512 in the paper).
        num_subbags: G, sub-bags per bag (ignored by ``grouping="index"``).
        grouping: a registered grouping (:data:`mmil.grouping.GROUPINGS`).
        num_msg: k, message tokens per sub-bag.
        num_layers: L.
        heads, head_dim: attention heads and their width (release: 8 x 64).
        attn_dropout: dropout on attention weights (release 0.1; 0.0 keeps the
            fused CPU kernel in training).
        proj_dropout: dropout after each attention's output projection.
        mask_ratio: fraction of sub-bags dropped in training (0 = off; the registered ``mmil`` defaults to 0.6, the paper's).
        max_subbag_size: optional cap on instances per sub-bag (None = no cap).
        use_input_proj: apply ``input_proj`` (C -> D). Must be True when C != D.
        kmeans_iters: Lloyd iterations for the k-means groupings.
        dropout: alias of ``proj_dropout`` (the package-wide constructor name).
        min_subbag_size: smallest sub-bag of the adaptive grouping (``None`` = G sub-bags for
            every bag, the released behaviour; the registered ``mmil`` defaults to 16; released
            checkpoints are imported with ``None``).
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
        min_subbag_size: int | None = None,
    ) -> None:
        proj_dropout = proj_dropout if dropout is None else dropout
        _check_options(in_dim, n_classes, embed_dim, num_subbags, grouping, num_msg, num_layers, heads, head_dim,
                       attn_dropout, proj_dropout, mask_ratio, max_subbag_size, use_input_proj, kmeans_iters, min_subbag_size)
        min_subbag_size = None if min_subbag_size is None else int(min_subbag_size)
        max_subbag_size = None if max_subbag_size is None else int(max_subbag_size)
        super().__init__(
            in_dim, n_classes, embed_dim=int(embed_dim), num_subbags=int(num_subbags), grouping=grouping, num_msg=int(num_msg),
            num_layers=int(num_layers), heads=int(heads), head_dim=int(head_dim), attn_dropout=float(attn_dropout),
            proj_dropout=float(proj_dropout), mask_ratio=float(mask_ratio), max_subbag_size=max_subbag_size,
            use_input_proj=bool(use_input_proj), kmeans_iters=int(kmeans_iters), min_subbag_size=min_subbag_size,
        )
        self.min_subbag_size = min_subbag_size
        self.embed_dim, self.num_subbags, self.grouping = int(embed_dim), int(num_subbags), grouping
        self.num_msg, self.mask_ratio, self.max_subbag_size = int(num_msg), float(mask_ratio), max_subbag_size
        self.kmeans_iters = int(kmeans_iters)
        self.input_proj: nn.Module = nn.Linear(in_dim, embed_dim) if use_input_proj else nn.Identity()
        self.instance_bias = nn.Parameter(torch.zeros(embed_dim))
        self.msg_token = nn.Parameter(torch.zeros(embed_dim))
        self.bag_token = nn.Parameter(torch.randn(embed_dim))
        self.layers = nn.ModuleList(MMILLayer(embed_dim, heads, head_dim, attn_dropout, proj_dropout) for _ in range(num_layers))
        self.head = nn.Linear(embed_dim, n_classes)

    @property
    def inputs(self) -> tuple[str, ...]:
        """``seed``, plus ``coords`` or ``groups`` when the configured grouping reads them."""
        needs = get_grouping(self.grouping).needs
        return ("seed",) + ((needs,) if needs in ("coords", "groups") else ())

    def embed(self, x: Tensor) -> Tensor:
        """``input_proj(x) + instance_bias`` row by row (``docs/method/mmil.md §1.1-1.2``), for any leading shape."""
        return self.input_proj(x) + self.instance_bias

    # ----------------------------------------------------------------- grouping
    def assign_subbags(
        self, h: Tensor | None, mask: Tensor, *, coords: Tensor | None = None, groups: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Grouping:
        """The configured grouping's sub-bags (``docs/method/mmil.md §1.3``). ``h`` are the projected features
        (read by ``embedding`` only)."""
        inputs = GroupingInputs(mask, self.num_subbags, features=h, coords=coords, groups=groups, kmeans_iters=self.kmeans_iters, generator=generator)
        spec = get_grouping(self.grouping)
        if self.min_subbag_size is None or spec.needs == "groups":
            return spec.fn(inputs)
        return adaptive_grouping(spec.fn, inputs, self.min_subbag_size)

    def _subbags(self, h: Tensor | None, mask: Tensor, coords: Tensor | None, groups: Tensor | None, seed: int | None) -> _Subbags:
        """Grouping, then sub-bag masking (training) and the size cap, all drawn from ``seed``."""
        generator = make_generator(seed, mask.device)
        grouping = self.assign_subbags(h, mask, coords=coords, groups=groups, generator=generator)
        ids, valid = grouping.ids, grouping.valid
        if self.training and self.mask_ratio > 0:
            ids, valid = drop_subbags(ids, valid, self.mask_ratio, generator)
        num_capped = 0
        if self.max_subbag_size is not None:
            before = ids >= 0
            ids = cap_subbags(ids, valid.shape[1], self.max_subbag_size, generator)
            num_capped = int((before & (ids < 0)).sum())
        return _Subbags(ids, valid, num_capped, build_subbag_layout(ids, valid))

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
    ) -> MMILOutput:
        """Bag logits for a bag ``(N, C)`` or a padded batch ``(B, N, C)`` + ``mask``.

        ``coords`` are read by ``grouping="coords"``, ``groups`` by ``"index"``. With
        ``return_scores`` the instance scores of ``docs/method/mmil.md §4`` (see :meth:`_instance_scores`) and
        :attr:`MMILOutput.bag_self_weight` are returned too. Equals
        ``forward_head(forward_features(x, mask), mask, ...)``, but unless the grouping
        reads the features, only the instances placed in a sub-bag are projected.
        """
        x, mask = as_padded_batch(x, mask)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"features have dimension {x.shape[-1]} but the model was built for in_dim={self.in_dim}")
        if get_grouping(self.grouping).needs == "features":
            h = self.forward_features(x, mask)
            return self.forward_head(h, mask, coords=coords, groups=groups, seed=seed, return_scores=return_scores)
        sub = self._subbags(None, mask, coords, groups, seed)
        # Only the instances placed in a sub-bag are projected (pads, dropped and capped ones never are).
        return self._classify(self.embed(x.flatten(0, 1)[sub.layout.src]), sub, mask.shape, return_scores)

    def forward_head(
        self,
        h: Tensor,
        mask: Tensor,
        *,
        coords: Tensor | None = None,
        groups: Tensor | None = None,
        seed: int | None = None,
        return_scores: bool = False,
    ) -> MMILOutput:
        """Steps 2-5 (grouping, layers, head) on the projected instances ``h`` ``(B, N, D)``."""
        sub = self._subbags(h, mask, coords, groups, seed)
        return self._classify(h.flatten(0, 1)[sub.layout.src], sub, mask.shape, return_scores)

    def _classify(self, placed: Tensor, sub: _Subbags, shape: torch.Size, return_scores: bool) -> MMILOutput:
        """The layers and the head on the placed instances ``(M, D)`` (in ``sub.layout.src`` order)."""
        B, N = shape
        bag, scores, bag_self = self._encode(placed, sub.layout, B, N, return_scores)
        return MMILOutput(
            logits=self.head(bag), instance_scores=scores, subbag_ids=sub.ids, subbag_valid=sub.valid,
            num_capped=sub.num_capped, bag_self_weight=bag_self,
        )

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
        """Instance importance of ``docs/method/mmil.md §4``, from the last layer.

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
    """MMIL-Transformer (defaults of ``docs/method/mmil.md``: D=512, G=10, 2 layers, 8 heads of 64), with the
    toolkit's training defaults: sub-bag masking 0.6 (the paper's) and adaptive sub-bags of at least 16
    instances (pass ``mask_ratio=0.0, min_subbag_size=None`` for the class's released defaults)."""
    kwargs.setdefault("mask_ratio", DEFAULT_MASK_RATIO)
    kwargs.setdefault("min_subbag_size", DEFAULT_MIN_SUBBAG_SIZE)
    return MMILTransformer(in_dim, n_classes, **kwargs)
