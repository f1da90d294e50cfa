"""Slide access through OpenSlide: opening, microns per pixel, magnification, level choice.

OpenSlide is an optional dependency (``pip install 'mmil-prunelimit[wsi]'``); it is
imported on first use so that the rest of :mod:`mmil` works without it.

Magnification convention (the one CLAM, TRIDENT and most scanners use):
``magnification = 10 / mpp``, i.e. 40x = 0.25 um/px, 20x = 0.5 um/px.
"""
from __future__ import annotations

import csv
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import MMILInputError

# File name endings OpenSlide can open (its documented formats); used to list a slide directory.
SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
    ".bif", ".dcm", ".czi",
)

# Levels whose downsample is within this relative tolerance of a wanted one count as equal:
# scanners store e.g. 4.000123 for a nominal 4x level.
DOWNSAMPLE_TOLERANCE = 0.01

_OPENSLIDE_HINT = "install the slide reader with `pip install 'mmil-prunelimit[wsi]'` (openslide-python and openslide-bin)"


def import_openslide():
    """Import :mod:`openslide`, or raise :class:`MMILInputError` saying how to install it."""
    try:
        import openslide  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MMILInputError(f"OpenSlide is not available ({err}); {_OPENSLIDE_HINT}") from None
    return openslide


def open_slide(path: str | Path):
    """Open a whole-slide image with OpenSlide.

    Raises :class:`MMILInputError` naming the file when it is missing, not a slide
    format OpenSlide knows, or corrupt.
    """
    openslide = import_openslide()
    path = Path(path)
    if not path.is_file():
        raise MMILInputError(f"{path}: slide file not found; check the path or the --slides directory/CSV")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise MMILInputError(f"{path}: not a slide format OpenSlide can read (or the file is corrupt); convert it to a pyramidal TIFF or remove it") from None
    except openslide.OpenSlideError as err:
        raise MMILInputError(f"{path}: OpenSlide cannot read this slide ({err}); the file is probably corrupt or truncated, re-copy it") from None


def per_slide_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that fail one slide but not a whole run: bad input, I/O, and OpenSlide's
    own errors (a corrupt tile can surface only when a region is read)."""
    errors: tuple[type[BaseException], ...] = (MMILInputError, OSError, ValueError)
    try:
        import openslide  # noqa: PLC0415

        errors += (openslide.OpenSlideError,)
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return errors


def describe_slide_error(err: BaseException, path: str | Path) -> str:
    """One line for a summary CSV: our own errors already name their file; others get the slide's path."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, MMILInputError):
        return text
    return f"{path}: {type(err).__name__}: {text}"


def slide_id_from_path(path: str | Path) -> str:
    """The slide identifier used for every output file: the file name without its suffix."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


_RESOLUTION_UNIT_UM = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}


def mpp_from_properties(props: Mapping[str, str]) -> float | None:
    """Microns per pixel at level 0 from OpenSlide properties, or ``None`` if unknown.

    Uses ``openslide.mpp-x`` (and ``-y``, averaged); otherwise the TIFF resolution tags:
    ``mpp = microns_per_unit / tiff.XResolution`` where the unit comes from
    ``tiff.ResolutionUnit`` (centimetre = 1e4 um, inch = 25400 um).
    """
    values = []
    for axis in ("x", "y"):
        raw = props.get(f"openslide.mpp-{axis}")
        if raw is not None:
            try:
                v = float(raw)
            except ValueError:
                continue
            if math.isfinite(v) and v > 0:
                values.append(v)
    if values:
        return float(np.mean(values))
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    if unit in _RESOLUTION_UNIT_UM:
        try:
            res = float(props.get("tiff.XResolution", "nan"))
        except ValueError:
            res = float("nan")
        if math.isfinite(res) and res > 0:
            return _RESOLUTION_UNIT_UM[unit] / res
    return None


def level0_magnification(props: Mapping[str, str], override: float | None = None) -> float:
    """Objective magnification of level 0.

    Order: ``override`` (the user's ``--base-magnification``); ``10 / mpp`` from
    :func:`mpp_from_properties`; the ``openslide.objective-power`` property.
    Raises ``ValueError`` when none is known (the caller names the slide).
    """
    if override is not None:
        if not (override > 0):
            raise ValueError(f"base magnification must be positive, got {override}")
        return float(override)
    mpp = mpp_from_properties(props)
    if mpp is not None:
        return 10.0 / mpp
    raw = props.get("openslide.objective-power")
    if raw is not None:
        try:
            power = float(raw)
        except ValueError:
            power = float("nan")
        if math.isfinite(power) and power > 0:
            return power
    raise ValueError("the slide records neither microns per pixel nor objective power; pass --base-magnification (e.g. 40 for 0.25 um/px, 20 for 0.5 um/px)")


def choose_level(level_downsamples: Sequence[float], wanted_downsample: float, tolerance: float = DOWNSAMPLE_TOLERANCE) -> int:
    """Index of the highest-resolution level that is not finer than needed.

    Picks the level with the largest downsample ``d`` such that
    ``d <= wanted_downsample * (1 + tolerance)`` (reading it and shrinking loses no
    detail); level 0 when the wanted downsample is below 1 (upsampling happens then).
    """
    best = 0
    for i, d in enumerate(level_downsamples):
        if d <= wanted_downsample * (1.0 + tolerance) and d >= level_downsamples[best]:
            best = i
    return best


@dataclass(frozen=True)
class PatchGeometry:
    """Where and how big patches are read, for one slide.

    Attributes:
        patch_level: slide level read.
        level_downsample: that level's downsample relative to level 0.
        read_size: pixels read at ``patch_level`` per patch side (CLAM's ``patch_size``).
        target_patch_size: pixels per side after resizing, at the target magnification.
        patch_size_level0: patch side in level-0 pixels (TRIDENT's ``patch_size_level0``).
        step_level0: grid step in level-0 pixels.
        level0_magnification: magnification of level 0.
        target_magnification: requested magnification.
    """

    patch_level: int
    level_downsample: float
    read_size: int
    target_patch_size: int
    patch_size_level0: int
    step_level0: int
    level0_magnification: float
    target_magnification: float

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.target_patch_size


def patch_geometry(
    level_downsamples: Sequence[float],
    level0_mag: float,
    target_mag: float,
    patch_size: int,
    overlap: float = 0.0,
) -> PatchGeometry:
    """Level and sizes for ``patch_size``-pixel patches at ``target_mag``.

    With ``f = level0_mag / target_mag`` (the downsample the target needs):
    ``patch_size_level0 = round(patch_size * f)``, read level = :func:`choose_level` of ``f``
    with downsample ``d``, ``read_size = round(patch_size * f / d)``, and grid step
    ``round(patch_size_level0 * (1 - overlap))``. A 40x slide at 20x with only a
    40x level therefore reads 512 px at level 0 and resizes to 256.
    """
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    if not (0.0 <= overlap < 1.0):
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if not (target_mag > 0):
        raise ValueError(f"target magnification must be positive, got {target_mag}")
    factor = level0_mag / target_mag
    level = choose_level(level_downsamples, factor)
    d = float(level_downsamples[level])
    size0 = max(1, int(round(patch_size * factor)))
    read = max(1, int(round(patch_size * factor / d)))
    step = max(1, int(round(size0 * (1.0 - overlap))))
    return PatchGeometry(level, d, read, int(patch_size), size0, step, float(level0_mag), float(target_mag))


def read_rgb(slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """Read a region as ``(H, W, 3)`` uint8 RGB, with transparent pixels made white.

    ``location`` is the level-0 (x, y) of the top-left corner (OpenSlide's convention).
    Regions outside the scanned area come back transparent; compositing them on
    white makes them background for tissue detection and feature extraction alike.
    """
    region = np.asarray(slide.read_region((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1]))))
    return rgba_to_rgb_on_white(region)


def rgba_to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite premultiplied-free RGBA (OpenSlide's output) onto white: ``rgb*a + 255*(1-a)``."""
    if rgba.shape[-1] == 3:
        return np.ascontiguousarray(rgba, dtype=np.uint8)
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgb * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_downsampled(slide, downsample: float, max_strip_pixels: int = 4_000_000) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide as RGB at (about) ``downsample`` times below level 0.

    Reads the best level (:func:`choose_level`) in horizontal strips and shrinks each
    strip, so memory stays bounded even for single-level slides. Returns the image
    and the exact level-0 pixels per output pixel along x and y.
    """
    from PIL import Image  # noqa: PLC0415 - pillow is part of the [wsi] extra

    w0, h0 = slide.level_dimensions[0]
    out_w = max(1, int(round(w0 / downsample)))
    out_h = max(1, int(round(h0 / downsample)))
    level = choose_level(slide.level_downsamples, downsample)
    lw, lh = slide.level_dimensions[level]
    ld = float(slide.level_downsamples[level])
    if (lw, lh) == (out_w, out_h):
        return read_rgb(slide, (0, 0), level, (lw, lh)), (w0 / out_w, h0 / out_h)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    # Strips aligned to output rows: each output row block maps to a level row block.
    rows_per_strip = max(1, int(max_strip_pixels // max(lw, 1) * out_h / max(lh, 1)))
    for r0 in range(0, out_h, rows_per_strip):
        r1 = min(out_h, r0 + rows_per_strip)
        y_lo = int(math.floor(r0 * lh / out_h))
        y_hi = max(y_lo + 1, min(lh, int(math.ceil(r1 * lh / out_h))))
        strip = read_rgb(slide, (0, int(round(y_lo * ld))), level, (lw, y_hi - y_lo))
        img = Image.fromarray(strip).resize((out_w, r1 - r0), Image.BILINEAR, reducing_gap=None)
        out[r0:r1] = np.asarray(img)
    return out, (w0 / out_w, h0 / out_h)


def list_slides(source: str | Path) -> list[tuple[str, Path]]:
    """``(slide_id, path)`` pairs from a directory or a CSV, sorted by id.

    Directory: every file whose name ends in one of :data:`SLIDE_SUFFIXES`.
    One slide file (a name ending in one of them): that slide.
    CSV: a header with a ``path`` (or ``slide_path``) column and an optional
    ``slide_id`` column; relative paths are relative to the CSV's folder.
    Raises :class:`MMILInputError` for a missing source, an empty selection or
    duplicate slide ids.
    """
    source = Path(source)
    pairs: list[tuple[str, Path]] = []
    if source.is_file() and is_slide_file(source):
        return [(slide_id_from_path(source), source)]
    if source.is_dir():
        for p in sorted(source.iterdir()):
            if p.is_file() and is_slide_file(p):
                pairs.append((slide_id_from_path(p), p))
        if not pairs:
            raise MMILInputError(f"{source}: no slide files here (looked for {', '.join(SLIDE_SUFFIXES)}); pass the folder holding the slides or a CSV with a 'path' column")
    elif source.is_file():
        pairs = _slides_from_csv(source)
    else:
        raise MMILInputError(f"{source}: no such slide directory or CSV; pass --slides DIR or --slides slides.csv")
    seen: dict[str, Path] = {}
    for sid, p in pairs:
        if sid in seen:
            raise MMILInputError(f"{source}: slide id {sid!r} appears twice ({seen[sid]} and {p}); output files are named by slide id, rename one")
        seen[sid] = p
    return sorted(pairs, key=lambda t: t[0])


def is_slide_file(path: str | Path) -> bool:
    """Whether ``path``'s name ends in one of :data:`SLIDE_SUFFIXES`."""
    return Path(path).name.lower().endswith(SLIDE_SUFFIXES)


def _slides_from_csv(source: Path) -> list[tuple[str, Path]]:
    pairs: list[tuple[str, Path]] = []
    try:
        with source.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            col = "path" if "path" in fields else ("slide_path" if "slide_path" in fields else None)
            if col is None:
                raise MMILInputError(f"{source}: slide CSV needs a 'path' (or 'slide_path') column, found {fields}; add a header line 'slide_id,path'")
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
                if not row.get(col):
                    continue
                p = Path(row[col])
                if not p.is_absolute():
                    p = source.parent / p
                pairs.append((row.get("slide_id") or slide_id_from_path(p), p))
    except (UnicodeDecodeError, csv.Error) as err:
        raise MMILInputError(f"{source}: not a slide CSV ({type(err).__name__}); pass a folder of slides, one slide file ({', '.join(SLIDE_SUFFIXES)}) or a CSV with a 'path' column") from None
    if not pairs:
        raise MMILInputError(f"{source}: the slide CSV lists no slides")
    return pairs


def remove_temp_files(directory: str | Path, names: Sequence[str] | None = None) -> int:
    """Delete the hidden ``.NAME.*.tmp`` files a killed atomic writer left directly in ``directory``
    (only those of ``names`` when given); sub-folders and other files are left alone. Returns how many."""
    import glob  # noqa: PLC0415

    directory = Path(directory)
    patterns = [f".{glob.escape(n)}.*.tmp" for n in names] if names is not None else [".*.tmp"]
    count = 0
    for pattern in patterns:
        for tmp in directory.glob(pattern):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                count += 1
    return count


def dataclass_to_dict(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` (kept here so configs are saved beside results the same way everywhere)."""
    return dataclasses.asdict(obj)
