"""``mmil heatmap --from-cv RUN``: every slide scored by the fold model that did not train on it.

A cross-validation run (:mod:`mmil.crossval`) records in ``RUN/folds.json`` the ``train``, ``val`` and
``test`` slide ids of each fold, and keeps fold ``k``'s model in ``RUN/fold_k/checkpoint``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import MMILInputError


def read_cv_plan(run_dir: str | Path) -> list[dict[str, Any]]:
    """The folds of a run (``fold``, ``train``, ``val``, ``test`` ids), each with its ``checkpoint`` folder; one-line errors."""
    run_dir = Path(run_dir)
    path = run_dir / "folds.json"
    if not path.is_file():
        raise MMILInputError(f"{path}: not found; --from-cv takes the --out folder of `mmil train` (it holds folds.json and fold_k/checkpoint)")
    try:
        plan = json.loads(path.read_text())
        folds = [{"fold": int(e["fold"]), **{role: [str(s) for s in e.get(role) or []] for role in ("train", "val", "test")}} for e in plan]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise MMILInputError(f"{path}: unreadable fold plan ({err}); rerun `mmil train` to re-create it") from None
    for f in folds:
        f["checkpoint"] = run_dir / f"fold_{f['fold']}" / "checkpoint"
        if not (f["checkpoint"] / "config.json").is_file():
            raise MMILInputError(f"{f['checkpoint']}: fold {f['fold']} has no checkpoint yet; finish the run (rerun the same `mmil train`) first")
    return folds


def assign_folds(folds: Sequence[dict[str, Any]], slide_ids: Sequence[str]) -> dict[str, int | None]:
    """The fold that scores each slide: the one whose test set holds it; for a slide in no test set (not part of
    the run), the first fold that neither trained nor validated on it; ``None`` when every fold saw it."""
    test_of = {s: f["fold"] for f in folds for s in f["test"]}
    seen = {f["fold"]: set(f["train"]) | set(f["val"]) for f in folds}
    out: dict[str, int | None] = {}
    for sid in slide_ids:
        if sid in test_of and sid not in seen[test_of[sid]]:
            out[sid] = test_of[sid]
        else:
            out[sid] = next((f["fold"] for f in folds if sid not in seen[f["fold"]]), None)
    return out
