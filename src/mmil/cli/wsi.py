"""``mmil tile``, ``mmil extract``, ``mmil heatmap``: slides -> patches -> features -> heatmaps.

Argument parsing and printing only; the work is in :mod:`mmil.wsi`. The options are
the fields of :class:`~mmil.wsi.tiling.TilingConfig` (tissue options: those of
:class:`~mmil.wsi.tissue.TissueParams`), :class:`~mmil.wsi.features.ExtractConfig` and
:class:`~mmil.wsi.heatmap.HeatmapConfig`: each declares its flag, help, default and range
once, and ``--config`` YAML keys are the field names.

Exit status of the three commands: 0 when at least one slide succeeded (or was
already done); failed slides are listed on stderr and in the run's summary CSV,
and the run goes on past them. 1 when no slide succeeded. 2 for bad options or
inputs that stop the whole run, found before anything is computed or written:
a value out of range (on the command line or in --config), a bad config, an
--out that cannot be a writable folder, a --device this machine lacks, a missing
folder, an unknown backbone, or a slide named on its own that cannot be read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mmpl.config import add_config_flags, given_flags, layered_config

from ..errors import MMILInputError
from .common import add_common, check_device, default_device_auto, device_option
from .options import ModelOverrides

_OK = ("ok", "exists")


def _build_config(cls, args: argparse.Namespace, nested: Mapping[str, Mapping[str, Any]] | None = None):
    """``cls`` from ``--config`` YAML (if given) overridden by the flags given, validated.

    Flags were range-checked when parsed, so a value refused here came from the YAML
    file: the message names the file, the key and the option.
    """
    if "device" in getattr(cls, "__dataclass_fields__", {}):
        default_device_auto(args)  # the command line's default is auto unless --config names a device
    cfg = layered_config(cls, args.config, given_flags(args, cls), nested, MMILInputError)
    try:
        cfg.validate()
    except MMILInputError as err:
        raise MMILInputError(f"{args.config}: {err}" if args.config else str(err)) from None
    if "device" in getattr(cls, "__dataclass_fields__", {}):
        cfg.device = check_device(cfg.device, device_option(args, args.device not in (None, "auto")))  # auto resolved once
    return cfg


def _start(args: argparse.Namespace, device: str | None = None) -> list:
    """Checks that stop a run before anything is computed or written: the output folder,
    the device, and the slides (one slide named directly must open)."""
    from mmpl.fsio import check_output_dir  # noqa: PLC0415

    from ..wsi.slide import is_slide_file, list_slides, open_slide  # noqa: PLC0415

    check_output_dir(args.out, "--out")
    if device is not None:
        check_device(device, device_option(args, args.device is not None))
    slides = list_slides(args.slides)
    if is_slide_file(args.slides) and Path(args.slides).is_file():
        open_slide(args.slides).close()  # a slide named on its own that cannot be read stops the run
    return slides


def _report(command: str, results: Sequence[Any], describe: Callable[[Any], str], summary_path: str) -> int:
    ok = [r for r in results if r.status in _OK]
    bad = [r for r in results if r.status not in _OK]
    for r in results:
        print(describe(r))
    for r in bad:
        print(f"mmil {command}: {r.slide}: {r.status}: {r.error}", file=sys.stderr)
    print(f"{len(ok)} of {len(results)} slide(s) done, {len(bad)} not; summary: {summary_path}")
    return 0 if ok else 1


def _add_parser(sub, name: str, cls, *, help: str, description: str, config: str, inputs: Sequence[tuple[str, str]]) -> argparse.ArgumentParser:
    """A command with its input folders, ``--out``, ``--config`` and the flags of ``cls``."""
    p = sub.add_parser(name, help=help, description=description)
    for flag, text in inputs:
        p.add_argument(flag, required=True, help=text)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help=f"YAML file with {config}; flags override it")
    add_config_flags(p, cls, exclude=("seed", "device"))
    add_common(p, progress="no progress bars", **COMMON_HELP.get(name, {}))
    return p


#: What --seed and --device drive in each command (tile uses neither; YAML keys: seed, device).
COMMON_HELP = {
    "extract": {"seed": "seed of the random weights (--random-weights)", "device": "where to run the backbone"},
    "heatmap": {"seed": "first seed of the random sub-bag grouping", "device": "where to run the model"},
}


SLIDES_HELP = "folder of slide files (.svs, .tif, .ndpi, .mrxs, ...), one slide file, or a CSV with a 'path' column (and optional 'slide_id')"


# ---------------------------------------------------------------------------- tile
def _cmd_tile(args: argparse.Namespace) -> int:
    from ..wsi.tiling import TilingConfig, tile_slides  # noqa: PLC0415
    from ..wsi.tissue import TissueParams  # noqa: PLC0415

    cfg = _build_config(TilingConfig, args, {"tissue": given_flags(args, TissueParams, prefix="tissue_")})
    slides = _start(args)
    results = tile_slides(slides, args.out, cfg, progress=not args.no_progress)
    return _report("tile", results, lambda r: f"{r.slide}\t{r.status}\t{r.n_patches} patches\t{r.seconds:.1f}s", str(Path(args.out) / "summary.csv"))


def _add_tile(sub) -> None:
    from ..wsi.tiling import TilingConfig  # noqa: PLC0415
    from ..wsi.tissue import TissueParams  # noqa: PLC0415

    p = _add_parser(
        sub, "tile", TilingConfig,
        help="tissue segmentation and patch coordinates for slides (CLAM-style .h5, thumbnails, summary.csv)",
        description="Segment tissue on a low-resolution level and write the patch grid of each slide as <out>/patches/<slide>.h5, "
        "a thumbnail with tissue outlines and patches as <out>/thumbnails/<slide>.png, and <out>/summary.csv. "
        "Unreadable slides are reported and skipped. CLAM's recipe; areas are in 128-um reference patches (CLAM's 512-px patch at 40x), "
        "and a region is dropped when smaller than max(--min-tissue-area, --min-tissue-area-rel x the largest region), so small specimens "
        "and needle biopsies are kept (CLAM's absolute rule: --min-tissue-area 100 --min-tissue-area-rel 0 --min-hole-area 16 --min-hole-area-rel 0).",
        config="tiling options (keys as in TilingConfig; tissue options under 'tissue:')",
        inputs=[("--slides", SLIDES_HELP)],
    )
    add_config_flags(p.add_argument_group("tissue segmentation (CLAM's recipe, area thresholds relative to the largest region; YAML: keys under tissue:)"), TissueParams, prefix="tissue_")
    p.set_defaults(func=_cmd_tile)


# ---------------------------------------------------------------------------- extract
def _cmd_extract(args: argparse.Namespace) -> int:
    from ..wsi.features import ExtractConfig, extract_features, resolve_shard  # noqa: PLC0415

    cfg = _build_config(ExtractConfig, args)
    slides = _start(args, cfg.device)
    results = extract_features(slides, args.coords, args.out, cfg, progress=not args.no_progress)
    index, count = resolve_shard(cfg.shard)
    name = "extract_summary.csv" if count == 1 else f"extract_summary.shard{index}-of-{count}.csv"
    return _report("extract", results, lambda r: f"{r.slide}\t{r.status}\t{r.n_patches} patches\t{r.seconds:.1f}s", str(Path(args.out) / name))


def _add_extract(sub) -> None:
    from ..wsi.features import ExtractConfig  # noqa: PLC0415

    p = _add_parser(
        sub, "extract", ExtractConfig,
        help="patch features per slide with a ResNet-50 (truncated, 1024-d), a pathology encoder preset (uni, virchow2, ...) or a timm model (CLAM-style .h5)",
        description="Embed the patches listed by `mmil tile` (or CLAM's / TRIDENT's coordinate files) and write <out>/<slide>.h5 with 'features' (N, D) float32 "
        "and 'coords' (N, 2) int64, attributes naming the encoder and the patch geometry (patch size at level 0, magnification, mpp); "
        "--layout clam writes <out>/h5_files/, --layout trident TRIDENT's job root, --pt adds CLAM's pt_files/<slide>.pt. "
        "Finished slides are skipped (resume). Weights come only from a local file. Under torchrun each rank takes its share of slides.",
        config="extraction options (keys as in ExtractConfig)",
        inputs=[("--slides", "folder of slide files, one slide file, or a CSV with a 'path' column"),
                ("--coords", "folder with <slide>.h5 coordinate files (the --out of `mmil tile`, or CLAM's patches folder), "
                 "or TRIDENT's <job>/<mag>x_<patch>px_<overlap>px_overlap folder (<slide>_patches.h5)")],
    )
    p.set_defaults(func=_cmd_extract)


# ---------------------------------------------------------------------------- heatmap
def _cmd_heatmap(args: argparse.Namespace) -> int:
    from ..wsi.heatmap import HeatmapConfig, make_heatmaps  # noqa: PLC0415

    # Inference-time model options that do not change the weights (as in `mmil predict`).
    cfg = _build_config(HeatmapConfig, args, {"model_kwargs": given_flags(args, ModelOverrides, prefix="model_")})
    slides = _start(args, cfg.device)
    results = make_heatmaps(args.checkpoint, args.features, slides, args.out, cfg, progress=not args.no_progress, from_cv=args.from_cv)

    def describe(r) -> str:
        if r.status != "ok":
            return f"{r.slide}\t{r.status}"
        fold = "" if r.fold is None else f"\tfold {r.fold}"
        return f"{r.slide}\tpredicted {r.predicted}\tp = {max(r.probs):.3f}\t{r.n_patches} patches{fold}"

    return _report("heatmap", results, describe, str(Path(args.out) / "summary.csv"))


def _add_heatmap(sub) -> None:
    from ..wsi.heatmap import HeatmapConfig  # noqa: PLC0415

    p = _add_parser(
        sub, "heatmap", HeatmapConfig,
        help="per-patch importance of a trained model as PNG overlays and QuPath GeoJSON",
        description="For every feature file with a matching slide: instance scores of the checkpoint's model (averaged over --repeats seeds), "
        "written as <out>/<slide>.png (raw thumbnail beside the overlay, scale bar, labelled colorbar), <out>/<slide>_top<K>.png (gallery of "
        "the top-K patches), <out>/<slide>.geojson (QuPath: File > Import objects), <out>/<slide>_scores.csv and <out>/summary.csv. "
        "With --from-cv RUN every slide is scored by the fold model that held it out; a single --checkpoint warns about slides it trained on.",
        config="heatmap options (keys as in HeatmapConfig; model options under 'model_kwargs:')",
        inputs=[("--features", "folder of <slide>.h5 feature files from `mmil extract`"),
                ("--slides", "folder of slide files, one slide file, or a CSV with a 'path' column")],
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder written by `mmil train` (model.safetensors + config.json)")
    which.add_argument("--from-cv", metavar="RUN", help="the --out folder of `mmil train`: each slide is scored by the fold model "
                       "that did not train on it (RUN/folds.json, RUN/fold_k/checkpoint); summary.csv names the fold")
    g = p.add_argument_group("model options (YAML: keys under model_kwargs:; only those given override the checkpoint's)")
    add_config_flags(g, ModelOverrides, prefix="model_", defaults={"grouping": "the checkpoint's", "num_subbags": "the checkpoint's"})
    p.set_defaults(func=_cmd_heatmap)


def add_commands(subparsers) -> None:
    """Add ``tile``, ``extract`` and ``heatmap`` to the ``mmil`` command."""
    _add_tile(subparsers)
    _add_extract(subparsers)
    _add_heatmap(subparsers)
