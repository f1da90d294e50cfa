"""From a trained model back to the slide: per-patch scores, PNG overlays, a top-k gallery, QuPath GeoJSON.

Instance scores come from ``model(x, coords=..., seed=..., return_scores=True).instance_scores``
(``docs/method/mmil.md`` §4 for the MMIL-Transformer; attention weights for the attention baselines),
averaged over ``repeats`` seeds because random sub-bag grouping makes one pass noisy.

Outputs per slide, in ``<out>/``:

* ``<slide>.png``: the raw thumbnail beside the same thumbnail under the scores (only scored tissue patches
  are tinted, ``alpha`` 0.35, a perceptually uniform colormap), a scale bar in micrometres on both (from the
  slide's mpp; "scale unknown" without one) and a colorbar that says what it shows (e.g. "attention,
  rank-normalised 0-1", or "attention (raw)" on the raw min-max range); title: predicted class, its
  probability, and with ``--from-cv`` the fold whose model scored the slide;
* ``<slide>_top<k>.png``: the ``k`` highest-scoring patches, read from the slide at the patch level, with scores;
* ``<slide>.geojson``: a FeatureCollection with one square Polygon per patch in
  level-0 pixel coordinates, ``properties = {"objectType": "detection",
  "name", "score", "classification": {"name": "heatmap 0.9-1.0", "color"},
  "measurements": {"score", "score_rank"}}``, which QuPath imports (File > Import
  objects, or drag the file onto the slide) with the patches coloured by score bin;
* ``<slide>_scores.csv``: ``x,y,score`` per patch (level-0 top-left corner);

and ``summary.csv``: ``slide,n_patches,fold,pred_label,prob_<class>...,seconds,status,error``.
"""
from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from mmpl.cliargs import Range, fraction, non_negative_float, non_negative_int, positive_int
from mmpl.config import check_fields, option
from mmpl.device import DEVICE_HELP
from mmpl.jsonio import write_json, write_text
from mmpl.progress import progress as _progress

from ..errors import MMILInputError
from ..models.base import model_inputs
from .heatmap_geometry import (
    NORMALIZATIONS,
    grid_step,
    patch_size_from_attrs,
    score_canvas,
    scores_to_geojson,
)
from .heatmap_render import (
    display_values,
    render_gallery,
    render_overlay,
    scale_bar,
    score_noun,
    smooth_grid,
    tissue_pixels,
    top_k_patches,
    write_png,
)
from .slide import describe_slide_error, mpp_from_properties, open_slide, per_slide_errors, read_downsampled, read_rgb, remove_temp_files


@dataclass
class HeatmapConfig:
    """Options of ``mmil heatmap``."""

    seed: int = option(0, help="first seed of the random sub-bag grouping", type=non_negative_int)
    repeats: int = option(4, help="average instance scores (and probabilities) over seeds seed..seed+R-1", type=positive_int, metavar="R")
    cmap: str = option("viridis", help="matplotlib colormap (perceptually uniform: viridis, inferno, cividis; signed scores: coolwarm)")
    alpha: float = option(0.35, help="opacity of the overlay (the raw thumbnail is shown beside it)", type=fraction)
    normalize: str = option("rank", choices=NORMALIZATIONS,
                            help="how scores become colours: rank (percentile, CLAM's choice), minmax, or none (raw scores, coloured over their min-max range)")
    smooth: float = option(0.0, help="gaussian smoothing of the score map, sigma in patch-grid steps (0: none; ~1 hides the tile edges)",
                           type=non_negative_float, metavar="SIGMA")
    top_k: int = option(8, help="gallery of the K highest-scoring patches, read from the slide (0: no gallery)", type=non_negative_int, metavar="K")
    thumbnail_size: int = option(1024, help="longest side of the thumbnail in pixels", type=Range(int, 16), metavar="PX")
    patch_size_level0: int | None = option(None, help="patch side in level-0 pixels, for feature files without geometry attributes",
                                           type=positive_int, metavar="PX")
    device: str = option("cpu", help=DEVICE_HELP)
    refuse_training_slides: bool = option(False, help="stop (exit 2) instead of warning when the checkpoint was trained or validated "
                                          "on some of the slides (use --from-cv to score each slide with a model that did not see it)")
    dpi: int = option(100, help="resolution of the PNG overlays", type=Range(int, 10, 1200), cli=False)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Inference-time model options (e.g. ``{"grouping": "coords"}``) passed to the checkpoint loader."""

    def validate(self) -> None:
        """Check types and ranges (those of the fields), naming the key and its option."""
        check_fields(self, error=MMILInputError)
        if self.normalize not in NORMALIZATIONS:
            raise MMILInputError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r} (--normalize)")
        import matplotlib  # noqa: PLC0415

        if self.cmap not in matplotlib.colormaps:
            raise MMILInputError(f"unknown colormap {self.cmap!r} (--cmap); see matplotlib's colormap names (e.g. viridis, inferno, coolwarm)")


@dataclass
class HeatmapResult:
    slide: str
    n_patches: int
    predicted: str
    probs: list[float]
    seconds: float
    status: str  # "ok" or "failed"
    error: str = ""
    fold: int | None = None  # with --from-cv: the fold whose model scored the slide


@dataclass
class Scorer:
    """One checkpoint ready to score: its model, the dataset fitted to it, class names, what its scores are, its fold."""

    model: torch.nn.Module
    dataset: Any
    class_names: list[str]
    noun: str
    fold: int | None = None


# --------------------------------------------------------------------------- model
@torch.inference_mode()
def bag_scores(model: torch.nn.Module, features: torch.Tensor, coords: torch.Tensor | None, groups: torch.Tensor | None, seeds: Sequence[int], device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Instance scores ``(N,)`` and class probabilities ``(C,)``, each averaged over ``seeds``."""
    device = torch.device(device)
    x = features.to(device).unsqueeze(0)
    kwargs: dict[str, Any] = {}
    if coords is not None:
        kwargs["coords"] = coords.to(device).float().unsqueeze(0)
    if groups is not None:
        kwargs["groups"] = groups.to(device).unsqueeze(0)
    total_scores = torch.zeros(x.shape[1], dtype=torch.float64)
    total_probs = None
    for s in seeds:
        out = model(x, None, return_scores=True, **model_inputs(model, seed=int(s), **kwargs))
        if out.instance_scores is None:
            raise MMILInputError(f"model {type(model).__name__} returned no instance scores; it cannot make heatmaps")
        total_scores += out.instance_scores[0].detach().double().cpu()
        p = out.probs[0].detach().double().cpu()
        total_probs = p if total_probs is None else total_probs + p
    return (total_scores / len(seeds)).numpy(), (total_probs / len(seeds)).numpy()


# --------------------------------------------------------------------------- one slide
def _coords_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: v for k, v in f.attrs.items()}
            if "coords" in f:
                attrs.update({k: v for k, v in f["coords"].attrs.items()})
            return attrs
    except OSError:
        return {}


def patch_crops(slide, coords: np.ndarray, indices: Sequence[int], size0: float, level: int = 0) -> list[np.ndarray]:
    """RGB crops of the patches ``indices`` read at slide level ``level`` (the level they were embedded from),
    ``round(size0 / downsample)`` pixels a side."""
    level = level if 0 <= level < len(slide.level_downsamples) else 0
    side = max(1, int(round(size0 / float(slide.level_downsamples[level]))))
    return [read_rgb(slide, (int(coords[i, 0]), int(coords[i, 1])), level, (side, side)) for i in indices]


def _slide_pictures(slide_path: Path, feature_path: Path, coords: np.ndarray, size0: float, top: np.ndarray, attrs: dict[str, Any], cfg: HeatmapConfig):
    """The thumbnail, its level-0 pixels per pixel, the slide's mpp (or ``None``) and the crops of the ``top`` patches."""
    slide = open_slide(slide_path)
    try:
        w0, h0 = slide.level_dimensions[0]
        if coords[:, 0].max() >= w0 or coords[:, 1].max() >= h0:
            raise MMILInputError(f"{feature_path}: coordinates fall outside {slide_path} ({w0} x {h0}); the features belong to another slide")
        thumb, scale = read_downsampled(slide, max(max(w0, h0) / max(1, cfg.thumbnail_size), 1.0))
        mpp = mpp_from_properties(slide.properties)
        if mpp is None and float(attrs.get("mpp", 0) or 0) > 0:
            mpp = float(attrs["mpp"])
        crops = patch_crops(slide, coords, top, size0, int(attrs.get("patch_level", 0)))
    finally:
        slide.close()
    return thumb, scale, mpp, crops


def _write_scores_csv(path: Path, coords: np.ndarray, scores: np.ndarray) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("x", "y", "score"))
    for (x, y), s in zip(coords.tolist(), scores.tolist()):
        writer.writerow((int(x), int(y), f"{s:.6g}"))
    write_text(path, buf.getvalue())


def heatmap_slide(slide_id: str, slide_path: Path, feature_path: Path, bag, scorer: Scorer, out_dir: Path, cfg: HeatmapConfig) -> HeatmapResult:
    """Scores, PNG (raw | overlay), top-k gallery, GeoJSON and score CSV of one slide (``bag``: its features, coordinates, groups)."""
    t0 = time.perf_counter()
    coords = bag.coords.numpy().astype(np.int64)
    attrs = _coords_attrs(feature_path)
    size0 = cfg.patch_size_level0 or patch_size_from_attrs(attrs) or grid_step(coords)
    if not size0:
        raise MMILInputError(f"{feature_path}: cannot tell the patch size (no patch_size_level0 / patch_size attributes); pass --patch-size-level0")
    seeds = list(range(cfg.seed, cfg.seed + cfg.repeats))
    scores, probs = bag_scores(scorer.model, bag.features, torch.from_numpy(coords.astype(np.float32)), bag.groups, seeds, cfg.device)
    pred = int(np.argmax(probs))
    name = scorer.class_names[pred]
    top = top_k_patches(scores, cfg.top_k)
    thumb, scale, mpp, crops = _slide_pictures(slide_path, feature_path, coords, size0, top, attrs, cfg)
    values, limits, label = display_values(scores, cfg.normalize, scorer.noun)
    canvas = score_canvas(coords, values, size0, thumb.shape[:2], scale)
    if cfg.smooth > 0:  # sigma in grid steps -> thumbnail pixels
        canvas = smooth_grid(canvas, cfg.smooth * float(grid_step(coords) or size0) / scale[0])
    canvas = np.where(tissue_pixels(thumb), canvas, np.nan)  # glass under a patch's corner stays untinted
    by = "" if scorer.fold is None else f", scored by fold {scorer.fold} (held out)"
    fig = render_overlay(thumb, canvas, cmap=cfg.cmap, alpha=cfg.alpha, limits=limits, label=label,
                         title=f"{slide_id}: predicted {name} (p = {probs[pred]:.3f}){by}", bar=scale_bar(mpp, scale[0], thumb.shape[1]), dpi=cfg.dpi)
    write_png(fig, out_dir / f"{slide_id}.png", cfg.dpi)
    if len(top):
        gallery = render_gallery(crops, scores[top].tolist(), coords[top].tolist(), noun=scorer.noun, dpi=cfg.dpi,
                                 title=f"{slide_id}: the {len(top)} highest-scoring patches ({scorer.noun}; level-0 x, y)")
        write_png(gallery, out_dir / f"{slide_id}_top{cfg.top_k}.png", cfg.dpi)
    write_json(out_dir / f"{slide_id}.geojson", scores_to_geojson(coords, scores, size0, slide_id=slide_id, normalize=cfg.normalize, cmap=cfg.cmap), indent=None)
    _write_scores_csv(out_dir / f"{slide_id}_scores.csv", coords, scores)
    return HeatmapResult(slide_id, int(coords.shape[0]), name, [float(p) for p in probs], time.perf_counter() - t0, "ok", fold=scorer.fold)


# --------------------------------------------------------------------------- the command
def load_scorer(checkpoint_dir: str | Path, dataset, cfg: HeatmapConfig, fold: int | None = None) -> Scorer:
    """A checkpoint in eval mode with ``dataset`` fitted to it (feature standardisation, class names)."""
    from ..evaluate import column_names, load_for_inference  # noqa: PLC0415 - downstream modules imported on use

    model, fitted, ckpt_cfg = load_for_inference(checkpoint_dir, dataset, device=cfg.device, **cfg.model_kwargs)
    model.eval()
    names = column_names(ckpt_cfg.get("extra", {}).get("class_names"), int(ckpt_cfg["model_kwargs"]["n_classes"]))
    return Scorer(model, fitted, names, score_noun(str(ckpt_cfg["model"])), fold)


def plan_scoring(checkpoint_dir: str | Path | None, from_cv: str | Path | None, dataset, cfg: HeatmapConfig) -> tuple[list[tuple[Scorer, list[int]]], list[int]]:
    """``([(scorer, bag indices)], indices no model may score)``: one checkpoint for every bag (a warning line on stderr,
    or an error with ``refuse_training_slides``, when it trained on some), or with ``from_cv`` each bag's held-out fold."""
    from ..evaluate import check_seen_slides  # noqa: PLC0415
    from .heatmap_cv import assign_folds, read_cv_plan  # noqa: PLC0415

    ids = dataset.slide_ids
    if from_cv is None:
        line = check_seen_slides(checkpoint_dir, ids, refuse=cfg.refuse_training_slides)
        if line:
            print(f"mmil heatmap: warning: {line}", file=sys.stderr)
        return [(load_scorer(checkpoint_dir, dataset, cfg), list(range(len(ids))))], []
    folds = read_cv_plan(from_cv)
    fold_of = assign_folds(folds, ids)
    jobs = []
    for f in folds:
        idx = [i for i, sid in enumerate(ids) if fold_of[sid] == f["fold"]]
        if idx:
            jobs.append((load_scorer(f["checkpoint"], dataset, cfg, f["fold"]), idx))
    return jobs, [i for i, sid in enumerate(ids) if fold_of[sid] is None]


def summary_csv(results: Sequence[HeatmapResult], names: Sequence[str]) -> str:
    """``slide,n_patches,fold,pred_label,prob_<class>...,seconds,status,error`` (the class names of the other CSVs)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide", "n_patches", "fold", "pred_label"] + [f"prob_{n}" for n in names] + ["seconds", "status", "error"])
    for r in results:
        probs = [f"{p:.6f}" for p in r.probs] if r.probs else [""] * len(names)
        writer.writerow([r.slide, r.n_patches, "" if r.fold is None else r.fold, r.predicted, *probs, f"{r.seconds:.3f}", r.status, r.error])
    return buf.getvalue()


def make_heatmaps(checkpoint_dir: str | Path | None, features_dir: str | Path, slides: Sequence[tuple[str, Path]], out_dir: str | Path, cfg: HeatmapConfig,
                  progress: bool = True, *, from_cv: str | Path | None = None) -> list[HeatmapResult]:
    """Heatmaps for every slide that has both a feature file and a slide file, scored by ``checkpoint_dir``, or with
    ``from_cv`` (a ``mmil train`` run folder) by the fold model that held the slide out.

    Every checkpoint is loaded before anything is written. Slides with features but no slide file, slides every
    fold trained on, and failures are listed in the returned results (``status="failed"``) and in ``summary.csv``;
    the run continues.
    """
    from ..data import load_dataset  # noqa: PLC0415 - downstream modules imported on use
    from ..evaluate import resolve_device  # noqa: PLC0415

    cfg.validate()
    cfg.device = str(resolve_device(cfg.device))
    out_dir = Path(out_dir)
    dataset = load_dataset(features_dir)
    jobs, unscored = plan_scoring(checkpoint_dir, from_cv, dataset, cfg)
    slide_paths = dict(slides)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)  # left by a killed run; every file is written afresh below
    results: dict[int, HeatmapResult] = {}
    for i in unscored:
        results[i] = HeatmapResult(dataset.slide_ids[i], 0, "", [], 0.0, "failed", "every fold of the run trained or validated on this slide")
    for scorer, indices in jobs:
        for i in _progress(indices, progress, "heatmap" if scorer.fold is None else f"heatmap, fold {scorer.fold}"):
            results[i] = _one_slide(scorer, i, slide_paths, out_dir, cfg)
    names = jobs[0][0].class_names if jobs else []
    ordered = [results[i] for i in sorted(results)]
    write_text(out_dir / "summary.csv", summary_csv(ordered, names))
    return ordered


def _one_slide(scorer: Scorer, i: int, slide_paths: dict[str, Path], out_dir: Path, cfg: HeatmapConfig) -> HeatmapResult:
    ds, t0 = scorer.dataset, time.perf_counter()
    sid = ds.slide_ids[i]
    try:
        if sid not in slide_paths:
            raise MMILInputError(f"slide {sid!r}: features found but no slide file among --slides; add the slide or remove {ds.source_of(i)}")
        bag = ds[i]
        if bag.coords is None:
            raise MMILInputError(f"{ds.source_of(i)}: no patch coordinates; heatmaps need the 'coords' dataset (extract with `mmil extract`)")
        return heatmap_slide(sid, Path(slide_paths[sid]), Path(ds.source_of(i)), bag, scorer, out_dir, cfg)
    except per_slide_errors() as err:
        return HeatmapResult(sid, 0, "", [], time.perf_counter() - t0, "failed", describe_slide_error(err, slide_paths.get(sid, ds.source_of(i))), scorer.fold)
