"""G(R), R(p) and the predicted threshold against closed forms and brute force."""
import math

import numpy as np
import pytest
import torch

from prunelimit.errors import PruneLimitError
from prunelimit.geometry import (
    ThresholdConvergence,
    gaussian_width_ratio,
    lomp_regime,
    lomp_regime_fraction,
    num_removed,
    radius_curve,
    solve_threshold,
    threshold_sensitivity,
    trace_bound,
)
from prunelimit.lanczos import lanczos, tridiag_ritz
from prunelimit.prediction import predict_limit, predict_threshold




def _naive_radius(w, p):
    """||w - w^k|| with w^k keeping the k = ceil((1-p) D) largest |w| (brute force, no cumsum)."""
    D = len(w)
    k = math.ceil(round((1 - p) * D, 9))
    keep = np.argsort(-np.abs(w), kind="stable")[:k]
    pruned = np.zeros_like(w)
    pruned[keep] = w[keep]
    return np.linalg.norm(w - pruned)


def test_num_removed_keeps_ceil_of_kept_fraction():
    assert num_removed(0.3, 10) == 3  # (1-0.3)*10 = 7.000000000000001 must keep 7
    assert num_removed(0.7, 10) == 7
    assert num_removed(0.25, 10) == 2  # keeps ceil(7.5) = 8
    assert num_removed(0.0, 10) == 0 and num_removed(1.0, 10) == 10
    grid = np.arange(1000) / 1000
    expected = [1000 - math.ceil(round((1 - p) * 1000, 9)) for p in grid]
    assert num_removed(grid, 1000).tolist() == expected
    with pytest.raises(PruneLimitError):
        num_removed(1.5, 10)


def test_radius_matches_brute_force():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(777) * rng.uniform(0, 1, 777)
    curve = radius_curve(w)
    for p in [0.0, 0.001, 0.1, 0.3, 0.5, 0.77, 0.9, 0.999, 1.0]:
        assert curve(p) == pytest.approx(_naive_radius(w, p), rel=1e-12, abs=1e-14)
    ps = np.linspace(0, 1, 33)
    np.testing.assert_allclose(curve(ps), [_naive_radius(w, p) for p in ps], rtol=1e-12)
    # model and tensor inputs give the same curve
    t = torch.nn.Linear(7, 111, bias=False).double()
    with torch.no_grad():
        t.weight.copy_(torch.tensor(w).view(111, 7))
    assert radius_curve(t)(0.4) == pytest.approx(curve(0.4))


def test_G_closed_form_single_eigenvalue():
    eps, lam = 0.05, 3.0
    R = np.array([0.0, 0.1, 1.0, 4.0])
    expected = 2 * eps / (2 * eps + lam * R**2)
    np.testing.assert_allclose(gaussian_width_ratio(R, np.full(50, lam), eps), expected, rtol=1e-14)
    np.testing.assert_allclose(gaussian_width_ratio(R, np.full(50, -lam), eps), expected, rtol=1e-14)  # |lambda|
    # null mass: G = p0 + (1 - p0) * ...
    np.testing.assert_allclose(gaussian_width_ratio(R, np.full(5, lam), eps, p0=0.2), 0.2 + 0.8 * expected)
    assert isinstance(gaussian_width_ratio(1.0, np.array([lam]), eps), float)
    assert gaussian_width_ratio(np.ones((2, 3)), np.array([lam]), eps).shape == (2, 3)


def test_G_mixture_and_quadrature_forms_agree():
    rng = np.random.default_rng(1)
    lam = np.concatenate([np.zeros(30), rng.exponential(1.0, 70), [-0.5, -2.0]])
    eps, R = 0.02, np.linspace(0, 3, 7)
    exact = np.mean(2 * eps / (2 * eps + np.abs(lam)[None] * R[:, None] ** 2), axis=1)
    np.testing.assert_allclose(gaussian_width_ratio(R, lam, eps), exact, rtol=1e-13)
    # the same measure as (nodes, weights), split into two "probes" with unnormalised weights
    half = len(lam) // 2
    nodes = np.stack([lam[:half], lam[half:]])
    weights = np.ones_like(nodes) * 3.0
    two_probe = 0.5 * (np.mean(2 * eps / (2 * eps + np.abs(lam[:half])[None] * R[:, None] ** 2), 1)
                       + np.mean(2 * eps / (2 * eps + np.abs(lam[half:])[None] * R[:, None] ** 2), 1))
    np.testing.assert_allclose(gaussian_width_ratio(R, (nodes, weights), eps), two_probe, rtol=1e-13)


def test_root_solves_equation_and_matches_brute_force():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(2000) * 0.1
    lam = np.abs(rng.standard_normal(2000)) ** 3
    eps = 0.01
    curve = radius_curve(w)
    p_star = solve_threshold(curve, lam, eps)
    assert abs(gaussian_width_ratio(curve(p_star), lam, eps) - p_star) < 1.0 / len(w)
    # brute force over every removed count: h(r) = G(R_r) - r/D changes sign once
    h = np.array([gaussian_width_ratio(curve.radius_of_removed(r), lam, eps) - r / 2000 for r in range(2001)])
    r_star = int(np.nonzero(h >= 0)[0].max())
    assert (h[: r_star + 1] >= 0).all() and (h[r_star + 1 :] < 0).all()
    assert r_star / 2000 <= p_star <= (r_star + 1) / 2000
    pred = predict_threshold(w, eps, lam)
    assert pred.predicted_ratio == pytest.approx(p_star)
    assert pred.kept_fraction == pytest.approx(1 - p_star)
    assert pred.residual < 1.0 / len(w)
    assert pred.G_curve.shape == pred.R_curve.shape == pred.p_grid.shape


def test_root_closed_form_equal_magnitudes():
    # |w_i| = a, one eigenvalue lam: R(p)^2 ~ p D a^2, so p solves lam D a^2 p^2 + 2 eps p - 2 eps = 0.
    D, a, lam, eps = 100_000, 0.01, 2.0, 0.1
    w = np.full(D, a)
    c = lam * D * a * a
    closed = (-2 * eps + math.sqrt(4 * eps**2 + 8 * eps * c)) / (2 * c)
    assert predict_threshold(w, eps, np.array([lam])).predicted_ratio == pytest.approx(closed, abs=2.0 / D)


def test_trace_bound_closed_form_and_jensen():
    rng = np.random.default_rng(3)
    w = rng.standard_normal(5000) * 0.05
    lam = rng.exponential(0.5, 5000)  # PSD spectrum
    eps = 0.005
    curve = radius_curve(w)
    bound = trace_bound(curve, lam.sum(), eps)
    # the bound solves p = 2 eps / (2 eps + R(p)^2 Tr / D)
    assert abs(2 * eps / (2 * eps + curve(bound) ** 2 * lam.mean()) - bound) < 2.0 / len(w)
    pred = predict_threshold(w, eps, lam, trace=lam.sum())
    assert pred.trace_bound == pytest.approx(bound)
    assert pred.trace_bound <= pred.predicted_ratio + 1.0 / len(w)  # Jensen
    assert trace_bound(curve, -1.0, eps) is None


def test_sensitivity_is_monotone_and_consistent():
    rng = np.random.default_rng(4)
    w = rng.standard_normal(3000) * 0.1
    lam = rng.exponential(1.0, 3000)
    sens = threshold_sensitivity(w, 0.01, lam)
    assert sens["eps*0.5"] == pytest.approx(predict_threshold(w, 0.005, lam).predicted_ratio)
    assert sens["eps*2"] == pytest.approx(predict_threshold(w, 0.02, lam).predicted_ratio)
    p = predict_threshold(w, 0.01, lam)
    assert sens["eps*0.5"] < p.predicted_ratio < sens["eps*2"]
    assert p.sensitivity == pytest.approx(sens, rel=1e-12)


def test_null_mass_raises_prediction():
    rng = np.random.default_rng(5)
    w = rng.standard_normal(1000) * 0.1
    lam = rng.exponential(1.0, 1000)
    assert predict_threshold(w, 0.01, lam, p0=0.3).predicted_ratio > predict_threshold(w, 0.01, lam).predicted_ratio


def test_slq_quadrature_of_explicit_matrix_predicts_same_threshold():
    # Network-like spectrum: mass near zero, a few outliers, some negative eigenvalues.
    rng = np.random.default_rng(6)
    D = 600
    eig = np.concatenate([rng.normal(0, 0.01, 400), rng.exponential(0.3, 190), [-0.3, -0.1], rng.uniform(5, 20, 8)])
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    a = torch.tensor((q * eig) @ q.T)
    w = rng.standard_normal(D) * rng.exponential(0.05, D)
    eps = 0.01
    gen = torch.Generator().manual_seed(0)
    nodes, weights = [], []
    for _ in range(6):
        v = (torch.randint(0, 2, (D,), generator=gen) * 2 - 1).double()
        theta, tau = tridiag_ritz(*lanczos(lambda x: a @ x, D, 200, v))
        nodes.append(theta)
        weights.append(tau)
    slq_pred = predict_threshold(w, eps, (np.array(nodes), np.array(weights)))
    exact_pred = predict_threshold(w, eps, eig)
    assert abs(slq_pred.predicted_ratio - exact_pred.predicted_ratio) < 0.02
    # a single eigenvalue far from the truth would not agree (the check can fail)
    assert abs(predict_threshold(w, eps, np.array([eig.mean()])).predicted_ratio - exact_pred.predicted_ratio) > 0.02


def test_threshold_convergence_stops_when_pstar_settles():
    rng = np.random.default_rng(7)
    D = 400
    eig = np.concatenate([rng.normal(0, 1e-3, 200), rng.exponential(0.5, 200)])
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    a = (q * eig) @ q.T
    w = rng.standard_normal(D) * 0.1
    stop = ThresholdConvergence(w, 0.01, tol=0.005, min_steps=5, growth=1.5)
    stop.reset()
    alpha, beta = lanczos(lambda x: a @ x, D, 300, np.ones(D), callback=stop)
    hist = stop.history[-1]
    steps = [k for k, *_ in hist]
    assert steps[:3] == [5, 8, 12] and all(b == math.ceil(1.5 * a) for a, b in zip(steps, steps[1:]))
    assert len(hist) >= 3
    assert len(alpha) == hist[-1][0] < 300
    assert abs(hist[-1][1] - hist[-2][1]) < 0.005
    assert all(abs(hist[i][1] - hist[i - 1][1]) >= 0.005 for i in range(1, len(hist) - 1))
    assert hist[-1][1] == pytest.approx(solve_threshold(radius_curve(w), tridiag_ritz(alpha, beta), 0.01))


def test_lomp_regime():
    w = np.concatenate([np.full(700, 1e-5), np.full(300, 0.3)])
    assert lomp_regime_fraction(w, 1e-3) == pytest.approx(0.7)
    assert lomp_regime(w, predicted_ratio=0.8).in_regime
    weak = np.concatenate([np.full(50, 1e-5), np.full(950, 0.3)])
    out = lomp_regime(weak, predicted_ratio=0.6)
    assert not out.in_regime and "outside the LOMP regime" in out.message
    pred = predict_threshold(weak, 0.01, np.full(1000, 1.0))
    assert pred.near_zero_fraction == pytest.approx(0.05)


def test_predict_limit_carries_the_one_regime_check():
    w = np.concatenate([np.full(300, 1e-5), np.full(700, 0.3)])  # 30% near zero; p* = 0.39 with this spectrum
    lam = np.linspace(1e-4, 0.01, 1000)
    for share in (0.5, 0.9):
        pred = predict_limit(w, 0.01, lam, regime_tol=1e-3, regime_min_share=share)
        regime = lomp_regime(w, pred.predicted_ratio, 1e-3, share)
        assert (pred.near_zero_fraction, pred.in_lomp_regime, pred.lomp_message) == (
            regime.near_zero_fraction, regime.in_regime, regime.message)
    assert predict_limit(w, 0.01, lam, regime_min_share=0.5).in_lomp_regime
    assert not predict_limit(w, 0.01, lam, regime_min_share=0.9).in_lomp_regime
    # predict_threshold is predict_limit under its stable-API name
    assert predict_threshold(w, 0.01, lam, 0.1, 30.0).to_dict() == predict_limit(w, 0.01, lam, p0=0.1, trace=30.0).to_dict()


def test_prediction_round_trips_through_dict():
    pred = predict_threshold(np.linspace(-1, 1, 101), 0.1, np.linspace(0, 2, 101), trace=101.0)
    again = type(pred).from_dict(pred.to_dict())
    assert again.predicted_ratio == pred.predicted_ratio
    np.testing.assert_array_equal(again.G_curve, pred.G_curve)


def test_bad_input():
    w = np.ones(10)
    with pytest.raises(PruneLimitError, match="epsilon"):
        predict_threshold(w, 0.0, np.ones(10))
    with pytest.raises(PruneLimitError, match="p0"):
        predict_threshold(w, 0.1, np.ones(10), p0=1.5)
    with pytest.raises(PruneLimitError, match="NaN"):
        predict_threshold(np.array([1.0, np.nan]), 0.1, np.ones(2))
    with pytest.raises(PruneLimitError, match="spectrum"):
        predict_threshold(w, 0.1, np.ones((2, 2, 2)))
    with pytest.raises(PruneLimitError, match="shape"):
        predict_threshold(w, 0.1, (np.ones(3), np.ones(4)))


def _convergence_case():
    rng = np.random.default_rng(7)
    D = 400
    eig = np.concatenate([rng.normal(0, 1e-3, 200), rng.exponential(0.5, 200)])
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    return D, (q * eig) @ q.T, rng.standard_normal(D) * 0.1


def test_threshold_convergence_relative_to_the_sensitivity_interval():
    """With rel_tol, a probe stops at the first checkpoint whose change is below rel_tol x its eps/2..2 eps width."""
    D, a, w = _convergence_case()
    stop = ThresholdConvergence(w, 0.01, tol=1e-9, min_steps=5, growth=1.5, rel_tol=0.5)
    stop.reset()
    lanczos(lambda x: a @ x, D, 300, np.ones(D), callback=stop)
    hist = stop.history[-1]
    assert stop.reasons == ["converged"] and all(width > 0 for _, _, width in hist)
    assert abs(hist[-1][1] - hist[-2][1]) < 0.5 * hist[-1][2]
    assert all(abs(hist[i][1] - hist[i - 1][1]) >= 0.5 * hist[i][2] for i in range(1, len(hist) - 1))


def test_threshold_convergence_time_budget_stops_a_probe():
    D, a, w = _convergence_case()
    stop = ThresholdConvergence(w, 0.01, tol=1e-12, min_steps=5, growth=1.5, max_seconds=0.0, num_probes=2)
    stop.reset()
    alpha, _ = lanczos(lambda x: a @ x, D, 300, np.ones(D), callback=stop)
    assert len(alpha) == 1 and stop.reasons == ["time budget"]
