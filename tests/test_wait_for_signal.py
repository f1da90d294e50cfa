"""Early stopping waits for a validation AUC above chance (``wait_for_signal``, :func:`mmil.recipe.chance_auc_bound`)."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from mmil.config import TrainConfig
from mmil.data import BagDataset
from mmil.data.bags import Bag
from mmil.data.synth import synthetic_bags
from mmil.recipe import ModelSelector, chance_auc_bound, signal_floor
from mmil.train import train_fold
from mmil_toys import naive_auc, register_toys

TOY = register_toys()


def _null_auc_distribution(n_pos: int, n_neg: int) -> np.ndarray:
    """The exact AUC of every placement of the positives among n distinct ranks (all equally likely under H0)."""
    n = n_pos + n_neg
    aucs = []
    for pos in itertools.combinations(range(n), n_pos):
        y = np.zeros(n, dtype=int)
        y[list(pos)] = 1
        aucs.append(naive_auc(y, np.arange(n)))
    return np.array(aucs)


@pytest.mark.parametrize("n_pos,n_neg", [(6, 6), (4, 9), (7, 8)])
def test_bound_is_the_null_mean_plus_z_standard_deviations_of_the_exact_distribution(n_pos, n_neg):
    aucs = _null_auc_distribution(n_pos, n_neg)
    labels = np.array([1] * n_pos + [0] * n_neg)
    assert aucs.mean() == pytest.approx(0.5, abs=1e-12)
    assert chance_auc_bound(labels, z=1.0) - 0.5 == pytest.approx(aucs.std(), rel=1e-9)
    # one-sided: an uninformed model beats the default bound rarely (the distribution is discrete, so near 5 %)
    assert 0.02 <= (aucs > chance_auc_bound(labels)).mean() <= 0.06


def test_bound_uses_the_smallest_class_and_is_off_without_two_classes():
    three = np.array([0] * 10 + [1] * 10 + [2] * 4)
    assert chance_auc_bound(three) == pytest.approx(chance_auc_bound(np.array([1] * 4 + [0] * 20)))
    assert chance_auc_bound(np.array([1, 1, 1])) == -math.inf
    assert chance_auc_bound(np.array([0] * 40 + [1] * 40)) < chance_auc_bound(np.array([0] * 6 + [1] * 6))


def test_selector_does_not_stop_below_the_floor():
    s = ModelSelector(patience=2, min_epochs=3, floor=0.8)
    stops = []
    for epoch, auc in enumerate([0.6, 0.5, 0.55, 0.5, 0.5, 0.9, 0.85, 0.8], start=1):
        s.update(epoch, auc)
        stops.append(s.should_stop(epoch))
        assert s.waiting_for_signal(epoch) == (epoch in (3, 4, 5))  # patience and min_epochs met, best 0.6 < floor
    assert stops == [False] * 7 + [True]  # best 0.9 at epoch 6: stops two epochs later
    plain = ModelSelector(patience=2, min_epochs=3)
    for epoch, auc in enumerate([0.6, 0.5, 0.55], start=1):
        plain.update(epoch, auc)
    assert plain.should_stop(3) and not plain.waiting_for_signal(3)


def _flat_validation(n: int = 8) -> BagDataset:
    """Identical validation bags with both labels: every model scores them alike, so the AUC is exactly 0.5."""
    x = torch.ones(12, 8)
    return BagDataset.from_bags([Bag(f"v{i}", x.clone(), i % 2) for i in range(n)])


def _cfg(wait: bool) -> TrainConfig:
    return TrainConfig(epochs=7, min_epochs=2, patience=1, lr=1e-2, progress=False, selection="auc", wait_for_signal=wait,
                       instance_dropout=0.0, feature_noise=0.0, weight_average=0.0, select_min_epoch=1)


def test_a_run_at_chance_trains_to_the_last_epoch_and_says_why(tmp_path, capsys):
    train = BagDataset.from_bags(synthetic_bags(12, seed=0, in_dim=8, min_instances=10, max_instances=20, signal=8.0))
    waited = train_fold(train, _flat_validation(), TOY, {}, _cfg(True), tmp_path / "wait")
    assert [h["val_auc"] for h in waited.history] == [0.5] * 7
    assert waited.epochs_run == 7 and not waited.stopped_early
    assert "early stopping deferred" in capsys.readouterr().err
    plain = train_fold(train, _flat_validation(), TOY, {}, _cfg(False), tmp_path / "plain")
    # the same run without the floor stops where the plain rule says, replayed on its own recorded criteria
    replay, stop = ModelSelector(patience=1, min_epochs=2, tol=1e-9), 7
    for epoch, h in enumerate(plain.history, start=1):
        replay.update(epoch, h["selection_criterion"], -h["val_loss"])
        if replay.should_stop(epoch):
            stop = epoch
            break
    assert plain.epochs_run == stop and plain.stopped_early == (stop < 7)
    assert [h["val_loss"] for h in plain.history] == [h["val_loss"] for h in waited.history[:stop]]


@pytest.mark.parametrize("n_pos,n_neg", [(1, 2), (2, 2), (1, 5)])
def test_no_floor_where_even_a_perfect_ranking_is_within_chance(n_pos, n_neg):
    labels = np.array([1] * n_pos + [0] * n_neg)
    aucs = _null_auc_distribution(n_pos, n_neg)
    # the exact null: a perfect ranking happens by chance with probability 1 / C(n, n_pos) > 5 %
    assert (aucs == 1.0).mean() == pytest.approx(1 / math.comb(n_pos + n_neg, n_pos)) and (aucs == 1.0).mean() > 0.05
    assert chance_auc_bound(labels) > 1.0
    floor, note = signal_floor(labels)
    assert floor == -math.inf and f"{n_pos + n_neg} validation slides" in note and f"({n_pos} in the smallest class)" in note


def test_a_reachable_floor_is_the_bound_itself():
    labels = np.array([1, 1, 0, 0, 0])  # bound 0.975: only AUC 1 (chance 1 / 10) beats it
    assert signal_floor(labels) == (chance_auc_bound(labels), None) and chance_auc_bound(labels) < 1.0


def test_a_tiny_validation_set_stops_by_the_plain_rule_and_says_why(tmp_path, capsys):
    train = BagDataset.from_bags(synthetic_bags(12, seed=0, in_dim=8, min_instances=10, max_instances=20, signal=8.0))
    tiny = _flat_validation(3)  # labels 0, 1, 0: AUC 0.5 every epoch, and no AUC could beat chance
    # lr 1e-12 leaves float32 weights unchanged: a constant validation loss, so the plain rule stops at min_epochs
    waited = train_fold(train, tiny, TOY, {}, dataclasses.replace(_cfg(True), lr=1e-12), tmp_path / "wait")
    assert "wait_for_signal off for this fold: its 3 validation slides" in capsys.readouterr().err
    plain = train_fold(train, tiny, TOY, {}, dataclasses.replace(_cfg(False), lr=1e-12), tmp_path / "plain")
    assert waited.epochs_run == plain.epochs_run == 2 and waited.stopped_early and plain.stopped_early
    assert [h["val_loss"] for h in waited.history] == [h["val_loss"] for h in plain.history]
