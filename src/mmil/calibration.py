"""Calibrated probabilities and prediction sets that can say "not sure".

Pure functions of arrays (logits or probabilities, labels):

- :func:`fit_temperature` / :func:`apply_temperature`: temperature scaling, softmax(z / T) with T
  minimising the negative log-likelihood on held-out slides (Guo et al., 2017), optionally under a
  log-normal prior on T (a MAP fit for small calibration sets).
- :func:`expected_calibration_error`: ECE with adaptive (equal-mass) bins; :func:`brier_score`.
- :func:`conformal_threshold` / :func:`prediction_sets`: split-conformal sets with the score
  s(x, y) = 1 - p_y(x) and, with ``mondrian=True``, one threshold per class (class-conditional coverage).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax


def _check(logits: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, C) array, got shape {logits.shape}")
    if y is not None:
        y = np.asarray(y, dtype=np.int64)
        if y.shape != (logits.shape[0],) or y.min() < 0 or y.max() >= logits.shape[1]:
            raise ValueError("labels must be one class index in 0..C-1 per row")
    return logits, y


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood -1/n sum_i log softmax(z_i / T)[y_i]."""
    logits, y = _check(logits, y)
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0), prior_std: float | None = None) -> float:
    """T* = argmin_T  n NLL(z / T) + (log T)^2 / (2 sigma^2)  over ``bounds``, searched on log T.

    ``prior_std`` sigma: the maximum a posteriori T under the prior log T ~ N(0, sigma^2), which keeps
    T near 1 when a few held-out slides say little (a perfectly separated validation set drives the
    maximum-likelihood T to its lower bound and the test probabilities to 0/1); ``None``: maximum likelihood.
    """
    logits, y = _check(logits, y)
    n = len(y)
    penalty = 0.0 if prior_std is None else 1.0 / (2.0 * prior_std ** 2)
    result = minimize_scalar(lambda log_t: n * nll(logits, y, math.exp(log_t)) + penalty * log_t ** 2,
                             bounds=tuple(math.log(b) for b in bounds), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(z / T)."""
    logits, _ = _check(logits)
    return softmax(logits / temperature, axis=1)


def probs_to_logits(probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """log p: logits up to a per-row constant (enough for softmax and temperature scaling)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0))


def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score 1/n sum_i sum_k (p_ik - 1[y_i = k])^2."""
    probs, y = _check(probs, y)
    onehot = np.eye(probs.shape[1])[y]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Top-label ECE with adaptive bins: sum_b |B_b|/n * |acc(B_b) - conf(B_b)|.

    Slides are sorted by confidence max_k p_ik and cut into ``n_bins`` bins of (nearly) equal count,
    so every bin holds evidence even when most confidences sit near 1.
    """
    probs, y = _check(probs, y)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for part in np.array_split(order, min(n_bins, len(order))):
        total += len(part) * abs(correct[part].mean() - conf[part].mean())
    return float(total / len(order))


def conformal_scores(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-conformity of the true class: s_i = 1 - p_i[y_i]."""
    probs, y = _check(probs, y)
    return 1.0 - probs[np.arange(len(y)), y]


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """q = the ceil((n+1)(1-alpha))-th smallest score (inf when that exceeds n): split-conformal's threshold.

    For exchangeable calibration and test slides, P(s_test <= q) >= 1 - alpha.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(scores) + 1) * (1.0 - alpha))
    return float("inf") if k > len(scores) else float(scores[k - 1])


def conformal_threshold(probs: np.ndarray, y: np.ndarray, alpha: float, mondrian: bool = False) -> np.ndarray:
    """Per-class thresholds q_k (all equal unless ``mondrian``, where q_k uses class-k slides only)."""
    probs, y = _check(probs, y)
    scores = conformal_scores(probs, y)
    n_classes = probs.shape[1]
    if not mondrian:
        return np.full(n_classes, conformal_quantile(scores, alpha))
    return np.array([conformal_quantile(scores[y == k], alpha) if np.any(y == k) else float("inf") for k in range(n_classes)])


def prediction_sets(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Boolean (n, C): class k is in slide i's set when 1 - p_ik <= q_k."""
    probs, _ = _check(probs)
    return (1.0 - probs) <= np.asarray(thresholds)[None, :]


def set_metrics(sets: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Empirical coverage P(y in set), mean set size, and abstention rate P(|set| != 1)."""
    sets, y = np.asarray(sets, dtype=bool), np.asarray(y, dtype=np.int64)
    size = sets.sum(axis=1)
    return {"coverage": float(sets[np.arange(len(y)), y].mean()), "mean_set_size": float(size.mean()),
            "abstention_rate": float((size != 1).mean())}
