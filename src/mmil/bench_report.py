"""The reports of ``mmil bench``: per-fold and cost tables (CSV), ``summary.md``, ROC, metric and cost plots."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mmpl import plotstyle

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")
#: Calibration of each fold's test probabilities before/after its temperature (see :mod:`mmil.calibrate_run`).
CALIBRATION_COLUMNS = ("ece_before", "ece_after", "brier_before", "brier_after")
RESULT_COLUMNS = ("model", "fold", *METRICS, "train_seconds", "inference_ms_per_bag", "peak_memory_mb", "params", *CALIBRATION_COLUMNS)
#: Columns that measure the machine rather than the model (they change between runs).
TIMING_COLUMNS = ("train_seconds", "inference_ms_per_bag", "peak_memory_mb")
COST_COLUMNS = ("model", "n_instances", "inference_ms", "peak_memory_mb", "device", "status")


@dataclass
class ModelBench:
    """Everything the reports need about one model."""

    model: str
    rows: list[dict[str, Any]]  # one per fold, RESULT_COLUMNS
    y_true: list[int]  # out-of-fold labels, fold after fold
    probs: list[list[float]]  # out-of-fold probabilities (mean over repeats)
    params: int
    cost: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- reports
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(benches: Sequence[ModelBench]) -> list[dict[str, Any]]:
    """Mean and std over folds of every column per model, ranked by mean AUC
    (ties broken by mean balanced accuracy, then by the model's table order)."""
    out = []
    for order, b in enumerate(benches):
        s: dict[str, Any] = {"model": b.model, "params": b.params, "folds": len(b.rows), "order": order}
        for col in (*METRICS, *TIMING_COLUMNS, *CALIBRATION_COLUMNS):
            s[col], s[f"{col}_std"] = mean_std([r.get(col, math.nan) for r in b.rows])
        out.append(s)

    def key(s):
        auc = s["auc"] if math.isfinite(s["auc"]) else -1.0
        bal = s["balanced_accuracy"] if math.isfinite(s["balanced_accuracy"]) else -1.0
        return (-auc, -bal, s["order"])

    for rank, s in enumerate(sorted(out, key=key), start=1):
        s["rank"] = rank
    return sorted(out, key=lambda s: s["rank"])


def _fmt(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def results_csv_text(benches: Sequence[ModelBench]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RESULT_COLUMNS)
    for b in benches:
        for r in b.rows:
            r = {c: math.nan for c in CALIBRATION_COLUMNS} | r  # rows of runs made before calibration
            w.writerow([_fmt(r[c], 3) if c in TIMING_COLUMNS else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in RESULT_COLUMNS])
    return buf.getvalue()


def cost_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COST_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c], 3) if isinstance(r[c], float) else r[c] for c in COST_COLUMNS])
    return buf.getvalue()


def summary_markdown(summary: Sequence[dict[str, Any]], cost: Sequence[dict[str, Any]], header: dict[str, Any]) -> str:
    """The ``summary.md`` text: settings, ranked metric table, cost table."""
    lines = ["# mmil bench", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "## Cross-validated results (mean ± std over folds)", ""]
    lines.append("| rank | model | AUC | accuracy | balanced accuracy | macro F1 | train s/fold | inference ms/bag | peak MB (largest test bag) | params | ECE raw → T-scaled |")
    lines.append("|---:|---|---|---|---|---|---:|---:|---:|---:|---|")
    for s in summary:
        pm = lambda c, d=3: f"{_fmt(s[c], d)} ± {_fmt(s[c + '_std'], d)}"  # noqa: E731
        lines.append(
            f"| {s['rank']} | {s['model']} | {pm('auc')} | {pm('accuracy')} | {pm('balanced_accuracy')} | {pm('f1')} | "
            f"{_fmt(s['train_seconds'], 1)} | {_fmt(s['inference_ms_per_bag'], 2)} | {_fmt(s['peak_memory_mb'], 1)} | {s['params']:,} | {_fmt(s['ece_before'], 3)} → {_fmt(s['ece_after'], 3)} |"
        )
    lines += ["", "Ranked by mean AUC (ties: balanced accuracy). Std is the sample standard deviation over folds. "
              "ECE: adaptive-bin expected calibration error of the test probabilities, raw and after each fold's temperature "
              "(fitted on its calibration slides: the validation slides unless `calib_fraction` is set).", ""]
    if cost:
        sizes = sorted({int(r["n_instances"]) for r in cost})
        models = list(dict.fromkeys(r["model"] for r in cost))
        table = {(r["model"], int(r["n_instances"])): r for r in cost}
        lines += [f"## Inference cost against bag size (device: {cost[0]['device']}; one bag, no_grad)", ""]
        lines.append("| model | " + " | ".join(f"N={n:,} ms / MB" for n in sizes) + " |")
        lines.append("|---|" + "---:|" * len(sizes))
        for m in models:
            cells = []
            for n in sizes:
                r = table.get((m, n))
                cells.append("–" if r is None or r["status"] != "ok" else f"{_fmt(r['inference_ms'], 1)} / {_fmt(r['peak_memory_mb'], 1)}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "– = not measured (over the time budget, or failed; see cost.csv).", ""]
    lines += ["Files: results.csv (per fold), cost.csv, roc.png, metrics.png, cost.png, runs/<model>/ (cross-validation outputs).", ""]
    return "\n".join(lines)


def roc_points(y_true: Sequence[int], probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve of pooled out-of-fold predictions: binary on ``probs[:, 1]``;
    multi-class micro-averaged one-vs-rest. Returns ``(fpr, tpr, auc)``."""
    from sklearn.metrics import auc, roc_curve

    y = np.asarray(y_true)
    p = np.asarray(probs)
    if p.shape[1] == 2:
        fpr, tpr, _ = roc_curve(y, p[:, 1])
    else:
        onehot = np.eye(p.shape[1])[y]
        fpr, tpr, _ = roc_curve(onehot.ravel(), p.ravel())
    return fpr, tpr, float(auc(fpr, tpr))


#: Legend labels of the metrics in ``metrics.png``.
METRIC_LABELS = {"auc": "ROC AUC", "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "f1": "macro F1"}


def roc_figure(benches: Sequence[ModelBench]):
    """Pooled out-of-fold ROC curves, one per model (markers every tenth of the curve)."""
    fig, ax = plotstyle.new_figure(5.6, 5.2)
    with plotstyle.apply():
        for i, b in enumerate(benches):
            if len(set(b.y_true)) < 2:
                continue
            fpr, tpr, auc = roc_points(b.y_true, np.asarray(b.probs))
            ax.plot(fpr, tpr, **plotstyle.series_style(i), markevery=0.1, label=f"{b.model} (pooled AUC {auc:.3f})")
        plotstyle.finish_roc_axes(ax, "ROC of out-of-fold test predictions")
    return fig


def plot_roc(benches: Sequence[ModelBench], path: Path) -> None:
    plotstyle.save_figure(roc_figure(benches), path)


def metric_bars_figure(summary: Sequence[dict[str, Any]]):
    """Grouped bars: each metric's mean over folds per model, error bars +-1 sample sd."""
    fig, ax = plotstyle.new_figure(max(6.4, 1.3 * len(summary) + 2), 4.6)
    width = 0.8 / len(METRICS)
    x = np.arange(len(summary))
    folds = sorted({int(s.get("folds", 0)) for s in summary})
    with plotstyle.apply():
        for j, m in enumerate(METRICS):
            ax.bar(x + (j - (len(METRICS) - 1) / 2) * width, [s[m] for s in summary], width, yerr=[s[f"{m}_std"] for s in summary],
                   color=plotstyle.OKABE_ITO[j], hatch=("", "//", "..", "xx")[j % 4], edgecolor="white", linewidth=0.5,
                   error_kw={"elinewidth": 1, "capsize": 2}, label=METRIC_LABELS.get(m, m))
        ax.set_xticks(x, [s["model"] for s in summary], rotation=20, ha="right")
        ax.set_ylim(0, 1.2)  # the legend sits above 1, where no metric reaches
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_xlabel("model (ranked by mean AUC)")
        ax.set_ylabel("test metric (fraction), mean +- sd over folds")
        ax.set_title(f"mmil bench: cross-validated test metrics ({'/'.join(map(str, folds))} folds)")
        ax.legend(ncol=len(METRICS), loc="upper center")
    return fig


def plot_metric_bars(summary: Sequence[dict[str, Any]], path: Path) -> None:
    plotstyle.save_figure(metric_bars_figure(summary), path)


def cost_figure(cost: Sequence[dict[str, Any]]):
    """Inference time and peak memory against bag size, log-log, one series style per model (colour,
    marker, line style; open markers and strokes that thin from one model to the next keep coinciding lines apart)."""
    fig, axes = plotstyle.new_figure(11.0, 4.4, ncols=2)
    with plotstyle.apply():
        for i, m in enumerate(dict.fromkeys(r["model"] for r in cost)):
            pts = [r for r in cost if r["model"] == m and r["status"] == "ok"]
            if not pts:
                continue
            n, style = [r["n_instances"] for r in pts], plotstyle.series_style(i)
            for ax, y in zip(axes, ([r["inference_ms"] for r in pts], [max(r["peak_memory_mb"], 1e-3) for r in pts])):
                ax.plot(n, y, **style, markerfacecolor="none", markersize=10 - 2.5 * (i % 3), linewidth=2.8 - 0.8 * (i % 3), label=m)
        device = cost[0]["device"] if cost else "?"
        for ax, label in zip(axes, (f"inference time per bag (ms, {device})", "peak tensor memory (MB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("instances per bag N (count)")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.25)
        axes[0].set_title("time of one no_grad forward pass")
        axes[1].set_title("peak memory of that pass")
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend()
    return fig


def plot_cost(cost: Sequence[dict[str, Any]], path: Path) -> None:
    plotstyle.save_figure(cost_figure(cost), path)


def read_results_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``results.csv`` (strings), for tests and downstream scripts."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
