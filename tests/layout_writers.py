"""Write other tools' output layouts as their documentation describes them (no tool code is copied).

* TRIDENT (README / ``.claude/skills/trident/reference.md`` of mahmoodlab/TRIDENT): a job root with
  ``thumbnails/``, ``contours/``, ``contours_geojson/`` and per patching configuration
  ``<mag>x_<patch>px_<overlap>px_overlap/``: ``patches/<slide>_patches.h5`` (dataset ``coords`` (N, 2) int64,
  attrs ``patch_size``, ``overlap``, ``target_magnification``, ``patch_size_level0``, ``level0_width``,
  ``level0_height``, ``level0_magnification``, ``name``), ``visualization/<slide>.jpg`` and
  ``features_<encoder>/<slide>.h5`` (``features`` (N, D) float32 with attrs ``encoder``, ``name``; ``coords``
  with the same attrs as the patches file).
* STAMP (KatherLab/STAMP ``stamp preprocess``): ``<output_dir>/<extractor>/<slide>.h5`` with ``feats`` (N, D)
  float16 and ``coords`` (N, 2) float in micrometres; file attrs ``stamp_version``, ``extractor``, ``unit`` = "um",
  ``tile_size_um``, ``tile_size_px``, ``code_hash``, ``feat_type`` = "tile"; a ``<slide>.jpg`` thumbnail beside.
* CLAM (``create_splits_seq.py``): ``splits_k.csv`` = pandas ``to_csv`` of the train/val/test slide-id columns
  (unnamed index column, shorter columns padded with empty cells), ``splits_k_bool.csv`` (index = slide id,
  True/False per part) and ``splits_k_descriptor.csv`` (class counts per part).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np


def _attrs(obj, attrs: Mapping) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = v


def trident_coords_attrs(slide_id: str, *, mag: float = 20.0, patch: int = 256, overlap: int = 0, mag0: float = 40.0,
                         size0: tuple[int, int] = (20000, 15000)) -> dict:
    return {"patch_size": np.int64(patch), "overlap": np.int64(overlap), "target_magnification": np.int64(mag),
            "patch_size_level0": np.int64(round(patch * mag0 / mag)), "level0_width": np.int64(size0[0]),
            "level0_height": np.int64(size0[1]), "level0_magnification": np.int64(mag0), "name": slide_id}


def write_trident_job(job: str | Path, bags: Mapping[str, tuple[np.ndarray, np.ndarray]], *, encoder: str = "uni_v1", mag: int = 20,
                      patch: int = 256, overlap: int = 0, mag0: float = 40.0, size0: tuple[int, int] = (20000, 15000),
                      with_features: bool = True) -> Path:
    """A TRIDENT job root for ``bags`` (slide id -> (features (N, D), coords (N, 2))); returns the ``<cfg>`` folder."""
    job = Path(job)
    cfg = job / f"{mag}x_{patch}px_{overlap}px_overlap"
    for sub in (job / "thumbnails", job / "contours", job / "contours_geojson", cfg / "patches", cfg / "visualization"):
        sub.mkdir(parents=True, exist_ok=True)
    for sid, (feats, coords) in bags.items():
        attrs = trident_coords_attrs(sid, mag=mag, patch=patch, overlap=overlap, mag0=mag0, size0=size0)
        (job / "thumbnails" / f"{sid}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
        (job / "contours_geojson" / f"{sid}.geojson").write_text('{"type": "FeatureCollection", "features": []}')
        with h5py.File(cfg / "patches" / f"{sid}_patches.h5", "w") as f:
            _attrs(f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64)), attrs)
        if with_features:
            (cfg / f"features_{encoder}").mkdir(exist_ok=True)
            with h5py.File(cfg / f"features_{encoder}" / f"{sid}.h5", "w") as f:
                _attrs(f.create_dataset("features", data=np.asarray(feats, dtype=np.float32)), {"encoder": encoder, "name": sid})
                _attrs(f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64)), attrs)
    (job / "_config_segmentation.json").write_text("{}")
    (cfg / "_config_coords.json").write_text("{}")
    return cfg


def write_stamp_features(out_dir: str | Path, bags: Mapping[str, tuple[np.ndarray, np.ndarray]], *, extractor: str = "ctranspath",
                         tile_size_um: float = 256.0, tile_size_px: int = 224) -> Path:
    """STAMP feature files for ``bags`` (coords in micrometres); returns the ``<extractor>`` folder."""
    folder = Path(out_dir) / extractor
    folder.mkdir(parents=True, exist_ok=True)
    for sid, (feats, coords_um) in bags.items():
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f["coords"] = np.asarray(coords_um, dtype=np.float32)
            f["feats"] = np.asarray(feats, dtype=np.float16)
            _attrs(f, {"stamp_version": "2.2.0", "extractor": extractor, "unit": "um", "tile_size_um": tile_size_um,
                       "tile_size_px": tile_size_px, "code_hash": "0123abcd", "feat_type": "tile"})
        (folder / f"{sid}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    return folder


def write_clam_splits(split_dir: str | Path, folds: Sequence[Mapping[str, Sequence[str]]], label_of: Mapping[str, str]) -> Path:
    """CLAM's split folder: ``splits_k.csv``, ``splits_k_bool.csv``, ``splits_k_descriptor.csv`` for each fold."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    parts = ("train", "val", "test")
    classes = sorted(set(label_of.values()))
    for k, fold in enumerate(folds):
        cols = [list(fold.get(p, [])) for p in parts]
        with open(split_dir / f"splits_{k}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", *parts])
            for i in range(max(len(c) for c in cols)):
                w.writerow([i] + [c[i] if i < len(c) else "" for c in cols])
        with open(split_dir / f"splits_{k}_bool.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", *parts])
            for j, c in enumerate(cols):
                for sid in c:
                    w.writerow([sid] + [str(j == m) for m in range(3)])
        with open(split_dir / f"splits_{k}_descriptor.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["", *parts])
            for cls in classes:
                w.writerow([cls] + [sum(label_of.get(s) == cls for s in c) for c in cols])
    return split_dir
