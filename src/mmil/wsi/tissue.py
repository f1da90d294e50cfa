"""Tissue segmentation on a low-resolution image of the slide.

The recipe follows CLAM's (saturation channel, median blur, threshold, closing,
connected regions filtered by area, large holes kept out), written with numpy and
scipy.ndimage only:

1. ``S`` = HSV saturation of the RGB image, ``(max - min) / max`` scaled to 0..255.
2. Median filter of size ``median_size`` (CLAM ``mthresh`` = 7).
3. Threshold: Otsu's (default), never below ``sthresh`` so a blank slide gives no
   tissue; or the fixed ``sthresh`` (CLAM default 8) with ``use_otsu=False``.
4. Morphological closing with a ``close_size`` square (CLAM ``close`` = 4).
5. Connected regions (8-connected, like contours). For each region its holes
   (background enclosed by it) larger than the hole threshold stay excluded, at most
   ``max_holes`` of them, the largest first; smaller holes count as tissue. A region
   is kept when its area minus its excluded holes exceeds the region threshold.

The thresholds are relative to the specimen, with absolute floors (``A_max`` = tissue
area of the largest connected region):

* region threshold ``t_region = max(min_tissue_area, min_tissue_area_rel * A_max)``;
* hole threshold ``t_hole = max(min_hole_area, min_hole_area_rel * A_max)``.

Areas are in *reference patches*: squares of ``ref_patch_um`` = 128 um per side
(0.016384 mm^2), i.e. CLAM's 512-px reference patch at 40x (0.25 um/px) and one 256-px
patch at 20x. The defaults (floor 1 reference patch, 1% of the largest region; holes:
floor 0.1, 0.2%) keep a needle biopsy or a 0.5 mm^2 specimen, drop dust, and on a
200 mm^2 resection give thresholds near CLAM's. CLAM's absolute rule is
``min_tissue_area=100, min_hole_area=16`` (about 1.6 mm^2 and 0.26 mm^2) with both
``*_rel = 0``: the same physical areas whatever the scanner's resolution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mmpl.cliargs import Range, fraction, non_negative_float, non_negative_int, positive_float, positive_int
from mmpl.config import check_fields, option
from scipy import ndimage

from ..errors import MMILInputError

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass
class TissueParams:
    """Tissue segmentation options (CLAM's recipe, area thresholds relative to the specimen; areas in 128-um reference patches); the flags of ``mmil tile``."""

    seg_downsample: float = option(32.0, help="segment on the best level at or below this downsample (coarser if the image would exceed max_seg_pixels)",
                                   type=Range(float, 1), metavar="D")
    max_seg_pixels: int = option(16_000_000, help="most pixels of the segmentation image", type=positive_int, cli=False)
    use_otsu: bool = option(True, flag="--otsu", help="Otsu's saturation threshold (--no-otsu: the fixed threshold --sthresh)")
    sthresh: int = option(8, help="saturation threshold 0..255 without Otsu, and the floor of Otsu's threshold", type=Range(int, 0, 255), metavar="S")
    median_size: int = option(7, help="median filter size in segmentation pixels", type=positive_int, metavar="N")
    close_size: int = option(4, help="morphological closing square size in segmentation pixels", type=non_negative_int, metavar="N")
    min_tissue_area: float = option(1.0, help="absolute floor of the region threshold, in 128-um reference patches (1: 0.016 mm^2, one 256-px patch at 20x; "
                                    "CLAM: 100, about 1.6 mm^2, with --min-tissue-area-rel 0)", type=non_negative_float, metavar="AREA")
    min_tissue_area_rel: float = option(0.01, help="drop regions smaller than max(--min-tissue-area, this fraction of the largest region's tissue area)",
                                        type=fraction, metavar="FRACTION")
    min_hole_area: float = option(0.1, help="absolute floor of the hole threshold, in reference patches (CLAM: 16, about 0.26 mm^2, with --min-hole-area-rel 0)",
                                  type=non_negative_float, metavar="AREA")
    min_hole_area_rel: float = option(0.002, help="holes larger than max(--min-hole-area, this fraction of the largest region's tissue area) stay excluded",
                                      type=fraction, metavar="FRACTION")
    max_holes: int = option(8, help="at most this many holes (the largest) are excluded per region", type=non_negative_int, metavar="N")
    ref_patch_um: float = option(128.0, help="side of the reference patch areas are counted in (um)", type=positive_float, cli=False)

    def validate(self, prefix: str = "") -> None:
        """Check types and ranges (those of the fields), naming the key (after ``prefix``) and its option."""
        check_fields(self, prefix, MMILInputError)


@dataclass
class TissueMask:
    """A boolean tissue mask and its placement on level 0.

    ``mask[r, c]`` covers level-0 pixels ``[c*sx, (c+1)*sx) x [r*sy, (r+1)*sy)``.
    ``dropped`` (same grid) holds the regions the area threshold removed, for the thumbnail.
    """

    mask: np.ndarray
    scale: tuple[float, float]
    threshold: float
    dropped: np.ndarray | None = None

    def tissue_fraction(self, x0: np.ndarray, y0: np.ndarray, size0: float) -> np.ndarray:
        """Fraction of tissue in level-0 squares ``[x0, x0+size0) x [y0, y0+size0)`` (see :func:`box_fractions`)."""
        sx, sy = self.scale
        x0 = np.asarray(x0, dtype=np.float64)
        y0 = np.asarray(y0, dtype=np.float64)
        return box_fractions(self.mask, x0 / sx, y0 / sy, (x0 + size0) / sx, (y0 + size0) / sy)

    @property
    def area_level0(self) -> float:
        """Tissue area in level-0 pixels."""
        return float(self.mask.sum()) * self.scale[0] * self.scale[1]


def rgb_saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation as uint8: ``S = 255 * (max - min) / max`` per pixel, 0 where ``max = 0``."""
    rgb = np.asarray(rgb)
    mx = rgb.max(axis=-1).astype(np.float32)
    mn = rgb.min(axis=-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(mx > 0, 255.0 * (mx - mn) / mx, 0.0)
    return np.clip(np.rint(s), 0, 255).astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of 8-bit values: the ``t`` maximising the between-class variance.

    Classes are ``v <= t`` and ``v > t``; with ``w(t) = P(v <= t)``,
    ``m(t) = sum_{i<=t} i p_i`` and total mean ``m_T``:
    ``sigma_B^2(t) = (m_T w(t) - m(t))^2 / (w(t) (1 - w(t)))``.
    The first maximiser is returned; ``0`` for constant input.
    """
    v = np.asarray(values)
    if v.size == 0:
        raise ValueError("Otsu threshold of an empty array")
    if v.dtype != np.uint8:
        v = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    p = np.bincount(v.ravel(), minlength=256).astype(np.float64)
    p /= p.sum()
    w = np.cumsum(p)
    m = np.cumsum(p * np.arange(256))
    denom = w * (1.0 - w)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.where(denom > 1e-12, (m[-1] * w - m) ** 2 / denom, 0.0)
    return int(np.argmax(sigma))


def integral_image(mask: np.ndarray) -> np.ndarray:
    """Summed-area table ``F`` with ``F[j, i] = sum(mask[:j, :i])`` (one extra row and column of zeros)."""
    F = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    F[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)
    return F


def _integral_at(F: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact integral of the mask over ``[0, u) x [0, v)`` at real (u, v).

    The mask is constant on unit cells, so the integral is bilinear inside each cell
    and bilinear interpolation of the table ``F`` at (u, v) is exact.
    """
    h, w = F.shape[0] - 1, F.shape[1] - 1
    u = np.clip(u, 0.0, w)
    v = np.clip(v, 0.0, h)
    i = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    j = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    fu = u - i
    fv = v - j
    i1 = np.minimum(i + 1, w)
    j1 = np.minimum(j + 1, h)
    return (
        F[j, i] * (1 - fu) * (1 - fv)
        + F[j, i1] * fu * (1 - fv)
        + F[j1, i] * (1 - fu) * fv
        + F[j1, i1] * fu * fv
    )


def box_fractions(mask: np.ndarray, u0, v0, u1, v1) -> np.ndarray:
    """Exact fraction of ``mask`` inside boxes ``[u0, u1) x [v0, v1)`` in mask-pixel units.

    Parts of a box outside the mask count as background. Boxes of zero area give 0.
    """
    F = integral_image(np.asarray(mask, dtype=bool))
    u0, v0, u1, v1 = (np.asarray(a, dtype=np.float64) for a in (u0, v0, u1, v1))
    inside = _integral_at(F, u1, v1) - _integral_at(F, u0, v1) - _integral_at(F, u1, v0) + _integral_at(F, u0, v0)
    area = (u1 - u0) * (v1 - v0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area > 0, inside / area, 0.0)


def _closing(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary closing with a ``size`` x ``size`` square, padded so image borders do not erode."""
    if size <= 1:
        return mask
    pad = size
    padded = np.pad(mask, pad, mode="constant", constant_values=False)
    closed = ndimage.binary_closing(padded, structure=np.ones((size, size), dtype=bool))
    return closed[pad:-pad, pad:-pad]


def area_threshold(floor: float, rel: float, largest_area: float) -> float:
    """Threshold relative to the specimen with an absolute floor: ``t = max(floor, rel * A_max)``."""
    return max(float(floor), float(rel) * float(largest_area))


def select_regions(mask: np.ndarray, min_area: float, min_hole_area: float, max_holes: int,
                   min_area_rel: float = 0.0, min_hole_area_rel: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Split 8-connected regions into kept tissue and dropped regions; exclude large holes.

    With ``A_max`` = pixel count of the largest region, ``t_region = max(min_area,
    min_area_rel * A_max)`` and ``t_hole = max(min_hole_area, min_hole_area_rel * A_max)``:
    for a region R with holes H_1..H_m (enclosed background, largest first), the
    excluded holes are the first ``max_holes`` with ``area > t_hole``; R is kept when
    ``area(fill(R)) - sum(area(excluded)) > t_region`` and contributes ``fill(R)``
    minus its excluded holes, else its pixels go to ``dropped``. Areas in mask pixels.
    Returns ``(kept, dropped)`` boolean masks.
    """
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    kept = np.zeros(mask.shape, dtype=bool)
    dropped = np.zeros(mask.shape, dtype=bool)
    largest = float(np.bincount(labels.ravel())[1:].max()) if n else 0.0
    t_region = area_threshold(min_area, min_area_rel, largest)
    t_hole = area_threshold(min_hole_area, min_hole_area_rel, largest)
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        region = labels[box] == k
        filled = ndimage.binary_fill_holes(region)
        holes = filled & ~region
        keep = filled.copy()
        if holes.any() and max_holes > 0:
            hole_labels, n_holes = ndimage.label(holes)
            areas = np.bincount(hole_labels.ravel(), minlength=n_holes + 1)[1:]
            order = np.argsort(-areas, kind="stable")
            big = [h + 1 for h in order if areas[h] > t_hole][:max_holes]
            if big:
                keep &= ~np.isin(hole_labels, big)
        if keep.sum() > t_region:
            kept[box] |= keep
        else:
            dropped[box] |= region
    return kept, dropped


def filter_regions(mask: np.ndarray, min_area: float, min_hole_area: float, max_holes: int) -> np.ndarray:
    """The kept mask of :func:`select_regions` with absolute thresholds only (CLAM's rule)."""
    return select_regions(mask, min_area, min_hole_area, max_holes)[0]


def segment_tissue_image(rgb: np.ndarray, params: TissueParams, pixel_area_um2: float) -> tuple[np.ndarray, float, np.ndarray]:
    """Tissue mask of an RGB image whose pixels each cover ``pixel_area_um2`` square microns.

    Returns ``(mask, threshold, dropped)``, ``dropped`` being the regions below the area
    threshold; see the module docstring for the steps.
    """
    params.validate()
    sat = rgb_saturation(rgb)
    if params.median_size > 1:
        sat = ndimage.median_filter(sat, size=params.median_size, mode="nearest")
    threshold = float(max(otsu_threshold(sat), params.sthresh)) if params.use_otsu else float(params.sthresh)
    mask = sat > threshold
    mask = _closing(mask, params.close_size)
    ref_area_px = params.ref_patch_um**2 / pixel_area_um2
    kept, dropped = select_regions(mask, params.min_tissue_area * ref_area_px, params.min_hole_area * ref_area_px, params.max_holes,
                                   params.min_tissue_area_rel, params.min_hole_area_rel)
    return kept, threshold, dropped


def segment_slide(slide, params: TissueParams, mpp: float) -> TissueMask:
    """Segment an open slide: read it at about ``seg_downsample`` and run :func:`segment_tissue_image`.

    ``mpp`` is the level-0 microns per pixel (used for the area thresholds).
    """
    from .slide import choose_level, read_downsampled, read_rgb  # noqa: PLC0415 - avoid import cycle at module load

    params.validate()
    w0, h0 = slide.level_dimensions[0]
    level = choose_level(slide.level_downsamples, params.seg_downsample)
    lw, lh = slide.level_dimensions[level]
    if lw * lh <= params.max_seg_pixels:
        rgb = read_rgb(slide, (0, 0), level, (lw, lh))
        scale = (w0 / lw, h0 / lh)
    else:
        ds = float(np.sqrt(w0 * h0 / params.max_seg_pixels))
        rgb, scale = read_downsampled(slide, max(ds, params.seg_downsample))
    mask, thr, dropped = segment_tissue_image(rgb, params, pixel_area_um2=mpp * mpp * scale[0] * scale[1])
    return TissueMask(mask, (float(scale[0]), float(scale[1])), thr, dropped)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a mask: tissue pixels with a background 4-neighbour (or on the image edge)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    eroded = ndimage.binary_erosion(padded)[1:-1, 1:-1]
    return mask & ~eroded
