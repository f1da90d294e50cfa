"""Other tools' folder layouts: TRIDENT job roots and CLAM split folders.

* **TRIDENT** (``run_batch_of_slides.py --job_dir JOB``) writes, per patching
  configuration ``<mag>x_<patch>px_<overlap>px_overlap`` (e.g. ``20x_256px_0px_overlap``)::

      JOB/<cfg>/patches/<slide>_patches.h5     dataset coords (N, 2), level-0 x, y
      JOB/<cfg>/features_<encoder>/<slide>.h5  datasets features (N, C) and coords
      JOB/thumbnails/, JOB/contours/, ...      pictures (not read here)

  :func:`trident_feature_dir` turns a job root or a ``<cfg>`` folder into the one
  ``features_<encoder>`` folder it holds; with several encoders or magnifications
  it refuses, listing them, so the user names one with ``--features``.
* **CLAM** (``create_splits_seq.py``) writes ``splits_0.csv ... splits_{k-1}.csv``
  into a split folder: an unnamed index column, then ``train,val,test`` columns of
  slide ids of unequal length (shorter ones padded with empty cells), and beside
  each ``splits_k_bool.csv`` and ``splits_k_descriptor.csv`` (not needed here).
  :func:`read_clam_split_dir` reads one fold per ``splits_k.csv``.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from ..errors import MMILInputError

TRIDENT_CONFIG = re.compile(r"^(?P<mag>\d+(?:\.\d+)?)x_(?P<patch>\d+)px_(?P<overlap>\d+)px_overlap$")
CLAM_SPLIT = re.compile(r"^splits_(?P<k>\d+)\.csv$")
SPLIT_PARTS = ("train", "val", "test")


def is_trident_config_dir(path: Path) -> bool:
    """Whether ``path`` is named like TRIDENT's ``<mag>x_<patch>px_<overlap>px_overlap`` folder."""
    return TRIDENT_CONFIG.match(path.name) is not None


def _has_h5(folder: Path) -> bool:
    return any(p.suffix.lower() in (".h5", ".hdf5") and p.is_file() and not p.name.startswith(".") for p in folder.iterdir())


def _config_dirs(directory: Path) -> list[Path]:
    """``directory`` itself when it is a ``<cfg>`` folder, else its ``<cfg>`` sub-folders."""
    if is_trident_config_dir(directory) or ((directory / "patches").is_dir() and any(directory.glob("features_*"))):
        return [directory]
    return sorted(p for p in directory.iterdir() if p.is_dir() and is_trident_config_dir(p))


def trident_feature_dirs(directory: str | Path) -> list[Path]:
    """Every ``features_<encoder>`` folder holding ``.h5`` files below a TRIDENT job root or ``<cfg>`` folder."""
    out = []
    for cfg in _config_dirs(Path(directory)):
        out += [p for p in sorted(cfg.glob("features_*")) if p.is_dir() and _has_h5(p)]
    return out


def trident_feature_dir(directory: str | Path) -> Path | None:
    """The one ``features_<encoder>`` folder of a TRIDENT job root or ``<cfg>`` folder.

    ``None`` when ``directory`` is no TRIDENT folder. Raises when it holds several
    (naming each and the ``--features`` path that picks it) or patches but no features.
    """
    directory = Path(directory)
    configs = _config_dirs(directory)
    if not configs:
        return None
    found = trident_feature_dirs(directory)
    if len(found) == 1:
        return found[0]
    if not found:
        raise MMILInputError(
            f"{directory}: a TRIDENT folder ({', '.join(c.name for c in configs)}) without features_<encoder>/ .h5 files; "
            "extract features first (TRIDENT --task feat, or mmil extract --layout trident)"
        )
    choices = ", ".join(str(p.relative_to(directory)) for p in found)
    raise MMILInputError(
        f"{directory}: holds features of several encoders or magnifications ({choices}); "
        f"pick one with --features, e.g. --features {found[0]}"
    )


# ----------------------------------------------------------------------------- CLAM split folders
def clam_split_files(directory: str | Path) -> list[Path]:
    """``splits_0.csv ... splits_{k-1}.csv`` of a CLAM split folder, in fold order (numbering checked)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MMILInputError(f"{directory}: split folder not found (--splits-dir); pass the folder CLAM's create_splits_seq.py wrote (splits/<task>_<percent>/)")
    numbered = {}
    for p in directory.iterdir():
        m = CLAM_SPLIT.match(p.name)
        if m and p.is_file():
            numbered[int(m.group("k"))] = p
    if not numbered:
        raise MMILInputError(f"{directory}: no splits_0.csv, splits_1.csv, ... (--splits-dir); pass the folder that holds CLAM's splits_k.csv files")
    missing = [k for k in range(max(numbered) + 1) if k not in numbered]
    if missing:
        raise MMILInputError(f"{directory / f'splits_{missing[0]}.csv'}: missing, but splits_{max(numbered)}.csv exists; restore it or renumber the split files from 0")
    return [numbered[k] for k in sorted(numbered)]


def read_clam_split(path: str | Path) -> dict[str, list[str]]:
    """One CLAM ``splits_k.csv``: ``{"train": ids, "val": ids, "test": ids}``.

    Empty cells are padding. A slide in two parts, a missing ``train`` or ``test``
    column, or an empty ``train``/``test`` part is an error naming the file.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if not rows:
        raise MMILInputError(f"{path}: empty split file; CLAM's splits_k.csv has a header ,train,val,test")
    header = [h.strip() for h in rows[0]]
    col = {h: i for i, h in enumerate(header) if h in SPLIT_PARTS}
    if "train" not in col or "test" not in col:
        raise MMILInputError(f"{path}: header {','.join(header)!r} lacks train and test columns; CLAM's splits_k.csv has the columns ,train,val,test")
    parts: dict[str, list[str]] = {name: [] for name in SPLIT_PARTS}
    for row in rows[1:]:
        for name, i in col.items():
            sid = row[i].strip() if i < len(row) else ""
            if sid and sid not in parts[name]:
                parts[name].append(sid)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(set(parts[a]) & set(parts[b]))
        if both:
            raise MMILInputError(f"{path}: slide(s) {', '.join(both[:5])} are in {a} and in {b}; a slide belongs to one part of a fold, fix the split file")
    for name in ("train", "test"):
        if not parts[name]:
            raise MMILInputError(f"{path}: the {name} column is empty; each fold needs train and test slides (val may be empty: it is then carved from train)")
    return parts


def read_clam_split_dir(directory: str | Path) -> list[tuple[Path, dict[str, list[str]]]]:
    """Every fold of a CLAM split folder: ``[(splits_k.csv, parts), ...]`` for ``k = 0 .. K-1``."""
    return [(p, read_clam_split(p)) for p in clam_split_files(directory)]
