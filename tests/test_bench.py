"""``mmil bench``: files and columns, reproducibility, resumption, cost measurement."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import yaml

from mmil.bench import (
    COST_COLUMNS,
    RESULT_COLUMNS,
    TIMING_COLUMNS,
    BenchConfig,
    ModelBench,
    cpu_peak_memory_bytes,
    mean_std,
    peak_of_running_sum,
    summarize,
)
from mmil.bench_config import parse_size
from mmil.cli import main
from mmil.data.synth import write_synthetic_dataset
from mmil.models import create_model

MODELS = ["abmil", "mean"]
MODEL_KWARGS = {"abmil": {"embed_dim": 12, "attn_dim": 8}, "mean": {"embed_dim": 12}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_data")
    write_synthetic_dataset(d, n_slides=20, seed=5, in_dim=8, min_instances=10, max_instances=40)
    config = {
        "model_kwargs": MODEL_KWARGS,
        # val_fraction 0.3: an inner validation split that 10 training slides can hold
        "train": {"min_epochs": 1, "patience": 2, "val_fraction": 0.3, "progress": False},
        "cost_repeats": 1,
    }
    (d / "bench.yaml").write_text(yaml.safe_dump(config))
    return d


def bench_argv(data_dir, out, *extra):
    return [
        "bench", "--features", str(data_dir / "features"), "--labels", str(data_dir / "labels.csv"), "--out", str(out),
        "--models", ",".join(MODELS), "--folds", "2", "--epochs", "2", "--seed", "3", "--cost-sizes", "30", "90",
        "--config", str(data_dir / "bench.yaml"), "--quiet", *extra,
    ]


@pytest.fixture(scope="module")
def first_run(data_dir):
    out = data_dir / "run1"
    assert main(bench_argv(data_dir, out)) == 0
    return out


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_bench_writes_every_file_with_the_right_columns(first_run):
    header, rows = read_csv(first_run / "results.csv")
    assert tuple(header) == RESULT_COLUMNS
    assert [(r["model"], r["fold"]) for r in rows] == [(m, f) for m in MODELS for f in ("0", "1")]
    for r in rows:
        for metric in ("auc", "accuracy", "balanced_accuracy", "f1"):
            assert 0.0 <= float(r[metric]) <= 1.0
        assert float(r["train_seconds"]) > 0 and float(r["inference_ms_per_bag"]) > 0 and float(r["peak_memory_mb"]) > 0
        model = create_model(r["model"], in_dim=8, n_classes=2, **MODEL_KWARGS[r["model"]])
        assert int(r["params"]) == sum(p.numel() for p in model.parameters())

    cost_header, cost_rows = read_csv(first_run / "cost.csv")
    assert tuple(cost_header) == COST_COLUMNS
    assert [(r["model"], r["n_instances"]) for r in cost_rows] == [(m, n) for m in MODELS for n in ("30", "90")]
    assert all(r["status"] == "ok" and float(r["inference_ms"]) > 0 for r in cost_rows)
    # memory grows with the bag: the (N, embed_dim) embeddings alone are 4 * 12 * N bytes
    for m in MODELS:
        mb = {int(r["n_instances"]): float(r["peak_memory_mb"]) for r in cost_rows if r["model"] == m}
        assert mb[90] > mb[30] and mb[90] * 2**20 >= 4 * 12 * 90

    for png in ("roc.png", "metrics.png", "cost.png"):
        assert (first_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (first_run / "summary.md").read_text()
    for m in MODELS:
        auc_mean = np.mean([float(r["auc"]) for r in rows if r["model"] == m])
        assert f"| {m} | {auc_mean:.3f} ± " in summary
    # statistics (tests/test_bench_stats.py checks the numbers): one stats.csv row per model, the verdict in summary.md
    _, stats = read_csv(first_run / "stats.csv")
    assert [r["model"] for r in stats] == list(MODELS) and sum(r["test"] == "reference" for r in stats) == 1
    assert "## Statistics on the pooled out-of-fold predictions" in summary and "significantly different from" in summary


def test_bench_metrics_are_those_of_the_crossval_runs(first_run):
    """The bench table carries the shared training loop's fold metrics, not a recomputation."""
    import json

    _, rows = read_csv(first_run / "results.csv")
    for m in MODELS:
        metrics = json.loads((first_run / "runs" / m / "metrics.json").read_text())
        by_fold = {int(f["fold"]): f for f in metrics["folds"]}
        for r in rows:
            if r["model"] == m:
                fold = by_fold[int(r["fold"])]
                for metric in ("auc", "accuracy", "balanced_accuracy", "f1"):
                    assert float(r[metric]) == pytest.approx(fold[metric], abs=1e-12)


def test_rerun_with_same_seed_in_fresh_dir_gives_identical_numbers(data_dir, first_run):
    out = data_dir / "run2"
    assert main(bench_argv(data_dir, out)) == 0
    _, rows1 = read_csv(first_run / "results.csv")
    _, rows2 = read_csv(out / "results.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]  # noqa: E731
    assert strip(rows1) == strip(rows2)


def test_rerun_in_same_dir_skips_finished_models(data_dir, first_run, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished model was trained again")

    monkeypatch.setattr("mmil.crossval.cross_validate", refuse)
    monkeypatch.setattr("mmil.bench.measure_cost", refuse)
    before = (first_run / "results.csv").read_text()
    assert main(bench_argv(data_dir, first_run)) == 0
    assert (first_run / "results.csv").read_text() == before


def test_rerun_with_other_settings_is_refused(data_dir, first_run, capsys):
    before = (first_run / "results.csv").read_text()
    argv = bench_argv(data_dir, first_run)
    argv[argv.index("--epochs") + 1] = "3"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "train" in err and "fresh --out" in err
    assert (first_run / "results.csv").read_text() == before


def test_unknown_model_is_one_clear_error_and_writes_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "never"
    argv = bench_argv(data_dir, out)
    argv[argv.index("--models") + 1] = "abmil,resnet"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'resnet'" in err and "dsmil" in err
    assert not out.exists()


# ------------------------------------------------------------------ pure parts
def test_peak_of_running_sum_orders_events_by_time():
    events = [(3, -100), (1, 100), (2, 50), (4, 500), (5, -450)]
    assert peak_of_running_sum(events) == 550  # 100, 150, 50, 550, 100
    assert peak_of_running_sum([(0, -10), (1, 5)]) == 0  # frees of older memory do not count


def test_cpu_peak_memory_counts_live_tensors():
    def work(rows):
        def run():
            a = torch.ones(rows, 1000)  # 4 MB per 1000 rows
            b = a * 2  # both alive: 8 MB
            del a
            c = b + 1  # a freed first: still 8 MB (12 MB if frees were not counted)
            return float(c[0, 0])

        return run

    # Allocator rounding and small bookkeeping allocations vary with the platform and build:
    # bounds, not byte counts. 8 MB live at the peak; 12 MB would mean the free of `a` was missed.
    peak = cpu_peak_memory_bytes(work(1000))
    assert 0.95 * 8e6 <= peak < 10e6
    # and the peak scales with the tensors
    assert 1.8 < cpu_peak_memory_bytes(work(2000)) / peak < 2.2


def test_summary_ranks_by_auc_then_balanced_accuracy():
    def bench(name, aucs, bals):
        rows = [{"auc": a, "accuracy": 0.5, "balanced_accuracy": b, "f1": 0.5, "train_seconds": 1.0, "inference_ms_per_bag": 1.0, "peak_memory_mb": 1.0} for a, b in zip(aucs, bals)]
        return ModelBench(name, rows, [], [], 10)

    s = summarize([bench("a", [0.8, 0.9], [0.6, 0.6]), bench("b", [0.9, 0.8], [0.7, 0.7]), bench("c", [0.95, float("nan")], [0.5, 0.5])])
    assert [x["model"] for x in s] == ["c", "b", "a"]  # c: NaN fold ignored -> 0.95; b beats a on balanced accuracy
    assert s[1]["auc_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))


def test_parse_size_and_config_validation(tmp_path):
    assert [parse_size(t) for t in ("1000", "10k", "0.1m", "50_000")] == [1000, 10000, 100000, 50000]
    bad = tmp_path / "bad.yaml"
    bad.write_text("folds: 3\nmodle_kwargs: {}\n")
    with pytest.raises(ValueError, match="modle_kwargs"):
        BenchConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="k_smaple|unknown"):
        BenchConfig(models=["clam-sb"], model_kwargs={"clam-sbb": {}})
