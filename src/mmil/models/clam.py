"""CLAM-SB: single-branch clustering-constrained attention MIL.

Registered as ``"clam-sb"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MILModel, MILOutput
from .layers import AttentionScorer, embedding_layer, masked_softmax
from .registry import register_model


@dataclass(kw_only=True)
class CLAMOutput(MILOutput):
    """:class:`MILOutput` plus what CLAM's instance loss reads: the raw attention
    scores ``(B, N)`` (0 at pads), the instance embeddings ``(B, N, D)`` and the mask."""

    attention: Tensor
    embeddings: Tensor
    mask: Tensor


def topk_pseudo_labels(attention: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """CLAM's pseudo labels: the ``k`` highest- and ``k`` lowest-attended real instances.

    Per bag with ``n`` real instances, ``k_b = min(k, n // 2)`` so that the two sets
    never overlap (a one-instance bag gets none). Returns ``(top (B, kk), bottom
    (B, kk), valid (B, kk))`` with ``kk = max_b k_b``: indices into the instance axis,
    highest first / lowest first, and which of the ``kk`` slots are used by each bag.
    """
    counts = mask.sum(dim=1)
    k_b = torch.clamp(counts // 2, max=k)
    kk = int(k_b.max())
    ranks = torch.arange(kk, device=mask.device).unsqueeze(0)
    valid = ranks < k_b.unsqueeze(1)
    if kk == 0:
        empty = torch.zeros(mask.shape[0], 0, dtype=torch.long, device=mask.device)
        return empty, empty, valid
    a = attention.detach().float()
    top = a.masked_fill(~mask, float("-inf")).topk(kk, dim=1).indices
    bottom = (-a).masked_fill(~mask, float("-inf")).topk(kk, dim=1).indices
    return top, bottom, valid


class CLAMSB(MILModel):
    """CLAM-SB (Lu et al., "Data-efficient and weakly supervised computational pathology
    on whole-slide images", Nature Biomedical Engineering 2021), single attention branch.

    ``h_i = Dropout(ReLU(W x_i + b))``; gated attention ``a_i`` (as in gated ABMIL),
    ``A = softmax_i(a)`` over real instances; ``logits = head(sum_i A_i h_i)``.
    Instance-level clustering: for the bag's true class ``y``, the ``k`` highest-attended
    instances are pseudo-labelled positive and the ``k`` lowest negative for the
    in-class instance classifier ``y`` (one ``Linear(embed_dim -> 2)`` per class); with
    ``subtyping=True`` the ``k`` highest are also negatives for every other class's
    classifier (the paper's out-of-class term for mutually exclusive subtypes).
    Loss: ``bag_weight * CE(logits, y) + (1 - bag_weight) * L_inst`` (0.7 as in the paper).

    Instance scores: the attention weights ``A_i``.
    Permutation invariant.

    Differences from the paper: the instance loss is cross-entropy instead of the
    smooth top-1 SVM; ``k`` is clamped to ``n // 2`` per bag so small bags work
    (positives and negatives never overlap; one-instance bags add no instance loss);
    a padded batch averages the instance loss over bags.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        attn_dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        if k_sample < 1:
            raise ValueError(f"k_sample must be >= 1, got {k_sample}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight}")
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, attn_dim=attn_dim, dropout=dropout, attn_dropout=attn_dropout,
                         k_sample=k_sample, bag_weight=bag_weight, subtyping=subtyping)
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.embed = embedding_layer(in_dim, embed_dim, dropout)
        self.attention = AttentionScorer(embed_dim, attn_dim, gated=True, attn_dropout=attn_dropout)
        self.head = nn.Linear(embed_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(n_classes))

    def forward_head(self, h: Tensor, mask: Tensor, *, return_scores: bool = False) -> CLAMOutput:
        raw = self.attention(h).masked_fill(~mask, 0.0)
        weights = masked_softmax(raw, mask)
        logits = self.head((weights.unsqueeze(-1) * h).sum(dim=1))
        return CLAMOutput(logits=logits, instance_scores=weights if return_scores else None, attention=raw, embeddings=h, mask=mask)

    def instance_loss(self, output: CLAMOutput, target: Tensor) -> Tensor:
        """Mean over bags (with at least two instances) of CLAM's clustering loss."""
        h, mask = output.embeddings, output.mask
        top, bottom, valid = topk_pseudo_labels(output.attention, mask, self.k_sample)
        if top.shape[1] == 0:
            return h.sum() * 0.0  # no bag has two instances: nothing to cluster, keep the graph
        weight = torch.stack([c.weight for c in self.instance_classifiers])  # (K, 2, D)
        bias = torch.stack([c.bias for c in self.instance_classifiers])  # (K, 2)
        D = h.shape[-1]
        h_top = h.gather(1, top.unsqueeze(-1).expand(-1, -1, D)).float()  # (B, kk, D)
        h_bottom = h.gather(1, bottom.unsqueeze(-1).expand(-1, -1, D)).float()
        per_bag = []
        for b in range(h.shape[0]):
            n_sel = int(valid[b].sum())
            if n_sel == 0:
                continue
            y = int(target[b])
            pos, neg = h_top[b, :n_sel], h_bottom[b, :n_sel]
            feats = torch.cat([pos, neg])
            labels = torch.cat([torch.ones(n_sel), torch.zeros(n_sel)]).long().to(h.device)
            terms = [F.cross_entropy(F.linear(feats, weight[y].float(), bias[y].float()), labels)]
            if self.subtyping:
                zeros = torch.zeros(n_sel, dtype=torch.long, device=h.device)
                terms += [F.cross_entropy(F.linear(pos, weight[c].float(), bias[c].float()), zeros) for c in range(self.n_classes) if c != y]
                per_bag.append(torch.stack(terms).sum() / self.n_classes)
            else:
                per_bag.append(terms[0])
        if not per_bag:
            return h.sum() * 0.0
        return torch.stack(per_bag).mean()

    def loss(self, output: CLAMOutput, target: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """``bag_weight * CE(bag) + (1 - bag_weight) * instance clustering loss``."""
        target = target.to(output.logits.device).long()
        bag = super().loss(output, target, class_weights)
        return self.bag_weight * bag + (1.0 - self.bag_weight) * self.instance_loss(output, target)


@register_model("clam-sb")
def clam_sb(in_dim: int, n_classes: int, **kwargs) -> CLAMSB:
    """CLAM single branch with instance-level clustering (Lu et al. 2021)."""
    return CLAMSB(in_dim=in_dim, n_classes=n_classes, **kwargs)
