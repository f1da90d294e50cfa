"""Fold assignment: stratified k-fold (patient-level when case ids are given),
inner validation hold-outs, and the fixed splits of a label CSV.

All functions take and return integer index arrays into the arrays given, so
they work on any dataset (or subset) alike.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import MMILInputError


@dataclass
class FoldSplit:
    """Indices (into the full dataset) of one fold's train, validation and test bags, and of its
    calibration bags (empty: the validation bags calibrate, see :func:`with_calibration_sets`)."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    calib: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_dict(self, slide_ids: Sequence[str]) -> dict:
        names = ("train", "val", "test") + (("calib",) if len(self.calib) else ())  # runs without one keep their plan
        return {name: [slide_ids[i] for i in getattr(self, name)] for name in names} | {"fold": self.fold}

    @property
    def calibration(self) -> np.ndarray:
        """The bags that fit the temperature and the conformal thresholds."""
        return self.calib if len(self.calib) else self.val


def kfold_indices(labels: np.ndarray, k: int, seed: int = 0, groups: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified folds as ``(train_idx, test_idx)`` pairs.

    With ``groups`` (patient ids) the folds come from scikit-learn's
    ``StratifiedGroupKFold``: all bags of a patient land in the same fold, so no
    patient is in a training and a test set at once. Every bag is in exactly
    one test fold.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    n = len(labels)
    if k < 2:
        raise MMILInputError(f"--folds must be at least 2 for cross-validation, got {k}")
    units = n if groups is None else len(set(groups))
    if units < k:
        what = "bags" if groups is None else "patients (case_id)"
        raise MMILInputError(f"cannot make {k} folds from {units} {what}; lower --folds")
    with warnings.catch_warnings():
        # sklearn warns when a class has fewer members than folds; stratification is then best effort
        warnings.simplefilter("ignore", UserWarning)
        if groups is None:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            pairs = list(splitter.split(np.zeros(n), labels))
        else:
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            pairs = list(splitter.split(np.zeros(n), labels, groups=np.asarray(groups)))
    return [(np.sort(tr), np.sort(te)) for tr, te in pairs]


def holdout_indices(labels: np.ndarray, fraction: float, seed: int = 0, groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split off about ``fraction`` of the bags, stratified (and patient-level with
    ``groups``), as ``(keep_idx, holdout_idx)``.

    The hold-out is the first fold of a ``round(1 / fraction)``-fold stratified
    split. With fewer than two bags (or patients) nothing is held out.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0.0 < fraction < 1.0:
        raise MMILInputError(f"validation fraction must be in (0, 1), got {fraction}")
    units = n if groups is None else len(set(groups))
    # scikit-learn's stratified splitters need k <= the size of the largest class
    largest = int(np.bincount(labels - labels.min()).max()) if n else 0
    k = min(max(2, int(round(1.0 / fraction))), units, largest)
    if k < 2:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    keep, hold = kfold_indices(labels, k, seed=seed, groups=groups)[0]
    return keep, hold


def fixed_split(splits: dict[str, Sequence[int]], labels: np.ndarray, val_fraction: float, seed: int = 0, groups: Sequence[str] | None = None) -> FoldSplit:
    """The train/val/test split of a label CSV (split column or wide CSV).

    A missing or empty ``val`` part is carved from ``train`` (stratified,
    ``val_fraction``); a missing ``test`` part is an error.
    """
    train = np.asarray(splits.get("train", []), dtype=np.int64)
    val = np.asarray(splits.get("val", []), dtype=np.int64)
    test = np.asarray(splits.get("test", []), dtype=np.int64)
    if len(train) == 0 or len(test) == 0:
        raise MMILInputError("the label CSV's split needs train and test slides; add them or drop the split column to cross-validate")
    if len(val) == 0:
        sub_groups = None if groups is None else [groups[i] for i in train]
        keep, hold = holdout_indices(np.asarray(labels)[train], val_fraction, seed, sub_groups)
        train, val = train[keep], train[hold]
    return FoldSplit(0, train, val, test)


def split_file_indices(parts: dict[str, Sequence[str]], slide_ids: Sequence[str], source: str | Path) -> dict[str, np.ndarray]:
    """Slide ids of one split file's ``train``/``val``/``test`` parts -> indices into ``slide_ids``.

    An id matches a slide id exactly, or the slide id without its file extension
    (label CSVs sometimes keep ``slide_1.svs``). Ids that match no slide are an error
    naming ``source``: training on a subset of the folds' slides would go unnoticed.
    """
    index = {sid: i for i, sid in enumerate(slide_ids)}
    for i, sid in enumerate(slide_ids):
        index.setdefault(Path(sid).stem if Path(sid).suffix else sid, i)
    unknown = [sid for name in ("train", "val", "test") for sid in parts.get(name, []) if sid not in index]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise MMILInputError(
            f"{source}: {len(unknown)} slide id(s) not in the labels/features ({', '.join(unknown[:5])}{more}); "
            "add them to the label CSV and extract their features, or use split files made for this data set"
        )
    return {name: np.asarray([index[sid] for sid in parts.get(name, [])], dtype=np.int64) for name in ("train", "val", "test")}


def plan_folds(
    labels: np.ndarray,
    *,
    k: int = 5,
    seed: int = 0,
    val_fraction: float = 0.15,
    groups: Sequence[str] | None = None,
    splits: dict[str, Sequence[int]] | None = None,
    fold_ids: np.ndarray | None = None,
    predefined: Sequence[dict[str, Sequence[int]]] | None = None,
) -> list[FoldSplit]:
    """Every fold of an experiment, with an inner validation set per fold.

    Priority: ``predefined`` folds (one ``{"train", "val", "test"}`` index dict per
    fold, e.g. CLAM's ``splits_k.csv``), then fixed ``splits`` (one fold), then
    predefined ``fold_ids`` (test fold = bags with that id), else stratified
    ``k``-fold (patient-level with ``groups``). The validation set is carved from
    each training part (stratified, patient-level with ``groups``) for early
    stopping, unless the fold definition gives one.
    """
    labels = np.asarray(labels)
    if predefined is not None:
        plan = [fixed_split(parts, labels, val_fraction, seed + fold, groups) for fold, parts in enumerate(predefined)]
        return [FoldSplit(fold, fs.train, fs.val, fs.test) for fold, fs in enumerate(plan)]
    if splits is not None:
        return [fixed_split(splits, labels, val_fraction, seed, groups)]
    if fold_ids is not None:
        fold_ids = np.asarray(fold_ids)
        ids = np.unique(fold_ids)
        if len(ids) < 2:
            raise MMILInputError("the label CSV's `fold` column names a single fold; give at least two fold ids or drop the column")
        pairs = [(np.flatnonzero(fold_ids != f), np.flatnonzero(fold_ids == f)) for f in ids]
    else:
        pairs = kfold_indices(labels, k, seed, groups)
    plan = []
    for fold, (train, test) in enumerate(pairs):
        sub_groups = None if groups is None else [groups[i] for i in train]
        keep, hold = holdout_indices(labels[train], val_fraction, seed + fold, sub_groups)
        plan.append(FoldSplit(fold, train[keep], train[hold], test))
    return plan


def check_no_patient_leakage(groups: Sequence[str], *index_sets: np.ndarray) -> None:
    """Raise when one patient has bags in two of ``index_sets``."""
    owners: dict[str, int] = {}
    for s, idx in enumerate(index_sets):
        for i in idx:
            g = groups[int(i)]
            if owners.setdefault(g, s) != s:
                raise MMILInputError(f"patient {g!r} has slides in two parts of the split; patients must not cross train/val/test")


def with_calibration_sets(plan: Sequence[FoldSplit], labels: np.ndarray, fraction: float, seed: int = 0,
                          groups: Sequence[str] | None = None) -> list[FoldSplit]:
    """Each fold with about ``fraction`` of its training fold (train + val) moved from ``train`` to ``calib``.

    The calibration bags are neither trained on nor used to choose the kept epoch, so they are exchangeable
    with the test bags, as split-conformal coverage assumes (the validation bags, which early stopping has
    seen, are optimistic). Stratified and patient-level as :func:`holdout_indices`; ``fraction == 0`` returns
    the plan unchanged.
    """
    if fraction == 0:
        return list(plan)
    out = []
    for fs in plan:
        share = fraction * (len(fs.train) + len(fs.val)) / max(len(fs.train), 1)  # of the training fold, taken from train
        if not 0.0 < share < 1.0:
            raise MMILInputError(f"--calib-fraction {fraction} leaves fold {fs.fold} no training bags; lower it or --val-fraction")
        sub_groups = None if groups is None else [groups[i] for i in fs.train]
        keep, hold = holdout_indices(np.asarray(labels)[fs.train], share, seed + 1000 + fs.fold, sub_groups)
        out.append(replace(fs, train=fs.train[keep], calib=fs.train[hold]))
    return out
