"""``mmil synth --preset camelyon-like``: structure, oracle, and a small end-to-end run that learns."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from mmil.config import TrainConfig
from mmil.crossval import cross_validate
from mmil.data import load_dataset
from mmil.data.synth import write_synthetic_dataset
from mmil.data.synth_camelyon import FRACTION_BINS, tumour_fraction
from mmil.stats import binary_auc


def test_tumour_fractions_are_camelyon_like():
    rng = np.random.default_rng(0)
    f = np.array([tumour_fraction(rng) for _ in range(4000)])
    assert 0.001 <= f.min() and f.max() <= 0.40
    assert 0.50 < (f < 0.01).mean() < 0.60 and 0.12 < (f > 0.10).mean() < 0.18  # 55 % micro, 15 % large
    assert sum(b[0] for b in FRACTION_BINS) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cam")
    write_synthetic_dataset(out, n_slides=40, seed=1, in_dim=16, signal=10.0, preset="camelyon-like", scale=0.01)
    return out


def test_files_hold_instance_labels_and_contiguous_lesions(cohort):
    labels = dict(line.split(",")[:2] for line in (cohort / "labels.csv").read_text().splitlines()[1:])
    oracle = json.loads((cohort / "oracle.json").read_text())
    assert oracle["preset"] == "camelyon-like" and oracle["oracle_auc"] > 0.9
    for sid, label in labels.items():
        with h5py.File(cohort / "features" / f"{sid}.h5") as f:
            tumour, coords = f["instance_labels"][:].astype(bool), f["coords"][:]
            assert 20 <= len(tumour) <= 200
            assert tumour.any() == (label == "1")
            if tumour.sum() >= 2:  # every lesion cell has a tumour neighbour on the grid (contiguous)
                cells = coords[tumour] // 256
                d = np.abs(cells[:, None, :] - cells[None, :, :]).max(-1) + np.eye(len(cells), dtype=np.int64) * 99
                assert (d.min(1) <= 3).mean() > 0.8


def test_max_pooling_learns_the_cohort(cohort, tmp_path):
    ds = load_dataset(str(cohort / "features"), str(cohort / "labels.csv"))
    cfg = TrainConfig(epochs=6, min_epochs=6, lr=1e-2, progress=False, select_min_epoch=2)
    res = cross_validate(ds, "max", {"embed_dim": 16}, cfg, tmp_path / "run", folds=2, seed=0)
    y = np.concatenate([o.y_true for o in res.folds])
    p = np.concatenate([o.probs[:, 1] for o in res.folds])
    assert binary_auc(y == 1, p) > 0.75  # chance is 0.5; the oracle is near 1
