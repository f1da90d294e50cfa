"""Statistics that say which differences between models are real: bootstrap intervals and paired tests.

Pure functions of arrays (labels, scores); the bench applies them to pooled out-of-fold predictions.

- :func:`binary_auc`: ROC AUC from ranks (fast enough to bootstrap).
- :func:`bootstrap_ci`: percentile interval of a metric over slides resampled with replacement.
- :func:`delong_test`: DeLong's test of two correlated ROC AUCs on the same slides (binary labels).
- :func:`paired_bootstrap_test`: two-sided p-value of a metric difference, resampling slides jointly.
- :func:`holm_adjust`: Holm's step-down correction when one model is compared with several.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats as _st

Metric = Callable[[np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class Interval:
    """A point estimate and its ``level`` confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney formula (R_pos - m(m+1)/2) / (m n) with mid-ranks for ties; nan without both classes.

    A few microseconds per call, so thousands of bootstrap resamples stay cheap.
    """
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = _st.rankdata(np.asarray(score, dtype=np.float64))
    return float((ranks[y].sum() - m * (m + 1) / 2.0) / (m * n))


def auc_of_probs(y: np.ndarray, probs: np.ndarray) -> float:
    """AUC of class probabilities: binary AUC of ``probs[:, 1]`` for two classes, else the macro mean of
    one-vs-rest AUCs over the classes both present and absent somewhere in ``y`` (nan when there is none)."""
    y, p = np.asarray(y), np.asarray(probs, dtype=np.float64)
    if p.shape[1] == 2:
        return binary_auc(y == 1, p[:, 1])
    values = [binary_auc(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(values)) if values else float("nan")


def _resample_indices(y: np.ndarray, n_boot: int, seed: int, stratified: bool) -> np.ndarray:
    """``(n_boot, n)`` indices drawn with replacement (within each class when ``stratified``).

    Stratifying keeps both classes in every resample, so a rank metric is always defined.
    """
    rng = np.random.default_rng(seed)
    n = len(y)
    if not stratified:
        return rng.integers(0, n, size=(n_boot, n))
    parts = [np.flatnonzero(y == c) for c in np.unique(y)]
    return np.concatenate([p[rng.integers(0, len(p), size=(n_boot, len(p)))] for p in parts], axis=1)


def bootstrap_ci(y: np.ndarray, score: np.ndarray, metric: Metric, *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, stratified: bool = True) -> Interval:
    """Percentile bootstrap interval: the (1-level)/2 and (1+level)/2 quantiles of ``metric`` over resamples."""
    y, score = np.asarray(y), np.asarray(score)
    idx = _resample_indices(y, n_boot, seed, stratified)
    values = np.array([metric(y[i], score[i]) for i in idx], dtype=np.float64)
    values = values[np.isfinite(values)]
    alpha = (1.0 - level) / 2.0
    low, high = (np.quantile(values, [alpha, 1.0 - alpha]) if values.size else (np.nan, np.nan))
    return Interval(float(metric(y, score)), float(low), float(high), level)


def paired_bootstrap_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, metric: Metric, *,
                          n_boot: int = 2000, seed: int = 0, stratified: bool = True) -> tuple[float, float]:
    """(observed ``metric(a) - metric(b)``, two-sided p-value) with slides resampled jointly for both models.

    p = min(1, 2 * min(P*(d <= 0), P*(d >= 0))) over the bootstrap distribution of d, with the
    +1 correction ``(count + 1) / (n_boot + 1)`` so that p is never exactly 0.
    """
    y, a, b = np.asarray(y), np.asarray(score_a), np.asarray(score_b)
    idx = _resample_indices(y, n_boot, seed, stratified)
    diffs = np.array([metric(y[i], a[i]) - metric(y[i], b[i]) for i in idx], dtype=np.float64)
    diffs = diffs[np.isfinite(diffs)]
    below = (np.sum(diffs <= 0) + 1) / (diffs.size + 1)
    above = (np.sum(diffs >= 0) + 1) / (diffs.size + 1)
    return float(metric(y, a) - metric(y, b)), float(min(1.0, 2.0 * min(below, above)))


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j).

    psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise. Computed from mid-ranks in O(n log n).
    """
    m, n = len(pos), len(neg)
    all_ranks = _st.rankdata(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = _st.rankdata(pos), _st.rankdata(neg)
    v10 = (all_ranks[:m] - pos_ranks) / n
    v01 = 1.0 - (all_ranks[m:] - neg_ranks) / m
    return v10, v01


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> tuple[float, float, float]:
    """(AUC_a, AUC_b, two-sided p) of DeLong, DeLong & Clarke-Pearson (1988) for correlated AUCs.

    AUC_k = mean(V10_k); var(AUC_a - AUC_b) = c' (S10/m + S01/n) c with c = (1, -1), S10 and S01 the
    2x2 covariance matrices of the placements over positives and negatives; z = diff / sqrt(var).
    """
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("DeLong's test needs both classes among the labels")
    comps = [_placements(np.asarray(s, dtype=np.float64)[y], np.asarray(s, dtype=np.float64)[~y]) for s in (score_a, score_b)]
    v10 = np.stack([c[0] for c in comps])
    v01 = np.stack([c[1] for c in comps])
    aucs = v10.mean(axis=1)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    contrast = np.array([1.0, -1.0])
    var = float(contrast @ (s10 / m + s01 / n) @ contrast)
    diff = float(aucs[0] - aucs[1])
    if var <= 1e-15:
        return float(aucs[0]), float(aucs[1]), 1.0 if abs(diff) < 1e-12 else 0.0
    z = diff / np.sqrt(var)
    return float(aucs[0]), float(aucs[1]), float(2.0 * _st.norm.sf(abs(z)))


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: p_(k) * (m - k + 1), made monotone, capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, p[i] * (m - rank)))
        adjusted[i] = running
    return adjusted.tolist()
