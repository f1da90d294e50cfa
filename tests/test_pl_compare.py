"""`prunelimit compare`: exact sparsities, the IMP schedule, reproducibility, resume, refusal and the summary."""
import csv
import math

import numpy as np
import pytest
from scipy import stats

from bad_input import assert_refused
from prunelimit.cli import main
from prunelimit.compare import CompareConfig, imp_densities
from prunelimit.compare_report import paired_p_value, summary_markdown

ARGS = ["compare", "--model", "pl_factories:small_mlp", "--dataset", "digits", "--epochs", "2", "--sparsities", "0.5,0.9",
        "--seeds", "0,1", "--threads", "1"]
D = 64 * 16 + 16 * 10


def _rows(out):
    return list(csv.DictReader((out / "results.csv").open()))


def test_imp_schedule_reaches_every_target_exactly_and_only_shrinks():
    steps = imp_densities([0.99, 0.9, 0.95], 3)
    densities = [d for d, _ in steps]
    assert len(steps) == 9 and all(a > b for a, b in zip(densities, densities[1:]))
    reached = {t: d for d, t in steps if t is not None}
    assert reached == pytest.approx({0.9: 0.1, 0.95: 0.05, 0.99: 0.01})
    assert densities[0] == pytest.approx(0.1 ** (1 / 3))


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_every_method_gets_the_exact_sparsity_at_every_seed(compared):
    rows = _rows(compared)
    assert {(r["method"], float(r["sparsity"]), int(r["seed"])) for r in rows} == {
        (m, s, seed) for m in ("lomp", "magnitude", "imp", "snip", "synflow", "random") for s in (0.5, 0.9) for seed in (0, 1)}
    for r in rows:
        assert int(r["kept_weights"]) <= math.ceil(round((1 - float(r["sparsity"])) * D, 9))
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
    # one-shot methods keep exactly ceil((1-s)D) nonzero weights (a kept weight is never exactly 0 after training)
    for r in rows:
        if r["method"] in ("lomp", "magnitude", "random"):
            assert int(r["kept_weights"]) >= math.ceil((1 - float(r["sparsity"])) * D) - 2
    for name in ("summary.md", "accuracy.png", "layers.json", "prediction.json", "compare_config.json"):
        assert (compared / name).is_file()


def test_compare_is_reproducible_and_resumes_without_recomputing(compared, tmp_path):
    again = tmp_path / "again"
    assert main([*ARGS, "--out", str(again), "--methods", "lomp,snip,imp"]) == 0
    first = {(r["method"], r["sparsity"], r["seed"]): r["test_accuracy"] for r in _rows(compared)}
    for r in _rows(again):
        assert r["test_accuracy"] == first[(r["method"], r["sparsity"], r["seed"])]
    before = (again / "results.csv").read_bytes()
    assert main([*ARGS, "--out", str(again), "--methods", "lomp,snip,imp"]) == 0  # nothing left to do
    assert (again / "results.csv").read_bytes() == before


def test_rerun_with_other_settings_is_refused(compared, capsys):
    assert_refused(main, [*ARGS[:-2], "--threads", "1", "--out", str(compared), "--lam", "0.5"], capsys,
                   names=[str(compared), "lam"], watch=[compared])


@pytest.mark.parametrize("argv, name", [(["--methods", "lomp,prune_all"], "--methods"), (["--sparsities", "0.5,1.0"], "--sparsities"),
                                        (["--epochs", "0"], "--epochs"), (["--rewind-epoch", "5"], "--rewind-epoch")])
def test_bad_compare_options(tmp_path, capsys, argv, name):
    assert_refused(main, [*ARGS, "--out", str(tmp_path / "o"), *argv], capsys, names=[name], watch=[tmp_path])


def test_summary_marks_the_best_and_tests_against_it():
    rows = [{"method": m, "sparsity": 0.9, "seed": s, "test_accuracy": acc}
            for m, accs in (("lomp", [0.9, 0.92, 0.91]), ("random", [0.5, 0.6, 0.52])) for s, acc in enumerate(accs)]
    cfg = CompareConfig(methods=["lomp", "random"], sparsities=[0.9], seeds=[0, 1, 2])
    text = summary_markdown(rows, cfg, None)
    assert "**0.9100 +- 0.0082**" in text
    p = stats.ttest_rel([0.5, 0.6, 0.52], [0.9, 0.92, 0.91]).pvalue
    assert f"(p {p:.3f})" in text
    assert np.isnan(paired_p_value(np.array([0.5]), np.array([0.6])))
