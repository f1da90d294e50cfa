"""One plot style (mmpl.plotstyle) and the plot math: mean ROC band, kept-fraction axis, labelled axes everywhere."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from mmil import bench_report, plot_reliability, plots, train_log
from mmpl import plotstyle
from prunelimit import compare_report, report


def _naive_tpr_at(fpr, tpr, x):
    """The ROC curve at false positive rate x, from its definition: the highest TPR at a point's own
    rate; else the straight line from the left neighbour's highest to the right neighbour's lowest TPR."""
    at = [t for f, t in zip(fpr, tpr) if f == x]
    if at:
        return max(at)
    fl = max(f for f in fpr if f < x)
    fr = min(f for f in fpr if f > x)
    tl = max(t for f, t in zip(fpr, tpr) if f == fl)
    tr = min(t for f, t in zip(fpr, tpr) if f == fr)
    return tl + (tr - tl) * (x - fl) / (fr - fl)


def _random_curves(k=4, n=30, seed=0):
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(k):
        y = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        s = np.round(rng.normal(size=n) + y, 1)  # rounded: tied scores give vertical and diagonal steps
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        curves.append((fpr, tpr))
    return curves


def test_mean_roc_band_against_a_naive_loop():
    curves = _random_curves()
    grid = np.r_[np.linspace(0, 1, 41), [f for f in curves[0][0]]]  # also exactly at a curve's own rates
    grid = np.unique(grid)
    g, mean, sd = plots.mean_roc(curves, grid)
    for j, x in enumerate(grid):
        t = [_naive_tpr_at(list(f), list(r), x) for f, r in curves]
        m = sum(t) / len(t)
        assert mean[j] == pytest.approx(m, abs=1e-12)
        assert sd[j] == pytest.approx((sum((v - m) ** 2 for v in t) / (len(t) - 1)) ** 0.5, abs=1e-12)


def test_mean_roc_closed_form():
    """A perfect classifier (TPR 1 from FPR 0 on) and chance (TPR = FPR): mean (1 + x)/2, sd (1 - x)/sqrt(2)."""
    perfect = (np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))
    chance = (np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    grid, mean, sd = plots.mean_roc([perfect, chance], np.linspace(0, 1, 11))
    np.testing.assert_allclose(mean, (1 + grid) / 2, atol=1e-12)
    np.testing.assert_allclose(sd, (1 - grid) / np.sqrt(2), atol=1e-12)
    assert plots.mean_roc([perfect])[2].max() == 0.0


def test_kept_fraction_transform_and_axis():
    np.testing.assert_allclose(report.kept_fraction([0.0, 0.9, 0.99, 0.999]), [1.0, 0.1, 0.01, 0.001], rtol=1e-9)
    np.testing.assert_allclose(report.kept_fraction([0.5, 0.98, 1.0]), [0.5, 0.02, 0.01], rtol=1e-9)  # nothing kept: half the smallest
    np.testing.assert_allclose(report.kept_fraction([1.0, 0.9], floor=1e-3), [1e-3, 0.1], rtol=1e-9)
    assert report.kept_fraction([1.0])[0] == 1e-4
    fig, ax = plotstyle.new_figure()
    ax.plot([1.0, 0.1, 0.01], [0.9, 0.9, 0.5])
    report.kept_axis(ax, ticks=[0.1, 0.01])
    assert ax.get_xscale() == "log" and ax.xaxis_inverted() and "kept fraction" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1%", "10%"]


# ----------------------------------------------------------------------------- inputs by construction
def _fold_data(k=3, n=12, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    ys, ps = [], []
    for _ in range(k):
        y = np.r_[np.arange(classes), rng.integers(0, classes, n - classes)]
        p = rng.dirichlet(np.ones(classes), size=n)
        ys.append(y), ps.append(p)
    return ys, ps


def _bench():
    ys, ps = _fold_data()
    benches = [bench_report.ModelBench(m, [{"auc": 0.8}], list(np.concatenate(ys)), np.concatenate(ps).tolist(), 10) for m in ("abmil", "mmil")]
    summary = [{"model": m, "folds": 3, **{k: 0.7 + 0.1 * i for k in bench_report.METRICS},
                **{f"{k}_std": 0.05 for k in bench_report.METRICS}} for i, m in enumerate(("abmil", "mmil"))]
    cost = [{"model": m, "n_instances": n, "inference_ms": 1.0 * n / 1000, "peak_memory_mb": 2.0 * n / 1000, "device": "cpu", "status": "ok"}
            for m in ("abmil", "mmil", "transmil") for n in (1000, 10000)]  # abmil and mmil coincide exactly
    return benches, summary, cost


def _pruning_records():
    ratios = np.round(np.r_[np.linspace(0, 0.9, 10), [0.95, 0.97, 0.98, 0.99, 1.0]], 4)
    acc = np.where(ratios < 0.97, 0.95, 0.95 - 10 * (ratios - 0.96))
    actual = {"ratios": ratios.tolist(), "accuracies": acc.tolist(), "losses": (0.2 + (0.95 - acc) * 5).tolist(), "threshold": 0.97,
              "released_threshold": 0.96, "dense_accuracy": 0.95, "tolerance": 0.01}
    p = np.linspace(0, 1, 21)
    prediction = {"p_grid": p.tolist(), "R_curve": (p ** 4).tolist(), "G_curve": (1 - 0.1 * p ** 4).tolist(), "predicted_threshold": 0.95,
                  "radius": 0.8, "kept_fraction": 0.05, "predicted_ratio": 0.95, "seed": 0}
    spectrum = {"spectrum": {"nodes": [[-1.0, 0.0, 2.0, 5.0]], "weights": [[0.1, 0.6, 0.2, 0.1]]}, "lanczos_steps": 4, "probes": 1, "num_prunable": 100}
    return actual, prediction, spectrum


def _all_figures():
    ys, ps = _fold_data()
    ys3, ps3 = _fold_data(classes=3)
    benches, summary, cost = _bench()
    actual, prediction, spectrum = _pruning_records()
    rows = [{"method": m, "sparsity": s, "seed": seed, "test_accuracy": 0.9 - s / 10 - 0.01 * seed} for m in ("lomp", "snip")
            for s in (0.9, 0.99) for seed in (0, 1)]
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e + 0.1, "val_auc": 0.5 + e / 20} for e in range(1, 6)]
    return {
        "mmil roc binary": plots.roc_figure(ys, ps), "mmil roc 3 classes": plots.roc_figure(ys3, ps3, class_names=["a", "b", "c"]),
        "reliability": plot_reliability.reliability_figure(ys, ps, ps), "bench roc": bench_report.roc_figure(benches),
        "bench bars": bench_report.metric_bars_figure(summary), "bench cost": bench_report.cost_figure(cost),
        "spectrum": report.spectrum_figure(spectrum), "width": report.gaussian_width_figure(prediction, actual),
        "accuracy": report.accuracy_figure(actual, prediction), "compare": compare_report.accuracy_figure(rows, prediction),
        "curves": train_log.curves_figure(history, 3),
    }


def test_every_plot_labels_its_axes_and_titles_itself():
    figures = _all_figures()
    for name, fig in figures.items():
        assert plotstyle.unlabelled_axes(fig) == [], name
        assert any(ax.get_title() for ax in fig.get_axes()) or fig._suptitle is not None, name
    fig, ax = plotstyle.new_figure()
    ax.plot([0, 1], [0, 1])
    assert plotstyle.unlabelled_axes(fig) == ["axes 0: x", "axes 0: y"]  # the check can fail


def test_series_are_told_apart_by_marker_and_colour():
    """Coinciding cost lines (abmil and mmil) and every legend entry differ in colour and marker."""
    figures = _all_figures()
    for name in ("bench cost", "compare", "bench roc"):
        handles, labels = figures[name].get_axes()[0].get_legend_handles_labels()
        lines = [h[0] if isinstance(h, tuple) else h for h in handles]  # an errorbar's handle is (line, caps, bars)
        styled = [(label, line.get_color(), line.get_marker()) for line, label in zip(lines, labels)
                  if hasattr(line, "get_marker") and line.get_marker() not in ("", "None", None)]
        assert len({c for _, c, _ in styled}) == len({m for _, _, m in styled}) == len(styled) >= 2, (name, styled)
    bars = figures["bench bars"].get_axes()[0]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == [bench_report.METRIC_LABELS[m] for m in bench_report.METRICS]
    assert bars.get_title()


def test_roc_figure_draws_the_mean_of_its_folds():
    ys, ps = _fold_data()
    ax = plots.roc_figure(ys, ps).get_axes()[0]
    mean_line = [line for line in ax.get_lines() if str(line.get_label()).startswith("mean ROC")][0]
    _, mean, _ = plots.mean_roc([roc_curve(y, p[:, 1])[:2] for y, p in zip(ys, ps)])
    np.testing.assert_allclose(mean_line.get_ydata(), mean)


def test_accuracy_plot_uses_the_kept_fraction_and_marks_both_thresholds():
    actual, prediction, _ = _pruning_records()
    fig = report.accuracy_figure(actual, prediction)
    left = fig.get_axes()[0]
    curve = [line for line in left.get_lines() if line.get_label() == "test accuracy"][0]
    np.testing.assert_allclose(curve.get_xdata(), report.kept_fraction(report.accuracy_curve(actual)[0]))
    assert left.get_xscale() == "log"
    marks = {str(line.get_label()).split(" p")[0]: line.get_xdata()[0] for line in left.get_lines() if " p" in str(line.get_label())}
    assert marks["predicted"] == pytest.approx(1 - prediction["predicted_threshold"])
    assert marks["actual (first drop)"] == pytest.approx(1 - actual["threshold"])


def test_saved_png_has_the_house_resolution(tmp_path):
    import matplotlib.image

    fig, ax = plotstyle.new_figure(4.0, 3.0)
    ax.plot([0, 1], [1, 0])
    img = matplotlib.image.imread(plotstyle.save_figure(fig, tmp_path / "f.png"))
    assert img.shape[:2] == (3 * plotstyle.DPI, 4 * plotstyle.DPI)
