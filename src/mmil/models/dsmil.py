"""DSMIL: dual-stream MIL with a max-instance critical query.

Registered as ``"dsmil"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MILModel, MILOutput, masked_fill_scores, weighted_cross_entropy
from .layers import embedding_layer, masked_softmax
from .registry import register_model


@dataclass(kw_only=True)
class DSMILOutput(MILOutput):
    """:class:`MILOutput` plus the two streams the DSMIL loss reads: ``bag_logits``
    ``(B, K)`` (attention stream), ``max_logits`` ``(B, K)`` (max-instance stream) and
    ``critical_index`` ``(B, K)``, the critical instance of each class."""

    bag_logits: Tensor
    max_logits: Tensor
    critical_index: Tensor


def critical_instances(instance_logits: Tensor, mask: Tensor) -> Tensor:
    """Index of the highest-scoring real instance per class: ``m_k = argmax_i c_{i,k}``.

    ``instance_logits`` ``(B, N, K)``, ``mask`` ``(B, N)`` -> ``(B, K)`` int64.
    """
    return instance_logits.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(dim=1)


def average_stream_logits(a: Tensor, b: Tensor) -> Tensor:
    """Log of the mean of two softmax distributions: ``log((softmax(a) + softmax(b)) / 2)``.

    Used as the bag logits so that ``softmax(logits)`` is exactly the average of the
    two streams' class probabilities (the paper's final score).
    """
    return torch.logaddexp(F.log_softmax(a.float(), dim=-1), F.log_softmax(b.float(), dim=-1)) - math.log(2.0)


class DSMIL(MILModel):
    """Dual-stream MIL (Li, Li & Eliceiri, "Dual-stream Multiple Instance Learning
    Network for Whole Slide Image Classification with Self-supervised Contrastive
    Learning", CVPR 2021).

    ``h_i = Dropout(ReLU(W x_i + b))``. Stream 1: instance classifier ``c_i = W_0 h_i``
    and max pooling ``c_max,k = max_i c_{i,k}`` with the critical instance
    ``m_k = argmax_i c_{i,k}``. Stream 2: queries ``q_i = W_q h_i``, values
    ``v_i = W_v h_i``, attention to the critical query of each class
    ``U_{i,k} = softmax_i(<q_i, q_{m_k}> / sqrt(d_q))`` (real instances only), bag
    embedding ``b_k = sum_i U_{i,k} v_i`` and bag logits ``W_b vec(b)``.

    Outputs: ``logits = log((softmax(c_max) + softmax(c_bag)) / 2)`` (the average of
    the two streams' probabilities, the paper's final score). Loss:
    ``0.5 CE(c_bag, y) + 0.5 CE(c_max, y)`` as in the paper.

    Instance scores: the attention ``U_{i,k}`` of the predicted class ``k``.
    Permutation invariant.

    Differences from the paper: a ``Linear+ReLU`` embedding on precomputed features
    (as in the other baselines); the paper's bag classifier, a ``Conv1d`` over the
    class axis with kernel size = embedding width, is written as the equivalent
    ``Linear(K * d_v -> K)`` on the flattened bag embeddings; scores are scaled by
    ``1/sqrt(d_q)`` (as in the authors' code); softmax instead of sigmoid outputs for
    multi-class.
    """

    def __init__(self, in_dim: int, n_classes: int, embed_dim: int = 512, attn_dim: int = 128, dropout: float = 0.25, attn_dropout: float = 0.0) -> None:
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, attn_dim=attn_dim, dropout=dropout, attn_dropout=attn_dropout)
        self.attn_dropout = attn_dropout
        self.embed = embedding_layer(in_dim, embed_dim, dropout)
        self.instance_classifier = nn.Linear(embed_dim, n_classes)
        self.query = nn.Linear(embed_dim, attn_dim)
        self.value = nn.Linear(embed_dim, embed_dim)
        self.bag_classifier = nn.Linear(n_classes * embed_dim, n_classes)

    def forward_head(self, h: Tensor, mask: Tensor, *, return_scores: bool = False) -> DSMILOutput:
        B, K = h.shape[0], self.n_classes
        inst_logits = self.instance_classifier(h)  # (B, N, K)
        critical = critical_instances(inst_logits, mask)  # (B, K)
        max_logits = inst_logits.gather(1, critical.unsqueeze(1)).squeeze(1)  # (B, K): c_{m_k, k}

        q = self.query(h)  # (B, N, dq)
        q_crit = q.gather(1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # (B, K, dq)
        v = self.value(h)
        dropout_p = self.attn_dropout if self.training else 0.0
        bag_emb = F.scaled_dot_product_attention(q_crit.unsqueeze(1), q.unsqueeze(1), v.unsqueeze(1), attn_mask=mask[:, None, None, :], dropout_p=dropout_p).squeeze(1)
        bag_logits = self.bag_classifier(bag_emb.reshape(B, K * v.shape[-1]))
        logits = average_stream_logits(max_logits, bag_logits).to(bag_logits.dtype)

        scores = None
        if return_scores:
            pred = logits.argmax(dim=-1)
            q_pred = q_crit.gather(1, pred[:, None, None].expand(-1, 1, q.shape[-1]))  # (B, 1, dq)
            attn = masked_softmax((q_pred @ q.transpose(1, 2)).squeeze(1) / math.sqrt(q.shape[-1]), mask)
            scores = masked_fill_scores(attn, mask)
        return DSMILOutput(logits=logits, instance_scores=scores, bag_logits=bag_logits, max_logits=max_logits, critical_index=critical)

    def loss(self, output: DSMILOutput, target: Tensor, class_weights: Tensor | None = None) -> Tensor:
        """``0.5 * CE(bag stream) + 0.5 * CE(max-instance stream)``."""
        bag = weighted_cross_entropy(output.bag_logits, target, class_weights)
        inst = weighted_cross_entropy(output.max_logits, target, class_weights)
        return 0.5 * bag + 0.5 * inst


@register_model("dsmil")
def dsmil(in_dim: int, n_classes: int, **kwargs) -> DSMIL:
    """DSMIL with the max-instance critical query (Li et al. 2021)."""
    return DSMIL(in_dim=in_dim, n_classes=n_classes, **kwargs)
