"""What a threshold means: chance detection, the tolerance against the test set's noise, p*'s interval.

- A model near chance has no threshold worth reporting: :func:`check_not_chance` stops the run.
- The tolerance of the actual threshold is an accuracy drop; :func:`tolerance_summary` states it in
  points, in test samples, and against the binomial standard error sqrt(a (1 - a) / n) of the dense
  accuracy a on n test samples (one sample is 1/n; a tolerance below one standard error lets the
  first flipped test image decide the threshold).
- :func:`prediction_interval` is the spread of p* over what it is sensitive to: epsilon halved and
  doubled, and the single probes of SLQ.
"""
from __future__ import annotations

import math
from typing import Iterable

from .errors import PruneLimitError


def chance_level(num_classes: int) -> float:
    return 1.0 / max(int(num_classes), 1)


def near_chance(accuracy: float, num_classes: int, margin: float = 0.05) -> bool:
    """True when ``accuracy`` is below chance (1 / classes) + ``margin``."""
    return float(accuracy) < chance_level(num_classes) + float(margin)


def check_not_chance(accuracy: float, num_classes: int, margin: float, lam) -> None:
    """Stop (PruneLimitError, exit 2) for a dense model within ``margin`` of chance: thresholds would mean nothing."""
    if near_chance(accuracy, num_classes, margin):
        raise PruneLimitError(
            f"dense test accuracy {accuracy:.3f} is within {margin * 100:g} points of chance (1/{num_classes} = "
            f"{chance_level(num_classes):.3f}) at lam = {lam:g}: training failed and no threshold would mean anything; "
            "use --lam auto (the default), a smaller --lam, or a smaller --lr")


def binomial_stderr(accuracy: float, n: int) -> float:
    """sqrt(a (1 - a) / n): the standard error of an accuracy measured on n independent samples."""
    if n < 1:
        raise PruneLimitError(f"need at least one test sample, got {n}")
    a = min(max(float(accuracy), 0.0), 1.0)
    return math.sqrt(a * (1.0 - a) / n)


def tolerance_summary(dense_accuracy: float, test_size: int, tolerance: float) -> dict:
    """The tolerance in points and in test samples, next to the dense accuracy's standard error."""
    se = binomial_stderr(dense_accuracy, test_size)
    return {
        "tolerance": float(tolerance),
        "tolerance_points": 100.0 * tolerance,
        "tolerance_samples": tolerance * test_size,
        "test_size": int(test_size),
        "one_sample_points": 100.0 / test_size,
        "dense_accuracy_stderr": se,
        "dense_accuracy_stderr_points": 100.0 * se,
        "tolerance_in_stderr": tolerance / se if se > 0 else math.inf,
    }


def prediction_interval(p_star: float, sensitivity: dict, per_probe: Iterable[float] = ()) -> dict:
    """[min, max] of p* over eps/2, 2 eps and the single probes (p* itself included)."""
    eps_values = [float(v) for v in sensitivity.values() if v is not None]
    probes = [float(v) for v in per_probe]
    values = [float(p_star), *eps_values, *probes]
    return {
        "low": min(values), "high": max(values), "width": max(values) - min(values),
        "eps_low": min([p_star, *eps_values]), "eps_high": max([p_star, *eps_values]),
        "probe_spread": (max(probes) - min(probes)) if probes else 0.0,
    }
