"""Calibrated predictions end to end: temperature stored by `mmil train`, applied by predict/evaluate;
conformal sets and abstention that follow the stored thresholds; one-line refusals."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from scipy.special import softmax

from bad_input import assert_refused
from mmil.calibrate_run import (
    by_patient,
    fit_calibration,
    repeat_spread,
    store_calibration,
    stored_calibration,
    summarize_calibration,
)
from mmil.calibration import apply_temperature, conformal_threshold, fit_temperature
from mmil.cli import main

TINY_MMIL = ["--model", "mmil", "--embed-dim", "16", "--heads", "2", "--head-dim", "8", "--num-subbags", "3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tmp_path_factory.mktemp("calsynth")
    assert main(["synth", "--out", str(data), "--n-slides", "16", "--seed", "5", "--in-dim", "8", "--min-instances", "20",
                 "--max-instances", "50", "--signal", "6", "--slides-per-case", "2"]) == 0
    out = data / "run"
    assert main(["train", "--features", str(data / "features"), "--labels", str(data / "labels.csv"), "--out", str(out), "--folds", "2",
                 "--epochs", "2", "--min-epochs", "1", "--repeats", "2", "--val-fraction", "0.3", "--no-progress", "--threads", "1", *TINY_MMIL]) == 0
    return data, out


@pytest.fixture()
def rich_ckpt(run, tmp_path):
    """Fold 0's checkpoint with calibration data of our choosing (24 validation slides, 12 patients), so thresholds are finite."""
    _, out = run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "fold_0" / "checkpoint", ckpt)
    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 12)
    p1 = np.clip(0.5 + 0.35 * (2 * y - 1) + rng.normal(0, 0.25, (2, 24)), 0.01, 0.99)
    probs_r = np.stack([1 - p1, p1], axis=-1)
    store_calibration(ckpt, fit_calibration(probs_r, y, [f"case_{i // 2:02d}" for i in range(24)]))
    return ckpt


def _predict(data, ckpt, out, *extra) -> list[dict[str, str]]:
    assert main(["predict", "--checkpoint", str(ckpt), "--features", str(data / "features"), "--out", str(out), "--threads", "1", *extra]) == 0
    return list(csv.DictReader(open(out)))


def _probs(rows) -> np.ndarray:
    return np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in rows])


def test_train_stores_the_temperature_and_reports_calibration(run):
    _, out = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "reliability.png").stat().st_size > 0
    for k in range(2):
        calib = stored_calibration(json.loads((out / f"fold_{k}" / "checkpoint" / "config.json").read_text()))
        logits, y = np.asarray(calib["logits"]), np.asarray(calib["labels"])
        assert calib["temperature_prior_std"] == 1.0  # the default MAP fit
        assert calib["temperature"] == pytest.approx(fit_temperature(logits, y, prior_std=1.0), rel=1e-6)
        assert len(calib["case_ids"]) == len(y) == len(calib["scores"]) == metrics["folds"][k]["n_val"]
        for key in ("temperature", "ece_before", "ece_after", "brier_before", "brier_after"):
            assert metrics["folds"][k][key] == pytest.approx(json.loads((out / f"fold_{k}" / "result.json").read_text())["metrics"]["calibration"][key])
    assert metrics["calibration"]["ece_after"] == pytest.approx(np.mean([f["ece_after"] for f in metrics["folds"]]))


def test_predict_applies_softmax_of_logits_over_temperature(run, tmp_path):
    import torch

    from mmil.data import load_dataset
    from mmil.evaluate import forward_bag, load_for_inference

    data, out = run
    ckpt = out / "fold_0" / "checkpoint"
    scaled, raw = _probs(_predict(data, ckpt, tmp_path / "t.csv")), _probs(_predict(data, ckpt, tmp_path / "r.csv", "--no-temperature"))
    model, ds, cfg = load_for_inference(ckpt, load_dataset(data / "features", None).without_labels())
    temperature = cfg["extra"]["calibration"]["temperature"]
    with torch.no_grad():
        logits = np.stack([forward_bag(model, ds[i], device=torch.device("cpu"), seed=0).logits[0].double().numpy() for i in range(len(ds))])
    np.testing.assert_allclose(scaled, softmax(logits / temperature, axis=1), atol=2e-6)
    np.testing.assert_allclose(raw, softmax(logits, axis=1), atol=2e-6)


@pytest.mark.parametrize("mondrian", [False, True])
def test_conformal_columns_follow_the_stored_thresholds(run, rich_ckpt, tmp_path, mondrian):
    data, _ = run
    rows = _predict(data, rich_ckpt, tmp_path / "p.csv", "--repeats", "2", "--conformal-alpha", "0.2", *(["--mondrian"] if mondrian else []))
    calib = stored_calibration(json.loads((rich_ckpt / "config.json").read_text()))
    q = conformal_threshold(apply_temperature(np.asarray(calib["logits"]), calib["temperature"]), np.asarray(calib["labels"]), 0.2, mondrian=mondrian)
    assert np.isfinite(q).all()
    probs = _probs(rows)
    for r, p in zip(rows, probs):
        if np.any(np.abs(1 - p - q) < 2e-6):
            continue  # rounding in the CSV could flip a class sitting on its threshold
        expected = [k for k in range(2) if 1 - p[k] <= q[k]]
        assert r["set"] == "|".join(map(str, expected))
        assert r["abstain"] == str(int(len(expected) != 1))
        assert float(r["repeat_std"]) >= 0


def _naive_sets(probs: np.ndarray, q: np.ndarray) -> list[set[int]]:
    return [{k for k in range(len(q)) if 1.0 - p[k] <= q[k]} for p in probs]


def _naive_metrics(sets: list[set[int]], y) -> dict[str, float]:
    return {"coverage": sum(int(t) in s for s, t in zip(sets, y)) / len(y), "mean_set_size": sum(map(len, sets)) / len(y),
            "abstention_rate": sum(len(s) != 1 for s in sets) / len(y)}


def test_evaluate_reports_coverage_set_size_and_abstention(run, rich_ckpt, tmp_path):
    data, _ = run
    assert main(["evaluate", "--checkpoint", str(rich_ckpt), "--features", str(data / "features"), "--labels", str(data / "labels.csv"),
                 "--repeats", "2", "--conformal-alpha", "0.2", "--out", str(tmp_path / "e.json"), "--threads", "1"]) == 0
    block = json.loads((tmp_path / "e.json").read_text())["calibration"]
    rows = _predict(data, rich_ckpt, tmp_path / "p.csv", "--repeats", "2")
    labels = {r["slide_id"]: r for r in csv.DictReader(open(data / "labels.csv"))}
    y = [int(labels[r["slide_id"]]["label"]) for r in rows]
    calib = stored_calibration(json.loads((rich_ckpt / "config.json").read_text()))
    cal_probs = apply_temperature(np.asarray(calib["logits"]), calib["temperature"])
    probs = _probs(rows)
    q = conformal_threshold(cal_probs, np.asarray(calib["labels"]), 0.2)
    for key, value in _naive_metrics(_naive_sets(probs, q), y).items():
        assert block["conformal"]["slide"][key] == pytest.approx(value, abs=1e-9), key
    cases = [labels[r["slide_id"]]["case_id"] for r in rows]
    order = list(dict.fromkeys(cases))
    p_probs = np.array([probs[[c == case for c in cases]].mean(0) for case in order])
    p_y = [y[cases.index(case)] for case in order]
    cal_cases = calib["case_ids"]
    cal_order = list(dict.fromkeys(cal_cases))
    cal_p = np.array([cal_probs[[c == case for c in cal_cases]].mean(0) for case in cal_order])
    qp = conformal_threshold(cal_p, np.array([calib["labels"][cal_cases.index(c)] for c in cal_order]), 0.2)
    for key, value in _naive_metrics(_naive_sets(p_probs, qp), p_y).items():
        assert block["conformal"]["patient"][key] == pytest.approx(value, abs=1e-5), key
    assert block["ece_before"] >= 0 and block["temperature_applied"]


@pytest.mark.parametrize("alpha", ["0", "1", "1.5", "-0.1"])
def test_alpha_outside_the_open_unit_interval_is_refused(run, tmp_path, capsys, alpha):
    data, out = run
    argv = ["predict", "--checkpoint", str(out / "fold_0" / "checkpoint"), "--features", str(data / "features"),
            "--out", str(tmp_path / "p.csv"), "--conformal-alpha", alpha]
    assert_refused(main, argv, capsys, names=["--conformal-alpha"], watch=[tmp_path])


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_checkpoint_without_calibration_data_is_refused(run, tmp_path, capsys, command):
    data, out = run
    ckpt = tmp_path / "old"
    shutil.copytree(out / "fold_0" / "checkpoint", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["extra"]["calibration"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    target = tmp_path / ("p.csv" if command == "predict" else "e.json")
    argv = [command, "--checkpoint", str(ckpt), "--features", str(data / "features"), "--out", str(target), "--conformal-alpha", "0.1"]
    if command == "evaluate":
        argv += ["--labels", str(data / "labels.csv")]
    line = assert_refused(main, argv, capsys, names=[str(ckpt), "calibration"], watch=[tmp_path])
    assert "--conformal-alpha" in line


def test_patient_aggregation_spread_and_summary():
    ids, probs, y = by_patient(np.array([[0.2, 0.8], [0.6, 0.4], [0.9, 0.1]]), ["b", "a", "b"], np.array([1, 0, 1]))
    assert ids == ["b", "a"]
    np.testing.assert_allclose(probs, [[0.55, 0.45], [0.6, 0.4]])
    assert y.tolist() == [1, 0]
    probs_r = np.array([[[0.3, 0.7], [0.5, 0.5]], [[0.1, 0.9], [0.5, 0.5]]])
    np.testing.assert_allclose(repeat_spread(probs_r), [0.1, 0.0])
    s = summarize_calibration([{"temperature": 2.0, "ece_before": 0.2, "ece_after": 0.1, "brier_before": 0.3, "brier_after": 0.2}, None,
                               {"temperature": 1.0, "ece_before": 0.1, "ece_after": 0.1, "brier_before": 0.2, "brier_after": 0.2}])
    assert s["n_folds"] == 2 and s["ece_not_worse_folds"] == 2 and s["ece_improved_folds"] == 1
    assert s["ece_after"] == pytest.approx(0.1)


def test_calibration_study_of_a_run(run):
    from scipy.stats import binomtest

    from mmil.calibration_study import clopper_pearson, study_markdown, study_run

    ci = binomtest(17, 20).proportion_ci(0.95, method="exact")
    assert clopper_pearson(17, 20) == pytest.approx((ci.low, ci.high))
    _, out = run
    study = study_run(out, alphas=(0.5,))
    assert study["n_test"] == 16 and len(study["conformal"]) == 2 and len(study["folds"]) == 2
    assert set(study["error_auroc"]) == {"spread", "doubt", "uncertainty"}
    assert "| 0.5 | marginal |" in study_markdown(study, "tiny")


def test_calibration_study_patient_coverage_against_a_naive_loop(run):
    """Patient sets: mean slide probability per patient (softmax(log mean_r p / T)), split-conformal quantile
    q = the ceil((n + 1)(1 - alpha))-th smallest validation-patient score, covered when 1 - p_y <= q."""
    import csv
    import json
    import math

    from mmil.calibrate_run import read_checkpoint_calibration
    from mmil.calibration_study import study_markdown, study_run

    data, out = run
    case_of = {r["slide_id"]: r["case_id"] for r in csv.DictReader((data / "labels.csv").open())}
    alpha = 0.5
    study = study_run(out, alphas=(alpha,), case_of=case_of)
    covered = {"patient": [], "slide": []}
    for fold in sorted(out.glob("fold_*")):
        r = json.loads((fold / "result.json").read_text())
        calib = read_checkpoint_calibration(fold / "checkpoint")
        t = calib["temperature"]

        def soft(z):
            z = np.asarray(z, dtype=np.float64) / t
            e = np.exp(z - z.max())
            return e / e.sum()

        def per_patient(prob_rows, cases, labels):
            groups = {}
            for p, c, y in zip(prob_rows, cases, labels):
                groups.setdefault(c, ([], y))[0].append(p)
            return [(np.mean(ps, axis=0), y) for ps, y in groups.values()]

        val_probs = [soft(z) for z in calib["logits"]]
        test_probs = [soft(np.log(np.mean(np.asarray(r["probs_repeats"])[:, i], axis=0))) for i in range(len(r["y_true"]))]
        test = per_patient(test_probs, [case_of[s] for s in r["slide_ids"]], r["y_true"])
        for level, cases in (("patient", calib["case_ids"]), ("slide", [str(i) for i in range(len(val_probs))])):
            scores = sorted(1 - p[y] for p, y in per_patient(val_probs, cases, calib["labels"]))
            k = math.ceil((len(scores) + 1) * (1 - alpha))
            q = scores[k - 1] if k <= len(scores) else math.inf
            covered[level] += [1 - p[y] <= q + 1e-12 for p, y in test]
    rows = {row["thresholds"]: row for row in study["patients"]}
    assert rows["patient"]["patients"] == len(covered["patient"]) == 8  # 16 test slides, 2 per patient
    for level in ("patient", "slide"):
        assert rows[level]["coverage"] == pytest.approx(np.mean(covered[level]))
    assert "validation patients" in study_markdown(study, "tiny")
    from mmil.errors import MMILInputError

    with pytest.raises(MMILInputError, match="no case_id in the label CSV"):
        study_run(out, alphas=(alpha,), case_of={k: v for k, v in list(case_of.items())[1:]})


def test_refitted_temperatures_reproduce_the_training_report_and_the_direct_fit(run, tmp_path):
    """compare_temperature_priors refits T from the stored validation logits: under the prior training used it
    gives the ECE/Brier that `mmil train` reported; under no prior, the plain maximum-likelihood fit."""
    from mmil.calibration_study import compare_temperature_priors, priors_markdown
    from mmil.errors import MMILInputError

    _, out = run
    metrics = json.loads((out / "metrics.json").read_text())
    same, mle = compare_temperature_priors([out], [1.0, None])
    assert same["folds"] == mle["folds"] == 2
    for key in ("ece_before", "ece_after", "brier_before", "brier_after"):
        assert same[key] == pytest.approx(metrics["calibration"][key], abs=1e-9)
    direct = [fit_temperature(np.asarray(c["logits"]), np.asarray(c["labels"]))
              for c in (stored_calibration(json.loads((out / f"fold_{k}" / "checkpoint" / "config.json").read_text())) for k in range(2))]
    assert mle["median_temperature"] == pytest.approx(float(np.median(direct)), rel=1e-9)
    assert "| maximum likelihood |" in priors_markdown([same, mle], "tiny")
    with pytest.raises(MMILInputError, match="no finished fold"):
        compare_temperature_priors([tmp_path])
