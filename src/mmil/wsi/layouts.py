"""Where ``mmil extract`` writes its feature files, and the attributes each one carries.

Layouts (``--layout``):

* ``mmil`` (default): ``<out>/<slide>.h5``;
* ``clam``: ``<out>/h5_files/<slide>.h5`` (CLAM's ``extract_features_fp.py`` layout);
* ``trident``: TRIDENT's job root, with ``<cfg>`` = ``<mag>x_<patch>px_<overlap>px_overlap``::

      <out>/<cfg>/patches/<slide>_patches.h5      coords (N, 2) int64, TRIDENT's attributes
      <out>/<cfg>/features_<encoder>/<slide>.h5   features (N, D) float32 (attrs encoder, name) + coords

With ``--pt`` each slide's features are also saved as CLAM's trainer reads them,
``torch.save`` of a float32 tensor ``(N, D)``: ``<out>/pt_files/<slide>.pt`` (next to
``h5_files/`` in the ``clam`` layout), or ``<out>/<cfg>/pt_files_<encoder>/`` for
``trident``; an ``attributes.json`` beside them lists each slide's attributes.

Every feature file carries, as file attributes, the patch geometry of
:func:`patch_attributes` (``patch_size_level0``, ``target_patch_size``,
``target_magnification``, ``level0_magnification``, ``mpp``, ``patch_mpp``) and
the encoder (``encoder``, ``preset``), beside the backbone's preprocessing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from mmpl.fsio import atomic_path

from ..data.layouts import is_trident_config_dir
from ..errors import MMILInputError

LAYOUTS = ("mmil", "clam", "trident")


def encoder_tag(name: str) -> str:
    """A folder-safe encoder name (``timm:vit_small`` -> ``timm-vit_small``) for ``features_<encoder>``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "encoder"


def _known(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def patch_attributes(attrs: Mapping[str, Any], read_size: int, level_downsample: float, target_size: int,
                     slide_mag0: float | None = None, slide_mpp: float | None = None) -> dict[str, Any]:
    """The patch geometry of one coordinate file, with what the slide knows filling the gaps.

    * ``patch_size_level0`` = the file's value, else ``round(read_size * level_downsample)``;
    * ``level0_magnification`` = the file's, else the slide's (``10 / mpp`` or objective power);
    * ``mpp`` (um per level-0 pixel) = the file's, else the slide's, else ``10 / level0_magnification``;
    * ``target_magnification`` = the file's, else ``level0_magnification * target_size / patch_size_level0``;
    * ``patch_mpp`` (um per pixel of a patch at ``target_size``) = ``mpp * patch_size_level0 / target_size``;
    * ``overlap_px`` (at target size) = ``round(target_size * (patch_size_level0 - step_level0) / patch_size_level0)``
      for ours (``step_level0`` given), TRIDENT's ``overlap`` (pixels) when there is no ``patch_level``, else 0.

    Unknown values are ``None``.
    """
    size0 = int(attrs["patch_size_level0"]) if "patch_size_level0" in attrs else int(round(read_size * level_downsample))
    mag0 = _known(attrs.get("level0_magnification")) or _known(slide_mag0)
    mpp = _known(attrs.get("mpp")) or _known(slide_mpp) or (10.0 / mag0 if mag0 else None)
    mag0 = mag0 or (10.0 / mpp if mpp else None)
    target_mag = _known(attrs.get("target_magnification")) or (mag0 * target_size / size0 if mag0 else None)
    if "step_level0" in attrs:
        overlap = int(round(target_size * (size0 - int(attrs["step_level0"])) / size0))
    elif "patch_level" not in attrs and "overlap" in attrs:
        overlap = int(round(float(attrs["overlap"])))
    else:
        overlap = 0
    return {
        "patch_size_level0": size0,
        "target_patch_size": int(target_size),
        "target_magnification": target_mag,
        "level0_magnification": mag0,
        "mpp": mpp,
        "patch_mpp": mpp * size0 / target_size if mpp else None,
        "overlap_px": max(overlap, 0),
    }


def trident_config_name(geometry: Mapping[str, Any], source: str | Path) -> str:
    """TRIDENT's ``<mag>x_<patch>px_<overlap>px_overlap`` folder name (``20x_256px_0px_overlap``)."""
    mag = geometry.get("target_magnification")
    if mag is None:
        raise MMILInputError(f"{source}: the magnification of the patches is unknown (no mpp or objective power in the slide or the coordinate file); "
                             "re-tile with `mmil tile --base-magnification`, or write --layout mmil")
    return f"{float(mag):g}x_{geometry['target_patch_size']}px_{geometry['overlap_px']}px_overlap"


def trident_coords_attributes(geometry: Mapping[str, Any], slide_id: str, level0_size: tuple[int, int]) -> dict[str, Any]:
    """Attributes of ``coords`` as TRIDENT writes them (``patch_size`` is the size at the target magnification)."""
    out = {
        "patch_size": np.int64(geometry["target_patch_size"]),
        "patch_size_level0": np.int64(geometry["patch_size_level0"]),
        "overlap": np.int64(geometry["overlap_px"]),
        "target_magnification": geometry["target_magnification"],
        "level0_magnification": geometry["level0_magnification"],
        "level0_width": np.int64(level0_size[0]),
        "level0_height": np.int64(level0_size[1]),
        "name": slide_id,
    }
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class SlideOutputs:
    """The files ``mmil extract`` writes for one slide (``None``: not written in this layout)."""

    features: Path
    patches: Path | None = None  # TRIDENT's <slide>_patches.h5
    pt: Path | None = None


def slide_outputs(layout: str, out_dir: str | Path, slide_id: str, encoder: str, pt: bool,
                  geometry: Mapping[str, Any] | None = None, source: str | Path = "") -> SlideOutputs:
    """Paths of one slide's outputs (``geometry`` from :func:`patch_attributes`, needed for ``trident``)."""
    out = Path(out_dir)
    if layout == "trident":
        if geometry is None:
            raise ValueError("the trident layout needs the patch geometry")
        cfg, tag = out / trident_config_name(geometry, source), encoder_tag(encoder)
        return SlideOutputs(cfg / f"features_{tag}" / f"{slide_id}.h5", cfg / "patches" / f"{slide_id}_patches.h5",
                            cfg / f"pt_files_{tag}" / f"{slide_id}.pt" if pt else None)
    if layout not in LAYOUTS:
        raise MMILInputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r} (--layout)")
    h5_dir = out / "h5_files" if layout == "clam" else out
    return SlideOutputs(h5_dir / f"{slide_id}.h5", None, out / "pt_files" / f"{slide_id}.pt" if pt else None)


def write_trident_patches(path: Path, coords: np.ndarray, attrs: Mapping[str, Any]) -> None:
    """TRIDENT's coordinate file: ``coords`` (N, 2) int64 with ``attrs`` on the dataset and on the file."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
            for k, v in attrs.items():
                ds.attrs[k] = v
                f.attrs[k] = v


def write_pt(path: Path, features: np.ndarray) -> None:
    """CLAM's ``pt_files/<slide>.pt``: ``torch.save`` of a float32 tensor ``(N, D)``, written atomically."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(tensor, fh)


def resolve_coords_dir(path: str | Path) -> Path:
    """A TRIDENT job root given as ``--coords``: its one ``<cfg>`` folder (several are refused, listed); else ``path``."""
    path = Path(path)
    if not path.is_dir() or any(path.glob("*.h5")) or (path / "patches").is_dir():
        return path
    configs = sorted(p for p in path.iterdir() if p.is_dir() and is_trident_config_dir(p) and (p / "patches").is_dir())
    if len(configs) > 1:
        raise MMILInputError(f"{path}: a TRIDENT job root with several patch settings ({', '.join(c.name for c in configs)}); "
                             f"pick one with --coords, e.g. --coords {configs[0]}")
    return configs[0] if configs else path


def find_coords_file(coords_dir: Path, slide_id: str) -> Path | None:
    """``<slide>.h5`` (ours, CLAM) or ``<slide>_patches.h5`` (TRIDENT) in ``coords_dir``, or ``None``."""
    for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
        if (coords_dir / name).is_file():
            return coords_dir / name
    return None


def plain_attrs(obj) -> dict[str, Any]:
    """HDF5 attributes as JSON-ready Python values."""
    out = {}
    for k, v in obj.attrs.items():
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def feature_file_attributes(backbone, preset: str, layout: str, input_size: int, geometry: Mapping[str, Any]) -> dict[str, Any]:
    """File attributes of a feature file: the encoder (``encoder``, ``preset``), its preprocessing and the patch geometry."""
    from .. import __version__

    attrs = {
        "backbone": backbone.name,
        "encoder": backbone.name,
        "preset": getattr(backbone, "preset", None) or preset,
        "weights": Path(backbone.weights).name if backbone.weights else "random",
        "input_size": np.int64(input_size),
        "mean": np.asarray(backbone.mean, dtype=np.float64),
        "std": np.asarray(backbone.std, dtype=np.float64),
        "mmil_version": __version__,
        "layout": layout,
    }
    attrs.update({k: v for k, v in geometry.items() if v is not None and k != "overlap_px"})
    return attrs


def complete_outputs(outputs: SlideOutputs, write_patches) -> None:
    """A finished slide gains the files a rerun asks for that it lacks: the ``.pt`` (from its feature
    file) and, through ``write_patches()``, TRIDENT's patches file."""
    if outputs.pt is not None and not outputs.pt.is_file():
        with h5py.File(outputs.features, "r") as f:
            write_pt(outputs.pt, f["features"][()])
    if outputs.patches is not None and not outputs.patches.is_file() and write_patches is not None:
        write_patches()


def write_pt_attributes(done: list[SlideOutputs], name: str) -> None:
    """``name`` (``attributes.json``) beside the ``.pt`` files: per slide, the attributes of its feature
    file, its patch count and both file names."""
    from mmpl.jsonio import write_json

    by_dir: dict[Path, dict[str, Any]] = {}
    for o in done:
        if o is None or o.pt is None or not o.pt.is_file():
            continue
        with h5py.File(o.features, "r") as f:
            entry = {"pt": o.pt.name, "features_h5": str(o.features), "n_patches": int(f["features"].shape[0]), **plain_attrs(f)}
        by_dir.setdefault(o.pt.parent, {})[o.pt.stem] = entry
    for folder, slides in by_dir.items():
        write_json(folder / name, {"format": "CLAM pt_files: torch.save of a float32 tensor (n_patches, feature_dim)", "slides": slides})
