"""Patch grids on tissue, written in CLAM's coordinate-file layout.

Per slide ``<out>/patches/<slide_id>.h5`` holds dataset ``coords`` (N, 2) int64:
level-0 (x, y) of each patch's top-left corner, row-major order. Its attributes
(stored on the dataset, as CLAM does, and the key ones mirrored on the file):

* ``patch_size``: pixels read at ``patch_level`` (CLAM's meaning; TRIDENT calls the
  resized size ``patch_size``, ours is ``target_patch_size``);
* ``patch_level``, ``downsample`` (level downsample along x, y), ``level_dim`` and
  ``downsampled_level_dim`` (size of ``patch_level``), ``name`` (slide id);
* ``target_patch_size`` (pixels after resizing to the target magnification),
  ``patch_size_level0`` (level-0 pixels per patch side), ``step_level0``,
  ``target_magnification``, ``level0_magnification``, ``mpp`` (level 0), ``overlap``.

Beside it ``<out>/thumbnails/<slide_id>.png`` (kept tissue regions outlined in green,
regions dropped by the area threshold in orange, kept patches in blue, with a legend)
and, for the run, ``<out>/summary.csv`` and ``<out>/tiling_config.json``.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
from mmpl.cliargs import Range, fraction, open_fraction, positive_float
from mmpl.config import check_fields, option
from mmpl.fsio import atomic_path
from mmpl.jsonio import write_json, write_text
from mmpl.progress import progress_bar
from scipy import ndimage

from ..errors import MMILInputError
from .slide import (
    PatchGeometry,
    describe_slide_error,
    dataclass_to_dict,
    level0_magnification,
    open_slide,
    patch_geometry,
    per_slide_errors,
    read_downsampled,
    remove_temp_files,
)
from .tissue import TissueMask, TissueParams, mask_outline, segment_slide

SUMMARY_COLUMNS = ("slide", "path", "n_patches", "seconds", "status", "error")


@dataclass
class TilingConfig:
    """Options of ``mmil tile`` (tissue options under ``tissue``)."""

    target_magnification: float = option(20.0, flag="--target-mag", help="magnification of the patches (20x = 0.5 um/px)",
                                         type=positive_float, metavar="MAG")
    patch_size: int = option(256, help="patch side in pixels at the target magnification", type=Range(int, 8), metavar="PX")
    overlap: float = option(0.0, help="fraction of a patch shared with its grid neighbour", type=open_fraction, metavar="FRACTION")
    # CLAM's four_pt check keeps roughly the patches with a quarter or more tissue near their centre.
    min_tissue_fraction: float = option(0.25, help="keep patches with at least this fraction of tissue", type=fraction, metavar="FRACTION")
    base_magnification: float | None = option(None, help="level-0 magnification for slides that record neither microns per pixel nor objective power",
                                              type=positive_float, metavar="MAG")
    thumbnail_size: int = option(1024, help="longest side of the thumbnail PNG in pixels", type=Range(int, 16), metavar="PX")
    overwrite: bool = option(False, help="re-tile slides whose coordinate file exists (otherwise they are kept)")
    tissue: TissueParams = field(default_factory=TissueParams)

    def validate(self) -> None:
        """Check types and ranges (those of the fields), naming the key and its option."""
        check_fields(self, error=MMILInputError)
        if not isinstance(self.tissue, TissueParams):
            raise MMILInputError(f"tissue must be a mapping of tissue options, got {self.tissue!r}")
        self.tissue.validate("tissue.")


@dataclass
class TileResult:
    """Outcome for one slide (one row of ``summary.csv``)."""

    slide: str
    path: str
    n_patches: int
    seconds: float
    status: str  # "ok", "exists" (kept from an earlier run), "empty" (no tissue patch), "failed"
    error: str = ""
    h5_path: Path | None = None


def grid_coords(width0: int, height0: int, size0: int, step0: int) -> np.ndarray:
    """All patch top-left corners of a regular grid fully inside a level-0 image, row-major.

    ``x = 0, step0, ...`` while ``x + size0 <= width0`` (same for y). Shape (M, 2) int64.
    """
    xs = np.arange(0, width0 - size0 + 1, step0, dtype=np.int64)
    ys = np.arange(0, height0 - size0 + 1, step0, dtype=np.int64)
    if xs.size == 0 or ys.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def tissue_patches(tissue: TissueMask, width0: int, height0: int, geometry: PatchGeometry, min_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid patches whose tissue fraction is ``>= min_fraction`` (and > 0).

    Returns ``(coords (N, 2) int64, fractions (N,))``.
    """
    grid = grid_coords(width0, height0, geometry.patch_size_level0, geometry.step_level0)
    if grid.shape[0] == 0:
        return grid, np.zeros(0)
    frac = tissue.tissue_fraction(grid[:, 0], grid[:, 1], geometry.patch_size_level0)
    keep = (frac >= min_fraction) & (frac > 0)
    return grid[keep], frac[keep]


def coords_attributes(slide_id: str, geometry: PatchGeometry, level_dims: Sequence[tuple[int, int]], mpp: float) -> dict:
    """Attributes of the ``coords`` dataset (see the module docstring)."""
    w0, h0 = level_dims[0]
    lw, lh = level_dims[geometry.patch_level]
    return {
        "patch_size": np.int64(geometry.read_size),
        "patch_level": np.int64(geometry.patch_level),
        "downsample": np.array([w0 / lw, h0 / lh], dtype=np.float64),
        "downsampled_level_dim": np.array([lw, lh], dtype=np.int64),
        "level_dim": np.array([lw, lh], dtype=np.int64),
        "name": slide_id,
        "target_patch_size": np.int64(geometry.target_patch_size),
        "patch_size_level0": np.int64(geometry.patch_size_level0),
        "step_level0": np.int64(geometry.step_level0),
        "target_magnification": np.float64(geometry.target_magnification),
        "level0_magnification": np.float64(geometry.level0_magnification),
        "mpp": np.float64(mpp),
        "overlap": np.float64(1.0 - geometry.step_level0 / geometry.patch_size_level0),
    }


# Attributes mirrored on the file for readers (TRIDENT-like) that look there.
FILE_ATTRIBUTES = ("patch_size", "patch_level", "target_patch_size", "patch_size_level0", "target_magnification", "level0_magnification", "name")


def write_coords_h5(path: Path, coords: np.ndarray, attrs: dict) -> None:
    """Write the coordinate file atomically (a crash leaves no partial file)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
            for k, v in attrs.items():
                ds.attrs[k] = v
            for k in FILE_ATTRIBUTES:
                f.attrs[k] = attrs[k]


KEPT_COLOUR, DROPPED_COLOUR, PATCH_COLOUR = (0, 160, 0), (255, 140, 0), (30, 60, 220)


def _thumb_outline(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Two-pixel outline of ``mask`` resized (nearest) to the thumbnail ``size`` (w, h)."""
    from PIL import Image  # noqa: PLC0415

    # Drawn at thumbnail resolution so its width does not depend on the mask's scale.
    m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    return ndimage.binary_dilation(mask_outline(m))  # two pixels wide: visible on tissue


def _draw_legend(img) -> None:
    """A small white box in the top-left corner naming the three colours."""
    from PIL import ImageDraw  # noqa: PLC0415

    draw = ImageDraw.Draw(img)
    entries = (("kept tissue", KEPT_COLOUR), ("dropped region (area)", DROPPED_COLOUR), ("patch", PATCH_COLOUR))
    line = 12
    width = min(img.size[0], 150)
    draw.rectangle([0, 0, width - 1, line * len(entries) + 3], fill=(255, 255, 255), outline=(90, 90, 90))
    for i, (text, colour) in enumerate(entries):
        y = 2 + i * line
        draw.rectangle([3, y + 2, 11, y + 9], outline=colour, width=2)
        draw.text((15, y), text, fill=(0, 0, 0))


def draw_thumbnail(rgb: np.ndarray, scale: tuple[float, float], tissue: TissueMask, coords: np.ndarray, size0: int):
    """Thumbnail with outlines of kept tissue (green) and dropped regions (orange), each kept patch (blue square) and a legend.

    ``scale`` is level-0 pixels per thumbnail pixel along x and y. Returns a PIL image.
    """
    from PIL import Image, ImageDraw  # noqa: PLC0415

    img = Image.fromarray(rgb).convert("RGB")
    outlines = [(tissue.mask, KEPT_COLOUR)]
    if tissue.dropped is not None and tissue.dropped.any():
        outlines.append((tissue.dropped, DROPPED_COLOUR))
    for mask, colour in outlines:
        img.paste(Image.new("RGB", img.size, colour), mask=Image.fromarray(_thumb_outline(mask, img.size).astype(np.uint8) * 255))
    draw = ImageDraw.Draw(img)
    sx, sy = scale
    for x, y in np.asarray(coords):
        draw.rectangle([x / sx, y / sy, (x + size0) / sx - 1, (y + size0) / sy - 1], outline=PATCH_COLOUR)
    if min(img.size) >= 64:
        _draw_legend(img)
    return img


def tile_slide(path: str | Path, slide_id: str, out_dir: str | Path, cfg: TilingConfig) -> TileResult:
    """Segment, grid and write one slide. Raises :class:`MMILInputError` on an unreadable slide."""
    cfg.validate()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    h5_path = out_dir / "patches" / f"{slide_id}.h5"
    slide = open_slide(path)
    try:
        props = dict(slide.properties)
        try:
            mag0 = level0_magnification(props, cfg.base_magnification)
        except ValueError as err:
            raise MMILInputError(f"{path}: {err}") from None
        mpp = 10.0 / mag0
        geometry = patch_geometry(slide.level_downsamples, mag0, cfg.target_magnification, cfg.patch_size, cfg.overlap)
        tissue = segment_slide(slide, cfg.tissue, mpp)
        w0, h0 = slide.level_dimensions[0]
        coords, _ = tissue_patches(tissue, w0, h0, geometry, cfg.min_tissue_fraction)
        thumb_ds = max(w0, h0) / max(1, cfg.thumbnail_size)
        rgb, tscale = read_downsampled(slide, max(thumb_ds, 1.0))
        thumb = draw_thumbnail(rgb, tscale, tissue, coords, geometry.patch_size_level0)
        buf = io.BytesIO()
        thumb.save(buf, format="PNG", compress_level=1)  # fast; thumbnails are for eyes
        with atomic_path(out_dir / "thumbnails" / f"{slide_id}.png") as tmp:
            tmp.write_bytes(buf.getvalue())
        if coords.shape[0] == 0:
            h5_path.unlink(missing_ok=True)  # a stale file from an earlier run would say otherwise
            return TileResult(slide_id, str(path), 0, time.perf_counter() - t0, "empty", "no patch passes the tissue threshold; check the thumbnail (orange: regions dropped by the area threshold) or lower --min-tissue-area-rel/--min-tissue-area/--min-tissue-fraction")
        attrs = coords_attributes(slide_id, geometry, slide.level_dimensions, mpp)
        write_coords_h5(h5_path, coords, attrs)
    finally:
        slide.close()
    return TileResult(slide_id, str(path), int(coords.shape[0]), time.perf_counter() - t0, "ok", "", h5_path)


def _existing_count(h5_path: Path) -> int | None:
    """Patch count of an earlier, complete coordinate file, or ``None`` if it is unreadable."""
    try:
        with h5py.File(h5_path, "r") as f:
            return int(f["coords"].shape[0])
    except (OSError, KeyError):
        return None


def tile_slides(slides: Sequence[tuple[str, Path]], out_dir: str | Path, cfg: TilingConfig, progress: bool = True) -> list[TileResult]:
    """Tile every slide; failures are recorded and the run continues.

    Slides whose coordinate file already exists are kept unless ``cfg.overwrite``.
    Writes ``summary.csv`` (columns :data:`SUMMARY_COLUMNS`) and ``tiling_config.json``.
    """
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / "patches", out_dir / "thumbnails"):
        remove_temp_files(folder)  # left by a killed run
    write_json(out_dir / "tiling_config.json", dataclass_to_dict(cfg))
    results: list[TileResult] = []
    bar = progress_bar(progress, len(slides), "tile")
    for slide_id, path in slides:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(slide_id)
        h5_path = out_dir / "patches" / f"{slide_id}.h5"
        if h5_path.is_file() and not cfg.overwrite:
            n = _existing_count(h5_path)
            if n is not None:
                results.append(TileResult(slide_id, str(path), n, 0.0, "exists", "", h5_path))
                continue
        t0 = time.perf_counter()
        try:
            results.append(tile_slide(path, slide_id, out_dir, cfg))
        except per_slide_errors() as err:
            results.append(TileResult(slide_id, str(path), 0, time.perf_counter() - t0, "failed", describe_slide_error(err, path)))
    if bar is not None:
        bar.close()
    write_summary(out_dir / "summary.csv", results)
    return results


def write_summary(path: Path, results: Sequence[TileResult]) -> None:
    """Write the per-slide summary CSV atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for r in results:
        writer.writerow([r.slide, r.path, r.n_patches, f"{r.seconds:.3f}", r.status, r.error])
    write_text(path, buf.getvalue())


def find_coords_dir(path: str | Path) -> Path:
    """The folder holding ``<slide_id>.h5`` coordinate files: ``path`` or its ``patches/`` sub-folder (CLAM layout)."""
    path = Path(path)
    if not path.is_dir():
        raise MMILInputError(f"{path}: coordinate folder not found; pass the --out folder of `mmil tile` (or CLAM's patches folder)")
    if not any(path.glob("*.h5")) and (path / "patches").is_dir():
        return path / "patches"
    return path
