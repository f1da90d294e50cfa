"""``mmil tile``, ``mmil extract``, ``mmil heatmap``: slides -> patches -> features -> heatmaps.

Argument parsing and printing only; the work is in :mod:`mmil.wsi`.

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
from typing import Any, Callable, Sequence

from mmpl.cliargs import non_negative_int, positive_int

from ..errors import MMILInputError
from ..wsi.options import EXTRACT_SPECS, HEATMAP_SPECS, TILING_SPECS, TISSUE_SPECS, check_device

_OK = ("ok", "exists")


def _config_values(args: argparse.Namespace, names: dict[str, str]) -> dict[str, Any]:
    """Options given on the command line (not None), keyed by their config path ("a" or "a.b")."""
    return {path: getattr(args, dest) for dest, path in names.items() if getattr(args, dest, None) is not None}


def _build_config(cls, args: argparse.Namespace, names: dict[str, str], adjust: Callable[[Any], None] | None = None):
    """Dataclass ``cls`` from ``--config`` YAML (if given) overridden by explicit flags, validated.

    Flags were range-checked when parsed, so a value refused here came from the YAML
    file: the message names the file, the key and the option.
    """
    from ..config import read_yaml_mapping  # noqa: PLC0415
    from ..wsi.slide import config_from_mapping  # noqa: PLC0415

    config = getattr(args, "config", None)
    values: dict[str, Any] = read_yaml_mapping(config) if config else {}
    for path, value in _config_values(args, names).items():
        head, _, tail = path.partition(".")
        if tail:
            if not isinstance(values.get(head, {}), dict):
                raise MMILInputError(f"{config}: {head} must be a mapping of options, got {values[head]!r}")
            values.setdefault(head, {})[tail] = value
        else:
            values[head] = value
    source = str(config or "command line")
    cfg = config_from_mapping(cls, values, source=source)
    try:
        if adjust is not None:
            adjust(cfg)
        cfg.validate()
    except MMILInputError as err:
        raise MMILInputError(f"{config}: {err}" if config else str(err)) from None
    return cfg


def _start(args: argparse.Namespace, device: str | None = None) -> list:
    """Checks that stop a run before anything is computed or written: the output folder,
    the device, and the slides (one slide named directly must open)."""
    from ..io import check_output_dir  # noqa: PLC0415
    from ..wsi.slide import is_slide_file, list_slides, open_slide  # noqa: PLC0415

    check_output_dir(args.out, "--out")
    if device is not None and device != "auto":
        check_device(device, "--device" if args.device is not None or not args.config else f"{args.config}: device")
    slides = list_slides(args.slides)
    if is_slide_file(args.slides) and Path(args.slides).is_file():
        open_slide(args.slides).close()  # a slide named on its own that cannot be read stops the run
    return slides


def _shard(text: str) -> tuple[int, int]:
    """argparse type of ``--shard I/N``."""
    from ..wsi.features import parse_shard  # noqa: PLC0415

    try:
        return parse_shard(text)
    except MMILInputError:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N (e.g. 0/4), got {text!r}") from None


def _report(command: str, results: Sequence[Any], describe: Callable[[Any], str], summary_path: str) -> int:
    ok = [r for r in results if r.status in _OK]
    bad = [r for r in results if r.status not in _OK]
    for r in results:
        print(describe(r))
    for r in bad:
        print(f"mmil {command}: {r.slide}: {r.status}: {r.error}", file=sys.stderr)
    print(f"{len(ok)} of {len(results)} slide(s) done, {len(bad)} not; summary: {summary_path}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------- tile
_TILE_NAMES = {
    "target_mag": "target_magnification",
    "patch_size": "patch_size",
    "overlap": "overlap",
    "min_tissue_fraction": "min_tissue_fraction",
    "base_magnification": "base_magnification",
    "thumbnail_size": "thumbnail_size",
    "overwrite": "overwrite",
    "seg_downsample": "tissue.seg_downsample",
    "use_otsu": "tissue.use_otsu",
    "sthresh": "tissue.sthresh",
    "median_size": "tissue.median_size",
    "close_size": "tissue.close_size",
    "min_tissue_area": "tissue.min_tissue_area",
    "min_hole_area": "tissue.min_hole_area",
    "max_holes": "tissue.max_holes",
}


def _cmd_tile(args: argparse.Namespace) -> int:
    from ..wsi.tiling import TilingConfig, tile_slides  # noqa: PLC0415

    cfg = _build_config(TilingConfig, args, _TILE_NAMES)
    slides = _start(args)
    results = tile_slides(slides, args.out, cfg, progress=not args.no_progress)
    return _report("tile", results, lambda r: f"{r.slide}\t{r.status}\t{r.n_patches} patches\t{r.seconds:.1f}s", str(Path(args.out) / "summary.csv"))


def _add_tile(sub) -> None:
    p = sub.add_parser(
        "tile",
        help="tissue segmentation and patch coordinates for slides (CLAM-style .h5, thumbnails, summary.csv)",
        description="Segment tissue on a low-resolution level and write the patch grid of each slide as <out>/patches/<slide>.h5, "
        "a thumbnail with tissue outlines and patches as <out>/thumbnails/<slide>.png, and <out>/summary.csv. "
        "Unreadable slides are reported and skipped. Defaults are CLAM's; areas are in 128-um reference patches (CLAM's 512-px patch at 40x).",
    )
    p.add_argument("--slides", required=True, help="folder of slide files (.svs, .tif, .ndpi, .mrxs, ...), one slide file, or a CSV with a 'path' column (and optional 'slide_id')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="YAML file with tiling options (keys as in TilingConfig; tissue options under 'tissue:'); flags override it")
    p.add_argument("--target-mag", type=TILING_SPECS["target_magnification"].arg_type(), help="magnification of the patches (default 20; 20x = 0.5 um/px)")
    p.add_argument("--patch-size", type=TILING_SPECS["patch_size"].arg_type(), help="patch side in pixels at the target magnification, >= 8 (default 256)")
    p.add_argument("--overlap", type=TILING_SPECS["overlap"].arg_type(), help="fraction of a patch shared with its grid neighbour, in [0, 1) (default 0)")
    p.add_argument("--min-tissue-fraction", type=TILING_SPECS["min_tissue_fraction"].arg_type(), help="keep patches with at least this fraction of tissue (default 0.25)")
    p.add_argument("--base-magnification", type=TILING_SPECS["base_magnification"].arg_type(), help="level-0 magnification for slides that record neither microns per pixel nor objective power")
    p.add_argument("--thumbnail-size", type=TILING_SPECS["thumbnail_size"].arg_type(), help="longest side of the thumbnail PNG in pixels, >= 16 (default 1024)")
    p.add_argument("--overwrite", action="store_const", const=True, help="re-tile slides whose coordinate file exists (default: keep them)")
    g = p.add_argument_group("tissue segmentation (CLAM defaults)")
    g.add_argument("--seg-downsample", type=TISSUE_SPECS["seg_downsample"].arg_type(), help="segment on the best level at or below this downsample (default 32)")
    g.add_argument("--no-otsu", dest="use_otsu", action="store_const", const=False, help="use the fixed saturation threshold --sthresh instead of Otsu's")
    g.add_argument("--sthresh", type=TISSUE_SPECS["sthresh"].arg_type(), help="saturation threshold 0..255 without Otsu, and the floor of Otsu's threshold (default 8)")
    g.add_argument("--median-size", type=TISSUE_SPECS["median_size"].arg_type(), help="median filter size in segmentation pixels (default 7)")
    g.add_argument("--close-size", type=TISSUE_SPECS["close_size"].arg_type(), help="morphological closing square size in segmentation pixels (default 4)")
    g.add_argument("--min-tissue-area", type=TISSUE_SPECS["min_tissue_area"].arg_type(), help="drop tissue regions smaller than this many 128-um reference patches (default 100, about 1.6 mm^2)")
    g.add_argument("--min-hole-area", type=TISSUE_SPECS["min_hole_area"].arg_type(), help="holes larger than this many reference patches stay excluded (default 16)")
    g.add_argument("--max-holes", type=TISSUE_SPECS["max_holes"].arg_type(), help="at most this many holes (the largest) are excluded per region (default 8)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=_cmd_tile)


# ---------------------------------------------------------------------------- extract
_EXTRACT_NAMES = {
    "backbone": "backbone",
    "weights": "weights",
    "random_weights": "random_weights",
    "seed": "seed",
    "input_size": "input_size",
    "batch_size": "batch_size",
    "workers": "workers",
    "device": "device",
    "precision": "precision",
    "overwrite": "overwrite",
}


def _cmd_extract(args: argparse.Namespace) -> int:
    from ..wsi.features import ExtractConfig, extract_features, resolve_shard  # noqa: PLC0415

    def adjust(cfg) -> None:
        if args.shard is not None:
            cfg.shard = args.shard
        if cfg.input_size == 0:
            cfg.input_size = None

    cfg = _build_config(ExtractConfig, args, _EXTRACT_NAMES, adjust)
    slides = _start(args, cfg.device)
    results = extract_features(slides, args.coords, args.out, cfg, progress=not args.no_progress)
    index, count = resolve_shard(cfg.shard)
    name = "extract_summary.csv" if count == 1 else f"extract_summary.shard{index}-of-{count}.csv"
    return _report("extract", results, lambda r: f"{r.slide}\t{r.status}\t{r.n_patches} patches\t{r.seconds:.1f}s", str(Path(args.out) / name))


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="patch features per slide with a ResNet-50 (truncated, 1024-d) or a timm model (CLAM-style .h5)",
        description="Embed the patches listed by `mmil tile` and write <out>/<slide>.h5 with 'features' (N, D) float32 and 'coords' (N, 2) int64. "
        "Finished slides are skipped (resume). Weights come only from a local file. Under torchrun each rank takes its share of slides.",
    )
    p.add_argument("--slides", required=True, help="folder of slide files, one slide file, or a CSV with a 'path' column")
    p.add_argument("--coords", required=True, help="folder with <slide>.h5 coordinate files (the --out of `mmil tile`, or CLAM's patches folder)")
    p.add_argument("--out", required=True, help="output folder for the feature files")
    p.add_argument("--config", help="YAML file with extraction options (keys as in ExtractConfig); flags override it")
    p.add_argument("--backbone", help="'resnet50-trunc' (default; torchvision ResNet-50 up to layer3, 1024-d) or 'timm:MODEL_NAME' (needs timm)")
    p.add_argument("--weights", help="local weight file (.pth/.pt state dict or .safetensors; torchvision/CLAM ResNet-50 names for resnet50-trunc)")
    p.add_argument("--random-weights", action="store_const", const=True, help="use seeded random weights instead of a weight file (tests and smoke runs only)")
    p.add_argument("--seed", type=EXTRACT_SPECS["seed"].arg_type(), help="seed of the random weights (default 0)")
    p.add_argument("--input-size", type=non_negative_int, help="resize patches to this side before the backbone (default: 224 for resnet50-trunc, timm's config otherwise; 0 = the tiling's target patch size)")
    p.add_argument("--batch-size", type=EXTRACT_SPECS["batch_size"].arg_type(), help="patches per forward pass (default 64)")
    p.add_argument("--workers", type=EXTRACT_SPECS["workers"].arg_type(), help="DataLoader worker processes reading patches (default 4; 0 = read in the main process)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default auto: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), help="autocast precision on CUDA (default auto: bf16 where supported, else fp16); CPU always runs fp32")
    p.add_argument("--shard", type=_shard, help="process share I of N (zero-based, e.g. 0/4) of the slides; under torchrun the default is RANK/WORLD_SIZE")
    p.add_argument("--overwrite", action="store_const", const=True, help="recompute slides whose feature file exists (default: skip them)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=_cmd_extract)


# ---------------------------------------------------------------------------- heatmap
_HEATMAP_NAMES = {
    "seed": "seed",
    "repeats": "repeats",
    "cmap": "cmap",
    "alpha": "alpha",
    "normalize": "normalize",
    "thumbnail_size": "thumbnail_size",
    "patch_size_level0": "patch_size_level0",
    "device": "device",
}


def _cmd_heatmap(args: argparse.Namespace) -> int:
    from ..wsi.heatmap import HeatmapConfig, make_heatmaps  # noqa: PLC0415

    def adjust(cfg) -> None:
        # Inference-time model options that do not change the weights (as in `mmil predict`).
        if not isinstance(cfg.model_kwargs, dict):
            raise MMILInputError(f"model_kwargs must be a mapping of model options, got {cfg.model_kwargs!r}")
        if args.grouping is not None:
            cfg.model_kwargs["grouping"] = args.grouping
        if args.num_subbags is not None:
            cfg.model_kwargs["num_subbags"] = args.num_subbags

    cfg = _build_config(HeatmapConfig, args, _HEATMAP_NAMES, adjust)
    slides = _start(args, cfg.device)
    results = make_heatmaps(args.checkpoint, args.features, slides, args.out, cfg, progress=not args.no_progress)

    def describe(r) -> str:
        if r.status != "ok":
            return f"{r.slide}\t{r.status}"
        return f"{r.slide}\tpredicted {r.predicted}\tp = {max(r.probs):.3f}\t{r.n_patches} patches"

    return _report("heatmap", results, describe, str(Path(args.out) / "summary.csv"))


def _add_heatmap(sub) -> None:
    p = sub.add_parser(
        "heatmap",
        help="per-patch importance of a trained model as PNG overlays and QuPath GeoJSON",
        description="For every feature file with a matching slide: instance scores of the checkpoint's model (averaged over --repeats seeds), "
        "written as <out>/<slide>.png (overlay on the thumbnail), <out>/<slide>.geojson (QuPath: File > Import objects) and <out>/<slide>_scores.csv.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by `mmil train` (model.safetensors + config.json)")
    p.add_argument("--features", required=True, help="folder of <slide>.h5 feature files from `mmil extract`")
    p.add_argument("--slides", required=True, help="folder of slide files, one slide file, or a CSV with a 'path' column")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="YAML file with heatmap options (keys as in HeatmapConfig); flags override it")
    p.add_argument("--seed", type=HEATMAP_SPECS["seed"].arg_type(), help="first seed of the random sub-bag grouping (default 0)")
    p.add_argument("--repeats", type=HEATMAP_SPECS["repeats"].arg_type(), help="average scores over this many seeds (default 4)")
    p.add_argument("--cmap", help="matplotlib colormap (default jet)")
    p.add_argument("--alpha", type=HEATMAP_SPECS["alpha"].arg_type(), help="opacity of the overlay in [0, 1] (default 0.45)")
    p.add_argument("--normalize", choices=("rank", "minmax", "none"), help="map scores to colours by percentile rank (default), min-max, or raw")
    p.add_argument("--thumbnail-size", type=HEATMAP_SPECS["thumbnail_size"].arg_type(), help="longest side of the thumbnail in pixels, >= 16 (default 1024)")
    p.add_argument("--patch-size-level0", type=HEATMAP_SPECS["patch_size_level0"].arg_type(), help="patch side in level-0 pixels, for feature files without geometry attributes")
    p.add_argument("--grouping", help="override the checkpoint's sub-bag grouping (MMIL): random, sequential, embedding, coords or index")
    p.add_argument("--num-subbags", type=positive_int, help="override the checkpoint's number of sub-bags (MMIL)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.set_defaults(func=_cmd_heatmap)


def add_commands(subparsers) -> None:
    """Add ``tile``, ``extract`` and ``heatmap`` to the ``mmil`` command."""
    _add_tile(subparsers)
    _add_extract(subparsers)
    _add_heatmap(subparsers)
