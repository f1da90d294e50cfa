"""Reliability diagram of a cross-validation run (matplotlib, no display): accuracy against confidence
in adaptive (equal-count) bins of the pooled out-of-fold predictions, before and after temperature scaling."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from mmpl.fsio import atomic_path

from .calibration import expected_calibration_error


def reliability_points(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per adaptive bin: mean confidence, accuracy and count (the bins of :func:`expected_calibration_error`)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(np.float64)
    parts = np.array_split(np.argsort(conf, kind="stable"), min(n_bins, len(conf)))
    return (np.array([conf[p].mean() for p in parts]), np.array([correct[p].mean() for p in parts]),
            np.array([len(p) for p in parts]))


def plot_reliability(y_per_fold: Sequence[np.ndarray], probs_before: Sequence[np.ndarray], probs_after: Sequence[np.ndarray] | None,
                     path: str | Path, *, title: str = "reliability", n_bins: int = 10) -> Path:
    """Write the reliability diagram PNG to ``path`` (atomically); ``probs_after`` ``None`` draws the raw curve only."""
    from matplotlib.figure import Figure

    y = np.concatenate([np.asarray(v) for v in y_per_fold])
    curves = [("uncalibrated", np.concatenate([np.asarray(p) for p in probs_before]), "o-")]
    if probs_after is not None:
        curves.append(("temperature-scaled", np.concatenate([np.asarray(p) for p in probs_after]), "s-"))
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    for label, probs, style in curves:
        conf, acc, _ = reliability_points(probs, y, n_bins)
        ax.plot(conf, acc, style, lw=1.5, ms=4, label=f"{label} (ECE {expected_calibration_error(probs, y, n_bins):.3f})")
    low = 1.0 / curves[0][1].shape[1]
    ax.plot([low, 1], [low, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    ax.set_xlim(low - 0.02, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(f"confidence (max probability), {n_bins} equal-count bins")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
