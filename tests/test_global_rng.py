"""Library calls that seed torch leave the caller's global random state as it was."""
from __future__ import annotations

import torch

from mmil.bench_cost import measure_cost
from mmil.config import TrainConfig
from mmil.crossval import cross_validate
from mmil.data import BagDataset
from mmil.data.synth import synthetic_bags
from mmil.train import train_fold
from mmil_toys import register_toys

TOY = register_toys()


def _data():
    return BagDataset.from_bags(synthetic_bags(12, seed=0, in_dim=6, min_instances=10, max_instances=20, signal=8.0))


def _cfg():
    return TrainConfig(epochs=2, min_epochs=0, patience=5, lr=1e-2, seed=7, progress=False)


def test_train_fold_leaves_the_global_rng_untouched(tmp_path):
    ds = _data()
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    res = train_fold(ds.subset(range(8)), ds.subset(range(8, 12)), TOY, {}, _cfg(), tmp_path / "fold")
    assert res.epochs_run == 2
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)


def test_seeded_results_do_not_depend_on_the_callers_rng(tmp_path):
    ds = _data()
    torch.manual_seed(1)
    a = train_fold(ds.subset(range(8)), None, TOY, {}, _cfg(), tmp_path / "a")
    torch.manual_seed(2)
    b = train_fold(ds.subset(range(8)), None, TOY, {}, _cfg(), tmp_path / "b")
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_cross_validation_and_cost_measurement_leave_the_global_rng_untouched(tmp_path):
    before = torch.get_rng_state()
    cross_validate(_data(), TOY, {}, _cfg(), tmp_path / "cv", folds=2, repeats=1)
    measure_cost("mean", {"embed_dim": 4}, 6, 2, [10], device=torch.device("cpu"), repeats=1)
    assert torch.equal(torch.get_rng_state(), before)
