"""Patient-level conformal sets of `mmil predict --conformal-alpha A --labels CSV --patient-out P`: the mean of each
patient's calibrated slide probabilities against thresholds from the validation patients (aggregated the same way),
checked against a naive loop on a hand-built checkpoint whose calibration data are chosen by construction."""
from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from mmil.calibrate_run import patient_sets, store_calibration
from mmil.checkpoint import save_checkpoint
from mmil.cli import main
from mmil.models import create_model

NAMES = ["normal", "tumor"]
ALPHA = 0.2
MARGIN = 2e-5  # the CSV keeps 6 decimals: a class this close to its threshold is not checked


# ----------------------------------------------------------------------------- naive reference
def naive_quantile(scores, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))-th smallest score, inf past n."""
    s = sorted(scores)
    k = math.ceil((len(s) + 1) * (1 - alpha))
    return math.inf if k > len(s) else s[k - 1]


def naive_patients(probs, case_ids, labels=None):
    """{case: (mean probability vector, label of its first slide)} in order of first appearance, by explicit loops."""
    out: dict[str, list] = {}
    for i, c in enumerate(case_ids):
        if c not in out:
            out[c] = [[], None if labels is None else int(labels[i])]
        out[c][0].append(list(probs[i]))
    return {c: ([sum(col) / len(rows) for col in zip(*rows)], y) for c, (rows, y) in out.items()}


def naive_thresholds(probs, labels, alpha: float, mondrian: bool, n_classes: int = 2) -> list[float]:
    scores = [(1 - p[y], y) for p, y in zip(probs, labels)]
    if not mondrian:
        return [naive_quantile([s for s, _ in scores], alpha)] * n_classes
    return [naive_quantile([s for s, y in scores if y == k], alpha) if any(y == k for _, y in scores) else math.inf
            for k in range(n_classes)]


def softmax_t(logits, t):
    e = [math.exp(z / t) for z in logits]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------- pure function
@pytest.mark.parametrize("mondrian", [False, True])
@pytest.mark.parametrize("with_cases", [True, False])
def test_patient_sets_match_a_naive_loop(mondrian, with_cases):
    rng = np.random.default_rng(1)
    t = 1.6
    cal_logits = rng.normal(0, 2, (41, 2))
    cal_y = rng.integers(0, 2, 41)
    cal_cases = [f"v{int(i)}" for i in rng.integers(0, 17, 41)]
    cal_y = np.array([cal_y[cal_cases.index(c)] for c in cal_cases])  # one label per patient
    calib = {"temperature": t, "logits": cal_logits.tolist(), "labels": cal_y.tolist(), "case_ids": cal_cases if with_cases else None}
    p1 = rng.uniform(0, 1, 30)
    probs = np.stack([1 - p1, p1], 1)
    cases = [f"p{int(i)}" for i in rng.integers(0, 11, 30)]
    got = patient_sets(calib, t, probs, cases, ALPHA, mondrian=mondrian)

    cal_probs = [softmax_t(z, t) for z in cal_logits]
    if with_cases:
        agg = naive_patients(cal_probs, cal_cases, cal_y)
        cal_probs, cal_labels = [p for p, _ in agg.values()], [y for _, y in agg.values()]
    else:
        cal_labels = list(cal_y)
    q = naive_thresholds(cal_probs, cal_labels, ALPHA, mondrian)
    np.testing.assert_allclose(got["thresholds"], q, rtol=0, atol=1e-12)
    assert got["threshold_level"] == ("patient" if with_cases else "slide")
    assert got["n_calibration"] == (len(set(cal_cases)) if with_cases else 41)
    test = naive_patients(probs, cases)
    assert got["case_ids"] == list(test)
    for row, (p, _) in zip(got["sets"], test.values()):
        assert row.tolist() == [1 - p[k] <= q[k] for k in range(2)]


# ----------------------------------------------------------------------------- through `mmil predict`
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 synthetic slides of 8 patients and an untrained (hand-built) ABMIL checkpoint; slide probabilities from predict."""
    root = tmp_path_factory.mktemp("patsets")
    assert main(["synth", "--out", str(root / "d"), "--n-slides", "16", "--seed", "3", "--in-dim", "4", "--min-instances", "10",
                 "--max-instances", "30", "--signal", "6", "--slides-per-case", "2", "--no-progress"]) == 0
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=4, n_classes=2)
    save_checkpoint(root / "ck", model, "abmil", dict(model.init_kwargs), {"class_names": NAMES})
    labels = list(csv.DictReader(open(root / "d" / "labels.csv")))
    return root, labels


def _predict(root, ckpt, *extra):
    """`mmil predict` on the cohort's labelled slides; the slide rows written next to ``ckpt``."""
    out = ckpt.parent / f"{ckpt.name}_p.csv"
    argv = ["predict", "--checkpoint", str(ckpt), "--features", str(root / "d" / "features"), "--labels", str(root / "d" / "labels.csv"),
            "--out", str(out), "--threads", "1", "--no-progress", *extra]
    assert main(argv) == 0
    return list(csv.DictReader(open(out)))


def _calibration_around(target: float, t: float):
    """19 validation patients of 2 slides whose patient scores put the alpha = 0.2 threshold (the 16th smallest of 19)
    exactly at ``target``. A patient's two slides are as far apart as they can be (p_true = 1 - s +- (min(s, 1 - s) - 0.01)),
    so the slide-level threshold (7th largest of 38 slide scores) is far above: 0.99. Logits t * log p."""
    s = np.concatenate([np.linspace(0.3, target - 0.02, 15), [target], np.linspace(target + 0.02, 0.95, 3)])
    y = np.arange(19) % 2
    logits, labels, cases = [], [], []
    for i, (si, yi) in enumerate(zip(s, y)):
        d = min(si, 1 - si) - 0.01
        for sign in (-1, 1):
            p_true = 1 - si + sign * d
            p = [p_true, 1 - p_true] if yi == 0 else [1 - p_true, p_true]
            logits.append([t * math.log(v) for v in p])
            labels.append(int(yi))
            cases.append(f"val_{i:02d}")
    return logits, labels, cases


@pytest.mark.parametrize("mondrian", [False, True])
def test_predict_writes_patient_sets_from_patient_thresholds(cohort, tmp_path, mondrian, capsys):
    root, labels = cohort
    plain = _predict(root, root / "ck")  # slide probabilities at T = 1 (no calibration stored)
    cases = [r["case_id"] for r in labels]
    slide_probs = {r["slide_id"]: [float(r["prob_normal"]), float(r["prob_tumor"])] for r in plain}
    pat = naive_patients([slide_probs[r["slide_id"]] for r in labels], cases)
    tumor_scores = sorted(1 - p[1] for p, _ in pat.values())
    target = (tumor_scores[3] + tumor_scores[4]) / 2  # half the patients keep "tumor" in their set (marginal thresholds)
    t = 1.0  # the test probabilities above are at T = 1; the stored logits are t * log p so softmax(z / t) = p
    logits, cal_y, cal_cases = _calibration_around(target, t)
    ckpt = tmp_path / "ck"
    shutil.copytree(root / "ck", ckpt)
    store_calibration(ckpt, {"temperature": t, "logits": logits, "labels": cal_y, "case_ids": cal_cases})
    out = tmp_path / "patients.csv"
    _predict(root, ckpt, "--conformal-alpha", str(ALPHA), "--patient-out", str(out), *(["--mondrian"] if mondrian else []))
    assert "no case ids" not in capsys.readouterr().err
    rows = list(csv.DictReader(open(out)))
    cal = naive_patients([softmax_t(z, t) for z in logits], cal_cases, cal_y)
    q = naive_thresholds([p for p, _ in cal.values()], [y for _, y in cal.values()], ALPHA, mondrian)
    if not mondrian:
        assert q[0] == pytest.approx(target, abs=1e-9)
        q_slide = naive_thresholds([softmax_t(z, t) for z in logits], cal_y, ALPHA, False)[0]
        assert q_slide > max(1 - p[1] for p, _ in pat.values()) + 0.05  # slide thresholds would give other sets
    assert [r["case_id"] for r in rows] == list(pat)
    checked = 0
    for r, (p, _) in zip(rows, pat.values()):
        np.testing.assert_allclose([float(r["prob_normal"]), float(r["prob_tumor"])], p, atol=2e-6)
        if any(abs(1 - p[k] - q[k]) < MARGIN for k in range(2)):
            continue
        expected = [NAMES[k] for k in range(2) if 1 - p[k] <= q[k]]
        assert r["set"] == "|".join(expected) and r["abstain"] == str(int(len(expected) != 1))
        checked += 1
    assert checked >= 6
    if not mondrian:
        assert {r["abstain"] for r in rows} == {"0", "1"}  # the threshold splits the patients by construction


def test_without_stored_case_ids_the_slide_threshold_is_used_and_said(cohort, tmp_path, capsys):
    root, labels = cohort
    logits, cal_y, _ = _calibration_around(0.6, 1.0)
    ckpt = tmp_path / "ck"
    shutil.copytree(root / "ck", ckpt)
    store_calibration(ckpt, {"temperature": 1.0, "logits": logits, "labels": cal_y, "case_ids": None})
    out = tmp_path / "patients.csv"
    slides = _predict(root, ckpt, "--conformal-alpha", str(ALPHA), "--patient-out", str(out))
    assert "no case ids" in capsys.readouterr().err
    q = naive_thresholds([softmax_t(z, 1.0) for z in logits], cal_y, ALPHA, False)
    slide_probs = {r["slide_id"]: [float(r["prob_normal"]), float(r["prob_tumor"])] for r in slides}
    pat = naive_patients([slide_probs[r["slide_id"]] for r in labels], [r["case_id"] for r in labels])
    for r, (p, _) in zip(csv.DictReader(open(out)), pat.values()):
        if any(abs(1 - p[k] - q[k]) < MARGIN for k in range(2)):
            continue
        assert r["set"] == "|".join(NAMES[k] for k in range(2) if 1 - p[k] <= q[k])
    # the slide file's sets use the same slide threshold
    for r in slides:
        p = slide_probs[r["slide_id"]]
        if all(abs(1 - p[k] - q[k]) >= MARGIN for k in range(2)):
            assert r["set"] == "|".join(NAMES[k] for k in range(2) if 1 - p[k] <= q[k])
    assert json.loads((ckpt / "config.json").read_text())["extra"]["calibration"]["case_ids"] is None
    # evaluate reports the same patient sets through the same function, and says which threshold it used
    named = tmp_path / "labels_named.csv"  # evaluate needs the checkpoint's class names as labels
    named.write_text("slide_id,label,case_id\n" + "".join(f"{r['slide_id']},{NAMES[int(r['label'])]},{r['case_id']}\n" for r in labels))
    assert main(["evaluate", "--checkpoint", str(ckpt), "--features", str(root / "d" / "features"), "--labels", str(named),
                 "--conformal-alpha", str(ALPHA), "--out", str(tmp_path / "e.json"), "--threads", "1", "--no-progress"]) == 0
    assert "no case ids" in capsys.readouterr().out
    block = json.loads((tmp_path / "e.json").read_text())["calibration"]["conformal"]["patient"]
    assert block["threshold_level"] == "slide" and block["thresholds"] == pytest.approx(q, abs=1e-12)
    rows = list(csv.DictReader(open(out)))
    assert block["abstention_rate"] == pytest.approx(np.mean([r["abstain"] == "1" for r in rows]), abs=1e-12)
