"""Plots of a run: Hessian spectrum, G(R) against R(p) with the crossing, accuracy/loss vs ratio.

Drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), each PNG
written atomically. Inputs are the records of spectrum.json, prediction.json and actual.json.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from mmpl.fsio import atomic_path

PREDICTED_STYLE = {"color": "tab:red", "linestyle": "--"}
ACTUAL_STYLE = {"color": "tab:green", "linestyle": "-"}
RELEASED_STYLE = {"color": "0.5", "linestyle": ":"}


def _figure(width: float = 6.4, height: float = 4.2, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


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


def plot_spectrum(path: Path, spectrum_record: dict) -> None:
    """Smoothed SLQ eigenvalue density of the Hessian, log-scaled y."""
    spec = spectrum_record["spectrum"]
    grid, density = spectrum_density(np.asarray(spec["nodes"]), np.asarray(spec["weights"]))
    fig, ax = _figure()
    ax.semilogy(grid, np.maximum(density, 1e-12), color="tab:blue", lw=1.2)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density (SLQ, smoothed for display)")
    ax.set_ylim(bottom=max(1e-8, float(density.max()) * 1e-10))
    ax.set_title(f"Hessian spectrum: m = {spectrum_record['lanczos_steps']} Lanczos steps, "
                 f"{spectrum_record['probes']} probe(s), D = {spectrum_record['num_prunable']}", fontsize=9)
    _save(fig, path)


def plot_gaussian_width(path: Path, prediction: dict, actual: dict | None) -> None:
    """Left: G(R(p)) and the line p against p, crossing at p*. Right: G(R) and p(R) against R."""
    p = np.asarray(prediction["p_grid"])
    R = np.asarray(prediction["R_curve"])
    G = np.asarray(prediction["G_curve"])
    p_star = prediction["predicted_threshold"]
    r_star = prediction["radius"]
    fig, (left, right) = _figure(11.0, 4.2, ncols=2)

    left.plot(p, G, color="tab:blue", label="G(R(p))")
    left.plot(p, p, color="black", lw=0.8, label="p")
    left.plot([p_star], [p_star], "o", color=PREDICTED_STYLE["color"], zorder=5)
    left.axvline(p_star, **PREDICTED_STYLE, label=f"predicted p* = {p_star:.3f}")
    if actual is not None:
        left.axvline(actual["threshold"], **ACTUAL_STYLE, label=f"actual = {actual['threshold']:.3f}")
    left.set_xlabel("pruning ratio p (fraction removed)")
    left.set_ylabel("G(R(p))  /  p")
    lo = _zoom_floor(p_star, None if actual is None else actual["threshold"])
    left.set_xlim(lo, 1)
    left.set_ylim(lo, 1.005)
    left.legend(fontsize=8, loc="lower left")
    left.set_title("predicted threshold: G(R(p)) = p", fontsize=9)

    order = np.argsort(R, kind="stable")
    right.plot(R[order], G[order], color="tab:blue", label="G(R) (sublevel-set width)")
    right.plot(R, p, color="tab:orange", label="p(R): ratio with pruning distance R")
    right.plot([r_star], [p_star], "o", color=PREDICTED_STYLE["color"], zorder=5, label=f"crossing R(p*) = {r_star:.3g}")
    right.set_xlabel("R = ||w - w^k||_2")
    right.set_ylabel("fraction")
    if r_star > 0:
        right.set_xlim(0, min(float(R.max()), 4 * r_star) * 1.02)
    right.set_ylim(0, 1.02)
    right.legend(fontsize=8, loc="center right")
    right.set_title("G(R) against the actual R(p) of the trained weights", fontsize=9)
    _save(fig, path)


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


def plot_accuracy(path: Path, actual: dict, prediction: dict | None) -> None:
    """Test accuracy and loss against the pruning ratio (full range and zoomed), both thresholds drawn."""
    ratios, acc, loss = accuracy_curve(actual)
    p_star = None if prediction is None else prediction["predicted_threshold"]
    fig, axes = _figure(11.0, 4.2, ncols=2)
    for ax, lo in zip(axes, (0.0, _zoom_floor(p_star, actual["threshold"]))):
        shown = ratios >= lo - 1e-12
        ax.plot(ratios[shown], acc[shown], "o-", ms=3, color="tab:blue", label="test accuracy")
        ax.axhline(actual["dense_accuracy"] - actual["tolerance"], color="tab:blue", lw=0.6, alpha=0.5)
        ax.axvline(actual["threshold"], **ACTUAL_STYLE, label=f"actual (first drop) = {actual['threshold']:.3f}")
        ax.axvline(actual["released_threshold"], **RELEASED_STYLE,
                   label=f"released criterion = {actual['released_threshold']:.3f}")
        if p_star is not None:
            ax.axvline(p_star, **PREDICTED_STYLE, label=f"predicted = {p_star:.3f}")
        ax.set_xlabel("pruning ratio p (fraction removed)")
        ax.set_ylabel("test accuracy")
        ax.set_xlim(lo, 1)
        twin = ax.twinx()
        twin.plot(ratios[shown], loss[shown], "s-", ms=2, color="tab:purple", alpha=0.6, label="test loss")
        twin.set_ylabel("test loss")
        if np.all(loss[shown] > 0) and loss[shown].max() / max(loss[shown].min(), 1e-12) > 50:
            twin.set_yscale("log")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
    axes[0].set_title("one-shot global magnitude pruning, no fine-tuning", fontsize=9)
    axes[1].set_title("zoom on the thresholds", fontsize=9)
    _save(fig, path)


def write_plots(directory: str | os.PathLike, spectrum: dict, prediction: dict, actual: dict, files: dict[str, str]) -> None:
    """The three PNGs of a run into ``directory`` (names from ``files``: spectrum, width, accuracy)."""
    directory = Path(directory)
    plot_spectrum(directory / files["spectrum"], spectrum)
    plot_gaussian_width(directory / files["width"], prediction, actual)
    plot_accuracy(directory / files["accuracy"], actual, prediction)
