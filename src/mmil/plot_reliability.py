"""Reliability diagram of a cross-validation run (matplotlib, no display): accuracy against confidence
in adaptive (equal-count) bins of the pooled out-of-fold predictions, before and after temperature scaling."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from mmpl import plotstyle

from .calibration import expected_calibration_error


def reliability_points(probs: np.ndarray, y: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per adaptive bin: mean confidence, accuracy and count (the bins of :func:`expected_calibration_error`)."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(np.float64)
    parts = np.array_split(np.argsort(conf, kind="stable"), min(n_bins, len(conf)))
    return (np.array([conf[p].mean() for p in parts]), np.array([correct[p].mean() for p in parts]),
            np.array([len(p) for p in parts]))


def reliability_figure(y_per_fold: Sequence[np.ndarray], probs_before: Sequence[np.ndarray], probs_after: Sequence[np.ndarray] | None,
                       *, title: str = "reliability", n_bins: int = 10):
    """The reliability diagram :class:`~matplotlib.figure.Figure`; ``probs_after`` ``None`` draws the raw curve only."""
    y = np.concatenate([np.asarray(v) for v in y_per_fold])
    curves = [("uncalibrated", np.concatenate([np.asarray(p) for p in probs_before]))]
    if probs_after is not None:
        curves.append(("temperature-scaled", np.concatenate([np.asarray(p) for p in probs_after])))
    fig, ax = plotstyle.new_figure(5.2, 5.0)
    with plotstyle.apply():
        for i, (label, probs) in enumerate(curves):
            conf, acc, _ = reliability_points(probs, y, n_bins)
            ax.plot(conf, acc, **plotstyle.series_style(i), label=f"{label} (ECE {expected_calibration_error(probs, y, n_bins):.3f})")
        low = 1.0 / curves[0][1].shape[1]
        ax.plot([low, 1], [low, 1], **plotstyle.REFERENCE, label="perfect calibration")
        ax.set_xlim(low - 0.02, 1.01)
        ax.set_ylim(0, 1.01)
        ax.set_xlabel(f"confidence (max class probability; {n_bins} equal-count bins)")
        ax.set_ylabel("accuracy (fraction correct)")
        ax.set_title(title)
        ax.legend(loc="upper left")
    return fig


def plot_reliability(y_per_fold: Sequence[np.ndarray], probs_before: Sequence[np.ndarray], probs_after: Sequence[np.ndarray] | None,
                     path: str | Path, *, title: str = "reliability", n_bins: int = 10) -> Path:
    """Write the reliability diagram PNG (:func:`reliability_figure`) to ``path`` (atomically)."""
    return plotstyle.save_figure(reliability_figure(y_per_fold, probs_before, probs_after, title=title, n_bins=n_bins), path)
