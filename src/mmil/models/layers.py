"""Small mask-aware building blocks shared by the baseline MIL models.

Every function here takes the package's mask convention (bool, ``True`` = real
instance) and guarantees that padded positions neither receive weight nor leak
their values into real positions, so a bag alone and the same bag inside a
padded batch give the same result (up to floating-point summation order).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def zero_pads(x: Tensor, mask: Tensor) -> Tensor:
    """Set padded rows of ``x`` (``(B, N, ...)``) to zero.

    Models call this first so that arbitrary values in the pads (including very
    large ones) can never reach a real position through ``0 * value`` products.
    """
    return x.masked_fill(~mask.view(*mask.shape, *([1] * (x.dim() - mask.dim()))), 0.0)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over the real entries only.

    ``p_i = exp(s_i) / sum_{j real} exp(s_j)`` for real ``i`` and ``p_i = 0`` at
    padded ``i``. ``mask`` must broadcast to ``scores``; every slice along ``dim``
    needs at least one real entry.
    """
    filled = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(filled, dim=dim).masked_fill(~mask, 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, N, D)`` over the real instances: ``sum_i m_i x_i / sum_i m_i``."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` ``(B, N, D)`` over the real instances."""
    return x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def real_first_order(mask: Tensor) -> Tensor:
    """Permutation ``(B, N)`` listing each bag's real positions first, in their original order.

    ``x.gather(1, order)`` packs every bag's real instances at the front, which
    makes order-dependent blocks (TransMIL's square grid, Nyström segments)
    independent of where the pads were.
    """
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)


def segment_ids(mask: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """Split each bag's real positions (in order) into near-equal consecutive segments.

    For a bag with ``n`` real positions, ``m = min(num_segments, n)`` segments are
    used and the real position of rank ``r`` (0-based among real positions) goes to
    segment ``floor(r * m / n)``; every segment is non-empty. Padded positions get
    the dummy id ``num_segments``.

    Returns ``(ids (B, N) int64, segment_mask (B, num_segments) bool)`` where
    ``segment_mask[b, j]`` says segment ``j`` exists in bag ``b``.
    """
    counts = mask.sum(dim=1, keepdim=True)  # (B, 1)
    used = counts.clamp(max=num_segments)
    ranks = mask.long().cumsum(dim=1) - 1
    ids = torch.div(ranks * used, counts, rounding_mode="floor")
    ids = ids.masked_fill(~mask, num_segments)
    seg_mask = torch.arange(num_segments, device=mask.device).unsqueeze(0) < used
    return ids, seg_mask


def segment_means(x: Tensor, ids: Tensor, num_segments: int) -> Tensor:
    """Mean of ``x`` ``(B, N, D)`` within each segment of ``ids`` (from :func:`segment_ids`).

    Returns ``(B, num_segments, D)``; absent segments are zero.
    """
    B, _, D = x.shape
    index = ids.unsqueeze(-1).expand(-1, -1, D)
    sums = x.new_zeros(B, num_segments + 1, D).scatter_add_(1, index, x)
    counts = x.new_zeros(B, num_segments + 1).scatter_add_(1, ids, torch.ones_like(ids, dtype=x.dtype))
    return sums[:, :num_segments] / counts[:, :num_segments].clamp(min=1.0).unsqueeze(-1)


def newton_schulz_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """Iterative Moore-Penrose pseudo-inverse of square matrices ``a`` (``(..., m, m)``).

    The iteration used by Nyströmformer (Xiong et al. 2021, after Razavi et al. 2014):
    ``Z_0 = A^T / (||A||_1 ||A||_inf)`` and
    ``Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))) / 4``.
    The norms are taken per matrix (not over the whole batch, which would couple
    bags): ``||A||_1`` = largest column sum, ``||A||_inf`` = largest row sum of ``|A|``.
    """
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1)
    row = abs_a.sum(dim=-1).amax(dim=-1)
    z = a.transpose(-1, -2) / (col * row)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _bool_key_mask(mask: Tensor) -> Tensor:
    """``(B, M)`` keep-mask -> ``(B, 1, 1, M)`` for ``scaled_dot_product_attention``."""
    return mask[:, None, None, :]


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with a key-padding mask (Xiong et al. 2021).

    With ``Q, K, V`` the per-head projections and ``Q~, K~`` the landmarks (means of
    ``m`` consecutive segments of each sequence's real tokens, see
    :func:`segment_ids`), softmax attention ``softmax(Q K^T / sqrt(d)) V`` is
    approximated by ``F1 Z (F3 V)`` with ``F1 = softmax(Q K~^T / sqrt(d))``,
    ``F2 = softmax(Q~ K~^T / sqrt(d))``, ``F3 = softmax(Q~ K^T / sqrt(d))`` and
    ``Z = pinv(F2)`` (:func:`newton_schulz_pinv`).

    Padding: landmarks are computed over real tokens only, the number of landmarks
    of a sequence is ``min(m, n_real)``, and a batch has ``min(m, max n_real)``
    landmark slots. A sequence's absent landmarks are masked out of ``F1`` and
    ``F3`` and given an identity block in ``F2``. ``F2`` is then block-diagonal,
    the iteration keeps that structure, and the identity block's norms (row and
    column sums 1) never exceed the real block's (a row-stochastic matrix has
    largest row sum 1 and largest column sum >= 1), so each sequence's result is
    what it would be alone. ``F3 V`` and ``F1 (Z F3 V)`` are two ``scaled_dot_product_attention``
    calls, so memory is ``O(n m)`` rather than ``O(n^2)``.

    Differences from the Nyströmformer reference module used by TransMIL: landmark
    segments are near-equal splits of the real tokens (instead of front-padding the
    sequence to a multiple of ``m``), the pseudo-inverse norms are per sequence, and
    the optional depth-wise convolution residual on ``V`` is omitted.
    """

    def __init__(self, dim: int, heads: int = 8, num_landmarks: int = 256, pinv_iterations: int = 6, attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed_dim {dim} must be divisible by heads {heads}")
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        self.heads = heads
        self.head_dim = dim // heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.attn_dropout = attn_dropout
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def pinv(self, a: Tensor) -> Tensor:
        """``Z``: :func:`newton_schulz_pinv` of ``F2`` (a subclass may compute the same map faster)."""
        return newton_schulz_pinv(a, self.pinv_iterations)

    def pinv_times(self, a: Tensor, v: Tensor) -> Tensor:
        """``Z V`` for ``Z`` of :meth:`pinv` (a subclass may compute it without forming ``Z``)."""
        return self.pinv(a) @ v

    def _split(self, t: Tensor) -> Tensor:
        B, M, _ = t.shape
        return t.view(B, M, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor, return_first_row: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attend ``x`` ``(B, N, D)`` under ``mask`` ``(B, N)``.

        Returns ``(out (B, N, D), row)``; with ``return_first_row`` ``row`` is the
        approximated attention of token 0 over all tokens, ``(B, heads, N)``
        (``F1[0] Z F3``; zero at pads), else ``None``.
        """
        B, N, D = x.shape
        x = zero_pads(x, mask)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # Only as many landmark slots as the longest sequence can fill: a bag of 10
        # tokens never pays for a 256 x 256 pseudo-inverse.
        m = min(self.num_landmarks, int(mask.sum(dim=1).max()))
        ids, land_mask = segment_ids(mask, m)
        q_land = self._split(segment_means(q, ids, m))
        k_land = self._split(segment_means(k, ids, m))
        q, k, v = self._split(q), self._split(k), self._split(v)
        scale = self.head_dim ** -0.5

        # F2 with an identity block for absent landmarks, so each sequence's block inverts alone.
        f2 = masked_softmax((q_land @ k_land.transpose(-1, -2)) * scale, _bool_key_mask(land_mask))
        eye = torch.eye(m, dtype=f2.dtype, device=f2.device)
        f2 = torch.where(land_mask[:, None, :, None], f2, eye)
        f3v = F.scaled_dot_product_attention(q_land, k, v, attn_mask=_bool_key_mask(mask))
        z = self.pinv(f2) if return_first_row else None  # else Z F3 V without forming Z (a subclass may be faster)
        zf3v = (self.pinv_times(f2, f3v) if z is None else z @ f3v).masked_fill(~land_mask[:, None, :, None], 0.0)
        dropout_p = self.attn_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k_land, zf3v, attn_mask=_bool_key_mask(land_mask), dropout_p=dropout_p)
        out = self.to_out(out.transpose(1, 2).reshape(B, N, D))

        row = None
        if return_first_row:
            f1_first = masked_softmax((q[:, :, :1] @ k_land.transpose(-1, -2)) * scale, _bool_key_mask(land_mask))
            f3 = masked_softmax((q_land @ k.transpose(-1, -2)) * scale, _bool_key_mask(mask))
            f3 = f3.masked_fill(~land_mask[:, None, :, None], 0.0)
            row = (f1_first @ z @ f3).squeeze(2).masked_fill(~mask[:, None, :], 0.0)
        return out, row


def dense_attention_reference(x: Tensor, to_qkv: nn.Linear, to_out: nn.Module, heads: int) -> Tensor:
    """Exact multi-head softmax self-attention of one unpadded sequence ``(B, N, D)``,
    with explicit ``softmax(Q K^T / sqrt(d)) V`` (a reference for tests)."""
    B, N, D = x.shape
    d = D // heads
    q, k, v = to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.view(B, N, heads, d).transpose(1, 2) for t in (q, k, v))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return to_out((attn @ v).transpose(1, 2).reshape(B, N, D))


class AttentionScorer(nn.Module):
    """Attention-MIL scoring network of Ilse et al. (2018).

    Plain: ``a_i = w^T tanh(V h_i)``; gated: ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))``.
    Returns the raw scores ``(B, N)``; softmax over the real instances gives the
    attention weights. ``w`` has no bias: softmax is shift invariant, so a bias there
    would never receive a gradient.
    """

    def __init__(self, embed_dim: int, attn_dim: int = 128, gated: bool = False, attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(embed_dim, attn_dim)
        self.U = nn.Linear(embed_dim, attn_dim) if gated else None
        self.w = nn.Linear(attn_dim, 1, bias=False)
        self.dropout = nn.Dropout(attn_dropout)

    def forward(self, h: Tensor) -> Tensor:
        hidden = torch.tanh(self.V(h))
        if self.U is not None:
            hidden = hidden * torch.sigmoid(self.U(h))
        return self.w(self.dropout(hidden)).squeeze(-1)


def embedding_layer(in_dim: int, embed_dim: int, dropout: float) -> nn.Sequential:
    """The instance embedding every baseline starts with: ``Dropout(ReLU(W x + b))``."""
    return nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
