"""From a trained model back to the slide: per-patch scores, PNG overlays, QuPath GeoJSON.

Instance scores come from ``model(x, coords=..., seed=..., return_scores=True).instance_scores``
(``docs/method/mmil.md`` §4 for the MMIL-Transformer; attention weights for the attention baselines),
averaged over ``repeats`` seeds because random sub-bag grouping makes one pass noisy.

Outputs per slide, in ``<out>/``:

* ``<slide>.png``: the slide thumbnail with the scores as a coloured overlay
  (colormap, alpha, colorbar; title: predicted class and its probability);
* ``<slide>.geojson``: a FeatureCollection with one square Polygon per patch in
  level-0 pixel coordinates, ``properties = {"objectType": "detection",
  "name", "score", "classification": {"name": "heatmap 0.9-1.0", "color"},
  "measurements": {"score", "score_rank"}}``, which QuPath imports (File > Import
  objects, or drag the file onto the slide) with the patches coloured by score bin;
* ``<slide>_scores.csv``: ``x,y,score`` per patch (level-0 top-left corner);

and ``summary.csv`` with the predicted class and probabilities of every slide.
"""
from __future__ import annotations

import csv
import io
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch

from mmpl.cliargs import Range, fraction, non_negative_int, positive_int
from mmpl.config import check_fields, option
from mmpl.device import DEVICE_HELP
from mmpl.fsio import atomic_path
from mmpl.jsonio import write_json, write_text
from mmpl.progress import progress as _progress

from ..errors import MMILInputError
from ..models.base import model_inputs
from .slide import describe_slide_error, open_slide, per_slide_errors, read_downsampled, remove_temp_files

NORMALIZATIONS = ("rank", "minmax", "none")
_GEOJSON_NAMESPACE = uuid.UUID("5d1f3c52-8f0e-4a55-9a7e-6f1f1d8b2c10")


@dataclass
class HeatmapConfig:
    """Options of ``mmil heatmap``."""

    seed: int = option(0, help="first seed of the random sub-bag grouping", type=non_negative_int)
    repeats: int = option(4, help="average instance scores (and probabilities) over seeds seed..seed+R-1", type=positive_int, metavar="R")
    cmap: str = option("jet", help="matplotlib colormap")
    alpha: float = option(0.45, help="opacity of the overlay", type=fraction)
    normalize: str = option("rank", choices=NORMALIZATIONS,
                            help="how scores become colours: rank (percentile, CLAM's choice), minmax, or none (raw, clipped to [0, 1])")
    thumbnail_size: int = option(1024, help="longest side of the thumbnail in pixels", type=Range(int, 16), metavar="PX")
    patch_size_level0: int | None = option(None, help="patch side in level-0 pixels, for feature files without geometry attributes",
                                           type=positive_int, metavar="PX")
    device: str = option("cpu", help=DEVICE_HELP)
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
            raise MMILInputError(f"unknown colormap {self.cmap!r} (--cmap); see matplotlib's colormap names (e.g. jet, viridis, coolwarm)")


@dataclass
class HeatmapResult:
    slide: str
    n_patches: int
    predicted: str
    probs: list[float]
    seconds: float
    status: str  # "ok" or "failed"
    error: str = ""


# --------------------------------------------------------------------------- pure geometry
def patch_squares(coords: np.ndarray, size0: float) -> np.ndarray:
    """Closed square rings ``(N, 5, 2)`` for patches with level-0 top-left ``coords`` and side ``size0``.

    Ring ``[(x, y), (x+s, y), (x+s, y+s), (x, y+s), (x, y)]``: counter-clockwise with the
    y axis pointing up (RFC 7946's exterior-ring orientation).
    """
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    offsets = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.float64) * float(size0)
    return c[:, None, :] + offsets[None, :, :]


def squares_to_coords(squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`patch_squares`: ``(top-left corners (N, 2), side lengths (N,))``."""
    sq = np.asarray(squares, dtype=np.float64)
    lo = sq.min(axis=1)
    hi = sq.max(axis=1)
    return lo, (hi - lo).mean(axis=1)


def normalize_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """Map scores to ``[0, 1]`` for colouring.

    ``rank``: ``r_i / (N - 1)`` with ``r_i`` the 0-based rank (ties share their mean rank);
    ``minmax``: ``(s - min) / (max - min)`` (0.5 if constant); ``none``: ``clip(s, 0, 1)``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s
    if method == "rank":
        if s.size == 1:
            return np.full(1, 1.0)
        order = np.argsort(s, kind="stable")
        ranks = np.empty(s.size, dtype=np.float64)
        ranks[order] = np.arange(s.size, dtype=np.float64)
        # Average ranks over ties so equal scores get equal colours.
        uniq, inverse = np.unique(s, return_inverse=True)
        if uniq.size < s.size:
            ranks = np.bincount(inverse, weights=ranks)[inverse] / np.bincount(inverse)[inverse]
        return ranks / (s.size - 1)
    if method == "minmax":
        lo, hi = float(s.min()), float(s.max())
        return np.full(s.shape, 0.5) if hi <= lo else (s - lo) / (hi - lo)
    if method == "none":
        return np.clip(s, 0.0, 1.0)
    raise ValueError(f"unknown score normalisation {method!r}; choose one of {NORMALIZATIONS}")


def score_colour(value: float) -> list[int]:
    """RGB colour (0..255) for a normalised score, from matplotlib's ``jet`` (QuPath shows it)."""
    import matplotlib  # noqa: PLC0415

    r, g, b, _ = matplotlib.colormaps["jet"](float(np.clip(value, 0.0, 1.0)))
    return [int(round(255 * r)), int(round(255 * g)), int(round(255 * b))]


def score_bin(value: float, bins: int = 10) -> int:
    """Index ``k`` of the bin ``[k/bins, (k+1)/bins)`` holding a normalised score (1.0 goes in the last)."""
    return int(min(bins - 1, max(0, int(np.floor(float(value) * bins)))))


def scores_to_geojson(coords: np.ndarray, scores: np.ndarray, size0: float, *, slide_id: str, normalize: str = "rank", bins: int = 10) -> dict[str, Any]:
    """GeoJSON FeatureCollection of scored patch squares (level-0 pixels), QuPath-importable.

    Feature ``i`` has ``geometry = Polygon([patch_squares(coords)[i]])``, the raw score in
    ``properties.score`` and ``properties.measurements.score``, its percentile in
    ``measurements.score_rank``, and a classification ``"heatmap a-b"`` naming the bin of
    its normalised score, coloured with ``jet``, so QuPath shows the heatmap on import.
    """
    squares = patch_squares(coords, size0)
    scores = np.asarray(scores, dtype=np.float64)
    ranked = normalize_scores(scores, "rank")
    shown = normalize_scores(scores, normalize)
    features = []
    for i in range(squares.shape[0]):
        ring = [[float(x), float(y)] for x, y in squares[i]]
        k = score_bin(shown[i], bins)
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_GEOJSON_NAMESPACE, f"{slide_id}/{i}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "detection",
                    "name": f"patch {i}",
                    "score": float(scores[i]),
                    "classification": {"name": f"heatmap {k / bins:.1f}-{(k + 1) / bins:.1f}", "color": score_colour((k + 0.5) / bins)},
                    "measurements": {"score": float(scores[i]), "score_rank": float(ranked[i])},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def score_canvas(coords: np.ndarray, scores: np.ndarray, size0: float, shape: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Scores painted on a ``shape`` (H, W) canvas whose pixel covers ``scale`` level-0 pixels.

    Each patch covers canvas pixels ``[floor(x/sx), ceil((x+s)/sx))`` (same for y);
    overlapping patches are averaged; uncovered pixels are NaN.
    """
    h, w = shape
    sx, sy = scale
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    for (x, y), s in zip(np.asarray(coords, dtype=np.float64), np.asarray(scores, dtype=np.float64)):
        c0, c1 = int(np.floor(x / sx)), int(np.ceil((x + size0) / sx))
        r0, r1 = int(np.floor(y / sy)), int(np.ceil((y + size0) / sy))
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(max(c1, c0 + 1), w), min(max(r1, r0 + 1), h)
        total[r0:r1, c0:c1] += s
        count[r0:r1, c0:c1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def patch_size_from_attrs(attrs: dict[str, Any]) -> int | None:
    """Level-0 patch side from coordinate attributes: ``patch_size_level0``, else
    ``patch_size * downsample`` (CLAM), else ``None``."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" in attrs and "downsample" in attrs:
        ds = np.atleast_1d(np.asarray(attrs["downsample"], dtype=np.float64))
        return int(round(float(attrs["patch_size"]) * float(ds[0])))
    if "patch_size" in attrs and int(attrs.get("patch_level", 0)) == 0:
        return int(attrs["patch_size"])
    return None


def grid_step(coords: np.ndarray) -> int | None:
    """Smallest positive gap between distinct x (or y) coordinates: the grid step, or ``None``."""
    steps = []
    for axis in (0, 1):
        u = np.unique(np.asarray(coords)[:, axis])
        if u.size > 1:
            steps.append(int(np.diff(u).min()))
    return min(steps) if steps else None


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


# --------------------------------------------------------------------------- drawing
def render_overlay(thumb: np.ndarray, canvas: np.ndarray, *, cmap: str, alpha: float, title: str, dpi: int = 100):
    """Matplotlib figure: thumbnail, score overlay (NaN transparent), colorbar, title."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: no global state, no GUI

    from matplotlib.cm import ScalarMappable  # noqa: PLC0415
    from matplotlib.colors import Normalize  # noqa: PLC0415

    h, w = thumb.shape[:2]
    # Figure sized so the thumbnail is drawn at one figure pixel per thumbnail pixel,
    # with a margin on the right for the colorbar and on top for the title.
    img_w, img_h = max(w, 160) / dpi, max(h, 160) / dpi
    right, top = 1.1, 0.35
    fig = Figure(figsize=(img_w + right, img_h + top), dpi=dpi)
    W, H = img_w + right, img_h + top
    ax = fig.add_axes([0.0, 0.0, img_w / W, img_h / H])
    ax.imshow(thumb, interpolation="nearest")
    ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9, x=0.5 * img_w / W, y=1.0 - 0.05 * top / H, va="top")
    cax = fig.add_axes([(img_w + 0.12) / W, 0.1 * img_h / H, 0.15 / W, 0.8 * img_h / H])
    # The colorbar shows the colours at full opacity (the overlay's alpha would wash it out).
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax, label="patch score (normalised)")
    return fig


def write_png(fig, path: Path, dpi: int) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _coords_attrs(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: v for k, v in f.attrs.items()}
            if "coords" in f:
                attrs.update({k: v for k, v in f["coords"].attrs.items()})
            return attrs
    except OSError:
        return {}


def heatmap_slide(
    slide_id: str,
    slide_path: Path,
    feature_path: Path,
    features: torch.Tensor,
    coords: np.ndarray,
    groups: torch.Tensor | None,
    model: torch.nn.Module,
    class_names: Sequence[str],
    out_dir: Path,
    cfg: HeatmapConfig,
) -> HeatmapResult:
    """Scores, PNG, GeoJSON and score CSV of one slide."""
    t0 = time.perf_counter()
    size0 = cfg.patch_size_level0 or patch_size_from_attrs(_coords_attrs(feature_path)) or grid_step(coords)
    if not size0:
        raise MMILInputError(f"{feature_path}: cannot tell the patch size (no patch_size_level0 / patch_size attributes); pass --patch-size-level0")
    seeds = list(range(cfg.seed, cfg.seed + cfg.repeats))
    scores, probs = bag_scores(model, features, torch.from_numpy(coords.astype(np.float32)), groups, seeds, cfg.device)
    pred = int(np.argmax(probs))
    name = class_names[pred] if pred < len(class_names) else str(pred)
    slide = open_slide(slide_path)
    try:
        w0, h0 = slide.level_dimensions[0]
        if coords[:, 0].max() >= w0 or coords[:, 1].max() >= h0:
            raise MMILInputError(f"{feature_path}: coordinates fall outside {slide_path} ({w0} x {h0}); the features belong to another slide")
        thumb, scale = read_downsampled(slide, max(max(w0, h0) / max(1, cfg.thumbnail_size), 1.0))
    finally:
        slide.close()
    canvas = score_canvas(coords, normalize_scores(scores, cfg.normalize), size0, thumb.shape[:2], scale)
    fig = render_overlay(thumb, canvas, cmap=cfg.cmap, alpha=cfg.alpha, title=f"{slide_id}: predicted {name} (p = {probs[pred]:.3f})", dpi=cfg.dpi)
    write_png(fig, out_dir / f"{slide_id}.png", cfg.dpi)
    geo = scores_to_geojson(coords, scores, size0, slide_id=slide_id, normalize=cfg.normalize)
    write_json(out_dir / f"{slide_id}.geojson", geo, indent=None)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("x", "y", "score"))
    for (x, y), s in zip(coords.tolist(), scores.tolist()):
        writer.writerow((int(x), int(y), f"{s:.6g}"))
    write_text(out_dir / f"{slide_id}_scores.csv", buf.getvalue())
    return HeatmapResult(slide_id, int(coords.shape[0]), name, [float(p) for p in probs], time.perf_counter() - t0, "ok")


def make_heatmaps(checkpoint_dir: str | Path, features_dir: str | Path, slides: Sequence[tuple[str, Path]], out_dir: str | Path, cfg: HeatmapConfig, progress: bool = True) -> list[HeatmapResult]:
    """Heatmaps for every slide that has both a feature file and a slide file.

    Slides with features but no slide file, and failures, are listed in the
    returned results (``status="failed"``) and in ``summary.csv``; the run continues.
    """
    from ..data import load_dataset  # noqa: PLC0415 - downstream modules imported on use
    from ..evaluate import load_for_inference, resolve_device  # noqa: PLC0415

    cfg.validate()
    cfg.device = str(resolve_device(cfg.device))
    out_dir = Path(out_dir)
    dataset = load_dataset(features_dir)
    model, dataset, ckpt_cfg = load_for_inference(checkpoint_dir, dataset, device=cfg.device, **cfg.model_kwargs)
    model.eval()
    n_classes = int(ckpt_cfg["model_kwargs"]["n_classes"])
    names = list(ckpt_cfg.get("extra", {}).get("class_names") or [str(c) for c in range(n_classes)])
    slide_paths = dict(slides)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out_dir)  # left by a killed run; every file is written afresh below
    results: list[HeatmapResult] = []
    for i in _progress(range(len(dataset)), progress, "heatmap"):
        sid = dataset.slide_ids[i]
        t0 = time.perf_counter()
        try:
            if sid not in slide_paths:
                raise MMILInputError(f"slide {sid!r}: features found but no slide file among --slides; add the slide or remove {dataset.source_of(i)}")
            bag = dataset[i]
            if bag.coords is None:
                raise MMILInputError(f"{dataset.source_of(i)}: no patch coordinates; heatmaps need the 'coords' dataset (extract with `mmil extract`)")
            results.append(heatmap_slide(sid, Path(slide_paths[sid]), Path(dataset.source_of(i)), bag.features, bag.coords.numpy().astype(np.int64), bag.groups, model, names, out_dir, cfg))
        except per_slide_errors() as err:
            results.append(HeatmapResult(sid, 0, "", [], time.perf_counter() - t0, "failed", describe_slide_error(err, slide_paths.get(sid, dataset.source_of(i)))))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide", "n_patches", "predicted"] + [f"prob_{n}" for n in names] + ["seconds", "status", "error"])
    for r in results:
        probs = [f"{p:.6f}" for p in r.probs] if r.probs else [""] * len(names)
        writer.writerow([r.slide, r.n_patches, r.predicted, *probs, f"{r.seconds:.3f}", r.status, r.error])
    write_text(out_dir / "summary.csv", buf.getvalue())
    return results
