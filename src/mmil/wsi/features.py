"""Patch features per slide, written in CLAM's feature-file layout (or TRIDENT's, :mod:`mmil.wsi.layouts`).

``<out>/<slide_id>.h5``: dataset ``features`` (N, D) float32 and ``coords`` (N, 2)
int64 (level-0 top-left corners, same order; the coordinate file's attributes are
copied onto it), plus file attributes naming the backbone, its preprocessing and the
patch geometry (patch size at level 0, magnification, mpp). ``--layout clam`` puts the
files in ``<out>/h5_files/``, ``--layout trident`` writes TRIDENT's job root, and ``--pt``
adds CLAM's ``pt_files/<slide_id>.pt``.
Files are written atomically, so an existing file is complete: reruns skip it
(resume). Which region each patch covers comes from the coordinate file:

* ours and CLAM's: read ``patch_size`` pixels at ``patch_level``;
* TRIDENT's (no ``patch_level``): read ``patch_size_level0`` pixels at level 0.

Each patch is then resized once, to the backbone's input size (224 for
``resnet50-trunc``, CLAM's default) or, with ``input_size=None``, to the coordinate
file's ``target_patch_size`` (which undoes a rescaled read: 512 px at 40x -> 256).
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmpl.cliargs import Range, non_negative_int, positive_int
from mmpl.config import check_fields, option
from mmpl.device import DEVICE_HELP
from mmpl.fsio import atomic_path
from mmpl.jsonio import write_json, write_text
from mmpl.progress import progress as _progress, show_progress

from ..errors import MMILInputError
from ..evaluate import resolve_device
from .backbones import Backbone, build_backbone
from .layouts import (LAYOUTS, SlideOutputs, complete_outputs, feature_file_attributes, find_coords_file, patch_attributes, resolve_coords_dir,
                      slide_outputs, trident_coords_attributes, write_pt, write_pt_attributes, write_trident_patches)
from .sharding import normalize_shard, parse_shard, resolve_shard, shard_arg, shard_items  # noqa: F401 (re-exported)
from .slide import (dataclass_to_dict, describe_slide_error, level0_magnification, mpp_from_properties, open_slide, per_slide_errors,
                    read_rgb, remove_temp_files)
from .tiling import find_coords_dir
from .transforms import PatchTransform

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class ExtractConfig:
    """Options of ``mmil extract``."""

    backbone: str = option("resnet50-trunc", help="'resnet50-trunc' (torchvision ResNet-50 up to layer3, 1024-d), a preset (uni, uni2-h, virchow2, h-optimus-0, gigapath, phikon-v2, ctranspath; our own implementations, --weights = the released file) or 'timm:MODEL_NAME' (needs timm)",
                           metavar="NAME")
    weights: str | None = option(None, help="local weight file (.pth/.pt state dict or .safetensors; torchvision/CLAM ResNet-50 names for resnet50-trunc)",
                                 metavar="FILE")
    random_weights: bool = option(False, help="use seeded random weights instead of a weight file (tests and smoke runs only)")
    seed: int = option(0, help="seed of the random weights", type=non_negative_int)
    input_size: int | None = option(-1, type=Range(int, -1), metavar="PX",
                                    help="resize patches to this side before the backbone (-1: 224 for resnet50-trunc, timm's config otherwise; "
                                    "0: the tiling's target patch size)")
    """Side patches are resized to: -1 = the backbone's default, None/0 = the coordinate file's target size."""
    batch_size: int = option(64, help="patches per forward pass", type=positive_int, metavar="N")
    workers: int = option(4, help="DataLoader worker processes reading patches (0: read in the main process)", type=non_negative_int, metavar="N")
    device: str = option("auto", help=DEVICE_HELP)
    precision: str = option("auto", help="autocast precision on CUDA: auto (bf16 where supported, else fp16), fp32, fp16 or bf16; CPU always runs fp32", choices=PRECISIONS)
    overwrite: bool = option(False, help="recompute slides whose feature file exists (otherwise they are skipped)")
    layout: str = option("mmil", choices=LAYOUTS,
                         help="where feature files go: mmil (<out>/<slide>.h5), clam (<out>/h5_files/<slide>.h5) or trident "
                         "(<out>/<mag>x_<patch>px_<overlap>px_overlap/patches/<slide>_patches.h5 and .../features_<backbone>/<slide>.h5)")
    pt: bool = option(False, help="also write CLAM's pt_files/<slide>.pt (a float32 tensor (N, D), as CLAM's trainer reads it) "
                      "and pt_files/attributes.json")
    shard: tuple[int, int] | str | None = option(None, type=shard_arg, metavar="I/N",
                                                 help="process share I of N (zero-based, e.g. 0/4) of the slides (none: under torchrun RANK/WORLD_SIZE, else all)")
    """(index, count), zero-based index; ``None`` = all slides, or this rank's share under torchrun."""

    def validate(self) -> None:
        """Check types and ranges (those of the fields), naming the key and its option."""
        check_fields(self, error=MMILInputError)
        if self.precision not in PRECISIONS:
            raise MMILInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r} (--precision)")
        if self.layout not in LAYOUTS:
            raise MMILInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r} (--layout)")
        self.shard = normalize_shard(self.shard)
        if self.input_size == 0:
            self.input_size = None


@dataclass
class PatchPlan:
    """How to read the patches of one slide."""

    coords: np.ndarray  # (N, 2) int64, level 0
    level: int
    read_size: int
    target_size: int
    attrs: dict[str, Any]


@dataclass
class ExtractResult:
    slide: str
    n_patches: int
    seconds: float
    status: str  # "ok", "exists", "skipped" (no coordinate file), "failed"
    error: str = ""
    outputs: SlideOutputs | None = None  # the files of a slide done ("ok" or "exists")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; ``None`` = no autocast (fp32 or CPU)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _attrs(obj) -> dict[str, Any]:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}


def read_patch_plan(path: str | Path) -> PatchPlan:
    """Coordinates and read geometry from a coordinate (or feature) ``.h5`` file."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise MMILInputError(f"{path}: no 'coords' dataset; pass coordinate files written by `mmil tile` (or CLAM/TRIDENT)")
            coords = np.asarray(f["coords"][()])
            attrs = {**_attrs(f), **_attrs(f["coords"])}
    except OSError as err:
        raise MMILInputError(f"{path}: cannot read HDF5 ({err}); the file is corrupt or truncated, re-run `mmil tile`") from None
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
        raise MMILInputError(f"{path}: 'coords' must have shape (N, 2) with N > 0, got {coords.shape}")
    if not np.all(np.isfinite(coords)) or not np.array_equal(coords, np.round(coords)):
        raise MMILInputError(f"{path}: 'coords' must hold whole level-0 pixel positions")
    coords = coords.astype(np.int64)
    if "patch_level" in attrs and "patch_size" in attrs:
        level, read = int(attrs["patch_level"]), int(attrs["patch_size"])
        target = int(attrs.get("target_patch_size", read))
    elif "patch_size_level0" in attrs and "patch_size" in attrs:  # TRIDENT layout
        level, read, target = 0, int(attrs["patch_size_level0"]), int(attrs["patch_size"])
    else:
        raise MMILInputError(f"{path}: 'coords' lacks the patch_size/patch_level attributes that say what to read; re-create it with `mmil tile`")
    if read < 1 or target < 1 or level < 0:
        raise MMILInputError(f"{path}: invalid patch geometry (patch_size={read}, patch_level={level}, target_patch_size={target})")
    return PatchPlan(coords, level, read, target, attrs)


class SlidePatchDataset(Dataset):
    """Patches of one slide as normalised tensors; each worker opens its own slide handle."""

    def __init__(self, slide_path: str | Path, plan: PatchPlan, transform: PatchTransform):
        self.slide_path = Path(slide_path)
        self.plan = plan
        self.transform = transform
        self._slide = None

    def __len__(self) -> int:
        return int(self.plan.coords.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = open_slide(self.slide_path)
        x, y = self.plan.coords[i]
        rgb = read_rgb(self._slide, (int(x), int(y)), self.plan.level, (self.plan.read_size, self.plan.read_size))
        return self.transform(rgb)

    def __getstate__(self):
        # OpenSlide handles cannot cross process boundaries: workers reopen the slide.
        state = dict(self.__dict__)
        state["_slide"] = None
        return state

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def check_plan_fits_slide(plan: PatchPlan, slide, coords_path: Path, slide_path: Path) -> None:
    """Raise when the coordinate file cannot belong to this slide (level or coordinates out of range)."""
    if plan.level >= slide.level_count:
        raise MMILInputError(f"{coords_path}: patch_level {plan.level} but {slide_path} has {slide.level_count} levels; the coordinates belong to another slide")
    w0, h0 = slide.level_dimensions[0]
    if plan.coords.min() < 0 or plan.coords[:, 0].max() >= w0 or plan.coords[:, 1].max() >= h0:
        raise MMILInputError(f"{coords_path}: coordinates fall outside {slide_path} ({w0} x {h0} at level 0); the coordinates belong to another slide")


def embed_patches(backbone: Backbone, dataset: Dataset, *, batch_size: int, workers: int, device: torch.device, precision: str, progress: bool = False, desc: str = "") -> np.ndarray:
    """Run the backbone over a patch dataset in order; returns ``(N, D)`` float32."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    dtype = autocast_dtype(precision, device)
    cast = torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    out = np.empty((len(dataset), backbone.out_dim), dtype=np.float32)
    pos = 0
    with torch.inference_mode(), cast:
        for batch in _progress(loader, progress, desc):
            feats = backbone.model(batch.to(device, non_blocking=True)).float().cpu().numpy()
            out[pos : pos + feats.shape[0]] = feats
            pos += feats.shape[0]
    return out


def write_features_h5(path: Path, features: np.ndarray, coords: np.ndarray, coords_attrs: dict, file_attrs: dict, features_attrs: dict | None = None) -> None:
    """Write ``features`` (float32) and ``coords`` (int64) atomically, with their attributes."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            fs = f.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
            for k, v in (features_attrs or {}).items():
                fs.attrs[k] = v
            for k, v in coords_attrs.items():
                ds.attrs[k] = v
            for k, v in file_attrs.items():
                f.attrs[k] = v


def features_complete(path: Path) -> int | None:
    """Number of patches in a finished feature file, or ``None`` when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            n = f["features"].shape[0]
            return int(n) if f["coords"].shape[0] == n else None
    except (OSError, KeyError):
        return None


@dataclass
class SlideJob:
    """One slide's coordinates, patch geometry (:func:`~mmil.wsi.layouts.patch_attributes`) and output files."""

    slide_id: str
    plan: PatchPlan
    geometry: dict[str, Any]
    level0_size: tuple[int, int]
    outputs: SlideOutputs


def plan_slide(slide_id: str, slide_path: Path, coords_path: Path, out_dir: Path, cfg: ExtractConfig) -> SlideJob:
    """Read the coordinate file, check it against the slide, and place the outputs (the slide is opened briefly)."""
    plan = read_patch_plan(coords_path)
    slide = open_slide(slide_path)
    try:
        check_plan_fits_slide(plan, slide, coords_path, slide_path)
        props = dict(slide.properties)
        try:
            mag0 = level0_magnification(props)
        except ValueError:
            mag0 = None
        geometry = patch_attributes(plan.attrs, plan.read_size, float(slide.level_downsamples[plan.level]), plan.target_size, mag0, mpp_from_properties(props))
        size0 = tuple(int(v) for v in slide.level_dimensions[0])
    finally:
        slide.close()
    outputs = slide_outputs(cfg.layout, out_dir, slide_id, cfg.backbone, cfg.pt, geometry, coords_path)
    return SlideJob(slide_id, plan, geometry, size0, outputs)


def extract_slide(slide_path: Path, coords_path: Path, job: SlideJob, backbone: Backbone, cfg: ExtractConfig, device: torch.device, progress: bool = False) -> int:
    """Features of one slide, written to ``job.outputs`` in ``cfg.layout``; returns the number of patches."""
    plan = job.plan
    size = backbone.input_size or plan.target_size
    dataset = SlidePatchDataset(slide_path, plan, PatchTransform(size, backbone.mean, backbone.std, backbone.interpolation, backbone.crop_pct))
    try:
        feats = embed_patches(backbone, dataset, batch_size=cfg.batch_size, workers=cfg.workers, device=device, precision=cfg.precision, progress=progress, desc=slide_path.name)
    finally:
        dataset.close()
    if not np.all(np.isfinite(feats)):
        raise MMILInputError(f"{slide_path}: the backbone produced non-finite features (overflow under --precision {cfg.precision}); rerun with --precision fp32 or bf16")
    file_attrs = feature_file_attributes(backbone, cfg.backbone, cfg.layout, size, job.geometry)
    coords_attrs, feature_attrs = plan.attrs, {}
    if job.outputs.patches is not None:  # TRIDENT: its own attribute names, on the coordinate and the feature file
        coords_attrs = trident_coords_attributes(job.geometry, job.slide_id, job.level0_size)
        feature_attrs = {"encoder": backbone.name, "name": coords_attrs["name"]}
        _write_trident_patches(job, coords_path)
    if job.outputs.pt is not None:  # before the feature file, whose presence marks the slide done
        write_pt(job.outputs.pt, feats)
    write_features_h5(job.outputs.features, feats, plan.coords, coords_attrs, file_attrs, feature_attrs)
    return int(feats.shape[0])


def _write_trident_patches(job: SlideJob, coords_path: Path) -> None:
    """TRIDENT's ``<slide>_patches.h5``, unless it is the coordinate file being read."""
    target = job.outputs.patches
    if target.exists() and os.path.samefile(target, coords_path):
        return
    attrs = trident_coords_attributes(job.geometry, job.slide_id, job.level0_size)
    write_trident_patches(target, job.plan.coords, attrs)


def check_out_is_not_coords(out_dir: str | Path, coords_dir: Path) -> None:
    """Refuse an ``--out`` that is the coordinate folder: feature files would replace the coordinate files."""
    out = Path(out_dir)
    if out.exists() and os.path.samefile(out, coords_dir):
        raise MMILInputError(f"--out {out_dir} is the --coords folder; feature files would replace the coordinate files there, choose another --out")


def _write_summary(path: Path, results: Sequence[ExtractResult]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("slide", "n_patches", "seconds", "status", "error"))
    for r in results:
        writer.writerow([r.slide, r.n_patches, f"{r.seconds:.3f}", r.status, r.error])
    write_text(path, buf.getvalue())


def _extract_one(slide_id: str, slide_path: Path, coords_dir: Path, out_dir: Path, backbone: Backbone | None, cfg: ExtractConfig, device: torch.device, show: bool) -> ExtractResult:
    coords_path = find_coords_file(coords_dir, slide_id)
    if cfg.layout != "trident":  # the output path is known without the coordinates
        outputs = slide_outputs(cfg.layout, out_dir, slide_id, cfg.backbone, cfg.pt)
        done = features_complete(outputs.features)
        if done is not None and not cfg.overwrite:  # done: neither the slide nor its coordinates are needed
            complete_outputs(outputs, None)
            return ExtractResult(slide_id, done, 0.0, "exists", outputs=outputs)
    if coords_path is None:
        return ExtractResult(slide_id, 0, 0.0, "skipped", f"{coords_dir / (slide_id + '.h5')}: no coordinate file (nor {slide_id}_patches.h5; tiling failed or found no tissue, see the tiling summary.csv)")
    t0 = time.perf_counter()
    try:
        job = plan_slide(slide_id, Path(slide_path), coords_path, out_dir, cfg)
        done = features_complete(job.outputs.features)
        if done is not None and not cfg.overwrite:
            complete_outputs(job.outputs, lambda: _write_trident_patches(job, coords_path))
            return ExtractResult(slide_id, done, 0.0, "exists", outputs=job.outputs)
        n = extract_slide(Path(slide_path), coords_path, job, backbone, cfg, device, progress=show)
        return ExtractResult(slide_id, n, time.perf_counter() - t0, "ok", outputs=job.outputs)
    except per_slide_errors() as err:
        return ExtractResult(slide_id, 0, time.perf_counter() - t0, "failed", describe_slide_error(err, slide_path))


def _needs_backbone(slide_id: str, slide_path: Path, coords_dir: Path, out_dir: Path, cfg: ExtractConfig) -> bool:
    """Whether this slide will run the backbone (unsure -> True; failures are reported later, per slide)."""
    if cfg.overwrite:
        return True
    if cfg.layout != "trident":
        return features_complete(slide_outputs(cfg.layout, out_dir, slide_id, cfg.backbone, False).features) is None
    coords_path = find_coords_file(coords_dir, slide_id)
    if coords_path is None:
        return False
    try:
        return features_complete(plan_slide(slide_id, Path(slide_path), coords_path, out_dir, cfg).outputs.features) is None
    except per_slide_errors():
        return True


def extract_features(slides: Sequence[tuple[str, Path]], coords_dir: str | Path, out_dir: str | Path, cfg: ExtractConfig, progress: bool = True, backbone: Backbone | None = None) -> list[ExtractResult]:
    """Extract features for this shard's slides; failures are recorded and the run continues.

    Writes ``extract_config.json`` and ``extract_summary.csv`` in ``out_dir`` (with a
    ``.shardI-of-N`` suffix when sharded, so ranks never write the same file), and with
    ``--pt`` an ``attributes.json`` (same suffix) beside the ``.pt`` files.
    Everything that can stop the run is checked before anything is written.
    """
    cfg.validate()
    coords_dir = find_coords_dir(resolve_coords_dir(coords_dir))
    check_out_is_not_coords(out_dir, coords_dir)
    out_dir = Path(out_dir)
    index, count = resolve_shard(cfg.shard)
    mine = shard_items(sorted(slides, key=lambda t: t[0]), index, count)
    device = resolve_device(cfg.device)
    show = show_progress(progress)
    todo = [(sid, p) for sid, p in mine if _needs_backbone(sid, p, coords_dir, out_dir, cfg)]
    if backbone is None and todo:  # built before anything is written: a bad backbone leaves no output
        backbone = build_backbone(cfg.backbone, cfg.weights, random_weights=cfg.random_weights, seed=cfg.seed, input_size=cfg.input_size)
    if backbone is not None:
        backbone.model.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if count == 1 else f".shard{index}-of-{count}"
    config_name, summary_name = f"extract_config{suffix}.json", f"extract_summary{suffix}.csv"
    # Temporary files a killed run left; under sharding only this shard's (other ranks may be writing theirs now).
    remove_temp_files(out_dir, None if count == 1 else [config_name, summary_name] + [f"{sid}.h5" for sid, _ in mine])
    write_json(out_dir / config_name, {**dataclass_to_dict(cfg), "shard": [index, count], "device": str(device)})
    results = [_extract_one(sid, p, coords_dir, out_dir, backbone, cfg, device, show)
               for sid, p in _progress(mine, show, f"extract (shard {index}/{count})")]
    _write_summary(out_dir / summary_name, results)
    if cfg.pt:
        write_pt_attributes([r.outputs for r in results if r.status in ("ok", "exists")], f"attributes{suffix}.json")
    return results
