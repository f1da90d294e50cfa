"""The Lanczos recurrence and the Gauss quadrature of its tridiagonal matrix.

Pure numerics on vectors and a `matvec`; nothing here knows about models. For a symmetric
operator A and a unit vector q_1, Lanczos builds an orthonormal basis Q_m of the Krylov space
span{q_1, A q_1, ..., A^{m-1} q_1} and the tridiagonal T_m = Q_m^T A Q_m:

    beta_j q_{j+1} = A q_j - alpha_j q_j - beta_{j-1} q_{j-1},   alpha_j = q_j^T A q_j.

If T_m = S diag(theta) S^T, the Ritz values theta_j with weights tau_j = S_{1j}^2 are the
m-point Gauss quadrature of the spectral measure of A seen from q_1:
q_1^T f(A) q_1 ~= sum_j tau_j f(theta_j)  (exact for polynomials of degree <= 2m-1).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import scipy.linalg
import torch

from .errors import PruneLimitError

__all__ = ["lanczos", "tridiag_ritz", "LanczosResult"]

# Kahan-Parlett: a Gram-Schmidt pass that keeps less than 1/sqrt(2) of the norm lost digits
# to cancellation, so it is repeated once; a second pass always suffices ("twice is enough").
_TWICE_IS_ENOUGH = 1.0 / math.sqrt(2.0)


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


class LanczosResult(tuple):
    """(alpha, beta) — plus `.basis` (rows = Lanczos vectors) when requested and `.breakdown`."""

    basis: torch.Tensor | None
    breakdown: bool

    def __new__(cls, alpha, beta, basis=None, breakdown=False):
        self = super().__new__(cls, (alpha, beta))
        self.basis, self.breakdown = basis, breakdown
        return self


def lanczos(
    matvec: Callable,
    dim: int,
    num_steps: int,
    v0,
    reorthogonalize: bool | str = True,
    dtype=torch.float64,
    *,
    breakdown_tol: float | None = None,
    callback: Callable[[np.ndarray, np.ndarray], bool | None] | None = None,
    return_basis: bool = False,
) -> LanczosResult:
    """Run `num_steps` Lanczos steps of the symmetric operator `matvec` from `v0`.

    Returns `(alpha, beta)`: float64 numpy arrays of lengths k and k-1 (k <= num_steps, k <= dim),
    the diagonal and off-diagonal of T_k. The result also carries `.basis` (k x dim tensor,
    only if `return_basis`) and `.breakdown` (True if it stopped early).

    - `v0`: torch tensor (any device) or numpy array; normalised here. With a numpy `v0`,
      `matvec` receives and returns numpy arrays; otherwise torch tensors of `dtype` on v0's device
      (results of another dtype/device are converted).
    - `reorthogonalize`: True (or "auto") = full reorthogonalization with classical Gram-Schmidt
      against the whole stored basis after the three-term step, repeated once when that pass
      cancels more than 1/sqrt(2) of the norm (Kahan-Parlett "twice is enough"); "twice" = always
      two passes; False = plain three-term recurrence (loses orthogonality, ghost eigenvalues).
    - Breakdown: stops when beta_j <= breakdown_tol * max(|alpha|, beta seen so far), i.e. the
      Krylov space is (numerically) invariant and T_k already carries the whole measure of v0.
      Default tolerance sqrt(machine epsilon of `dtype`).
    - `callback(alpha, beta)` after every step (arrays so far); returning True stops the run.
    """
    if reorthogonalize not in (True, False, "auto", "twice"):
        raise PruneLimitError(f"reorthogonalize must be True, False, 'auto' or 'twice', got {reorthogonalize!r}")
    if num_steps < 1:
        raise PruneLimitError(f"num_steps must be >= 1, got {num_steps}")
    tdtype = _torch_dtype(dtype)
    if isinstance(v0, np.ndarray):
        matvec = _numpy_matvec(matvec)
    q = _start_vector(v0, dim, tdtype)
    tol = math.sqrt(torch.finfo(tdtype).eps) if breakdown_tol is None else float(breakdown_tol)
    mode = "auto" if reorthogonalize is True else reorthogonalize
    steps = min(int(num_steps), int(dim))
    keep_basis = bool(mode) or return_basis
    basis = torch.empty((steps, dim), dtype=tdtype, device=q.device) if keep_basis else None
    alphas, betas, breakdown = _recurrence(matvec, q, steps, basis, mode, tol, callback)
    out_basis = basis[: len(alphas)] if (return_basis and basis is not None) else None
    return LanczosResult(np.asarray(alphas, dtype=np.float64), np.asarray(betas, dtype=np.float64), out_basis, breakdown)


def _numpy_matvec(user_matvec: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A torch-in, torch-out adapter of a numpy `matvec`."""

    def matvec(t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(user_matvec(t.numpy())))

    return matvec


def _start_vector(v0, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """q_1 = v0 / ||v0|| as a flat tensor of `dtype` on v0's device."""
    q = torch.as_tensor(v0).detach().reshape(-1).to(dtype).clone()
    if q.numel() != dim:
        raise PruneLimitError(f"v0 has {q.numel()} entries, expected dim={dim}")
    norm = torch.linalg.vector_norm(q)
    if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
        raise PruneLimitError("the Lanczos start vector is zero or not finite")
    q /= norm
    return q


def _recurrence(matvec: Callable, q: torch.Tensor, steps: int, basis: torch.Tensor | None, mode, tol: float,
                callback) -> tuple[list[float], list[float], bool]:
    """The three-term recurrence from q_1 (basis rows filled as it goes): (alphas, betas, breakdown)."""
    alphas: list[float] = []
    betas: list[float] = []
    q_prev: torch.Tensor | None = None
    scale = 0.0
    breakdown = False
    for j in range(steps):
        if basis is not None:
            basis[j] = q
        w = _apply(matvec, q)
        a = torch.dot(q, w)
        w = w - a * q
        if q_prev is not None:
            w.sub_(q_prev, alpha=betas[-1])
        if mode:
            w = _reorthogonalize(w, basis[: j + 1], mode)
        a_val = float(a)
        b_val = float(torch.linalg.vector_norm(w))
        if not (math.isfinite(a_val) and math.isfinite(b_val)):
            raise PruneLimitError(f"Lanczos step {j}: the operator returned non-finite values")
        alphas.append(a_val)
        scale = max(scale, abs(a_val), b_val)
        last = j == steps - 1
        if not last and b_val <= tol * scale:
            breakdown = True
        stop = bool(callback(np.asarray(alphas), np.asarray(betas))) if callback is not None else False
        if last or breakdown or stop:
            break
        betas.append(b_val)
        q_prev, q = q, w / b_val
    return alphas, betas, breakdown


def _apply(matvec: Callable, q: torch.Tensor) -> torch.Tensor:
    """matvec(q) as a flat tensor of q's dtype and device."""
    w = torch.as_tensor(matvec(q)).reshape(-1).to(device=q.device, dtype=q.dtype)
    if w.numel() != q.numel():
        raise PruneLimitError(f"matvec returned {w.numel()} entries, expected {q.numel()}")
    return w


def _reorthogonalize(w: torch.Tensor, done: torch.Tensor, mode) -> torch.Tensor:
    """w minus its projection on the rows of `done` (classical Gram-Schmidt; a second pass when needed)."""
    passes = 2 if mode == "twice" else 1
    p = 0
    while p < passes:
        before = torch.linalg.vector_norm(w)
        w = torch.addmv(w, done.T, torch.mv(done, w), alpha=-1.0)
        p += 1
        if mode == "auto" and p == 1 and float(torch.linalg.vector_norm(w)) < _TWICE_IS_ENOUGH * float(before):
            passes = 2
    return w


def tridiag_ritz(alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values and Gauss weights of the symmetric tridiagonal T (diagonal alpha, off-diagonal beta).

    nodes = eigenvalues of T (ascending); weights_j = (first component of eigenvector j)^2,
    which sum to 1. Solved in float64 with scipy.linalg.eigh_tridiagonal.
    """
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if alpha.size == 0:
        raise PruneLimitError("tridiag_ritz needs at least one diagonal entry")
    if beta.size != alpha.size - 1:
        raise PruneLimitError(f"beta must have len(alpha) - 1 = {alpha.size - 1} entries, got {beta.size}")
    if not (np.isfinite(alpha).all() and np.isfinite(beta).all()):
        raise PruneLimitError("tridiagonal matrix has non-finite entries")
    if alpha.size == 1:
        return alpha.copy(), np.ones(1)
    nodes, vectors = scipy.linalg.eigh_tridiagonal(alpha, beta)
    weights = vectors[0] ** 2
    return nodes, weights
