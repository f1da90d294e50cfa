"""Mean and max pooling over instance embeddings: the simplest MIL baselines.

Registered as ``"mean"`` and ``"max"``.
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import MILModel, MILOutput, masked_fill_scores
from .layers import embedding_layer, masked_max, masked_mean
from .registry import register_model

POOLS = {"mean": masked_mean, "max": masked_max}


class InstancePooling(MILModel):
    """Embedding-level MIL with a fixed pooling operator (the "MI-Net"-style baselines
    of Wang et al., "Revisiting multiple instance neural networks", Pattern
    Recognition 2018; also the mean/max baselines of Ilse et al. 2018).

    ``h_i = Dropout(ReLU(W x_i + b))``; ``z = mean_i h_i`` or ``max_i h_i`` (element-wise,
    over real instances); ``logits = head(z)``.

    Instance scores: each instance's own embedding passed through the bag head,
    ``softmax(head(h_i))[c]`` with ``c`` the predicted bag class (for mean pooling the
    bag logits are exactly the mean of these instance logits). Permutation invariant.
    Differences from the papers: one hidden layer, multi-class softmax head.
    """

    def __init__(self, in_dim: int, n_classes: int, pool: str = "mean", embed_dim: int = 512, dropout: float = 0.25) -> None:
        if pool not in POOLS:
            raise ValueError(f"unknown pooling {pool!r}; choose one of {sorted(POOLS)}")
        # ``pool`` is fixed by the registered name ("mean" / "max"), so it is not a rebuild argument.
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, dropout=dropout)
        self.pool = pool
        self.embed = embedding_layer(in_dim, embed_dim, dropout)
        self.head = nn.Linear(embed_dim, n_classes)

    def forward_head(self, h: Tensor, mask: Tensor, *, return_scores: bool = False) -> MILOutput:
        logits = self.head(POOLS[self.pool](h, mask))
        scores = None
        if return_scores:
            inst_probs = self.head(h).float().softmax(dim=-1)  # (B, N, K)
            pred = logits.argmax(dim=-1)
            scores = masked_fill_scores(inst_probs.gather(2, pred[:, None, None].expand(-1, h.shape[1], 1)).squeeze(-1), mask)
        return MILOutput(logits=logits, instance_scores=scores)


@register_model("mean")
def mean_pooling(in_dim: int, n_classes: int, **kwargs) -> InstancePooling:
    """Mean pooling of instance embeddings."""
    return InstancePooling(in_dim=in_dim, n_classes=n_classes, pool="mean", **kwargs)


@register_model("max")
def max_pooling(in_dim: int, n_classes: int, **kwargs) -> InstancePooling:
    """Max pooling of instance embeddings."""
    return InstancePooling(in_dim=in_dim, n_classes=n_classes, pool="max", **kwargs)
