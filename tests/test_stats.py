"""Bootstrap intervals, DeLong's test and Holm's correction against naive references and closed forms."""
import numpy as np
import pytest
from scipy import stats as st
from sklearn.metrics import roc_auc_score

from mmil.stats import auc_of_probs, binary_auc, bootstrap_ci, delong_test, holm_adjust, paired_bootstrap_test


def _naive_delong(y, a, b):
    """O(m n) placements and the covariance formula written out term by term."""
    y = np.asarray(y).astype(bool)
    def psi(x, z):
        return 1.0 if x > z else (0.5 if x == z else 0.0)
    v10, v01 = [], []
    for s in (a, b):
        pos, neg = s[y], s[~y]
        v10.append([np.mean([psi(x, z) for z in neg]) for x in pos])
        v01.append([np.mean([psi(x, z) for x in pos]) for z in neg])
    v10, v01 = np.array(v10), np.array(v01)
    m, n = v10.shape[1], v01.shape[1]
    auc = v10.mean(1)
    def cov(v, i, j):
        return np.sum((v[i] - v[i].mean()) * (v[j] - v[j].mean())) / (v.shape[1] - 1)
    var = sum(sign * (cov(v10, i, j) / m + cov(v01, i, j) / n) for i, j, sign in ((0, 0, 1), (1, 1, 1), (0, 1, -2)))
    z = (auc[0] - auc[1]) / np.sqrt(var)
    return auc[0], auc[1], 2 * (1 - st.norm.cdf(abs(z)))


def test_delong_matches_naive_reference_and_sklearn_auc():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    a = y * 1.0 + rng.normal(size=80)
    b = np.round(y * 0.6 + rng.normal(size=80), 1)  # rounded: ties exercise psi = 1/2
    auc_a, auc_b, p = delong_test(y, a, b)
    ref = _naive_delong(y, a, b)
    assert auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert (auc_a, auc_b, p) == pytest.approx(ref, rel=1e-9)


def test_rank_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.5 + rng.normal(size=300), 1)
    assert binary_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(binary_auc(np.ones(5), s[:5]))


def test_auc_of_probs_is_sklearns_binary_and_macro_one_vs_rest_auc():
    rng = np.random.default_rng(6)
    y3 = rng.integers(0, 3, 120)
    p3 = rng.dirichlet(np.ones(3), size=120) + np.eye(3)[y3] * 0.3
    p3 /= p3.sum(1, keepdims=True)
    assert auc_of_probs(y3, p3) == pytest.approx(roc_auc_score(y3, p3, multi_class="ovr", average="macro"), abs=1e-12)
    assert auc_of_probs(y3[:20], p3[:20, :][:, [0, 1, 2]]) == pytest.approx(
        np.mean([roc_auc_score(y3[:20] == c, p3[:20, c]) for c in range(3) if 0 < (y3[:20] == c).sum() < 20]))
    p2 = np.stack([1 - p3[:, 0], p3[:, 0]], 1)
    assert auc_of_probs(y3 == 0, p2) == pytest.approx(roc_auc_score(y3 == 0, p3[:, 0]))


def test_delong_identical_scores_and_one_class():
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.9, 0.3, 0.6, 0.2])
    assert delong_test(y, s, s)[2] == 1.0
    with pytest.raises(ValueError, match="both classes"):
        delong_test(np.ones(4), s[:4], s[:4])


def test_bootstrap_interval_of_a_mean_matches_the_normal_closed_form():
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=600)
    ci = bootstrap_ci(np.zeros(600), x, lambda y, s: float(s.mean()), n_boot=4000, stratified=False)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(len(x))
    assert ci.estimate == pytest.approx(x.mean())
    assert ci.low == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert ci.high == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_stratified_bootstrap_keeps_both_classes_for_auc():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(40), np.ones(3)].astype(int)  # few positives: plain resampling would lose them
    s = y + rng.normal(size=43)
    ci = bootstrap_ci(y, s, binary_auc, n_boot=500)
    assert 0.0 <= ci.low <= ci.estimate <= ci.high <= 1.0


def test_paired_bootstrap_agrees_with_the_paired_t_test_on_means():
    rng = np.random.default_rng(3)
    base = rng.normal(size=400)
    a, b = base + rng.normal(0.12, 1.0, size=400), base
    diff, p = paired_bootstrap_test(np.zeros(400), a, b, lambda y, s: float(s.mean()), n_boot=4000, stratified=False)
    t_p = st.ttest_rel(a, b).pvalue
    assert diff == pytest.approx(a.mean() - b.mean())
    assert 0.001 < t_p < 0.5  # the regime where the comparison is informative
    assert p == pytest.approx(t_p, abs=0.03)
    assert paired_bootstrap_test(np.zeros(400), b, b, lambda y, s: float(s.mean()), n_boot=200)[1] == 1.0


def test_holm_against_worked_example():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
