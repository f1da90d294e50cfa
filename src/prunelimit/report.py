"""Plots of a run: Hessian spectrum, G(R) against R(p) with the crossing, accuracy/loss against the
kept fraction ``1 - p`` on a log axis (:func:`kept_fraction`, :func:`kept_axis`; also used by
``prunelimit compare``).

Drawn in the house style (:mod:`mmpl.plotstyle`: Agg canvas, no pyplot), each PNG written
atomically; every ``plot_*`` has a ``*_figure`` twin that returns the figure. Inputs are the records of spectrum.json, prediction.json and actual.json.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from mmpl import plotstyle

PREDICTED_STYLE = plotstyle.PREDICTED
ACTUAL_STYLE = plotstyle.ACTUAL
RELEASED_STYLE = plotstyle.RELEASED


def _figure(width: float = 6.4, height: float = 4.2, ncols: int = 1):
    return plotstyle.new_figure(width, height, ncols=ncols)


def _save(fig, path: Path) -> None:
    plotstyle.save_figure(fig, path)


def kept_fraction(ratios, floor: float | None = None) -> np.ndarray:
    """The kept fraction ``k = 1 - p`` of pruning ratios ``p``, for a log axis.

    A ratio that keeps nothing (``k <= 0``) cannot sit on a log axis: it is drawn at ``floor``
    (default: half the smallest positive kept fraction, or 1e-4 when there is none).
    """
    k = 1.0 - np.asarray(ratios, dtype=np.float64)
    if floor is None:
        positive = k[k > 0]
        floor = 0.5 * float(positive.min()) if positive.size else 1e-4
    return np.where(k > 0, k, floor)


def kept_axis(ax, what: str = "prunable weights", ticks=None) -> None:
    """Log-scaled kept-fraction x axis, in percent, pruning growing to the right
    (``ticks``: kept fractions to label instead of the decades)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_xscale("log")
    if not ax.xaxis_inverted():
        ax.invert_xaxis()
    if ticks is not None:
        ax.xaxis.set_major_locator(FixedLocator(sorted(float(t) for t in ticks)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda k, _: f"{100 * k:.3g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"kept fraction 1 - p of {what} (log scale)")


def spectrum_density(nodes: np.ndarray, weights: np.ndarray, num_points: int = 2000, bandwidth: float = 1 / 200):
    """(grid, density): the SLQ density (:func:`~prunelimit.estimators.spectral_density`) over the
    spectral range, sigma = bandwidth * (spectral range); for display only (the prediction always
    uses the raw Ritz values and weights)."""
    from .estimators import spectral_density

    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    keep = weights > 0
    lo, hi = float(nodes[keep].min()), float(nodes[keep].max())
    span = max(hi - lo, 1e-12 * max(1.0, abs(hi)))
    grid = np.linspace(lo - 0.05 * span, hi + 0.05 * span, num_points)
    return grid, spectral_density(nodes, weights, grid, bandwidth * span)


def spectrum_figure(spectrum_record: dict):
    """Smoothed SLQ eigenvalue density of the Hessian, log-scaled y."""
    spec = spectrum_record["spectrum"]
    grid, density = spectrum_density(np.asarray(spec["nodes"]), np.asarray(spec["weights"]))
    fig, ax = _figure()
    with plotstyle.apply():
        ax.semilogy(grid, np.maximum(density, 1e-12), color=plotstyle.OKABE_ITO[0], marker="", lw=1.2)
        ax.set_xlabel("Hessian eigenvalue (loss curvature, per unit weight squared)")
        ax.set_ylabel("density (SLQ, smoothed for display)")
        ax.set_ylim(bottom=max(1e-8, float(density.max()) * 1e-10))
        ax.set_title(f"Hessian spectrum: m = {spectrum_record['lanczos_steps']} Lanczos steps, "
                     f"{spectrum_record['probes']} probe(s), D = {spectrum_record['num_prunable']}", fontsize=10)
    return fig


def plot_spectrum(path: Path, spectrum_record: dict) -> None:
    _save(spectrum_figure(spectrum_record), path)


def gaussian_width_figure(prediction: dict, actual: dict | None):
    """Left: G(R(p)) and the line p against p, crossing at p*. Right: G(R) and p(R) against R."""
    p, R, G = (np.asarray(prediction[k]) for k in ("p_grid", "R_curve", "G_curve"))
    p_star, r_star = prediction["predicted_threshold"], prediction["radius"]
    fig, (left, right) = _figure(11.0, 4.4, ncols=2)
    with plotstyle.apply():
        left.plot(p, G, color=plotstyle.OKABE_ITO[0], marker="", label="G(R(p))")
        left.plot(p, p, color="black", marker="", lw=0.8, label="p")
        left.plot([p_star], [p_star], "o", color=PREDICTED_STYLE["color"], zorder=5)
        left.axvline(p_star, **PREDICTED_STYLE, label=f"predicted p* = {p_star:.3f}")
        if actual is not None:
            left.axvline(actual["threshold"], **ACTUAL_STYLE, label=f"actual = {actual['threshold']:.3f}")
        left.set_xlabel("pruning ratio p (fraction of prunable weights removed)")
        left.set_ylabel("G(R(p))  and  p (fractions)")
        lo = _zoom_floor(p_star, None if actual is None else actual["threshold"])
        left.set_xlim(lo, 1)
        left.set_ylim(lo, 1.005)
        left.legend(loc="lower left")
        left.set_title("predicted threshold: G(R(p)) = p", fontsize=10)

        order = np.argsort(R, kind="stable")
        right.plot(R[order], G[order], color=plotstyle.OKABE_ITO[0], marker="", label="G(R) (sublevel-set width)")
        right.plot(R, p, color=plotstyle.OKABE_ITO[4], marker="", linestyle="--", label="p(R): ratio with pruning distance R")
        right.plot([r_star], [p_star], "o", color=PREDICTED_STYLE["color"], zorder=5, label=f"crossing R(p*) = {r_star:.3g}")
        right.set_xlabel("pruning distance R = ||w - w^k||_2 (weight units)")
        right.set_ylabel("fraction")
        if r_star > 0:
            right.set_xlim(0, min(float(R.max()), 4 * r_star) * 1.02)
        right.set_ylim(0, 1.02)
        right.legend(loc="center right")
        right.set_title("G(R) against the actual R(p) of the trained weights", fontsize=10)
    return fig


def plot_gaussian_width(path: Path, prediction: dict, actual: dict | None) -> None:
    _save(gaussian_width_figure(prediction, actual), path)


def _zoom_floor(*ratios: float | None) -> float:
    """Left edge of a zoom that shows the thresholds with some context."""
    known = [r for r in ratios if r is not None]
    return max(0.0, min(known) - 0.15) if known else 0.0


def accuracy_curve(actual: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ratios, accuracies, losses) of the search plus the extra points past it, sorted by ratio."""
    points = {float(r): (float(a), float(l)) for r, a, l in zip(actual["ratios"], actual["accuracies"], actual["losses"])}
    extra = actual.get("beyond") or {}
    for r, a, l in zip(extra.get("ratios", []), extra.get("accuracies", []), extra.get("losses", [])):
        points.setdefault(float(r), (float(a), float(l)))
    ratios = np.array(sorted(points))
    return ratios, np.array([points[r][0] for r in ratios]), np.array([points[r][1] for r in ratios])


def threshold_marks(actual: dict, prediction: dict | None) -> list[tuple[str, float, dict]]:
    """``(label, pruning ratio, line style)`` of the thresholds drawn on the accuracy plot."""
    marks = [(f"actual (first drop) p = {actual['threshold']:.3f}", float(actual["threshold"]), ACTUAL_STYLE),
             (f"released criterion p = {actual['released_threshold']:.3f}", float(actual["released_threshold"]), RELEASED_STYLE)]
    if prediction is not None:
        marks.insert(0, (f"predicted p* = {prediction['predicted_threshold']:.3f}", float(prediction["predicted_threshold"]), PREDICTED_STYLE))
    return marks


def accuracy_figure(actual: dict, prediction: dict | None):
    """Test accuracy (left) and loss (right) against the kept fraction ``1 - p`` on a log axis, so the
    last few percent of weights, where the network breaks, take most of the width; thresholds drawn."""
    ratios, acc, loss = accuracy_curve(actual)
    kept = kept_fraction(ratios)
    fig, (left, right) = _figure(11.0, 4.4, ncols=2)
    with plotstyle.apply():
        left.plot(kept, acc, **plotstyle.series_style(0), markersize=3.5, label="test accuracy")
        left.axhline(actual["dense_accuracy"] - actual["tolerance"], **plotstyle.REFERENCE,
                     label=f"dense accuracy - tolerance ({actual['tolerance']:g})")
        right.plot(kept, loss, **plotstyle.series_style(3), markersize=3.5, label="test loss")
        if np.all(loss > 0) and loss.max() / max(loss.min(), 1e-12) > 50:
            right.set_yscale("log")
        for ax in (left, right):
            for label, ratio, style in threshold_marks(actual, prediction):
                ax.axvline(float(kept_fraction([ratio], floor=kept.min())[0]), **style, label=label)
            kept_axis(ax)
        left.set_ylabel("test accuracy (fraction correct)")
        right.set_ylabel("test loss (cross-entropy, nats)")
        left.legend(loc="lower left", fontsize=8)
        right.legend(loc="upper left", fontsize=8)
        left.set_title("one-shot global magnitude pruning, no fine-tuning", fontsize=10)
        right.set_title("test loss of the pruned network", fontsize=10)
    return fig


def plot_accuracy(path: Path, actual: dict, prediction: dict | None) -> None:
    """Write :func:`accuracy_figure` to ``path``."""
    _save(accuracy_figure(actual, prediction), path)


def write_plots(directory: str | os.PathLike, spectrum: dict, prediction: dict, actual: dict, files: dict[str, str]) -> None:
    """The three PNGs of a run into ``directory`` (names from ``files``: spectrum, width, accuracy)."""
    directory = Path(directory)
    plot_spectrum(directory / files["spectrum"], spectrum)
    plot_gaussian_width(directory / files["width"], prediction, actual)
    plot_accuracy(directory / files["accuracy"], actual, prediction)
