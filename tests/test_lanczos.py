"""Lanczos recurrence and Gauss quadrature against explicit symmetric matrices."""
import numpy as np
import pytest
import torch

from prunelimit.errors import PruneLimitError
from prunelimit.lanczos import lanczos, tridiag_ritz




def _symmetric(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * eigenvalues) @ q.T


def _tridiag(alpha, beta):
    return np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)


def test_extreme_eigenvalues_recovered():
    rng = np.random.default_rng(1)
    eig = np.concatenate([[-3.0, -2.5], rng.uniform(-1, 1, 296), [4.0, 5.0]])
    a = torch.tensor(_symmetric(eig))
    v0 = torch.randn(300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha, beta = lanczos(lambda v: a @ v, 300, 60, v0)
    theta, _ = tridiag_ritz(alpha, beta)
    np.testing.assert_allclose(theta[[0, 1, -2, -1]], [-3.0, -2.5, 4.0, 5.0], atol=1e-8)


@pytest.mark.parametrize("mode", [True, "twice"])
def test_full_reorthogonalization_keeps_basis_orthonormal(mode):
    # Well separated outliers converge fast; without reorthogonalization that destroys orthogonality.
    eig = np.concatenate([np.linspace(0, 1, 395), [50, 60, 70, 80, 100.0]])
    a = torch.tensor(_symmetric(eig, seed=3))
    v0 = torch.ones(400, dtype=torch.float64)
    res = lanczos(lambda v: a @ v, 400, 120, v0, reorthogonalize=mode, return_basis=True)
    q = res.basis
    assert q.shape == (120, 400)
    gram_err = (q @ q.T - torch.eye(120, dtype=torch.float64)).abs().max().item()
    assert gram_err < 1e-12
    # T = Q^T A Q, the defining relation of the recurrence.
    np.testing.assert_allclose((q @ a @ q.T).numpy(), _tridiag(*res), atol=1e-10)

    plain = lanczos(lambda v: a @ v, 400, 120, v0, reorthogonalize=False, return_basis=True)
    lost = (plain.basis @ plain.basis.T - torch.eye(120, dtype=torch.float64)).abs().max().item()
    assert lost > 1e-3  # the check above could fail


def test_gauss_quadrature_is_exact_for_low_degree_polynomials():
    rng = np.random.default_rng(2)
    a = _symmetric(rng.uniform(-2, 3, 80), seed=4)
    v = rng.standard_normal(80)
    v /= np.linalg.norm(v)
    m = 6
    alpha, beta = lanczos(lambda x: a @ x, 80, m, v)  # numpy in, numpy matvec
    theta, tau = tridiag_ritz(alpha, beta)
    assert tau.sum() == pytest.approx(1.0, abs=1e-14)
    for k in range(2 * m):  # exact up to degree 2m - 1
        exact = v @ np.linalg.matrix_power(a, k) @ v
        assert tau @ theta**k == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_breakdown_stops_early_with_exact_measure():
    # v0 lies in a 5-dimensional invariant subspace: the Krylov space stops growing after 5 steps.
    eig = np.array([1.0, 2.0, 3.0, 4.0, 5.0] + [7.0] * 45)
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((50, 50)))
    a = (q * eig) @ q.T
    coef = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    v0 = q[:, :5] @ coef
    res = lanczos(lambda x: a @ x, 50, 30, v0)
    alpha, beta = res
    assert res.breakdown and len(alpha) == 5 and len(beta) == 4
    theta, tau = tridiag_ritz(alpha, beta)
    np.testing.assert_allclose(theta, eig[:5], atol=1e-10)
    np.testing.assert_allclose(tau, coef**2 / (coef**2).sum(), atol=1e-10)


def test_steps_capped_at_dimension():
    a = torch.tensor(_symmetric(np.arange(1.0, 11.0)))
    alpha, beta = lanczos(lambda v: a @ v, 10, 50, torch.ones(10, dtype=torch.float64))
    assert len(alpha) == 10
    np.testing.assert_allclose(tridiag_ritz(alpha, beta)[0], np.arange(1.0, 11.0), atol=1e-9)


def test_tridiag_ritz_matches_dense_eigh():
    rng = np.random.default_rng(6)
    alpha, beta = rng.standard_normal(12), rng.uniform(0.1, 1, 11)
    nodes, weights = tridiag_ritz(alpha, beta)
    ev, vec = np.linalg.eigh(_tridiag(alpha, beta))
    np.testing.assert_allclose(nodes, ev, atol=1e-12)
    np.testing.assert_allclose(weights, vec[0] ** 2, atol=1e-12)
    assert tridiag_ritz([2.5], []) == (pytest.approx([2.5]), pytest.approx([1.0]))


def test_callback_can_stop():
    a = torch.tensor(_symmetric(np.linspace(-1, 1, 60)))
    seen = []

    def stop(alpha, beta):
        seen.append((len(alpha), len(beta)))
        return len(alpha) == 7

    alpha, beta = lanczos(lambda v: a @ v, 60, 40, torch.ones(60, dtype=torch.float64), callback=stop)
    assert len(alpha) == 7 and len(beta) == 6
    assert seen[0] == (1, 0) and seen[-1] == (7, 6)


def test_bad_input():
    with pytest.raises(PruneLimitError, match="zero"):
        lanczos(lambda v: v, 5, 3, torch.zeros(5))
    with pytest.raises(PruneLimitError, match="entries"):
        lanczos(lambda v: v, 5, 3, torch.ones(4))
    with pytest.raises(PruneLimitError, match="non-finite"):
        lanczos(lambda v: v * float("nan"), 5, 3, torch.ones(5))
    with pytest.raises(PruneLimitError, match="len\\(alpha\\)"):
        tridiag_ritz([1.0, 2.0], [0.5, 0.5])
