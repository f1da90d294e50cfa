"""--lam auto's selection rule, chance detection, and the tolerance / standard-error / interval arithmetic."""
from __future__ import annotations

import math

import pytest

from prunelimit.criteria import (
    binomial_stderr, check_not_chance, near_chance, prediction_interval, tolerance_summary,
)
from prunelimit.errors import PruneLimitError
from prunelimit.lamsweep import LAM_GRID, select_lambda


def _fake(table: dict[float, object]):
    calls: list[float] = []

    def accuracy_of(lam: float):
        calls.append(lam)
        return table[lam]

    return accuracy_of, calls


def test_select_lambda_picks_the_largest_before_the_first_drop_and_stops_there():
    acc = {0.0: 0.95, 1e-5: 0.96, 2e-5: 0.95, 5e-5: 0.945, 1e-4: 0.9401, 2e-4: 0.93, 5e-4: 0.99, 1e-3: 0.5, 2e-3: 0.1, 5e-3: 0.1}
    accuracy_of, calls = _fake(acc)
    sweep = select_lambda(accuracy_of, LAM_GRID, max_drop=0.01)
    assert sweep.chosen == 1e-4  # 0.9401 >= 0.95 - 0.01; 2e-4 (0.93) is the first failure
    assert calls == [0.0, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4]  # nothing after the failure is trained
    assert sweep.bar == pytest.approx(0.94) and sweep.accuracies[-1] == 0.93
    assert sweep.to_dict()["lams"] == calls


def test_select_lambda_exact_bar_passes_and_zero_is_added():
    accuracy_of, calls = _fake({0.0: 0.75, 0.5: 0.5, 1.0: 0.25})
    assert select_lambda(accuracy_of, [1.0, 0.5], max_drop=0.25).chosen == 0.5  # 0.5 == 0.75 - 0.25 passes (dyadic)
    assert calls == [0.0, 0.5, 1.0]


def test_select_lambda_fit_split_guard():
    """Validation unchanged, but the fit split loses 2 points at 2e-3: 1e-3 is chosen."""
    table = {0.0: (0.95, 1.0), 1e-3: (0.95, 0.9921875), 2e-3: (0.95, 0.98)}
    sweep = select_lambda(_fake(table)[0], [1e-3, 2e-3], max_drop=0.01)
    assert sweep.chosen == 1e-3 and sweep.fit_accuracies == [1.0, 0.9921875, 0.98]


def test_select_lambda_all_fail_gives_zero_and_bad_grid_is_refused():
    assert select_lambda(_fake({0.0: 0.9, 1e-5: 0.5})[0], [1e-5]).chosen == 0.0
    with pytest.raises(PruneLimitError):
        select_lambda(_fake({})[0], [-1.0])


def test_chance_detection():
    assert near_chance(0.103, 10) and near_chance(0.149, 10) and not near_chance(0.16, 10)
    assert near_chance(0.52, 2) and not near_chance(0.56, 2)
    with pytest.raises(PruneLimitError, match="chance"):
        check_not_chance(0.103, 10, 0.05, 2e-3)
    check_not_chance(0.9, 10, 0.05, 2e-3)


def test_tolerance_and_standard_error():
    # a = 0.96 on n = 400: se = sqrt(0.96 * 0.04 / 400) = 0.0098 (exactly sqrt(0.96 * 0.04) / 20)
    info = tolerance_summary(0.96, 400, 0.01)
    assert info["dense_accuracy_stderr"] == pytest.approx(math.sqrt(0.96 * 0.04) / 20, rel=1e-12)
    assert info["dense_accuracy_stderr_points"] == pytest.approx(0.9797958971, rel=1e-9)
    assert info["tolerance_points"] == pytest.approx(1.0) and info["tolerance_samples"] == pytest.approx(4.0)
    assert info["one_sample_points"] == pytest.approx(0.25) and info["test_size"] == 400
    assert info["tolerance_in_stderr"] == pytest.approx(0.01 / info["dense_accuracy_stderr"])
    assert binomial_stderr(1.0, 10) == 0.0 and tolerance_summary(1.0, 10, 0.0)["tolerance_in_stderr"] == math.inf
    assert binomial_stderr(0.5, 100) == 0.05


def test_prediction_interval():
    out = prediction_interval(0.9, {"eps*0.5": 0.875, "eps*2": 0.9375}, [0.8125, 0.90625])
    assert (out["low"], out["high"]) == (0.8125, 0.9375) and out["width"] == 0.125
    assert (out["eps_low"], out["eps_high"]) == (0.875, 0.9375) and out["probe_spread"] == 0.09375
    assert prediction_interval(0.5, {})["width"] == 0.0
