"""The predicted pruning limit: epsilon + spectrum (+ p0, trace) -> p*, its sensitivity to epsilon, the regime.

:func:`predict_limit` is the one place a prediction is made: the `prunelimit` pipeline's predict
step and ``mmil.pruning.prune_limit`` both call it (docs/method/prunelimit.md §3 and §6).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .geometry import (
    LOMP_MIN_SHARE, as_weights, check_eps, check_p0, gaussian_width_ratio, lomp_regime, radius_curve, solve_threshold,
    spectral_measure, threshold_sensitivity, trace_bound, trace_value,
)

__all__ = ["ThresholdPrediction", "predict_limit", "predict_threshold"]


@dataclass
class ThresholdPrediction:
    """The predicted pruning limit and the numbers behind it (ratios = removed fractions)."""

    predicted_ratio: float  # p*: fraction of prunable weights that can be removed
    kept_fraction: float  # 1 - p*
    radius: float  # R(p*)
    residual: float  # |G(R(p*)) - p*|
    epsilon: float
    p0: float
    dim: int
    trace: float | None = None
    trace_bound: float | None = None  # root of p = 2eps / (2eps + R(p)^2 Tr/D)
    sensitivity: dict[str, float] = field(default_factory=dict)  # p* at eps/2 and 2 eps
    near_zero_fraction: float = 0.0
    in_lomp_regime: bool = True
    lomp_message: str = ""
    p_grid: np.ndarray = field(default_factory=lambda: np.zeros(0))
    R_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))  # R(p_grid)
    G_curve: np.ndarray = field(default_factory=lambda: np.zeros(0))  # G(R(p_grid))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("p_grid", "R_curve", "G_curve"):
            out[key] = np.asarray(out[key], dtype=np.float64).tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ThresholdPrediction":
        d = dict(d)
        for key in ("p_grid", "R_curve", "G_curve"):
            d[key] = np.asarray(d.get(key, []), dtype=np.float64)
        return cls(**d)


def predict_limit(weights_or_model, epsilon: float, spectrum, *, p0: float = 0.0, trace=None, params=None,
                  regime_tol: float = 1e-3, regime_min_share: float = LOMP_MIN_SHARE,
                  sensitivity_factors: Sequence[float] = (0.5, 2.0), num_grid: int = 201) -> ThresholdPrediction:
    """Predicted one-shot pruning limit p*: the root of G(R(p)) = p (see :mod:`prunelimit.geometry`).

    - weights_or_model: numpy vector, tensor(s) or a model (its prunable weights, or `params`).
    - spectrum: SpectrumEstimate, (nodes, weights) pair, or 1-D exact eigenvalues.
    - p0: null mass from Hessian rows (0 to ignore). trace: float or TraceEstimate for the trace bound.
    - regime_tol, regime_min_share: the LOMP-regime check (:func:`~prunelimit.geometry.lomp_regime`):
      the share of weights with |w| < regime_tol must reach regime_min_share * p*.

    Also returns p* at eps * sensitivity_factors and the curves p_grid, R_curve = R(p_grid),
    G_curve = G(R_curve) for plotting.
    """
    w = as_weights(weights_or_model, params)
    eps = check_eps(epsilon)
    p0 = check_p0(p0)
    curve = radius_curve(w)
    measure = spectral_measure(spectrum)[:2]
    p_star = solve_threshold(curve, measure, eps, p0)
    radius = float(curve(p_star))
    residual = abs(gaussian_width_ratio(radius, measure, eps, p0) - p_star)
    tr = None if trace is None else trace_value(trace)
    bound = None if tr is None else trace_bound(curve, tr, eps)
    sens = threshold_sensitivity(curve, eps, measure, p0, sensitivity_factors)
    regime = lomp_regime(w, p_star, regime_tol, regime_min_share)
    p_grid = np.linspace(0.0, 1.0, num_grid)
    R_curve = curve(p_grid)
    G_curve = gaussian_width_ratio(R_curve, measure, eps, p0)
    return ThresholdPrediction(
        predicted_ratio=p_star, kept_fraction=1.0 - p_star, radius=radius, residual=float(residual),
        epsilon=eps, p0=p0, dim=curve.dim, trace=tr, trace_bound=bound, sensitivity=sens,
        near_zero_fraction=regime.near_zero_fraction, in_lomp_regime=regime.in_regime,
        lomp_message=regime.message, p_grid=p_grid, R_curve=np.asarray(R_curve), G_curve=np.asarray(G_curve),
    )


def predict_threshold(weights_or_model, epsilon: float, spectrum, p0: float = 0.0, trace=None, params=None, *,
                      num_grid: int = 201, lomp_tol: float = 1e-3,
                      sensitivity_factors: Sequence[float] = (0.5, 2.0)) -> ThresholdPrediction:
    """:func:`predict_limit` under its stable-API name (p0, trace and params also positional)."""
    return predict_limit(weights_or_model, epsilon, spectrum, p0=p0, trace=trace, params=params, regime_tol=lomp_tol,
                         sensitivity_factors=sensitivity_factors, num_grid=num_grid)
