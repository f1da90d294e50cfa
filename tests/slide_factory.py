"""Synthetic whole-slide images for the wsi tests: pyramidal tiled TIFFs OpenSlide reads.

A slide is white background (slightly noisy, like glass) with round "tissue" blobs.
Blobs are placed in micrometres, so the same layout can be rendered at 20x
(0.5 um/px) and 40x (0.25 um/px). Two kinds of blob:

* ``normal``: pink, smooth, sparse dark dots;
* ``tumor``: dark purple with a dense periodic "nuclei" texture.

Levels are written largest first as separate tiled pages, reduced ones with
``subfiletype=1``; the resolution tag (pixels per centimetre) gives OpenSlide
``openslide.mpp-x``. No SubIFDs (OpenSlide would not see those levels).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile

BACKGROUND = (242, 241, 244)
NORMAL_RGB = (226, 152, 190)
TUMOR_RGB = (96, 52, 140)


@dataclass(frozen=True)
class Blob:
    """A disc of tissue: centre and radius in micrometres."""

    cx_um: float
    cy_um: float
    r_um: float
    kind: str = "normal"  # "normal" or "tumor"


@dataclass
class SyntheticSlide:
    path: Path
    mpp: float
    width: int
    height: int
    blobs: list[Blob] = field(default_factory=list)
    downsamples: tuple[int, ...] = (1, 2, 4, 8)

    def blob_mask(self, x0: np.ndarray, y0: np.ndarray, kinds: Sequence[str] = ("normal", "tumor")) -> np.ndarray:
        """Whether level-0 points (x0, y0) fall inside a blob of one of ``kinds``."""
        x_um = np.asarray(x0, dtype=np.float64) * self.mpp
        y_um = np.asarray(y0, dtype=np.float64) * self.mpp
        inside = np.zeros(np.broadcast(x_um, y_um).shape, dtype=bool)
        for b in self.blobs:
            if b.kind in kinds:
                inside |= (x_um - b.cx_um) ** 2 + (y_um - b.cy_um) ** 2 <= b.r_um**2
        return inside

    def tissue_area_level0(self) -> float:
        """Exact blob area in level-0 pixels (blobs assumed disjoint and inside the slide)."""
        return float(sum(np.pi * (b.r_um / self.mpp) ** 2 for b in self.blobs))


def render(width: int, height: int, mpp: float, blobs: Sequence[Blob], seed: int = 0) -> np.ndarray:
    """Level-0 RGB image (H, W, 3) uint8 of the blobs on a glass-like background."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = BACKGROUND
    # Glass noise: one 256 x 256 noise tile repeated (cheap for large slides).
    noise = 1.5 * rng.standard_normal(size=(256, 256, 3), dtype=np.float32)
    img += np.tile(noise, (height // 256 + 1, width // 256 + 1, 1))[:height, :width]
    for b in blobs:
        # Work inside the blob's bounding box only.
        x_lo, x_hi = max(0, int((b.cx_um - b.r_um) / mpp)), min(width, int((b.cx_um + b.r_um) / mpp) + 2)
        y_lo, y_hi = max(0, int((b.cy_um - b.r_um) / mpp)), min(height, int((b.cy_um + b.r_um) / mpp) + 2)
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        ys, xs = np.mgrid[y_lo:y_hi, x_lo:x_hi].astype(np.float32)
        x_um = (xs + 0.5) * mpp
        y_um = (ys + 0.5) * mpp
        inside = (x_um - b.cx_um) ** 2 + (y_um - b.cy_um) ** 2 <= b.r_um**2
        if b.kind == "tumor":
            # Dense "nuclei": a lattice of dark dots every 12 um, in micrometre space.
            dots = (np.sin(2 * np.pi * x_um / 12.0) * np.sin(2 * np.pi * y_um / 12.0)) > 0.5
            colour = np.where(dots[..., None], np.array([45, 20, 80], np.float32), np.array(TUMOR_RGB, np.float32))
        else:
            # Smooth stroma-like shading with sparse dots every 40 um.
            shade = 10.0 * np.sin(2 * np.pi * x_um / 90.0) * np.cos(2 * np.pi * y_um / 70.0)
            dots = (np.sin(2 * np.pi * x_um / 40.0) * np.sin(2 * np.pi * y_um / 40.0)) > 0.93
            base = np.array(NORMAL_RGB, np.float32) + shade[..., None]
            colour = np.where(dots[..., None], np.array([120, 60, 120], np.float32), base)
        box = img[y_lo:y_hi, x_lo:x_hi]
        box[inside] = colour[inside] + 4.0 * rng.standard_normal(size=(int(inside.sum()), 3), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def downsample_box(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` x ``factor`` blocks (edges cropped to a multiple of ``factor``)."""
    if factor == 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    blocks = img[: h * factor, : w * factor].reshape(h, factor, w, factor, 3)
    return ((blocks.sum(axis=(1, 3), dtype=np.uint32) + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def write_pyramid(path: str | Path, level0: np.ndarray, mpp: float | None, downsamples: Sequence[int] = (1, 2, 4, 8), tile: int = 256, compression: str | None = None) -> Path:
    """Write a tiled pyramidal TIFF (generic-tiff for OpenSlide). ``mpp=None`` writes no resolution tag.

    Each level is the box mean of level 0 (downsamples must be increasing integers).
    """
    path = Path(path)
    with tifffile.TiffWriter(path) as tw:
        level, prev = level0, 1
        for i, d in enumerate(downsamples):
            if int(d) % prev:
                raise ValueError(f"downsamples must divide each other, got {downsamples}")
            level, prev = downsample_box(level, int(d) // prev), int(d)
            kw = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * d)
                kw = {"resolution": (ppcm, ppcm), "resolutionunit": "CENTIMETER"}
            tw.write(
                np.ascontiguousarray(level),
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,  # None by default: fast to write, test slides are small
                subfiletype=1 if i else 0,
                metadata=None,
                **kw,
            )
    return path


def corrupt_first_tile(path: str | Path) -> None:
    """Overwrite the first level-0 tile's compressed bytes: the slide opens, but reading there fails.

    Needs a slide written with ``compression="zlib"`` (raw tiles would just decode as noise).
    """
    path = Path(path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        if page.compression == 1:
            raise ValueError(f"{path}: tiles are not compressed; write it with compression='zlib'")
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))


def make_slide(
    path: str | Path,
    blobs: Sequence[Blob],
    size_um: tuple[float, float] = (1024.0, 1024.0),
    mpp: float = 0.5,
    downsamples: Sequence[int] = (1, 2, 4, 8),
    seed: int = 0,
    write_mpp: bool = True,
    compression: str | None = None,
) -> SyntheticSlide:
    """Render and write one slide; ``size_um`` is its physical width and height."""
    width = int(round(size_um[0] / mpp))
    height = int(round(size_um[1] / mpp))
    img = render(width, height, mpp, blobs, seed)
    write_pyramid(path, img, mpp if write_mpp else None, downsamples, compression=compression)
    return SyntheticSlide(Path(path), mpp, width, height, list(blobs), tuple(int(d) for d in downsamples))


def tumour_slide_set(slide_dir: str | Path, n: int = 8) -> tuple[dict[str, SyntheticSlide], dict[str, str]]:
    """``n`` small 20x slides: every slide has a normal blob; odd slides' second blob is tumour.

    The tumour blob sits in different places so position alone cannot give it away.
    Returns ``(specs, labels)`` keyed by slide id (``labels``: "tumor" / "normal").
    Used by the end-to-end test and by ``scripts/make_wsi_example.py``.
    """
    slide_dir = Path(slide_dir)
    rng = np.random.default_rng(0)
    specs, labels = {}, {}
    for i in range(n):
        positive = i % 2 == 1
        corner = (370.0, 360.0) if i % 4 < 2 else (360.0, 140.0)
        other = (140.0, 150.0) if i % 4 < 2 else (140.0, 370.0)
        blobs = [
            Blob(other[0] + rng.uniform(-15, 15), other[1] + rng.uniform(-15, 15), 85, "normal"),
            Blob(corner[0], corner[1], 80, "tumor" if positive else "normal"),
        ]
        sid = f"slide{i}"
        specs[sid] = make_slide(slide_dir / f"{sid}.tif", blobs, size_um=(512, 512), mpp=0.5, downsamples=(1, 2, 4, 8), seed=i)
        labels[sid] = "tumor" if positive else "normal"
    return specs, labels
