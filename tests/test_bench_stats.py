"""Bench statistics (mmil.bench_stats) on hand-built pooled predictions with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mmil.bench_report import ModelBench
from mmil.stats import auc_of_probs
from mmil.bench_stats import (
    balanced_accuracy_metric,
    kept_epochs,
    model_statistics,
    stats_csv_text,
    stats_markdown,
)
from mmil.stats import delong_test, holm_adjust


def _bench(name: str, y: np.ndarray, p1: np.ndarray) -> ModelBench:
    probs = np.stack([1 - p1, p1], axis=1)
    return ModelBench(name, [{"best_epoch": 3}, {"best_epoch": 7}], y.tolist(), probs.tolist(), 10)


def _binary_set():
    y = np.array([0, 1] * 20)
    ramp = np.linspace(0.05, 0.95, 40)
    perfect = np.where(y == 1, 0.6 + ramp / 3, 0.1 + ramp / 3)  # every positive above every negative
    noisy = np.random.default_rng(0).uniform(size=40)  # unrelated to the labels
    close = perfect.copy()
    close[[0, 1]] = close[[1, 0]]  # one swapped pair: AUC slightly below 1
    return y, {"good": perfect, "noise": noisy, "close": close}


def test_intervals_and_delong_against_direct_computation():
    y, scores = _binary_set()
    benches = [_bench(n, y, s) for n, s in scores.items()]
    rows = {r["model"]: r for r in model_statistics(benches, n_boot=300)}
    for name, s in scores.items():
        r = rows[name]
        assert r["pooled_auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert r["pooled_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, (s > 0.5).astype(int)), abs=1e-12)
        assert r["auc_low"] <= r["pooled_auc"] <= r["auc_high"]
        assert r["bacc_low"] <= r["pooled_balanced_accuracy"] <= r["bacc_high"]
    assert rows["good"]["test"] == "reference" and rows["noise"]["reference"] == "good"
    p_noise = delong_test(y, scores["noise"], scores["good"])[2]
    p_close = delong_test(y, scores["close"], scores["good"])[2]
    assert rows["noise"]["p_value"] == pytest.approx(p_noise) and rows["noise"]["test"] == "DeLong"
    assert rows["noise"]["p_holm"] == pytest.approx(holm_adjust([p_noise, p_close])[0])
    assert rows["close"]["p_holm"] == pytest.approx(holm_adjust([p_noise, p_close])[1])
    assert rows["noise"]["significant"] == "yes" and rows["close"]["significant"] == "no"
    assert rows["noise"]["auc_difference"] == pytest.approx(roc_auc_score(y, scores["noise"]) - 1.0)


def test_summary_text_names_the_significant_differences():
    y, scores = _binary_set()
    benches = [_bench(n, y, s) for n, s in scores.items()]
    rows = model_statistics(benches, n_boot=200)
    text = stats_markdown(rows, kept_epochs(benches))
    assert "Reference: good" in text
    assert "- significantly different from good: noise" in text
    assert "- not significantly different from good: close" in text
    assert "| 3, 7 |" in text
    csv_lines = stats_csv_text(rows).splitlines()
    assert csv_lines[0].startswith("model,n_slides,pooled_auc") and len(csv_lines) == 4


def test_identical_models_are_not_different_and_ties_go_to_the_first():
    y, scores = _binary_set()
    rows = model_statistics([_bench("a", y, scores["close"]), _bench("b", y, scores["close"])], n_boot=100)
    assert rows[0]["test"] == "reference" and rows[1]["p_value"] == 1.0 and rows[1]["significant"] == "no"


def test_multiclass_uses_paired_bootstrap_and_macro_auc():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 12)
    good = np.eye(3)[y] * 0.7 + 0.1
    noise = rng.dirichlet(np.ones(3), size=36)
    benches = [ModelBench("good", [], y.tolist(), good.tolist(), 1), ModelBench("noise", [], y.tolist(), noise.tolist(), 1)]
    rows = model_statistics(benches, n_boot=300)
    assert rows[0]["pooled_auc"] == pytest.approx(roc_auc_score(y, good, multi_class="ovr", average="macro"))
    assert rows[1]["pooled_auc"] == pytest.approx(roc_auc_score(y, noise, multi_class="ovr", average="macro"))
    assert rows[1]["test"] == "paired bootstrap" and rows[1]["significant"] == "yes"
    assert balanced_accuracy_metric(y, noise) == pytest.approx(balanced_accuracy_score(y, noise.argmax(1)))
    assert auc_of_probs(y, good) == 1.0


def test_single_class_model_gets_no_interval_or_test():
    y = np.zeros(10, dtype=int)
    rows = model_statistics([_bench("only", y, np.linspace(0, 1, 10))], n_boot=50)
    assert np.isnan(rows[0]["pooled_auc"]) and rows[0]["test"] == ""
    assert "no test was run" in stats_markdown(rows)
