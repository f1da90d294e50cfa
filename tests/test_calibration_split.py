"""A calibration split apart from the validation split (`--calib-fraction`): disjoint, stratified, patient-level,
of the requested share, and the slides that fit the temperature and the conformal thresholds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bad_input import assert_refused
from mmil.calibrate_run import stored_calibration
from mmil.cli import main
from mmil.data.splits import plan_folds, with_calibration_sets
from mmil.errors import MMILInputError


def _labels(n: int = 200, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < 0.35).astype(np.int64)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3])
def test_calibration_sets_partition_each_fold_in_the_requested_share(fraction):
    y = _labels()
    plan = with_calibration_sets(plan_folds(y, k=4, seed=0, val_fraction=0.15), y, fraction, seed=0)
    for fs in plan:
        parts = [fs.train, fs.val, fs.test, fs.calib]
        assert sum(len(p) for p in parts) == len(y) and len(np.unique(np.concatenate(parts))) == len(y)
        training_fold = len(fs.train) + len(fs.val) + len(fs.calib)
        # holdout_indices rounds 1/share to a whole number of folds: the share is met to within that rounding
        assert abs(len(fs.calib) / training_fold - fraction) < 0.35 * fraction
        for part in (fs.train, fs.calib):  # stratified: both classes, near the cohort's positive rate
            assert abs(y[part].mean() - y.mean()) < 0.1
        np.testing.assert_array_equal(fs.calibration, fs.calib)


def test_no_patient_crosses_the_calibration_split():
    cases = [f"p{i // 3:02d}" for i in range(180)]
    y = np.repeat(_labels(60, seed=1), 3)
    plan = with_calibration_sets(plan_folds(y, k=3, seed=2, val_fraction=0.2, groups=cases), y, 0.25, seed=2, groups=cases)
    for fs in plan:
        owners = {}
        for name in ("train", "val", "test", "calib"):
            for i in getattr(fs, name):
                assert owners.setdefault(cases[i], name) == name
        assert len(fs.calib) > 0 and len(fs.calib) % 3 == 0


def test_fraction_zero_keeps_the_plan_and_its_json():
    y = _labels(40)
    plan = plan_folds(y, k=2, seed=0, val_fraction=0.2)
    same = with_calibration_sets(plan, y, 0.0)
    ids = [f"s{i}" for i in range(40)]
    assert [fs.to_dict(ids) for fs in same] == [fs.to_dict(ids) for fs in plan]
    assert "calib" not in plan[0].to_dict(ids)
    np.testing.assert_array_equal(plan[0].calibration, plan[0].val)


def test_a_fraction_that_leaves_no_training_bags_is_refused():
    y = _labels(40)
    with pytest.raises(MMILInputError, match="--calib-fraction"):
        with_calibration_sets(plan_folds(y, k=2, seed=0, val_fraction=0.5), y, 0.6)


def test_train_calibrates_on_the_held_out_slides_it_never_trained_or_selected_on(tmp_path):
    data = tmp_path / "synth"
    assert main(["synth", "--out", str(data), "--n-slides", "24", "--seed", "3", "--in-dim", "8", "--min-instances", "10",
                 "--max-instances", "20", "--signal", "6"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--features", str(data / "features"), "--labels", str(data / "labels.csv"), "--out", str(out), "--folds", "2",
                 "--epochs", "2", "--min-epochs", "1", "--model", "abmil", "--val-fraction", "0.2", "--calib-fraction", "0.25",
                 "--no-progress", "--threads", "1"]) == 0
    folds = json.loads((out / "folds.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    for k, fold in enumerate(folds):
        assert fold["calib"] and not set(fold["calib"]) & (set(fold["train"]) | set(fold["val"]) | set(fold["test"]))
        calib = stored_calibration(json.loads((out / f"fold_{k}" / "checkpoint" / "config.json").read_text()))
        assert calib["slide_ids"] == fold["calib"]
        assert metrics["folds"][k]["n_train"] == len(fold["train"]) and metrics["folds"][k]["n_val"] == len(fold["val"])


@pytest.mark.parametrize("value", ["1", "-0.1", "x"])
def test_calib_fraction_outside_zero_one_is_refused(tmp_path, capsys, value):
    assert_refused(main, ["train", "--features", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "o"),
                          "--calib-fraction", value], capsys, names=["--calib-fraction"], watch=[tmp_path])
