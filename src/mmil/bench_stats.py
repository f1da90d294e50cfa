"""Statistics of ``mmil bench``: which differences between models are real.

From the pooled out-of-fold predictions of every model (each slide predicted once, by the
model of the fold that held it out; probabilities averaged over the evaluation repeats):

* a 95 % percentile-bootstrap interval of the AUC and of the balanced accuracy
  (:func:`mmil.stats.bootstrap_ci`; slides resampled within each class, 2000 resamples);
* the **reference** model: the highest pooled AUC (ties: the earlier model of the table);
* a paired test of every other model against the reference on the same slides: DeLong's
  test of the two AUCs for binary labels (:func:`mmil.stats.delong_test`), a paired
  bootstrap of the macro AUC difference otherwise (:func:`mmil.stats.paired_bootstrap_test`);
* Holm's adjustment over those comparisons (:func:`mmil.stats.holm_adjust`); a difference is
  called significant when the adjusted p-value is below ``alpha`` (0.05).

The pooled AUC is not the table's mean of per-fold AUCs (folds with different calibration
are ranked together); both are reported.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

import numpy as np

from .stats import auc_of_probs, bootstrap_ci, delong_test, holm_adjust, paired_bootstrap_test

STATS_COLUMNS = ("model", "n_slides", "pooled_auc", "auc_low", "auc_high", "pooled_balanced_accuracy", "bacc_low", "bacc_high",
                 "reference", "auc_difference", "test", "p_value", "p_holm", "significant")




def balanced_accuracy_metric(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean over the classes present in ``y`` of the recall of the argmax prediction."""
    y = np.asarray(y)
    pred = np.asarray(probs).argmax(axis=1)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def _pooled(bench) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(bench.y_true, dtype=np.int64), np.asarray(bench.probs, dtype=np.float64).reshape(len(bench.y_true), -1)


def _compare(y: np.ndarray, ref: np.ndarray, other: np.ndarray, n_boot: int, seed: int) -> tuple[float, str, float]:
    """(AUC of other - AUC of reference, test name, two-sided p)."""
    if ref.shape[1] == 2:
        auc_o, auc_r, p = delong_test(y == 1, other[:, 1], ref[:, 1])
        return auc_o - auc_r, "DeLong", p
    diff, p = paired_bootstrap_test(y, other, ref, auc_of_probs, n_boot=n_boot, seed=seed)
    return diff, "paired bootstrap", p


def model_statistics(benches: Sequence[Any], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                     alpha: float = 0.05) -> list[dict[str, Any]]:
    """One row per model (:data:`STATS_COLUMNS`), in the order of ``benches`` (see the module docstring).

    ``benches`` need ``model``, ``y_true`` and ``probs`` (e.g. :class:`mmil.bench_report.ModelBench`).
    Models whose pooled labels hold a single class get nan intervals and no test.
    """
    rows, usable = [], []
    for b in benches:
        y, p = _pooled(b)
        row = dict.fromkeys(STATS_COLUMNS, float("nan")) | {"model": b.model, "n_slides": len(y), "reference": "",
                                                            "test": "", "significant": ""}
        if len(np.unique(y)) >= 2 and len(y) == len(p):
            auc = bootstrap_ci(y, p, auc_of_probs, n_boot=n_boot, level=level, seed=seed)
            bacc = bootstrap_ci(y, p, balanced_accuracy_metric, n_boot=n_boot, level=level, seed=seed)
            row.update(pooled_auc=auc.estimate, auc_low=auc.low, auc_high=auc.high,
                       pooled_balanced_accuracy=bacc.estimate, bacc_low=bacc.low, bacc_high=bacc.high)
            if math.isfinite(auc.estimate):
                usable.append(len(rows))
        rows.append(row)
    if not usable:
        return rows
    ref_i = max(usable, key=lambda i: (rows[i]["pooled_auc"], -i))
    y_ref, p_ref = _pooled(benches[ref_i])
    others = [i for i in usable if i != ref_i and np.array_equal(_pooled(benches[i])[0], y_ref)]
    for i in others:
        diff, test, p = _compare(y_ref, p_ref, _pooled(benches[i])[1], n_boot, seed)
        rows[i].update(reference=rows[ref_i]["model"], auc_difference=diff, test=test, p_value=p)
    for i, adj in zip(others, holm_adjust([rows[i]["p_value"] for i in others]) if others else []):
        rows[i].update(p_holm=adj, significant="yes" if adj < alpha else "no")
    rows[ref_i].update(reference=rows[ref_i]["model"], test="reference")
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def stats_csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(STATS_COLUMNS)
    for r in rows:
        w.writerow([repr(r[c]) if isinstance(r[c], float) else r[c] for c in STATS_COLUMNS])
    return buf.getvalue()


def _p_text(p: float) -> str:
    return "nan" if not math.isfinite(p) else ("< 0.001" if p < 1e-3 else f"{p:.3f}")


def kept_epochs(benches: Sequence[Any]) -> dict[str, str]:
    """Per model, the epoch whose weights each fold kept (``"3, 12, 7"``; ``?`` where a stored result lacks it)."""
    return {b.model: ", ".join(str(r.get("best_epoch", "?")) for r in b.rows) for b in benches}


def stats_markdown(rows: Sequence[dict[str, Any]], epochs: dict[str, str] | None = None, alpha: float = 0.05) -> str:
    """The statistics section of ``summary.md``: intervals, tests against the reference, the verdict in words,
    and (``epochs``, from :func:`kept_epochs`) each fold's kept epoch."""
    ref = next((r["model"] for r in rows if r["test"] == "reference"), None)
    epochs = epochs or {}
    lines = ["## Statistics on the pooled out-of-fold predictions", ""]
    lines.append("| model | slides | pooled AUC [95% CI] | balanced accuracy [95% CI] | AUC − reference | test | p | p (Holm) "
                 "| significant | kept epoch per fold |")
    lines.append("|---|---:|---|---|---:|---|---:|---:|---|---|")
    for r in sorted(rows, key=lambda r: -r["pooled_auc"] if math.isfinite(r["pooled_auc"]) else 2.0):
        lines.append(
            f"| {r['model']} | {r['n_slides']} | {_fmt(r['pooled_auc'])} [{_fmt(r['auc_low'])}, {_fmt(r['auc_high'])}] | "
            f"{_fmt(r['pooled_balanced_accuracy'])} [{_fmt(r['bacc_low'])}, {_fmt(r['bacc_high'])}] | "
            f"{'' if r['test'] == 'reference' else _fmt(r['auc_difference'])} | {r['test']} | {_p_text(r['p_value'])} | "
            f"{_p_text(r['p_holm'])} | {r['significant']} | {epochs.get(r['model'], '')} |")
    worse = [r["model"] for r in rows if r["significant"] == "yes"]
    same = [r["model"] for r in rows if r["significant"] == "no"]
    lines.append("")
    if ref is None:
        lines.append("No model has a defined pooled AUC; no test was run.")
    else:
        lines.append(f"Reference: {ref} (highest pooled AUC). Percentile bootstrap intervals (slides resampled within class); "
                     f"each model tested against the reference (DeLong for two classes, paired bootstrap otherwise), "
                     f"Holm-adjusted over the comparisons, significant at {alpha}.")
        lines.append("")
        lines.append(f"- significantly different from {ref}: {', '.join(worse) if worse else 'none'}")
        lines.append(f"- not significantly different from {ref}: {', '.join(same) if same else 'none'}")
    lines.append("")
    return "\n".join(lines)
