"""A dataset of bags: lazy per-slide files or in-memory arrays, plus labels.

``load_dataset`` is the one entry point the training loop, the CLI and the
benchmarks use. Reading is lazy: each ``__getitem__`` opens the slide's file,
reads it, closes it and validates the arrays.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MMILInputError
from .bags import Bag
from .labels import LabelTable, canonical_label, read_label_csv
from .readers import check_features, find_bag_files, h5_feature_shape, read_bag_file, read_mil_csv, read_pt_bag, sort_label_values

#: ``kind`` of a dataset read from a MIL-benchmark CSV (features are unnormalised).
KIND_BENCHMARK = "benchmark"
#: ``kind`` of a dataset of per-slide feature files.
KIND_SLIDES = "slides"
#: ``kind`` of a dataset built from in-memory bags.
KIND_MEMORY = "memory"


@dataclass(frozen=True)
class _Entry:
    slide_id: str
    path: Path | None = None
    features: np.ndarray | None = None
    coords: np.ndarray | None = None
    groups: np.ndarray | None = None


class BagDataset(Dataset):
    """Bags with labels; ``dataset[i]`` is a validated :class:`~mmil.data.bags.Bag`.

    Attributes:
        slide_ids: identifiers, in dataset order.
        labels: ``(n,)`` int64 class index, ``-1`` where unknown.
        class_names: label text of each class index.
        case_ids: patient id per bag, or ``None``.
        splits: ``{"train"|"val"|"test": indices}`` from a split column or the
            wide split CSV, or ``None``.
        fold_ids: predefined test-fold id per bag (``fold`` column), or ``None``.
        in_dim: feature dimension C.
        kind: ``"slides"``, ``"benchmark"`` (MIL CSV) or ``"memory"``.
        standardization: ``(mean, std)`` applied to every bag's features, or ``None``.
        centering: subtract each bag's per-feature median from its features (before the
            standardization): :func:`center_on_median`.
    """

    def __init__(
        self,
        entries: Sequence[_Entry],
        labels: np.ndarray,
        class_names: Sequence[str],
        in_dim: int,
        *,
        case_ids: Sequence[str] | None = None,
        splits: dict[str, list[int]] | None = None,
        fold_ids: np.ndarray | None = None,
        kind: str = KIND_MEMORY,
        source: str | None = None,
        standardization: tuple[np.ndarray, np.ndarray] | None = None,
        centering: bool = False,
    ) -> None:
        self._entries = list(entries)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [str(c) for c in class_names]
        self.in_dim = int(in_dim)
        self.case_ids = None if case_ids is None else [str(c) for c in case_ids]
        self.splits = splits
        self.fold_ids = None if fold_ids is None else np.asarray(fold_ids, dtype=np.int64)
        self.kind = kind
        self.source = source
        self.standardization = standardization
        self.centering = bool(centering)
        if len(self.labels) != len(self._entries):
            raise ValueError("one label per bag is required")

    # -- basic protocol -------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def slide_ids(self) -> list[str]:
        return [e.slide_id for e in self._entries]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def source_of(self, i: int) -> str:
        """The file (or pseudo-file) bag ``i`` comes from, for error messages."""
        e = self._entries[i]
        return str(e.path) if e.path is not None else f"{self.source or 'memory'}[{e.slide_id}]"

    def __getitem__(self, i: int) -> Bag:
        e = self._entries[i]
        if e.path is not None:
            raw = read_bag_file(e.path, expected_dim=self.in_dim)
            features, coords, groups = raw.features, raw.coords, raw.groups
        else:
            features, coords, groups = e.features, e.coords, e.groups
        if self.centering:
            features = center_on_median(features)
        if self.standardization is not None:
            mean, std = self.standardization
            features = ((features - mean) / std).astype(np.float32)
        label = int(self.labels[i])
        return Bag(
            slide_id=e.slide_id,
            features=torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)),
            label=label if label >= 0 else None,
            coords=None if coords is None else torch.from_numpy(np.asarray(coords, dtype=np.float32)),
            groups=None if groups is None else torch.from_numpy(np.asarray(groups, dtype=np.int64)),
            case_id=None if self.case_ids is None else self.case_ids[i],
        )

    # -- derived datasets -----------------------------------------------
    def subset(self, indices: Sequence[int]) -> "BagDataset":
        """The bags at ``indices`` (splits and folds dropped: they index the parent)."""
        idx = [int(i) for i in indices]
        return BagDataset(
            [self._entries[i] for i in idx],
            self.labels[idx],
            self.class_names,
            self.in_dim,
            case_ids=None if self.case_ids is None else [self.case_ids[i] for i in idx],
            fold_ids=None if self.fold_ids is None else self.fold_ids[idx],
            kind=self.kind,
            source=self.source,
            standardization=self.standardization,
            centering=self.centering,
        )

    def with_standardization(self, mean: np.ndarray | None, std: np.ndarray | None) -> "BagDataset":
        """A view whose features are ``(x - mean) / std`` (``None`` removes it)."""
        view = self.subset(range(len(self)))
        view.splits = self.splits
        view.fold_ids = self.fold_ids
        if mean is None or std is None:
            view.standardization = None
        else:
            mean = np.asarray(mean, dtype=np.float32).reshape(-1)
            std = np.asarray(std, dtype=np.float32).reshape(-1)
            if mean.shape != (self.in_dim,) or std.shape != (self.in_dim,):
                raise MMILInputError(f"standardization statistics have dimension {mean.shape[0]}, the features {self.in_dim}; the checkpoint was trained on other features")
            view.standardization = (mean, std)
        return view

    def with_centering(self, on: bool) -> "BagDataset":
        """A view whose bags are (``on``) or are not centred on their own median (:func:`center_on_median`)."""
        view = self.subset(range(len(self)))
        view.splits, view.fold_ids, view.centering = self.splits, self.fold_ids, bool(on)
        return view

    def with_class_names(self, class_names: Sequence[str]) -> "BagDataset":
        """Re-map labels onto ``class_names`` (e.g. those stored in a checkpoint).

        Raises :class:`MMILInputError` when a label is not among ``class_names``.
        """
        class_names = [str(c) for c in class_names]
        code = {c: i for i, c in enumerate(class_names)}
        labels = np.full(len(self), -1, dtype=np.int64)
        for i, lab in enumerate(self.labels):
            if lab < 0:
                continue
            name = self.class_names[lab]
            if name not in code:
                raise MMILInputError(f"{self.source}: label {name!r} of {self.slide_ids[i]!r} is not one of the checkpoint's classes {class_names}; use labels with the same coding")
            labels[i] = code[name]
        view = self.subset(range(len(self)))
        view.splits, view.fold_ids = self.splits, self.fold_ids
        view.labels, view.class_names = labels, class_names
        return view

    def without_labels(self) -> "BagDataset":
        """A view with every label unknown and no classes (for prediction)."""
        view = self.subset(range(len(self)))
        view.labels = np.full(len(self), -1, dtype=np.int64)
        view.class_names = []
        return view

    # -- checks ---------------------------------------------------------
    def require_labels(self, what: str = "training") -> None:
        """Raise unless every bag has a label and at least two classes occur."""
        missing = [s for s, y in zip(self.slide_ids, self.labels) if y < 0]
        if missing:
            raise MMILInputError(f"{self.source}: {len(missing)} slide(s) without a label ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); {what} needs a label for every slide")
        present = np.unique(self.labels)
        if len(present) < 2:
            only = self.class_names[present[0]] if len(present) else "none"
            raise MMILInputError(f"{self.source}: every slide has the label {only!r}; {what} needs at least two classes")

    def validate(self, progress: bool = False) -> None:
        """Read every bag once so bad files fail now, not in the middle of training."""
        from mmpl.progress import progress as _progress

        for i in _progress(range(len(self)), progress, "checking bags"):
            self[i]

    def num_instances(self) -> np.ndarray:
        """Instance count per bag (reads shapes only for h5; loads .pt files)."""
        out = np.zeros(len(self), dtype=np.int64)
        for i, e in enumerate(self._entries):
            if e.features is not None:
                out[i] = e.features.shape[0]
            elif e.path is not None and e.path.suffix.lower() in (".h5", ".hdf5"):
                out[i] = h5_feature_shape(e.path)[0]
            else:
                out[i] = self[i].num_instances
        return out

    def __repr__(self) -> str:
        return f"BagDataset(n={len(self)}, in_dim={self.in_dim}, classes={self.class_names}, kind={self.kind!r}, source={self.source!r})"

    # -- constructors ---------------------------------------------------
    @classmethod
    def from_bags(cls, bags: Sequence[Bag], class_names: Sequence[str] | None = None) -> "BagDataset":
        """In-memory dataset from :class:`Bag` objects (labels are class indices)."""
        if not bags:
            raise MMILInputError("no bags given")
        entries = []
        in_dim = int(bags[0].features.shape[-1])
        for b in bags:
            feats = check_features(b.features.detach().cpu().numpy(), f"bag {b.slide_id}", in_dim)
            entries.append(
                _Entry(
                    b.slide_id,
                    features=feats,
                    coords=None if b.coords is None else b.coords.detach().cpu().numpy().astype(np.float32),
                    groups=None if b.groups is None else b.groups.detach().cpu().numpy().astype(np.int64),
                )
            )
        labels = np.array([-1 if b.label is None else int(b.label) for b in bags], dtype=np.int64)
        if class_names is None:
            k = int(labels.max()) + 1 if (labels >= 0).any() else 0
            class_names = [str(c) for c in range(k)]
        cases = [b.case_id for b in bags]
        return cls(entries, labels, class_names, in_dim, case_ids=cases if all(c is not None for c in cases) else None, kind=KIND_MEMORY, source="memory")


def load_dataset(
    features: str | Path,
    labels: str | Path | None = None,
    *,
    in_dim: int | None = None,
    class_names: Sequence[str] | None = None,
) -> BagDataset:
    """Open a dataset of bags.

    Args:
        features: a directory of per-slide ``.h5``/``.pt`` bags (or CLAM's
            ``h5_files/``/``pt_files/`` below it), or one MIL-benchmark ``.csv``.
        labels: label CSV (long or wide layout, see :mod:`mmil.data.labels`);
            ``None`` for a MIL CSV (labels come from it) or for prediction
            (every slide found, label unknown).
        in_dim: expected feature dimension (a checkpoint's); a mismatch is an error.
        class_names: fix the label coding (a checkpoint's classes); otherwise
            the sorted distinct labels define it.

    Every file is opened once here (shapes only for HDF5) so missing, corrupt
    and inconsistent files fail before any training starts.
    """
    features = Path(features)
    if features.suffix.lower() == ".csv":
        ds = _load_mil_csv(features, labels)
    else:
        ds = _load_directory(features, labels)
    if in_dim is not None and ds.in_dim != int(in_dim):
        raise MMILInputError(
            f"{features}: features have dimension {ds.in_dim} but the checkpoint expects in_dim={in_dim}; "
            "use the checkpoint trained on these features (same encoder) or re-extract them"
        )
    if class_names is not None:
        ds = ds.with_class_names(class_names)
    return ds


def _load_mil_csv(path: Path, labels: str | Path | None) -> BagDataset:
    if labels is not None:
        raise MMILInputError(f"{path}: a MIL-benchmark CSV carries its own labels; drop the label CSV ({labels})")
    data = read_mil_csv(path)
    entries = [_Entry(str(b), features=f) for b, f in zip(data.bag_ids, data.features)]
    in_dim = data.features[0].shape[1]
    return BagDataset(entries, data.labels, data.class_names, in_dim, kind=KIND_BENCHMARK, source=str(path))


def _load_directory(directory: Path, labels: str | Path | None) -> BagDataset:
    files = find_bag_files(directory)
    table = read_label_csv(labels) if labels is not None else LabelTable(sorted(files), [None] * len(files))
    paths: list[Path] = []
    missing: list[str] = []
    for sid in table.slide_ids:
        p = files.get(sid)
        if p is None:
            # label CSVs sometimes keep the slide's file extension (e.g. "slide_1.svs")
            p = files.get(Path(sid).stem) if Path(sid).suffix else None
        if p is None:
            missing.append(sid)
        else:
            paths.append(p)
    if missing:
        raise MMILInputError(
            f"{labels}: {len(missing)} slide(s) listed have no bag file in {directory} "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); extract their features or remove them from the CSV"
        )
    in_dim = _common_feature_dim(paths)
    raw = table.labels
    known = sort_label_values({v for v in raw if v is not None})
    code = {c: i for i, c in enumerate(known)}
    y = np.array([-1 if v is None else code[canonical_label(v)] for v in raw], dtype=np.int64)
    entries = [_Entry(sid, path=p) for sid, p in zip(table.slide_ids, paths)]
    index = {sid: i for i, sid in enumerate(table.slide_ids)}
    splits = None if table.splits is None else {k: [index[s] for s in v] for k, v in table.splits.items()}
    return BagDataset(
        entries,
        y,
        known,
        in_dim,
        case_ids=table.case_ids,
        splits=splits,
        fold_ids=None if table.fold_ids is None else np.asarray(table.fold_ids),
        kind=KIND_SLIDES,
        source=str(labels if labels is not None else directory),
    )


def _common_feature_dim(paths: list[Path]) -> int:
    """Feature dimension shared by all bag files (HDF5 shapes are read without data;
    ``.pt`` files are checked on first read, only the first is loaded here)."""
    dims: dict[int, list[Path]] = {}
    first_pt = None
    for p in paths:
        if p.suffix.lower() in (".h5", ".hdf5"):
            n, c = h5_feature_shape(p)
            if n == 0:
                raise MMILInputError(f"{p}: empty bag (0 instances); re-run patching/feature extraction for this slide or remove it from the label CSV")
            dims.setdefault(c, []).append(p)
        elif first_pt is None:
            first_pt = p
    if first_pt is not None:
        dims.setdefault(read_pt_bag(first_pt).features.shape[1], []).append(first_pt)
    if len(dims) > 1:
        majority = max(dims, key=lambda d: len(dims[d]))
        odd = next(d for d in dims if d != majority)
        raise MMILInputError(
            f"{dims[odd][0]}: feature dimension {odd} differs from the other slides' {majority}; extract every slide with the same encoder"
        )
    return next(iter(dims))


def center_on_median(features: np.ndarray) -> np.ndarray:
    """``x_ij - median_i(x_ij)``: every feature of a bag relative to the bag's own median (float32).

    Why (docs/benchmarks.md, recipe of issue 10): a per-slide offset (stain, scanner, tissue mix)
    lets a model memorise the training slides instead of finding the few instances that differ;
    the median of a bag whose positive instances are a minority is that of its normal tissue, so
    the centring removes the offset and keeps the positives' shift.
    """
    x = np.asarray(features, dtype=np.float32)
    return x - np.median(x, axis=0, keepdims=True) if len(x) else x


def feature_moments(dataset: BagDataset, min_std: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation over all instances of ``dataset``.

    ``mean = sum_i x_i / n``, ``std = sqrt(sum_i x_i^2 / n - mean^2)`` accumulated
    in float64; standard deviations below ``min_std`` become 1 so constant
    features pass through unscaled.
    """
    raw = dataset.with_standardization(None, None)
    total = np.zeros(dataset.in_dim, dtype=np.float64)
    total_sq = np.zeros(dataset.in_dim, dtype=np.float64)
    count = 0
    for i in range(len(raw)):
        x = raw[i].features.numpy().astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += x.shape[0]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < min_std] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


__all__ = ["BagDataset", "load_dataset", "feature_moments", "center_on_median", "KIND_BENCHMARK", "KIND_SLIDES", "KIND_MEMORY"]
