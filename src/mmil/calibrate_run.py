"""Calibration of trained folds: fit on validation slides, keep it in the checkpoint, apply it at inference.

The math lives in :mod:`mmil.calibration`; this module ties it to runs and checkpoints.

- "Logits" of a slide are ``log(mean_r p_r)``: the log of its probabilities averaged over the R
  seeded repeats (with R = 1 this is the model's log-softmax, so ``softmax(z / T)`` equals
  ``softmax(model logits / T)``).
- :func:`fit_fold_calibration` fits the temperature T on a fold's validation slides and keeps
  what conformal sets need later: the validation logits, labels and case ids.
- :func:`store_calibration` writes it under ``extra.calibration`` of the checkpoint's ``config.json``.
- :func:`conformal_thresholds` (with :func:`~mmil.calibration.prediction_sets`) gives split-conformal (or Mondrian) sets at slide or patient level
  from the stored validation slides.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .calibration import (
    apply_temperature,
    brier_score,
    conformal_scores,
    conformal_threshold,
    expected_calibration_error,
    fit_temperature,
    nll,
    prediction_sets,
    probs_to_logits,
    set_metrics,
)
from .errors import MMILInputError

CALIBRATION_KEY = "calibration"


def repeat_logits(probs_r: np.ndarray) -> np.ndarray:
    """``log(mean_r p_r)`` of probabilities ``(R, n, C)`` (or ``(n, C)``): logits up to a per-slide constant."""
    probs_r = np.asarray(probs_r, dtype=np.float64)
    return probs_to_logits(probs_r.mean(0) if probs_r.ndim == 3 else probs_r)


def repeat_spread(probs_r: np.ndarray) -> np.ndarray:
    """Per slide: standard deviation over the repeats of the probability of the predicted (repeat-averaged argmax) class."""
    probs_r = np.asarray(probs_r, dtype=np.float64)
    pred = probs_r.mean(0).argmax(1)
    return probs_r[:, np.arange(probs_r.shape[1]), pred].std(0)


def fit_calibration(probs_r: np.ndarray, labels: np.ndarray, case_ids: Sequence[str] | None = None, prior_std: float | None = None) -> dict[str, Any]:
    """Temperature fitted on validation probabilities ``(R, n, C)`` (:func:`~mmil.calibration.fit_temperature`,
    ``prior_std``) and the validation data conformal sets need."""
    logits, y = repeat_logits(probs_r), np.asarray(labels, dtype=np.int64)
    temperature = fit_temperature(logits, y, prior_std=prior_std)
    return {"temperature": temperature, "temperature_prior_std": prior_std, "logits": logits.tolist(), "labels": y.tolist(),
            "scores": conformal_scores(apply_temperature(logits, temperature), y).tolist(),
            "case_ids": None if case_ids is None else [str(c) for c in case_ids]}


def fit_fold_calibration(model, val, *, seed: int, repeats: int, device, precision: str, prior_std: float | None = None) -> dict[str, Any] | None:
    """:func:`fit_calibration` on a fold's validation slides, predicted as the test slides are (``seed``, ``repeats``);
    ``None`` without validation slides."""
    from .evaluate import predict_probs

    if val is None or len(val) == 0:
        return None
    probs_r = predict_probs(model, val, seed=seed, repeats=repeats, device=device, precision=precision)
    return dict(fit_calibration(probs_r, val.labels, val.case_ids, prior_std), repeats=repeats, seed=seed, slide_ids=list(val.slide_ids))


def store_calibration(checkpoint_dir: str | Path, calibration: dict[str, Any]) -> None:
    """Write ``calibration`` under ``extra.calibration`` of the checkpoint's ``config.json`` (atomically)."""
    from .checkpoint import CONFIG_NAME, read_checkpoint_config
    from mmpl.jsonio import write_json

    cfg = read_checkpoint_config(checkpoint_dir)
    cfg.setdefault("extra", {})[CALIBRATION_KEY] = calibration
    write_json(Path(checkpoint_dir) / CONFIG_NAME, cfg)


def stored_calibration(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The calibration stored in a checkpoint config, or ``None``."""
    calib = (cfg.get("extra") or {}).get(CALIBRATION_KEY)
    return calib if isinstance(calib, dict) and "temperature" in calib else None


def require_calibration(cfg: dict[str, Any], checkpoint_dir: str | Path) -> dict[str, Any]:
    """The stored calibration, or a one-line error naming the checkpoint."""
    calib = stored_calibration(cfg)
    if calib is None or not calib.get("labels"):
        raise MMILInputError(f"{checkpoint_dir}: checkpoint holds no calibration data (validation scores); "
                             "--conformal-alpha needs a checkpoint written by `mmil train` with this version")
    return calib


def temperature_of(cfg: dict[str, Any], use_temperature: bool = True) -> float:
    """The stored temperature (1 when off or absent)."""
    calib = stored_calibration(cfg)
    return float(calib["temperature"]) if use_temperature and calib is not None else 1.0


def calibrated_probs(probs_r: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(mean_r p_r) / T)``."""
    return apply_temperature(repeat_logits(probs_r), temperature)


def calibration_report(y: np.ndarray, probs_r: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE (adaptive bins), Brier score and NLL of the repeat-averaged probabilities before and after scaling by T."""
    y = np.asarray(y, dtype=np.int64)
    logits = repeat_logits(probs_r)
    before, after = apply_temperature(logits, 1.0), apply_temperature(logits, temperature)
    return {"temperature": float(temperature), "ece_before": expected_calibration_error(before, y),
            "ece_after": expected_calibration_error(after, y), "brier_before": brier_score(before, y),
            "brier_after": brier_score(after, y), "nll_before": nll(logits, y), "nll_after": nll(logits, y, temperature)}


# ----------------------------------------------------------------------------- patients and conformal sets
def by_patient(probs: np.ndarray, case_ids: Sequence[str], labels: np.ndarray | None = None):
    """Mean slide probability per patient (patients in order of first appearance):
    ``(case ids, probs (P, C), labels (P,) or None)``; a patient's label is that of its first slide."""
    order = list(dict.fromkeys(case_ids))
    index = {c: i for i, c in enumerate(order)}
    rows = np.array([index[c] for c in case_ids])
    probs = np.asarray(probs, dtype=np.float64)
    out = np.zeros((len(order), probs.shape[1]))
    np.add.at(out, rows, probs)
    out /= np.bincount(rows, minlength=len(order))[:, None]
    if labels is None:
        return order, out, None
    first = {c: int(y) for c, y in zip(reversed(list(case_ids)), reversed(list(labels)))}
    return order, out, np.array([first[c] for c in order], dtype=np.int64)


def calibration_probs(calib: dict[str, Any], temperature: float, patient: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The stored validation slides' probabilities at ``temperature`` and their labels (per patient when ``patient``
    and case ids were stored; otherwise each slide counts as its own patient)."""
    probs = apply_temperature(np.asarray(calib["logits"], dtype=np.float64), temperature)
    y = np.asarray(calib["labels"], dtype=np.int64)
    if patient and calib.get("case_ids"):
        _, probs, y = by_patient(probs, calib["case_ids"], y)
    return probs, y


def conformal_thresholds(calib: dict[str, Any], temperature: float, alpha: float, *, mondrian: bool = False,
                         patient: bool = False) -> np.ndarray:
    """Per-class split-conformal thresholds from the stored validation slides (or patients)."""
    if not 0.0 < alpha < 1.0:
        raise MMILInputError(f"--conformal-alpha must be in (0, 1), got {alpha}")
    probs, y = calibration_probs(calib, temperature, patient)
    return conformal_threshold(probs, y, alpha, mondrian=mondrian)


def patient_sets(calib: dict[str, Any], temperature: float, probs: np.ndarray, case_ids: Sequence[str], alpha: float, *,
                 mondrian: bool = False, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Patient-level conformal sets: class k is in patient P's set when ``1 - mean_{slides s of P} p_sk <= q_k``, with
    ``q_k`` from the validation patients' scores aggregated the same way (:func:`calibration_probs` with ``patient=True``;
    each validation slide its own patient when the checkpoint stores no case ids, ``threshold_level`` says which).
    Returns ``case_ids``, patient ``probs`` (P, C), ``labels`` (or None), ``sets`` (P, C), ``thresholds``, ``n_calibration``."""
    order, p_probs, p_y = by_patient(probs, list(case_ids), labels)
    q = conformal_thresholds(calib, temperature, alpha, mondrian=mondrian, patient=True)
    known = bool(calib.get("case_ids"))
    return {"case_ids": order, "probs": p_probs, "labels": p_y, "sets": prediction_sets(p_probs, q), "thresholds": q,
            "n_calibration": len(set(calib["case_ids"])) if known else len(calib["labels"]),
            "threshold_level": "patient" if known else "slide"}


PATIENT_THRESHOLD_NOTE = ("the checkpoint stores no case ids for its validation slides, so the patient thresholds are the slide "
                          "thresholds (each validation slide its own patient): coverage is guaranteed only for one-slide patients")


def set_labels(sets: np.ndarray, class_names: Sequence[str] | None = None) -> list[str]:
    """``"normal|tumor"``-style text of each prediction set (class names, indices without them; empty set -> ``""``)."""
    names = [str(c) for c in class_names] if class_names else None
    return ["|".join(names[k] if names else str(k) for k in np.flatnonzero(row)) for row in np.asarray(sets, dtype=bool)]


def conformal_report(calib: dict[str, Any], temperature: float, probs: np.ndarray, y: np.ndarray, alpha: float, *,
                     mondrian: bool = False, case_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Coverage, mean set size and abstention rate of the sets on labelled slides, and per patient with ``case_ids``."""
    q = conformal_thresholds(calib, temperature, alpha, mondrian=mondrian)
    out: dict[str, Any] = {"alpha": alpha, "mondrian": mondrian, "thresholds": q.tolist(), "n_calibration": len(calib["labels"]),
                           "slide": set_metrics(prediction_sets(probs, q), y)}
    if case_ids is not None:
        ps = patient_sets(calib, temperature, probs, case_ids, alpha, mondrian=mondrian, labels=y)
        out["patient"] = dict(set_metrics(ps["sets"], ps["labels"]), n_patients=len(ps["labels"]), n_calibration=ps["n_calibration"],
                              thresholds=ps["thresholds"].tolist(), threshold_level=ps["threshold_level"])
    return out


def evaluate_calibration(cfg: dict[str, Any], checkpoint_dir: str | Path, dataset, probs_r: np.ndarray, *,
                         use_temperature: bool = True, alpha: float | None = None, mondrian: bool = False) -> dict[str, Any]:
    """The ``calibration`` block of ``mmil evaluate``: ECE/Brier before and after T, and conformal set metrics with ``alpha``."""
    calib = require_calibration(cfg, checkpoint_dir) if alpha is not None else stored_calibration(cfg)
    temperature = temperature_of(cfg, use_temperature)
    out: dict[str, Any] = dict(calibration_report(dataset.labels, probs_r, temperature), temperature_applied=use_temperature and calib is not None)
    if alpha is not None:
        out["conformal"] = conformal_report(calib, temperature, calibrated_probs(probs_r, temperature), dataset.labels, alpha,
                                            mondrian=mondrian, case_ids=dataset.case_ids)
    return out


def read_checkpoint_calibration(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The calibration stored in a checkpoint directory, or ``None``."""
    path = Path(checkpoint_dir) / "config.json"
    return stored_calibration(json.loads(path.read_text())) if path.is_file() else None


# ----------------------------------------------------------------------------- cross-validation folds
def calibrate_fold(model, val, checkpoint_dir: str | Path, y_test: np.ndarray, probs_r: np.ndarray, *, seed: int, repeats: int,
                   device, precision: str, prior_std: float | None = None) -> dict[str, float] | None:
    """Fit T on the fold's calibration (or validation) slides ``val``, store it in the fold's checkpoint and report
    ECE/Brier of the test probabilities ``probs_r`` before and after; ``None`` without such slides."""
    calib = fit_fold_calibration(model, val, seed=seed, repeats=repeats, device=device, precision=precision, prior_std=prior_std)
    if calib is None:
        return None
    store_calibration(checkpoint_dir, calib)
    return calibration_report(y_test, probs_r, calib["temperature"])


CALIBRATION_FIELDS = ("temperature", "ece_before", "ece_after", "brier_before", "brier_after")


def fold_calibration_fields(metrics: dict[str, Any]) -> dict[str, float]:
    """The flat calibration entries of a fold's ``metrics.json`` row (empty for folds run without calibration)."""
    report = metrics.get("calibration") or {}
    return {k: report[k] for k in CALIBRATION_FIELDS if k in report}


def summarize_calibration(reports: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Means over folds of the calibration fields, and how many folds ECE did not worsen / improved on."""
    reports = [r for r in reports if r]
    if not reports:
        return {}
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in reports])) for k in CALIBRATION_FIELDS}
    out["ece_not_worse_folds"] = int(sum(r["ece_after"] <= r["ece_before"] + 1e-12 for r in reports))
    out["ece_improved_folds"] = int(sum(r["ece_after"] < r["ece_before"] for r in reports))
    out["n_folds"] = len(reports)
    return out


def plot_run_reliability(outcomes, path: str | Path, *, title: str) -> None:
    """``reliability.png`` of a run from its folds' raw test probabilities and temperatures (folds without one use T = 1)."""
    from .plot_reliability import plot_reliability

    temps = [(o.metrics.get("calibration") or {}).get("temperature", 1.0) for o in outcomes]
    after = [apply_temperature(repeat_logits(o.probs), t) for o, t in zip(outcomes, temps)]
    plot_reliability([o.y_true for o in outcomes], [o.probs for o in outcomes], after, path, title=title)


# ----------------------------------------------------------------------------- predict / evaluate output
def predictions_table(cfg: dict[str, Any], checkpoint_dir: str | Path, slide_ids: Sequence[str], probs_r: np.ndarray, *,
                      use_temperature: bool = True, alpha: float | None = None, mondrian: bool = False) -> str:
    """CSV text ``slide_id,prob_<class>..,pred_label,repeat_std[,set,abstain]``: calibrated probabilities (softmax(log(mean_r p_r) / T)),
    the spread over repeats of the predicted class's probability, and with ``alpha`` the conformal set and whether it abstains."""
    import csv
    import io

    from .evaluate import column_names

    temperature = temperature_of(cfg, use_temperature)
    probs, spread = calibrated_probs(probs_r, temperature), repeat_spread(probs_r)
    sets = None
    if alpha is not None:
        calib = require_calibration(cfg, checkpoint_dir)
        sets = prediction_sets(probs, conformal_thresholds(calib, temperature, alpha, mondrian=mondrian))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = column_names(cfg.get("extra", {}).get("class_names"), probs.shape[1])
    w.writerow(["slide_id", *(f"prob_{c}" for c in names), "pred_label", "repeat_std", *(("set", "abstain") if sets is not None else ())])
    texts = set_labels(sets, names) if sets is not None else None
    for i, sid in enumerate(slide_ids):
        extra = [texts[i], int(sets[i].sum() != 1)] if sets is not None else []
        w.writerow([sid, *(f"{v:.6f}" for v in probs[i]), names[int(probs[i].argmax())], f"{spread[i]:.6f}", *extra])
    return buf.getvalue()


def patient_predictions_table(cfg: dict[str, Any], checkpoint_dir: str | Path, case_ids: Sequence[str], probs_r: np.ndarray, *,
                              use_temperature: bool = True, alpha: float | None = None, mondrian: bool = False) -> str:
    """CSV text ``case_id,n_slides,prob_<class>..,pred_label[,set,abstain]``: the patient means of the calibrated slide
    probabilities (:func:`mmil.evaluate.patient_predictions_csv`) and, with ``alpha``, the :func:`patient_sets` columns."""
    import csv
    import io

    from .evaluate import column_names, patient_predictions_csv

    temperature = temperature_of(cfg, use_temperature)
    probs, names = calibrated_probs(probs_r, temperature), cfg.get("extra", {}).get("class_names")
    text = patient_predictions_csv(case_ids, probs, class_names=names)
    if alpha is None:
        return text
    ps = patient_sets(require_calibration(cfg, checkpoint_dir), temperature, probs, case_ids, alpha, mondrian=mondrian)
    rows = list(csv.reader(io.StringIO(text)))
    texts = set_labels(ps["sets"], column_names(names, probs.shape[1]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*rows[0], "set", "abstain"])
    for row, case, sets, label in zip(rows[1:], ps["case_ids"], ps["sets"], texts):
        assert row[0] == case, "patient order of patient_predictions_csv and by_patient differ"
        w.writerow([*row, label, int(sets.sum() != 1)])
    return buf.getvalue()


def calibration_lines(block: dict[str, Any]) -> list[str]:
    """Printable summary of the ``calibration`` block of ``mmil evaluate``."""
    lines = [f"temperature {block['temperature']:.4f}{'' if block['temperature_applied'] else ' (not applied)'}: "
             f"ECE {block['ece_before']:.4f} -> {block['ece_after']:.4f}, Brier {block['brier_before']:.4f} -> {block['brier_after']:.4f}"]
    conf = block.get("conformal")
    if conf:
        kind = "Mondrian" if conf["mondrian"] else "split"
        for level in ("slide", "patient"):
            if level in conf:
                m = conf[level]
                lines.append(f"{kind}-conformal alpha={conf['alpha']} ({level}s): coverage {m['coverage']:.4f}, "
                             f"mean set size {m['mean_set_size']:.3f}, abstention rate {m['abstention_rate']:.4f}")
                if m.get("threshold_level") == "slide":
                    lines.append(f"note: {PATIENT_THRESHOLD_NOTE}")
    return lines
