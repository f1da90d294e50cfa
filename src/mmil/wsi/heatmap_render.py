"""Drawing heatmaps: the raw thumbnail beside the score overlay, a scale bar, an honest colorbar, a top-k gallery.

The pure parts (what is coloured and on which range, the scale bar's length, the smoothing, the top-k choice)
are small functions of arrays; :func:`render_overlay` and :func:`render_gallery` only draw them
(matplotlib's object API, no pyplot state), and :func:`write_png` writes a figure atomically.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from mmpl.fsio import atomic_path

from .heatmap_geometry import normalize_scores

#: Models whose instance scores are attention weights (the others give per-instance class scores).
ATTENTION_MODELS = frozenset({"mmil", "abmil", "abmil-gated", "clam-sb", "transmil"})
_NORMALISED = {"rank": "rank-normalised 0-1", "minmax": "min-max normalised 0-1"}


# --------------------------------------------------------------------------- pure parts
def score_noun(model_name: str) -> str:
    """What a model's instance scores are: ``attention`` or ``instance score``."""
    return "attention" if model_name in ATTENTION_MODELS else "instance score"


def display_values(scores: np.ndarray, method: str, noun: str = "attention") -> tuple[np.ndarray, tuple[float, float], str]:
    """Values to colour, their colour range and the colorbar's label.

    ``rank`` / ``minmax``: :func:`~mmil.wsi.heatmap_geometry.normalize_scores` on the range ``(0, 1)``;
    ``none``: the raw scores on ``(min s, max s)`` (``min s +- 0.5`` when all are equal), so the colours
    span what the scores really are instead of a fixed 0-1 that leaves small attention weights all dark.
    """
    s = np.asarray(scores, dtype=np.float64)
    if method in _NORMALISED:
        return normalize_scores(s, method), (0.0, 1.0), f"{noun}, {_NORMALISED[method]}"
    if method != "none":
        raise ValueError(f"unknown score normalisation {method!r}")
    lo, hi = (float(s.min()), float(s.max())) if s.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return s, (lo, hi), f"{noun} (raw)"


def nice_length(target: float) -> float:
    """The largest ``m * 10**k`` with ``m`` in (1, 2, 5) that is not above ``target`` (> 0)."""
    if not (target > 0) or not math.isfinite(target):
        raise ValueError(f"scale bar target must be a positive length, got {target}")
    power = 10.0 ** math.floor(math.log10(target))
    best = power
    for m in (1, 2, 5):
        if m * power <= target * (1 + 1e-12):
            best = m * power
    return best


def scale_bar(mpp: float | None, downsample: float, image_width: int, fraction: float = 0.2) -> tuple[float, float] | None:
    """``(micrometres, pixels)`` of a scale bar about ``fraction`` of an image ``image_width`` pixels wide.

    One image pixel covers ``mpp * downsample`` micrometres (``mpp``: level-0 micrometres per pixel;
    ``downsample``: level-0 pixels per image pixel), so ``um = nice_length(fraction * W * mpp * downsample)``
    and ``pixels = um / (mpp * downsample)``. ``None`` when the slide's resolution is unknown.
    """
    if mpp is None or not (mpp > 0) or not (downsample > 0):
        return None
    um_per_px = float(mpp) * float(downsample)
    um = nice_length(fraction * image_width * um_per_px)
    return um, um / um_per_px


def length_text(um: float) -> str:
    """``"500 µm"``, ``"2 mm"``."""
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def smooth_grid(grid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a score grid whose NaN cells are outside the tissue; their mean is kept exactly.

    With ``m`` the mask of finite cells, ``x`` the grid (0 outside) and ``G`` the gaussian filter of width
    ``sigma`` cells (zero padding, a symmetric operator): ``out = x + G(x m) - x G(m)`` on ``m``, i.e.
    ``out_i = x_i (1 - sum_{j != i} g_ij m_j) + sum_{j != i} g_ij m_j x_j``: a convex combination of neighbours
    (a gaussian blur inside the tissue; the weight that would fall outside stays on the cell), and
    ``sum_i m_i out_i = sum_i m_i x_i`` because ``m^T G (x m) = (G m)^T (x m)``. ``sigma = 0`` returns the grid.
    """
    g = np.asarray(grid, dtype=np.float64)
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return g.copy()
    from scipy.ndimage import gaussian_filter  # noqa: PLC0415

    m = np.isfinite(g).astype(np.float64)
    x = np.where(m > 0, g, 0.0)
    out = x + gaussian_filter(x * m, sigma, mode="constant", cval=0.0) - x * gaussian_filter(m, sigma, mode="constant", cval=0.0)
    return np.where(m > 0, out, np.nan)


def tissue_pixels(thumb: np.ndarray, cap: int = 20) -> np.ndarray:
    """Where a thumbnail shows tissue: HSV saturation ``S = 255 (max - min) / max`` above ``min(otsu(S), cap)``.

    Glass is grey (``S`` of a few units) and stained tissue is coloured, so Otsu's threshold of ``S`` splits them
    (:func:`mmil.wsi.tissue.otsu_threshold`); the ``cap`` keeps pale tissue when the thumbnail is nearly all tissue.
    """
    from .tissue import otsu_threshold, rgb_saturation  # noqa: PLC0415

    sat = rgb_saturation(np.asarray(thumb)[..., :3])
    return sat > min(otsu_threshold(sat), cap)


def top_k_patches(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, highest first (equal scores: lower index first)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(s.size), -s))
    return order[: max(0, int(k))]


# --------------------------------------------------------------------------- drawing
def _figure(width_in: float, height_in: float, dpi: int):
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot: no global state, no GUI

    return Figure(figsize=(width_in, height_in), dpi=dpi)


def draw_scale_bar(ax, bar: tuple[float, float] | None, shape: tuple[int, int]) -> None:
    """A black bar with its length in micrometres at the bottom left of an image axes (``"scale unknown"`` without one)."""
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    h, w = shape
    x0, y1 = 0.04 * w, 0.95 * h
    box = {"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1.5}
    if bar is None:
        ax.text(x0, y1, "scale unknown", fontsize=7, va="bottom", ha="left", bbox=box)
        return
    um, px = bar
    height = max(2.0, 0.012 * h)
    ax.add_patch(Rectangle((x0, y1 - height), px, height, facecolor="black", edgecolor="white", linewidth=0.6, gid="scale-bar"))
    ax.text(x0 + px / 2, y1 - height - 0.01 * h, length_text(um), fontsize=7, va="bottom", ha="center", bbox=box)


def render_overlay(thumb: np.ndarray, canvas: np.ndarray, *, cmap: str, alpha: float, limits: tuple[float, float], label: str,
                   title: str, bar: tuple[float, float] | None, dpi: int = 100):
    """Figure: the raw thumbnail, beside it the thumbnail under the scores (NaN cells transparent: only scored
    tissue is tinted), a scale bar on both, and a colorbar on ``limits`` labelled ``label``."""
    from matplotlib.cm import ScalarMappable  # noqa: PLC0415
    from matplotlib.colors import Normalize  # noqa: PLC0415

    h, w = thumb.shape[:2]
    img_w, img_h = max(w, 160) / dpi, max(h, 160) / dpi
    gap, right, top = 0.1, 1.3, 0.4
    W, H = 2 * img_w + gap + right, img_h + top
    fig = _figure(W, H, dpi)
    raw = fig.add_axes([0.0, 0.0, img_w / W, img_h / H])
    over = fig.add_axes([(img_w + gap) / W, 0.0, img_w / W, img_h / H])
    raw.imshow(thumb, interpolation="nearest")
    over.imshow(thumb, interpolation="nearest")
    over.imshow(np.ma.masked_invalid(canvas), cmap=cmap, alpha=alpha, vmin=limits[0], vmax=limits[1], interpolation="nearest")
    for ax, name in ((raw, "slide"), (over, "scores")):
        ax.set_axis_off()
        ax.set_title(name, fontsize=8, pad=2)
        draw_scale_bar(ax, bar, (h, w))
    fig.suptitle(title, fontsize=9, x=(img_w + gap / 2) / W, y=1.0 - 0.05 * top / H, va="top")
    cax = fig.add_axes([(2 * img_w + gap + 0.12) / W, 0.1 * img_h / H, 0.15 / W, 0.8 * img_h / H])
    cax.set_gid("colorbar")
    # The colorbar shows the colours at full opacity (the overlay's alpha would wash it out).
    fig.colorbar(ScalarMappable(norm=Normalize(*limits), cmap=cmap), cax=cax, label=label)
    return fig


def render_gallery(crops: Sequence[np.ndarray], scores: Sequence[float], coords: Sequence[Sequence[int]], *, title: str,
                   noun: str = "score", columns: int = 4, dpi: int = 100):
    """Figure: the crops of the top-scoring patches in rank order, each titled with its rank, score and level-0 corner."""
    n = len(crops)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    fig = _figure(2.0 * cols, 2.25 * rows + 0.35, dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i < n:
            ax.imshow(crops[i], interpolation="nearest")
            ax.set_title(f"#{i + 1}  {noun} {scores[i]:.3g}\n({int(coords[i][0])}, {int(coords[i][1])})", fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def write_png(fig, path: Path, dpi: int) -> None:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
