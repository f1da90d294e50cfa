"""TransMIL's faster training step computes the same function (issue 12).

The references below are the implementations before the change, copied here: the Newton-Schulz
pseudo-inverse as ``4 x iterations`` matrix products under autograd, and PPEG as three separate
depth-wise convolutions plus the identity. Values and gradients are compared in float64
(tight) and the model's logits in float32 (float tolerance).
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from mmil.models import create_model
from mmil.models.transmil import PPEG, grid_gather_index, newton_schulz_scalar, spectral_newton_schulz_pinv
from mmil.models.layers import zero_pads


def reference_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """The iteration as it was computed before (copied)."""
    abs_a = a.abs()
    col = abs_a.sum(dim=-2).amax(dim=-1)
    row = abs_a.sum(dim=-1).amax(dim=-1)
    z = a.transpose(-1, -2) / (col * row)[..., None, None]
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def reference_ppeg_forward(self, tokens, token_mask, sides):
    """PPEG.forward as it was (three convolutions, copied)."""
    B, S, D = tokens.shape
    hmax = max(sides)
    to_grid, to_tokens = grid_gather_index(sides, tokens.device)
    padded = torch.cat([zero_pads(tokens, token_mask), tokens.new_zeros(B, 1, D)], dim=1)
    grid = padded.gather(1, to_grid.unsqueeze(-1).expand(-1, -1, D)).transpose(1, 2).reshape(B, D, hmax, hmax)
    out = grid + sum(conv(grid) for conv in self.convs)
    out = out.reshape(B, D, hmax * hmax).transpose(1, 2)
    return zero_pads(out.gather(1, to_tokens[:, :S].unsqueeze(-1).expand(-1, -1, D)), token_mask)


def _landmark_kernels(m: int, heads: int = 3, absent: int = 0, seed: int = 0) -> torch.Tensor:
    """Row-stochastic ``F2``-like matrices, the last ``absent`` landmarks an identity block (as NystromAttention builds them)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, heads, m, 8, generator=g, dtype=torch.float64), torch.randn(2, heads, m, 8, generator=g, dtype=torch.float64)
    a = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1)
    if absent:
        a[..., -absent:, :] = 0.0
        a[..., :, -absent:] = 0.0
        a[..., -absent:, -absent:] = torch.eye(absent, dtype=torch.float64)
        a[..., :-absent, :-absent] = a[..., :-absent, :-absent] / a[..., :-absent, :-absent].sum(-1, keepdim=True)
    return a


@pytest.mark.parametrize("m, absent, iterations", [(6, 0, 6), (24, 0, 6), (24, 5, 6), (12, 3, 3), (12, 3, 12), (8, 0, 40)])
def test_spectral_pinv_equals_the_iteration_and_its_gradient(m, absent, iterations):
    # a float32 input, as the model gives it; the reference in the precision the spectral form works in for
    # these iterations (float32 up to 6, float64 beyond: there the float32 iteration itself loses digits).
    # Rows of F2 sum to 1, so the norms' argmax ties: both sides must see the same rounding of the input.
    a = _landmark_kernels(m, absent=absent, seed=m).float().requires_grad_()
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    ref = reference_pinv(a if iterations <= 6 else a.double(), iterations).float()
    new = spectral_newton_schulz_pinv(a, iterations)
    assert new.dtype == torch.float32
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(new.detach(), ref.detach(), rtol=1e-4, atol=1e-4 * scale)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), a)
    (grad_new,) = torch.autograd.grad((new * weights).sum(), a)
    torch.testing.assert_close(grad_new, grad_ref, rtol=1e-4, atol=1e-4 * float(grad_ref.abs().max()))


def test_spectral_pinv_in_float64_algebra_matches_to_rounding():
    from mmil.models.transmil import _SpectralNewtonSchulz

    a = _landmark_kernels(16, absent=4, seed=3).requires_grad_()
    abs_a = a.abs()
    c = 1.0 / (abs_a.sum(-2).amax(-1) * abs_a.sum(-1).amax(-1))
    new, ref = _SpectralNewtonSchulz.apply(a, c, 6), reference_pinv(a, 6)
    torch.testing.assert_close(new, ref, rtol=1e-9, atol=1e-10)
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((new * weights).sum(), a)[0], torch.autograd.grad((ref * weights).sum(), a)[0], rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("m, absent, d, dtype", [(16, 4, 5, torch.float64), (24, 0, 8, torch.float64), (24, 5, 6, torch.float32)])
def test_pinv_times_v_equals_the_iteration_times_v_and_its_gradients(m, absent, d, dtype):
    # Z V without forming Z: values and the gradients of a and V against (reference iteration) @ V
    a = _landmark_kernels(m, absent=absent, seed=m + d).to(dtype).requires_grad_()
    v = torch.randn(2, 3, m, d, generator=torch.Generator().manual_seed(d), dtype=dtype).requires_grad_()
    weights = torch.randn(2, 3, m, d, generator=torch.Generator().manual_seed(7), dtype=dtype)
    new, ref = spectral_newton_schulz_pinv(a, 6, v), reference_pinv(a, 6) @ v  # same input rounding: the norms' argmax ties
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert new.dtype == dtype
    torch.testing.assert_close(new, ref, rtol=tol, atol=tol * float(ref.detach().abs().max()))
    for g_new, g_ref in zip(torch.autograd.grad((new * weights).sum(), (a, v)), torch.autograd.grad((ref * weights).sum(), (a, v))):
        torch.testing.assert_close(g_new, g_ref, rtol=tol, atol=tol * float(g_ref.abs().max()))


def test_scalar_recurrence_derivative_is_the_finite_difference():
    lam = torch.linspace(0.0, 2.0, 9, dtype=torch.float64)
    c = torch.tensor(0.4, dtype=torch.float64)
    p, dp = newton_schulz_scalar(lam, c, 6)
    h = 1e-6
    numeric = (newton_schulz_scalar(lam + h, c, 6)[0] - newton_schulz_scalar(lam - h, c, 6)[0]) / (2 * h)
    torch.testing.assert_close(dp, numeric, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(p).all()


def test_merged_ppeg_equals_three_convolutions():
    torch.manual_seed(0)
    ppeg = PPEG(6).double()
    tokens = torch.randn(2, 16, 6, dtype=torch.float64)
    mask = torch.tensor([[True] * 16, [True] * 9 + [False] * 7])
    sides = [4, 3]
    new = ppeg(tokens, mask, sides)
    ref = types.MethodType(reference_ppeg_forward, ppeg)(tokens, mask, sides)
    torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(new)
    g_new = torch.autograd.grad((new * w).sum(), list(ppeg.parameters()))
    g_ref = torch.autograd.grad((ref * w).sum(), list(ppeg.parameters()))
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _as_before(model: nn.Module) -> nn.Module:
    """The same weights through the implementations before the change."""
    model.ppeg.forward = types.MethodType(reference_ppeg_forward, model.ppeg)
    for layer in (model.layer1, model.layer2):
        layer.attn.pinv = types.MethodType(lambda self, a: reference_pinv(a, self.pinv_iterations), layer.attn)
        layer.attn.pinv_times = types.MethodType(lambda self, a, v: reference_pinv(a, self.pinv_iterations) @ v, layer.attn)
    return model


def test_transmil_forward_and_gradients_as_before():
    torch.manual_seed(0)
    new = create_model("transmil", in_dim=12, n_classes=3, embed_dim=32, heads=4, dropout=0.0).eval()
    old = create_model("transmil", in_dim=12, n_classes=3, embed_dim=32, heads=4, dropout=0.0).eval()
    old.load_state_dict(new.state_dict())
    _as_before(old)
    x = torch.randn(2, 70, 12)
    mask = torch.ones(2, 70, dtype=torch.bool)
    mask[1, 41:] = False  # a padded bag: fewer landmarks, its own grid
    out_new, out_old = new(x, mask, return_scores=True), old(x, mask, return_scores=True)
    torch.testing.assert_close(out_new.logits, out_old.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_new.instance_scores, out_old.instance_scores, rtol=1e-3, atol=1e-5)
    new.double(), old.double()
    x64 = x.double()
    ln, lo = new(x64, mask).logits, old(x64, mask).logits
    torch.testing.assert_close(ln, lo, rtol=1e-4, atol=1e-6)  # the pseudo-inverse runs in float32 either way on the new path
    gn = torch.autograd.grad(ln.sum(), list(new.parameters()))
    go = torch.autograd.grad(lo.sum(), list(old.parameters()))
    for (name, _), a, b in zip(new.named_parameters(), gn, go):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()) + 1e-7, msg=name)
