"""The geometry of the pruning limit: R(p), G(R), the root p* of G(R(p)) = p, and the LOMP regime.

Pure functions of numpy arrays (a model is accepted only as a source of weights). The whole
prediction (p*, its sensitivity to eps, the trace bound, the regime check) is
:func:`prunelimit.prediction.predict_limit`; docs/method/prunelimit.md §1 and §3 state the method.

- Pruning ratio p = fraction of the D prunable weights removed; k = ceil((1-p) D) are kept,
  so floor(p D) (up to rounding guards) are removed: `num_removed`.
- R(p) = ||w* - w^k||_2 = sqrt(sum of squares of the (D - k) smallest |w_i|): one sort plus a
  cumulative sum gives it for every p (`radius_curve`).
- G(R) = (1/D) sum_i 2 eps / (2 eps + |lambda_i| R^2): the statistical dimension (as a
  fraction of D) of the loss sublevel set {L <= L* + eps}, an ellipsoid with semi-axes
  sqrt(2 eps / |lambda_i|), seen from distance R. With SLQ Ritz values theta_j and weights tau_j
  per probe: G(R) ~= p0 + (1 - p0) * mean_probes sum_j tau_j 2 eps / (2 eps + |theta_j| R^2).
- Predicted threshold p*: the root of G(R(p)) = p. G decreases in R and R increases in p, so
  G(R(p)) - p is decreasing and the root is unique; it is found by bisection on the number of
  removed weights with the exact R(p).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import PruneLimitError
from .lanczos import tridiag_ritz

__all__ = [
    "num_removed",
    "sorted_sq_cumsum",
    "radius_at",
    "radius_curve",
    "RadiusCurve",
    "spectral_measure",
    "gaussian_width_ratio",
    "solve_threshold",
    "threshold_sensitivity",
    "trace_bound",
    "lomp_regime_fraction",
    "lomp_regime_check",
    "lomp_regime",
    "LOMP_MIN_SHARE",
    "LOMP_MISS_LIMIT",
    "LompRegime",
    "ThresholdConvergence",
]


def as_weights(weights_or_model, params=None) -> np.ndarray:
    if isinstance(weights_or_model, np.ndarray):
        w = np.asarray(weights_or_model, dtype=np.float64).reshape(-1)
    else:
        from .params import weights_vector  # torch only when a model/tensor is given

        w = weights_vector(weights_or_model, params)
    if w.size == 0:
        raise PruneLimitError("no weights given")
    if not np.isfinite(w).all():
        raise PruneLimitError("weights contain NaN or inf")
    return w


def num_removed(ratio, dim: int):
    """Number of weights removed at pruning ratio p: D - k with k = ceil((1-p) D) kept.

    A guard of 1e-9 (relative) absorbs floating error, so p = 0.3, D = 10 keeps 7, not 8.
    Vectorised over `ratio`; returns int or an int64 array.
    """
    p = np.asarray(ratio, dtype=np.float64)
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise PruneLimitError(f"pruning ratio must be in [0, 1], got {ratio}")
    x = (1.0 - p) * dim
    kept = np.ceil(x - 1e-9 * np.maximum(1.0, x)).astype(np.int64)
    removed = np.clip(dim - kept, 0, dim)
    return int(removed) if removed.ndim == 0 else removed


def sorted_sq_cumsum(weights) -> np.ndarray:
    """c with c[r] = sum of squares of the r smallest |w_i| (c[0] = 0, length D + 1), float64."""
    w = as_weights(weights)
    return np.concatenate([[0.0], np.cumsum(np.sort(w * w))])


def radius_at(ratio, sq_cumsum: np.ndarray):
    """R(p) = sqrt(c[num_removed(p, D)]) for the cumulative sums of `sorted_sq_cumsum`."""
    dim = len(sq_cumsum) - 1
    r = num_removed(ratio, dim)
    return np.sqrt(sq_cumsum[r])


@dataclass(frozen=True)
class RadiusCurve:
    """R(p) for every p from one sort: `curve(p)` (vectorised), `curve.dim`, `curve.radius_of_removed(r)`."""

    sq_cumsum: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.sq_cumsum) - 1

    def __call__(self, ratio):
        return radius_at(ratio, self.sq_cumsum)

    def radius_of_removed(self, removed):
        return np.sqrt(self.sq_cumsum[np.asarray(removed)])


def radius_curve(weights) -> RadiusCurve:
    """The exact R(p) = ||w - w^k||_2 as a callable (weights: array, tensor, list of tensors or model)."""
    return RadiusCurve(sorted_sq_cumsum(weights))


def spectral_measure(spectrum) -> tuple[np.ndarray, np.ndarray, bool]:
    """(nodes, weights, is_exact): nodes/weights of shape (probes, m), each probe's weights summing to 1.

    `spectrum` is one of: an object with `.nodes` and `.weights` (a SpectrumEstimate);
    a tuple (nodes, weights) of equal-shaped arrays, 1-D or (probes, m); a 1-D array (or list of
    numbers) of exact eigenvalues, each with weight 1/D.
    """
    if hasattr(spectrum, "nodes") and hasattr(spectrum, "weights"):
        nodes, weights, exact = spectrum.nodes, spectrum.weights, False
    elif isinstance(spectrum, tuple) and len(spectrum) == 2 and all(np.ndim(s) >= 1 for s in spectrum):
        nodes, weights, exact = spectrum[0], spectrum[1], False
    else:
        nodes = np.asarray(_to_numpy(spectrum), dtype=np.float64)
        if nodes.ndim != 1 or nodes.size == 0:
            raise PruneLimitError(
                "spectrum must be a SpectrumEstimate, a (nodes, weights) pair or a non-empty 1-D array of eigenvalues"
            )
        weights, exact = np.full(nodes.shape, 1.0 / nodes.size), True
    nodes = np.atleast_2d(np.asarray(_to_numpy(nodes), dtype=np.float64))
    weights = np.atleast_2d(np.asarray(_to_numpy(weights), dtype=np.float64))
    if nodes.shape != weights.shape or nodes.size == 0:
        raise PruneLimitError(f"spectrum nodes {nodes.shape} and weights {weights.shape} must have one shape")
    if not (np.isfinite(nodes).all() and np.isfinite(weights).all()) or (weights < 0).any():
        raise PruneLimitError("spectrum has non-finite nodes/weights or negative weights")
    totals = weights.sum(axis=1, keepdims=True)
    if (totals <= 0).any():
        raise PruneLimitError("a probe of the spectrum has zero total weight")
    return nodes, weights / totals, exact


def _to_numpy(x):
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def check_eps(epsilon: float) -> float:
    eps = float(epsilon)
    if not math.isfinite(eps) or eps <= 0:
        raise PruneLimitError(f"epsilon must be a positive finite number, got {epsilon}")
    return eps


def check_p0(p0: float) -> float:
    p0 = float(p0)
    if not 0.0 <= p0 <= 1.0:
        raise PruneLimitError(f"p0 (null mass) must be in [0, 1], got {p0}")
    return p0


def gaussian_width_ratio(R, spectrum, epsilon: float, p0: float = 0.0):
    """G(R) = p0 + (1 - p0) * mean_probes sum_j tau_j * 2 eps / (2 eps + |theta_j| R^2).

    For exact eigenvalues (tau_j = 1/D, one "probe") and p0 = 0 this is
    G(R) = (1/D) sum_i 2 eps / (2 eps + |lambda_i| R^2). Vectorised over R (any shape);
    returns a float for scalar R.
    """
    eps = check_eps(epsilon)
    p0 = check_p0(p0)
    nodes, weights, _ = spectral_measure(spectrum)
    R = np.asarray(R, dtype=np.float64)
    lam = np.abs(nodes).reshape(-1)
    tau = (weights / nodes.shape[0]).reshape(-1)  # mean over probes folded into the weights
    r2 = (R * R).reshape(-1)
    out = np.empty_like(r2)
    chunk = max(1, int(4_000_000 // max(1, lam.size)))
    two_eps = 2.0 * eps
    for s in range(0, r2.size, chunk):
        out[s : s + chunk] = (two_eps / (two_eps + r2[s : s + chunk, None] * lam[None, :])) @ tau
    g = p0 + (1.0 - p0) * out
    g = g.reshape(R.shape)
    return float(g) if g.ndim == 0 else g


def solve_threshold(curve: RadiusCurve, spectrum, epsilon: float, p0: float = 0.0) -> float:
    """p* = the root of G(R(p)) = p, by bisection on the number of removed weights r.

    R(p) is the step function sqrt(c[r(p)]), so h(r) = G(R_r) - r/D is decreasing in r with
    h(0) = 1 > 0. With r* the largest r where h(r) >= 0, G(R(p)) - p vanishes or changes sign in
    [r*/D, (r*+1)/D): p* = min(G(R_{r*}), (r*+1)/D), and p* = 1 if h(D) >= 0.
    """
    nodes, weights, _ = spectral_measure(spectrum)
    measure = (nodes, weights)
    D = curve.dim

    def g_at(r: int) -> float:
        return gaussian_width_ratio(float(curve.radius_of_removed(r)), measure, epsilon, p0)

    if g_at(D) >= 1.0:
        return 1.0
    lo, hi = 0, D  # h(lo) >= 0 > h(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g_at(mid) - mid / D >= 0:
            lo = mid
        else:
            hi = mid
    return float(min(g_at(lo), (lo + 1) / D))


def trace_value(trace) -> float:
    """A float, or the `.mean` of a TraceEstimate."""
    if hasattr(trace, "stderr") and hasattr(trace, "mean"):
        trace = trace.mean
    try:
        return float(trace)
    except (TypeError, ValueError):
        raise PruneLimitError(f"trace must be a number or a TraceEstimate, got {type(trace).__name__}") from None


def trace_bound(curve: RadiusCurve, trace: float, epsilon: float) -> float | None:
    """The sharpness (trace) form: the root of p = 2 eps / (2 eps + R(p)^2 Tr(H) / D).

    It is G with every |lambda_i| replaced by the mean eigenvalue Tr(H)/D; by Jensen (the summand
    is convex in |lambda|) it is a lower bound on p* when H is positive semi-definite. None when
    Tr(H) <= 0 (the form is undefined).
    """
    tr = trace_value(trace)
    if not math.isfinite(tr):
        raise PruneLimitError(f"trace must be finite, got {tr}")
    if tr <= 0:
        return None
    return solve_threshold(curve, np.array([tr / curve.dim]), epsilon, 0.0)


def threshold_sensitivity(weights_or_curve, epsilon: float, spectrum, p0: float = 0.0,
                          factors: Sequence[float] = (0.5, 2.0)) -> dict[str, float]:
    """p* recomputed at epsilon * f for each factor f: {"eps*0.5": p*, "eps*2": p*}."""
    curve = weights_or_curve if isinstance(weights_or_curve, RadiusCurve) else radius_curve(weights_or_curve)
    return {f"eps*{f:g}": solve_threshold(curve, spectrum, epsilon * f, p0) for f in factors}


@dataclass
class LompRegime:
    """Whether a prediction sits in the LOMP regime (docs/method/prunelimit.md §6): many weights already near zero."""

    near_zero_fraction: float
    tol: float
    predicted_ratio: float | None
    in_regime: bool
    message: str


def lomp_regime_fraction(weights, tol: float = 1e-3) -> float:
    """Fraction of prunable weights with |w_i| < tol."""
    w = as_weights(weights)
    return float(np.mean(np.abs(w) < tol))


# The regime check as calibrated by the study of docs/fidelity.md (42 runs): every run with
# |predicted - actual| > 0.05 had a near-zero share below 0.62 p*, so the default factor is 0.7; the
# warned runs missed the actual threshold by up to LOMP_MISS_LIMIT.
LOMP_MIN_SHARE = 0.7
LOMP_MISS_LIMIT = 0.38


def lomp_regime_check(near_zero_fraction: float, predicted_ratio: float | None = None,
                      min_share: float = LOMP_MIN_SHARE) -> bool:
    """Inside the LOMP regime when near_zero_fraction >= min_share * p* (with p* given), else >= min_share.

    near_zero_fraction is the share of prunable weights with |w| < tol (1e-3). With the default
    min_share = 0.7 this flags every run of docs/fidelity.md whose |predicted - actual| exceeded 0.05.
    """
    return bool(near_zero_fraction >= lomp_regime_need(predicted_ratio, min_share))


def lomp_regime_need(predicted_ratio: float | None = None, min_share: float = LOMP_MIN_SHARE) -> float:
    """The near-zero share the LOMP regime needs: ``min_share * p*`` (``min_share`` without p*)."""
    return min_share * (predicted_ratio if predicted_ratio is not None else 1.0)


def lomp_regime(weights, predicted_ratio: float | None = None, tol: float = 1e-3,
                min_share: float = LOMP_MIN_SHARE) -> LompRegime:
    """Is the prediction being made inside the LOMP regime?

    The second-order prediction was only seen to hold when l1 training had already driven most
    of the weights that the prediction removes close to zero (docs/method/prunelimit.md §6 and the
    study docs/fidelity.md). Criterion: :func:`lomp_regime_check`. The one regime check: the
    pipeline, mmil and :func:`~prunelimit.prediction.predict_limit` all come here.
    """
    frac = lomp_regime_fraction(weights, tol)
    need = lomp_regime_need(predicted_ratio, min_share)
    ok = lomp_regime_check(frac, predicted_ratio, min_share)
    if ok:
        msg = f"{frac:.1%} of prunable weights have |w| < {tol:g}: inside the LOMP regime"
    else:
        msg = (
            f"only {frac:.1%} of prunable weights have |w| < {tol:g} (need >= {need:.1%}): outside the LOMP "
            f"regime, where the predicted threshold is unreliable: in docs/fidelity.md, runs like this missed the "
            f"actual threshold by up to {LOMP_MISS_LIMIT:.2f}; train with a larger l1 lambda (--lam auto)"
        )
    return LompRegime(frac, float(tol), predicted_ratio, bool(ok), msg)


class ThresholdConvergence:
    """Stop rule for SLQ: end a probe's Lanczos run once p* has converged in the number of steps.

    At checkpoints m_0 = min_steps, m_{k+1} = ceil(growth * m_k) the Ritz quadrature of T_{m_k}
    gives p*_k and p* at eps/2 and 2 eps; the run stops when
    |p*_k - p*_{k-1}| < max(tol, rel_tol * width_k), width_k = |p*(eps/2) - p*(2 eps)| at m_k:
    a change well inside p*'s own sensitivity interval no longer matters (docs/method/prunelimit.md
    §3.2). Geometric checkpoints, because the bias from unresolved near-zero eigenvalues shrinks
    slowly: a fixed small increment can look converged while p* is still drifting.
    ``max_seconds`` is a time budget shared by all probes (each gets what the earlier ones left,
    split evenly over the probes still to run): a probe over its share stops at once.
    Pass an instance as `slq(..., stop_when=...)`; `history` keeps (m_k, p*_k, width_k) per probe and
    `reasons` why each probe stopped ("converged", "time budget", or None: ran to its step cap).
    """

    def __init__(self, weights, epsilon: float, p0: float = 0.0, tol: float = 0.005,
                 min_steps: int = 50, growth: float = 2.0, *, rel_tol: float = 0.0,
                 max_seconds: float | None = None, num_probes: int = 1):
        if growth <= 1.0 or min_steps < 1:
            raise PruneLimitError(f"need growth > 1 and min_steps >= 1, got {growth}, {min_steps}")
        self.curve = weights if isinstance(weights, RadiusCurve) else radius_curve(weights)
        self.epsilon, self.p0 = check_eps(epsilon), check_p0(p0)
        self.tol, self.min_steps, self.growth = float(tol), int(min_steps), float(growth)
        self.rel_tol, self.max_seconds, self.num_probes = float(rel_tol), max_seconds, max(int(num_probes), 1)
        self.history: list[list[tuple[int, float, float]]] = []
        self.reasons: list[str | None] = []
        self._next = self.min_steps
        self._start = self._probe_deadline = None

    def reset(self) -> None:
        now = time.perf_counter()
        self._start = now if self._start is None else self._start
        if self.max_seconds is not None:
            left = self.max_seconds - (now - self._start)
            self._probe_deadline = now + left / max(self.num_probes - len(self.history), 1)
        self.history.append([])
        self.reasons.append(None)
        self._next = self.min_steps

    def __call__(self, alpha: np.ndarray, beta: np.ndarray) -> bool:
        if not self.history:
            self.reset()
        k = len(alpha)
        if self._probe_deadline is not None and time.perf_counter() > self._probe_deadline:
            self.reasons[-1] = "time budget"
            return True
        if k < self._next:
            return False
        self._next = max(k + 1, int(math.ceil(self._next * self.growth)))
        measure = tridiag_ritz(alpha, beta[: k - 1])
        p = solve_threshold(self.curve, measure, self.epsilon, self.p0)
        width = 0.0
        if self.rel_tol > 0:
            ends = [solve_threshold(self.curve, measure, self.epsilon * f, self.p0) for f in (0.5, 2.0)]
            width = abs(ends[1] - ends[0])
        runs = self.history[-1]
        runs.append((k, p, width))
        if len(runs) >= 2 and abs(runs[-1][1] - runs[-2][1]) < max(self.tol, self.rel_tol * width):
            self.reasons[-1] = "converged"
            return True
        return False
