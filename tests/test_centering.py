"""Slide centring (``TrainConfig.center_slides``): the formula, its invariance, and that training and inference agree."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmil.config import TrainConfig
from mmil.crossval import cross_validate
from mmil.data import BagDataset, load_dataset
from mmil.data.dataset import center_on_median
from mmil.data.synth import synthetic_bags
from mmil.errors import MMILInputError
from mmil.evaluate import load_for_inference, predict_probs
from mmil.models.base import model_inputs
from mmil.train import resolve_centering
from mmil_toys import register_toys

TOY = register_toys()


def _cfg(**kw):
    base = dict(epochs=2, min_epochs=100, patience=50, lr=1e-2, progress=False, instance_dropout=0.0, feature_noise=0.0)
    return TrainConfig(**{**base, **kw})


def test_center_on_median_matches_a_naive_loop():
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32) * 3 + 1
    naive = np.empty_like(x)
    for j in range(x.shape[1]):
        col = sorted(x[:, j].tolist())
        med = col[len(col) // 2]  # 7 rows: the middle value
        naive[:, j] = x[:, j] - med
    np.testing.assert_allclose(center_on_median(x), naive, atol=1e-6)
    assert center_on_median(np.zeros((0, 5), np.float32)).shape == (0, 5)


def test_centring_removes_a_per_slide_offset_and_keeps_a_minority_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    x[:5, 0] += 8.0  # 2.5 % "tumour" instances shifted along feature 0
    offset = rng.normal(scale=5.0, size=6).astype(np.float32)  # a stain / scanner offset of this slide
    np.testing.assert_allclose(center_on_median(x + offset), center_on_median(x), atol=1e-4)
    c = center_on_median(x)
    assert c[:5, 0].min() > c[5:, 0].max() - 4.0  # the shifted instances stay far out (8 - a few noise sd)
    assert abs(np.median(c, axis=0)).max() < 1e-6


def test_auto_is_on_for_slide_features_and_off_for_benchmark_csvs(tmp_path):
    slides = BagDataset.from_bags(synthetic_bags(4, seed=0, in_dim=4, min_instances=5, max_instances=9))
    lines = [",".join([str(b % 2), str(b)] + ["1.0"] * 3) for b in range(4) for _ in range(2)]
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    csv = load_dataset(tmp_path / "b.csv")
    assert resolve_centering(_cfg(), slides) and not resolve_centering(_cfg(), csv)
    assert resolve_centering(_cfg(center_slides="median"), csv) and not resolve_centering(_cfg(center_slides="none"), slides)
    with pytest.raises(MMILInputError, match="center_slides"):
        _cfg(center_slides="mean")


@pytest.mark.parametrize("mode", ["auto", "none"])
def test_checkpoint_applies_the_training_centring_at_inference(tmp_path, mode):
    ds = BagDataset.from_bags(synthetic_bags(12, seed=0, in_dim=6, min_instances=10, max_instances=20, signal=6.0))
    run = cross_validate(ds, TOY, {}, _cfg(center_slides=mode), tmp_path / mode, folds=2, repeats=1)
    ckpt = run.folds[0].checkpoint_dir
    model, fitted, cfg = load_for_inference(ckpt, ds)
    assert cfg["extra"]["center_slides"] == ("median" if mode == "auto" else None)
    assert fitted.centering == (mode == "auto")
    raw = ds[3].features.numpy()
    expected = center_on_median(raw) if mode == "auto" else raw
    np.testing.assert_allclose(fitted[3].features.numpy(), expected, atol=1e-6)
    # the probabilities inference reports are those of the model on the centred bag
    got = predict_probs(model, fitted.subset([3]), seed=0, repeats=1)[0, 0]
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(expected), **model_inputs(model, seed=0)).logits.float(), -1)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
