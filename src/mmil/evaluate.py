"""Metrics, repeated stochastic evaluation and test-time ensembles.

The paper's protocol (``docs/method/mmil.md`` §1.9): a stochastic model (random grouping) is run R
times on the test set with seeds ``seed .. seed + R - 1``; the reported figure
is the mean (here also the standard deviation) of each run's metric. Beside it
we report the *test-time ensemble*: the metric of the probabilities averaged
over the R runs.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from mmpl.device import resolve_device as _resolve_device
from mmpl.progress import progress as _progress
from torch import nn

from .data.bags import Bag
from .errors import MMILInputError
from .models.base import MILOutput, model_inputs
from .stats import auc_of_probs

METRIC_NAMES = ("auc", "accuracy", "balanced_accuracy", "f1")


# ----------------------------------------------------------------- metrics
def classification_metrics(y_true: Sequence[int], probs: np.ndarray) -> dict[str, float]:
    """Metrics of one set of predicted probabilities ``probs`` ``(n, C)``.

    * ``auc``: binary ROC AUC of ``probs[:, 1]`` when C = 2; for C > 2 the macro
      average of one-vs-rest AUCs over the classes present in ``y_true`` (with
      at least one negative). NaN when undefined (a single class in ``y_true``).
    * ``accuracy``: mean of ``argmax(probs) == y``.
    * ``balanced_accuracy``: mean over the classes present in ``y_true`` of the
      per-class recall.
    * ``f1``: macro F1 over the classes present in ``y_true`` or predicted.
    """
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise ValueError(f"probs must have shape (n, C) with n={len(y)}, got {p.shape}")
    if len(y) == 0:
        raise ValueError("cannot compute metrics of an empty set")
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise ValueError(f"labels must lie in 0..{p.shape[1] - 1}")
    pred = p.argmax(1)
    auc = auc_of_probs(y, p)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected on small test folds
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y, pred))
    return {
        "auc": auc,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": balanced,
        "f1": float(f1_score(y, pred, average="macro", zero_division=0)),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (``ddof=0``) of finite values; NaN if none."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std())


def repeated_metrics(y_true: Sequence[int], probs_r: np.ndarray) -> dict[str, Any]:
    """The paper's protocol on ``probs_r`` ``(R, n, C)``: per-repeat metrics, their
    mean (``auc``, ...) and standard deviation (``auc_std``, ...) over repeats, and
    the test-time ensemble (``ensemble``: metrics of ``probs_r.mean(0)``)."""
    probs_r = np.asarray(probs_r)
    if probs_r.ndim != 3:
        raise ValueError(f"expected probabilities of shape (repeats, n, C), got {probs_r.shape}")
    per_repeat = [classification_metrics(y_true, p) for p in probs_r]
    out: dict[str, Any] = {}
    for name in METRIC_NAMES:
        out[name], out[f"{name}_std"] = mean_std([m[name] for m in per_repeat])
    out["ensemble"] = classification_metrics(y_true, probs_r.mean(0))
    out["repeats"] = per_repeat
    return out


# ----------------------------------------------------------------- inference
def resolve_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """A device this machine has (:func:`mmpl.device.resolve_device`); a bad one raises
    :class:`MMILInputError` naming ``option``."""
    return _resolve_device(device, option, error=MMILInputError)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (``"bf16"`` on CPU or CUDA; ``"fp32"`` = off; ``"auto"``:
    :func:`mmil.precision.resolve_precision`)."""
    from .precision import resolve_precision

    chosen = resolve_precision(precision, device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=chosen == "bf16")


def forward_bag(model: nn.Module, bag: Bag, *, device: torch.device, seed: int | None, precision: str = "fp32", return_scores: bool = False) -> MILOutput:
    """Run ``model`` on one bag (batch of one), passing the bag's coordinates, groups and ``seed`` to the models that read them."""
    x = bag.features.to(device, non_blocking=True).unsqueeze(0)
    coords = None if bag.coords is None else bag.coords.to(device).unsqueeze(0)
    groups = None if bag.groups is None else bag.groups.to(device).unsqueeze(0)
    with autocast(device, precision):
        return model(x, None, return_scores=return_scores, **model_inputs(model, coords=coords, groups=groups, seed=seed))


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    dataset,
    *,
    seed: int = 0,
    repeats: int = 1,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> np.ndarray:
    """Class probabilities ``(repeats, n_bags, n_classes)``; repeat ``r`` runs every
    bag with seed ``seed + r`` (model in eval mode: no dropout)."""
    if repeats < 1:
        raise MMILInputError(f"--repeats must be >= 1, got {repeats}")
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    out = None
    try:
        for i in _progress(range(len(dataset)), progress, "predicting"):
            bag = dataset[i]
            for r in range(repeats):
                p = forward_bag(model, bag, device=dev, seed=seed + r, precision=precision).probs[0].float().cpu().numpy()
                if out is None:
                    out = np.zeros((repeats, len(dataset), p.shape[0]), dtype=np.float64)
                out[r, i] = p
    finally:
        model.train(was_training)
    if out is None:
        raise MMILInputError("no bags to predict")
    return out


# ----------------------------------------------------------------- checkpoints
def load_for_inference(checkpoint_dir: str | Path, dataset, *, device: str | torch.device = "cpu", **override_kwargs):
    """Load a checkpoint and fit ``dataset`` to it.

    Checks the feature dimension against the checkpoint's ``in_dim`` (one-line
    error naming both), re-codes labels with the checkpoint's class names and
    applies the slide centring and feature standardisation stored at training time.
    Returns ``(model, dataset, config)``.
    """
    from .checkpoint import load_checkpoint, read_checkpoint_config

    checkpoint_dir = Path(checkpoint_dir)
    cfg = read_checkpoint_config(checkpoint_dir)
    ckpt_dim = int(cfg["model_kwargs"].get("in_dim", -1))
    if ckpt_dim != dataset.in_dim:
        raise MMILInputError(
            f"{checkpoint_dir}: checkpoint expects in_dim={ckpt_dim} features but {dataset.source} has dimension {dataset.in_dim}; "
            "use a checkpoint trained on features from the same encoder"
        )
    try:
        model, cfg = load_checkpoint(checkpoint_dir, map_location=resolve_device(device), **override_kwargs)
    except TypeError as err:
        raise MMILInputError(f"{checkpoint_dir}: {err}; drop the option") from None
    extra = cfg.get("extra", {})
    names = extra.get("class_names")
    if names:
        if int(cfg["model_kwargs"]["n_classes"]) != len(names):
            raise MMILInputError(f"{checkpoint_dir}: config lists {len(names)} class names for a {cfg['model_kwargs']['n_classes']}-class model; the checkpoint is corrupt")
        if (dataset.labels >= 0).any():
            dataset = dataset.with_class_names(names)
        else:
            dataset = dataset.without_labels()
            dataset.class_names = list(names)
    elif dataset.n_classes > int(cfg["model_kwargs"]["n_classes"]):
        raise MMILInputError(f"{dataset.source}: {dataset.n_classes} classes but the checkpoint's model has {cfg['model_kwargs']['n_classes']}")
    if extra.get("center_slides") == "median":  # as at training time (mmil.data.dataset.center_on_median)
        dataset = dataset.with_centering(True)
    std = extra.get("standardize")
    if std:
        dataset = dataset.with_standardization(np.asarray(std["mean"], np.float32), np.asarray(std["std"], np.float32))
    return model, dataset, cfg


def evaluate_checkpoint(
    checkpoint_dir: str | Path,
    dataset,
    *,
    repeats: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    calibration: dict[str, Any] | None = None,
    **override_kwargs,
) -> dict[str, Any]:
    """Repeated evaluation of a checkpoint on a labelled dataset (see :func:`repeated_metrics`); with ``calibration``
    (keyword arguments of :func:`mmil.calibrate_run.evaluate_calibration`) also its ``calibration`` block."""
    from .calibrate_run import evaluate_calibration, require_calibration

    model, dataset, cfg = load_for_inference(checkpoint_dir, dataset, device=device, **override_kwargs)
    _require_every_label(dataset)
    if calibration is not None and calibration.get("alpha") is not None:
        require_calibration(cfg, checkpoint_dir)  # before the inference
    probs = predict_probs(model, dataset, seed=seed, repeats=repeats, device=device, precision=precision, progress=progress)
    result = repeated_metrics(dataset.labels, probs)
    if calibration is not None:
        result["calibration"] = evaluate_calibration(cfg, checkpoint_dir, dataset, probs, **calibration)
    result.update({"n_bags": len(dataset), "repeats_count": repeats, "seed": seed, "checkpoint": str(checkpoint_dir), "class_names": dataset.class_names})
    return result


def _require_every_label(dataset) -> None:
    missing = [s for s, y in zip(dataset.slide_ids, dataset.labels) if y < 0]
    if missing:
        raise MMILInputError(f"{dataset.source}: {len(missing)} slide(s) without a label ({', '.join(missing[:5])}); evaluation needs a label for every slide")


def column_names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    """The class names the CSVs use (``"0".."C-1"`` when a checkpoint stores none); one per class or an error."""
    names = [str(c) for c in class_names] if class_names else [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise MMILInputError(f"{len(names)} class names for {n_classes} classes of probabilities; the checkpoint is corrupt")
    return names


def predictions_csv(slide_ids: Sequence[str], probs: np.ndarray, labels: Sequence[int] | None = None, *,
                    class_names: Sequence[str] | None = None, case_ids: Sequence[str] | None = None) -> str:
    """CSV text ``slide_id[,case_id][,label],prob_<class>...,pred_label``: ``label`` and ``pred_label``
    (the class of the largest probability) are class names, as in ``prob_<class>``."""
    probs = np.asarray(probs)
    names = column_names(class_names, probs.shape[1])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id"] + (["case_id"] if case_ids is not None else []) + (["label"] if labels is not None else [])
               + [f"prob_{n}" for n in names] + ["pred_label"])
    for i, sid in enumerate(slide_ids):
        row = [sid] + ([case_ids[i]] if case_ids is not None else []) + ([names[int(labels[i])]] if labels is not None else [])
        w.writerow(row + [f"{v:.6f}" for v in probs[i]] + [names[int(probs[i].argmax())]])
    return buf.getvalue()


def patient_predictions_csv(case_ids: Sequence[str], probs: np.ndarray, labels: Sequence[int] | None = None, *,
                            class_names: Sequence[str] | None = None) -> str:
    """CSV text ``case_id,n_slides[,label],prob_<class>...,pred_label``, one row per patient (in order of first
    appearance): ``prob_c(patient) = mean of prob_c over the patient's slides``; ``label`` is that of its first slide."""
    from .calibrate_run import by_patient

    probs = np.asarray(probs, dtype=np.float64)
    names = column_names(class_names, probs.shape[1])
    order, p_probs, p_labels = by_patient(probs, list(case_ids), None if labels is None else np.asarray(labels))
    counts = {c: 0 for c in order}
    for c in case_ids:
        counts[c] += 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "n_slides"] + (["label"] if p_labels is not None else []) + [f"prob_{n}" for n in names] + ["pred_label"])
    for i, case in enumerate(order):
        label = [names[int(p_labels[i])]] if p_labels is not None else []
        w.writerow([case, counts[case], *label, *(f"{v:.6f}" for v in p_probs[i]), names[int(p_probs[i].argmax())]])
    return buf.getvalue()


# ----------------------------------------------------------------- slides the checkpoint saw
def seen_overlap(seen: dict[str, Sequence[str]], slide_ids: Sequence[str]) -> dict[str, list[str]]:
    """For each role (``train``, ``val``), the slides of ``slide_ids`` (in their order) the checkpoint saw in it."""
    sets = {role: set(ids) for role, ids in seen.items()}
    return {role: [s for s in slide_ids if s in ids] for role, ids in sets.items()}


def seen_slides_line(checkpoint_dir: str | Path, overlap: dict[str, list[str]], n_total: int, show: int = 3) -> str:
    """One line: how many of the ``n_total`` slides asked for the checkpoint trained (or selected its epoch) on, a few ids each."""
    roles = {"train": "training", "val": "validation"}
    parts = [f"{len(ids)} {roles.get(role, role)} ({', '.join(ids[:show])}{', ...' if len(ids) > show else ''})"
             for role, ids in overlap.items() if ids]
    n_seen = len({s for ids in overlap.values() for s in ids})
    return (f"{n_seen} of {n_total} slides were seen in training by {checkpoint_dir}: {'; '.join(parts)}; their scores are optimistic")


def check_seen_slides(checkpoint_dir: str | Path, slide_ids: Sequence[str], *, refuse: bool = False) -> str | None:
    """The warning line when ``slide_ids`` include slides the checkpoint was trained or validated on (``None`` when
    none are, or when the checkpoint records no slides); with ``refuse``, :class:`MMILInputError` instead."""
    from .checkpoint import read_seen_slides

    seen = read_seen_slides(checkpoint_dir)
    overlap = seen_overlap(seen, slide_ids) if seen else {}
    if not any(overlap.values()):
        return None
    line = seen_slides_line(checkpoint_dir, overlap, len(slide_ids))
    if refuse:
        raise MMILInputError(f"{line} (--refuse-training-slides); score held-out slides only, e.g. `mmil heatmap --from-cv RUN` "
                             "or the fold's test slides in RUN/fold_k/predictions.csv")
    return f"{line}; score held-out slides (the fold's test slides, `mmil heatmap --from-cv RUN`) or pass --refuse-training-slides to stop"
