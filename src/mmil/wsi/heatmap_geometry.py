"""Pure geometry of heatmaps: patch squares, score normalisation, QuPath GeoJSON, the score canvas.

Arrays in, arrays (or plain dicts) out; drawing is :mod:`mmil.wsi.heatmap_render`, the command :mod:`mmil.wsi.heatmap`.
"""
from __future__ import annotations

import uuid
from typing import Any

import numpy as np

NORMALIZATIONS = ("rank", "minmax", "none")
_GEOJSON_NAMESPACE = uuid.UUID("5d1f3c52-8f0e-4a55-9a7e-6f1f1d8b2c10")


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


def score_colour(value: float, cmap: str = "viridis") -> list[int]:
    """RGB colour (0..255) for a normalised score from the matplotlib colormap ``cmap`` (QuPath shows it)."""
    import matplotlib  # noqa: PLC0415

    r, g, b, _ = matplotlib.colormaps[cmap](float(np.clip(value, 0.0, 1.0)))
    return [int(round(255 * r)), int(round(255 * g)), int(round(255 * b))]


def score_bin(value: float, bins: int = 10) -> int:
    """Index ``k`` of the bin ``[k/bins, (k+1)/bins)`` holding a normalised score (1.0 goes in the last)."""
    return int(min(bins - 1, max(0, int(np.floor(float(value) * bins)))))


def scores_to_geojson(coords: np.ndarray, scores: np.ndarray, size0: float, *, slide_id: str, normalize: str = "rank", bins: int = 10,
                      cmap: str = "viridis") -> dict[str, Any]:
    """GeoJSON FeatureCollection of scored patch squares (level-0 pixels), QuPath-importable.

    Feature ``i`` has ``geometry = Polygon([patch_squares(coords)[i]])``, the raw score in
    ``properties.score`` and ``properties.measurements.score``, its percentile in
    ``measurements.score_rank``, and a classification ``"heatmap a-b"`` naming the bin of
    its normalised score (for ``normalize="none"``: its place in the raw min-max range), coloured with ``cmap``,
    so QuPath shows the heatmap on import.
    """
    squares = patch_squares(coords, size0)
    scores = np.asarray(scores, dtype=np.float64)
    ranked = normalize_scores(scores, "rank")
    shown = normalize_scores(scores, "minmax" if normalize == "none" else normalize)
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
                    "classification": {"name": f"heatmap {k / bins:.1f}-{(k + 1) / bins:.1f}", "color": score_colour((k + 0.5) / bins, cmap)},
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
