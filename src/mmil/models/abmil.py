"""Attention-based deep MIL (ABMIL) and its gated variant.

Registered as ``"abmil"`` and ``"abmil-gated"``.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import MILModel, MILOutput
from .layers import AttentionScorer, embedding_layer, masked_softmax
from .registry import register_model


class ABMIL(MILModel):
    """Attention-based MIL pooling (Ilse, Tomczak & Welling, "Attention-based Deep
    Multiple Instance Learning", ICML 2018).

    ``h_i = Dropout(ReLU(W x_i + b))``; ``a_i = softmax_i(w^T tanh(V h_i))`` (or the gated
    form ``w^T (tanh(V h_i) * sigmoid(U h_i))``), over real instances only;
    ``z = sum_i a_i h_i``; ``logits = head(z)``.

    Instance scores: the attention weights ``a_i`` (they sum to 1 over a bag).
    Permutation invariant. Differences from the paper: the paper's CNN feature
    extractor is replaced by one ``Linear+ReLU`` layer on precomputed features, and
    the sigmoid binary classifier by a multi-class softmax head.
    """

    def __init__(self, in_dim: int, n_classes: int, embed_dim: int = 512, attn_dim: int = 128, gated: bool = False, dropout: float = 0.25, attn_dropout: float = 0.0) -> None:
        # ``gated`` is fixed by the registered name ("abmil" / "abmil-gated"), so it is not a rebuild argument.
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, attn_dim=attn_dim, dropout=dropout, attn_dropout=attn_dropout)
        self.embed = embedding_layer(in_dim, embed_dim, dropout)
        self.attention = AttentionScorer(embed_dim, attn_dim, gated=gated, attn_dropout=attn_dropout)
        self.head = nn.Linear(embed_dim, n_classes)

    def forward_head(self, h: Tensor, mask: Tensor, *, return_scores: bool = False) -> MILOutput:
        weights = masked_softmax(self.attention(h), mask)  # (B, N)
        logits = self.head((weights.unsqueeze(-1) * h).sum(dim=1))
        return MILOutput(logits=logits, instance_scores=weights if return_scores else None)


@register_model("abmil")
def abmil(in_dim: int, n_classes: int, **kwargs) -> ABMIL:
    """ABMIL with the plain ``tanh`` attention."""
    return ABMIL(in_dim=in_dim, n_classes=n_classes, gated=False, **kwargs)


@register_model("abmil-gated")
def abmil_gated(in_dim: int, n_classes: int, **kwargs) -> ABMIL:
    """ABMIL with the gated ``tanh * sigmoid`` attention."""
    return ABMIL(in_dim=in_dim, n_classes=n_classes, gated=True, **kwargs)
