"""The measurements of ``docs/calibration.md`` from finished cross-validation runs (no new inference).

For every fold it reads the test probabilities of each repeat (``fold_k/result.json``) and the calibration
stored in the fold's checkpoint, then pools over folds: conformal coverage (with its exact binomial interval),
set size and abstention for several alphas, ECE before/after temperature scaling per fold, and the AUROC with
which three uncertainty scores detect the slides the model gets wrong. Given each slide's patient
(``case_of``), also the coverage of patient-level sets (:func:`mmil.calibrate_run.patient_sets`), with the
thresholds of the validation patients and, for comparison, with the slide thresholds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy.stats import beta

from .calibrate_run import (calibrated_probs, calibration_probs, calibration_report, patient_sets, read_checkpoint_calibration,
                            repeat_spread)
from .calibration import conformal_scores, conformal_threshold, fit_temperature, prediction_sets
from .errors import MMILInputError
from .stats import binary_auc


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial interval of a proportion k / n."""
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return low, high


def conformal_doubt(cal_probs: np.ndarray, cal_y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Mondrian conformal p-value of the runner-up class of each slide: (1 + #{class-k calibration scores >= 1 - p_k}) / (n_k + 1).

    High when the second class cannot be excluded either: the slide's set would hold two classes at alpha below it.
    """
    scores = conformal_scores(cal_probs, cal_y)
    runner_up = np.argsort(probs, axis=1)[:, -2]
    out = np.empty(len(probs))
    for i, k in enumerate(runner_up):
        sk = scores[cal_y == k]
        out[i] = (1 + np.sum(sk >= 1 - probs[i, k])) / (len(sk) + 1)
    return out


def _fold(fold_dir: Path, alphas: Sequence[float]) -> dict[str, Any]:
    r = json.loads((fold_dir / "result.json").read_text())
    calib = read_checkpoint_calibration(fold_dir / "checkpoint")
    probs_r, y = np.asarray(r["probs_repeats"]), np.asarray(r["y_true"], dtype=np.int64)
    t = float(calib["temperature"])
    probs = calibrated_probs(probs_r, t)
    cal_probs, cal_y = calibration_probs(calib, t)
    sets = {(a, m): prediction_sets(probs, conformal_threshold(cal_probs, cal_y, a, mondrian=m)) for a in alphas for m in (False, True)}
    return {"y": y, "sets": sets, "error": (probs.argmax(1) != y).astype(int), "spread": repeat_spread(probs_r),
            "doubt": conformal_doubt(cal_probs, cal_y, probs), "uncertainty": 1 - probs.max(1), "n_cal": len(cal_y),
            "n_cal_zero": int(np.sum(conformal_scores(cal_probs, cal_y) == 0.0)),
            "calibration": r["metrics"].get("calibration")}


def _patient_fold(fold_dir: Path, case_of: dict[str, str], alphas: Sequence[float]) -> dict[tuple[float, str], tuple[np.ndarray, np.ndarray]]:
    """Per (alpha, threshold level): whether each test patient's marginal set covers its label, and the set sizes."""
    r = json.loads((fold_dir / "result.json").read_text())
    calib = read_checkpoint_calibration(fold_dir / "checkpoint")
    t = float(calib["temperature"])
    probs, y = calibrated_probs(np.asarray(r["probs_repeats"]), t), np.asarray(r["y_true"], dtype=np.int64)
    missing = [str(sid) for sid in r["slide_ids"] if str(sid) not in case_of]
    if missing:
        raise MMILInputError(f"{fold_dir}: {len(missing)} test slide(s) have no case_id in the label CSV (e.g. {missing[0]!r}); "
                             "pass the label CSV the run was trained with")
    cases = [case_of[str(sid)] for sid in r["slide_ids"]]
    out = {}
    for a in alphas:
        for level, c in (("patient", calib), ("slide", dict(calib, case_ids=None))):
            ps = patient_sets(c, t, probs, cases, a, labels=y)
            out[(a, level)] = ps["sets"][np.arange(len(ps["labels"])), ps["labels"]], ps["sets"].sum(1)
    return out


def patient_coverage(run_dir: str | Path, case_of: dict[str, str], alphas: Sequence[float] = (0.05, 0.1, 0.2)) -> list[dict[str, Any]]:
    """Pooled out-of-fold coverage of patient-level marginal sets, with patient and with slide thresholds."""
    folds = [_patient_fold(d, case_of, alphas) for d in sorted(Path(run_dir).glob("fold_*")) if (d / "result.json").is_file()]
    rows = []
    for (a, level) in folds[0]:
        covered = np.concatenate([f[(a, level)][0] for f in folds]).astype(int)
        sizes = np.concatenate([f[(a, level)][1] for f in folds])
        low, high = clopper_pearson(int(covered.sum()), len(covered))
        rows.append({"alpha": a, "thresholds": level, "patients": len(covered), "coverage": float(covered.mean()), "ci95": [low, high],
                     "mean_set_size": float(sizes.mean()), "abstention_rate": float((sizes != 1).mean())})
    return rows


def study_run(run_dir: str | Path, alphas: Sequence[float] = (0.05, 0.1, 0.2), case_of: dict[str, str] | None = None) -> dict[str, Any]:
    """Pooled out-of-fold conformal coverage, ECE per fold and error-detection AUROCs of one run directory
    (and patient-level coverage when ``case_of`` maps slide ids to patients)."""
    run_dir = Path(run_dir)
    folds = [_fold(d, alphas) for d in sorted(run_dir.glob("fold_*")) if (d / "result.json").is_file()]
    if not folds:
        raise MMILInputError(f"{run_dir}: no finished fold (fold_*/result.json); give the directory of an `mmil train` run")
    y = np.concatenate([f["y"] for f in folds])
    out: dict[str, Any] = {"run": str(run_dir), "n_test": int(len(y)), "n_folds": len(folds),
                           "n_calibration_per_fold": [f["n_cal"] for f in folds], "conformal": [],
                           "zero_scores_per_fold": [f["n_cal_zero"] for f in folds]}
    for a in alphas:
        for m in (False, True):
            sets = np.concatenate([f["sets"][(a, m)] for f in folds])
            covered = int(sets[np.arange(len(y)), y].sum())
            low, high = clopper_pearson(covered, len(y))
            per_fold = [float(f["sets"][(a, m)][np.arange(len(f["y"])), f["y"]].mean()) for f in folds]
            out["conformal"].append({"alpha": a, "mondrian": m, "coverage": covered / len(y), "ci95": [low, high], "per_fold": per_fold,
                                     "mean_set_size": float(sets.sum(1).mean()), "abstention_rate": float((sets.sum(1) != 1).mean())})
    err = np.concatenate([f["error"] for f in folds])
    out["n_errors"] = int(err.sum())
    out["error_auroc"] = {name: binary_auc(err, np.concatenate([f[name] for f in folds])) for name in ("spread", "doubt", "uncertainty")}
    out["folds"] = [f["calibration"] for f in folds]
    if case_of:
        out["patients"] = patient_coverage(run_dir, case_of, alphas)
    return out


def _refit_fold(fold_dir: Path, priors: Sequence[float | None]) -> dict[float | None, dict[str, float]]:
    """Per prior: :func:`mmil.calibrate_run.calibration_report` of the fold's test probabilities under the
    temperature refitted on the stored validation logits with that prior."""
    r = json.loads((fold_dir / "result.json").read_text())
    calib = read_checkpoint_calibration(fold_dir / "checkpoint")
    z_val, y_val = np.asarray(calib["logits"]), np.asarray(calib["labels"], dtype=np.int64)
    probs_r, y = np.asarray(r["probs_repeats"]), np.asarray(r["y_true"], dtype=np.int64)
    return {prior: calibration_report(y, probs_r, fit_temperature(z_val, y_val, prior_std=prior)) for prior in priors}


def compare_temperature_priors(run_dirs: Sequence[str | Path], priors: Sequence[float | None] = (None, 1.0)) -> list[dict[str, Any]]:
    """Test-fold ECE, Brier score and NLL after temperatures refitted (no new inference) on every fold of
    ``run_dirs`` under each prior std (``None``: maximum likelihood), with the number of folds on which ECE
    and NLL did not worsen."""
    folds = [_refit_fold(d, priors) for run in run_dirs for d in sorted(Path(run).glob("fold_*")) if (d / "result.json").is_file()]
    if not folds:
        raise MMILInputError(f"no finished fold (fold_*/result.json) under {', '.join(map(str, run_dirs))}")
    rows = []
    for prior in priors:
        reports = [f[prior] for f in folds]
        row: dict[str, Any] = {k: float(np.mean([r[k] for r in reports])) for k in reports[0] if k != "temperature"}
        for name in ("ece", "nll"):
            row[f"{name}_not_worse"] = int(sum(r[f"{name}_after"] <= r[f"{name}_before"] + 1e-12 for r in reports))
        rows.append(row | {"prior_std": prior, "folds": len(reports), "median_temperature": float(np.median([r["temperature"] for r in reports]))})
    return rows


def priors_markdown(rows: list[dict[str, Any]], name: str) -> str:
    """One table of :func:`compare_temperature_priors`."""
    lines = [f"#### {name}: temperature fit ({rows[0]['folds']} folds)", "",
             "| fit | median T | ECE raw -> scaled | folds ECE not worse | Brier raw -> scaled | NLL raw -> scaled | folds NLL not worse |",
             "|---|---:|---|---:|---|---|---:|"]
    for r in rows:
        fit = "maximum likelihood" if r["prior_std"] is None else f"MAP, log T ~ N(0, {r['prior_std']:g}^2)"
        lines.append(f"| {fit} | {r['median_temperature']:.3f} | {r['ece_before']:.4f} -> {r['ece_after']:.4f} | {r['ece_not_worse']} | "
                     f"{r['brier_before']:.4f} -> {r['brier_after']:.4f} | {r['nll_before']:.4f} -> {r['nll_after']:.4f} | {r['nll_not_worse']} |")
    return "\n".join(lines) + "\n"


def _ties_note(study: dict[str, Any]) -> str:
    """A sentence on calibration scores that are exactly 0 (saturated probabilities): tied scores make the conformal
    threshold 0 and coverage the share of test slides that saturate too, not 1 - alpha."""
    zeros = study.get("zero_scores_per_fold") or []
    return f" Calibration scores exactly 0 (p_y = 1 in float64) per fold: {zeros}." if any(zeros) else ""


def study_markdown(study: dict[str, Any], name: str) -> str:
    """Markdown tables of one :func:`study_run`."""
    lines = [f"### {name}", "", f"{study['n_folds']} folds, {study['n_test']} out-of-fold test slides, "
             f"calibration slides per fold: {study['n_calibration_per_fold']}, {study['n_errors']} misclassified."
             + _ties_note(study), "",
             "| alpha | thresholds | coverage | 95% binomial CI | within 0.03 of 1-alpha | per fold | mean set size | abstention |",
             "|---:|---|---:|---|---|---|---:|---:|"]
    for c in study["conformal"]:
        ok = "yes" if abs(c["coverage"] - (1 - c["alpha"])) <= 0.03 else "no"
        lines.append(f"| {c['alpha']} | {'Mondrian' if c['mondrian'] else 'marginal'} | {c['coverage']:.3f} | "
                     f"[{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | {ok} | {' '.join(f'{v:.2f}' for v in c.get('per_fold', []))} | "
                     f"{c['mean_set_size']:.3f} | {c['abstention_rate']:.3f} |")
    lines += ["", "| fold | T | ECE before | ECE after | Brier before | Brier after |", "|---:|---:|---:|---:|---:|---:|"]
    for k, f in enumerate(study["folds"]):
        lines.append(f"| {k} | {f['temperature']:.3f} | {f['ece_before']:.4f} | {f['ece_after']:.4f} | {f['brier_before']:.4f} | {f['brier_after']:.4f} |")
    mean = {key: np.mean([f[key] for f in study["folds"]]) for key in ("ece_before", "ece_after", "brier_before", "brier_after")}
    lines.append(f"| mean | | {mean['ece_before']:.4f} | {mean['ece_after']:.4f} | {mean['brier_before']:.4f} | {mean['brier_after']:.4f} |")
    if study.get("patients"):
        lines += ["", f"Patient level ({study['patients'][0]['patients']} test patients, marginal sets on the mean slide probability):", "",
                  "| alpha | thresholds from | coverage | 95% binomial CI | mean set size | abstention |", "|---:|---|---:|---|---:|---:|"]
        lines += [f"| {c['alpha']} | validation {c['thresholds']}s | {c['coverage']:.3f} | [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | "
                  f"{c['mean_set_size']:.3f} | {c['abstention_rate']:.3f} |" for c in study["patients"]]
    a = study["error_auroc"]
    if study["n_errors"] == 0:
        lines += ["", "Error-detection AUROC: not defined (no misclassified slide).", ""]
        return "\n".join(lines)
    lines += ["", f"Error-detection AUROC: repeats spread {a['spread']:.3f}, conformal doubt (Mondrian p-value of the runner-up class) "
              f"{a['doubt']:.3f}, 1 - max probability {a['uncertainty']:.3f}.", ""]
    return "\n".join(lines)
