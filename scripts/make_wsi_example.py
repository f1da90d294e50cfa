#!/usr/bin/env python
"""Regenerate docs/img/heatmap_example.png: synthetic slides -> tiles -> features -> MMIL -> heatmap.

Runs the documented commands (docs/wsi.md) on synthetic slides written by
tests/slide_factory.py: positive slides carry a "tumor" blob (dark purple,
dense nuclei texture) beside a normal one. Features come from a *random-weight*
ResNet-50 (no download; the picture shows the pipeline, not a pathology model).
About a minute on a 2-core CPU.

    .venv/bin/python scripts/make_wsi_example.py [--out docs/img/heatmap_example.png] [--work DIR]
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic slide writer lives with the tests

MAX_BYTES = 200_000


def build_slides(slide_dir: Path, n: int = 8) -> dict[str, str]:
    from slide_factory import tumour_slide_set

    return tumour_slide_set(slide_dir, n)[1]


def shrink_png(src: Path, dst: Path) -> int:
    """Copy the PNG, palette-quantised if needed to stay under MAX_BYTES; returns its size in bytes."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    for colours in (256, 128, 64):  # only when the full-colour image is too big
        if buf.tell() <= MAX_BYTES:
            break
        buf = io.BytesIO()
        img.quantize(colors=colours, method=Image.Quantize.MAXCOVERAGE).save(buf, format="PNG", optimize=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())
    return dst.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "heatmap_example.png"), help="where to write the example image")
    parser.add_argument("--work", help="working folder (default: a temporary folder, removed afterwards)")
    parser.add_argument("--slide", default="slide1", help="which (positive) slide to show")
    args = parser.parse_args(argv)

    from mmil.cli import main as mmil
    from mmil.config import TrainConfig
    from mmil.data import load_dataset
    from mmil.train import train_fold

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mmil_wsi_example_"))
    try:
        slides, tiles, feats, heat = work / "slides", work / "tiles", work / "features", work / "heatmaps"
        slides.mkdir(parents=True, exist_ok=True)
        labels = build_slides(slides)
        if mmil(["tile", "--slides", str(slides), "--out", str(tiles), "--patch-size", "64", "--min-tissue-area", "0.5", "--min-hole-area", "0.05"]) != 0:
            return 1
        if mmil(["extract", "--slides", str(slides), "--coords", str(tiles), "--out", str(feats), "--random-weights", "--input-size", "32", "--workers", "0", "--device", "cpu"]) != 0:
            return 1
        label_csv = work / "labels.csv"
        label_csv.write_text("slide_id,label\n" + "".join(f"{s},{y}\n" for s, y in labels.items()))
        cfg = TrainConfig(epochs=12, min_epochs=12, patience=100, lr=1e-3, seed=0, standardize=True)
        result = train_fold(load_dataset(feats, label_csv), None, "mmil", {"num_subbags": 4, "embed_dim": 64, "heads": 4, "head_dim": 16}, cfg, work / "train")
        if mmil(["heatmap", "--checkpoint", str(result.checkpoint_dir), "--features", str(feats), "--slides", str(slides), "--out", str(heat), "--thumbnail-size", "384"]) != 0:
            return 1
        size = shrink_png(heat / f"{args.slide}.png", Path(args.out))
        print(f"wrote {args.out} ({size / 1000:.0f} kB)")
        return 0 if size <= MAX_BYTES else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
