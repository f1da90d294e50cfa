"""TransMIL: Nyström-attention Transformer with a pyramid position encoding generator.

Registered as ``"transmil"``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import MILModel, MILOutput, masked_fill_scores
from .layers import NystromAttention, newton_schulz_pinv, real_first_order, zero_pads
from .registry import register_model


def newton_schulz_scalar(lam: Tensor, c: Tensor, iterations: int) -> tuple[Tensor, Tensor]:
    """The Newton-Schulz pseudo-inverse iteration on one eigenvalue, and its derivative.

    With ``B = A A^T = U diag(lam) U^T`` and ``c = 1 / (||A||_1 ||A||_inf)``, every iterate of
    :func:`~mmil.models.layers.newton_schulz_pinv` is ``Z_j = A^T P_j(B)`` with ``P_0 = c I`` and
    ``P_{j+1} = P_j (13 I - R_j (15 I - R_j (7 I - R_j))) / 4``, ``R_j = B P_j`` (all polynomials in
    ``B``, so they commute). On an eigenvalue: ``p_0 = c``, ``r = lam p``,
    ``p <- p (13 - r (15 - r (7 - r))) / 4``. Returns ``(p, dp/dlam)`` after ``iterations`` steps.
    """
    p, dp = c.expand_as(lam).clone(), torch.zeros_like(lam)
    for _ in range(iterations):
        r, dr = lam * p, p + lam * dp
        q, dq = 13 - r * (15 - r * (7 - r)), (-15 + r * (14 - 3 * r)) * dr
        p, dp = 0.25 * p * q, 0.25 * (dp * q + p * dq)
    return p, dp


def _spectral_factors(a: Tensor, c: Tensor, iterations: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(U, lam, p, dp)``: ``A A^T = U diag(lam) U^T`` and :func:`newton_schulz_scalar` on ``lam`` (float64)."""
    lam, U = torch.linalg.eigh(a @ a.transpose(-1, -2))
    lam = lam.double().clamp(min=0.0)
    p, dp = newton_schulz_scalar(lam, c.double()[..., None], iterations)
    return U, lam, p, dp


def _divided_differences(lam: Tensor, p: Tensor, dp: Tensor) -> Tensor:
    """``Gamma_ij = (p_i - p_j) / (lam_i - lam_j)``, and ``(p'_i + p'_j) / 2`` where ``lam_i ~ lam_j``."""
    diff = lam[..., :, None] - lam[..., None, :]
    close = diff.abs() <= 1e-9 * lam.amax(-1)[..., None, None].clamp(min=1e-300)
    return torch.where(close, 0.5 * (dp[..., :, None] + dp[..., None, :]),
                       (p[..., :, None] - p[..., None, :]) / torch.where(close, torch.ones_like(diff), diff))


def _norm_gradient(M: Tensor, lam: Tensor, p: Tensor, dp: Tensor, c: Tensor) -> Tensor:
    """``dL/dc = sum_i M_ii (p_i + lam_i p'_i) / c`` (as ``p(lam; c) = c g(c lam)``)."""
    return ((M.diagonal(dim1=-2, dim2=-1).double() * (p + lam * dp)).sum(-1) / c.double()).to(c.dtype)


class _SpectralNewtonSchulz(torch.autograd.Function):
    """``Z = A^T U diag(p(lam)) U^T`` (see :func:`newton_schulz_scalar`): the iteration's result from one
    eigendecomposition instead of ``4 x iterations`` matrix products, and its exact gradient.

    Backward (Daleckii-Krein): with ``F = U diag(p) U^T``, ``G = dL/dZ``, ``S = sym(A G)``,
    ``M = U^T S U`` and ``Gamma`` (:func:`_divided_differences`): ``dL/dA = F G^T + 2 U (Gamma o M) U^T A``
    and ``dL/dc`` of :func:`_norm_gradient`. The scalar functions are evaluated in float64.
    """

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, iterations: int) -> Tensor:
        U, lam, p, dp = _spectral_factors(a, c, iterations)
        F = (U * p.to(a.dtype)[..., None, :]) @ U.transpose(-1, -2)
        ctx.save_for_backward(a, c, U, lam, p, dp, F)
        return a.transpose(-1, -2) @ F

    @staticmethod
    def backward(ctx, G: Tensor):
        a, c, U, lam, p, dp, F = ctx.saved_tensors
        gamma = _divided_differences(lam, p, dp)
        S = a @ G
        Ut = U.transpose(-1, -2)
        M = Ut @ (0.5 * (S + S.transpose(-1, -2))) @ U
        grad_a = F @ G.transpose(-1, -2) + 2 * (U @ (gamma.to(a.dtype) * M) @ Ut) @ a
        return grad_a, _norm_gradient(M, lam, p, dp, c), None


class _SpectralNewtonSchulzTimes(torch.autograd.Function):
    """``Y = Z V`` for ``Z`` of :class:`_SpectralNewtonSchulz` and ``V`` ``(m, d)``, without forming ``Z``:
    ``W = U^T V``, ``Y0 = U (p o W)``, ``Y = A^T Y0``, products of ``m^2 d`` instead of ``m^3`` (``d`` is
    TransMIL's head width, 64, against ``m`` = 256 landmarks).

    Backward: ``dL/dZ = Gy V^T`` has rank ``d``, so in :class:`_SpectralNewtonSchulz`'s formulas, with
    ``X1 = U^T A Gy``: ``F G^T = Y0 Gy^T``, ``M = (X1 W^T + W X1^T) / 2``, and ``dL/dV = Z^T Gy = U (p o X1)``.
    Three ``m^3`` products remain in the backward (``U (Gamma o M) U^T A``) against seven, and one in the
    forward (``A A^T``) against three.
    """

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, v: Tensor, iterations: int) -> Tensor:
        U, lam, p, dp = _spectral_factors(a, c, iterations)
        W = U.transpose(-1, -2) @ v
        Y0 = U @ (p.to(a.dtype)[..., :, None] * W)
        ctx.save_for_backward(a, c, U, lam, p, dp, W, Y0)
        return a.transpose(-1, -2) @ Y0

    @staticmethod
    def backward(ctx, gy: Tensor):
        a, c, U, lam, p, dp, W, Y0 = ctx.saved_tensors
        Ut = U.transpose(-1, -2)
        X1 = Ut @ (a @ gy)
        XW = X1 @ W.transpose(-1, -2)
        M = 0.5 * (XW + XW.transpose(-1, -2))
        gamma = _divided_differences(lam, p, dp)
        grad_a = Y0 @ gy.transpose(-1, -2) + 2 * (U @ ((gamma.to(a.dtype) * M) @ (Ut @ a)))
        grad_v = U @ (p.to(a.dtype)[..., :, None] * X1)
        return grad_a, _norm_gradient(M, lam, p, dp, c), grad_v, None


#: Iterations up to which the spectral form is accurate in float32 / float64. Eigenvalues ``lam ~ 0`` have
#: ``p(0) = c (13/4)^iterations``; rounding in ``U`` lets that amplify ``eps`` by as much, so float32
#: (eps 6e-8) serves 6 iterations (error ~1e-5 relative, TransMIL's default) and float64 up to 20.
SPECTRAL_MAX_ITERATIONS = {torch.float32: 6, torch.float64: 20}


def spectral_newton_schulz_pinv(a: Tensor, iterations: int = 6, v: Tensor | None = None) -> Tensor:
    """:func:`~mmil.models.layers.newton_schulz_pinv` (the same function of ``a``, to float tolerance), computed
    from the eigendecomposition of ``a a^T`` (autocast off): one ``eigh`` and three products instead of
    ``4 x iterations`` products and their autograd graph (TransMIL's training step at N=800 spent ~55% of its
    time there, issue 12). Works in float32 up to 6 iterations, float64 up to 20 (see
    :data:`SPECTRAL_MAX_ITERATIONS`), and is the iteration itself beyond. The norms ``c`` keep their autograd path.
    With ``v``: the product ``pinv(a) @ v``, computed without forming ``pinv(a)`` (:class:`_SpectralNewtonSchulzTimes`)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = a.float() if a.dtype != torch.float64 else a
        work = a.dtype if iterations <= SPECTRAL_MAX_ITERATIONS[a.dtype] else torch.float64

        def iterate() -> Tensor:
            z = newton_schulz_pinv(a, iterations)
            return z if v is None else z @ v.to(a.dtype)

        if iterations > SPECTRAL_MAX_ITERATIONS[torch.float64]:
            return iterate()
        w = a.to(work)
        abs_w = w.abs()
        c = 1.0 / (abs_w.sum(dim=-2).amax(dim=-1) * abs_w.sum(dim=-1).amax(dim=-1))
        try:
            if v is None:
                return _SpectralNewtonSchulz.apply(w, c, iterations).to(a.dtype)
            return _SpectralNewtonSchulzTimes.apply(w, c, v.to(work), iterations).to(a.dtype)
        except torch.linalg.LinAlgError:  # eigh did not converge: the iteration itself
            return iterate()


class SpectralNystromAttention(NystromAttention):
    """:class:`~mmil.models.layers.NystromAttention` whose pseudo-inverse is :func:`spectral_newton_schulz_pinv`
    on a CPU (on a GPU the ``4 x iterations`` batched products are cheaper than a batched ``eigh``)."""

    def pinv(self, a: Tensor) -> Tensor:
        return spectral_newton_schulz_pinv(a, self.pinv_iterations) if a.device.type == "cpu" else super().pinv(a)

    def pinv_times(self, a: Tensor, v: Tensor) -> Tensor:
        return spectral_newton_schulz_pinv(a, self.pinv_iterations, v) if a.device.type == "cpu" else super().pinv_times(a, v)


def square_sides(counts: list[int]) -> list[int]:
    """Side ``H = ceil(sqrt(n))`` of the square grid holding ``n`` tokens (``n >= 1``)."""
    return [math.isqrt(n - 1) + 1 for n in counts]


def square_token_sources(counts: list[int], sides: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Which instance fills each token of every bag's ``H x H`` grid.

    TransMIL completes the ``n`` instances to ``H^2`` tokens by appending the first
    ``H^2 - n`` instances again; token ``t`` (row-major in the grid) therefore holds
    instance ``t mod n``. Returns ``(source (B, S) int64, token_mask (B, S) bool)``
    with ``S = max H^2``; padded tokens point at instance 0 and are masked.
    """
    S = max(h * h for h in sides)
    t = torch.arange(S, device=device)
    n = torch.tensor(counts, device=device).unsqueeze(1)
    s = torch.tensor([h * h for h in sides], device=device).unsqueeze(1)
    token_mask = t.unsqueeze(0) < s
    source = torch.remainder(t.unsqueeze(0), n).masked_fill(~token_mask, 0)
    return source, token_mask


def grid_gather_index(sides: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Index maps between the token sequence and a common ``Hmax x Hmax`` grid.

    Bag ``b`` occupies the top-left ``H_b x H_b`` block of the common grid.
    ``to_grid[b, cell]`` is the token feeding grid cell ``cell`` (row-major), or the
    dummy index ``S`` (a zero row) outside the bag's block; ``to_tokens[b, t]`` is
    the cell of token ``t`` (0 for padded tokens). Because the cells around a bag's
    block are zero, a zero-padded convolution on the common grid gives, inside the
    block, exactly the result of the same convolution on the bag's own grid.
    """
    hmax = max(sides)
    S = hmax * hmax
    rows = torch.arange(hmax, device=device)
    r, c = torch.meshgrid(rows, rows, indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)
    to_grid, to_tokens = [], []
    t = torch.arange(S, device=device)
    for h in sides:
        inside = (r < h) & (c < h)
        to_grid.append(torch.where(inside, r * h + c, torch.full_like(r, S)))
        real = t < h * h
        to_tokens.append(torch.where(real, torch.div(t, h, rounding_mode="floor") * hmax + torch.remainder(t, h), torch.zeros_like(t)))
    return torch.stack(to_grid), torch.stack(to_tokens)


class PPEG(nn.Module):
    """Pyramid position encoding generator: ``x + DW7(x) + DW5(x) + DW3(x)`` on the
    tokens laid out as a square grid (depth-wise 2-D convolutions, zero padding).

    Computed as one depth-wise 7x7 convolution whose kernel is the sum of the three kernels
    (the 5x5 and 3x3 ones zero-padded to 7x7, centred) plus the identity at the centre, and
    whose bias is the sum of the biases: the same map (convolution is linear in its kernel,
    and zero padding of 2 and 1 equals 3 with the padded kernels), one convolution and its
    backward instead of three (issue 12). The three kernels stay the parameters.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def merged_kernel(self) -> tuple[Tensor, Tensor]:
        """``(weight (D, 1, 7, 7), bias (D,))`` of ``x + DW7(x) + DW5(x) + DW3(x)`` as one convolution."""
        weight = sum(F.pad(c.weight, [(7 - c.kernel_size[0]) // 2] * 4) for c in self.convs)
        centre = torch.zeros_like(weight)
        centre[..., 3, 3] = 1.0
        return weight + centre, sum(c.bias for c in self.convs)

    def forward(self, tokens: Tensor, token_mask: Tensor, sides: list[int]) -> Tensor:
        """``tokens`` ``(B, S, D)`` (row-major grid tokens of each bag, padded) -> same shape."""
        B, S, D = tokens.shape
        hmax = max(sides)
        to_grid, to_tokens = grid_gather_index(sides, tokens.device)
        padded = torch.cat([zero_pads(tokens, token_mask), tokens.new_zeros(B, 1, D)], dim=1)
        grid = padded.gather(1, to_grid.unsqueeze(-1).expand(-1, -1, D))  # (B, hmax*hmax, D)
        grid = grid.view(B, hmax, hmax, D).permute(0, 3, 1, 2)  # channels-last, no copy: its backward is ~1.7x faster on a CPU
        weight, bias = self.merged_kernel()
        out = F.conv2d(grid, weight.to(grid.dtype), bias.to(grid.dtype), padding=3, groups=D)
        out = out.permute(0, 2, 3, 1).reshape(B, hmax * hmax, D)
        return zero_pads(out.gather(1, to_tokens[:, :S].unsqueeze(-1).expand(-1, -1, D)), token_mask)


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention: ``x + Attn(LayerNorm(x))``."""

    def __init__(self, dim: int, heads: int, num_landmarks: int, pinv_iterations: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = SpectralNystromAttention(dim, heads=heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations, attn_dropout=attn_dropout, dropout=dropout)

    def forward(self, x: Tensor, mask: Tensor, return_first_row: bool = False) -> tuple[Tensor, Tensor | None]:
        out, row = self.attn(self.norm(x), mask, return_first_row=return_first_row)
        return x + out, row


class TransMIL(MILModel):
    """TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance
    Learning for Whole Slide Image Classification", NeurIPS 2021).

    ``Linear+ReLU`` embedding -> square completion (the ``n`` instances are extended to
    ``ceil(sqrt(n))^2`` tokens by repeating the first ones) -> class token -> Nyström
    layer -> PPEG -> Nyström layer -> LayerNorm -> class token -> linear head.

    Padding design (exact invariance to batching): every bag's real instances are
    packed to the front (original order kept), the square side ``H_b`` is computed per
    bag, and each bag's tokens live in the first ``1 + H_b^2`` sequence positions.
    Nyström landmarks are segment means over each bag's real tokens only
    (:class:`~mmil.models.layers.NystromAttention`). For PPEG, each bag is placed in
    the top-left ``H_b x H_b`` block of a zero-filled common grid, so the zero-padded
    convolutions see exactly what they would see on the bag's own grid.

    Instance scores: the class token's row of the (Nyström-approximated) attention
    matrix in the last layer, averaged over heads, with the weight of the repeated
    tokens added to the instance they copy. Being a Nyström approximation, entries
    can be slightly negative.

    Differences from the paper's code: landmark segmentation and pseudo-inverse
    norms are per bag (see ``NystromAttention``), no depth-wise convolution residual
    on the values, and a real padding mask (the original supports batch size 1 only).
    Not permutation invariant (PPEG depends on instance order).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        embed_dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, n_classes, embed_dim=embed_dim, heads=heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations,
                         dropout=dropout, attn_dropout=attn_dropout)
        num_landmarks = embed_dim // 2 if num_landmarks is None else num_landmarks
        self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        layer_kw = dict(heads=heads, num_landmarks=num_landmarks, pinv_iterations=pinv_iterations, dropout=dropout, attn_dropout=attn_dropout)
        self.layer1 = TransLayer(embed_dim, **layer_kw)
        self.ppeg = PPEG(embed_dim)
        self.layer2 = TransLayer(embed_dim, **layer_kw)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, n_classes)

    def forward_head(self, h: Tensor, mask: Tensor, *, return_scores: bool = False) -> MILOutput:
        B, N, _ = h.shape
        order = real_first_order(mask)
        packed = h.gather(1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        counts = mask.sum(dim=1).tolist()
        sides = square_sides(counts)
        source, token_mask = square_token_sources(counts, sides, h.device)

        tokens = packed.gather(1, source.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        seq = torch.cat([self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)
        seq_mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=h.device), token_mask], dim=1)

        seq, _ = self.layer1(seq, seq_mask)
        seq = torch.cat([seq[:, :1], self.ppeg(seq[:, 1:], token_mask, sides)], dim=1)
        seq, row = self.layer2(seq, seq_mask, return_first_row=return_scores)
        logits = self.head(self.norm(seq[:, 0]))

        scores = None
        if return_scores:
            token_scores = row.mean(dim=1)[:, 1:].masked_fill(~token_mask, 0.0)  # (B, S)
            packed_scores = token_scores.new_zeros(B, N).scatter_add_(1, source, token_scores)
            scores = packed_scores.new_zeros(B, N).scatter_(1, order, packed_scores)
            scores = masked_fill_scores(scores, mask)
        return MILOutput(logits=logits, instance_scores=scores)


@register_model("transmil")
def transmil(in_dim: int, n_classes: int, **kwargs) -> TransMIL:
    """TransMIL with Nyström attention and PPEG (Shao et al. 2021)."""
    return TransMIL(in_dim=in_dim, n_classes=n_classes, **kwargs)
