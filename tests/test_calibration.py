"""Temperature scaling, ECE, Brier score and split-conformal sets against references with known answers."""
import math

import numpy as np
import pytest
from scipy import stats as st
from scipy.special import softmax
from sklearn.metrics import brier_score_loss

from mmil.calibration import (apply_temperature, brier_score, conformal_quantile, conformal_threshold, expected_calibration_error,
                              fit_temperature, nll, prediction_sets, set_metrics)


def _sample(n, n_classes, true_t, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, n_classes))
    p = softmax(logits / true_t, axis=1)
    y = np.array([rng.choice(n_classes, p=row) for row in p])
    return logits, y


def test_fit_temperature_is_the_nll_minimum_on_a_fine_grid():
    logits, y = _sample(500, 3, 2.0, 0)
    t = fit_temperature(logits, y)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    best = grid[np.argmin([nll(logits, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=2e-3)


def test_fit_temperature_recovers_the_generating_temperature():
    logits, y = _sample(6000, 4, 2.5, 1)
    assert fit_temperature(logits, y) == pytest.approx(2.5, rel=0.1)


def test_map_temperature_is_the_penalised_minimum_on_a_fine_grid():
    logits, y = _sample(40, 3, 3.0, 2)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    for sigma in (0.25, 1.0):
        objective = [40 * nll(logits, y, g) + np.log(g) ** 2 / (2 * sigma ** 2) for g in grid]
        assert fit_temperature(logits, y, prior_std=sigma) == pytest.approx(grid[np.argmin(objective)], rel=2e-3)


def test_prior_keeps_a_separable_set_from_driving_t_to_its_bound_and_fades_with_n():
    logits = np.array([[2.0, 0.0], [0.0, 2.0]] * 5)  # 10 slides, all right with margin 2: the likelihood wants T -> 0
    y = np.array([0, 1] * 5)
    assert fit_temperature(logits, y) < 0.06  # the lower bound, 0.05, up to the search tolerance
    assert 0.3 < fit_temperature(logits, y, prior_std=1.0) < 0.7  # 10 exp(-2/T) + (log T)^2 / 2 is least near T = 0.5
    big, y_big = _sample(6000, 4, 2.5, 1)
    assert fit_temperature(big, y_big, prior_std=1.0) == pytest.approx(fit_temperature(big, y_big), rel=0.01)


def _naive_ece(probs, y, n_bins):
    conf, pred = probs.max(1), probs.argmax(1)
    order = sorted(range(len(y)), key=lambda i: (conf[i], i))
    n = len(y)
    size, extra = divmod(n, n_bins)
    total, start = 0.0, 0
    for b in range(n_bins):
        stop = start + size + (1 if b < extra else 0)
        idx = order[start:stop]
        acc = sum(pred[i] == y[i] for i in idx) / len(idx)
        total += len(idx) / n * abs(acc - sum(conf[i] for i in idx) / len(idx))
        start = stop
    return total


def test_ece_matches_naive_equal_mass_bins_and_brier_matches_sklearn():
    logits, y = _sample(203, 3, 1.0, 2)
    probs = softmax(logits, axis=1)
    assert expected_calibration_error(probs, y, 10) == pytest.approx(_naive_ece(probs, y, 10), abs=1e-12)
    pb = softmax(logits[:, :2], axis=1)
    yb = (y % 2)
    assert brier_score(pb, yb) == pytest.approx(2 * brier_score_loss(yb, pb[:, 1]), abs=1e-12)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    logits, y = _sample(4000, 2, 3.0, 3)  # the model's logits are 3x too sharp
    calib, test = slice(0, 2000), slice(2000, 4000)
    t = fit_temperature(logits[calib], y[calib])
    before = expected_calibration_error(softmax(logits[test], axis=1), y[test])
    after = expected_calibration_error(apply_temperature(logits[test], t), y[test])
    assert after < before - 0.05


def test_conformal_quantile_is_the_order_statistic():
    scores = np.arange(1, 20) / 20.0  # n = 19
    assert conformal_quantile(scores, 0.1) == pytest.approx(scores[math.ceil(20 * 0.9) - 1])
    assert conformal_quantile(scores[:5], 0.1) == float("inf")  # ceil(6 * 0.9) = 6 > 5


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_split_conformal_coverage_within_an_exact_binomial_bound(alpha):
    """Continuous scores: P(covered) = ceil((n+1)(1-alpha)) / (n+1) exactly, one test point per repetition."""
    rng = np.random.default_rng(int(alpha * 100))
    n, reps = 49, 4000
    covered = 0
    for _ in range(reps):
        s = rng.uniform(size=n + 1)
        covered += s[-1] <= conformal_quantile(s[:n], alpha)
    expected = math.ceil((n + 1) * (1 - alpha)) / (n + 1)
    lo, hi = st.binom.ppf([1e-5, 1 - 1e-5], reps, expected)
    assert lo <= covered <= hi
    assert expected >= 1 - alpha


def test_mondrian_sets_cover_each_class():
    rng = np.random.default_rng(5)
    n = 3000
    y = (rng.uniform(size=n) < 0.2).astype(int)  # imbalanced: marginal coverage would short-change class 1
    p1 = 1 / (1 + np.exp(-(2.0 * y - 1.0) * 1.2 - rng.normal(0, 1.5, n)))
    probs = np.stack([1 - p1, p1], axis=1)
    calib, test = slice(0, 1500), slice(1500, n)
    q = conformal_threshold(probs[calib], y[calib], 0.1, mondrian=True)
    sets = prediction_sets(probs[test], q)
    for k in (0, 1):
        m = set_metrics(sets[y[test] == k], y[test][y[test] == k])
        assert m["coverage"] >= 0.9 - 0.05
    overall = set_metrics(sets, y[test])
    assert 1.0 <= overall["mean_set_size"] <= 2.0
    assert overall["abstention_rate"] == pytest.approx(np.mean(sets.sum(1) != 1))
