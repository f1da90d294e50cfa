"""Slide-level label CSVs.

Two layouts are read:

* **long** (one row per slide): columns ``slide_id,label`` plus optional
  ``case_id`` (patient, for patient-level folds), ``split``
  (``train``/``val``/``test``) and ``fold`` (integer test-fold id). Any other
  column is an error, so a typo never silently drops information.
* **wide** (the released split files): columns
  ``train,train_label,val,val_label,test,test_label`` of unequal length
  (shorter columns padded with empty cells). A leading unnamed index column
  written by pandas is ignored.

Label values are kept as text and canonicalised (``"1.0"`` -> ``"1"``) so
integer labels written as floats match.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import MMILInputError

LONG_COLUMNS = ("slide_id", "label", "case_id", "split", "fold")
WIDE_COLUMNS = ("train", "train_label", "val", "val_label", "test", "test_label")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "testing": "test"}


@dataclass
class LabelTable:
    """Labels (and optional grouping/split information) for a set of slides.

    Attributes:
        slide_ids: slide identifiers in file order (unique).
        labels: canonical label text per slide, ``None`` where the cell is empty.
        case_ids: patient id per slide, or ``None`` when the CSV has no ``case_id``.
        splits: split name (``train``/``val``/``test``) -> slide ids, or ``None``.
        fold_ids: integer test fold per slide, or ``None`` when there is no ``fold`` column.
    """

    slide_ids: list[str]
    labels: list[str | None]
    case_ids: list[str] | None = None
    splits: dict[str, list[str]] | None = None
    fold_ids: list[int] | None = None


def canonical_label(value: str) -> str:
    """Canonical text of a label: integral numbers lose their decimals (``"1.0"`` -> ``"1"``)."""
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        return value
    if number.is_integer():
        return str(int(number))
    return value


def read_label_csv(path: str | Path) -> LabelTable:
    """Read a long or wide label CSV (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: label CSV not found; pass a CSV with columns slide_id,label[,case_id][,split|fold]")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise MMILInputError(f"{path}: empty label CSV; expected a header slide_id,label[,case_id][,split|fold]")
    header = [h.strip() for h in rows[0]]
    _check_delimiter(path, header)
    body = rows[1:]
    if header and header[0] in ("", "Unnamed: 0", "index"):
        header, body = header[1:], [r[1:] for r in body]
    if "train" in header and "train_label" in header:
        return _read_wide(path, header, body)
    return _read_long(path, header, body)


def _check_delimiter(path: Path, header: list[str]) -> None:
    """A one-column header holding ``;`` or a tab is a CSV written with another delimiter."""
    if len(header) == 1:
        for sep, name in ((";", "semicolon"), ("\t", "tab")):
            if sep in header[0]:
                raise MMILInputError(f"{path}: the header {header[0]!r} is {name}-separated; mmil reads comma-separated CSV (slide_id,label,...): re-save it with commas as the delimiter")


def _read_long(path: Path, header: list[str], body: list[list[str]]) -> LabelTable:
    unknown = [h for h in header if h not in LONG_COLUMNS]
    if unknown:
        raise MMILInputError(
            f"{path}: unknown column(s) {', '.join(repr(u) for u in unknown)}; allowed: {', '.join(LONG_COLUMNS)} "
            f"(or the wide layout {','.join(WIDE_COLUMNS)}); rename or drop them"
        )
    for required in ("slide_id", "label"):
        if required not in header:
            raise MMILInputError(f"{path}: missing column {required!r}; the header must contain slide_id,label")
    if "split" in header and "fold" in header:
        raise MMILInputError(f"{path}: has both `split` and `fold` columns; keep one (split = fixed train/val/test, fold = predefined cross-validation folds)")
    col = {h: i for i, h in enumerate(header)}
    slide_ids: list[str] = []
    labels: list[str | None] = []
    cases: list[str] = []
    split_of: list[str] = []
    folds: list[int] = []
    seen: set[str] = set()
    for lineno, row in enumerate(body, start=2):
        if len(row) < len(header):
            row = row + [""] * (len(header) - len(row))
        elif len(row) > len(header) and any(c.strip() for c in row[len(header):]):
            raise MMILInputError(f"{path}: line {lineno} has more cells than the header; the CSV is malformed")
        sid = row[col["slide_id"]].strip()
        if not sid:
            raise MMILInputError(f"{path}: line {lineno} has an empty slide_id")
        if sid in seen:
            raise MMILInputError(f"{path}: slide_id {sid!r} appears twice (line {lineno}); each slide must be listed once")
        seen.add(sid)
        slide_ids.append(sid)
        lab = row[col["label"]].strip()
        labels.append(canonical_label(lab) if lab else None)
        if "case_id" in col:
            case = row[col["case_id"]].strip()
            if not case:
                raise MMILInputError(f"{path}: line {lineno} (slide {sid!r}) has an empty case_id; fill it in (the slides of one patient share a case_id) or drop the case_id column")
            cases.append(case)
        if "split" in col:
            raw = row[col["split"]].strip().lower()
            if raw not in SPLIT_NAMES:
                raise MMILInputError(f"{path}: line {lineno}: split {row[col['split']]!r} is not one of train, val, test")
            split_of.append(SPLIT_NAMES[raw])
        if "fold" in col:
            try:
                folds.append(int(float(row[col["fold"]])))
            except ValueError:
                raise MMILInputError(f"{path}: line {lineno}: fold {row[col['fold']]!r} is not an integer") from None
    if not slide_ids:
        raise MMILInputError(f"{path}: no slides listed under the header")
    splits = None
    if split_of:
        splits = {name: [s for s, sp in zip(slide_ids, split_of) if sp == name] for name in ("train", "val", "test")}
    return LabelTable(slide_ids, labels, cases or None, splits, folds or None)


def _read_wide(path: Path, header: list[str], body: list[list[str]]) -> LabelTable:
    unknown = [h for h in header if h not in WIDE_COLUMNS]
    if unknown:
        raise MMILInputError(f"{path}: unknown column(s) {', '.join(repr(u) for u in unknown)} in a wide split CSV; allowed: {', '.join(WIDE_COLUMNS)}")
    col = {h: i for i, h in enumerate(header)}
    slide_ids: list[str] = []
    labels: list[str | None] = []
    label_of: dict[str, str | None] = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name in ("train", "val", "test"):
        if name not in col:
            continue
        if f"{name}_label" not in col:
            raise MMILInputError(f"{path}: column {name!r} without {name + '_label'!r}; the wide layout is {','.join(WIDE_COLUMNS)}")
        for lineno, row in enumerate(body, start=2):
            sid = row[col[name]].strip() if col[name] < len(row) else ""
            if not sid:
                continue
            lab = row[col[f"{name}_label"]].strip() if col[f"{name}_label"] < len(row) else ""
            lab = canonical_label(lab) if lab else None
            if sid in label_of:
                if label_of[sid] != lab:
                    raise MMILInputError(f"{path}: slide {sid!r} has two different labels ({label_of[sid]!r}, {lab!r}); fix the CSV")
            else:
                label_of[sid] = lab
                slide_ids.append(sid)
                labels.append(lab)
            if sid not in splits[name]:
                splits[name].append(sid)
    if not slide_ids:
        raise MMILInputError(f"{path}: no slides listed in the split columns")
    leaked = set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    if leaked:
        raise MMILInputError(f"{path}: slide(s) {', '.join(sorted(leaked)[:5])} are in train and in val/test; fix the split file")
    return LabelTable(slide_ids, labels, None, splits, None)
