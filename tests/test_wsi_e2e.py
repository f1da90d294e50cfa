"""Slides -> tiles -> features -> MMIL-Transformer -> heatmaps, end to end on synthetic slides.

Positive slides carry one "tumor" blob (dark purple, dense nuclei texture) beside a
normal one; negative slides two normal blobs. After training, the model must tell
the slides apart and its instance scores (`docs/method/mmil.md` §4) must point at the tumor blob.
Random-weight ResNet-50 features at a 32-px input keep extraction fast on a CPU.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("openslide")
pytest.importorskip("tifffile")

from slide_factory import tumour_slide_set  # noqa: E402

from mmil.cli import main  # noqa: E402

N_SLIDES = 8
PATCH = 64


@pytest.mark.slow
def test_slides_to_heatmaps(tmp_path):
    from mmil.config import TrainConfig
    from mmil.data import load_dataset
    from mmil.train import train_fold

    slides = tmp_path / "slides"
    slides.mkdir()
    specs, labels = tumour_slide_set(slides, N_SLIDES)

    tiles, feats, heat = tmp_path / "tiles", tmp_path / "features", tmp_path / "heatmaps"
    assert main(["tile", "--slides", str(slides), "--out", str(tiles), "--patch-size", str(PATCH),
                 "--min-tissue-area", "0.5", "--min-hole-area", "0.05", "--no-progress"]) == 0
    assert main(["extract", "--slides", str(slides), "--coords", str(tiles), "--out", str(feats), "--random-weights",
                 "--input-size", "32", "--batch-size", "256", "--workers", "0", "--device", "cpu", "--no-progress"]) == 0

    label_csv = tmp_path / "labels.csv"
    label_csv.write_text("slide_id,label\n" + "".join(f"{s},{y}\n" for s, y in labels.items()))
    dataset = load_dataset(feats, label_csv)
    assert len(dataset) == N_SLIDES and dataset.in_dim == 1024
    # the pipeline under the recipe its thresholds were set with (configs/mmil_recipe_v1.yaml, issue 10)
    cfg = TrainConfig(epochs=8, min_epochs=8, patience=100, lr=1e-3, seed=0, standardize=True, progress=False, grad_clip=None,
                      selection="loss", select_min_epoch=1, lr_schedule="constant", warmup_epochs=0.0, instance_dropout=0.0, feature_noise=0.0)
    model_kwargs = {"num_subbags": 4, "embed_dim": 64, "heads": 4, "head_dim": 16, "mask_ratio": 0.0, "min_subbag_size": None}
    result = train_fold(dataset, None, "mmil", model_kwargs, cfg, tmp_path / "train")

    assert main(["heatmap", "--checkpoint", str(result.checkpoint_dir), "--features", str(feats), "--slides", str(slides),
                 "--out", str(heat), "--repeats", "4", "--thumbnail-size", "256", "--no-progress"]) == 0
    summary = {r["slide"]: r for r in csv.DictReader((heat / "summary.csv").open())}
    assert {s: summary[s]["pred_label"] for s in labels} == labels  # the model learned the task

    # Margins: over training seeds 0-2 here, per-slide AUC was 0.82-0.90 and top-10 hits 0.9-1.0; the
    # bounds below sit well under that, so other CPUs' rounding cannot flip them, yet a model that
    # does not point at the tumour (AUC ~0.5, hits ~ tumour share ~0.3) fails.
    hits, aucs = [], []
    for sid, label in labels.items():
        rows = list(csv.DictReader((heat / f"{sid}_scores.csv").open()))
        xy = np.array([[int(r["x"]), int(r["y"])] for r in rows])
        scores = np.array([float(r["score"]) for r in rows])
        centres = xy + PATCH // 2
        in_tumor = specs[sid].blob_mask(centres[:, 0], centres[:, 1], kinds=("tumor",))
        if label == "tumor":
            assert 10 < in_tumor.sum() < len(rows) - 10
            top = np.argsort(-scores)[:10]
            hits.append(in_tumor[top].mean())
            # the tumor patches outrank the normal ones as a whole (AUC of the scores)
            pos, neg = scores[in_tumor], scores[~in_tumor]
            aucs.append((pos[:, None] > neg[None, :]).mean())
        else:
            assert not in_tumor.any()
    assert min(aucs) > 0.65 and np.mean(aucs) > 0.72  # tumour patches outrank normal ones as a whole
    assert np.mean(hits) >= 0.7  # the 10 highest-scoring patches lie (mostly) in the tumor blob
