"""ROC figure of a cross-validation run (house style of :mod:`mmpl.plotstyle`, no display).

Binary tasks: every fold's ROC curve thin, their mean (vertical averaging over a common false
positive rate grid, :func:`mean_roc`) bold with a +-1 standard deviation band. Multi-class tasks:
one-vs-rest curves of the pooled out-of-fold predictions, one per class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from mmpl import plotstyle

FPR_GRID = np.linspace(0.0, 1.0, 201)


def interpolate_roc(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """True positive rate of one ROC curve at the false positive rates ``grid``.

    The curve through the points ``(fpr_j, tpr_j)`` joined by straight lines (the ROC of the
    randomised classifiers between two thresholds); where a false positive rate repeats
    (a vertical step), the highest true positive rate at it is taken:
    ``t(x) = max{tpr_j : fpr_j = x}`` at a point's rate, else linear between the neighbouring points.
    """
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    order = np.lexsort((tpr, fpr))  # by fpr, then tpr: np.interp takes the last (highest) of equal rates
    return np.interp(np.asarray(grid, dtype=np.float64), fpr[order], tpr[order])


def mean_roc(curves: Sequence[tuple[np.ndarray, np.ndarray]], grid: np.ndarray = FPR_GRID) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(grid, mean_tpr, sd_tpr)``: the vertical average of K ROC curves.

    ``mean(x) = (1/K) sum_k t_k(x)`` and ``sd(x) = sqrt(sum_k (t_k(x) - mean(x))^2 / (K - 1))``
    (0 for one curve), with ``t_k`` from :func:`interpolate_roc`. The band drawn is
    ``clip(mean +- sd, 0, 1)``.
    """
    grid = np.asarray(grid, dtype=np.float64)
    if not curves:
        raise ValueError("mean_roc needs at least one curve")
    t = np.stack([interpolate_roc(f, r, grid) for f, r in curves])
    sd = t.std(axis=0, ddof=1) if len(t) > 1 else np.zeros(len(grid))
    return grid, t.mean(axis=0), sd


def roc_figure(y_true_per_fold: Sequence[np.ndarray], probs_per_fold: Sequence[np.ndarray], *,
               class_names: Sequence[str] | None = None, title: str = "ROC"):
    """The ROC :class:`~matplotlib.figure.Figure` (see the module docstring)."""
    n_classes = int(np.asarray(probs_per_fold[0]).shape[1])
    names = list(class_names) if class_names else [str(c) for c in range(n_classes)]
    fig, ax = plotstyle.new_figure(5.2, 5.0)
    with plotstyle.apply():
        if n_classes == 2:
            _binary_curves(ax, y_true_per_fold, probs_per_fold, names[1])
        else:
            _one_vs_rest_curves(ax, y_true_per_fold, probs_per_fold, names)
        plotstyle.finish_roc_axes(ax, title, equal=True)
    return fig


def _binary_curves(ax, y_true_per_fold, probs_per_fold, positive: str) -> None:
    from sklearn.metrics import auc as area, roc_curve

    curves = []
    for y, p in zip(y_true_per_fold, probs_per_fold):
        y = np.asarray(y)
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, np.asarray(p)[:, 1])
        curves.append((fpr, tpr))
    aucs = [area(f, t) for f, t in curves]
    if len(curves) == 1:
        ax.plot(*curves[0], color=plotstyle.OKABE_ITO[0], marker="", label=f"positive: {positive} (AUC {aucs[0]:.3f})")
        return
    for k, (fpr, tpr) in enumerate(curves):
        ax.plot(fpr, tpr, color=plotstyle.OKABE_ITO[5], marker="", linestyle="-", lw=0.8, alpha=0.6,
                label=f"{len(curves)} folds (AUC {min(aucs):.3f}-{max(aucs):.3f})" if k == 0 else None)
    if curves:
        grid, mean, sd = mean_roc(curves)
        ax.fill_between(grid, np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), color=plotstyle.OKABE_ITO[0], alpha=0.2,
                        linewidth=0, label="mean +- 1 sd over folds")
        ax.plot(grid, mean, color=plotstyle.OKABE_ITO[0], marker="", linestyle="-", lw=2.2,
                label=f"mean ROC (fold AUC {np.mean(aucs):.3f} +- {np.std(aucs, ddof=1):.3f})")


def _one_vs_rest_curves(ax, y_true_per_fold, probs_per_fold, names) -> None:
    from sklearn.metrics import auc as area, roc_curve

    y = np.concatenate([np.asarray(v) for v in y_true_per_fold])
    p = np.concatenate([np.asarray(v) for v in probs_per_fold])
    for c, name in enumerate(names):
        yc = (y == c).astype(int)
        if 0 < yc.sum() < len(yc):
            fpr, tpr, _ = roc_curve(yc, p[:, c])
            style = plotstyle.series_style(c)
            ax.plot(fpr, tpr, color=style["color"], linestyle=style["linestyle"], marker=style["marker"], markevery=0.1,
                    label=f"{name} vs rest (AUC {area(fpr, tpr):.3f})")


def plot_roc(
    y_true_per_fold: Sequence[np.ndarray],
    probs_per_fold: Sequence[np.ndarray],
    path: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    title: str = "ROC",
) -> Path:
    """Write the ROC PNG (:func:`roc_figure`) to ``path`` (atomically)."""
    return plotstyle.save_figure(roc_figure(y_true_per_fold, probs_per_fold, class_names=class_names, title=title), path)
